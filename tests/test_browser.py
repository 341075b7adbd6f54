"""The web page in headless Chromium: upload a rendered page (and a PDF), watch the text stream in, check
it against the API and the budget numbers against ``optictx.budget``, and save screenshots.

Runs in ``make test``; skips (with the reason) only when Playwright or the Debian chromium binary is missing
(``scripts/system_deps.sh`` installs it).
"""
from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest

from optictx.budget import ocr_budget, text_tokens
from optictx.primitives import strip_grounding

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
KEY = "browser-key"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_serve import RunningServer, random_model_dir

    from optictx.backends import make_engine
    from optictx.serve.app import ServerSettings, create_app

    folder = random_model_dir(tmp_path_factory.mktemp("browser") / "micro")
    app = create_app(make_engine("torch", str(folder), dtype="fp32"), ServerSettings(api_key=KEY, max_new_tokens=64))
    with RunningServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def page(server):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing; run scripts/system_deps.sh (Debian chromium) to enable this test")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (pip install -e .[dev])")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        context = browser.new_context(viewport={"width": 1300, "height": 900})
        tab = context.new_page()
        tab.set_default_timeout(180_000)  # generous: CI shares 2 cores with the rest of the suite
        yield tab
        context.close()
        browser.close()


def api_raw(server, data: bytes, name: str, mime: str) -> list[dict]:
    """What /v1/ocr returns for the same file and settings as the page uses."""
    r = httpx.post(server.url + "/v1/ocr", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                   files={"file": (name, data, mime)},
                   data={"mode": "nano", "prompt": "free-ocr", "max_new_tokens": str(MAX_TOKENS)})
    assert r.status_code == 200, r.text
    return r.json()["pages"]


def read_page(tab, index: int) -> dict:
    card = tab.locator(f"#page-{index}")
    fields = {name: card.locator(f'[data-field="{name}"]').text_content()
              for name in ("vision", "slots", "text", "compression", "output", "finish")}
    stream = card.locator(".stream")
    canvas = card.locator("canvas")
    return {"fields": fields, "stream": stream.text_content(), "deltas": int(stream.get_attribute("data-deltas")),
            "complete": card.get_attribute("data-stream-complete"),
            "canvas": (int(canvas.evaluate("c => c.width")), int(canvas.evaluate("c => c.height")))}


def check_budget(shown: dict, width: int, height: int, raw: str) -> None:
    b = ocr_budget(width, height, "nano")
    n_text = text_tokens(strip_grounding(raw))
    assert int(shown["vision"]) == b.vision_tokens == 16
    assert int(shown["slots"]) == b.decoder_slots == 21
    assert int(shown["text"]) == n_text
    assert float(shown["compression"].rstrip("×")) == round(n_text / b.vision_tokens, 4)
    assert int(shown["output"]) == MAX_TOKENS and shown["finish"] == "length"


def test_page_streams_an_image(server, page, tmp_path):
    from optictx.render import PageStyle, render_text

    rendered = render_text("Optical compression: a page of text read back from 16 vision tokens.",
                           PageStyle(width=420, height=300, margin=24, font_size=18))[0]
    path = tmp_path / "page.png"
    rendered.image.save(path)

    page.goto(server.url + "/")
    page.locator("#key-box").wait_for(state="visible")  # /v1/options said 401: the page asks for the key
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.querySelectorAll('#mode option').length > 0")
    assert page.input_value("#mode") == "nano" and page.input_value("#prompt") == "free-ocr"
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.set_input_files("#file", str(path))
    page.click("#run")
    page.wait_for_selector('#results[data-state="done"]')

    shown = read_page(page, 0)
    [expected] = api_raw(server, path.read_bytes(), "page.png", "image/png")
    assert shown["stream"] == expected["raw"] and shown["complete"] == "true"
    assert shown["deltas"] > 1  # it arrived piece by piece, not in one block
    check_budget(shown["fields"], 420, 300, expected["raw"])
    assert shown["canvas"] == (420, 300)  # the page is drawn (at most 900 px wide)
    out = tmp_path / "out"
    out.mkdir()
    page.screenshot(path=str(out / "web-image.png"), full_page=True)
    assert (out / "web-image.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_streams_a_pdf(server, page, tmp_path):
    from PIL import Image

    pages = [Image.new("RGB", (200, 150), c) for c in ("white", "lightgray")]
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    path = tmp_path / "doc.pdf"
    path.write_bytes(buf.getvalue())

    if not page.url.startswith(server.url):
        page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#mode option').length > 0")
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.set_input_files("#file", str(path))
    page.click("#run")
    page.wait_for_selector('#results[data-state="done"]')

    expected = api_raw(server, path.read_bytes(), "doc.pdf", "application/pdf")
    assert page.locator(".page").count() == len(expected) == 2
    for i, exp in enumerate(expected):
        shown = read_page(page, i)
        assert shown["stream"] == exp["raw"] and shown["complete"] == "true"
        w, h = exp["size"]
        assert (w, h) == (400, 300)  # 200x150 pt rendered at the server's 144 DPI
        check_budget(shown["fields"], w, h, exp["raw"])
        assert shown["canvas"] == (400, 300)  # the server sent the rendered page for the canvas
    page.screenshot(path=str(tmp_path / "web-pdf.png"), full_page=True)
