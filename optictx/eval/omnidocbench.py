"""OmniDocBench end-to-end scoring: a folder of per-page markdown predictions against OmniDocBench's JSON.

Runs on any predictions folder (ours or another tool's): one markdown file per page, named after the
page image (``page.jpg`` -> ``page.md``; ``page.mmd`` and ``page.jpg.md`` are accepted too, as upstream).

What is read from the ground truth (the OmniDocBench v1.x ``OmniDocBench.json`` layout): a list of pages,
each ``{"page_info": {"image_path": ...}, "layout_dets": [...], "extra": {"relation": [...]}}``; a layout
element is ``{"category_type", "order", "ignore", "text" | "latex" | "html", "anno_id", "poly", ...}``.
``poly`` and attributes are not needed for end-to-end scoring and are not read. Blocks joined by a
``truncated`` relation are concatenated in reading order and scored as one, as upstream does.

The protocol (OmniDocBench ``end2end`` with its ``simple_match`` matcher):

1. The prediction is split into blocks: HTML tables and GitHub pipe tables (converted to HTML), display
   formulas (``$$..$$``, ``\\[..\\]``), fenced code, then paragraphs (blank-line separated; single lines when
   the page has no blank line). Images, markdown/html/latex wrapper fences and runs of 5+ ``_``/spaces go.
2. Tables are matched to ground-truth tables one-to-one by minimum total normalised edit distance
   (Hungarian). A predicted table left over gives its cell texts to the text pool.
3. Text and display formulas are matched as one pool (the "hybrid" matching: a formula written as text
   can still find its ground truth), one-to-one by minimum total normalised edit distance of normalised
   strings. Text is normalised to its word characters (letters, digits, ``_``, CJK: punctuation, markup and
   whitespace do not count); formulas by deleting delimiters, ``\\tag``, environments, style macros and
   spaces, lower-cased.
4. Captions, footnotes, headers, footers and page numbers take part in the matching (so predicting them
   costs nothing) but are not scored; so are blocks marked ``"ignore": true`` (our reading of that field:
   the upstream end-to-end scripts do not consult it). Unmatched ground truth
   scores edit distance 1 (TEDS 0); unmatched predicted text is not charged (as upstream).
5. Scores: text and formula edit distance (reported three ways, ``page_avg`` is the leaderboard number:
   per page sum(edits)/sum(max lengths), then the mean over pages), table TEDS and TEDS-structure (mean
   over ground-truth tables; ``thead``/``tbody`` ignored, ``th`` counts as ``td``), and reading order: per
   page, the edit distance between the ground-truth order indices of the scored text blocks and those same
   indices read in the order their matched predictions appear, divided by the longer list.

Documented differences from the upstream scripts: inline ``$..$`` maths stays in its paragraph (upstream
also offers it to the formula pool and converts LaTeX to Unicode with pylatexenc); ``quick_match``'s
merging of split/joined paragraphs is not done (``simple_match`` is upstream's own alternative);
formulas are scored by edit distance only (no CDM, so no "Overall"); a matched prediction at index 0
counts for reading order (upstream's ``if pred_idx`` drops it); ``order`` 0 counts too.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rapidfuzz.distance import Levenshtein

from optictx.errors import MetricError
from optictx.eval.metrics import teds, teds_structure

TEXT_CATEGORIES = ("text_block", "title", "code_txt", "code_txt_caption", "reference")
"""Ground-truth categories scored as text (and for reading order)."""
MATCHED_NOT_SCORED = ("figure_caption", "figure_footnote", "table_caption", "table_footnote", "code_algorithm",
                      "code_algorithm_caption", "header", "footer", "page_footnote", "page_number",
                      "equation_caption")
"""Matched so a prediction of them is absorbed, then left out of every score (upstream's ignore list)."""
FORMULA = "equation_isolated"
TABLE = "table"
TABLE_IGNORE = ("thead", "tbody", "tfoot")
PRED_SUFFIXES = (".md", ".mmd")


# --------------------------------------------------------------------------- blocks
@dataclass
class GtBlock:
    category: str
    content: str  # text, latex or html
    order: int | None
    scored: bool


@dataclass
class PredBlock:
    kind: str  # "text", "formula" or "table"
    content: str
    position: int  # character offset in the markdown: reading order of the prediction


@dataclass
class Match:
    gt: GtBlock
    pred: PredBlock | None
    norm_gt: str
    norm_pred: str

    @property
    def edit_num(self) -> int:
        return Levenshtein.distance(self.norm_pred, self.norm_gt)

    @property
    def upper(self) -> int:
        return max(len(self.norm_pred), len(self.norm_gt))


# --------------------------------------------------------------------------- normalisation
_FORMULA_DROP = ("\\mathbf", "\\mathrm", "\\mathnormal", "\\mathit", "\\mathbb", "\\mathcal", "\\mathscr",
                 "\\mathfrak", "\\mathsf", "\\mathtt", "\\textbf", "\\text", "\\boldmath", "\\boldsymbol",
                 "\\operatorname", "\\bm", "\\symbfit", "\\mathbfcal", "\\symbf", "\\scriptscriptstyle",
                 "\\notag", "\\setlength", "\\coloneqq", "\\space", "\\thickspace", "\\thinspace", "\\medspace",
                 "\\nobreakspace", "\\negmedspace", "\\quad", "\\qquad", "\\enspace", "\\substackw", " ", "$$",
                 "\\left", "\\right", "\\displaystyle")
_FORMULA_PATTERNS = [re.compile(p) for p in (r"\\tag\{.*?\}", r"\\hspace\{.*?\}", r"\\begin\{.*?\}",
                                              r"\\end\{.*?\}", r"\\arraycolsep.*?\}")]


def normalize_text(text: str) -> str:
    """Word characters only: what a page *says*, not how it is marked up or spaced."""
    return re.sub(r"[^\w]", "", text)


def normalize_formula(latex: str) -> str:
    """Delimiters, tags, environments, spacing and style macros removed, lower-cased (upstream's rules)."""
    text = latex.strip().strip("$").strip("\n")
    m = re.search(r"\\\[(.+?)(?<!\\)\\\]", text, re.DOTALL)
    if m:
        text = m.group(1).strip()
    for pattern in _FORMULA_PATTERNS:
        text = pattern.sub("", text)
    text = text.strip(".")
    for token in _FORMULA_DROP:
        text = text.replace(token, "")
    return text.lower()


def normalize_table(table_html: str) -> str:
    """Entities decoded, NFKC, whitespace collapsed: the string tables are matched (and edit-scored) on."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", html.unescape(table_html))).strip()


def _normalize(kind_or_category: str, content: str) -> str:
    if kind_or_category in ("formula", FORMULA):
        return normalize_formula(content)
    if kind_or_category in ("table", TABLE):
        return normalize_table(content)
    return normalize_text(content)


# --------------------------------------------------------------------------- reading the ground truth
def load_ground_truth(path: str | Path) -> list[dict]:
    """Read and check an OmniDocBench JSON file; errors name the page and field that are wrong."""
    path = Path(path)
    if not path.is_file():
        raise MetricError(f"no OmniDocBench ground-truth file at {path}")
    try:
        pages = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MetricError(f"{path} is not valid UTF-8 JSON: {e}") from None
    if not isinstance(pages, list) or not pages:
        raise MetricError(f"{path} must hold a non-empty JSON list of pages (OmniDocBench.json format)")
    seen: set[str] = set()
    for i, page in enumerate(pages):
        where = f"{path}: page {i}"
        info = page.get("page_info") if isinstance(page, dict) else None
        if not isinstance(info, dict) or not isinstance(info.get("image_path"), str) or not info["image_path"]:
            raise MetricError(f"{where} has no page_info.image_path")
        name = os.path.basename(info["image_path"])
        if name in seen:
            raise MetricError(f"{where}: image {name!r} appears twice; prediction files are matched by image name")
        seen.add(name)
        dets = page.get("layout_dets")
        if not isinstance(dets, list) or not all(isinstance(d, dict) and isinstance(d.get("category_type"), str)
                                                 for d in dets):
            raise MetricError(f"{where} ({name}): layout_dets must be a list of objects with a category_type")
    return pages


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _content(det: dict) -> str:
    key = {TABLE: "html", FORMULA: "latex"}.get(det["category_type"], "text")
    value = det.get(key)
    return value if isinstance(value, str) else ""


def gt_blocks(page: dict) -> list[GtBlock]:
    """The page's elements with ``truncated`` chains joined, in reading order (blocks without order last)."""
    dets = page["layout_dets"]
    by_id = {d["anno_id"]: d for d in dets if isinstance(d.get("anno_id"), (int, str))}
    groups: list[list[Any]] = []  # chains of anno_ids joined by 'truncated' relations
    relations = (page.get("extra") or {}).get("relation") or []
    for rel in relations if isinstance(relations, list) else []:
        if not isinstance(rel, dict) or rel.get("relation_type", rel.get("relation")) != "truncated":
            continue
        a, b = rel.get("source_anno_id"), rel.get("target_anno_id")
        if a not in by_id or b not in by_id:
            continue
        hit = [g for g in groups if a in g or b in g]
        merged = [x for g in hit for x in g] + [a, b]
        groups = [g for g in groups if g not in hit] + [list(dict.fromkeys(merged))]
    in_group = {x for g in groups for x in g}
    units = [[d] for d in dets if not isinstance(d.get("anno_id"), (int, str)) or d["anno_id"] not in in_group]
    units += [sorted((by_id[x] for x in g), key=lambda d: (_int_or_none(d.get("order")) is None,
                                                            _int_or_none(d.get("order")) or 0)) for g in groups]
    blocks = []
    for unit in units:
        first = unit[0]
        cat = first["category_type"]
        scored = cat in TEXT_CATEGORIES + (FORMULA, TABLE) and not any(d.get("ignore") is True for d in unit)
        blocks.append(GtBlock(cat, "".join(_content(d) for d in unit), _int_or_none(first.get("order")), scored))
    return sorted(blocks, key=lambda b: (b.order is None, b.order or 0))


# --------------------------------------------------------------------------- reading a prediction
_IMAGE = re.compile(r"!\[.*?\]\(.*?\)")
_WRAPPER_FENCE = re.compile(r"^```(?:markdown|md|html|latex)?[ \t]*$\n?", re.MULTILINE)
_HTML_TABLE = re.compile(r"<table\b.*?</table\s*>", re.IGNORECASE | re.DOTALL)
_DISPLAY = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]", re.DOTALL)
_CODE = re.compile(r"```(?!(?:markdown|md|html|latex)\b)[\w+#.-]+[ \t]*\n(.*?)```", re.DOTALL)
_PIPE_TABLE = re.compile(r"(?:^[ \t]*\|.*\|[ \t]*(?:\n|$)){2,}", re.MULTILINE)
_PIPE_RULE = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$")


def _blank(text: str, start: int, end: int) -> str:
    """Replace a span by spaces so later offsets (reading positions) stay valid."""
    return text[:start] + " " * (end - start) + text[end:]


def pipe_table_to_html(block: str) -> str:
    """A GitHub pipe table -> ``<table>``; the delimiter row is dropped and the first row kept as a row."""
    rows = []
    for line in block.strip().splitlines():
        if _PIPE_RULE.match(line):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c.replace(chr(92) + '|', '|'))}</td>" for c in cells) + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def split_prediction(markdown: str) -> list[PredBlock]:
    """A page of markdown -> text / formula / table blocks with their offsets (step 1 of the protocol)."""
    md = _IMAGE.sub(lambda m: " " * len(m.group(0)), markdown.replace("\r\n", "\n"))
    blocks: list[PredBlock] = []
    # code first, so a table or formula inside a code block stays code; its text is scored as text
    for m in _CODE.finditer(md):
        if m.group(1).strip():
            blocks.append(PredBlock("text", m.group(1).strip(), m.start()))
        md = _blank(md, m.start(), m.end())
    md = _WRAPPER_FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), md)
    md = re.sub(r"_{5,}", lambda m: "____" + " " * (len(m.group(0)) - 4), md)
    for m in _HTML_TABLE.finditer(md):
        blocks.append(PredBlock("table", m.group(0), m.start()))
        md = _blank(md, m.start(), m.end())
    for m in _DISPLAY.finditer(md):
        blocks.append(PredBlock("formula", m.group(0).strip(), m.start()))
        md = _blank(md, m.start(), m.end())
    for m in _PIPE_TABLE.finditer(md):
        if any(_PIPE_RULE.match(line) for line in m.group(0).splitlines()):
            blocks.append(PredBlock("table", pipe_table_to_html(m.group(0)), m.start()))
            md = _blank(md, m.start(), m.end())
    pieces = re.split(r"(\n\s*\n)", md)
    if len(pieces) == 1:
        pieces = re.split(r"(\n)", md)
    pos = 0
    for piece in pieces:
        text = "\n".join(line.strip() for line in piece.split("\n") if line.strip())
        if text and not re.fullmatch(r"\n\s*", piece):
            blocks.append(PredBlock("text", re.sub(r" {5,}", "    ", text), pos + len(piece) - len(piece.lstrip())))
        pos += len(piece)
    return sorted(blocks, key=lambda b: b.position)


def find_prediction(pred_dir: Path, image_path: str) -> Path | None:
    """``page.md`` / ``page.mmd`` / ``page.jpg.md`` for ``.../page.jpg``, or None."""
    name = os.path.basename(image_path)
    stem = os.path.splitext(name)[0]
    for candidate in [stem + s for s in PRED_SUFFIXES] + [name + ".md"]:
        if (pred_dir / candidate).is_file():
            return pred_dir / candidate
    return None


# --------------------------------------------------------------------------- matching
def min_cost_assignment(cost: list[list[float]]) -> list[tuple[int, int]]:
    """Pairs (row, col) of a minimum-total-cost one-to-one matching of a rectangular matrix (Hungarian,
    shortest augmenting paths with potentials, O(n² m)). Every row is matched when rows <= cols and
    vice versa. Pages hold tens of blocks, so pure Python is fast enough and needs no scipy."""
    if not cost or not cost[0]:
        return []
    transpose = len(cost) > len(cost[0])
    a = [list(r) for r in zip(*cost)] if transpose else cost
    n, m = len(a), len(a[0])
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner, way = [0] * (m + 1), [0] * (m + 1)  # owner[j]: row (1-based) holding column j; 0 = free
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while owner[j0]:
            used[j0], i0, delta, j1 = True, owner[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = a[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    pairs = [(owner[j] - 1, j - 1) for j in range(1, m + 1) if owner[j]]
    return sorted((c, r) for r, c in pairs) if transpose else sorted(pairs)


def match_blocks(gts: list[GtBlock], preds: list[PredBlock]) -> tuple[list[Match], list[PredBlock]]:
    """One-to-one matching by normalised edit distance; returns a Match per gt and the unmatched preds.

    Ground truth and predictions that normalise to "" are left out first (nothing to compare), as upstream.
    """
    gts = [g for g in gts if g.content and _normalize(g.category, g.content)]
    norm_g = [_normalize(g.category, g.content) for g in gts]
    kept = [(p, _normalize(p.kind, p.content)) for p in preds]
    kept = [(p, n) for p, n in kept if n]
    cost = [[Levenshtein.normalized_distance(ng, npd) for _, npd in kept] for ng in norm_g]
    pairs = dict(min_cost_assignment(cost)) if kept else {}
    matches = [Match(g, kept[pairs[i]][0] if i in pairs else None, ng, kept[pairs[i]][1] if i in pairs else "")
               for i, (g, ng) in enumerate(zip(gts, norm_g))]
    used = set(pairs.values())
    return matches, [p for j, (p, _) in enumerate(kept) if j not in used]


def table_cells_as_text(table: PredBlock) -> list[PredBlock]:
    """An unmatched predicted table's cells, offered to the text pool (a table where the gt has text)."""
    from optictx.primitives import cell_tokens, find_tables, parse_html, table_rows

    cells = [c for t in find_tables(parse_html(table.content)) for r in table_rows(t) for c in r]
    return [PredBlock("text", "".join(cell_tokens(c)), table.position) for c in cells]


@dataclass
class PageResult:
    """Every match of one page, grouped by what it is scored as."""

    text: list[Match] = field(default_factory=list)
    formula: list[Match] = field(default_factory=list)
    table: list[Match] = field(default_factory=list)
    order_edit: float | None = None


def score_page(page: dict, markdown: str) -> PageResult:
    """Split, match and group one page (protocol steps 1-4) and compute its reading-order edit distance."""
    gts, preds = gt_blocks(page), split_prediction(markdown)
    gt_tables = [g for g in gts if g.category == TABLE]
    table_matches, spare_tables = match_blocks(gt_tables, [p for p in preds if p.kind == "table"])
    pool = [p for p in preds if p.kind != "table"] + [c for t in spare_tables for c in table_cells_as_text(t)]
    pool_gt = [g for g in gts if g.category in TEXT_CATEGORIES + MATCHED_NOT_SCORED + (FORMULA,)]
    matches, _ = match_blocks(pool_gt, pool)
    result = PageResult(text=[m for m in matches if m.gt.scored and m.gt.category in TEXT_CATEGORIES],
                        formula=[m for m in matches if m.gt.scored and m.gt.category == FORMULA],
                        table=[m for m in table_matches if m.gt.scored])
    result.order_edit = reading_order_edit(result.text)
    return result


def reading_order_edit(text_matches: list[Match]) -> float | None:
    """Edit distance between gt order indices and the same indices read in prediction order; None if empty."""
    ordered = [m for m in text_matches if m.gt.order is not None]
    gt = sorted(m.gt.order for m in ordered)
    pred = [m.gt.order for m in sorted((m for m in ordered if m.pred is not None), key=lambda m: m.pred.position)]
    if not gt and not pred:
        return None
    return Levenshtein.distance(gt, pred) / max(len(gt), len(pred))


# --------------------------------------------------------------------------- aggregation
def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def edit_summary(per_page: dict[str, list[Match]]) -> dict[str, Any]:
    """Edit distance three ways: ``page_avg`` (leaderboard), ``whole`` (all characters), ``sample_avg``."""
    samples = [m for ms in per_page.values() for m in ms if m.upper]
    pages = [sum(m.edit_num for m in ms) / sum(m.upper for m in ms) for ms in per_page.values()
             if any(m.upper for m in ms)]
    total = sum(m.upper for m in samples)
    return {"page_avg": _mean(pages), "whole": sum(m.edit_num for m in samples) / total if total else None,
            "sample_avg": _mean([m.edit_num / m.upper for m in samples]), "count": len(samples)}


def table_summary(matches: list[Match]) -> dict[str, Any]:
    """Mean TEDS / TEDS-S over ground-truth tables (an unmatched table scores 0) and their edit distance."""
    full, struct_, edits = [], [], []
    for m in matches:
        pred = m.pred.content if m.pred else ""
        gt = m.gt.content if re.search(r"<table\b", m.gt.content, re.I) else f"<table>{m.gt.content}</table>"
        full.append(teds(pred, gt, ignore_nodes=TABLE_IGNORE) if pred else 0.0)
        struct_.append(teds_structure(pred, gt, ignore_nodes=TABLE_IGNORE) if pred else 0.0)
        edits.append(m.edit_num / m.upper if m.upper else 0.0)
    return {"teds": _mean(full), "teds_structure": _mean(struct_), "edit_sample_avg": _mean(edits),
            "count": len(matches)}


def score_omnidocbench(pred_dir: str | Path, gt_json: str | Path, *, missing_as_empty: bool = False) -> dict:
    """Score a folder of markdown predictions against an OmniDocBench JSON file (see module docstring).

    Pages without a prediction file are skipped and listed under ``missing`` (upstream skips them too);
    ``missing_as_empty=True`` scores them as empty pages instead. Scores are None where nothing was scored.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise MetricError(f"no predictions folder at {pred_dir}")
    pages = load_ground_truth(gt_json)
    results: dict[str, PageResult] = {}
    missing = []
    for page in pages:
        name = os.path.basename(page["page_info"]["image_path"])
        path = find_prediction(pred_dir, name)
        if path is None and not missing_as_empty:
            missing.append(name)
            continue
        # a prediction in a legacy encoding still scores: undecodable bytes become U+FFFD and count as errors
        markdown = path.read_text(encoding="utf-8", errors="replace") if path else ""
        results[name] = score_page(page, markdown)
    if not results:
        stem = os.path.splitext(missing[0])[0]
        raise MetricError(f"none of the {len(pages)} ground-truth pages has a prediction in {pred_dir} "
                          f"(expected e.g. {pred_dir / (stem + '.md')})")
    orders = [r.order_edit for r in results.values() if r.order_edit is not None]
    return {
        "pages": len(results),
        "missing": missing,
        "text_block": {"edit": edit_summary({k: r.text for k, r in results.items()})},
        "display_formula": {"edit": edit_summary({k: r.formula for k, r in results.items()})},
        "table": table_summary([m for r in results.values() for m in r.table]),
        "reading_order": {"edit": {"page_avg": _mean(orders), "count": len(orders)}},
        "per_page": {k: {"text_edit": edit_summary({k: r.text})["page_avg"],
                         "formula_edit": edit_summary({k: r.formula})["page_avg"],
                         "table_teds": table_summary(r.table)["teds"],
                         "reading_order_edit": r.order_edit} for k, r in results.items()},
    }


# --------------------------------------------------------------------------- CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``omnidocbench`` to the ``optictx eval`` sub-commands."""
    p = subparsers.add_parser("omnidocbench", help="score predictions with the OmniDocBench end-to-end protocol",
                              description="Score a folder of per-page markdown files (named after the page "
                                          "images) against an OmniDocBench JSON: text and formula edit distance, "
                                          "table TEDS / TEDS-S, reading-order edit distance.")
    p.add_argument("--pred", required=True, metavar="DIR", help="folder of <image stem>.md predictions")
    p.add_argument("--gt", required=True, metavar="FILE.json", help="OmniDocBench ground truth JSON")
    p.add_argument("--out", metavar="FILE.json", help="also write all scores (with per-page ones) here")
    p.add_argument("--missing-as-empty", action="store_true",
                   help="score pages without a prediction file as empty instead of skipping them")
    p.set_defaults(func=run_cli)


register_omnidocbench = register_cli


def _fmt(v: float | None, scale: float = 1.0) -> str:
    return "-" if v is None else f"{v * scale:.3f}" if scale == 1 else f"{v * scale:.1f}"


def run_cli(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    scores = score_omnidocbench(args.pred, args.gt, missing_as_empty=args.missing_as_empty)
    t = Table(title=f"OmniDocBench end-to-end ({scores['pages']} pages, {len(scores['missing'])} missing)")
    for col in ("element", "metric", "score", "n"):
        t.add_column(col, justify="left" if col in ("element", "metric") else "right")
    t.add_row("text", "edit (page avg) ↓", _fmt(scores["text_block"]["edit"]["page_avg"]),
              str(scores["text_block"]["edit"]["count"]))
    t.add_row("formula", "edit (page avg) ↓", _fmt(scores["display_formula"]["edit"]["page_avg"]),
              str(scores["display_formula"]["edit"]["count"]))
    t.add_row("table", "TEDS ↑", _fmt(scores["table"]["teds"], 100), str(scores["table"]["count"]))
    t.add_row("table", "TEDS-S ↑", _fmt(scores["table"]["teds_structure"], 100), str(scores["table"]["count"]))
    t.add_row("reading order", "edit (page avg) ↓", _fmt(scores["reading_order"]["edit"]["page_avg"]),
              str(scores["reading_order"]["edit"]["count"]))
    Console().print(t)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:  # written whole or not at all: a crash never leaves half a JSON behind
            tmp.write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"wrote {out}")
    return 0
