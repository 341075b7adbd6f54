"""Scenes of shapes and glyphs: determinism, exact ground truth (ink inside the boxes), answers consistent with
the drawn objects, zero counts and hard negatives, balanced spatial answers, thinking modes."""
import numpy as np
import pytest

from optictx.data import scenes
from optictx.data.sample import TRIGGER, Sample
from optictx.errors import ConfigError
from optictx.primitives import parse_primitives, sort_left_to_right

GENERATORS = [scenes.grounding, scenes.pointing, scenes.counting, scenes.spatial, scenes.general]


def _same(a: Sample, b: Sample) -> bool:
    return a.prompt == b.prompt and a.target == b.target and np.array_equal(np.asarray(a.image), np.asarray(b.image))


@pytest.mark.parametrize("gen", GENERATORS)
def test_a_sample_is_a_pure_function_of_seed_and_index(gen):
    assert _same(gen(3, 7), gen(3, 7))
    assert not _same(gen(3, 7), gen(3, 8))
    assert not _same(gen(3, 7), gen(4, 7))
    s = gen(3, 7)
    assert s.image.size == (252, 252) and s.seed == 3 and s.index == 7


def test_every_ink_pixel_lies_in_an_object_box_and_every_box_is_tight():
    cfg = scenes.SceneConfig(side=252)
    for i in range(6):
        r = scenes.rng(11, i, "counting")
        spec = scenes.random_spec(r)
        scene = scenes.scene_for(r, spec, 3, cfg)
        arr = np.asarray(scene.image).astype(int)
        bg = arr[0, 0]
        ink = np.abs(arr - bg).sum(-1) > 0
        covered = np.zeros_like(ink)
        for o in scene.objects:
            x1, y1, x2, y2 = o.box_px
            covered[y1:y2, x1:x2] = True
            assert ink[y1, x1:x2].any() and ink[y2 - 1, x1:x2].any()  # top and bottom rows touch the ink
            assert ink[y1:y2, x1].any() and ink[y1:y2, x2 - 1].any()  # so do the left and right columns
        assert not (ink & ~covered).any()


def test_grounding_answer_is_the_sorted_boxes_of_the_matching_objects():
    seen_refusal = False
    for i in range(40):
        s = scenes.grounding(0, i)
        prims = parse_primitives(s.target)
        if not s.meta["boxes"]:
            seen_refusal = True
            assert prims == [] and s.target.startswith("There is no")
            continue
        assert len(prims) == 1 and prims[0].label == s.meta["label"]
        boxes = [tuple(b) for b in s.meta["boxes"]]
        assert list(prims[0].coords) == boxes == sort_left_to_right(boxes)
        assert all(b in [tuple(a) for a in s.meta["all_boxes"]] for b in boxes)
    assert seen_refusal


def test_pointing_points_are_box_centres():
    s = scenes.pointing(0, 2)
    (prim,) = parse_primitives(s.target)
    assert prim.kind == "point" and len(prim.coords) == len(s.meta["boxes"]) >= 1
    for x, y in prim.coords:
        assert any(b[0] <= x <= b[2] and b[1] <= y <= b[3] for b in s.meta["boxes"])


def test_counting_cites_as_many_instances_as_it_counts_with_zeros_and_hard_negatives():
    counts = []
    for i in range(80):
        s = scenes.counting(5, i)
        n = int(s.answer)
        counts.append(n)
        assert s.target.endswith(f"\\boxed{{{n}}}") and s.prompt.startswith(TRIGGER)
        cited = [c for p in parse_primitives(s.target) for c in p.coords]
        assert len(cited) == n == len(s.meta["boxes"])
    assert counts.count(0) >= 4 and max(counts) == scenes.SceneConfig().max_count
    point = scenes.counting(5, 1, scenes.SceneConfig(thinking="point"))
    assert {p.kind for p in parse_primitives(point.target)} <= {"point"}


def test_hard_negatives_differ_in_exactly_one_named_attribute():
    r = np.random.default_rng(0)
    spec = scenes.Spec("circle", "red", "large")
    for _ in range(50):
        shape, colour, size = scenes.hard_negative(r, spec)
        diffs = (shape != "circle") + (colour != "red") + (size != "large")
        assert diffs == 1
    cfg = scenes.SceneConfig(hard_negative_prob=1.0)
    for i in range(10):
        scene = scenes.scene_for(np.random.default_rng(i), spec, 2, cfg)
        near = [o for o in scene.objects if (o.shape != "circle") + (o.colour != "red") + (o.size != "large") == 1]
        assert sum(spec.matches(o) for o in scene.objects) == 2 and near


def test_spatial_answers_are_balanced_and_agree_with_the_boxes():
    answers = []
    for i in range(30):
        s = scenes.spatial(2, i)
        answers.append(s.answer)
        (a, box_a), (b, box_b) = s.meta["refs"].items()
        rel = s.meta["relation"]
        ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
        cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
        truth = {"left of": ca[0] < cb[0], "right of": ca[0] > cb[0], "above": ca[1] < cb[1],
                 "below": ca[1] > cb[1],
                 "inside": box_b[0] <= box_a[0] and box_a[2] <= box_b[2] and box_b[1] <= box_a[1]
                 and box_a[3] <= box_b[3]}[rel]
        assert (s.answer == "Yes") == truth, (i, s.prompt, s.target)
    assert answers.count("Yes") == answers.count("No") == 15


def test_modes_switch_primitive_thinking():
    assert scenes.counting(1, 3, mode="trigger").uses_primitives
    direct = scenes.counting(1, 3, mode="direct")
    assert not direct.uses_primitives and direct.prompt.endswith("Answer directly.")
    assert direct.target == f"\\boxed{{{direct.answer}}}"
    auto = scenes.counting(1, 3, mode="auto")
    assert TRIGGER not in auto.prompt and auto.target == scenes.counting(1, 3, mode="trigger").target
    for i in range(10):  # questions that need no primitives get a direct answer, never the trigger
        g = scenes.general(0, i, mode="trigger")
        assert not g.uses_primitives and TRIGGER not in g.prompt and g.target.startswith("\\boxed{")


def test_unseen_style_differs_and_bad_configs_raise():
    a = scenes.counting(0, 1, scenes.SceneConfig(style="unseen"))
    b = scenes.counting(0, 1)
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))
    for bad in (dict(side=250), dict(thinking="arrow"), dict(style="neon"), dict(max_count=9, max_objects=9)):
        with pytest.raises(ConfigError):
            scenes.counting(0, 0, scenes.SceneConfig(**bad))
    with pytest.raises(ConfigError):
        scenes.counting(0, 0, mode="loud")
    with pytest.raises(ConfigError):
        scenes.counting(-1, 0)
