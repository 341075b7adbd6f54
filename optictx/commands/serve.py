"""`optictx serve`: the OpenAI-compatible HTTP server and the web page.

    optictx serve                                   # bundled tiny model on http://127.0.0.1:8000
    optictx serve --model deepseek-ai/DeepSeek-OCR --backend vllm --api-key $KEY
    optictx serve --host 0.0.0.0 --api-key $KEY     # reachable from other machines: set a key

Then open http://127.0.0.1:8000/ or point any OpenAI client at http://127.0.0.1:8000/v1.
"""
from __future__ import annotations

import argparse
import os
import sys

from optictx.errors import ConfigError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible OCR server with dynamic batching and a web page",
        description="Serve a model over HTTP: /v1/chat/completions (OpenAI format, streaming), /v1/ocr (images "
                    "and PDFs), /v1/models, /health, the web page at / and the OpenAPI schema at /docs. Binds "
                    "127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--model", default="tiny", help="'tiny' (bundled), a model folder or a hub id")
    p.add_argument("--backend", default="torch", choices=["torch", "vllm"],
                   help="torch: our model code (CPU/GPU); vllm: official weights on an NVIDIA GPU")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("OPTICTX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $OPTICTX_API_KEY)")
    p.add_argument("--mode", default=None, help="default resolution mode (default: the model's own)")
    p.add_argument("--prompt", default=None, help="default prompt name or text (default: the model's own)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (torch backend)")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp32 (torch backend)")
    p.add_argument("--ngram-size", type=int, default=30, help="windowed no-repeat n-gram size (0 = off)")
    p.add_argument("--window-size", type=int, default=90, help="window of the n-gram guard")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-body-mb", type=float, default=32, help="largest request body (default 32 MB)")
    limits.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image or PDF page, in pixels")
    limits.add_argument("--max-pages", type=int, default=32, help="most PDF pages per request")
    limits.add_argument("--max-new-tokens", type=int, default=8192, help="cap on generated tokens per page")
    limits.add_argument("--timeout", type=float, default=600, help="request timeout in seconds")
    limits.add_argument("--max-queue", type=int, default=64, help="pages allowed to wait; more get HTTP 429")
    batching = p.add_argument_group("batching")
    batching.add_argument("--max-batch", type=int, default=8, help="pages decoded together (default 8)")
    batching.add_argument("--batch-wait-ms", type=float, default=5, help="how long to wait for more pages")
    batching.add_argument("--no-batching", action="store_true", help="decode one page at a time")
    p.add_argument("--allow-remote-urls", action="store_true",
                   help="let chat requests name http(s) image URLs (the server then fetches them)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from optictx.serve.app import ServerSettings

    if args.max_body_mb <= 0:
        raise ConfigError("--max-body-mb must be positive")
    return ServerSettings(
        host=args.host, port=args.port, api_key=args.api_key, max_body_bytes=int(args.max_body_mb * 2 ** 20),
        max_pixels=args.max_pixels, max_pages=args.max_pages, max_new_tokens=args.max_new_tokens,
        request_timeout_s=args.timeout, max_queue=args.max_queue,
        max_batch=1 if args.no_batching else args.max_batch, batch_wait_ms=args.batch_wait_ms,
        allow_remote_urls=args.allow_remote_urls,
    )


def engine_from_args(args: argparse.Namespace, settings):
    from optictx.backends import make_engine

    kw = dict(mode=args.mode, prompt=args.prompt, ngram_size=args.ngram_size, window_size=args.window_size,
              max_pixels=settings.max_pixels)
    if args.backend == "torch":
        kw.update(device=args.device, dtype=args.dtype)
    return make_engine(args.backend, args.model, **kw)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from optictx.serve.app import create_app

    settings = settings_from_args(args)
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a TCP port")
    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"optictx serve: warning: binding {args.host} without --api-key; anyone who can reach this port "
              "can use the model", file=sys.stderr)
    engine = engine_from_args(args, settings)
    app = create_app(engine, settings)
    print(f"optictx serve: {engine.model_id} ({engine.backend}) on http://{args.host}:{args.port}/  "
          f"(OpenAI base URL http://{args.host}:{args.port}/v1)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug")
    return 0
