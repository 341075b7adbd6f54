"""The official DeepSeek-OCR weights through vLLM (>= 0.11.1), with optictx around it.

optictx does the parts users see: safe image loading (EXIF, alpha, pixel limits), PDF rasterising, the
official prompts, the anti-loop guard settings (vLLM's ``NGramPerReqLogitsProcessor``, 30-gram in a 90-token
window with ``<td>``/``</td>`` whitelisted, the official image-script values), and the post-processing into a
``PageResult`` (markdown, blocks with 0-999 and pixel boxes, token counts). vLLM does the GPU work:
paged attention, continuous batching, CUDA graphs (reference deepseek-ocr.md §7.5).

Limits that come from vLLM's DeepSeek-OCR processor, which hard-codes its views: only Gundam mode with
2-6 tiles (``budget.get_mode("gundam", max_crops=6)``) can run here, and only checkpoints with the official
layer sizes (the bundled tiny model cannot). The offline ``vllm.LLM`` does not stream: a served stream gets a
page's text in one delta when the page is done.
"""
from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optictx.backends import BackendUnavailableError
from optictx.budget import Mode, OCRBudget, get_mode, ocr_budget
from optictx.errors import ConfigError
from optictx.preprocess import DEFAULT_MAX_PIXELS, ImageSource, load_image
from optictx.prompts import prompt_text

MIN_VLLM = (0, 11, 1)
OFFICIAL = "deepseek-ai/DeepSeek-OCR"
INSTALL = "pip install 'optictx[vllm]' (vLLM >= 0.11.1, Linux with an NVIDIA GPU)"


def vllm_mode() -> Mode:
    """What vLLM's processor does: 1024-px global view + 640-px tiles, 2-6 of them (reference §7.5)."""
    return get_mode("gundam", max_crops=6)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def require_vllm() -> tuple[Any, Any]:
    """``(vllm module, NGramPerReqLogitsProcessor)`` or a BackendUnavailableError that says what to do."""
    try:
        import vllm
    except ImportError:
        raise BackendUnavailableError(f"the vLLM backend needs vLLM, which is not installed: {INSTALL}") from None
    version = str(getattr(vllm, "__version__", "0"))
    if _version(version) < MIN_VLLM:
        raise BackendUnavailableError(f"vLLM {version} is too old: DeepSeek-OCR support arrived in 0.11.1; "
                                      "pip install -U 'vllm>=0.11.1'")
    try:
        from vllm.model_executor.models.deepseek_ocr import NGramPerReqLogitsProcessor
    except ImportError:
        raise BackendUnavailableError(f"this vLLM ({version}) has no DeepSeek-OCR model class; "
                                      "pip install -U 'vllm>=0.11.1'") from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("the vLLM backend needs an NVIDIA GPU and none is visible "
                                      "(torch.cuda.is_available() is False); use --backend torch here")
    return vllm, NGramPerReqLogitsProcessor


@dataclass
class VLLMJob:
    """One page ready for vLLM: the loaded image, the prompt text and the budget vLLM will spend on it."""

    image: Any
    size: tuple[int, int]
    prompt: str
    budget: OCRBudget
    page: int | None
    source: str | None
    t_start: float
    load_s: float


class VLLMOCR:
    """``OCR``'s interface (``__call__``, ``batch``, ``pdf``, ``stream``) on a vLLM engine.

    ``llm`` lets a caller hand in an engine it already built (tests use a stand-in); otherwise one is
    built with the settings of the official recipe (no prefix caching, no multimodal processor cache,
    the n-gram logits processor) plus ``engine_args``.
    """

    backend = "vllm"

    def __init__(self, model: str | Path = OFFICIAL, mode: str | Mode | None = None, prompt: str | None = None, *,
                 max_new_tokens: int | None = None, ngram_size: int = 30, window_size: int = 90,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 64, max_model_len: int = 8192, llm: Any = None, **engine_args: Any):
        from optictx.tokenizer import Tokenizer
        from optictx.weights import resolve_model_path

        if str(model) in ("tiny", "ocr-tiny"):
            raise ConfigError("the bundled tiny model has its own layer sizes, which vLLM's DeepSeek-OCR class "
                              "does not read; run it with --backend torch")
        self.mode = vllm_mode()
        if mode is not None and get_mode(mode).name != self.mode.name:
            raise ConfigError(f"the vLLM backend reads pages in Gundam mode only (its processor hard-codes "
                              f"1024/640 with 2-6 tiles), not {get_mode(mode).name!r}; use --backend torch")
        self._vllm, ngram_processor = require_vllm()
        path = resolve_model_path(model)
        self.model_path = path
        self.model_id = str(model) if not Path(str(model)).exists() else Path(str(model)).name
        self.tokenizer = Tokenizer.from_pretrained(path)
        self.prompt = prompt or "markdown"
        prompt_text(self.prompt)
        self.max_new_tokens = max_new_tokens or 8192
        self.ngram_size, self.window_size = ngram_size, window_size
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.max_pixels = max_pixels
        self.whitelist = {i for t in ("<td>", "</td>") if (i := self.tokenizer.token_id(t)) is not None}
        self.llm = llm if llm is not None else self._vllm.LLM(
            model=str(path), enable_prefix_caching=False, mm_processor_cache_gb=0,
            logits_processors=[ngram_processor], max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs, **engine_args)

    # ------------------------------------------------------------------ requests
    def sampling_params(self, max_new_tokens: int | None = None, temperature: float | None = None,
                        top_p: float | None = None, seed: int | None = None, ignore_eos: bool = False):
        """vLLM SamplingParams for one page: greedy by default, special tokens kept (the boxes live in them)."""
        extra = {"ngram_size": self.ngram_size, "window_size": self.window_size,
                 "whitelist_token_ids": set(self.whitelist)} if self.ngram_size else None
        return self._vllm.SamplingParams(
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p if top_p is None else top_p, seed=self.seed if seed is None else seed,
            max_tokens=max_new_tokens or self.max_new_tokens, ignore_eos=ignore_eos,
            skip_special_tokens=False, extra_args=extra)

    def prepare(self, image: ImageSource, prompt: str | None = None, target: str | None = None,
                page: int | None = None, keep_image: bool = True) -> VLLMJob:
        t0 = time.perf_counter()
        img = load_image(image, self.max_pixels)
        text = prompt_text(prompt or self.prompt, target)
        budget = ocr_budget(img.width, img.height, self.mode)
        source = str(image) if isinstance(image, (str, Path)) else None
        del keep_image  # vLLM needs the image either way; results drop it when asked
        return VLLMJob(img, img.size, text, budget, page, source, t0, time.perf_counter() - t0)

    def generate(self, jobs: Sequence[VLLMJob], params: Any = None, keep_image: bool = True) -> list:
        """One ``llm.generate`` call for all pages (vLLM batches them); PageResults in order."""
        if not jobs:
            return []
        requests = [{"prompt": j.prompt, "multi_modal_data": {"image": j.image}} for j in jobs]
        t0 = time.perf_counter()
        outputs = self.llm.generate(requests, params if params is not None else self.sampling_params(),
                                    use_tqdm=False)
        elapsed = time.perf_counter() - t0
        results = []
        for job, out in zip(jobs, outputs):
            completion = out.outputs[0]
            raw = completion.text.removesuffix(self.tokenizer.eos_token)
            finish = "length" if completion.finish_reason == "length" else "eos"
            results.append(build_result(
                raw, job, output_tokens=len(completion.token_ids), prompt_tokens=len(out.prompt_token_ids),
                finish_reason=finish, mode=self.mode.name, decode_s=elapsed, keep_image=keep_image))
        return results

    # ------------------------------------------------------------------ OCR's interface
    def __call__(self, image: ImageSource, *, prompt: str | None = None, target: str | None = None,
                 page: int | None = None, keep_image: bool = True):
        return self.generate([self.prepare(image, prompt, target, page)], keep_image=keep_image)[0]

    def batch(self, images: Sequence[ImageSource], *, prompt: str | None = None, target: str | None = None,
              keep_image: bool = True) -> list:
        return self.generate([self.prepare(im, prompt, target) for im in images], keep_image=keep_image)

    def pdf(self, path: str | Path | bytes, dpi: float = 144, first: int = 0, last: int | None = None, *,
            password: str | None = None, keep_image: bool = False, prompt: str | None = None,
            chunk: int = 32) -> Iterator:
        """Pages in order; ``chunk`` pages go to vLLM at a time (it batches them; memory stays bounded)."""
        from optictx.render.pdf import iter_pdf_pages

        source = None if isinstance(path, (bytes, bytearray)) else str(path)
        pending: list[VLLMJob] = []
        for i, img in enumerate(iter_pdf_pages(path, dpi, first, last, password=password), start=first):
            pending.append(self.prepare(img, prompt, None, i + 1))
            if len(pending) == chunk:
                yield from self._flush(pending, source, keep_image)
                pending = []
        yield from self._flush(pending, source, keep_image)

    def _flush(self, jobs: list[VLLMJob], source: str | None, keep_image: bool) -> Iterator:
        for r in self.generate(jobs, keep_image=keep_image):
            r.source = source
            yield r

    def stream(self, image: ImageSource, *, prompt: str | None = None, target: str | None = None,
               page: int | None = None, keep_image: bool = True) -> "WholeTextStream":
        """The offline vLLM engine returns whole texts: one delta, then ``.result``."""
        return WholeTextStream(self(image, prompt=prompt, target=target, page=page, keep_image=keep_image))


class WholeTextStream:
    def __init__(self, result):
        self.result = result

    def __iter__(self) -> Iterator[str]:
        if self.result.raw:
            yield self.result.raw


def build_result(raw: str, job: VLLMJob, *, output_tokens: int, prompt_tokens: int, finish_reason: str,
                 mode: str, decode_s: float, keep_image: bool = True):
    """A ``PageResult`` from a raw model text, post-processed exactly as the torch backend does it."""
    from optictx.budget import text_tokens
    from optictx.errors import TokenizerError
    from optictx.ocr import PageBlock, PageResult, Timings, TokenCounts, plain_text
    from optictx.primitives import box_to_pixels, parse_grounding, strip_grounding

    prefix = f"{job.page}_" if job.page is not None else ""
    clean = strip_grounding(raw)
    try:
        n_text: int | None = text_tokens(clean)
    except TokenizerError:  # the DeepSeek tokenizer package is optional for inference
        n_text = None
    vision = job.budget.vision_tokens
    tokens = TokenCounts(vision=vision, decoder_slots=job.budget.decoder_slots, prompt=prompt_tokens,
                         output=output_tokens, text=n_text,
                         compression=round(n_text / vision, 4) if n_text is not None else None)
    timings = Timings(load_s=job.load_s, decode_s=decode_s, total_s=time.perf_counter() - job.t_start,
                      tokens_per_s=output_tokens / decode_s if decode_s > 0 else 0.0)
    blocks = [PageBlock(b.label, b.content, [tuple(x) for x in b.boxes_999],
                        [box_to_pixels(x, job.size) for x in b.boxes_999]) for b in parse_grounding(raw)]
    return PageResult(raw=raw, markdown=strip_grounding(raw, images=True, image_path=f"images/{prefix}{{idx}}.jpg"),
                      text=plain_text(clean), blocks=blocks, tokens=tokens, timings=timings,
                      finish_reason=finish_reason, mode=mode, size=job.size, page=job.page, source=job.source,
                      image=job.image if keep_image else None)


class VLLMEngine:
    """The server's engine on vLLM: each batch of pages is one ``llm.generate`` call."""

    backend = "vllm"

    def __init__(self, ocr: VLLMOCR):
        self.ocr = ocr
        self.model_id = ocr.model_id
        self.modes = [ocr.mode.name]
        self.default_mode = ocr.mode.name
        self.default_prompt = ocr.prompt
        self.default_max_new_tokens = ocr.max_new_tokens

    def prepare(self, image: Any, *, mode: str | None = None, prompt: str | None = None,
                target: str | None = None, page: int | None = None) -> VLLMJob:
        if mode is not None and get_mode(mode).name != self.default_mode:
            raise ConfigError(f"this server runs vLLM, which reads pages in {self.default_mode!r} mode only")
        return self.ocr.prepare(image, prompt, target, page, keep_image=False)

    def job_info(self, job: VLLMJob) -> tuple[tuple[int, int], Mode]:
        return job.size, self.ocr.mode

    def run(self, works: Sequence[Any]) -> list[Any]:
        params = [self.ocr.sampling_params(w.max_new_tokens, w.sampling.temperature, w.sampling.top_p,
                                           w.sampling.seed, w.sampling.ignore_eos) for w in works]
        results = self.ocr.generate([w.job for w in works], params, keep_image=False)
        for w, r in zip(works, results):
            if r.raw:
                w.emit(r.raw)
        return results
