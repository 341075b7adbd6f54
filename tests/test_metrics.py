"""Metrics on hand-computed cases; every expected number is derived in a comment."""

import math

import pytest
from hypothesis import given, strategies as st

from optictx.errors import MetricError
from optictx.eval.metrics import (average_precision, average_precision_dataset, box_iou, character_error_rate,
                                  iou_matrix, normalized_edit_distance, ocr_precision_recall, ocr_scores,
                                  point_hit_rate, substitutions, teds, teds_structure, word_error_rate)


@given(st.text())
def test_identical_text_is_perfect(s):
    assert normalized_edit_distance(s, s) == 0.0
    assert ocr_precision_recall(s, s) == (1.0, 1.0)
    assert character_error_rate(s, s) == 0.0 and word_error_rate(s, s) == 0.0


@given(st.text(max_size=30), st.text(max_size=30))
def test_text_metric_ranges(a, b):
    p, r = ocr_precision_recall(a, b)
    assert 0 <= p <= 1 and 0 <= r <= 1 and 0 <= normalized_edit_distance(a, b) <= 1


def test_kitten_sitting():
    # Levenshtein(kitten, sitting) = 3 (k->s, e->i, +g); max len 7 -> NED 3/7; CER 3/len(gt)=3/7.
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
    assert character_error_rate("kitten", "sitting") == pytest.approx(3 / 7)
    # LCS = "ittn" (4 chars): precision 4/6 (pred = kitten), recall 4/7 (gt = sitting)
    assert ocr_precision_recall("kitten", "sitting") == pytest.approx((4 / 6, 4 / 7))
    s = ocr_scores("kitten", "sitting")
    # F1 = 2 * (2/3)(4/7) / (2/3 + 4/7) = (16/21) / (26/21) = 8/13
    assert s.f1 == pytest.approx(8 / 13)


def test_precision_recall_asymmetry():
    # pred "hello" inside gt "hello world" (11 chars): all 5 predicted chars match -> precision 1, recall 5/11
    assert ocr_precision_recall("hello", "hello world") == pytest.approx((1.0, 5 / 11))
    # hallucinated tail: pred "abcXYZ" vs gt "abc" -> precision 3/6, recall 1
    assert ocr_precision_recall("abcXYZ", "abc") == pytest.approx((0.5, 1.0))
    assert ocr_precision_recall("", "abc") == (0.0, 0.0) and ocr_precision_recall("", "") == (1.0, 1.0)


def test_whitespace_normalisation():
    assert normalized_edit_distance("a  b\n\nc ", " a b c") == 0.0
    # without normalisation: "a  b" vs "a b" differ by one deleted space over max len 4
    assert normalized_edit_distance("a  b", "a b", normalize=False) == pytest.approx(1 / 4)


def test_substitutions_count_replacements_only():
    assert substitutions("if dou do both", "if you do both") == {("y", "d"): 1}
    # "vio" -> "ugp" is three replacements; the dropped "s" (a deletion) is not a confusion
    assert substitutions("ugplation", "violations") == {("v", "u"): 1, ("i", "g"): 1, ("o", "p"): 1}
    assert not substitutions("same text", "same  text")


def test_wer():
    # one deleted word ("down") out of 4 gt words
    assert word_error_rate("the cat sat", "the cat sat down") == pytest.approx(0.25)
    # one substitution (dog/cat) + one insertion (big) over 3 gt words
    assert word_error_rate("the big dog sat", "the cat sat") == pytest.approx(2 / 3)
    assert word_error_rate("x", "") == 1.0 and character_error_rate("", "") == 0.0
    with pytest.raises(MetricError):
        character_error_rate(None, "x")


GT = "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>"  # 7 nodes: table,2 tr,4 td


def test_teds_identical_and_dropped_cell():
    assert teds(GT, GT) == 1.0 and teds_structure(GT, GT) == 1.0
    dropped = "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>"
    # one node deleted out of max(6, 7) nodes
    assert teds(dropped, GT) == pytest.approx(1 - 1 / 7)
    assert teds_structure(dropped, GT) == pytest.approx(1 - 1 / 7)


def test_teds_cell_text_costs_normalised_edit_distance():
    # 'ab' vs 'a': rename cost = Levenshtein 1 / max len 2 = 0.5 -> 1 - 0.5/7
    assert teds(GT.replace(">a<", ">ab<"), GT) == pytest.approx(1 - 0.5 / 7)
    # 'x' vs 'b': cost 1 -> 1 - 1/7, but structure is identical
    wrong = GT.replace(">b<", ">x<")
    assert teds(wrong, GT) == pytest.approx(1 - 1 / 7) and teds_structure(wrong, GT) == 1.0


def test_teds_spans_and_lenient_html():
    gt = '<table><tr><td colspan="2">ab</td></tr><tr><td>c</td><td>d</td></tr></table>'  # 6 nodes
    split = "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>"  # 7 nodes
    # cheapest script: rename the colspan cell to td 'a' (span differs: 1) + insert td 'b' (1) = 2 over 7
    assert teds(split, gt) == pytest.approx(1 - 2 / 7)
    assert teds_structure(split, gt) == pytest.approx(1 - 2 / 7)
    # unclosed td/tr, th instead of td, upper-case tags, whitespace in cells: the same table
    assert teds("<TABLE><tr><th> a <td>b<tr><td>c<td>d</table>", GT) == 1.0
    # tbody: one extra node in gt (8) -> 1 - 1/8, unless ignored
    with_body = GT.replace("<table>", "<table><tbody>").replace("</table>", "</tbody></table>")
    assert teds(GT, with_body) == pytest.approx(1 - 1 / 8)
    assert teds(GT, with_body, ignore_nodes=["tbody"]) == 1.0
    assert teds("plain text", GT) == 0.0
    with pytest.raises(MetricError):
        teds(GT, "no table here")


def test_iou():
    # overlap 1x1, union 4 + 4 - 1 = 7
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0 and box_iou((0, 0, 4, 2), (0, 0, 4, 2)) == 1.0
    assert box_iou((1, 1, 1, 1), (1, 1, 1, 1)) == 0.0  # empty union
    assert iou_matrix([(0, 0, 2, 2)], [(0, 0, 1, 2), (0, 0, 2, 2)]).tolist() == [[0.5, 1.0]]
    with pytest.raises(MetricError):
        iou_matrix([(0, 0, 1)], [(0, 0, 1, 1)])


def test_ap_voc_all_point():
    gts = [(0, 0, 10, 10), (20, 0, 30, 10), (40, 0, 50, 10)]
    preds = [(0, 0, 10, 10), (100, 100, 110, 110), (20, 0, 30, 10), (200, 200, 210, 210)]
    # ranked TP, FP, TP, FP: recall 1/3,1/3,2/3,2/3; precision 1,1/2,2/3,1/2
    # envelope: p=1 up to r=1/3, p=2/3 up to r=2/3 -> AP = 1/3*1 + 1/3*2/3 = 5/9
    assert average_precision(preds, [0.9, 0.8, 0.7, 0.6], gts) == pytest.approx(5 / 9)
    # a duplicate of an already matched gt is a false positive: TP, FP -> AP = 1 * (1/3)
    assert average_precision([(0, 0, 10, 10), (0, 0, 10, 10)], [0.9, 0.8], gts) == pytest.approx(1 / 3)
    # IoU exactly 0.5 counts at threshold 0.5: (0,0,2,1) vs (0,0,1,1) -> 1/2
    assert average_precision([(0, 0, 2, 1)], [1.0], [(0, 0, 1, 1)]) == 1.0
    assert average_precision([(0, 0, 2, 1)], [1.0], [(0, 0, 1, 1)], iou_threshold=0.51) == 0.0
    assert average_precision([], [], gts) == 0.0 and math.isnan(average_precision([(0, 0, 1, 1)], [1.0], []))
    with pytest.raises(MetricError):
        average_precision([(0, 0, 1, 1)], [1.0, 0.5], gts)


def test_ap_ranks_across_images():
    # image A: one gt, a 0.5 TP; image B: no gt, a 0.9 FP. Ranked FP, TP: precision at recall 1 = 1/2
    data = [([(0, 0, 1, 1)], [0.5], [(0, 0, 1, 1)]), ([(0, 0, 1, 1)], [0.9], [])]
    assert average_precision_dataset(data) == pytest.approx(0.5)


def test_point_hit_rate():
    pts = [(5, 5), (6, 6), (100, 100)]
    # two of three points inside the box
    assert point_hit_rate(pts, gt_boxes=[(0, 0, 10, 10)]) == pytest.approx(2 / 3)
    # one-to-one: the box can be claimed once
    assert point_hit_rate(pts, gt_boxes=[(0, 0, 10, 10)], one_to_one=True) == pytest.approx(1 / 3)
    # (3,4) is exactly 5 from (0,0): inside radius 5, outside radius 4.9
    assert point_hit_rate([(3, 4)], gt_points=[(0, 0)], radius=5) == 1.0
    assert point_hit_rate([(3, 4)], gt_points=[(0, 0)], radius=4.9) == 0.0
    # (1,1) hits the box and the point (|(1,1)-(10,10)| = 12.73 <= 13); (0,0) hits only the box (14.14 > 13).
    # Greedy in order would give (1,1) the box and leave (0,0) empty; maximum matching finds 2 of 2.
    assert point_hit_rate([(1, 1), (0, 0)], gt_boxes=[(0, 0, 2, 2)], gt_points=[(10, 10)], radius=13,
                          one_to_one=True) == 1.0
    assert point_hit_rate([], gt_boxes=[(0, 0, 1, 1)]) == 0.0
    with pytest.raises(MetricError):
        point_hit_rate([(0, 0)], gt_points=[(0, 0)])
