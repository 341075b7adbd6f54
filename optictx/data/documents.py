"""Synthetic document pages: plain text, markdown (headings, lists, code, tables) and multi-column pages,
with targets as plain text or the official grounding markdown (reference deepseek-ocr.md §7.2–§7.3)::

    <|ref|>title<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|>
    # Heading

    <|ref|>text<|/ref|><|det|>[[...]]<|/det|>
    A paragraph ...

Boxes are 0-999 of the page. Tables are written as HTML (``<table><tr><td>``) as the official model writes
them even when asked for markdown (reference §7.2, issue #92); ``table_format="markdown"`` keeps GFM.

Text comes from the training corpus only (:class:`optictx.data.corpus.TextSampler`: stdlib docstrings,
Faker en_US, shuffled words, random strings) or, with probability ``p_locale``, from Faker in another
language (non-ASCII text); such samples are marked ``meta["text_source"] = "faker:<locale>"`` and
``meta["non_ascii"]``. The held-out licence texts are never read here.
"""
from __future__ import annotations

import html
import random
import re
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from optictx.data.corpus import TextSampler
from optictx.data.dataset import OCRSample, make_sample, sample_rng
from optictx.errors import ConfigError
from optictx.primitives import format_det
from optictx.prompts import PROMPTS
from optictx.render import PageStyle, RenderedPage, render_text, to_999
from optictx.render.page import Block, TextBox, augment
from optictx.render.typeset import is_cjk

LAYOUTS = ("plain", "markdown", "columns")
TARGETS = ("grounding", "text")
# Faker locales with a lorem provider, i.e. real words of the language (Latin with diacritics, Cyrillic,
# Greek, Vietnamese, CJK). Right-to-left scripts are left out: their reading order needs its own targets.
LOCALES = ("de_DE", "fr_FR", "es_ES", "it_IT", "pl_PL", "cs_CZ", "ru_RU", "uk_UA", "el_GR", "vi_VN", "zh_CN",
           "ja_JP")
MD_UNSAFE = re.compile(r"[*_`#|<>\[\]\\~&]")  # characters markdown would read as markup, dropped from md text


@dataclass(frozen=True)
class DocConfig:
    """How document pages vary. Sizes are (width, height) in px; font sizes px per em."""

    sizes: tuple[tuple[int, int], ...] = ((512, 512), (640, 640), (640, 832), (768, 1024))
    font_sizes: tuple[int, ...] = (12, 14, 16, 18, 20, 22)
    fonts: tuple[str, ...] = ("sans", "serif", "mono")
    layouts: tuple[tuple[str, float], ...] = (("plain", 0.3), ("markdown", 0.45), ("columns", 0.25))
    targets: tuple[tuple[str, float], ...] = (("grounding", 0.6), ("text", 0.4))
    locales: tuple[str, ...] = LOCALES
    p_locale: float = 0.15
    fill: tuple[float, float] = (0.3, 1.1)  # text drawn / page capacity (over 1 fills the page)
    table_format: str = "html"
    p_augment: float = 0.0  # share of pages with mild noise and blur

    def __post_init__(self) -> None:
        for name, allowed in (("layouts", LAYOUTS), ("targets", TARGETS)):
            items = dict(getattr(self, name))
            if not items or any(k not in allowed or w < 0 for k, w in items.items()) or sum(items.values()) <= 0:
                raise ConfigError(f"DocConfig.{name} must weight some of {allowed}, got {items}")
        if self.table_format not in ("html", "markdown"):
            raise ConfigError(f"table_format must be 'html' or 'markdown', got {self.table_format!r}")
        if not self.sizes or not self.font_sizes or not self.fonts:
            raise ConfigError("DocConfig needs at least one page size, font size and font")
        if not 0 <= self.p_locale <= 1 or not 0 <= self.p_augment <= 1 or not 0 < self.fill[0] <= self.fill[1]:
            raise ConfigError("p_locale and p_augment must be in [0, 1] and fill a range 0 < lo <= hi")


# --------------------------------------------------------------------------- text sources
@lru_cache(maxsize=1)
def _sampler() -> TextSampler:
    return TextSampler(0)  # reseeded per sample (see _Text): one per process, as building it reads ~100 modules


@lru_cache(maxsize=None)
def _faker(locale: str):
    from faker import Faker

    return Faker(locale)


class _Text:
    """The words of one page: English training text, or Faker in one locale. Seeded by the sample."""

    def __init__(self, r: np.random.Generator, locale: str | None):
        self.r, self.locale = r, locale
        seed = int(r.integers(2**63))
        if locale is None:
            self.sampler = _sampler()
            self.sampler.rng = random.Random(seed)  # the sampler's draws follow this page (as ocr_pages does)
            self.sampler.faker.seed_instance(seed)
            self.faker = self.sampler.faker
        else:
            self.faker = _faker(locale)
            self.faker.seed_instance(seed)

    def paragraph(self, n_chars: int) -> str:
        if self.locale is None:
            text = self.sampler.sample(n_chars)
            cut = text.rfind(" ")  # the sampler cuts at a character count: end on a whole word
            return text[:cut] if cut > len(text) // 2 else text
        return self.faker.text(max_nb_chars=max(20, n_chars)).replace("\n", " ")

    def phrase(self, lo: int, hi: int) -> str:
        """A heading-like phrase of lo..hi words."""
        n = int(self.r.integers(lo, hi + 1))
        if self.locale is None:
            words = [self.sampler.words[int(self.r.integers(len(self.sampler.words)))] for _ in range(n)]
            return " ".join([words[0].capitalize()] + words[1:])
        return self.faker.sentence(nb_words=n, variable_nb_words=False).rstrip(".。")

    def cell(self, kind: str) -> str:
        f = self.faker
        if kind == "int":
            return str(int(self.r.integers(0, 10 ** int(self.r.integers(1, 6)))))
        if kind == "float":
            return f"{self.r.uniform(0, 1000):.{int(self.r.integers(1, 3))}f}"
        if kind == "date":
            return str(f.date())
        if kind == "name":
            return f.name()
        if kind == "city":
            return f.city()
        return self.phrase(1, 2)


def md_safe(text: str) -> str:
    """Text that markdown renders literally: markup characters dropped, starts with a letter or digit."""
    text = re.sub(r"\s+", " ", MD_UNSAFE.sub("", text)).strip()
    text = re.sub(r"^[^\w]+", "", text)
    return re.sub(r"^(\d+)([.)])", r"\1", text)  # "1990. Foo" would be an ordered list item


# --------------------------------------------------------------------------- markdown documents
CODE_TEMPLATES = (
    "def {f}({a}, {b}):\n    {v} = {a} + {b} * {n}\n    return {v}",
    "for {a} in range({n}):\n    {v}.append({a} ** 2)",
    "{v} = {{\"{a}\": {n}, \"{b}\": {m}}}\nprint({v}[\"{a}\"])",
    "class {F}:\n    def __init__(self, {a}):\n        self.{a} = {a}",
    "if {a} > {n}:\n    {f}({a})\nelse:\n    {v} = None",
)


def _code(t: _Text) -> str:
    words = [w.lower() for w in t.sampler.words if w.isascii() and w.isalpha() and 2 < len(w) < 10] \
        if t.locale is None else ["data", "value", "item", "count", "total", "index", "result", "name"]
    pick = lambda: words[int(t.r.integers(len(words)))]  # noqa: E731
    a, b, v, f = pick(), pick(), pick(), pick()
    b = b if b != a else b + "2"
    template = CODE_TEMPLATES[int(t.r.integers(len(CODE_TEMPLATES)))]
    return template.format(a=a, b=b, v=v + "s", f=f + "_fn", F=f.capitalize(), n=int(t.r.integers(2, 100)),
                           m=int(t.r.integers(2, 100)))


def _table(t: _Text) -> list[list[str]]:
    cols = int(t.r.integers(2, 5))
    kinds = ["name" if t.r.random() < 0.5 else "word"] + [
        str(t.r.choice(["int", "float", "date", "city", "word"])) for _ in range(cols - 1)]
    header = [md_safe(t.phrase(1, 2)) or f"Col{c + 1}" for c in range(cols)]
    rows = [[md_safe(t.cell(k)) or "-" for k in kinds] for _ in range(int(t.r.integers(2, 6)))]
    return [header] + rows


def gfm_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def html_table(rows: list[list[str]]) -> str:
    """Rows of cell texts -> the official table form: ``<table><tr><td>a</td>...</tr></table>``."""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c, quote=False)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{body}</table>"


def markdown_document(t: _Text, n_chars: int) -> str:
    """A random markdown document of about ``n_chars`` characters: a title, then sections of paragraphs,
    lists, code blocks and tables."""
    parts = ["# " + md_safe(t.phrase(2, 7))]
    size = len(parts[0])
    while size < n_chars:
        section = [f"{'#' * int(t.r.integers(2, 4))} " + md_safe(t.phrase(1, 5))]
        for _ in range(int(t.r.integers(1, 4))):
            kind = t.r.choice(["para", "para", "list", "code", "table"])
            if kind == "para":
                section.append(md_safe(t.paragraph(int(t.r.integers(120, 500)))) or "Text.")
            elif kind == "list":
                ordered = t.r.random() < 0.4
                items = [md_safe(t.phrase(3, 10)) or "item" for _ in range(int(t.r.integers(2, 6)))]
                section.append("\n".join(f"{i + 1}. {s}" if ordered else f"- {s}" for i, s in enumerate(items)))
            elif kind == "code":
                section.append("```python\n" + _code(t) + "\n```")
            else:
                section.append(gfm_table(_table(t)))
        parts += section
        size += sum(len(s) for s in section)
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- pages and targets
def join_lines(text: str) -> str:
    """A wrapped block's lines -> its paragraph: a space between lines, none next to CJK."""
    out = ""
    for line in text.split("\n"):
        if out and line:
            out += "" if is_cjk(out[-1]) or is_cjk(line[0]) else " "
        out += line
    return out


def _table_rows(source: str) -> list[list[str]]:
    from optictx.render.markdown import parse_markdown

    tables = [b for b in parse_markdown(source) if b.kind == "table"]
    return tables[0].rows if tables else []


def block_content(block: Block, layout: str, table_format: str) -> str:
    """What a grounded block's content is in the markdown target."""
    if layout != "markdown":  # render_text blocks: label title (already "# ...") or wrapped text
        return block.text if block.label == "title" else join_lines(block.text)
    if block.label == "table" and table_format == "html":
        rows = _table_rows(block.text)
        return html_table(rows) if rows else block.text
    return block.text


def grounding_target(page: RenderedPage, layout: str, table_format: str = "html") -> tuple[str, str]:
    """(target with ``<|ref|>``/``<|det|>`` spans, the same content without them) for a rendered page."""
    spans, contents = [], []
    for block in page.blocks:
        content = block_content(block, layout, table_format)
        spans.append(format_det(block.label, [block.box_999]) + "\n" + content)
        contents.append(content)
    return "\n\n".join(spans), "\n\n".join(contents)


def _capacity(w: int, h: int, margin: int, font_size: int) -> int:
    """Characters a page holds, roughly (0.5 em per character, 1.25 em per line)."""
    return int((w - 2 * margin) / (0.5 * font_size) * (h - 2 * margin) / (1.25 * font_size))


def _paragraphs(t: _Text, n_chars: int) -> str:
    paras, size = [], 0
    while size < n_chars:
        paras.append(t.paragraph(int(t.r.integers(150, 600))))
        size += len(paras[-1])
    return "\n\n".join(p for p in paras if p.strip()) or "Text."


def _shift(page: RenderedPage, dy: int, height: int) -> tuple[list[TextBox], list[Block]]:
    w = page.image.width

    def move(b):
        box = (b.box_px[0], b.box_px[1] + dy, b.box_px[2], b.box_px[3] + dy)
        return b._replace(box_px=box, box_999=to_999(box, w, height))

    return [move(x) for x in page.lines], [move(x) for x in page.blocks]


def columns_page(t: _Text, style: PageStyle, n_chars: int, columns: int) -> RenderedPage:
    """A title across the page over a body in ``columns`` columns (pasted together, boxes shifted)."""
    title = t.phrase(2, 6)
    tstyle = style.with_(font_size=round(style.font_size * 1.5), columns=1)
    head = render_text(title, tstyle, max_pages=1)[0]
    bottom = max(b.box_px[3] for b in head.lines)
    y_off = bottom + style.font_size - style.margin  # the body's top margin lands one em below the title
    W, H = style.width, style.height
    body = render_text(_paragraphs(t, n_chars), style.with_(height=H - y_off, columns=columns), max_pages=1)[0]
    image = head.image.copy()  # the body's top margin is blank: paste below it so the title stays visible
    image.paste(body.image.crop((0, style.margin, W, body.image.height)), (0, y_off + style.margin))
    lines, blocks = _shift(body, y_off, H)
    tbox = (min(b.box_px[0] for b in head.lines), min(b.box_px[1] for b in head.lines),
            max(b.box_px[2] for b in head.lines), bottom)
    title_block = Block("title", "# " + join_lines(head.text), tbox, to_999(tbox, W, H))
    return RenderedPage(image, head.text + "\n\n" + body.text, list(head.lines) + lines, blocks=[title_block] + blocks)


def _choice(r: np.random.Generator, weighted: tuple[tuple[str, float], ...]) -> str:
    names, w = zip(*weighted)
    p = np.asarray(w, dtype=float)
    return str(names[int(r.choice(len(names), p=p / p.sum()))])


def document_page(seed: int, index: int, config: DocConfig | None = None) -> tuple[RenderedPage, str, dict]:
    """The page of sample (seed, index): (rendered page, layout, meta)."""
    cfg = config or DocConfig()
    r = sample_rng(seed, index, "document")
    layout = _choice(r, cfg.layouts)
    w, h = cfg.sizes[int(r.integers(len(cfg.sizes)))]
    font_size = int(cfg.font_sizes[int(r.integers(len(cfg.font_sizes)))])
    font = cfg.fonts[int(r.integers(len(cfg.fonts)))]
    locale = cfg.locales[int(r.integers(len(cfg.locales)))] if cfg.locales and r.random() < cfg.p_locale else None
    margin = max(8, min(w, h) // 16)
    style = PageStyle(width=w, height=h, margin=margin, font_family=font, font_size=font_size,
                      line_spacing=float(r.uniform(1.15, 1.45)))
    t = _Text(r, locale)
    n_chars = int(_capacity(w, h, margin, font_size) * r.uniform(*cfg.fill))
    meta = {"layout": layout, "font": font, "font_size": font_size, "text_source": f"faker:{locale}" if locale
            else "corpus", "non_ascii": False}
    if layout == "markdown":
        from optictx.render import render_markdown

        page = render_markdown(markdown_document(t, n_chars), style, max_pages=1)[0]
    elif layout == "columns":
        columns = int(r.integers(2, 4)) if w >= 40 * font_size else 2
        while columns > 1 and style.with_(columns=1).column_width / columns < 10 * font_size:
            columns -= 1
        meta["columns"] = columns
        page = columns_page(t, style, n_chars, columns)
    else:
        page = render_text(_paragraphs(t, n_chars), style, max_pages=1)[0]
    if r.random() < cfg.p_augment:
        aug = style.with_(noise_std=float(r.uniform(0, 8)), blur_radius=float(r.uniform(0, 0.8)),
                          seed=int(r.integers(2**31)))
        page = augment(page, aug)
        meta["augmented"] = True
    meta["non_ascii"] = not page.text.isascii()
    return page, layout, meta


def document_sample(seed: int, index: int, mode: str = "tiny", config: DocConfig | None = None) -> OCRSample:
    """A document page with its target: grounding markdown (prompt "<|grounding|>Convert the document to
    markdown.") or the page text as drawn (prompt "Free OCR.")."""
    cfg = config or DocConfig()
    page, layout, meta = document_page(seed, index, cfg)
    target_kind = _choice(sample_rng(seed, index, "document-target"), cfg.targets)
    meta["target"] = target_kind
    if target_kind == "grounding":
        target, text = grounding_target(page, layout, cfg.table_format)
        prompt = PROMPTS["markdown"]
    else:
        target = text = page.text
        prompt = PROMPTS["free-ocr"]
    return make_sample("document", page.image, prompt, target, text, seed, index, mode, meta)


def with_layout(config: DocConfig | None, layout: str) -> DocConfig:
    """A config that always draws one layout (previews, tests)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return replace(config or DocConfig(), layouts=((layout, 1.0),))
