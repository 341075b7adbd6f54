"""Rewards for visual-primitive reasoning (lineage §5.3, §6.1, §7.2, §7.3): format, quality and accuracy.

GRPO sums the reward functions (§6.1), so :class:`Reward.total` = format + quality + accuracy. Each scores
*any* string (truncated, looping, garbage) against a :class:`~optictx.data.sample.Sample`'s ground truth and
never raises.

* **Format** (rule-based, 0-1, paper): primitive syntax — every ``<|ref|>…<|/ref|><|box|>[[x1,y1,x2,y2],…]<|/box|>``
  and ``<|point|>[[x,y],…]<|/point|>`` well formed, integers 0-999, boxes non-degenerate and ordered left to
  right; one final ``\\boxed{}`` when the task has an answer (grounding/pointing: a box/point list or a
  refusal). The mean of those checks is multiplied by ``1 - duplicate fraction``: the paper's penalty for
  redundancy such as duplicate boxes, which stops a model from looping on box generation; and by the mode
  gate [mine]: primitives present when the trigger asks for them, absent when asked to answer directly
  (0 or 1, so leaving out the thinking can never pay).
* **Quality** ({0, 0.5, 1}, paper: an LLM judge; here a rule proxy with the same five concerns, plus "no
  answer at all" and "no thinking although the trigger asked for it"): redundancy
  (a primitive span repeated 3+ times), thinking/answer consistency (number of cited instances = boxed
  count; a stated relation, route or endpoint that matches the boxed answer), self-contradiction (two
  different boxed answers), boxes on real objects (IoU ≥ 0.5 with a drawn object; points inside one), and
  reward hacking (a fabricated "ground truth") -> 0. No issue -> 1, one -> 0.5, more -> 0.
* **Accuracy** (task-specific):
  - counting: R = α·exp(−β·|ŷ − y| / (|y| + 1)), α = 0.7, β = 3, exactly as the paper (§5.3); there is
    no bonus for an exact count in the paper, so an exact count earns 0.7 (and "correct" means ŷ = y);
  - grounding: Visual-RFT's IoU reward (§6.3): greedy one-to-one matching above IoU 0.5, ΣIoU / max(#gt, #pred);
  - pointing: one-to-one hits (a point inside a distinct target box) / max(#gt, #pred);
  - spatial: the mean of answer correctness and a thinking score (fraction of the two referred objects
    cited with IoU ≥ 0.5) — the paper averages a thinking and an answer judgement (§5.3);
  - maze: the five components of §7.2 (progress, completeness, wall-violation penalty, final-path
    validity, answer); path tracing: the four of §7.3 (bidirectional trajectory distance, endpoint,
    continuity, answer). The paper does not publish their weights or thresholds: ours are in
    ``MAZE_WEIGHTS``, ``PATH_WEIGHTS`` and ``PathTolerances`` [mine].
  With "Answer directly" (the ablation without primitives) only the answer is scored for mazes and paths.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from optictx.data.sample import DIRECT_SUFFIX, TRIGGER, Sample
from optictx.eval.metrics import iou_matrix
from optictx.primitives import parse_primitives

COUNT_ALPHA, COUNT_BETA = 0.7, 3.0
MAZE_WEIGHTS = {"progress": 0.15, "completeness": 0.15, "walls": 0.1, "path_valid": 0.2, "answer": 0.4}
PATH_WEIGHTS = {"trajectory": 0.3, "endpoint": 0.15, "continuity": 0.15, "answer": 0.4}
ANSWER_TASKS = ("counting", "spatial", "general", "maze", "path")  # tasks whose answer is a \boxed{}
THINKING_TASKS = ("counting", "spatial", "maze", "path")  # tasks the trigger makes think with primitives
HACKING = re.compile(r"ground[\s_-]*truth|\bgt\s*[:=]|answer\s+key|expected\s+answer|reference\s+answer",
                     re.IGNORECASE)


@dataclass(frozen=True)
class PathTolerances:
    """0-999 units. A trajectory ``trajectory`` units off on average scores 0; an endpoint ``endpoint`` units
    from the target marker scores 0; a final point farther than ``continuity`` from the marker of the label
    it answers earns the fixed continuity penalty."""

    trajectory: float = 60.0
    endpoint: float = 80.0
    continuity: float = 60.0


@dataclass
class Reward:
    format: float
    quality: float
    accuracy: float
    correct: bool  # the task's pass/fail (exact count, right verdict...): what GRPO's difficulty filter counts
    parts: dict[str, float] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.format + self.quality + self.accuracy


# ----------------------------------------------------------------------------- answers

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def boxed_answers(text: str) -> list[str]:
    return [m.strip() for m in _BOXED.findall(text)] if isinstance(text, str) else []


def final_answer(text: str) -> str | None:
    """The last ``\\boxed{}`` content (what ACC is measured on), or None."""
    found = boxed_answers(text)
    return found[-1] if found else None


def normalise(answer: str | None) -> str | None:
    if answer is None:
        return None
    a = answer.strip().strip(".").strip()
    low = a.lower()
    if low in ("true", "yes", "false", "no"):
        return low.capitalize()
    try:
        return str(int(float(a)))
    except ValueError:
        return low


def answer_correct(sample: Sample, text: str) -> bool:
    got = normalise(final_answer(text))
    accepted = sample.meta.get("accepted") or [sample.answer]
    return got is not None and got in {normalise(a) for a in accepted}


# ----------------------------------------------------------------------------- format

_BAR = "[|\uff5c]"
_NUM = r"\s*\d{1,3}\s*"
_LIST = lambda k: rf"\[\s*\[{','.join([_NUM] * k)}\](?:\s*,\s*\[{','.join([_NUM] * k)}\])*\s*\]"  # noqa: E731
_WELL_FORMED = re.compile(
    rf"<{_BAR}ref{_BAR}>[^<>]+?<{_BAR}/ref{_BAR}><{_BAR}box{_BAR}>({_LIST(4)})<{_BAR}/box{_BAR}>"
    rf"|<{_BAR}point{_BAR}>({_LIST(2)})<{_BAR}/point{_BAR}>")
_ANY_TAG = re.compile(rf"<{_BAR}/?(ref|box|point|det){_BAR}>")
_OPENERS = re.compile(rf"<{_BAR}(box|point|det){_BAR}>")


def _numbers(group: str, k: int) -> list[tuple[int, ...]]:
    nums = [int(v) for v in re.findall(r"\d+", group)]
    return [tuple(nums[i:i + k]) for i in range(0, len(nums), k)]


@dataclass
class Syntax:
    spans: int = 0  # well-formed primitive constructs
    malformed: int = 0  # stray/unbalanced tags, bad lists, degenerate or unordered boxes
    coords: int = 0
    duplicates: int = 0

    @property
    def score(self) -> float:
        total = self.spans + self.malformed
        return 1.0 if total == 0 else self.spans / total

    @property
    def duplicate_fraction(self) -> float:
        return self.duplicates / self.coords if self.coords else 0.0


def _malformed(text: str, start: int, end: int) -> int:
    """Broken constructs between two valid ones: one per opening box/point tag, or one for stray tags."""
    tags = _ANY_TAG.findall(text, start, end)
    return len(_OPENERS.findall(text, start, end)) or int(bool(tags))


def check_syntax(text: str) -> Syntax:
    """Strict reading of the primitive language (``parse_primitives`` is the lenient one)."""
    out = Syntax()
    text = text if isinstance(text, str) else ""
    pos = 0
    for m in _WELL_FORMED.finditer(text):
        out.malformed += _malformed(text, pos, m.start())
        pos = m.end()
        boxes = m.group(1) is not None
        coords = _numbers(m.group(1) or m.group(2), 4 if boxes else 2)
        ok = all(max(c) <= 999 for c in coords)
        if boxes:
            ok &= all(x1 < x2 and y1 < y2 for x1, y1, x2, y2 in coords)
            ok &= [c[0] for c in coords] == sorted(c[0] for c in coords)  # left to right
        out.spans += ok
        out.malformed += not ok
        out.coords += len(coords)
        out.duplicates += _duplicates(coords, boxes)
    out.malformed += _malformed(text, pos, len(text))
    return out


def _duplicates(coords: list[tuple[int, ...]], boxes: bool) -> int:
    """Entries of one list that repeat an earlier one (boxes: IoU > 0.9; points: the same point)."""
    if len(coords) < 2:
        return 0
    if not boxes:
        return len(coords) - len(set(coords))
    ious = iou_matrix(coords, coords)
    return int(sum((ious[i, :i] > 0.9).any() for i in range(1, len(coords))))


def format_reward(sample: Sample, text: str) -> tuple[float, dict[str, float]]:
    syn = check_syntax(text)
    checks = {"syntax": syn.score}
    if sample.task in ANSWER_TASKS:
        found = boxed_answers(text)
        tail = text[text.rfind("\\boxed{"):] if found else ""
        checks["boxed"] = float(len(found) == 1 and _BOXED.fullmatch(tail.strip().rstrip(".")) is not None)
    has_prims = syn.spans > 0
    if sample.task in ("grounding", "pointing"):  # the answer is the primitive list itself, or a refusal
        kind = "<|box|>" if sample.task == "grounding" else "<|point|>"
        checks["answer_form"] = float((has_prims and kind in text.replace("\uff5c", "|")) or _REFUSAL.search(text)
                                      is not None)
    modes = {}
    if thinking_required(sample):
        modes["uses_primitives"] = float(has_prims)
    if sample.prompt.endswith(DIRECT_SUFFIX.strip()) or sample.task == "general":
        modes["no_primitives"] = float(syn.spans + syn.malformed == 0)
    # The mode is a gate, not one more averaged check: as a third of the mean, dropping the thinking cost 0.33
    # format while sparing the quality judge's "ungrounded"/"inconsistent" issues, and GRPO learned exactly that
    # (counting, lr 1e-4: completions 39 -> 5.5 tokens in 10 steps, exact counts 16% -> 10%).
    gate = float(np.prod(list(modes.values())))  # 1.0 when the prompt asks for no mode
    score = float(np.mean(list(checks.values()))) * (1.0 - syn.duplicate_fraction) * gate
    parts = {**checks, **modes}
    return score, {**{f"format_{k}": v for k, v in parts.items()}, "duplicates": syn.duplicate_fraction}


def thinking_required(sample: Sample) -> bool:
    """The trigger asks for primitive thinking on this task (a count of zero has nothing to cite)."""
    wants_none = sample.task == "counting" and sample.answer == "0"
    return sample.task in THINKING_TASKS and sample.prompt.startswith(TRIGGER) and not wants_none


# ----------------------------------------------------------------------------- quality

_REFUSAL = re.compile(r"\bthere (?:is|are) no\b", re.IGNORECASE)
_RELATION = re.compile(r"\bis\s+(left of|right of|above|below|inside|outside)\b", re.IGNORECASE)
_REACHES = re.compile(r"\b(?:reaches|connects to|ends at)\s+(\w+)", re.IGNORECASE)
_NOT_SOLVABLE = re.compile(r"\b(not solvable|unsolvable|no (?:path|route))\b", re.IGNORECASE)
_SOLVABLE = re.compile(r"\bis solvable\b", re.IGNORECASE)


def quality_issues(sample: Sample, text: str) -> list[str]:
    """Rule-based stand-in for the paper's generative quality judge; each entry is one issue."""
    text = text if isinstance(text, str) else ""
    issues = []
    prims = parse_primitives(text)
    spans = [(p.kind, p.coords) for p in prims if p.coords]
    if any(spans.count(s) >= 3 for s in spans):
        issues.append("redundant: a primitive span repeated 3+ times")
    answers = {normalise(a) for a in boxed_answers(text)}
    if len(answers) > 1:
        issues.append("self-contradiction: different boxed answers")
    final = normalise(final_answer(text))
    if sample.task in ANSWER_TASKS and final is None:
        issues.append("no final answer")
    if sample.task in ("grounding", "pointing") and not prims and not _REFUSAL.search(text):
        issues.append("no answer: neither primitives nor a refusal")
    if thinking_required(sample) and not prims:
        issues.append("unsupported: the trigger asked for primitive thinking, none is cited")
    issues += _consistency(sample, text, prims, final)
    issues += _grounded(sample, prims)
    return issues


def _consistency(sample: Sample, text: str, prims, final: str | None) -> list[str]:
    if final is None:
        return []
    if sample.task == "counting" and prims and final.isdigit():
        cited = len(prims[-1].coords)
        if cited != int(final):
            return [f"inconsistent: {cited} instances cited, {final} counted"]
    if sample.task == "spatial":
        stated = _RELATION.findall(text)
        asked = sample.meta.get("relation")
        if stated and asked:
            says_yes = stated[-1].lower() == asked
            if final in ("Yes", "No") and says_yes != (final == "Yes"):
                return [f"inconsistent: thinking says '{stated[-1]}', answer {final}"]
    if sample.task == "maze":
        if final == "True" and _NOT_SOLVABLE.search(text):
            return ["self-contradiction: says not solvable, answers True"]
        if final == "False" and _SOLVABLE.search(text) and not _NOT_SOLVABLE.search(text):
            return ["self-contradiction: says solvable, answers False"]
    if sample.task == "path":
        said = _REACHES.findall(text)
        if said and normalise(said[-1]) != final:
            return [f"inconsistent: thinking reaches {said[-1]}, answer {final}"]
    return []


def _grounded(sample: Sample, prims) -> list[str]:
    """Scene tasks: every cited box must overlap a drawn object, every point lie inside one."""
    objects = sample.meta.get("all_boxes")
    if sample.task not in ("grounding", "pointing", "counting", "spatial") or not objects:
        return []
    boxes = [c for p in prims if p.kind == "box" for c in p.coords]
    points = [c for p in prims if p.kind == "point" for c in p.coords]
    bad = 0
    if boxes:
        bad += int((iou_matrix(boxes, objects).max(axis=1) < 0.5).sum())
    for x, y in points:
        bad += not any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in objects)
    return [f"ungrounded: {bad} primitives on no object"] if bad else []


def quality_reward(sample: Sample, text: str) -> tuple[float, list[str]]:
    if isinstance(text, str) and HACKING.search(text):
        return 0.0, ["reward hacking: cites a fabricated ground truth"]
    issues = quality_issues(sample, text)
    return (1.0, 0.5, 0.0)[min(len(issues), 2)], issues


# ----------------------------------------------------------------------------- accuracy


def count_reward(pred: int | None, gold: int) -> float:
    """The paper's counting reward: 0.7·exp(−3·|ŷ−y|/(|y|+1)); no parsable answer scores 0."""
    if pred is None:
        return 0.0
    return COUNT_ALPHA * math.exp(-COUNT_BETA * abs(pred - gold) / (abs(gold) + 1))


def _matched_ious(pred: list, gold: list, threshold: float = 0.5) -> list[float]:
    """Greedy one-to-one matching by IoU (Visual-RFT): each prediction takes its best free target above 0.5."""
    if not pred or not gold:
        return []
    ious = iou_matrix(pred, gold)
    free, out = set(range(len(gold))), []
    for i in range(len(pred)):
        best = max(free, key=lambda j: ious[i, j], default=None)
        if best is not None and ious[i, best] > threshold:
            free.discard(best)
            out.append(float(ious[i, best]))
    return out


def grounding_accuracy(sample: Sample, text: str) -> tuple[float, bool]:
    gold = [tuple(b) for b in sample.meta["boxes"]]
    pred = [c for p in parse_primitives(text) if p.kind == "box" for c in p.coords]
    if not gold:
        return float(not pred), not pred
    matched = _matched_ious(pred, gold)
    return min(1.0, sum(matched) / max(len(gold), len(pred))), len(matched) == len(gold) == len(pred)


def pointing_accuracy(sample: Sample, text: str) -> tuple[float, bool]:
    from optictx.eval.metrics import _max_matching

    gold = sample.meta["boxes"]
    pred = [c for p in parse_primitives(text) if p.kind == "point" for c in p.coords]
    if not gold:
        return float(not pred), not pred
    if not pred:
        return 0.0, False
    adj = [[j for j, b in enumerate(gold) if b[0] <= x <= b[2] and b[1] <= y <= b[3]] for x, y in pred]
    hits = _max_matching(adj, len(gold))
    return hits / max(len(gold), len(pred)), hits == len(gold) == len(pred)


def spatial_accuracy(sample: Sample, text: str, direct: bool) -> tuple[float, bool, dict[str, float]]:
    right = answer_correct(sample, text)
    if direct:
        return float(right), right, {"answer": float(right)}
    boxes = [c for p in parse_primitives(text) if p.kind == "box" for c in p.coords]
    refs = list(sample.meta["refs"].values())
    cited = 0.0
    if boxes:
        cited = float((iou_matrix(refs, boxes).max(axis=1) >= 0.5).mean())
    return (float(right) + cited) / 2, right, {"answer": float(right), "thinking": cited}


def maze_components(sample: Sample, text: str) -> dict[str, float]:
    """§7.2's five components, each in [0, 1]."""
    from optictx.data.mazes import analyse_trace, bfs

    meta = sample.meta
    rep = analyse_trace(text, meta)
    passages = {tuple(p) for p in meta["passages"]}
    solvable = bool(meta["solvable"])
    comp = {"progress": 1.0, "completeness": 1.0, "path_valid": 1.0}
    if solvable:
        to_goal = bfs(meta["n"], passages, meta["goal"])
        gt_len = max(1, to_goal[meta["start"]])
        left = min(to_goal.get(c, gt_len) for c in rep.explored)
        comp["progress"] = max(0.0, 1.0 - left / gt_len)
        comp["path_valid"] = float(rep.final_path_valid)
    else:
        reach = set(bfs(meta["n"], passages, meta["start"]))
        comp["completeness"] = len(rep.explored & reach) / len(reach)
    comp["walls"] = max(0.0, 1.0 - rep.violations / max(1, len(passages)))
    comp["answer"] = float(answer_correct(sample, text))
    return comp


def path_components(sample: Sample, text: str, tol: PathTolerances = PathTolerances()) -> dict[str, float]:
    """§7.3's four components, each in [0, 1] (continuity: 1 unless the fixed penalty applies)."""
    from optictx.data.paths import point_to_polyline

    meta = sample.meta
    lists = [np.array(p.coords, float) for p in parse_primitives(text) if p.kind == "point" and len(p.coords) >= 2]
    comp = {"trajectory": 0.0, "endpoint": 0.0, "continuity": 0.0,
            "answer": float(answer_correct(sample, text))}
    if not lists:
        return comp
    traj = max(lists, key=len)
    gold = np.array(meta["polyline"], float)
    d = (point_to_polyline(traj, gold).mean() + point_to_polyline(gold, traj).mean()) / 2
    comp["trajectory"] = max(0.0, 1.0 - d / tol.trajectory)
    end = np.array(meta["ends"][sample.answer], float)
    comp["endpoint"] = max(0.0, 1.0 - float(np.hypot(*(traj[-1] - end))) / tol.endpoint)
    said = normalise(final_answer(text))
    marker = meta["ends"].get(said) if said is not None else None
    comp["continuity"] = float(marker is not None and np.hypot(*(traj[-1] - np.array(marker))) <= tol.continuity)
    return comp


def accuracy_reward(sample: Sample, text: str) -> tuple[float, bool, dict[str, float]]:
    text = text if isinstance(text, str) else ""
    direct = sample.prompt.endswith(DIRECT_SUFFIX.strip())
    if sample.task == "counting":
        got = normalise(final_answer(text))
        pred = int(got) if got is not None and got.lstrip("-").isdigit() else None
        gold = int(sample.answer)
        return count_reward(pred, gold), pred == gold, {}
    if sample.task == "grounding":
        acc, ok = grounding_accuracy(sample, text)
        return acc, ok, {}
    if sample.task == "pointing":
        acc, ok = pointing_accuracy(sample, text)
        return acc, ok, {}
    if sample.task == "spatial":
        return spatial_accuracy(sample, text, direct)
    if sample.task in ("maze", "path"):
        comp = maze_components(sample, text) if sample.task == "maze" else path_components(sample, text)
        weights = {"answer": 1.0} if direct else (MAZE_WEIGHTS if sample.task == "maze" else PATH_WEIGHTS)
        acc = sum(w * comp[k] for k, w in weights.items()) / sum(weights.values())
        return acc, comp["answer"] == 1.0, comp
    ok = answer_correct(sample, text)
    return float(ok), ok, {}


def score(sample: Sample, text: str) -> Reward:
    """All three rewards for one output."""
    text = text if isinstance(text, str) else ""
    fmt, fparts = format_reward(sample, text)
    qual, issues = quality_reward(sample, text)
    acc, correct, aparts = accuracy_reward(sample, text)
    parts = {k: float(v) for k, v in {**fparts, **aparts}.items()}
    return Reward(float(fmt), float(qual), float(acc), bool(correct), parts, issues)
