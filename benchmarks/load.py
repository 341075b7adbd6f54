"""Server under load: mixed valid and malformed traffic at fixed concurrency, status codes, latency, RSS growth.

    python benchmarks/load.py                                  # 5,000 requests, 5% malformed, concurrency 16
    python benchmarks/load.py --requests 600 --time-limit 120  # what tests/test_load.py runs in CI

Starts `optictx serve` as a subprocess on 127.0.0.1 (a free port; a random micro model with EOS made
unreachable, so every answer is exactly ``--tokens`` tokens and requests are cheap), warms it up, then sends
``--requests`` requests from ``--concurrency`` asyncio clients (httpx): chat completions, streamed chat
completions and ``/v1/ocr`` uploads, with ``--malformed`` of them broken on purpose (broken JSON, bad
base64, truncated PNG, unknown model, oversized body, missing API key, ...), each with the 4xx it must get.

It prints requests/s, p50/p99 latency, status counts and the server's RSS growth: the peak VmRSS (from
``/proc/PID/status``) while the first fifth of the requests completed against the peak while the last fifth
did (for 5,000 requests: the first and the last thousand). A leak of a few KB per request shows there; the
allocator's warm-up is paid by the warm-up requests before. Then a queue phase: one long stream holds the
decoder, a burst of ``3 x --max-queue`` requests arrives, and exactly ``--max-queue`` of them must be queued
(200 once the stream is closed) and the rest answered 429 at once.

Bounded: a fixed request count, a wall-clock limit (no new request after it) and loopback only.
Exit code 0 when every check held, 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "load-test-key"
SERVER_MAX_NEW = 4000  # the server's cap: high enough for the stream that holds the decoder in the queue phase
MAX_BODY_MB = 1  # small, so an oversized body (one malformed kind) is cheap to send


# --------------------------------------------------------------------------- model and server
def micro_model_dir(folder: Path) -> Path:
    """The random micro model the serving tests use (tests/test_serve.py, ~0.1 s per page on one core): EOS
    never wins greedy decoding, so every answer has exactly the asked number of tokens."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_serve import random_model_dir

    return random_model_dir(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    """Resident set size of a process in KiB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Server:
    """`optictx serve` in a subprocess on 127.0.0.1 with a key, a 1 MB body limit and the given queue size."""

    def __init__(self, model: Path, max_queue: int, log: Path, max_batch: int = 8):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_queue = max_queue
        cmd = [sys.executable, "-m", "optictx.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--api-key", KEY, "--max-queue", str(max_queue), "--max-batch",
               str(max_batch), "--max-new-tokens", str(SERVER_MAX_NEW), "--max-body-mb", str(MAX_BODY_MB),
               "--log-level", "warning"]
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   OMP_THREAD_LIMIT=os.environ.get("OMP_THREAD_LIMIT", "1"))
        self.log = log
        self._log_file = open(log, "wb")  # a file, not a pipe: a full pipe would stall the server
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server did not start in {timeout} s: {self.log_tail()}")

    def log_tail(self) -> str:
        self._log_file.flush()
        return self.log.read_bytes()[-3000:].decode(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()

    def __enter__(self) -> "Server":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- the request mix
@dataclass
class Req:
    """One request to send and what must come back (``expect``: the exact status)."""

    kind: str
    path: str
    expect: int
    json_body: Any = None
    content: bytes | None = None
    files: dict | None = None
    data: dict | None = None
    headers: dict = field(default_factory=dict)
    stream: bool = False
    tokens: int = 0


@dataclass
class Result:
    index: int
    kind: str
    expect: int
    status: int  # 0: no HTTP answer (connection error / client timeout)
    latency_s: float
    done_at: float
    problem: str = ""  # a valid answer whose body is wrong (token count, stream without [DONE], ...)


def _png(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    """Coarse random colour blocks (distinct pages, small PNGs)."""
    from PIL import Image

    rng = random.Random(seed)
    small = Image.new("RGB", (8, 6))
    small.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(48)])
    buf = io.BytesIO()
    small.resize(size, Image.Resampling.NEAREST).save(buf, "PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _chat(url: str, tokens: int, **extra) -> dict:
    return {"model": "micro", "max_tokens": tokens, **extra,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


def malformed_kinds(page: bytes) -> list[Req]:
    """Broken requests, one per kind, each with the status the server must answer."""
    url = _data_url(page)
    json_h = {"content-type": "application/json"}
    no_image = _chat(url, 4)
    no_image["messages"][0]["content"] = "no image here"
    return [
        Req("broken-json", "/v1/chat/completions", 400, content=b'{"messages": [', headers=json_h),
        Req("messages-not-list", "/v1/chat/completions", 400, json_body={"messages": "not a list"}),
        Req("bad-base64", "/v1/chat/completions", 400, json_body=_chat("data:image/png;base64,@@@", 4)),
        Req("not-an-image", "/v1/chat/completions", 400,
            json_body=_chat(_data_url(b"this is not an image"), 4)),
        Req("truncated-png", "/v1/chat/completions", 400, json_body=_chat(_data_url(page[: len(page) // 2]), 4)),
        Req("empty-image", "/v1/chat/completions", 400, json_body=_chat("data:image/png;base64,", 4)),
        Req("no-image", "/v1/chat/completions", 400, json_body=no_image),
        Req("unknown-mode", "/v1/chat/completions", 400, json_body=_chat(url, 4, mode="huge")),
        Req("n-2", "/v1/chat/completions", 400, json_body=_chat(url, 4, n=2)),
        Req("too-many-tokens", "/v1/chat/completions", 413, json_body=_chat(url, SERVER_MAX_NEW + 1)),
        Req("unknown-model", "/v1/chat/completions", 404, json_body={**_chat(url, 4), "model": "gpt-4o"}),
        Req("no-api-key", "/v1/chat/completions", 401, json_body=_chat(url, 4), headers={"Authorization": ""}),
        Req("unknown-path", "/v1/nothing-here", 404, json_body={}),
        Req("oversized-body", "/v1/chat/completions", 413, content=b"x" * (MAX_BODY_MB * 2 ** 20 + 1),
            headers=json_h),
        Req("ocr-not-a-file", "/v1/ocr", 400, files={"file": ("p.png", b"GIF89a garbage", "image/png")}),
        Req("ocr-bad-pdf", "/v1/ocr", 400, files={"file": ("d.pdf", b"%PDF-1.7\nnot a pdf", "application/pdf")}),
    ]


def build_requests(n: int, malformed: float, tokens: int, seed: int = 0) -> list[Req]:
    """``n`` requests; ``round(n * malformed)`` of them broken (kinds cycled, seeded random positions); the
    valid ones are 80% chat, 10% streamed chat and 10% /v1/ocr uploads over 16 distinct pages."""
    rng = random.Random(seed)
    pages = [_png(seed * 1000 + i) for i in range(16)]
    urls = [_data_url(p) for p in pages]
    bad = malformed_kinds(pages[0])
    bad_at = set(rng.sample(range(n), round(n * malformed)))
    reqs, k = [], 0
    for i in range(n):
        if i in bad_at:
            reqs.append(bad[k % len(bad)])
            k += 1
            continue
        j, roll = rng.randrange(len(pages)), rng.random()
        if roll < 0.1:
            reqs.append(Req("chat-stream", "/v1/chat/completions", 200, stream=True, tokens=tokens,
                            json_body=_chat(urls[j], tokens, stream=True)))
        elif roll < 0.2:
            reqs.append(Req("ocr", "/v1/ocr", 200, files={"file": (f"p{j}.png", pages[j], "image/png")},
                            data={"max_new_tokens": str(tokens)}, tokens=tokens))
        else:
            reqs.append(Req("chat", "/v1/chat/completions", 200, json_body=_chat(urls[j], tokens), tokens=tokens))
    return reqs


# --------------------------------------------------------------------------- sending
def _check_body(req: Req, status: int, body: bytes) -> str:
    """'' when the answer is what ``req`` must get; else what is wrong."""
    if status != 200:
        try:
            err = json.loads(body)["error"]
            return "" if err["message"] and err["type"] else "error without message/type"
        except (ValueError, KeyError, TypeError):
            return f"a {status} without a JSON error body"
    if req.stream:
        lines = [x[6:] for x in body.decode().splitlines() if x.startswith("data: ")]
        if not lines or lines[-1] != "[DONE]":
            return "stream did not end with [DONE]"
        chunks = [json.loads(x) for x in lines[:-1]]
        if any("error" in c for c in chunks):
            return "stream carried an error event"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        final = chunks[-1].get("optictx", {})
        if final.get("raw") != text or final.get("tokens", {}).get("output") != req.tokens:
            return "stream text/token count differs from its final chunk"
        return ""
    out = json.loads(body)["usage"]["completion_tokens"]
    return "" if out == req.tokens else f"{out} completion tokens, asked {req.tokens}"


async def _send(client, req: Req) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {KEY}", **req.headers}
    headers = {k: v for k, v in headers.items() if v}  # "" removes the key (the no-api-key kind)
    kw: dict[str, Any] = {"headers": headers}
    if req.json_body is not None:
        kw["json"] = req.json_body
    if req.content is not None:
        kw["content"] = req.content
    if req.files is not None:
        kw["files"], kw["data"] = req.files, req.data
    async with client.stream("POST", req.path, **kw) as r:
        return r.status_code, await r.aread()


async def run_load(url: str, pid: int, reqs: list[Req], concurrency: int, time_limit: float,
                   sample_every: float = 0.1) -> tuple[list[Result], list[tuple[int, int]], float]:
    """Send ``reqs`` from ``concurrency`` clients; returns (results in completion order, RSS samples as
    (requests completed, KiB), wall seconds). No request starts after ``time_limit``."""
    import httpx

    results: list[Result] = []
    samples: list[tuple[int, int]] = []
    next_i = 0
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(max(time_limit, 30.0))

    async def worker(client) -> None:
        nonlocal next_i
        while next_i < len(reqs) and time.monotonic() - t0 < time_limit:
            i, next_i = next_i, next_i + 1
            req, start = reqs[i], time.monotonic()
            try:
                status, body = await _send(client, req)
                problem = _check_body(req, status, body) if status == req.expect else ""
            except httpx.HTTPError as e:
                status, problem = 0, f"{type(e).__name__}: {e}"
            end = time.monotonic()
            results.append(Result(i, req.kind, req.expect, status, end - start, end - t0, problem))

    async def sampler(stop: asyncio.Event) -> None:
        while not stop.is_set():
            samples.append((len(results), rss_kb(pid)))
            try:
                await asyncio.wait_for(stop.wait(), sample_every)
            except asyncio.TimeoutError:
                pass
        samples.append((len(results), rss_kb(pid)))

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        stop = asyncio.Event()
        watch = asyncio.create_task(sampler(stop))
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        stop.set()
        await watch
    return results, samples, time.monotonic() - t0


def warm_up(url: str, pid: int, n: int, tokens: int, malformed: float, concurrency: int) -> Counter:
    """The same mix before measuring, so every code path, worker thread and malloc arena has been used once:
    the RSS that follows is the steady state, not the allocator filling up. Returns the status counts."""
    reqs = build_requests(n, malformed, tokens, seed=10_000)
    results, _, _ = asyncio.run(run_load(url, pid, reqs, concurrency, 300))
    return Counter(r.status for r in results)


def rss_growth(samples: list[tuple[int, int]], n: int) -> tuple[int, int, float]:
    """(peak KiB while the first fifth of the requests completed, peak while the last fifth did, growth)."""
    window = max(1, n // 5)
    first = [kb for done, kb in samples if done <= window]
    last = [kb for done, kb in samples if done >= n - window]
    if not first or not last:
        raise ValueError("not enough RSS samples for the first and last windows")
    a, b = max(first), max(last)
    return a, b, b / a - 1.0


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class LoadReport:
    requests: int
    sent: int
    wall_s: float
    req_per_s: float
    p50_s: float
    p99_s: float
    statuses: dict[str, int]
    rss_first_kb: int
    rss_last_kb: int
    rss_growth: float
    failures: list[str]  # human-readable: every check that did not hold


def summarize(reqs: list[Req], results: list[Result], samples: list[tuple[int, int]], wall: float) -> LoadReport:
    failures = []
    if len(results) != len(reqs):
        failures.append(f"only {len(results)} of {len(reqs)} requests were sent within the time limit")
    for r in results:
        if r.status != r.expect:
            failures.append(f"#{r.index} {r.kind}: HTTP {r.status}, expected {r.expect}")
        elif r.problem:
            failures.append(f"#{r.index} {r.kind}: {r.problem}")
    valid = [r.latency_s for r in results if r.expect == 200] or [0.0]
    first, last, growth = rss_growth(samples, len(results))
    if growth >= 0.10:
        failures.append(f"RSS grew {growth:.1%} (limit 10%)")
    statuses = Counter(f"{'valid' if r.expect == 200 else 'malformed'} {r.status}" for r in results)
    return LoadReport(len(reqs), len(results), wall, len(results) / wall, statistics.median(valid),
                      percentile(valid, 0.99), dict(sorted(statuses.items())), first, last, growth, failures)


# --------------------------------------------------------------------------- the queue phase
async def queue_burst(url: str, max_queue: int, tokens: int, hold_tokens: int = SERVER_MAX_NEW,
                      timeout: float = 120) -> dict[str, Any]:
    """Hold the decoder with one long stream, send ``3 x max_queue`` requests at once; exactly
    ``max_queue`` are queued and the rest refused with 429 while the stream runs. Closing the stream
    cancels its row; the queued ones then finish with 200."""
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    page = _data_url(_png(7))
    burst = 3 * max_queue
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout,
                                 limits=httpx.Limits(max_connections=burst + 4)) as client:
        hold = client.stream("POST", "/v1/chat/completions", json=_chat(page, hold_tokens, stream=True))
        r = await hold.__aenter__()
        try:
            if r.status_code != 200:
                raise RuntimeError(f"the holding stream got HTTP {r.status_code}")
            lines = r.aiter_lines()
            seen = 0
            while seen < 2:  # the role chunk, then a first delta: the long row is decoding
                if (await lines.__anext__()).startswith("data: "):
                    seen += 1
            tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=_chat(page, tokens)))
                     for _ in range(burst)]
            deadline = time.monotonic() + timeout
            while sum(t.done() for t in tasks) < burst - max_queue:  # the refusals come back at once
                if time.monotonic() > deadline:
                    raise TimeoutError("the burst was not answered while the stream held the decoder")
                await asyncio.sleep(0.01)
            early = [t.result().status_code for t in tasks if t.done()]
            queued = (await client.get("/health")).json()["queued"]
        finally:
            await hold.__aexit__(None, None, None)  # the client goes away: the long row is cancelled
        later = [(await t).status_code for t in tasks]
    return {"burst": burst, "max_queue": max_queue, "refused_while_held": Counter(early),
            "queued_while_held": queued, "final": Counter(later)}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--malformed", type=float, default=0.05, help="fraction of broken requests (default 0.05)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokens", type=int, default=6, help="generated tokens per valid request")
    p.add_argument("--max-queue", type=int, default=16,
                   help="server queue size; >= --concurrency, so no valid request of the load phase may get 429")
    p.add_argument("--warmup", type=int, default=300, help="requests (same mix) before measuring")
    p.add_argument("--time-limit", type=float, default=900, help="seconds for the load phase (no new request after)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_queue < args.concurrency:
        p.error("--max-queue must be >= --concurrency (else valid requests could be refused with 429)")
    os.environ.setdefault("OMP_THREAD_LIMIT", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model = micro_model_dir(Path(tmp) / "micro")
        with Server(model, args.max_queue, Path(tmp) / "server.log") as server:
            warm_up(server.url, server.pid, args.warmup, args.tokens, args.malformed, args.concurrency)
            reqs = build_requests(args.requests, args.malformed, args.tokens, args.seed)
            print(f"{args.requests} requests ({sum(r.expect != 200 for r in reqs)} malformed), concurrency "
                  f"{args.concurrency}, {args.tokens} tokens each, server pid {server.pid}", flush=True)
            results, samples, wall = asyncio.run(run_load(server.url, server.pid, reqs, args.concurrency,
                                                          args.time_limit))
            rep = summarize(reqs, results, samples, wall)
            burst = asyncio.run(queue_burst(server.url, args.max_queue, args.tokens))
            alive = server.proc.poll() is None
    print(f"requests/s       {rep.req_per_s:.1f}  ({rep.sent} in {rep.wall_s:.1f} s)")
    print(f"latency (valid)  p50 {rep.p50_s * 1000:.0f} ms   p99 {rep.p99_s * 1000:.0f} ms")
    print("status counts    " + ", ".join(f"{k}: {v}" for k, v in rep.statuses.items()))
    print(f"RSS              {rep.rss_first_kb / 1024:.1f} MiB (first fifth, peak) -> {rep.rss_last_kb / 1024:.1f} MiB "
          f"(last fifth, peak): growth {rep.rss_growth:+.2%} (limit +10%)")
    print(f"queue limit      burst of {burst['burst']} with max-queue {burst['max_queue']}: refused at once "
          f"{dict(burst['refused_while_held'])}, queued {burst['queued_while_held']}, then {dict(burst['final'])}")
    failures = list(rep.failures)
    want_final = Counter({200: args.max_queue, 429: burst["burst"] - args.max_queue})
    if burst["final"] != want_final or burst["queued_while_held"] != args.max_queue:
        failures.append(f"queue phase: {burst}, expected {dict(want_final)}")
    if not alive:
        failures.append("the server process died")
    for f in failures[:20]:
        print("FAIL", f)
    print("all checks held" if not failures else f"{len(failures)} check(s) failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
