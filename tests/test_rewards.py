"""Rewards score hand-made good and bad outputs as designed: exact numbers for the counting formula, IoU
matching, duplicate penalty, quality tiers, maze and path components; gold answers earn the maximum."""
import math

import pytest
from PIL import Image

from optictx import rewards
from optictx.data import mazes, paths, scenes
from optictx.data.sample import TRIGGER, Sample
from optictx.primitives import format_box, format_points


def _counting(count=2, boxes=((100, 100, 200, 200), (500, 500, 600, 600)), mode="trigger"):
    all_boxes = [list(b) for b in boxes] + [[800, 100, 900, 200]]  # + one distractor
    meta = {"label": "red circle", "boxes": [list(b) for b in boxes], "all_boxes": all_boxes, "count": count}
    prompt = (TRIGGER if mode == "trigger" else "") + "How many red circles are there?"
    return Sample("counting", Image.new("RGB", (84, 84)), prompt, "", str(count), mode, 0, 0, meta)


GOOD = format_box("red circle", [(100, 100, 200, 200), (500, 500, 600, 600)]) + " That makes 2. \\boxed{2}"


def test_counting_reward_is_the_papers_formula():
    assert rewards.count_reward(3, 3) == pytest.approx(0.7)
    assert rewards.count_reward(5, 3) == pytest.approx(0.7 * math.exp(-1.5))
    assert rewards.count_reward(0, 3) == pytest.approx(0.7 * math.exp(-2.25))
    assert rewards.count_reward(1, 0) == pytest.approx(0.7 * math.exp(-3))
    assert rewards.count_reward(None, 3) == 0.0


def test_good_counting_output_gets_full_format_and_quality():
    r = rewards.score(_counting(), GOOD)
    assert (r.format, r.quality, r.accuracy, r.correct) == (1.0, 1.0, pytest.approx(0.7), True)
    assert r.total == pytest.approx(2.7)


def test_counting_failures_each_cost_what_they_should():
    s = _counting()
    # a wrong count that also cites the distractor: consistent and on real objects -> quality stays 1
    wrong = format_box("red circle", [(100, 100, 200, 200), (500, 500, 600, 600), (800, 100, 900, 200)]) + \
        " That makes 3. \\boxed{3}"
    r = rewards.score(s, wrong)
    assert (r.quality, r.correct) == (1.0, False) and r.accuracy == pytest.approx(0.7 * math.exp(-1.0))
    # cites 2 and answers 3: inconsistent -> 0.5
    assert rewards.score(s, GOOD.replace("\\boxed{2}", "\\boxed{3}")).quality == 0.5
    # inconsistent and a box on nothing -> 0
    ghost = format_box("red circle", [(100, 100, 200, 200), (300, 300, 400, 400)]) + " \\boxed{3}"
    assert rewards.score(s, ghost).quality == 0.0
    # a fabricated ground truth is reward hacking -> 0, whatever else is right
    assert rewards.score(s, GOOD + " The ground truth is \\boxed{2}").quality == 0.0
    # two different boxed answers: self-contradiction (and two boxed -> the format check fails too)
    r = rewards.score(s, "\\boxed{1} " + GOOD)
    assert r.quality == 0.5 and r.parts["format_boxed"] == 0.0


def test_format_penalises_duplicates_bad_syntax_and_missing_pieces():
    s = _counting()
    dup = format_box("red circle", [(100, 100, 200, 200), (101, 100, 200, 200), (500, 500, 600, 600)])
    r = rewards.score(s, dup + " \\boxed{3}")
    assert r.parts["duplicates"] == pytest.approx(1 / 3) and r.format == pytest.approx(2 / 3)
    # one well-formed list and one unclosed one: mean(syntax 1/2, boxed 1) = 0.75 ...
    half = format_box("red circle", [(100, 100, 200, 200), (500, 500, 600, 600)]) + " <|box|>[[1,2 \\boxed{2}"
    r = rewards.score(s, half)
    assert r.parts["format_syntax"] == pytest.approx(0.5) and r.format == pytest.approx(0.75)
    # ... and when nothing well formed is left, no primitive was used: the trigger's gate makes format 0
    broken = "<|ref|>red circle<|/ref|><|box|>[[100,100,200,200],[500,500 \\boxed{2}"
    r = rewards.score(s, broken)
    assert r.parts["format_syntax"] == 0.0 and r.parts["format_uses_primitives"] == 0.0 and r.format == 0.0
    # boxes not ordered left to right, or degenerate, are malformed
    assert rewards.check_syntax("<|ref|>a<|/ref|><|box|>[[500,1,600,2],[100,1,200,2]]<|/box|>").malformed == 1
    assert rewards.check_syntax("<|ref|>a<|/ref|><|box|>[[5,5,5,9]]<|/box|>").malformed == 1
    assert rewards.check_syntax("<|point|>[[1000,5]]<|/point|>").malformed == 1
    # with the trigger, no primitive at all fails the mode gate, and the quality judge flags it: dropping the
    # thinking must never beat thinking with one ungrounded box (the reward hack GRPO found when it was a mean)
    r = rewards.score(s, "There are two. \\boxed{2}")
    assert r.parts["format_uses_primitives"] == 0.0 and r.format == 0.0 and r.quality == 0.5
    ungrounded = rewards.score(s, format_box("red circle", [(100, 100, 200, 200), (700, 700, 800, 800)]) + " \\boxed{2}")
    assert ungrounded.quality == 0.5 and ungrounded.total > r.total
    zero = scenes.counting(0, next(i for i in range(200) if scenes.counting(0, i).answer == "0"), mode="trigger")
    assert rewards.score(zero, "There are none. \\boxed{0}").format == 1.0  # nothing to cite
    assert rewards.score(zero, "There are none. \\boxed{0}").quality == 1.0
    # "Answer directly": primitives are a format failure
    direct = _counting(mode="direct")
    direct.prompt = "How many red circles are there? Answer directly."
    assert rewards.score(direct, GOOD).parts["format_no_primitives"] == 0.0 and rewards.score(direct, GOOD).format == 0
    assert rewards.score(direct, "\\boxed{2}").format == 1.0


def test_grounding_accuracy_is_visual_rft_iou_matching():
    s = Sample("grounding", Image.new("RGB", (84, 84)), "Locate dog", "", "", "auto", 0, 0,
               {"label": "dog", "boxes": [[0, 0, 100, 100], [200, 0, 300, 100]],
                "all_boxes": [[0, 0, 100, 100], [200, 0, 300, 100]]})
    both = format_box("dog", [(0, 0, 100, 80), (200, 0, 300, 100)])
    r = rewards.score(s, both)
    assert r.accuracy == pytest.approx((0.8 + 1.0) / 2) and r.correct
    half = format_box("dog", [(0, 0, 100, 50)])  # IoU 0.5 is not > 0.5: no match
    assert rewards.score(s, half).accuracy == 0.0
    extra = format_box("dog", [(0, 0, 100, 100), (200, 0, 300, 100), (400, 0, 500, 100)])
    r = rewards.score(s, extra)
    assert r.accuracy == pytest.approx(2 / 3) and not r.correct and r.quality == 0.5  # one box on nothing
    s.meta["boxes"] = []
    assert rewards.score(s, "There is no dog in the image.").accuracy == 1.0
    assert rewards.score(s, both).accuracy == 0.0


def test_pointing_counts_one_hit_per_target():
    s = scenes.pointing(0, 2)
    gold = rewards.score(s, s.target)
    assert gold.accuracy == 1.0 and gold.correct
    x1, y1, x2, y2 = s.meta["boxes"][0]
    inside = ((x1 + x2) // 2, (y1 + y2) // 2)
    twice = rewards.score(s, format_points([inside, inside]))
    assert twice.accuracy == pytest.approx(1 / max(2, len(s.meta["boxes"])))
    assert twice.parts["duplicates"] == 0.5


@pytest.mark.parametrize("gen", [scenes.grounding, scenes.pointing, scenes.counting, scenes.spatial,
                                 scenes.general, mazes.maze, paths.path])
@pytest.mark.parametrize("mode", ["trigger", "direct"])
def test_gold_answers_earn_the_maximum(gen, mode):
    for i in range(6):
        s = gen(1, i, mode=mode)
        r = rewards.score(s, s.target)
        top = 0.7 if s.task == "counting" else 1.0
        assert r.format == 1.0 and r.quality == 1.0 and r.correct, (s.task, r)
        assert r.accuracy == pytest.approx(top, abs=0.02)  # paths: 8 cited points vs the true curve


def test_spatial_thinking_and_answer_are_averaged():
    s = scenes.spatial(0, 0)
    flipped = "Yes" if s.answer == "No" else "No"
    bad = s.target.replace(f"\\boxed{{{s.answer}}}", f"\\boxed{{{flipped}}}")
    r = rewards.score(s, bad)
    assert r.accuracy == pytest.approx(0.5) and not r.correct and r.quality == 0.5  # stated relation disagrees
    assert rewards.score(s, f"\\boxed{{{s.answer}}}").accuracy == pytest.approx(0.5)  # right, no thinking


def test_maze_components():
    s = mazes.maze(0, 0, mazes.MazeConfig(sizes=(5,)))  # solvable
    assert rewards.maze_components(s, s.target) == {"progress": 1.0, "completeness": 1.0, "path_valid": 1.0,
                                                    "walls": 1.0, "answer": 1.0}
    # verdict right but no trace: only the answer component and the (vacuous) wall term score
    c = rewards.maze_components(s, "\\boxed{True}")
    assert (c["progress"], c["path_valid"], c["walls"], c["answer"]) == (0.0, 0.0, 1.0, 1.0)
    r = rewards.score(s, "\\boxed{True}")
    assert r.accuracy == pytest.approx(0.15 * 0 + 0.15 * 1 + 0.1 * 1 + 0.2 * 0 + 0.4 * 1)
    twin = mazes.maze(0, 1, mazes.MazeConfig(sizes=(5,)))  # unsolvable: the solvable twin's route crosses the cut
    c = rewards.maze_components(twin, s.target)
    # the route walks through the one new wall twice (exploration and final path); exploration stops there
    assert c["answer"] == 0.0 and c["walls"] == pytest.approx(1 - 2 / len(twin.meta["passages"]))
    assert 0 < c["completeness"] < 1 and c["path_valid"] == 1.0  # (path validity only applies when solvable)
    c = rewards.maze_components(twin, twin.target)
    assert c == {"progress": 1.0, "completeness": 1.0, "path_valid": 1.0, "walls": 1.0, "answer": 1.0}


def test_path_components():
    s = paths.path(0, 3, paths.PathConfig(lines=(3, 3)))
    good = rewards.path_components(s, s.target)
    assert good["answer"] == good["continuity"] == good["endpoint"] == 1.0 and good["trajectory"] > 0.9
    wrong_label = next(k for k in s.meta["ends"] if k != s.answer)
    lie = s.target.replace(f"It reaches {s.answer}. \\boxed{{{s.answer}}}",
                           f"It reaches {wrong_label}. \\boxed{{{wrong_label}}}")
    c = rewards.path_components(s, lie)
    assert c["answer"] == 0.0 and c["continuity"] == 0.0 and c["trajectory"] == good["trajectory"]
    assert rewards.path_components(s, "\\boxed{1}")["trajectory"] == 0.0


@pytest.mark.parametrize("text", ["", "<|ref|>", "<|box|>[[1,2,3", "\\boxed{", "x" * 5000, None,
                                  "<|point|>[[9999999999999,1]]<|/point|>\\boxed{}"])
def test_any_string_is_scored_without_raising(text):
    for s in (_counting(), mazes.maze(0, 1), paths.path(0, 1), scenes.spatial(0, 1), scenes.grounding(0, 0)):
        r = rewards.score(s, text)
        assert 0 <= r.format <= 1 and r.quality in (0.0, 0.5, 1.0) and 0 <= r.accuracy <= 1


def test_empty_or_garbage_answers_lose_format_and_quality():
    r = rewards.score(_counting(), "the the the")
    assert r.parts["format_boxed"] == 0.0 and r.parts["format_uses_primitives"] == 0.0
    assert r.format == 0.0 and r.quality == 0.0
    assert r.issues == ["no final answer", "unsupported: the trigger asked for primitive thinking, none is cited"]
    g = scenes.grounding(0, 0)
    r = rewards.score(g, "blah")
    assert r.parts["format_answer_form"] == 0.0 and r.format == 0.5 and r.quality == 0.5 and r.accuracy == 0.0
