"""Evaluation metrics: text (edit distance, precision/recall, CER, WER), tables (TEDS) and geometry (IoU, AP, points).

Definitions, so numbers here can be compared with published ones:

* ``normalized_edit_distance``: Levenshtein distance / max(len(pred), len(gt)), 0 when both are empty — the
  OmniDocBench text metric (lower is better).
* ``ocr_precision_recall``: character-level, as the Fox / DeepSeek-OCR compression table reports precision.
  Matched characters are those an optimal alignment keeps unchanged when only insertions and deletions are
  allowed, i.e. the longest common subsequence (unique in length, unlike a Levenshtein alignment, whose
  match count depends on tie-breaking). precision = matched / len(pred), recall = matched / len(gt).
  Note: the Fox/GOT scripts' exact tokenisation is not in our reference; this is our stated definition.
* ``character_error_rate`` / ``word_error_rate``: Levenshtein over characters / whitespace-split words,
  divided by the ground-truth length (can exceed 1).
* ``substitutions``: (truth char, read char) counts of the replacements in one optimal Levenshtein alignment.
* ``teds``: 1 - TreeEditDistance(pred, gt) / max(|pred|, |gt|) (Zhong et al., PubTabNet), with APTED.
* ``average_precision``: greedy matching in score order, VOC all-point interpolation.

All text metrics first collapse whitespace runs to one space and trim the ends (``normalize=False`` skips it).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from apted import APTED, Config
from rapidfuzz.distance import LCSseq, Levenshtein

from optictx.errors import MetricError
from optictx.primitives import HtmlNode, cell_tokens, find_tables, parse_html

# ----------------------------------------------------------------------------- text


def normalize_whitespace(text: str) -> str:
    """Collapse every whitespace run (spaces, tabs, newlines) to one space and trim: layout is not content."""
    return re.sub(r"\s+", " ", text).strip()


def _prep(pred: str, gt: str, normalize: bool) -> tuple[str, str]:
    if not isinstance(pred, str) or not isinstance(gt, str):
        raise MetricError(f"text metrics take two strings, got {type(pred).__name__} and {type(gt).__name__}")
    return (normalize_whitespace(pred), normalize_whitespace(gt)) if normalize else (pred, gt)


def normalized_edit_distance(pred: str, gt: str, *, normalize: bool = True) -> float:
    """Levenshtein(pred, gt) / max(len(pred), len(gt)); 0.0 for two empty strings."""
    p, g = _prep(pred, gt, normalize)
    return Levenshtein.normalized_distance(p, g)


def ocr_precision_recall(pred: str, gt: str, *, normalize: bool = True) -> tuple[float, float]:
    """(precision, recall) of characters, matched by longest common subsequence (see module docstring).

    Empty prediction and empty ground truth -> (1, 1). An empty side otherwise scores 0: an empty answer must
    not look precise.
    """
    p, g = _prep(pred, gt, normalize)
    if not p and not g:
        return 1.0, 1.0
    matched = LCSseq.similarity(p, g)
    return (matched / len(p) if p else 0.0), (matched / len(g) if g else 0.0)


def character_error_rate(pred: str, gt: str, *, normalize: bool = True) -> float:
    """Levenshtein(pred, gt) / len(gt). With an empty ground truth: 0.0 if pred is empty too, else 1.0."""
    p, g = _prep(pred, gt, normalize)
    if not g:
        return 0.0 if not p else 1.0
    return Levenshtein.distance(p, g) / len(g)


def word_error_rate(pred: str, gt: str, *, normalize: bool = True) -> float:
    """Word-level Levenshtein / number of gt words (words = whitespace split). Empty gt as in CER."""
    p, g = _prep(pred, gt, normalize)
    pw, gw = p.split(), g.split()
    if not gw:
        return 0.0 if not pw else 1.0
    return Levenshtein.distance(pw, gw) / len(gw)


def substitutions(pred: str, gt: str, *, normalize: bool = True) -> Counter[tuple[str, str]]:
    """(ground-truth character, character read instead) -> count, from one optimal Levenshtein alignment:
    which glyphs a reader confuses. Insertions and deletions are not counted."""
    p, g = _prep(pred, gt, normalize)
    return Counter((g[op.src_pos], p[op.dest_pos]) for op in Levenshtein.editops(g, p) if op.tag == "replace")


@dataclass(frozen=True)
class OcrScores:
    precision: float
    recall: float
    f1: float
    edit_distance: float
    cer: float
    wer: float


def ocr_scores(pred: str, gt: str, *, normalize: bool = True) -> OcrScores:
    """All text metrics of one page at once (what benchmark tables print)."""
    precision, recall = ocr_precision_recall(pred, gt, normalize=normalize)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return OcrScores(precision, recall, f1, normalized_edit_distance(pred, gt, normalize=normalize),
                     character_error_rate(pred, gt, normalize=normalize),
                     word_error_rate(pred, gt, normalize=normalize))


# ----------------------------------------------------------------------------- tables (TEDS)


@dataclass
class _TedsNode:
    tag: str
    colspan: int = 1
    rowspan: int = 1
    content: tuple[str, ...] = ()
    children: list["_TedsNode"] | None = None

    def size(self) -> int:
        return 1 + sum(c.size() for c in self.children or ())


class _TedsConfig(Config):
    """Label distance of PubTabNet's TEDS: 1 for a different tag or span; for two cells, the normalised
    edit distance of their token sequences (0 in structure-only mode, where content is dropped)."""

    valuecls = float  # apted's default int would truncate fractional rename costs

    def rename(self, a: _TedsNode, b: _TedsNode) -> float:
        if a.tag != b.tag or a.colspan != b.colspan or a.rowspan != b.rowspan:
            return 1.0
        if a.tag == "td" and (a.content or b.content):
            return Levenshtein.normalized_distance(list(a.content), list(b.content))
        return 0.0

    def children(self, node: _TedsNode) -> list[_TedsNode]:
        return node.children or []


def _teds_tree(node: HtmlNode, structure_only: bool, ignore: frozenset[str]) -> list[_TedsNode]:
    """Table structure only: sections, rows and cells (``th`` counts as ``td``); text outside cells and other
    elements (caption, colgroup) are dropped; tags in ``ignore`` are replaced by their children."""
    out: list[_TedsNode] = []
    for child in node.children:
        if not isinstance(child, HtmlNode):
            continue
        if child.tag in ignore:
            out.extend(_teds_tree(child, structure_only, ignore))
        elif child.tag in ("td", "th"):
            content = () if structure_only else tuple(cell_tokens(child))
            out.append(_TedsNode("td", child.span("colspan"), child.span("rowspan"), content))
        elif child.tag in ("thead", "tbody", "tfoot", "tr"):
            out.append(_TedsNode(child.tag, children=_teds_tree(child, structure_only, ignore)))
    return out


def _table_tree(html: str, structure_only: bool, ignore: frozenset[str]) -> _TedsNode | None:
    tables = find_tables(parse_html(html))
    if not tables:
        return None
    return _TedsNode("table", children=_teds_tree(tables[0], structure_only, ignore))


def teds(pred_html: str, gt_html: str, *, structure_only: bool = False,
         ignore_nodes: Sequence[str] = ()) -> float:
    """Tree-Edit-Distance-based Similarity of the first ``<table>`` in each string, in [0, 1].

    Normalised by the larger tree's node count including the root, as in the TEDS paper (PubTabNet's script
    counts ``.//*`` instead, which leaves out the root and adds inline tags in cells; the difference is ~1/|T|).
    A prediction without a table scores 0. Unclosed ``td``/``tr`` are closed as a browser would.
    """
    if not isinstance(pred_html, str) or not isinstance(gt_html, str):
        raise MetricError("teds takes two HTML strings")
    ignore = frozenset(ignore_nodes)
    gt = _table_tree(gt_html, structure_only, ignore)
    if gt is None:
        raise MetricError("the ground-truth HTML has no <table> element; TEDS compares tables")
    pred = _table_tree(pred_html, structure_only, ignore)
    if pred is None:
        return 0.0
    distance = APTED(pred, gt, _TedsConfig()).compute_edit_distance()
    return float(min(max(1.0 - distance / max(pred.size(), gt.size()), 0.0), 1.0))


def teds_structure(pred_html: str, gt_html: str, *, ignore_nodes: Sequence[str] = ()) -> float:
    """TEDS-S: TEDS on structure alone (tags and spans; cell text ignored)."""
    return teds(pred_html, gt_html, structure_only=True, ignore_nodes=ignore_nodes)


# ----------------------------------------------------------------------------- boxes and points


def _boxes(boxes: Sequence[Sequence[float]] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise MetricError(f"{what} must be a list of (x1, y1, x2, y2) boxes, got shape {arr.shape}")
    return arr


def iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """Pairwise IoU (N, M) of boxes in continuous coordinates (no VOC '+1' pixel)."""
    a_, b_ = _boxes(a, "boxes"), _boxes(b, "boxes")
    x1 = np.maximum(a_[:, None, 0], b_[None, :, 0])
    y1 = np.maximum(a_[:, None, 1], b_[None, :, 1])
    x2 = np.minimum(a_[:, None, 2], b_[None, :, 2])
    y2 = np.minimum(a_[:, None, 3], b_[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: np.clip(z[:, 2] - z[:, 0], 0, None) * np.clip(z[:, 3] - z[:, 1], 0, None)  # noqa: E731
    union = area(a_)[:, None] + area(b_)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes; 0 when the union is empty."""
    return float(iou_matrix([a], [b])[0, 0])


def _voc_ap(tp: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP (VOC 2010+): area under the precision envelope of the PR curve."""
    tps, fps = np.cumsum(tp), np.cumsum(1 - tp)
    recall = tps / n_gt
    precision = tps / np.maximum(tps + fps, np.finfo(np.float64).eps)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def average_precision_dataset(images: Iterable[tuple[Sequence[Sequence[float]], Sequence[float],
                                                     Sequence[Sequence[float]]]],
                              *, iou_threshold: float = 0.5) -> float:
    """AP over many images, each given as ``(pred_boxes, scores, gt_boxes)`` (one class).

    Detections of all images are ranked together by score (stable: ties keep input order). Each one takes the
    gt box of its own image with the highest IoU; it is a true positive when IoU >= ``iou_threshold`` and that
    gt is still free, else a false positive (VOC rule: no fall-back to the second-best gt). Returns NaN when
    there is no gt box at all (AP is undefined).
    """
    dets: list[tuple[float, int, np.ndarray]] = []
    gts: list[np.ndarray] = []
    for k, (pred, scores, gt) in enumerate(images):
        p, s = _boxes(pred, "pred_boxes"), np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(p) != len(s):
            raise MetricError(f"image {k}: {len(p)} predicted boxes but {len(s)} scores")
        gts.append(_boxes(gt, "gt_boxes"))
        dets.extend((float(s[i]), k, p[i]) for i in range(len(p)))
    n_gt = sum(len(g) for g in gts)
    if n_gt == 0:
        return float("nan")
    if not dets:
        return 0.0
    order = sorted(range(len(dets)), key=lambda i: -dets[i][0])
    taken = [np.zeros(len(g), dtype=bool) for g in gts]
    tp = np.zeros(len(dets))
    for rank, i in enumerate(order):
        _, k, box = dets[i]
        if len(gts[k]) == 0:
            continue
        ious = iou_matrix([box], gts[k])[0]
        best = int(np.argmax(ious))
        if ious[best] >= iou_threshold and not taken[k][best]:
            taken[k][best] = True
            tp[rank] = 1.0
    return _voc_ap(tp, n_gt)


def average_precision(pred_boxes: Sequence[Sequence[float]], scores: Sequence[float],
                      gt_boxes: Sequence[Sequence[float]], *, iou_threshold: float = 0.5) -> float:
    """AP@``iou_threshold`` (default 0.5) of one image; see ``average_precision_dataset``."""
    return average_precision_dataset([(pred_boxes, scores, gt_boxes)], iou_threshold=iou_threshold)


def _max_matching(adj: list[list[int]], n_right: int) -> int:
    """Size of a maximum bipartite matching (Kuhn's augmenting paths; inputs are small)."""
    owner = [-1] * n_right

    def augment(u: int, seen: list[bool]) -> bool:
        for v in adj[u]:
            if not seen[v]:
                seen[v] = True
                if owner[v] < 0 or augment(owner[v], seen):
                    owner[v] = u
                    return True
        return False

    return sum(augment(u, [False] * n_right) for u in range(len(adj)))


def point_hit_rate(points: Sequence[Sequence[float]], *, gt_boxes: Sequence[Sequence[float]] = (),
                   gt_points: Sequence[Sequence[float]] = (), radius: float | None = None,
                   one_to_one: bool = False) -> float:
    """Fraction of predicted points that hit a target: inside a gt box (edges included) or within ``radius``
    (same units as the coordinates) of a gt point.

    ``one_to_one=True`` lets each target be hit once (maximum matching), so ten points on one object count
    once — the right setting for counting by pointing. No predicted points -> 0.0.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.zeros((0, 2))
    boxes = _boxes(gt_boxes, "gt_boxes")
    gpts = np.asarray(gt_points, dtype=np.float64).reshape(-1, 2) if len(gt_points) else np.zeros((0, 2))
    if len(gpts) and (radius is None or radius < 0):
        raise MetricError("gt_points need a radius >= 0 (same units as the points, e.g. 0-999)")
    if len(pts) == 0:
        return 0.0
    in_box = ((pts[:, None, 0] >= boxes[None, :, 0]) & (pts[:, None, 0] <= boxes[None, :, 2])
              & (pts[:, None, 1] >= boxes[None, :, 1]) & (pts[:, None, 1] <= boxes[None, :, 3]))
    near = np.hypot(pts[:, None, 0] - gpts[None, :, 0], pts[:, None, 1] - gpts[None, :, 1]) <= (radius or 0)
    hits = np.concatenate([in_box, near], axis=1)
    if not one_to_one:
        return float(hits.any(axis=1).mean())
    adj = [list(np.flatnonzero(row)) for row in hits]
    return _max_matching(adj, hits.shape[1]) / len(pts)
