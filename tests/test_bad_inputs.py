"""What bad input gets: tables of cases through the public API, the CLI, the batch OCR command and the server.

Every case builds its input (``badinputs``, nothing downloaded) in a fresh folder, then calls optictx once.
A bad input must end in the named ``optictx.errors`` type whose message holds the key words a user acts on;
a valid-but-odd input (CMYK, 16-bit, EXIF-rotated, ...) must give the right result. Every case runs under a
time limit (a decompression bomb is refused from its header, not decoded) and must leave the folder as it
found it: no partial output. The server cases must get a 4xx JSON error and leave the server serving; the
batch ``optictx ocr`` run must record every bad page, keep every good one and leave no temp file.
``docs/bad_inputs.md`` is generated from these tables for the README (a test keeps it in sync).

Cases marked ``xfail(strict=True)`` are real bugs in other modules, reported with their fix; a strict xfail
turns red once the bug is fixed, so the marker cannot outlive it.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import badinputs as bad
from optictx import errors as E
from optictx.budget import ocr_budget
from optictx.config import DeepseekOCRConfig, ocr_tiny, preset
from optictx.eval.metrics import normalized_edit_distance, teds
from optictx.eval.omnidocbench import score_omnidocbench
from optictx.preprocess import load_image, prepare_views
from optictx.primitives import Block, format_box, format_det, format_points, parse_grounding, strip_grounding
from optictx.render import PageStyle, render_text
from optictx.render.pdf import iter_pdf_pages, pdf_page_count, pdf_text_layer
from optictx.tokenizer import Tokenizer
from optictx.weights import from_pretrained, load_state_dict

CASE_TIMEOUT_S = 60  # generous for 2 shared cores; a bomb that got decoded would take minutes and GBs


@dataclass(frozen=True)
class Case:
    """``setup(tmp)`` writes the inputs and returns the call; ``error`` is the expected type (None: success,
    then ``check(result)`` asserts it is right); ``words`` must all appear in the message (case-insensitive).
    ``cli`` cases return an argv for ``optictx``; they must exit with the error's code and print one line."""

    id: str
    setup: Callable[[Path], Callable[[], Any]]
    error: type[E.OptictxError] | None
    words: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    bug: str | None = None  # reason for a strict xfail
    cli: bool = False
    needs: str | None = None  # a fixture whose value setup takes as its second argument


def file(name: str, data: bytes | Callable[[], bytes], call: Callable[[Path], Any]):
    """Setup that writes ``data`` to ``tmp/name`` and calls ``call(path)``."""
    def setup(tmp: Path):
        path = tmp / name
        path.write_bytes(data() if callable(data) else data)
        return lambda: call(path)
    return setup


def value(make: Callable[[], Any], call: Callable[[Any], Any]):
    """Setup for in-memory input: build it first (outside the timed call), then call with it."""
    def setup(tmp: Path):
        v = make()
        return lambda: call(v)
    return setup


def nothing(call: Callable[[Path], Any]):
    """Setup with no input file: ``call(tmp)`` (e.g. a missing path under tmp, or tmp itself)."""
    return lambda tmp: (lambda: call(tmp))


def files(contents: dict[str, bytes | str], call: Callable[[Path], Any]):
    """Setup that writes several files under tmp, then ``call(tmp)``."""
    def setup(tmp: Path):
        for name, data in contents.items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        return lambda: call(tmp)
    return setup


def pixel(xy: tuple[int, int], rgb: tuple[int, int, int], tol: int = 0, size: tuple[int, int] | None = None):
    """Check: a loaded image has ``rgb`` (± tol) at ``xy`` (and ``size`` if given)."""
    def check(img: Image.Image):
        assert img.mode == "RGB"
        assert size is None or img.size == size
        assert np.abs(np.subtract(img.getpixel(xy), rgb)).max() <= tol, img.getpixel(xy)
    return check


def equals(expected: Any):
    def check(result: Any):
        assert result == expected, result
    return check


def views_match_budget(size: tuple[int, int], grid: tuple[int, int]):
    def check(v):
        assert v.original_size == size and v.grid == grid
        b = ocr_budget(*size, v.mode)
        assert (v.crops.shape[0], v.n_slots, v.vision_tokens) == (b.n_tiles, b.decoder_slots, b.vision_tokens)
        assert v.global_view.shape == (3, 1024, 1024) and bool(v.global_view.isfinite().all())
    return check


def load_then_views(path: Path):
    return prepare_views(load_image(path), "gundam")


# --------------------------------------------------------------------------- helpers for checkpoints / configs
@pytest.fixture(scope="module")
def micro_model_dir(tmp_path_factory) -> Path:
    """A random ocr_tiny model with a small trained tokenizer, saved as a model folder (what OCR() loads)."""
    import torch

    from optictx.model.vlm import DeepseekOCRForCausalLM
    from optictx.tokenizer import train_bpe
    from optictx.weights import save_pretrained

    tok = train_bpe(["a page of text to read", "hello world"] * 10, vocab_size=300)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("micro") / "micro"
    save_pretrained(DeepseekOCRForCausalLM(ocr_tiny(), image_token_id=tok.image_token_id), ocr_tiny(), folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def micro_ocr(micro_model_dir):
    from optictx.ocr import OCR

    return OCR(micro_model_dir, max_new_tokens=2, device="cpu", dtype="float32")


def ocr_call(make: Callable[[], Any], **kw):
    """Setup (needs micro_ocr): OCR one input built by ``make``."""
    def setup(tmp: Path, ocr):
        v = make()
        return lambda: ocr(v, **kw)
    return setup


def ocr_pdf(make: Callable[[], bytes]):
    def setup(tmp: Path, ocr):
        v = make()
        return lambda: list(ocr.pdf(v))
    return setup


def model_without_tokenizer(tmp: Path, src: Path):
    from optictx.ocr import OCR

    for f in src.iterdir():
        if not f.name.startswith("tokenizer"):
            (tmp / f.name).symlink_to(f)
    return lambda: OCR(tmp, device="cpu", dtype="float32")


def checkpoint_with_config(edit: Callable[[dict], None]):
    """Setup (needs micro_model_dir): link its files into tmp, edit config.json, call from_pretrained."""
    def setup(tmp: Path, src: Path):
        for f in src.iterdir():
            (tmp / f.name).symlink_to(f)
        cfg = json.loads((src / "config.json").read_text())
        edit(cfg)
        (tmp / "config.json").unlink()
        (tmp / "config.json").write_text(json.dumps(cfg))
        return lambda: from_pretrained(tmp, dtype="float32", device="cpu")
    return setup


def set_lm(**kw):
    def edit(cfg: dict):
        cfg.update(kw)
        cfg["language_config"].update(kw)
    return edit


def hf_tokenizer_without_image(tmp: Path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    HF(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp / "tokenizer.json"))
    return lambda: Tokenizer.from_pretrained(tmp)


def good_tokenizer_with_config(config_bytes: bytes):
    def setup(tmp: Path):
        from optictx.tokenizer import train_bpe

        train_bpe(["hello world"] * 4, vocab_size=300).save(tmp)
        (tmp / "tokenizer_config.json").write_bytes(config_bytes)
        return lambda: Tokenizer.from_pretrained(tmp)
    return setup


def zero_page_after_encrypted():
    """pdfium sets no error code for a page-less document, so the message must not come from a stale one."""
    with pytest.raises(E.PDFError):
        pdf_page_count(bad.reportlab_pdf(user_password="secret"))
    return pdf_page_count(bad.zero_page_pdf())


def odb_gt(content: bytes):
    def setup(tmp: Path):
        (tmp / "pred").mkdir()
        (tmp / "gt.json").write_bytes(content)
        return lambda: score_omnidocbench(tmp / "pred", tmp / "gt.json")
    return setup


def cli(argv_for: Callable[[Path], list[str]], inputs: dict[str, bytes | Callable[[], bytes]] | None = None):
    """Setup for a CLI case: write ``inputs`` and return the argv (the test runs ``optictx.cli.main``)."""
    def setup(tmp: Path):
        for name, data in (inputs or {}).items():
            (tmp / name).write_bytes(data() if callable(data) else data)
        return lambda: argv_for(tmp)
    return setup


# --------------------------------------------------------------------------- the table
CASES: list[Case] = [
    # ---- images (load_image / prepare_views)
    Case("image: zero-byte file", file("empty.png", b"", load_image), E.ImageError, ("empty", "0 bytes")),
    Case("image: zero bytes in memory", value(lambda: b"", load_image), E.ImageError, ("empty",)),
    Case("image: truncated PNG", file("t.png", lambda: bad.truncated(bad.encode(bad.noise_image())), load_image),
         E.ImageError, ("corrupt or truncated",)),
    Case("image: truncated JPEG", file("t.jpg", lambda: bad.truncated(bad.encode(bad.noise_image(), "JPEG")),
                                       load_image), E.ImageError, ("corrupt or truncated",)),
    Case("image: JPEG cut inside its header", file("h.jpg", lambda: bad.encode(bad.noise_image(), "JPEG")[:100],
                                                   load_image), E.ImageError, ("corrupt or truncated",)),
    Case("image: random bytes", value(lambda: os.urandom(64) + b"\0" * 64, load_image), E.ImageError,
         ("not an image",)),
    Case("image: text file named .png", file("notes.png", b"just some text\n", load_image), E.ImageError,
         ("notes.png", "not an image")),
    Case("image: SVG (unsupported format)", value(lambda: b"<svg xmlns='http://www.w3.org/2000/svg'/>", load_image),
         E.ImageError, ("not an image", "unsupported format")),
    Case("image: animated GIF cut inside a frame", file("cut.gif", lambda: bad.animated_gif()[:-40], load_image),
         E.ImageError, ("corrupt or truncated",)),
    Case("image: PNG header 0xN", file("0x10.png", bad.png_zero_size(0, 10), load_image), E.ImageError,
         ("corrupt",)),
    Case("image: PNG header Nx0", file("10x0.png", bad.png_zero_size(10, 0), load_image), E.ImageError,
         ("corrupt",)),
    Case("image: PIL image 0x10", value(lambda: Image.new("RGB", (0, 10)), load_image), E.ImageError,
         ("no pixels", "0x10")),
    Case("image: decompression bomb 30000x30000 PNG", file("bomb.png", lambda: bad.png_bomb(30_000, 30_000),
                                                            load_image), E.ImageError,
         ("too large", "decompression")),
    Case("image: 9000x9000 PNG over our 64 MP guard", file("big.png", lambda: bad.png_bomb(9000, 9000), load_image),
         E.ImageError, ("81,000,000 pixels", "over the limit", "downscale")),
    Case("image: max_pixels lowered by caller", value(lambda: bad.encode(bad.noise_image(100, 100)),
                                                      lambda b: load_image(b, max_pixels=5000)),
         E.ImageError, ("10,000 pixels", "max_pixels")),
    Case("image: missing path", nothing(lambda t: load_image(t / "nope.png")), E.ImageError, ("no image file",)),
    Case("image: a directory", nothing(load_image), E.ImageError, ("no image file",)),
    Case("image: wrong type (int)", value(lambda: 42, load_image), E.ImageError, ("expected a path", "int")),
    Case("image: 1x100000 -> 9 tiles, counts = budget", file("tall.png", lambda: bad.encode(
        Image.new("RGB", (1, 100_000), "white")), load_then_views), None,
        check=views_match_budget((1, 100_000), (1, 9))),
    Case("image: 100000x1 -> 9 tiles, counts = budget", file("wide.png", lambda: bad.encode(
        Image.new("RGB", (100_000, 1), "white")), load_then_views), None,
        check=views_match_budget((100_000, 1), (9, 1))),
    Case("image: CMYK JPEG -> RGB", file("cmyk.jpg", bad.cmyk_jpeg, load_image), None,
         check=pixel((3, 3), (255, 0, 255), tol=3)),
    Case("image: 16-bit greyscale -> scaled to 8 bits, not clipped", file("g16.png", bad.gray16_png, load_image), None,
         check=lambda im: equals([(0,) * 3, (128,) * 3, (255,) * 3])([im.getpixel((x, 0)) for x in range(3)])),
    Case("image: palette PNG -> its RGB colours", file("p.png", bad.palette_png, load_image), None,
         check=pixel((0, 0), (255, 0, 0))),
    Case("image: palette with transparency -> white", file("pt.png", lambda: bad.palette_png(True), load_image),
         None, check=pixel((0, 0), (255, 255, 255))),
    Case("image: transparent black RGBA -> white", file("a.png", bad.rgba_png, load_image), None,
         check=pixel((5, 5), (255, 255, 255))),
    Case("image: transparent LA -> white", file("la.png", bad.la_png, load_image), None,
         check=pixel((5, 5), (255, 255, 255))),
    Case("image: 1-bit PNG -> RGB", file("1.png", bad.one_bit_png, load_image), None,
         check=pixel((5, 5), (255, 255, 255))),
    Case("image: 32-bit float TIFF -> grey scaled from 0..1", file("f.tif", bad.float_tiff, load_image), None,
         check=pixel((1, 1), (128, 128, 128))),
    Case("image: animated GIF -> first frame", file("anim.gif", bad.animated_gif, load_image), None,
         check=pixel((5, 5), (255, 0, 0))),
    Case("image: EXIF orientation 6 -> upright", file("exif.jpg", bad.exif_rotated_jpeg, load_image), None,
         check=lambda im: (pixel((10, 5), (0, 0, 0), tol=40, size=(20, 40))(im),
                           pixel((10, 35), (255, 255, 255), tol=40)(im))),
    Case("views: not a PIL image", value(lambda: "page.png", prepare_views), E.ImageError, ("load_image first",)),
    Case("views: unknown mode", value(lambda: Image.new("RGB", (10, 10)), lambda im: prepare_views(im, "huge")),
         E.ConfigError, ("unknown mode", "gundam")),
    Case("views: 0x10 PIL image", value(lambda: Image.new("RGB", (0, 10)), prepare_views), E.ImageError,
         ("no pixels",)),
    # ---- PDFs (pdf_page_count / iter_pdf_pages / pdf_text_layer)
    Case("pdf: zero-byte file", file("e.pdf", b"", pdf_page_count), E.PDFError, ("e.pdf", "not a pdf")),
    Case("pdf: zero bytes in memory", value(lambda: b"", pdf_page_count), E.PDFError, ("0 bytes",)),
    Case("pdf: corrupt", file("c.pdf", bad.corrupt_pdf, pdf_page_count), E.PDFError, ("not a pdf or it is corrupt",)),
    Case("pdf: truncated", file("t.pdf", lambda: bad.truncated(bad.reportlab_pdf()), lambda p: list(iter_pdf_pages(p))),
         E.PDFError, ("corrupt",)),
    Case("pdf: a PNG named .pdf", file("x.pdf", lambda: bad.encode(bad.noise_image()), pdf_page_count), E.PDFError,
         ("not a pdf",)),
    Case("pdf: encrypted, no password", file("enc.pdf", lambda: bad.reportlab_pdf(user_password="secret"),
                                             lambda p: list(iter_pdf_pages(p))), E.PDFError,
         ("encrypted", "password=")),
    Case("pdf: encrypted, wrong password", file("enc.pdf", lambda: bad.reportlab_pdf(user_password="secret"),
                                                lambda p: pdf_page_count(p, password="guess")), E.PDFError,
         ("password is wrong",)),
    Case("pdf: encrypted, right password -> pages rendered",
         file("enc.pdf", lambda: bad.reportlab_pdf(2, user_password="secret"),
              lambda p: [im.size for im in iter_pdf_pages(p, 36, password="secret")]),
         None, check=equals([(298, 421)] * 2)),
    Case("pdf: owner password only -> opens without one", value(lambda: bad.reportlab_pdf(user_password=""),
                                                                 pdf_page_count), None, check=equals(1)),
    Case("pdf: encrypted text layer", file("enc.pdf", lambda: bad.reportlab_pdf(user_password="s"), pdf_text_layer),
         E.PDFError, ("encrypted",)),
    Case("pdf: 0 pages (after an encrypted one)", nothing(lambda t: zero_page_after_encrypted()), E.PDFError,
         ("no pages",)),
    Case("pdf: page tree promises a missing page", value(bad.missing_page_pdf, lambda b: list(iter_pdf_pages(b))),
         E.PDFError, ("page 1",)),
    Case("pdf: 20000-pt page refused before rasterising", file("huge.pdf", lambda: bad.reportlab_pdf(
        pagesize=(20_000, 20_000)), lambda p: next(iter_pdf_pages(p))), E.PDFError,
        ("40000 x 40000 px", "pixel limit", "lower the dpi")),
    Case("pdf: 20000-pt page -> counted (only rasterising is refused)",
         file("huge.pdf", lambda: bad.reportlab_pdf(pagesize=(20_000, 20_000)), pdf_page_count), None,
         check=equals(1)),
    Case("pdf: page range outside", value(bad.reportlab_pdf, lambda b: list(iter_pdf_pages(b, first=3))),
         E.PDFError, ("outside the document's 1 pages",)),
    Case("pdf: dpi 0", value(bad.reportlab_pdf, lambda b: list(iter_pdf_pages(b, dpi=0))), E.PDFError, ("dpi",)),
    Case("pdf: missing path", nothing(lambda t: pdf_page_count(t / "nope.pdf")), E.PDFError, ("no such file",)),
    Case("pdf: wrong type", value(lambda: 3.5, pdf_page_count), E.PDFError, ("expected a path or bytes",)),
    # ---- text rendering
    Case("text: empty", value(lambda: "", render_text), E.RenderError, ("empty text",)),
    Case("text: negative max_pages", value(lambda: "hi", lambda t: render_text(t, max_pages=-1)), E.RenderError,
         ("max_pages",)),
    Case("text: whitespace only", value(lambda: " \n\t\r\n ", render_text), E.RenderError, ("empty text",)),
    Case("text: non-UTF-8 bytes", value(lambda: bad.NON_UTF8_TEXT, render_text), E.RenderError,
         ("must be a str", "bytes")),
    Case("text: undecodable byte kept as surrogate", value(lambda: "caf" + bad.NO_FONT_CHARS["surrogate"],
                                                           render_text), E.RenderError,
         ("no installed font", "U+DCE9")),
    Case("text: control character (NUL)", value(lambda: "hel\x00lo", render_text), E.RenderError,
         ("control characters", "U+0000")),
    Case("text: private-use character", value(lambda: "see \ue000 here", render_text), E.RenderError,
         ("no installed font", "U+E000")),
    Case("text: script no font covers (Linear B)", value(lambda: "x " + bad.NO_FONT_CHARS["linear_b"], render_text),
         E.RenderError, ("no installed font", "LINEAR B")),
    Case("text: font larger than the column", value(lambda: PageStyle(width=100, height=100, margin=10),
                                                    lambda s: render_text("hi", s.with_(font_size=90))),
         E.RenderError, ("cannot hold", "90 px")),
    Case("text: font size 0", value(lambda: 0, lambda fs: PageStyle(font_size=fs)), E.RenderError, ("font_size",)),
    Case("text: 100000x100000 page", value(lambda: 100_000, lambda s: PageStyle(width=s, height=s)),
         E.RenderError, ("100000x100000", "pixels")),
    Case("text: unknown font family", value(lambda: PageStyle(font_family="comic"), lambda s: render_text("a", s)),
         E.RenderError, ("unknown font family", "sans")),
    Case("text: Latin, Cyrillic, Greek, CJK, Arabic -> rendered, text kept",
         value(lambda: "Hello Привет Γειά 中文 مرحبا",
               lambda t: render_text(t, PageStyle(width=800, height=200, margin=10))),
         None, check=lambda pages: equals("Hello Привет Γειά 中文 مرحبا")(pages[0].text)),
    # ---- checkpoints
    Case("weights: pickle .bin", file("pytorch_model.bin", bad.pickle_checkpoint, load_state_dict), E.WeightsError,
         ("refusing", "pickle", "safetensors")),
    Case("weights: pickle named .safetensors", file("m.safetensors", bad.pickle_checkpoint, load_state_dict),
         E.WeightsError, ("pickle",)),
    Case("weights: torch.save zip named .safetensors", file("m.safetensors", bad.torch_zip_checkpoint,
                                                            load_state_dict), E.WeightsError, ("pickle",)),
    Case("weights: folder of pickles", files({"ckpt.pt": bad.pickle_checkpoint()}, load_state_dict), E.WeightsError,
         ("refusing", "ckpt.pt")),
    Case("weights: header lies about shape", file("m.safetensors", lambda: bad.lying_safetensors("shape"),
                                                  load_state_dict), E.WeightsError, ("header lies", "4000 bytes")),
    Case("weights: offsets past the end", file("m.safetensors", lambda: bad.lying_safetensors("offsets"),
                                               load_state_dict), E.WeightsError, ("outside the 16-byte",)),
    Case("weights: header length past the end", file("m.safetensors", lambda: bad.lying_safetensors("length"),
                                                     load_state_dict), E.WeightsError, ("corrupt safetensors header",)),
    Case("weights: header not JSON", file("m.safetensors", lambda: bad.lying_safetensors("json"), load_state_dict),
         E.WeightsError, ("not valid json",)),
    Case("weights: unknown dtype", file("m.safetensors", lambda: bad.lying_safetensors("dtype"), load_state_dict),
         E.WeightsError, ("unsupported dtype", "F128")),
    Case("weights: dtype of the wrong type", file("m.safetensors", lambda: bad.lying_safetensors("dtype_type"),
                                                  load_state_dict), E.WeightsError, ("unsupported dtype",)),
    Case("weights: shape of the wrong type", file("m.safetensors", lambda: bad.lying_safetensors("shape_type"),
                                                  load_state_dict), E.WeightsError, ("invalid shape",)),
    Case("weights: truncated data",
         file("m.safetensors", lambda: bad.safetensors_bytes(bad.honest_header(), b"\0" * 12), load_state_dict),
         E.WeightsError, ("outside the 12-byte",)),
    Case("weights: zero-byte file", file("m.safetensors", b"", load_state_dict), E.WeightsError,
         ("not a safetensors file",)),
    Case("weights: missing path", nothing(lambda t: load_state_dict(t / "nope")), E.WeightsError, ("no checkpoint",)),
    Case("weights: empty folder", nothing(load_state_dict), E.WeightsError, ("no *.safetensors",)),
    Case("weights: index names a missing shard", files({"model.safetensors.index.json": json.dumps(
        {"weight_map": {"w": "gone.safetensors"}})}, load_state_dict), E.WeightsError, ("gone.safetensors", "missing")),
    Case("model: unknown folder", nothing(lambda t: from_pretrained(t / "no-such-model")), E.ModelNotFoundError,
         ("no model folder",)),
    Case("model: folder without config.json", nothing(from_pretrained), E.ConfigError, ("no config.json",)),
    Case("model: config shapes disagree with weights", checkpoint_with_config(set_lm(intermediate_size=512)),
         E.WeightsError, ("wrong shape", "mlp", "[768, 256]"), needs="micro_model_dir"),
    Case("model: config has more layers than weights", checkpoint_with_config(set_lm(num_hidden_layers=5)),
         E.WeightsError, ("missing", "model.layers.4"), needs="micro_model_dir"),
    # ---- configs
    Case("config: malformed JSON", file("config.json", bad.bad_config_json("syntax"),
                                        DeepseekOCRConfig.from_json_file), E.ConfigError, ("not valid json",)),
    Case("config: not UTF-8", file("config.json", bad.bad_config_json("non_utf8"), DeepseekOCRConfig.from_json_file),
         E.ConfigError, ("not valid json",)),
    Case("config: a list, not an object", file("config.json", bad.bad_config_json("list"),
                                               DeepseekOCRConfig.from_json_file), E.ConfigError, ("json object",)),
    Case("config: heads do not divide hidden size", value(lambda: {"hidden_size": 1280, "num_attention_heads": 7},
                                                           DeepseekOCRConfig.from_dict), E.ConfigError,
         ("not divisible", "7")),
    Case("config: projector width mismatch", value(lambda: {"projector_config": {"input_dim": 100}},
                                                   DeepseekOCRConfig.from_dict), E.ConfigError,
         ("input_dim 100", "must equal")),
    Case("config: unsupported tile_tag", value(lambda: {"tile_tag": "1D"}, DeepseekOCRConfig.from_dict),
         E.ConfigError, ("tile_tag",)),
    Case("config: unknown preset", value(lambda: "huge", preset), E.ConfigError, ("unknown preset", "ocr-tiny")),
    Case("config: zero heads", value(lambda: {"num_attention_heads": 0}, DeepseekOCRConfig.from_dict), E.ConfigError,
         ("num_attention_heads",)),
    Case("config: number written as a string", value(lambda: {"hidden_size": "1280"}, DeepseekOCRConfig.from_dict),
         E.ConfigError, ("hidden_size",)),
    Case("config: language_config is a list", value(lambda: {"language_config": [1, 2]}, DeepseekOCRConfig.from_dict),
         E.ConfigError, ("language_config",)),
    Case("config: vision_config.width is a string", value(lambda: {"vision_config": {"width": "x"}},
                                                         DeepseekOCRConfig.from_dict), E.ConfigError,
         ("vision_config",)),
    # ---- tokenizers
    Case("tokenizer: missing", nothing(lambda t: Tokenizer.from_pretrained(t / "nope")), E.TokenizerError,
         ("no tokenizer.json",)),
    Case("tokenizer: malformed tokenizer.json", file("tokenizer.json", b"{oops", Tokenizer.from_pretrained),
         E.TokenizerError, ("cannot read",)),
    Case("tokenizer: no <image> token", hf_tokenizer_without_image, E.TokenizerError, ("no <image> token",)),
    Case("tokenizer: malformed tokenizer_config.json", good_tokenizer_with_config(b"{oops"), E.TokenizerError,
         ("tokenizer_config.json",)),
    # ---- grounding language and metrics
    Case("grounding: box outside 0..999", value(lambda: [(0, 0, 1000, 10)], lambda b: format_det("x", b)),
         E.PrimitiveError, ("0..999", "to_999")),
    Case("grounding: label holding a tag", value(lambda: "a<|det|>b", lambda lab: format_box(lab, [(1, 2, 3, 4)])),
         E.PrimitiveError, ("label",)),
    Case("grounding: no points", value(lambda: [], format_points), E.PrimitiveError, ("at least one",)),
    Case("grounding: garbage model output -> parsed leniently, no exception", value(
        lambda: "<|ref|><|det|>[[1,2,<|/ref|>]]]<|box|>[[9999, -5, 3" + "\x00" * 3,
        lambda t: (parse_grounding(t), strip_grounding(t), parse_grounding(None))),
        None, check=lambda r: equals(([Block("", (), "]]]\x00\x00\x00")], "]]]\x00\x00\x00", []))(r)),
    Case("metrics: TEDS ground truth without a table", value(lambda: "<p>x</p>", lambda g: teds("<table/>", g)),
         E.MetricError, ("no <table>",)),
    Case("metrics: edit distance of a non-string", value(lambda: None, lambda p: normalized_edit_distance(p, "x")),
         E.MetricError, ("two strings",)),
    Case("omnidocbench: ground truth not JSON", odb_gt(b"{"), E.MetricError, ("not valid utf-8 json",)),
    Case("omnidocbench: page without image_path", odb_gt(b'[{"layout_dets": []}]'), E.MetricError,
         ("page 0", "image_path")),
    # ---- the OCR pipeline (a random micro model: errors come before any decoding)
    Case("ocr: truncated image", ocr_call(lambda: bad.truncated(bad.encode(bad.noise_image()))), E.ImageError,
         ("corrupt or truncated",), needs="micro_ocr"),
    Case("ocr: decompression bomb", ocr_call(lambda: bad.png_bomb(30_000, 30_000)), E.ImageError, ("too large",),
         needs="micro_ocr"),
    Case("ocr: prompt without <image>", ocr_call(lambda: Image.new("RGB", (64, 64)), prompt="Read it please."),
         E.GenerationError, ("neither a known name", "<image>"), needs="micro_ocr"),
    Case("ocr: locate without a target", ocr_call(lambda: Image.new("RGB", (64, 64)), prompt="locate"),
         E.GenerationError, ("needs a target",), needs="micro_ocr"),
    Case("ocr: encrypted PDF", ocr_pdf(lambda: bad.reportlab_pdf(user_password="s")), E.PDFError, ("encrypted",),
         needs="micro_ocr"),
    Case("ocr: PDF page tree promises a missing page", ocr_pdf(bad.missing_page_pdf), E.PDFError, ("page 1",),
         needs="micro_ocr"),
    Case("ocr: CMYK JPEG -> read, counts = budget", ocr_call(bad.cmyk_jpeg), None, needs="micro_ocr",
         check=lambda r: equals((ocr_budget(20, 10, "nano").decoder_slots, (20, 10)))(
             (r.tokens.decoder_slots, r.image.size))),
    Case("ocr: model folder without a tokenizer", model_without_tokenizer, E.TokenizerError, ("no tokenizer.json",),
         needs="micro_model_dir"),
    Case("ocr: hub id not in the offline cache", nothing(lambda t: __import__("optictx.ocr").ocr.OCR(
        "nobody-here/no-such-model")), E.ModelNotFoundError, ("not in the local hugging face cache", "hf download")),
    # ---- the CLI: one error line, the error's exit code, no traceback, nothing written
    Case("cli budget: truncated image", cli(lambda t: ["budget", str(t / "t.png")],
                                            {"t.png": lambda: bad.truncated(bad.encode(bad.noise_image()))}),
         E.ImageError, ("corrupt or truncated",), cli=True),
    Case("cli budget: decompression bomb", cli(lambda t: ["budget", str(t / "bomb.png")],
                                               {"bomb.png": lambda: bad.png_bomb(30_000, 30_000)}),
         E.ImageError, ("too large",), cli=True),
    Case("cli budget: non-UTF-8 text file", cli(lambda t: ["budget", "--text", str(t / "a.txt"), "--mode", "small"],
                                                {"a.txt": bad.NON_UTF8_TEXT}), E.ConfigError, ("utf-8",), cli=True),
    Case("cli render: non-UTF-8 text file", cli(lambda t: ["render", str(t / "a.txt"), "--out", str(t / "out")],
                                                {"a.txt": bad.NON_UTF8_TEXT}), E.RenderError, ("not utf-8",), cli=True),
    Case("cli render: text no font has", cli(lambda t: ["render", str(t / "a.txt"), "--out", str(t / "out")],
                                             {"a.txt": "hello \ue000".encode()}), E.RenderError,
         ("no installed font",), cli=True),
    Case("cli render: encrypted PDF", cli(lambda t: ["render", str(t / "e.pdf"), "--out", str(t / "out")],
                                          {"e.pdf": lambda: bad.reportlab_pdf(user_password="s")}), E.PDFError,
         ("encrypted",), cli=True),
    Case("cli render: PDF whose page 2 is 20000 pt", cli(lambda t: ["render", str(t / "m.pdf"), "--out", str(t / "o")],
                                                         {"m.pdf": bad.mixed_size_pdf}), E.PDFError,
         ("page 2", "pixel limit"), cli=True),
    Case("cli eval omnidocbench: bad ground truth", cli(
        lambda t: ["eval", "omnidocbench", "--pred", str(t), "--gt", str(t / "gt.json"), "--out", str(t / "s.json")],
        {"gt.json": b"[1]"}), E.MetricError, ("page 0",), cli=True),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def _params() -> list:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else [])
            for c in CASES]


@pytest.mark.timeout(CASE_TIMEOUT_S)
@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, tmp_path: Path, monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)
    call = case.setup(tmp_path, request.getfixturevalue(case.needs)) if case.needs else case.setup(tmp_path)
    before = _snapshot(tmp_path)
    if case.cli:
        from optictx.cli import main

        argv = call()
        capsys.readouterr()
        rc = main(argv)
        out = capsys.readouterr()
        assert rc == case.error.exit_code, (rc, out)
        err_lines = [line for line in out.err.splitlines() if line.strip()]
        assert len(err_lines) == 1 and err_lines[0].startswith("optictx: error: "), out.err
        assert "Traceback" not in out.err + out.out
        message = err_lines[0]
    elif case.error is None:
        result = call()
        if case.check is not None:
            case.check(result)
        message = ""
    else:
        with pytest.raises(E.OptictxError) as info:
            call()
        assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
        message = str(info.value)
    for word in case.words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    assert _snapshot(tmp_path) == before, "the call wrote or changed files"


def test_table_is_big_and_ids_unique():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert sum(c.error is None for c in CASES) >= 10  # valid-but-odd inputs are checked for the right result


def test_bomb_generator_makes_real_images():
    """The bomb is a valid PNG: decoded in full at a small size it is all black (so the guard is what stops
    the big one, not a broken file)."""
    img = Image.open(io.BytesIO(bad.png_bomb(300, 301)))
    img.load()
    assert img.size == (300, 301) and img.getextrema() == (0, 0)
    assert len(bad.png_bomb(30_000, 30_000)) < 1_000_000  # 900 MB of pixels in under 1 MB


def test_pickle_payload_would_run_code():
    """The pickle fixture is a real exploit (so refusing it matters); we only inspect it, never load it."""
    ops = pickle.dumps(bad._Boom(), protocol=4)
    assert b"system" in ops and b"echo pwned" in ops


# --------------------------------------------------------------------------- the server
@dataclass(frozen=True)
class ServerCase:
    """``request()`` gives (method, path, TestClient kwargs); the reply must be ``status`` with a JSON error
    body whose message holds ``words``."""

    id: str
    request: Callable[[], tuple[str, str, dict]]
    status: int
    words: tuple[str, ...] = ()
    bug: str | None = None
    before: Callable[[], tuple[str, str, dict]] | None = None  # sent first (e.g. to leave a stale pdfium error)


def upload(name: str, make: Callable[[], bytes], mime: str = "application/octet-stream", **form):
    return lambda: ("POST", "/v1/ocr", {"files": {"file": (name, make(), mime)}, "data": form})


def chat(content: Any, raw: bytes | None = None):
    if raw is not None:
        return lambda: ("POST", "/v1/chat/completions", {"content": raw,
                                                           "headers": {"content-type": "application/json"}})
    body = {"model": "micro", "messages": [{"role": "user", "content": content}]}
    return lambda: ("POST", "/v1/chat/completions", {"json": body})


def data_url(mime: str, payload: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": f"data:{mime};base64,{payload}"}},
            {"type": "text", "text": "Free OCR."}]


SERVER_MAX_BODY = 2_000_000
SERVER_CASES: list[ServerCase] = [
    ServerCase("empty upload", upload("a.png", lambda: b""), 400, ("empty",)),
    ServerCase("truncated PNG", upload("a.png", lambda: bad.truncated(bad.encode(bad.noise_image()))), 400,
               ("corrupt or truncated",)),
    ServerCase("text file as an image", upload("a.png", lambda: b"hello\n" * 10, "image/png"), 400, ("not an image",)),
    ServerCase("decompression bomb", upload("b.png", lambda: bad.png_bomb(30_000, 30_000)), 400, ("too large",)),
    ServerCase("9000x9000 over the server pixel limit", upload("b.png", lambda: bad.png_bomb(9000, 9000)), 400,
               ("over the limit",)),
    ServerCase("corrupt PDF", upload("c.pdf", bad.corrupt_pdf), 400, ("corrupt",)),
    ServerCase("encrypted PDF", upload("e.pdf", lambda: bad.reportlab_pdf(user_password="s")), 400, ("encrypted",)),
    ServerCase("PDF with no pages (after an encrypted one)", upload("z.pdf", bad.zero_page_pdf), 400, ("no pages",),
               before=upload("e.pdf", lambda: bad.reportlab_pdf(user_password="s"))),
    ServerCase("PDF with a 20000-pt page", upload("h.pdf", lambda: bad.reportlab_pdf(pagesize=(20_000, 20_000))),
               400, ("pixel limit",)),
    ServerCase("PDF page range outside", upload("p.pdf", bad.reportlab_pdf, first_page="5"), 400,
               ("not in this 1-page pdf",)),
    ServerCase("PDF page tree promises a missing page", upload("m.pdf", bad.missing_page_pdf), 400, ("page",)),
    ServerCase("unknown mode", upload("a.png", lambda: bad.encode(bad.noise_image()), mode="huge"), 400,
               ("unknown mode",)),
    ServerCase("prompt without <image>", upload("a.png", lambda: bad.encode(bad.noise_image()), prompt="Read."),
               400, ("<image>",)),
    ServerCase("locate without a target", upload("a.png", lambda: bad.encode(bad.noise_image()), prompt="locate"),
               400, ("needs a target",)),
    ServerCase("max_new_tokens 0", upload("a.png", lambda: bad.encode(bad.noise_image()), max_new_tokens="0"), 400,
               ("max_new_tokens",)),
    ServerCase("max_new_tokens over the limit", upload("a.png", lambda: bad.encode(bad.noise_image()),
                                                       max_new_tokens="1000000"), 413, ("over this server's limit",)),
    ServerCase("body over the size limit", upload("big.png", lambda: b"\0" * (SERVER_MAX_BODY + 1)), 413,
               ("2,000,000",)),
    ServerCase("chat: body not JSON", chat(None, raw=b'{"messages": ['), 400, ("not valid json",)),
    ServerCase("chat: no image", chat("Free OCR."), 400, ("exactly one image_url",)),
    ServerCase("chat: data URL not base64", chat(data_url("image/png", "!!!not base64!!!")), 400, ("base64",)),
    ServerCase("chat: PDF as a data URL", chat(data_url("application/pdf", "JVBERi0=")), 400, ("/v1/ocr",)),
    ServerCase("chat: garbage image bytes", chat(data_url("image/png", "aGVsbG8gd29ybGQ=")), 400, ("not an image",)),
    ServerCase("chat: remote URL while remote fetches are off",
               chat([{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]), 400, ("data:",)),
    ServerCase("unknown route", lambda: ("GET", "/v1/nothing", {}), 404, ("not found",)),
]


@pytest.fixture(scope="module")
def server(micro_ocr):
    from fastapi.testclient import TestClient

    from optictx.serve.app import ServerSettings, create_app
    from optictx.serve.batching import TorchEngine

    app = create_app(TorchEngine(micro_ocr), ServerSettings(max_body_bytes=SERVER_MAX_BODY, max_pixels=40_000_000))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.timeout(CASE_TIMEOUT_S)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.bug)]
                                               if c.bug else []) for c in SERVER_CASES])
def test_server_bad_input(case: ServerCase, server):
    if case.before is not None:
        method, path, kw = case.before()
        server.request(method, path, **kw)
    method, path, kw = case.request()
    r = server.request(method, path, **kw)
    assert r.status_code == case.status, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["code"], err  # the OpenAI-style error body
    for word in case.words:
        assert word.lower() in err["message"].lower(), f"{word!r} not in {err['message']!r}"


def test_server_still_serves_after_bad_inputs(server):
    for case in SERVER_CASES[:3]:
        method, path, kw = case.request()
        server.request(method, path, **kw)
    assert server.get("/health").status_code == 200
    r = server.post("/v1/ocr", files={"file": ("ok.png", bad.encode(Image.new("RGB", (64, 48), "white")), "image/png")})
    assert r.status_code == 200 and r.json()["pages"][0]["tokens"]["decoder_slots"] == ocr_budget(64, 48,
                                                                                                  "nano").decoder_slots


# --------------------------------------------------------------------------- the batch OCR CLI
OCR_CLI_FILES: list[tuple[str, Callable[[], bytes], list[tuple[bool, str, str]]]] = [
    # file name, contents, per page: (ok, error type, key word)
    ("good.png", lambda: bad.encode(Image.new("RGB", (64, 48), "white")), [(True, "", "")]),
    ("empty.png", lambda: b"", [(False, "ImageError", "empty")]),
    ("trunc.jpg", lambda: bad.truncated(bad.encode(bad.noise_image(), "JPEG")), [(False, "ImageError", "truncated")]),
    ("notes.png", lambda: b"not an image\n", [(False, "ImageError", "not an image")]),
    ("bomb.png", lambda: bad.png_bomb(30_000, 30_000), [(False, "ImageError", "too large")]),
    ("corrupt.pdf", bad.corrupt_pdf, [(False, "PDFError", "corrupt")]),
    ("enc.pdf", lambda: bad.reportlab_pdf(user_password="s"), [(False, "PDFError", "encrypted")]),
    ("zero.pdf", bad.zero_page_pdf, [(False, "PDFError", "pdf")]),
    ("mixed.pdf", bad.mixed_size_pdf, [(True, "", ""), (False, "PDFError", "pixel limit")]),
]


@pytest.mark.timeout(300)
def test_ocr_cli_records_every_bad_page_and_goes_on(tmp_path, micro_model_dir, capsys):
    """One run over a folder of bad files: exit 1, one JSONL record per page (failures typed, with the key
    words), every good page kept, a markdown file per document, and no temp or half-written file left."""
    from optictx.cli import main

    src = tmp_path / "in"
    src.mkdir()
    for name, make, _ in OCR_CLI_FILES:
        (src / name).write_bytes(make())
    out = tmp_path / "out"
    rc = main(["ocr", str(src), "--out", str(out), "--model", str(micro_model_dir), "--max-new-tokens", "2",
               "--device", "cpu", "--dtype", "float32", "--quiet"])
    assert rc == 1, capsys.readouterr()
    for name, _, pages in OCR_CLI_FILES:
        stem = Path(name).stem
        records = [json.loads(line) for line in (out / f"{stem}.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [r["page"] for r in records] == list(range(1, len(pages) + 1)), (name, records)
        for rec, (ok, kind, word) in zip(records, pages):
            assert rec["ok"] is ok, (name, rec)
            if not ok:
                assert rec["error"]["type"] == kind and word in rec["error"]["message"].lower(), (name, rec["error"])
        assert (out / f"{stem}.md").is_file()
    md = (out / "mixed.md").read_text(encoding="utf-8")
    assert "page 2 failed: PDFError" in md  # the failure is recorded next to page 1's text, not instead of it
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []


@pytest.mark.timeout(300)
def test_ocr_cli_missing_pdf_page_is_a_typed_failure(tmp_path, micro_model_dir):
    from optictx.cli import main

    (tmp_path / "m.pdf").write_bytes(bad.missing_page_pdf())
    rc = main(["ocr", str(tmp_path / "m.pdf"), "--out", str(tmp_path / "out"), "--model", str(micro_model_dir),
               "--max-new-tokens", "2", "--device", "cpu", "--quiet"])
    (rec,) = [json.loads(line) for line in (tmp_path / "out" / "m.jsonl").read_text().splitlines()]
    assert rc == 1 and rec["error"]["type"] == "PDFError"


# --------------------------------------------------------------------------- the README fragment
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"


def _words(words: tuple[str, ...]) -> str:
    return ", ".join(f"“{w}”" for w in words)


def doc_markdown() -> str:
    """docs/bad_inputs.md, generated from the tables above so the README cannot drift from the tests
    (``python tests/test_bad_inputs.py`` rewrites it)."""
    out = [
        "## What bad input gets",
        "",
        "Every case below is built by `tests/test_bad_inputs.py` (generated in memory by `tests/badinputs.py`, "
        "nothing downloaded) and checked on every test run: the call ends in the named `optictx.errors` type "
        "whose message holds the quoted words, or — for valid-but-odd input — in the right result; it finishes "
        f"within {CASE_TIMEOUT_S} s (a decompression bomb is refused from its header, never decoded); and it "
        "leaves no file behind. The CLI prints one line `optictx: error: …` and exits with code 2; `optictx ocr` "
        "records a failed page in its JSONL and goes on (exit code 1); the server answers a 4xx with "
        "`{\"error\": {\"message\", \"type\", \"code\"}}` and keeps serving.",
        "",
        "Rows marked **known bug** are real defects found by this table, tracked as strict xfails (the test turns "
        "red when the bug is fixed, so the row cannot go stale).",
        "",
        f"### Library and CLI ({len(CASES)} cases)",
        "",
        "| Area | Input | Result |",
        "|---|---|---|",
    ]
    for c in CASES:
        area, _, what = c.id.partition(": ")
        if c.error is None:
            what, _, gets = what.partition(" -> ")
            result = f"accepted → {gets}"
        else:
            result = f"`{c.error.__name__}`: {_words(c.words)}"
            if c.cli:
                result = f"exit {c.error.exit_code}, one line; {result}"
        if c.bug:
            result = f"**known bug** — should be {result}; today: {c.bug}"
        out.append(f"| {area} | {what} | {result} |")
    out += ["", f"### Server: `POST /v1/ocr` and `/v1/chat/completions` ({len(SERVER_CASES)} cases)", "",
            "| Request | Status | Message holds |", "|---|---|---|"]
    for c in SERVER_CASES:
        status = f"{c.status}" + (f" — **known bug**: {c.bug}" if c.bug else "")
        out.append(f"| {c.id} | {status} | {_words(c.words)} |")
    out += ["", "### Batch OCR: `optictx ocr FOLDER --out DIR` over one folder of bad files", "",
            "Exit code 1; one JSONL record per page; good pages kept; a markdown file per document; no temp file left.",
            "", "| File | Record per page |", "|---|---|"]
    for name, _, pages in OCR_CLI_FILES:
        recs = "; ".join("ok" if ok else f"`{kind}` (“{word}”)" for ok, kind, word in pages)
        out.append(f"| `{name}` | {recs} |")
    return "\n".join(out) + "\n"


def test_readme_fragment_lists_every_case():
    assert DOC.read_text(encoding="utf-8") == doc_markdown(), "run: python tests/test_bad_inputs.py"


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(doc_markdown(), encoding="utf-8")
    print(f"wrote {DOC}")

