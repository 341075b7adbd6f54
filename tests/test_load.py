"""The server under load (a CI-sized run of benchmarks/load.py): `optictx serve` in a subprocess on 127.0.0.1,
600 requests from 16 concurrent clients with 5% malformed. Every valid request gets 200 with the asked
token count, every malformed one its exact 4xx, no request reaches the decoder unless valid, the server's
RSS stays within 10% from the first to the last fifth, and a full queue is answered 429 — exactly the
requests beyond ``--max-queue``.

The benchmark module is imported rather than copied, so the script `make bench` runs is the one tested.
"""
from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads the server's RSS from /proc")
ROOT = Path(__file__).resolve().parents[1]
REQUESTS, MALFORMED, CONCURRENCY, TOKENS, MAX_QUEUE = 600, 0.05, 16, 6, 16
TIME_LIMIT = 240  # seconds for the measured phase; ~20-40 requests/s on 2 busy cores


def _load_module():
    spec = importlib.util.spec_from_file_location("optictx_bench_load", ROOT / "benchmarks" / "load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


load = _load_module()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    model = load.micro_model_dir(tmp / "micro")
    with load.Server(model, MAX_QUEUE, tmp / "server.log") as s:
        yield s


def _health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=30).json()


# --------------------------------------------------------------------------- pure parts
def test_request_mix_is_exact_and_seeded():
    reqs = load.build_requests(600, 0.05, TOKENS, seed=3)
    bad = [r for r in reqs if r.expect != 200]
    assert len(bad) == 30 and all(400 <= r.expect < 500 for r in bad)
    assert {r.kind for r in bad} == {r.kind for r in load.malformed_kinds(b"x")}  # every kind at least once
    assert [r.kind for r in reqs] == [r.kind for r in load.build_requests(600, 0.05, TOKENS, seed=3)]
    assert [r.kind for r in reqs] != [r.kind for r in load.build_requests(600, 0.05, TOKENS, seed=4)]
    kinds = Counter(r.kind for r in reqs if r.expect == 200)
    assert set(kinds) == {"chat", "chat-stream", "ocr"} and sum(kinds.values()) == 570


def test_rss_growth_compares_peaks_of_first_and_last_fifth():
    samples = [(0, 100), (10, 120), (20, 110), (50, 115), (80, 130), (90, 125), (100, 126)]
    assert load.rss_growth(samples, 100) == (120, 130, pytest.approx(130 / 120 - 1))
    with pytest.raises(ValueError):
        load.rss_growth([(50, 1)], 100)
    assert load.percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and load.percentile([1.0, 2.0], 0.99) == 2.0


# --------------------------------------------------------------------------- the server under load
def test_mixed_load_no_5xx_exact_4xx_and_flat_rss(server):
    warm = load.warm_up(server.url, server.pid, 150, TOKENS, MALFORMED, CONCURRENCY)
    assert warm[200] == 150 - round(150 * MALFORMED) and not any(s >= 500 for s in warm)
    reqs = load.build_requests(REQUESTS, MALFORMED, TOKENS, seed=1)
    before = _health(server)
    results, samples, wall = asyncio.run(load.run_load(server.url, server.pid, reqs, CONCURRENCY, TIME_LIMIT))
    after = _health(server)
    rep = load.summarize(reqs, results, samples, wall)
    print(f"\nload: {rep.req_per_s:.1f} requests/s, p50 {rep.p50_s * 1000:.0f} ms, p99 {rep.p99_s * 1000:.0f} ms, "
          f"RSS {rep.rss_first_kb / 1024:.1f} -> {rep.rss_last_kb / 1024:.1f} MiB ({rep.rss_growth:+.2%}), "
          f"statuses {rep.statuses}, {wall:.1f} s")
    assert rep.failures == []  # all sent; each answer its exact status and a well-formed body; RSS < +10%
    assert rep.sent == REQUESTS and not any(r.status >= 500 for r in results)
    valid = sum(r.expect == 200 for r in reqs)
    assert after["rows"] - before["rows"] == valid  # each valid page decoded once, no malformed one reached it
    assert after["queued"] == 0 and after["max_batch_rows"] > 1 and server.proc.poll() is None


def test_full_queue_answers_429_exactly_beyond_the_limit(server):
    burst = asyncio.run(load.queue_burst(server.url, MAX_QUEUE, TOKENS))
    assert burst["refused_while_held"] == Counter({429: 2 * MAX_QUEUE})  # refused at once, while held
    assert burst["queued_while_held"] == MAX_QUEUE
    assert burst["final"] == Counter({200: MAX_QUEUE, 429: 2 * MAX_QUEUE})  # the queued ones ran afterwards
    assert _health(server)["queued"] == 0 and server.proc.poll() is None
