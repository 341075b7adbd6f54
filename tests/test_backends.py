"""Optional backends: vLLM (GPU) and Ray Data batch OCR.

Neither vLLM nor Ray is installed by ``make test``. What always runs: the clear-error paths, the vLLM glue
(prompts, sampling parameters, post-processing) against a stand-in engine, and every Ray pipeline stage as
plain functions. What runs only where the packages (and a GPU with the official weights) exist: the vLLM vs
torch comparison and a real local Ray run.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from optictx.backends import BackendUnavailableError
from optictx.budget import get_mode, ocr_budget
from optictx.errors import ConfigError

HAS_RAY = importlib.util.find_spec("ray") is not None
HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    from test_serve import random_model_dir

    return random_model_dir(tmp_path_factory.mktemp("backends") / "micro")


def noise(seed: int, size=(300, 200)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")


def pdf_bytes(images) -> bytes:
    buf = io.BytesIO()
    images[0].save(buf, "PDF", save_all=True, append_images=list(images[1:]), resolution=72)
    return buf.getvalue()


# --------------------------------------------------------------------------- vLLM: clear errors
def test_vllm_missing_is_a_clear_error(monkeypatch, capsys):
    from optictx.backends import make_ocr
    from optictx.backends.vllm_backend import require_vllm
    from optictx.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(BackendUnavailableError, match=r"pip install 'optictx\[vllm\]'"):
        require_vllm()
    with pytest.raises(BackendUnavailableError, match="vLLM, which is not installed"):
        make_ocr("vllm", "deepseek-ai/DeepSeek-OCR")
    assert main(["serve", "--backend", "vllm", "--model", "deepseek-ai/DeepSeek-OCR"]) == 3
    assert "optictx[vllm]" in capsys.readouterr().err


def _fake_vllm(monkeypatch, version: str = "0.11.1", with_model: bool = True) -> types.ModuleType:
    """A stand-in ``vllm`` package: version, SamplingParams that records its arguments, the model module."""
    vllm = types.ModuleType("vllm")
    vllm.__version__ = version

    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw

    vllm.SamplingParams = SamplingParams
    vllm.LLM = lambda **kw: pytest.fail("the test hands in its own engine")
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    if with_model:
        mod = types.ModuleType("vllm.model_executor.models.deepseek_ocr")
        mod.NGramPerReqLogitsProcessor = type("NGramPerReqLogitsProcessor", (), {})
        for name in ("vllm.model_executor", "vllm.model_executor.models"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "vllm.model_executor.models.deepseek_ocr", mod)
    else:
        monkeypatch.setitem(sys.modules, "vllm.model_executor.models.deepseek_ocr", None)
    return vllm


def test_vllm_too_old_or_without_gpu(monkeypatch):
    from optictx.backends.vllm_backend import require_vllm

    _fake_vllm(monkeypatch, "0.8.5")
    with pytest.raises(BackendUnavailableError, match="0.8.5 is too old"):
        require_vllm()
    _fake_vllm(monkeypatch, "0.11.1", with_model=False)
    with pytest.raises(BackendUnavailableError, match="no DeepSeek-OCR model class"):
        require_vllm()
    _fake_vllm(monkeypatch, "0.12.0rc1.dev7+gabc")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU"):
        require_vllm()


def test_vllm_refuses_what_its_processor_cannot_do(monkeypatch, micro):
    from optictx.backends.vllm_backend import VLLMOCR

    with pytest.raises(ConfigError, match="--backend torch"):
        VLLMOCR("tiny")
    _fake_vllm(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="Gundam mode only"):
        VLLMOCR(str(micro), mode="small", llm=object())


# --------------------------------------------------------------------------- vLLM: the glue, on a stand-in engine
class StandInLLM:
    """Answers like ``vllm.LLM.generate``: one RequestOutput-like object per request."""

    def __init__(self, text: str, tokenizer, finish: str = "stop"):
        self.text, self.tok, self.finish = text, tokenizer, finish
        self.calls: list = []

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append((requests, params))
        outs = []
        for req in requests:
            image = req["multi_modal_data"]["image"]
            slots = ocr_budget(image.width, image.height, get_mode("gundam", max_crops=6)).decoder_slots
            prompt_ids = [0] * (1 + slots + len(self.tok.encode(req["prompt"].split("<image>")[1])))
            completion = types.SimpleNamespace(text=self.text, token_ids=list(range(7)), finish_reason=self.finish)
            outs.append(types.SimpleNamespace(outputs=[completion], prompt_token_ids=prompt_ids))
        return outs


def test_vllm_glue_prompts_sampling_and_results(monkeypatch, micro):
    from optictx.backends.vllm_backend import VLLMEngine, VLLMOCR
    from optictx.prompts import PROMPTS
    from optictx.serve.batching import Sampling, Work
    from optictx.tokenizer import Tokenizer

    _fake_vllm(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tok = Tokenizer.from_pretrained(micro)
    raw = "<|ref|>title<|/ref|><|det|>[[100, 200, 899, 300]]<|/det|>\n# Hello\n\n" \
          "<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\nworld"
    llm = StandInLLM(raw, tok)
    ocr = VLLMOCR(str(micro), llm=llm)
    page = noise(1, (1190, 1684))  # A4 at 144 DPI: Gundam with max 6 tiles -> 2 x 3
    result = ocr(page)

    [(requests, params)] = llm.calls
    assert requests[0]["prompt"] == PROMPTS["markdown"] and requests[0]["multi_modal_data"]["image"].size == page.size
    assert params.kw["temperature"] == 0.0 and params.kw["skip_special_tokens"] is False
    assert params.kw["max_tokens"] == 8192
    whitelist = {tok.token_id("<td>"), tok.token_id("</td>")}
    assert params.kw["extra_args"] == {"ngram_size": 30, "window_size": 90, "whitelist_token_ids": whitelist}

    b = ocr_budget(1190, 1684, get_mode("gundam", max_crops=6))
    assert b.tiles == (2, 3) and (b.vision_tokens, b.decoder_slots) == (856, 903)
    assert (result.tokens.vision, result.tokens.decoder_slots) == (856, 903)
    assert result.tokens.prompt == 1 + 903 + len(tok.encode("\n<|grounding|>Convert the document to markdown."))
    assert result.tokens.output == 7 and result.finish_reason == "eos" and result.mode == "gundam"
    assert [b.label for b in result.blocks] == ["title", "text"]
    assert result.blocks[0].boxes_px == [(119, 337, 1070, 505)]  # int(v / 999 * W or H), W x H = 1190 x 1684
    assert result.markdown == "# Hello\n\nworld" and "<|" not in result.text

    # the server engine: one llm.generate per batch, per-row settings, the text as one delta
    engine = VLLMEngine(ocr)
    assert engine.modes == ["gundam"]
    deltas: list[str] = []
    work = Work(engine.prepare(noise(2)), 33, Sampling(temperature=0.5, seed=3), emit=deltas.append)
    [r] = engine.run([work])
    assert deltas == [raw] and r.raw == raw
    assert llm.calls[-1][1][0].kw["max_tokens"] == 33 and llm.calls[-1][1][0].kw["seed"] == 3
    with pytest.raises(ConfigError, match="'gundam' mode only"):
        engine.prepare(noise(2), mode="base")


@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()), reason="needs vLLM >= 0.11.1 and an NVIDIA GPU")
def test_vllm_matches_torch_backend_on_gpu():
    """Official weights through both backends on the same pages: same views and prompt, near-same text."""
    from optictx.backends.vllm_backend import VLLMOCR, vllm_mode
    from optictx.eval.metrics import normalized_edit_distance
    from optictx.ocr import OCR
    from optictx.render import PageStyle, render_text
    from optictx.weights import resolve_model_path

    model = os.environ.get("OPTICTX_VLLM_MODEL", "deepseek-ai/DeepSeek-OCR")
    try:
        resolve_model_path(model)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"official weights not available offline ({e}); set OPTICTX_VLLM_MODEL to a local folder")
    text = "Context optical compression reads a page of text from a few hundred vision tokens.\n" * 6
    pages = [p.image for p in render_text(text, PageStyle(width=1190, height=1684, font_size=28))[:1]]
    pages.append(pages[0].crop((0, 0, 1190, 842)))
    vllm_ocr = VLLMOCR(model, prompt="free-ocr", max_new_tokens=256, gpu_memory_utilization=0.5)
    torch_ocr = OCR(model, mode=vllm_mode(), prompt="free-ocr", device="cuda", dtype="bf16", max_new_tokens=256)
    for page in pages:
        a, b = vllm_ocr(page), torch_ocr(page)
        assert a.tokens.prompt == b.tokens.prompt and a.tokens.decoder_slots == b.tokens.decoder_slots
        assert normalized_edit_distance(a.text, b.text) < 0.1, (a.text, b.text)


# --------------------------------------------------------------------------- Ray
def test_ray_missing_is_a_clear_error(monkeypatch, tmp_path):
    from optictx.backends.ray_batch import require_ray, run_ray_ocr

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'optictx\[ray\]'"):
        require_ray()
    with pytest.raises(BackendUnavailableError, match="Ray Data"):
        run_ray_ocr([str(tmp_path)], tmp_path / "out")


def make_inputs(folder: Path) -> tuple[list[Image.Image], Path]:
    """scans/a.png, scans/doc.pdf (2 pages), scans/sub/broken.png; returns the page images in order."""
    scans = folder / "scans"
    (scans / "sub").mkdir(parents=True)
    a, p1, p2 = noise(10), noise(11, (200, 150)), noise(12, (200, 150))
    a.save(scans / "a.png")
    (scans / "doc.pdf").write_bytes(pdf_bytes([p1, p2]))
    (scans / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (scans / "notes.txt").write_text("not an image")
    return [a, p1, p2], scans


def test_ray_stages_as_plain_functions(micro, tmp_path):
    """Every stage of the Ray pipeline, run in-process: pages, rasterising, the actor, rows, resume."""
    from optictx.backends.ray_batch import (COLUMNS, JSONL_NAME, OCRActor, RowWriter, done_pages, expand_pages,
                                            list_inputs, page_key, rasterise)
    from optictx.ocr import OCR

    _, scans = make_inputs(tmp_path)
    files = list_inputs([scans])
    assert [(Path(p).name, k) for p, k in files] == [("a.png", "image"), ("doc.pdf", "pdf"), ("broken.png", "image")]
    with pytest.raises(ConfigError, match="neither an image nor a PDF"):
        list_inputs([scans / "notes.txt"])
    pdf = str(scans / "doc.pdf")
    rows = [r for doc, kind in files for r in expand_pages({"doc": doc, "kind": kind})]
    assert [(Path(r["doc"]).name, r["page"]) for r in rows] == [("a.png", 1), ("doc.pdf", 1), ("doc.pdf", 2),
                                                                 ("broken.png", 1)]
    assert [r["page"] for r in expand_pages({"doc": pdf, "kind": "pdf"}, frozenset({page_key(pdf, 1)}))] == [2]
    rows = [rasterise(r, dpi=72) for r in rows]
    assert [bool(r["error_type"]) for r in rows] == [False, False, False, True]
    assert Image.open(io.BytesIO(rows[1]["png"])).size == (200, 150)

    actor = OCRActor("torch", str(micro), {"max_new_tokens": 5, "dtype": "fp32"})
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    out = actor(batch)
    assert set(out) == set(COLUMNS) and out["ok"] == [True, True, True, False]
    assert out["error_type"][3] == "ImageError"
    direct = OCR(str(micro), max_new_tokens=5, dtype="fp32")
    assert out["raw"][1] == direct(Image.open(io.BytesIO(rows[1]["png"]))).raw
    assert out["output_tokens"][:3] == [5, 5, 5] and out["vision_tokens"][0] == 16

    writer = RowWriter(tmp_path, "jsonl")
    for i in range(4):
        writer.write({k: out[k][i] for k in COLUMNS})
    with open(tmp_path / JSONL_NAME, "ab") as f:
        f.write(b'{"doc": "torn line')  # a crash mid-write
    assert done_pages(tmp_path, "jsonl") == {page_key(r["doc"], r["page"]) for r in rows[:3]}
    lines = (tmp_path / JSONL_NAME).read_text().splitlines()
    assert json.loads(lines[0])["blocks"] == "[]" and len(lines) == 5


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow comes with optictx[ray]; not installed here")
def test_ray_parquet_rows(micro, tmp_path):
    import pyarrow.parquet as pq

    from optictx.backends.ray_batch import COLUMNS, RowWriter, done_pages, flat_record

    writer = RowWriter(tmp_path, "parquet", rows_per_file=2)
    for page in (1, 2, 3):
        writer.write(flat_record({"doc": "d.pdf", "page": page, "error_type": "X", "error_message": "m"}))
    writer.flush()
    assert len(writer.files) == 2 and pq.read_table(writer.files[0]).column_names == list(COLUMNS)
    assert done_pages(tmp_path, "parquet") == set()  # error rows are not done: a resume retries them


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'optictx[ray]'); make test does not")
def test_ray_local_run_and_resume(micro, tmp_path):
    import ray

    from optictx.backends.ray_batch import JSONL_NAME, run_ray_ocr
    from optictx.ocr import OCR
    from optictx.render.pdf import iter_pdf_pages

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        images, scans = make_inputs(tmp_path)
        first = run_ray_ocr([scans], tmp_path / "out", model=str(micro), dpi=72, batch_size=2, max_new_tokens=4)
        assert (first.pages, first.ok, first.failed, first.skipped) == (4, 3, 1, 0)
        rows = [json.loads(line) for line in (tmp_path / "out" / JSONL_NAME).read_text().splitlines()]
        by_page = {(Path(r["doc"]).name, r["page"]): r for r in rows}
        direct = OCR(str(micro), max_new_tokens=4)
        pdf_pages = list(iter_pdf_pages(scans / "doc.pdf", 72))
        for (name, page), image in zip([("a.png", 1), ("doc.pdf", 1), ("doc.pdf", 2)], [images[0], *pdf_pages]):
            assert by_page[(name, page)]["raw"] == direct(image).raw
        assert by_page[("broken.png", 1)]["ok"] is False
        again = run_ray_ocr([scans], tmp_path / "out", model=str(micro), dpi=72, max_new_tokens=4)
        assert (again.pages, again.ok, again.failed, again.skipped) == (1, 0, 1, 3)  # only the broken page retried
    finally:
        ray.shutdown()
