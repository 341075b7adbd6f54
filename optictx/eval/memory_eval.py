"""`optictx eval memory`: does optical memory recall more planted facts than a text window of the same budget?

A synthetic conversation (held-out licence prose, never trained on, cut into user/assistant turns) carries
facts planted at known turns ("The code for locker 17 is 4831."). For each total token budget:

* **optical memory**: every turn is added to an :class:`~optictx.memory.OpticalMemory` with that budget;
  each fact's question goes to ``memory.recall`` (images decoded by the reader, passages ranked by
  rapidfuzz); a fact counts as recalled when its answer string is in one of the top-k passages.
* **text window**: the newest turns that fit in the same budget (same tokenizer, same ``role: text``
  lines); a fact counts as recalled when its answer is in the window (no retrieval step: a generous
  baseline).

Recall is reported against the fact's age (tokens of conversation since it was said) and against the
budget, with a conversation at least 10x longer than the largest budget. ``--model oracle`` swaps the OCR
reader for the pages' ground truth: the ceiling set by the budget and retrieval alone, labelled as such.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from optictx.budget import text_tokens
from optictx.memory import DecaySchedule, OpticalMemory

FIRST = "Maria Jonas Priya Tomas Elena Kofi Ingrid Rafael Aiko Dmitri Leila Oscar Nadia Emil Sofia Hugo".split()
LAST = "Lopez Berg Shah Novak Rossi Mensah Dahl Costa Mori Volkov Haddad Lind Petrov Stone Marsh Quinn".split()
CITIES = ("Lisbon Oslo Dakar Quito Perth Hanoi Tallinn Cusco Nairobi Lyon Porto Kyoto Bergen Tunis Leeds Split "
          "Graz Turku Malmo Cork").split()
PLACES = ("north office|blue lounge|garden shed|east lab|boat house|red library|top studio|old bakery|west wing|"
          "glass hall|music room|print shop").split("|")
WORDS = "maple cedar river amber falcon copper harbor meadow silver tundra violet willow".split()


@dataclass
class Fact:
    turn: int
    sentence: str
    question: str
    answer: str


@dataclass
class Conversation:
    turns: list[tuple[str, str]]
    facts: list[Fact]

    @property
    def lines(self) -> list[str]:
        return [f"{r}: {t}" for r, t in self.turns]


def fact_templates(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    """``n`` distinct (sentence, question, answer) triples; keys never repeat, so a question has one answer."""
    lockers = rng.sample(range(10, 100), min(n, 90))
    names = [f"{f} {l}" for f, l in zip(rng.sample(FIRST, len(FIRST)), rng.sample(LAST, len(LAST)))]
    cities, places = rng.sample(CITIES, len(CITIES)), rng.sample(PLACES, len(PLACES))
    out: list[tuple[str, str, str]] = []
    pools = {0: lockers, 1: names, 2: cities, 3: places}
    used = {k: 0 for k in pools}
    while len(out) < n:
        kind = len(out) % 4
        if used[kind] >= len(pools[kind]):
            kind = 0  # lockers are the largest pool
        key = pools[kind][used[kind]]
        used[kind] += 1
        if kind == 0:
            a = f"{rng.randrange(1000, 10000)}"
            out.append((f"The code for locker {key} is {a}.", f"What is the code for locker {key}?", a))
        elif kind == 1:
            a = f"{rng.randrange(10000, 100000)}"
            out.append((f"{key}'s badge number is {a}.", f"What is {key}'s badge number?", a))
        elif kind == 2:
            a = f"{rng.randrange(2, 40)}"
            a = f"{a}{rng.choice('ABCD')}"
            out.append((f"The platform for the train to {key} is {a}.",
                        f"What is the platform for the train to {key}?", a))
        else:
            a = f"{rng.choice(WORDS)}{rng.randrange(100, 1000)}"
            out.append((f"The wifi password for the {key} is {a}.", f"What is the wifi password for the {key}?", a))
    return out


def make_conversation(n_tokens: int, n_facts: int, seed: int = 0, turn_words: tuple[int, int] = (30, 110)
                      ) -> Conversation:
    """User/assistant turns of held-out prose totalling at least ``n_tokens`` DeepSeek tokens (as
    ``role: text`` lines), with ``n_facts`` facts planted at evenly spread turns, mid-turn."""
    from optictx.data.corpus import heldout_paragraphs

    rng = random.Random(seed)
    words = " ".join(heldout_paragraphs()).split()
    turns, total, pos = [], 0, rng.randrange(len(words))
    while total < n_tokens:
        k = rng.randint(*turn_words)
        chunk = [words[(pos + i) % len(words)] for i in range(k)]
        pos = (pos + k) % len(words)
        role = "user" if len(turns) % 2 == 0 else "assistant"
        turns.append((role, " ".join(chunk)))
        total += text_tokens(f"{role}: {turns[-1][1]}")
    facts = []
    for i, (sentence, question, answer) in enumerate(fact_templates(rng, n_facts)):
        t = min(len(turns) - 1, int((i + 0.5) * len(turns) / n_facts))
        role, text = turns[t]
        ws = text.split()
        cut = len(ws) // 2
        turns[t] = (role, " ".join(ws[:cut] + [sentence] + ws[cut:]))
        facts.append(Fact(t, sentence, question, answer))
    return Conversation(turns, facts)


@dataclass
class FactResult:
    budget: int
    turn: int
    age_turns: int
    tokens_ago: int  # tokens of the turns after the fact's turn
    answer: str
    optical: bool  # answer in memory.recall's top-k passages
    optical_readable: bool  # answer anywhere in the decoded pages + recent text (retrieval aside)
    where: str  # "text" (recent window), "L<k>" (image level), "forgotten"
    text_window: bool  # answer in the same-budget text window


def text_window(lines: Sequence[str], tokens: Sequence[int], budget: int) -> str:
    """The newest lines that fit in ``budget`` tokens: what truncation keeps."""
    used, start = 0, len(lines)
    while start > 0 and used + tokens[start - 1] <= budget:
        start -= 1
        used += tokens[start]
    return "\n".join(lines[start:])


def evaluate(conv: Conversation, budgets: Sequence[int], reader: Callable | None, *, recent_fraction: float = 0.25,
             schedule: DecaySchedule | None = None, k: int = 3, oracle: bool = False) -> list[FactResult]:
    """Recall of every planted fact at every budget, optical memory vs text window (see module doc).
    ``oracle=True`` reads each page's ground truth instead of calling ``reader``."""
    tokens = [text_tokens(s) for s in conv.lines]
    results = []
    for budget in budgets:
        mem = OpticalMemory(budget, int(budget * recent_fraction), schedule, reader=reader)
        for role, text in conv.turns:
            mem.add(role, text)
        ctx = mem.context()
        if oracle:
            truth = {ci.image.tobytes(): ci.text for ci in ctx.images}
            mem.reader = lambda im: truth[im.tobytes()]
        decoded = " ".join(" ".join(mem.read_pages([ci.image for ci in ctx.images])).split())
        recent = " ".join(f"{p.role}: {p.text}" for p in ctx.text)
        level_of_turn = {}
        for row in ctx.ledger.rows:
            for t in range(row.first_turn, row.last_turn + 1):
                level_of_turn[t] = "forgotten" if row.level is None else f"L{row.level}"
        window = text_window(conv.lines, tokens, budget)
        for f in conv.facts:
            hits = mem.recall(f.question, k=k)
            results.append(FactResult(
                budget=budget, turn=f.turn, age_turns=len(conv.turns) - 1 - f.turn,
                tokens_ago=sum(tokens[f.turn + 1:]), answer=f.answer,
                optical=any(f.answer in h.text for h in hits),
                optical_readable=f.answer in decoded or f.answer in recent,
                where=level_of_turn.get(f.turn, "text"), text_window=f.answer in window))
    return results


def _rate(rows: Sequence[FactResult], attr: str) -> float | None:
    return statistics.fmean(getattr(r, attr) for r in rows) if rows else None


def age_bins(total_tokens: int, n_bins: int = 5) -> list[tuple[int, int]]:
    edges = [round(total_tokens * i / n_bins) for i in range(n_bins + 1)]
    edges[-1] = total_tokens + 1
    return list(zip(edges, edges[1:]))


def summarise(results: Sequence[FactResult], total_tokens: int, n_bins: int = 5) -> dict:
    """Recall per budget (overall) and per (budget, age bin), for both methods."""
    budgets = sorted({r.budget for r in results})
    by_budget = []
    for b in budgets:
        sel = [r for r in results if r.budget == b]
        by_budget.append({"budget": b, "facts": len(sel), "optical": _rate(sel, "optical"),
                          "optical_readable": _rate(sel, "optical_readable"), "text_window": _rate(sel, "text_window"),
                          "forgotten": sum(r.where == "forgotten" for r in sel) / len(sel)})
    by_age = []
    for lo, hi in age_bins(total_tokens, n_bins):
        for b in budgets:
            sel = [r for r in results if r.budget == b and lo <= r.tokens_ago < hi]
            if sel:
                by_age.append({"budget": b, "tokens_ago": f"{lo}-{min(hi, total_tokens)}", "facts": len(sel),
                               "optical": _rate(sel, "optical"), "text_window": _rate(sel, "text_window")})
    return {"by_budget": by_budget, "by_age": by_age}


def print_tables(summary: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    console = Console()
    t = Table(title=title)
    for col in ("budget", "facts", "optical recall", "answer in decoded pages", "forgotten", "text window recall"):
        t.add_column(col, justify="right")
    for r in summary["by_budget"]:
        t.add_row(str(r["budget"]), str(r["facts"]), pct(r["optical"]), pct(r["optical_readable"]),
                  pct(r["forgotten"]), pct(r["text_window"]))
    console.print(t)
    a = Table(title="recall vs age (tokens of conversation since the fact)")
    for col in ("tokens ago", "budget", "facts", "optical", "text window"):
        a.add_column(col, justify="right")
    for r in summary["by_age"]:
        a.add_row(r["tokens_ago"], str(r["budget"]), str(r["facts"]), pct(r["optical"]), pct(r["text_window"]))
    console.print(a)


def plot(results: Sequence[FactResult], summary: dict, total_tokens: int, path: str | Path, title: str,
         n_bins: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    bins = age_bins(total_tokens, n_bins)
    mids = [(lo + min(hi, total_tokens)) / 2 / 1000 for lo, hi in bins]
    for i, b in enumerate(sorted({r.budget for r in results})):
        colour = f"C{i}"
        for attr, style, label in (("optical", "-o", "optical"), ("text_window", "--s", "text window")):
            ys = [_rate([r for r in results if r.budget == b and lo <= r.tokens_ago < hi], attr) for lo, hi in bins]
            ax1.plot([m for m, y in zip(mids, ys) if y is not None], [100 * y for y in ys if y is not None], style,
                     color=colour, label=f"{label}, budget {b}")
    ax1.set(xlabel="fact age (thousand tokens of conversation since)", ylabel="facts recalled (%)",
            ylim=(-3, 103), title="recall vs age")
    ax1.legend(fontsize=7)
    xs = [r["budget"] for r in summary["by_budget"]]
    ax2.plot(xs, [100 * r["optical"] for r in summary["by_budget"]], "-o", label="optical memory")
    ax2.plot(xs, [100 * r["text_window"] for r in summary["by_budget"]], "--s", label="text window (truncation)")
    ax2.set(xlabel="total context budget (tokens)", ylabel="facts recalled (%)", ylim=(-3, 103),
            title="recall vs budget")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI
def register_cli(ev: argparse._SubParsersAction) -> None:
    p = ev.add_parser("memory", help="optical memory: planted-fact recall vs age and budget, vs a text window",
                      description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (bundled), a model folder, a hub id, or 'oracle' "
                                                  "(page ground truth: the ceiling without OCR errors)")
    p.add_argument("--budgets", default="500,1000,2000", help="total context budgets in tokens, comma separated")
    p.add_argument("--length", type=float, default=10.5,
                   help="conversation length as a multiple of the largest budget (default 10.5)")
    p.add_argument("--facts", type=int, default=40, help="planted facts (default 40)")
    p.add_argument("--recent", type=float, default=0.25, help="share of each budget kept as recent text")
    p.add_argument("--schedule", choices=["tiny", "mono", "paper"], default="tiny",
                   help="tiny (256-px grid pages the bundled model reads), mono (256-px pages, 16->10 px "
                        "fonts) or paper (Large->...->nano)")
    p.add_argument("-k", type=int, default=3, help="passages recall returns per question")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/eval-memory", help="folder for results.json and memory.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from optictx.errors import ConfigError

    try:
        budgets = sorted({int(b) for b in args.budgets.split(",") if b.strip()})
    except ValueError:
        raise ConfigError(f"--budgets must be integers separated by commas, got {args.budgets!r}") from None
    if not budgets or budgets[0] < 50 or args.length < 1 or args.facts < 1:
        raise ConfigError("need budgets >= 50 tokens, --length >= 1 and --facts >= 1")
    oracle = args.model == "oracle"
    reader = None
    if not oracle:
        from optictx.ocr import OCR

        reader = OCR(args.model, prompt="free-ocr", max_new_tokens=1024)
    schedule = {"tiny": DecaySchedule.tiny, "mono": DecaySchedule.mono, "paper": DecaySchedule.paper}[args.schedule]()
    conv = make_conversation(int(args.length * budgets[-1]), args.facts, args.seed)
    total = sum(text_tokens(s) for s in conv.lines)
    results = evaluate(conv, budgets, reader, recent_fraction=args.recent, schedule=schedule, k=args.k,
                       oracle=oracle)
    summary = summarise(results, total)
    reader_name = "oracle reader (page ground truth)" if oracle else f"OCR model {args.model}"
    title = (f"{reader_name}, schedule {args.schedule}: {len(conv.turns)} turns, {total} tokens "
             f"({total / budgets[-1]:.1f}x the largest budget), {len(conv.facts)} facts")
    print_tables(summary, title)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"title": title, "conversation_tokens": total, "turns": len(conv.turns), "summary": summary,
         "facts": [asdict(r) for r in results]}, indent=1) + "\n", encoding="utf-8")
    plot(results, summary, total, out / "memory.png", title)
    print(f"wrote {out / 'results.json'} and {out / 'memory.png'}")
    return 0
