"""The HTTP server: OpenAI client compatibility, /v1/ocr, dynamic batching, limits and JSON errors.

One server per module (a random micro model saved to a temp folder, uvicorn in a thread on a random
127.0.0.1 port). The model is random, so its text is junk; the tests check what must hold anyway: streams
equal non-streamed answers, counts equal ``budget``'s, bad input gets a 4xx JSON error and the server goes on.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

from optictx.budget import ocr_budget
from optictx.prompts import PAGE_SPLIT, build_prompt, prompt_text

KEY = "test-key-123"
MICRO = {
    "sam": {"width": 32, "layers": 2, "heads": 2, "global_attn_indexes": [1], "downsample_channels": [32, 64],
            "out_chans": 32},
    "clip": {"width": 64, "layers": 1, "heads": 2, "ffn_hidden_size": 128},
    "language": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2,
                 "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 4,
                 "num_experts_per_tok": 2},
}


# --------------------------------------------------------------------------- helpers (also used by test_browser)
def random_model_dir(folder: Path) -> Path:
    """A random micro DeepSeek-OCR model folder (config, safetensors, tokenizer) for the nano mode.

    EOS gets a zero logit row so greedy decoding never stops early: every answer has exactly the asked
    number of tokens, which makes counts and queue timing deterministic.
    """
    from optictx.config import ocr_tiny
    from optictx.model.vlm import DeepseekOCRForCausalLM
    from optictx.tokenizer import train_bpe
    from optictx.train.ocr_run import apply_overrides

    texts = [f"The quick brown fox {i} jumps over the lazy dog; lorem ipsum dolor sit amet." for i in range(200)]
    tok = train_bpe(texts, vocab_size=400)
    cfg = ocr_tiny()
    apply_overrides(cfg, MICRO)
    cfg.language_config.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = DeepseekOCRForCausalLM(cfg, image_token_id=tok.image_token_id)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id] = 0.0
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


class RunningServer:
    """uvicorn in a daemon thread on a socket bound to 127.0.0.1:0 (a free port, no race)."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "RunningServer":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def page_image(seed: int = 0, size: tuple[int, int] = (320, 240)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def chat_body(image: bytes, max_tokens: int = 8, **extra) -> dict:
    return {"model": "micro", "max_tokens": max_tokens, **extra,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}]}]}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return random_model_dir(tmp_path_factory.mktemp("serve") / "micro")


@pytest.fixture(scope="module")
def engine(model_dir):
    from optictx.backends import make_engine

    return make_engine("torch", str(model_dir), dtype="fp32")  # fp32 everywhere: batch == single holds exactly


@pytest.fixture(scope="module")
def server(engine):
    from optictx.serve.app import ServerSettings, create_app

    settings = ServerSettings(api_key=KEY, max_body_bytes=2 * 2 ** 20, max_pixels=1_000_000, max_pages=3,
                              max_new_tokens=4000, request_timeout_s=120, max_queue=4, max_batch=4,
                              batch_wait_ms=60)
    with RunningServer(create_app(engine, settings)) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from optictx.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(model_dir)


def assert_alive(http: httpx.Client) -> None:
    """The server still answers a real request after the bad one."""
    r = http.post("/v1/chat/completions", json=chat_body(png_bytes(page_image(9)), max_tokens=2))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def assert_error(r: httpx.Response, status: int, kind: str, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["type"] == kind and isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


# --------------------------------------------------------------------------- OpenAI client, unchanged
def test_openai_client_plain_and_stream_agree(client, tokenizer):
    image = page_image(1)
    url = data_url(png_bytes(image))
    messages = [{"role": "system", "content": "ignored"},
                {"role": "user", "content": [{"type": "text", "text": "free-ocr"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]
    [model] = [m.id for m in client.models.list().data]
    plain = client.chat.completions.create(model=model, messages=messages, max_tokens=12)
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.choices[0].finish_reason == "length"
    n_slots = ocr_budget(*image.size, "nano").decoder_slots
    n_prompt = len(build_prompt(tokenizer, prompt_text("free-ocr"), n_slots))
    assert plain.usage.prompt_tokens == n_prompt == 1 + 21 + len(tokenizer.encode("\nFree OCR."))
    assert plain.usage.completion_tokens == 12 and plain.usage.total_tokens == n_prompt + 12
    extra = plain.model_extra["optictx"]
    assert extra["raw"] == text and extra["tokens"]["vision"] == 16 and extra["tokens"]["decoder_slots"] == 21

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    deltas, finish, usage, roles = [], None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            deltas += [c.delta.content] if c.delta.content else []
            finish = c.finish_reason or finish
    assert roles == ["assistant"] and finish == "length"
    assert "".join(deltas) == text and len(deltas) > 1
    assert usage.completion_tokens == 12 and usage.prompt_tokens == n_prompt


def test_prompt_text_and_extensions(http, tokenizer):
    image = png_bytes(page_image(2))
    body = chat_body(image, max_tokens=3)
    body["messages"][0]["content"].insert(0, {"type": "text", "text": "Read it all."})
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    n_prompt = 1 + 21 + len(tokenizer.encode("\nRead it all."))
    assert r.json()["usage"]["prompt_tokens"] == n_prompt  # free text gets "<image>\n" in front
    r = http.post("/v1/chat/completions", json=chat_body(image, max_tokens=3, mode="tiny", prompt="markdown"))
    assert r.status_code == 200, r.text
    tokens = r.json()["optictx"]["tokens"]
    assert (tokens["vision"], tokens["decoder_slots"]) == (64, 73)  # tiny mode: 512 px, 8x8 + 8 newlines + 1
    assert tokens["prompt"] == 1 + 73 + len(tokenizer.encode(prompt_text("markdown").split("<image>")[1]))


def test_models_health_options_openapi(http, server, engine):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [engine.model_id]
    health = httpx.get(server.url + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["backend"] == "torch"
    opts = http.get("/v1/options").json()
    assert opts["default_mode"] == "nano" and opts["default_prompt"] == "free-ocr" and opts["auth_required"]
    assert opts["limits"]["max_pages"] == 3 and "gundam" in opts["modes"]
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/ocr", "/v1/models", "/health"} <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert httpx.get(server.url + "/").text.startswith("<!doctype html>")


# --------------------------------------------------------------------------- /v1/ocr
def test_ocr_image_matches_chat_and_budget(http):
    image = page_image(3, (500, 300))
    data = png_bytes(image)
    chat = http.post("/v1/chat/completions", json=chat_body(data, max_tokens=10)).json()
    r = http.post("/v1/ocr", files={"file": ("p.png", data, "image/png")}, data={"max_new_tokens": "10"})
    assert r.status_code == 200, r.text
    body = r.json()
    [page] = body["pages"]
    assert page["raw"] == chat["choices"][0]["message"]["content"]
    assert page["size"] == [500, 300] and page["page"] is None and page["mode"] == "nano"
    b = ocr_budget(500, 300, "nano")
    assert (page["tokens"]["vision"], page["tokens"]["decoder_slots"]) == (b.vision_tokens, b.decoder_slots)
    assert body["usage"]["completion_tokens"] == 10 and body["markdown"] == page["markdown"]


def test_ocr_stream_events(http):
    data = png_bytes(page_image(4))
    with http.stream("POST", "/v1/ocr", files={"file": ("p.png", data, "image/png")},
                     data={"max_new_tokens": "9", "stream": "true"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[1] == "page_start" and kinds[-2:] == ["page", "done"]
    assert events[1]["budget"]["vision_tokens"] == 16 and events[1]["budget"]["decoder_slots"] == 21
    page = events[-2]["result"]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == page["raw"]
    assert events[-1]["usage"]["completion_tokens"] == page["tokens"]["output"] == 9


def test_ocr_pdf_pages(http):
    a, b = page_image(5, (300, 400)), page_image(6, (300, 400))
    buf = io.BytesIO()
    a.save(buf, "PDF", save_all=True, append_images=[b], resolution=72)
    pdf = buf.getvalue()
    r = http.post("/v1/ocr", files={"file": ("doc.pdf", pdf, "application/pdf")},
                  data={"max_new_tokens": "4", "dpi": "72"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["page"] for p in body["pages"]] == [1, 2]
    assert all(p["size"] == [300, 400] for p in body["pages"])
    assert body["markdown"] == PAGE_SPLIT.join(p["markdown"] for p in body["pages"])
    r = http.post("/v1/ocr", files={"file": ("doc.pdf", pdf, "application/pdf")},
                  data={"max_new_tokens": "4", "dpi": "72", "first_page": "2"})
    assert [p["page"] for p in r.json()["pages"]] == [2]
    assert r.json()["pages"][0]["raw"] == body["pages"][1]["raw"]


# --------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_equal_single_runs(http, server):
    images = [png_bytes(page_image(20 + i)) for i in range(4)]
    single = [http.post("/v1/chat/completions", json=chat_body(im, max_tokens=6)).json() for im in images]
    before = httpx.get(server.url + "/health").json()
    with ThreadPoolExecutor(4) as pool:
        batched = list(pool.map(lambda im: http.post("/v1/chat/completions", json=chat_body(im, max_tokens=6)),
                                images))
    after = httpx.get(server.url + "/health").json()
    assert after["rows"] - before["rows"] == 4
    assert after["batches"] - before["batches"] < 4  # at least two pages shared a decode loop
    assert after["max_batch_rows"] >= 2
    for s, b in zip(single, batched):
        assert b.status_code == 200
        assert b.json()["choices"][0]["message"]["content"] == s["choices"][0]["message"]["content"]


def test_rows_keep_their_own_budgets(engine):
    """One batch, budgets 3 and 11: each row is what it would be alone, cut at its own length."""
    from optictx.serve.batching import Work

    img = page_image(30)
    alone = [engine.run([Work(engine.prepare(img), n)])[0] for n in (3, 11)]
    deltas: list[list[str]] = [[], []]
    works = [Work(engine.prepare(img), n) for n in (3, 11)]
    for i, w in enumerate(works):
        w.emit = deltas[i].append
    together = engine.run(works)
    for a, t, d in zip(alone, together, deltas):
        assert t.raw == a.raw and "".join(d) == t.raw
        assert t.tokens.output == a.tokens.output and t.finish_reason == "length"
    assert [t.tokens.output for t in together] == [3, 11]
    assert together[1].raw.startswith(together[0].raw[:1])


def test_mixed_modes_share_a_batch(engine):
    """Rows in different modes (different slot counts, so left-padded prompts) decode as they would alone."""
    from optictx.serve.batching import Work

    img = page_image(31, (700, 500))
    modes = ("nano", "tiny", "small")  # 21, 73 and 111 slots: three prompt lengths
    alone = [engine.run([Work(engine.prepare(img, mode=m), 5)])[0] for m in modes]
    together = engine.run([Work(engine.prepare(img, mode=m), 5) for m in modes])
    assert [t.raw for t in together] == [a.raw for a in alone]
    assert [t.tokens.decoder_slots for t in together] == [ocr_budget(700, 500, m).decoder_slots for m in modes]
    assert [t.mode for t in together] == list(modes)


def test_batcher_queue_is_all_or_nothing():
    from optictx.serve.batching import DynamicBatcher, QueueFullError, Work

    b = DynamicBatcher(engine=None, max_batch=2, max_queue=3)  # not started: nothing is taken
    b.submit([Work(None, 1), Work(None, 1)])
    with pytest.raises(QueueFullError, match="queue is full"):
        b.submit([Work(None, 1), Work(None, 1)])
    assert b.queued == 2
    b.submit([Work(None, 1)])
    assert b.queued == 3


# --------------------------------------------------------------------------- bad input: 4xx JSON, still serving
def test_malformed_json(http):
    r = http.post("/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request_error", "invalid_json")
    r = http.post("/v1/chat/completions", json={"messages": "not a list"})
    assert_error(r, 400, "invalid_request_error", "invalid_request")
    assert_alive(http)


def test_oversized_bodies(http, server):
    big = b"x" * (2 * 2 ** 20 + 1)
    r = http.post("/v1/ocr", files={"file": ("big.png", big, "image/png")})
    assert_error(r, 413, "request_too_large", "too_large")

    def chunks():  # no Content-Length: the limit counts bytes as they arrive
        for _ in range(3):
            yield b"y" * 2 ** 20

    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "request_too_large", "too_large")
    assert_alive(http)


@pytest.mark.parametrize("data, match", [
    (b"this is not an image", "not an image"),
    (None, "corrupt or truncated"),  # a truncated PNG
    (b"", "holds no bytes"),
])
def test_bad_images(http, data, match):
    if data is None:
        full = png_bytes(page_image(7, (200, 200)))
        data = full[: len(full) // 2]
    r = http.post("/v1/chat/completions", json=chat_body(data))
    err = assert_error(r, 400, "invalid_request_error")
    assert match in err["message"]
    assert_alive(http)


def test_image_limits_and_urls(http):
    huge = png_bytes(Image.new("RGB", (1200, 1000), "white"))  # 1.2 MP, over the server's 1 MP limit
    err = assert_error(http.post("/v1/chat/completions", json=chat_body(huge)), 400, "invalid_request_error",
                       "image_error")
    assert "1,200,000 pixels" in err["message"]
    body = chat_body(b"")
    body["messages"][0]["content"][0]["image_url"]["url"] = "https://example.com/page.png"
    err = assert_error(http.post("/v1/chat/completions", json=body), 400, "invalid_request_error")
    assert "remote image URLs are off" in err["message"]
    body["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,@@@"
    assert "base64" in assert_error(http.post("/v1/chat/completions", json=body), 400,
                                    "invalid_request_error")["message"]
    body["messages"][0]["content"] = "no image here"
    assert "exactly one image_url" in assert_error(http.post("/v1/chat/completions", json=body), 400,
                                                   "invalid_request_error")["message"]
    assert_alive(http)


def test_request_limits(http):
    image = png_bytes(page_image(8))
    assert_error(http.post("/v1/chat/completions", json=chat_body(image, max_tokens=5000)), 413,
                 "request_too_large", "input_too_large_error")
    assert_error(http.post("/v1/chat/completions", json=chat_body(image, n=2)), 400, "invalid_request_error")
    assert_error(http.post("/v1/chat/completions", json=chat_body(image, mode="huge")), 400,
                 "invalid_request_error", "config_error")
    err = assert_error(http.post("/v1/chat/completions", json={**chat_body(image), "model": "gpt-4o"}), 404,
                       "not_found_error", "model_not_found_error")
    assert "gpt-4o" in err["message"]
    assert_error(http.get("/v1/nothing-here"), 404, "not_found_error")
    assert_alive(http)


def test_bad_pdfs(http):
    pages = [page_image(i, (100, 100)) for i in range(4)]
    buf = io.BytesIO()
    pages[0].save(buf, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    r = http.post("/v1/ocr", files={"file": ("four.pdf", buf.getvalue(), "application/pdf")})
    assert "over this server's limit of 3" in assert_error(r, 413, "request_too_large")["message"]
    r = http.post("/v1/ocr", files={"file": ("bad.pdf", b"%PDF-1.7\nnot really a pdf", "application/pdf")})
    assert_error(r, 400, "invalid_request_error", "pdf_error")
    r = http.post("/v1/ocr", files={"file": ("four.pdf", buf.getvalue(), "application/pdf")},
                  data={"first_page": "9"})
    assert "not in this 4-page PDF" in assert_error(r, 400, "invalid_request_error", "pdf_error")["message"]
    assert_alive(http)


def test_api_key(server, http):
    body = chat_body(png_bytes(page_image(10)))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)
        err = assert_error(r, 401, "authentication_error", "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer" and "API key" in err["message"]
    # checked before the body is read: a wrong key with malformed JSON is still a 401
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{", headers={"Authorization": "Bearer no"})
    assert r.status_code == 401
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert_alive(http)


def test_queue_full_gives_429_and_drains(http, server):
    """A long stream holds the worker; 4 pages fill the queue; the 5th is refused; closing the stream
    cancels the long row, and the queued pages then run."""
    long_body = chat_body(png_bytes(page_image(11)), max_tokens=4000, stream=True)
    short = chat_body(png_bytes(page_image(12)), max_tokens=2)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c2:
        with c2.stream("POST", "/v1/chat/completions", json=long_body) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the long row is decoding
            assert next(line for line in lines if line.startswith("data: "))
            pool = ThreadPoolExecutor(4)
            queued = [pool.submit(http.post, "/v1/chat/completions", json=short) for _ in range(4)]
            deadline = time.monotonic() + 60
            while httpx.get(server.url + "/health").json()["queued"] < 4:
                assert time.monotonic() < deadline, "the queue never filled"
                time.sleep(0.02)
            r = http.post("/v1/chat/completions", json=short)
            err = assert_error(r, 429, "rate_limit_error", "queue_full_error")
            assert "queue is full" in err["message"]
        # leaving the block closed the stream: the long row is cancelled and the queue drains
        results = [f.result(timeout=120) for f in queued]
        pool.shutdown()
    assert [r.status_code for r in results] == [200] * 4
    assert_alive(http)


def test_request_timeout(engine):
    """A request over the timeout gets a 504 JSON error and its row stops decoding."""
    from fastapi.testclient import TestClient

    from optictx.serve.app import ServerSettings, create_app

    app = create_app(engine, ServerSettings(request_timeout_s=0.3, max_new_tokens=4000))
    with TestClient(app) as tc:
        r = tc.post("/v1/chat/completions", json=chat_body(png_bytes(page_image(13)), max_tokens=4000))
        err = assert_error(r, 504, "timeout_error", "request_timeout_error")
        assert "0.3 s" in err["message"]
        batcher = app.state.batcher
        deadline = time.monotonic() + 30
        while batcher.running:
            assert time.monotonic() < deadline, "the timed-out row kept decoding"
            time.sleep(0.02)
        r = tc.post("/v1/chat/completions", json=chat_body(png_bytes(page_image(13)), max_tokens=2))
        assert r.status_code == 200


def test_remote_urls_only_when_allowed(engine):
    """--allow-remote-urls fetches http(s) images (here from a local server); other schemes stay refused."""
    import http.server

    from fastapi.testclient import TestClient

    from optictx.serve.app import ServerSettings, create_app

    png = png_bytes(page_image(14))

    class Pages(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            found = self.path == "/page.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(png) if found else 0))
            self.end_headers()
            if found:
                self.wfile.write(png)

        def log_message(self, *args):
            pass

    pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    threading.Thread(target=pages.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{pages.server_address[1]}"
    try:
        with TestClient(create_app(engine, ServerSettings(allow_remote_urls=True))) as tc:
            body = chat_body(png, max_tokens=3)
            local = tc.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
            body["messages"][0]["content"][0]["image_url"]["url"] = base + "/page.png"
            r = tc.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == local
            for url, match in ((base + "/missing.png", "could not fetch"), ("file:///etc/passwd", "data: URL")):
                body["messages"][0]["content"][0]["image_url"]["url"] = url
                assert match in assert_error(tc.post("/v1/chat/completions", json=body), 400,
                                             "invalid_request_error")["message"]
    finally:
        pages.shutdown()


def test_serve_command_arguments():
    from optictx.cli import build_parser
    from optictx.commands.serve import settings_from_args
    from optictx.errors import ConfigError

    args = build_parser().parse_args(["serve", "--no-batching", "--max-body-mb", "1", "--api-key", "k"])
    s = settings_from_args(args)
    assert (s.host, s.port, s.max_batch, s.max_body_bytes, s.api_key) == ("127.0.0.1", 8000, 1, 2 ** 20, "k")
    with pytest.raises(ConfigError):
        settings_from_args(build_parser().parse_args(["serve", "--max-pages", "0"]))
