"""The HTTP server: OpenAI-compatible chat completions, ``/v1/ocr`` for images and PDFs, and the web page.

    app = create_app(TorchEngine(OCR("tiny")), ServerSettings(api_key="..."))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # what `optictx serve` does

Routes (all ``/v1`` routes need ``Authorization: Bearer KEY`` when a key is set):

* ``POST /v1/chat/completions`` — OpenAI format; one ``data:`` image URL; ``stream: true`` gives SSE chunks
  and ``data: [DONE]``.
* ``POST /v1/ocr`` — multipart ``file`` (image or PDF) → ``{pages: [PageResult...], markdown, usage}``;
  ``stream=true`` gives SSE events ``page_start`` / ``delta`` / ``page`` / ``done`` (what the web page reads).
* ``GET /v1/models``, ``GET /v1/options`` (modes, prompts, limits), ``GET /health``, ``GET /`` (web page),
  ``GET /openapi.json`` and ``/docs``.

Every error is ``{"error": {"message", "type", "code"}}`` with a 4xx for bad input (typed optictx errors
carry their status) and the server keeps serving. Pages from concurrent requests are decoded together by
:class:`~optictx.serve.batching.DynamicBatcher`.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from optictx.budget import ocr_budget
from optictx.errors import (ConfigError, GenerationError, ImageError, InputTooLargeError, ModelNotFoundError,
                            OptictxError, PDFError)
from optictx.serve.batching import DynamicBatcher, Engine, QueueFullError, RequestTimeoutError, Sampling, Work
from optictx.serve.schemas import (ChatCompletion, ChatCompletionRequest, ErrorResponse, Health, Limits, ModelCard,
                                   ModelList, OCRResponse, Options)

log = logging.getLogger("optictx.serve")
STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/favicon.ico")


@dataclass
class ServerSettings:
    """Limits and switches; every default is the safe one (local bind, no remote fetches)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_bytes: int = 32 * 2 ** 20
    max_pixels: int = 40_000_000
    max_pages: int = 32
    max_new_tokens: int = 8192
    request_timeout_s: float = 600.0
    max_queue: int = 64
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    allow_remote_urls: bool = False
    pdf_dpi: float = 144.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_pixels", "max_pages", "max_new_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.request_timeout_s <= 0 or self.max_queue < 0 or self.batch_wait_ms < 0:
            raise ConfigError("request_timeout_s must be > 0; max_queue and batch_wait_ms >= 0")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key must not be empty")


# --------------------------------------------------------------------------- errors
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          499: "cancelled", 504: "timeout_error"}


class AuthError(OptictxError):
    """Missing or wrong API key."""

    http_status = 401


def _snake(name: str) -> str:
    """``PDFError`` -> ``pdf_error``, ``QueueFullError`` -> ``queue_full_error``: the error's ``code``."""
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)).lower()


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code}}


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


def _optictx_error(e: OptictxError) -> tuple[int, dict[str, Any]]:
    return e.http_status, error_body(e.http_status, str(e), _snake(type(e).__name__))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OptictxError)
    async def _typed(_: Request, e: OptictxError) -> JSONResponse:
        status, body = _optictx_error(e)
        return JSONResponse(body, status_code=status, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            detail = next(err for err in errors if err.get("type") == "json_invalid")
            msg = f"the body is not valid JSON ({detail.get('ctx', {}).get('error', 'decode error')})"
            return error_response(400, msg, "invalid_json")
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}"
                 for err in errors[:5]]
        return error_response(400, "invalid request: " + "; ".join(parts), "invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), {404: "not_found", 405: "method_not_allowed",
                                                               413: "too_large"}.get(e.status_code))

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, f"internal error ({type(e).__name__}); see the server log", "internal_error")


# --------------------------------------------------------------------------- middleware (pure ASGI)
class Guard:
    """API key check and body-size limit, both before any body is read or parsed.

    The key is compared with ``hmac.compare_digest`` (constant time). The body limit trusts neither the
    client nor ``Content-Length``: bytes are counted as they arrive.
    """

    def __init__(self, app, settings: ServerSettings):
        self.app, self.settings = app, settings
        self._key = settings.api_key.encode("utf-8") if settings.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self._key is not None and path.startswith("/v1/") and not self._authorized(headers):
            return await _send_json(send, 401, error_body(401, "missing or wrong API key: send "
                                                          "'Authorization: Bearer <key>'", "invalid_api_key"))
        limit = self.settings.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_json(send, 413, _too_large(int(length), limit))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, _too_large(seen, limit)["error"]["message"])
            return message

        await self.app(scope, limited, send)

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        value = headers.get("authorization", b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)


def _too_large(size: int, limit: int) -> dict[str, Any]:
    return error_body(413, f"the request body is over {limit:,} bytes (got {size:,} so far); send a smaller "
                           "file or raise --max-body-mb", "too_large")


async def _send_json(send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


# --------------------------------------------------------------------------- inputs
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URL, or ImageError saying what is wrong with it."""
    m = _DATA_URL.match(url)
    if not m:
        raise ImageError("image_url must be a data: URL like 'data:image/png;base64,...'")
    if not m.group("b64"):
        raise ImageError("the data: URL must be base64-encoded (data:image/png;base64,...)")
    mime = (m.group("mime") or "").lower()
    if mime == "application/pdf":
        raise ImageError("PDFs are read page by page: POST them to /v1/ocr as multipart 'file'")
    try:
        data = base64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"the data: URL is not valid base64 ({e})") from None
    if not data:
        raise ImageError("the data: URL holds no bytes")
    return data


async def fetch_remote(url: str, settings: ServerSettings) -> bytes:
    """GET an http(s) image, at most ``max_body_bytes``; only called when the operator allowed it."""
    return await asyncio.to_thread(_fetch, url, settings.max_body_bytes)


def _fetch(url: str, limit: int, timeout: float = 15.0) -> bytes:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "optictx"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:  # noqa: S310 - http(s) only, checked above
            data = r.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ImageError(f"could not fetch {url}: {e}") from None
    if len(data) > limit:
        raise InputTooLargeError(f"{url} is over {limit:,} bytes")
    return data


def _last_user(req: ChatCompletionRequest):
    for m in reversed(req.messages):
        if m.role == "user":
            return m
    raise GenerationError("the request has no user message")


def chat_inputs(req: ChatCompletionRequest) -> tuple[str, str | None]:
    """(image URL, prompt or None for the default) from the last user message."""
    msg = _last_user(req)
    parts = [] if msg.content is None else ([] if isinstance(msg.content, str) else msg.content)
    texts = [msg.content] if isinstance(msg.content, str) else [p.text or "" for p in parts if p.type == "text"]
    urls = []
    for p in parts:
        if p.type == "image_url":
            ref = p.image_url
            urls.append(ref if isinstance(ref, str) else (ref.url if ref is not None else ""))
        elif p.type != "text":
            raise GenerationError(f"content part type {p.type!r} is not supported (use text and image_url)")
    if len(urls) != 1:
        raise ImageError(f"the last user message must hold exactly one image_url, found {len(urls)}")
    if req.prompt:
        return urls[0], req.prompt
    text = "\n".join(t for t in texts if t).strip()
    return urls[0], _prompt_from_text(text)


def _prompt_from_text(text: str) -> str | None:
    from optictx.prompts import PROMPTS

    if not text:
        return None
    if text.lower() in PROMPTS:
        return text.lower()
    return text if "<image>" in text else "<image>\n" + text


def _max_new(requested: int | None, engine: Engine, settings: ServerSettings) -> int:
    n = requested if requested is not None else min(engine.default_max_new_tokens, settings.max_new_tokens)
    if n > settings.max_new_tokens:
        raise InputTooLargeError(f"max_tokens {n} is over this server's limit of {settings.max_new_tokens}")
    return n


def _is_pdf(data: bytes, filename: str | None, content_type: str | None) -> bool:
    return data[:5] == b"%PDF-" or (content_type or "").lower() == "application/pdf" or \
        (filename or "").lower().endswith(".pdf")


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(results: Sequence[Any]) -> dict[str, int]:
    prompt = sum(r.tokens.prompt for r in results)
    out = sum(r.tokens.output for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": out, "total_tokens": prompt + out}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _page_image(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- the app
def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    """The ASGI app around one engine; the batcher thread starts and stops with the app's lifespan."""
    settings = settings or ServerSettings()
    batcher = DynamicBatcher(engine, settings.max_batch, settings.batch_wait_ms, settings.max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if hasattr(engine, "warmup"):  # first request as fast as the rest; load errors surface at start
            await asyncio.to_thread(engine.warmup)
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(
        title="optictx", version="0.1.0", lifespan=lifespan,
        description="DeepSeek-OCR-style OCR: OpenAI-compatible chat completions, /v1/ocr for images and PDFs, "
                    "and a web page at /. Send `Authorization: Bearer <key>` when the server has an API key.",
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                   "auto_configure": False},
    )
    app.state.engine, app.state.batcher, app.state.settings = engine, batcher, settings
    _install_error_handlers(app)
    app.add_middleware(Guard, settings=settings)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    errors = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 429, 504)}

    # ------------------------------------------------------------ helpers bound to this app
    async def prepare(image_bytes: bytes | Any, mode: str | None, prompt: str | None, target: str | None,
                      page: int | None = None):
        from optictx.preprocess import load_image

        image = image_bytes if not isinstance(image_bytes, (bytes, bytearray)) else \
            await asyncio.to_thread(load_image, image_bytes, settings.max_pixels)
        job = await asyncio.to_thread(engine.prepare, image, mode=mode, prompt=prompt, target=target, page=page)
        return image, job

    def make_works(jobs: Sequence[Any], max_new: int, sampling: Sampling, loop, sink=None) -> list[Work]:
        works = []
        for i, job in enumerate(jobs):
            w = Work(job=job, max_new_tokens=max_new, sampling=sampling)
            if sink is not None:
                w.emit = _threadsafe(loop, sink, i)
                w.future.add_done_callback(_threadsafe(loop, sink, i, done=True))
            works.append(w)
        return works

    def _room_for(n: int) -> None:
        """Refuse early (before decoding images) when the queue cannot take the request anyway."""
        if batcher.queued + n > settings.max_queue:
            raise QueueFullError(f"the server queue is full ({batcher.queued} of {settings.max_queue} pages "
                                 "waiting); retry in a moment")

    async def wait_all(works: list[Work], deadline: float) -> list[Any]:
        batcher.submit(works)
        try:
            futures = [asyncio.wrap_future(w.future) for w in works]
            return await asyncio.wait_for(asyncio.gather(*futures), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RequestTimeoutError(f"the request took longer than {settings.request_timeout_s:g} s") from None
        finally:
            for w in works:
                w.cancelled.set()

    # ------------------------------------------------------------ routes
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health", response_model=Health)
    async def health() -> dict[str, Any]:
        return {"model": engine.model_id, "backend": engine.backend, "queued": batcher.queued,
                "running": batcher.running, "batches": batcher.batches, "rows": batcher.rows,
                "max_batch_rows": batcher.max_batch_rows}

    @app.get("/v1/models", response_model=ModelList, responses=errors)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [ModelCard(id=engine.model_id, created=created).model_dump()]}

    @app.get("/v1/options", response_model=Options, responses=errors)
    async def options() -> dict[str, Any]:
        from optictx.prompts import PROMPTS

        limits = Limits(max_body_bytes=settings.max_body_bytes, max_pixels=settings.max_pixels,
                        max_pages=settings.max_pages, max_new_tokens=settings.max_new_tokens,
                        request_timeout_s=settings.request_timeout_s, max_queue=settings.max_queue,
                        max_batch=settings.max_batch)
        return {"model": engine.model_id, "backend": engine.backend, "modes": list(engine.modes),
                "default_mode": engine.default_mode, "prompts": {k: v for k, v in PROMPTS.items()},
                "default_prompt": engine.default_prompt,
                "default_max_new_tokens": min(engine.default_max_new_tokens, settings.max_new_tokens),
                "auth_required": settings.api_key is not None, "limits": limits.model_dump()}

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses=errors)
    async def chat_completions(req: ChatCompletionRequest):
        deadline = time.monotonic() + settings.request_timeout_s
        if req.model and req.model != engine.model_id:
            raise ModelNotFoundError(f"model {req.model!r} is not served here; this server has {engine.model_id!r}")
        if req.stop:
            raise GenerationError("'stop' is not supported by this server")
        url, prompt = chat_inputs(req)
        _room_for(1)
        if url.startswith("data:"):
            data = decode_data_url(url)
        elif url.startswith(("http://", "https://")):
            if not settings.allow_remote_urls:
                raise ImageError("remote image URLs are off on this server; send the image as a data: URL "
                                 "(or start the server with --allow-remote-urls)")
            data = await fetch_remote(url, settings)
        else:
            raise ImageError("image_url must be a data: URL (or http(s) when the server allows remote URLs)")
        if data[:5] == b"%PDF-":
            raise ImageError("PDFs are read page by page: POST them to /v1/ocr as multipart 'file'")
        max_new = _max_new(req.max_completion_tokens or req.max_tokens, engine, settings)
        sampling = Sampling(req.temperature or 0.0, req.top_p or 1.0, req.seed, req.ignore_eos)
        _, job = await prepare(data, req.mode, prompt, req.target)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not req.stream:
            (result,) = await wait_all(make_works([job], max_new, sampling, None), deadline)
            return {"id": cid, "object": "chat.completion", "created": now, "model": engine.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.raw},
                                 "finish_reason": _finish(result.finish_reason), "logprobs": None}],
                    "usage": _usage([result]), "optictx": result.to_dict()}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        queue: asyncio.Queue = asyncio.Queue()
        works = make_works([job], max_new, sampling, asyncio.get_running_loop(), queue)
        batcher.submit(works)  # 429 now, before the 200 of a stream is sent
        return _sse_response(chat_stream(works, queue, deadline, cid, now, include_usage))

    async def chat_stream(works, queue, deadline, cid, now, include_usage) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": engine.model_id,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                         **extra})

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for kind, _, payload in _events(queue, len(works), deadline, settings):
                if kind == "delta":
                    yield chunk({"content": payload})
                elif kind == "error":
                    yield _sse(payload)
                    return
                else:
                    yield chunk({}, _finish(payload.finish_reason), optictx=payload.to_dict())
                    if include_usage:
                        yield _sse({"id": cid, "object": "chat.completion.chunk", "created": now,
                                    "model": engine.model_id, "choices": [], "usage": _usage([payload])})
            yield "data: [DONE]\n\n"
        finally:
            for w in works:
                w.cancelled.set()

    @app.post("/v1/ocr", response_model=OCRResponse, responses=errors)
    async def ocr_file(
        file: UploadFile = File(..., description="an image (PNG, JPEG, WebP, TIFF, ...) or a PDF"),
        mode: str | None = Form(None, description="resolution mode; default: the model's own"),
        prompt: str | None = Form(None, description="prompt name (markdown, free-ocr, ...) or text with <image>"),
        target: str | None = Form(None, description="what to find, for the 'locate' prompt"),
        max_new_tokens: int | None = Form(None, ge=1, description="cap on generated tokens per page"),
        first_page: int = Form(1, ge=1, description="first PDF page to read (1-based)"),
        last_page: int | None = Form(None, ge=1, description="last PDF page to read (default: the last)"),
        dpi: float | None = Form(None, gt=0, le=600, description="PDF rendering resolution (default 144)"),
        stream: bool = Form(False, description="send SSE events (page_start, delta, page, done)"),
        return_images: bool = Form(False, description="include each rendered PDF page as a data: URL"),
    ):
        deadline = time.monotonic() + settings.request_timeout_s
        _room_for(1)
        data = await file.read()
        if not data:
            raise ImageError("the uploaded file is empty")
        max_new = _max_new(max_new_tokens, engine, settings)
        pdf = _is_pdf(data, file.filename, file.content_type)
        if pdf:
            images = await asyncio.to_thread(_render_pdf, data, first_page, last_page, dpi or settings.pdf_dpi,
                                             settings)
            pages: list[int | None] = list(range(first_page, first_page + len(images)))
        else:
            images, pages = [data], [None]
        prepared = [await prepare(im, mode, prompt, target, page) for im, page in zip(images, pages)]
        del images
        jobs = [job for _, job in prepared]
        if not stream:
            results = await wait_all(make_works(jobs, max_new, Sampling(), None), deadline)
            return {"object": "ocr.result", "model": engine.model_id, "pages": [r.to_dict() for r in results],
                    "markdown": _join_pages([r.markdown for r in results]), "usage": _usage(results)}
        heads = []
        for (image, job), page in zip(prepared, pages):
            size, m = engine.job_info(job)
            b = ocr_budget(size[0], size[1], m)
            head = {"type": "page_start", "page": page, "index": len(heads), "width": size[0], "height": size[1],
                    "mode": m.name, "budget": {"vision_tokens": b.vision_tokens, "decoder_slots": b.decoder_slots,
                                               "tiles": list(b.tiles), "valid_vision_tokens": b.valid_vision_tokens}}
            if pdf and return_images:
                head["image"] = await asyncio.to_thread(_page_image, image)
            heads.append(head)
        del prepared
        queue: asyncio.Queue = asyncio.Queue()
        works = make_works(jobs, max_new, Sampling(), asyncio.get_running_loop(), queue)
        batcher.submit(works)
        return _sse_response(ocr_stream(works, queue, heads, deadline))

    async def ocr_stream(works, queue, heads, deadline) -> AsyncIterator[str]:
        results: dict[int, Any] = {}
        try:
            yield _sse({"type": "start", "model": engine.model_id, "pages": len(works)})
            for h in heads:
                yield _sse(h)
            async for kind, i, payload in _events(queue, len(works), deadline, settings):
                if kind == "delta":
                    yield _sse({"type": "delta", "index": i, "page": heads[i]["page"], "text": payload})
                elif kind == "error":
                    yield _sse({"type": "error", "index": i, "page": heads[i]["page"], **payload})
                    return
                else:
                    results[i] = payload
                    yield _sse({"type": "page", "index": i, "page": heads[i]["page"], "result": payload.to_dict()})
            ordered = [results[i] for i in range(len(works))]
            yield _sse({"type": "done", "markdown": _join_pages([r.markdown for r in ordered]),
                        "usage": _usage(ordered)})
        finally:
            for w in works:
                w.cancelled.set()

    app.openapi = _openapi_with_bearer(app)
    return app


def _join_pages(markdowns: Sequence[str]) -> str:
    from optictx.prompts import PAGE_SPLIT

    return PAGE_SPLIT.join(markdowns)


def _render_pdf(data: bytes, first: int, last: int | None, dpi: float, settings: ServerSettings) -> list:
    from optictx.render.pdf import iter_pdf_pages, pdf_page_count

    n = pdf_page_count(data)
    last = n if last is None else last
    if first > n or last < first:
        raise PDFError(f"pages {first}..{last} are not in this {n}-page PDF")
    last = min(last, n)
    count = last - first + 1
    if count > settings.max_pages:
        raise InputTooLargeError(f"{count} pages asked, over this server's limit of {settings.max_pages} per "
                                 "request; send first_page/last_page to read a part")
    return list(iter_pdf_pages(data, dpi, first - 1, last, max_pixels=settings.max_pixels))


def _threadsafe(loop, queue: asyncio.Queue, index: int, done: bool = False):
    """A callback for the worker thread that hands an event to the request's event loop."""

    def put(item) -> None:
        event = ("done", index, item) if done else ("delta", index, item)
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is going down
            pass

    return put


async def _events(queue: asyncio.Queue, n: int, deadline: float, settings: ServerSettings):
    """Deltas and finished pages of a streamed request, in arrival order; errors become error bodies."""
    left = n
    while left:
        try:
            kind, i, payload = await asyncio.wait_for(queue.get(), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            e = RequestTimeoutError(f"the request took longer than {settings.request_timeout_s:g} s")
            yield "error", 0, _optictx_error(e)[1]
            return
        if kind == "delta":
            yield kind, i, payload
            continue
        left -= 1
        if payload.cancelled():
            continue
        exc = payload.exception()
        if exc is not None:
            err = exc if isinstance(exc, OptictxError) else None
            body = _optictx_error(err)[1] if err else error_body(500, f"internal error ({type(exc).__name__})",
                                                                  "internal_error")
            yield "error", i, body
            return
        yield "result", i, payload.result()


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _openapi_with_bearer(app: FastAPI):
    """Document the optional bearer key in the served OpenAPI schema."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "required when the server has --api-key"}
            for path, ops in schema.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
