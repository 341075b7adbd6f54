"""Server throughput: dynamic batching vs one-page-at-a-time, same server process, same requests.

    python benchmarks/serve.py                     # bundled tiny model if present, else a random one of its shape
    python benchmarks/serve.py --requests 64 --concurrency 8 --tokens 32

Starts `optictx serve` twice as a subprocess on 127.0.0.1 (a free port each time): once with batching
(``--max-batch 8``) and once with ``--no-batching``. Both get the same ``--requests`` chat requests (distinct
rendered pages, ``max_tokens`` with ``ignore_eos`` so every answer has the same length) from
``--concurrency`` client threads. Prints requests/s, generated tokens/s, p50/p99 latency and the ratio.
Bounded: a fixed request count and a per-run time limit.
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_folder(choice: str, workdir: Path) -> tuple[str, str]:
    """(model argument for `optictx serve`, what it is): the bundled model, a given one, or a random ocr-tiny."""
    from optictx.weights import BUNDLED_DIR

    if choice != "auto":
        return choice, choice
    if (BUNDLED_DIR / "ocr-tiny" / "config.json").is_file():
        return "tiny", "bundled ocr-tiny"
    import torch

    from optictx.config import ocr_tiny
    from optictx.model.vlm import DeepseekOCRForCausalLM
    from optictx.tokenizer import train_bpe

    texts = [f"Benchmark page {i}: the quick brown fox jumps over the lazy dog." for i in range(500)]
    tok = train_bpe(texts, vocab_size=1024)
    cfg = ocr_tiny()
    cfg.language_config.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    folder = workdir / "ocr-tiny-random"
    DeepseekOCRForCausalLM(cfg, image_token_id=tok.image_token_id).save_pretrained(folder)
    tok.save(folder)
    return str(folder), "random weights in the ocr-tiny shape (bundled model not trained yet)"


def pages(n: int) -> list[str]:
    """n distinct rendered pages as PNG data URLs."""
    from optictx.render import PageStyle, render_text

    urls = []
    for i in range(n):
        text = f"Request {i}. Optical compression stores long context as pixels and reads it back. " * 3
        img = render_text(text, PageStyle(width=480, height=360, margin=24, font_size=16))[0].image
        buf = io.BytesIO()
        img.save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
    return urls


def start_server(model: str, port: int, batching: bool, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "optictx.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--max-queue", "256"]
    cmd += ["--max-batch", str(max_batch)] if batching else ["--no-batching"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_THREAD_LIMIT=os.environ.get("OMP_THREAD_LIMIT", "1"))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not start in time")


def run(model: str, urls: list[str], batching: bool, args) -> dict:
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(model, port, batching, args.max_batch)
    try:
        wait_ready(proc, base)
        with httpx.Client(base_url=base, timeout=args.time_limit) as client:
            def one(url: str) -> float:
                body = {"max_tokens": args.tokens, "ignore_eos": True,
                        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
                t = time.perf_counter()
                r = client.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                assert r.json()["usage"]["completion_tokens"] == args.tokens
                return time.perf_counter() - t

            one(urls[0])  # warm the connection pool; the server warmed itself at start
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                latencies = list(pool.map(one, urls))
            wall = time.perf_counter() - t0
            health = client.get("/health").json()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = sorted(latencies)
    return {"wall_s": wall, "req_s": len(urls) / wall, "tok_s": len(urls) * args.tokens / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
            "batches": health["batches"] - 1, "max_batch_rows": health["max_batch_rows"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="auto", help="model for `optictx serve --model` (default: bundled or random)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32, help="generated tokens per request (ignore_eos)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=600, help="seconds allowed per request")
    args = p.parse_args()
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model, what = model_folder(args.model, Path(tmp))
        urls = pages(args.requests)
        print(f"model: {what}; {args.requests} requests x {args.tokens} tokens at concurrency {args.concurrency}",
              flush=True)
        seq = run(model, urls, False, args)
        bat = run(model, urls, True, args)
    print(f"{'':22}{'req/s':>8}{'tok/s':>9}{'p50 s':>8}{'p99 s':>8}{'batches':>9}{'max rows':>10}")
    for name, r in (("sequential (no batch)", seq), (f"dynamic batch ({args.max_batch})", bat)):
        print(f"{name:22}{r['req_s']:8.2f}{r['tok_s']:9.1f}{r['p50_s']:8.2f}{r['p99_s']:8.2f}{r['batches']:9d}"
              f"{r['max_batch_rows']:10d}")
    ratio = bat["req_s"] / seq["req_s"]
    print(f"throughput ratio (batched / sequential): {ratio:.2f}x  (goal >= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
