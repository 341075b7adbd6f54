"""Optical memory: exact ledger counts, decay under the budget, save/load, crash safety, recall."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import textwrap
from dataclasses import asdict
from pathlib import Path

import pytest
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import optictx.memory as memory_mod
from optictx.budget import ocr_budget, text_tokens
from optictx.errors import ConfigError, MemoryStoreError, RenderError
from optictx.memory import (DecaySchedule, Level, OpticalMemory, chunk_text, count_pages, plan_levels,
                            query_keywords, split_passages)
from optictx.render import PageStyle, render_text

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the river stone paper lamp quiet seven orange table window garden morning letter bridge north "
         "silver market yellow engine cloud music winter harbor candle pocket").split()


def sentence(rng_words: list[int], n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in rng_words[:n]).capitalize() + "."


def conversation(n_turns: int, words_per_turn: int = 45, fact_turn: int | None = 2) -> list[tuple[str, str]]:
    """Deterministic filler turns; turn ``fact_turn`` carries a planted fact."""
    turns = []
    for t in range(n_turns):
        words = [(t * 7 + i * 3) % len(WORDS) for i in range(words_per_turn)]
        text = sentence(words, words_per_turn)
        if t == fact_turn:
            text += " The code for locker 17 is 4831."
        turns.append(("user" if t % 2 == 0 else "assistant", text))
    return turns


def filled(turns, **kw) -> OpticalMemory:
    """A memory with the multi-level free-layout schedule (decay mechanics need more than one level)."""
    kw.setdefault("schedule", DecaySchedule.mono())
    m = OpticalMemory(**kw)
    for role, text in turns:
        m.add(role, text)
    return m


def oracle(ctx_list):
    """A perfect reader built from the ground truth the test holds (the library never hard-codes it)."""
    truth = {ci.image.tobytes(): ci.text for ctx in ctx_list for ci in ctx.images}
    calls = []

    def read(image):
        calls.append(1)
        return truth[image.tobytes()]

    read.calls = calls
    return read


def check_ledger(m: OpticalMemory, budget: int) -> None:
    """Every count in the ledger equals what optictx.budget computes independently, and fits the budget."""
    ctx = m.context(budget)
    led = ctx.ledger
    assert led.recent_text_tokens == sum(text_tokens(f"{p.role}: {p.text}") for p in ctx.text)
    by_turn = {e.turn: e for e in m.entries}
    counted = 0
    for row in led.rows:
        lines = [by_turn[t].line for t in range(row.first_turn, row.last_turn + 1)]
        assert row.text_tokens == sum(text_tokens(s) for s in lines)
        pages = [ci for ci in ctx.images if ci.item == row.item]
        assert row.pages == len(pages)
        for ci in pages:
            b = ocr_budget(ci.image.width, ci.image.height, ci.mode)
            assert (ci.vision_tokens, ci.decoder_slots) == (b.vision_tokens, b.decoder_slots)
            assert ci.image.width == ci.image.height == m.schedule.levels[row.level].side
        assert row.vision_tokens == sum(ci.vision_tokens for ci in pages)
        assert row.decoder_slots == sum(ci.decoder_slots for ci in pages)
        counted += getattr(row, m.count)
    assert led.image_tokens == counted
    assert led.total_tokens == led.recent_text_tokens + counted <= budget
    assert led.text_tokens_saved == led.image_text_tokens - led.image_tokens


# --------------------------------------------------------------------------- planning
def test_plan_levels_bisects_the_curve_scale():
    sch = DecaySchedule((Level("nano", 16), Level("nano", 12), Level("nano", 10)), (2, 8))
    ages, costs = [10, 5, 1], [[4, 2, 1]] * 3
    assert plan_levels(ages, costs, sch, 12) == ([0, 0, 0], float("inf"))
    # at s = 2.5 items aged 10 and 5 reach level 1 (>= 2.5*2); cost 2+2+4 = 8 <= 9; s = 5 costs 10
    assert plan_levels(ages, costs, sch, 9) == ([1, 1, 0], 2.5)
    assert plan_levels(ages, costs, sch, 3)[0] == [2, 2, 2]
    assert plan_levels(ages, costs, sch, 2)[0] == [None, 2, 2]  # the oldest is forgotten first
    assert plan_levels(ages, costs, sch, 0)[0] == [None, None, None]


def test_plan_levels_by_age_and_forgetting():
    sch = DecaySchedule((Level("nano", 16), Level("nano", 12), Level("nano", 10)), (2, 8), by="age")
    ages, costs = [10, 5, 1], [[4, 2, 1]] * 3
    assert plan_levels(ages, costs, sch, 100) == ([2, 1, 0], float("inf"))  # ages apply even with room
    # over budget: the curve is scaled down on top of the ages, so the older item decays before the newest
    assert plan_levels(ages, costs, sch, 6)[0] == [2, 2, 0]
    forget = DecaySchedule(sch.levels, sch.min_age, by="age", forget_after=6)
    assert plan_levels(ages, costs, forget, 100)[0] == [None, 1, 0]


def test_schedule_validation_and_presets():
    with pytest.raises(ConfigError, match="cheaper"):
        DecaySchedule((Level("small", 12), Level("base", 12)), (4,))
    with pytest.raises(ConfigError, match="one age per level"):
        DecaySchedule((Level("nano", 16), Level("nano", 10)), (4, 8))
    with pytest.raises(ConfigError, match="increasing"):
        DecaySchedule((Level("nano", 16), Level("nano", 12), Level("nano", 10)), (8, 4))
    with pytest.raises(ConfigError, match="native mode"):
        DecaySchedule((Level("gundam", 16),), ())
    with pytest.raises(ConfigError, match="font_size"):
        DecaySchedule((Level("nano"),), ())
    paper = DecaySchedule.paper()
    assert [paper.tokens_per_page(i) for i in range(5)] == [400, 256, 100, 64, 16]
    assert [paper.tokens_per_page(i, "decoder_slots") for i in range(5)] == [421, 273, 111, 73, 21]
    assert [paper.font_px(i) for i in range(5)] == [20, 16, 10, 8, 4]
    assert [r["made_by"] for r in paper.describe()] == ["render"] + ["downsample L0"] * 4
    assert DecaySchedule(**paper.to_json()) == paper
    tiny_age, tiny_budget = DecaySchedule.mono(by="age"), DecaySchedule.mono(by="budget")
    assert [r["from_age"] for r in tiny_age.describe(float("inf"))] == [0, 8, 32, 128]  # ages are a floor
    assert [r["from_age"] for r in tiny_age.describe(0.5)] == [0, 4, 16, 64]
    assert [r["from_age"] for r in tiny_budget.describe(float("inf"))] == [0] + [float("inf")] * 3
    assert [r["from_age"] for r in tiny_budget.describe(2.0)] == [0, 16, 64, 256]


def test_count_pages_equals_render():
    text = "\n".join(t for _, t in conversation(12))
    for fs, side in ((16, 256), (10, 256), (20, 1280)):
        style = PageStyle(width=side, height=side, margin=4, font_family="mono", font_size=fs, line_spacing=1.15)
        assert count_pages(text, style) == len(render_text(text, style))


# --------------------------------------------------------------------------- ledger and budget
def test_ledger_counts_equal_budget_and_decay_follows_age():
    m = filled(conversation(40), budget_tokens=400, recent_text_tokens=120)
    for budget in (60, 200, 400, 5000):
        check_ledger(m, budget)
    rows = [r for r in m.context(400).ledger.rows]
    levels = [r.level for r in rows]
    assert levels[0] is None or levels[0] >= 1  # the budget forces decay...
    kept = [lv for lv in levels if lv is not None]
    assert kept == sorted(kept, reverse=True)  # ...and older items are never sharper than newer ones
    big = m.context(100_000).ledger
    assert [r.level for r in big.rows] == [0] * len(big.rows) and big.scale == float("inf")
    assert big.forgotten_text_tokens == 0
    assert big.represented_text_tokens == sum(e.tokens for e in m.entries)


def test_decoder_slot_budget_and_paper_downsampling():
    m = filled(conversation(30, words_per_turn=120), budget_tokens=1500, recent_text_tokens=100,
               schedule=DecaySchedule.paper(min_age=(2, 4, 8, 16)), count="decoder_slots", item_pages=1)
    check_ledger(m, 1500)
    ctx = m.context()
    sides = {ci.level: ci.image.size for ci in ctx.images}
    assert all(size == (m.schedule.levels[lv].side,) * 2 for lv, size in sides.items())
    # a downsampled level keeps the pages of its source (Large) rendering: same pages, fewer tokens each
    by_turn = {e.turn: e for e in m.entries}
    for row in ctx.ledger.rows:
        if row.level is not None:
            text = "\n".join(by_turn[t].line for t in range(row.first_turn, row.last_turn + 1))
            assert row.pages == len(render_text(text, m.style(0)))
            assert row.decoder_slots == row.pages * m.schedule.tokens_per_page(row.level, "decoder_slots")
    assert len(sides) >= 2


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turn_words=st.lists(st.integers(1, 90), min_size=1, max_size=24), budget=st.integers(1, 400),
       recent=st.integers(0, 120), by=st.sampled_from(["age", "budget"]), item_pages=st.integers(1, 2),
       count=st.sampled_from(["vision_tokens", "decoder_slots"]), seed=st.integers(0, 50))
def test_decay_never_exceeds_the_budget(turn_words, budget, recent, by, item_pages, count, seed):
    m = OpticalMemory(budget, recent, DecaySchedule.mono(by=by, min_age=(1, 3, 6)), item_pages=item_pages,
                      count=count)
    for t, n in enumerate(turn_words):
        m.add("user" if t % 2 else "assistant", sentence([(seed + t * 5 + 3 * i) for i in range(n)], n))
    check_ledger(m, budget)
    rows = m.context().ledger.rows
    levels = [r.level for r in rows]
    gone = [lv is None for lv in levels]
    assert gone == sorted(gone, reverse=True)  # only the oldest are forgotten
    kept = [lv for lv in levels if lv is not None]
    assert kept == sorted(kept, reverse=True)
    event(f"forgot some: {any(gone)}, decayed some: {any(kept)}")


# --------------------------------------------------------------------------- recall
def test_recall_with_injected_readers():
    m = filled(conversation(40), budget_tokens=400, recent_text_tokens=120)
    ctx = m.context()
    assert not any("4831" in p.text for p in ctx.text)  # the fact is only in an image
    m.reader = oracle([ctx])
    best = m.recall("What is the code for locker 17?")
    assert best[0].text == "The code for locker 17 is 4831." and best[0].source == "image"
    assert best[0].level == next(r.level for r in ctx.ledger.rows if r.first_turn <= 2 <= r.last_turn)
    n_calls = len(m.reader.calls)
    assert n_calls == len(ctx.images)  # every image in context decoded once...
    m.recall("locker 17")
    assert len(m.reader.calls) == n_calls  # ...and cached

    truth = {ci.image.tobytes(): ci.text for ci in ctx.images}

    class Result:  # what optictx.ocr returns: an object with .text
        def __init__(self, text):
            self.text = text

    m2 = filled(conversation(40), budget_tokens=400, recent_text_tokens=120,
                reader=lambda im: Result(truth[im.tobytes()].replace("4831", "48?1")))
    best = m2.recall("code for locker 17")
    assert best[0].text == "The code for locker 17 is 48?1."  # the reader's text, never the stored one
    m3 = filled(conversation(4), budget_tokens=400, recent_text_tokens=0, reader=lambda im: None)
    with pytest.raises(ConfigError, match="reader"):
        m3.recall("anything")


def test_recall_reads_recent_text_without_the_reader():
    m = filled(conversation(3, fact_turn=2), budget_tokens=2000, recent_text_tokens=2000,
               reader=lambda im: pytest.fail("no image should be decoded"))
    best = m.recall("the code for locker 17")
    assert best[0].source == "text" and "4831" in best[0].text


def test_passages_and_keywords():
    assert query_keywords("What is the code for locker 17?") == "the code for locker 17"
    assert split_passages("A b.\nc d user: e f assistant: g.", ["user", "assistant"]) == [
        "A b.", "c d", "user: e f", "assistant: g."]


def test_add_document_chunks_and_errors():
    doc = "\n\n".join(t for _, t in conversation(20, words_per_turn=60))
    m = OpticalMemory()
    n = m.add_document(doc, chunk_tokens=64)
    assert n == len(m.entries) and [e.turn for e in m.entries] == list(range(n))
    assert all(text_tokens(e.text) <= 64 for e in m.entries)
    assert " ".join(e.text for e in m.entries).split() == doc.split()
    assert chunk_text("one two", 8) == ["one two"]
    with pytest.raises(RenderError):
        m.add("user", "   ")
    with pytest.raises(ConfigError):
        m.add("user: x", "hello")
    with pytest.raises(ConfigError):
        OpticalMemory(budget_tokens=0)
    with pytest.raises(ConfigError):
        m.context(0)


# --------------------------------------------------------------------------- save / load
def snapshot(m: OpticalMemory) -> dict:
    ctx = m.context()
    return {"entries": [(e.turn, e.role, e.text) for e in m.entries], "config": m.config_json(),
            "images": [(ci.item, ci.level, ci.page, ci.image.tobytes()) for ci in ctx.images],
            "rows": [asdict(r) for r in ctx.ledger.rows]}


def test_save_load_round_trip_and_cleanup(tmp_path):
    m = filled(conversation(40), budget_tokens=400, recent_text_tokens=120)
    m.save(tmp_path)
    loaded = OpticalMemory.load(tmp_path)
    assert snapshot(loaded) == snapshot(m)
    assert len(loaded._render_cache) > 0  # the images came from the PNGs
    before = set((tmp_path / "pages").iterdir())
    for role, text in conversation(12, fact_turn=None):
        loaded.add(role, text)
    loaded.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == sorted(Path(p["file"]).name
                                                                          for p in manifest["pages"])
    assert before - set((tmp_path / "pages").iterdir())  # decayed pages were replaced and removed
    assert snapshot(OpticalMemory.load(tmp_path)) == snapshot(loaded)


def test_load_errors(tmp_path):
    with pytest.raises(MemoryStoreError, match="no optical memory"):
        OpticalMemory.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(MemoryStoreError, match="unreadable"):
        OpticalMemory.load(tmp_path)
    filled(conversation(20), budget_tokens=300, recent_text_tokens=50).save(tmp_path)
    page = next((tmp_path / "pages").iterdir())
    page.write_bytes(page.read_bytes()[:-10])
    with pytest.raises(MemoryStoreError, match="sha256"):
        OpticalMemory.load(tmp_path)


@pytest.mark.parametrize("fail_at", ["first", "middle", "manifest"])
def test_crash_during_save_keeps_previous_memory(tmp_path, monkeypatch, fail_at):
    m = filled(conversation(30), budget_tokens=400, recent_text_tokens=120)
    m.save(tmp_path)
    old = snapshot(OpticalMemory.load(tmp_path))
    for role, text in conversation(15, fact_turn=None):
        m.add(role, text)
    real, calls = memory_mod.atomic_write, []

    def flaky(path: Path, data: bytes, **kw) -> None:
        calls.append(path)
        crash = {"first": len(calls) == 1, "middle": len(calls) == 3, "manifest": path.name == "manifest.json"}
        if crash[fail_at]:
            path.with_name(f".{path.name}.{os.getpid()}.tmp").write_bytes(data[: len(data) // 2])
            raise OSError("disk full (simulated)")
        real(path, data, **kw)

    monkeypatch.setattr(memory_mod, "atomic_write", flaky)
    with pytest.raises(OSError, match="simulated"):
        m.save(tmp_path)
    assert snapshot(OpticalMemory.load(tmp_path)) == old
    monkeypatch.setattr(memory_mod, "atomic_write", real)
    m.save(tmp_path)  # the next save succeeds and sweeps the debris
    assert not list(tmp_path.glob("**/.*.tmp"))
    assert snapshot(OpticalMemory.load(tmp_path)) == snapshot(m)


def test_sigkill_during_save_keeps_previous_memory(tmp_path):
    m = filled(conversation(30), budget_tokens=400, recent_text_tokens=120)
    m.save(tmp_path)
    old = snapshot(OpticalMemory.load(tmp_path))
    child = textwrap.dedent(f"""
        import os, signal, sys
        import optictx.memory as mm
        m = mm.OpticalMemory.load({str(tmp_path)!r})
        for t in range(15):
            m.add("user", "More words about the harbor and the silver engine, turn %d." % t)
        real, n = mm.atomic_write, []
        def killer(path, data, **kw):
            n.append(path)
            if path.name == "manifest.json":  # every page is written; die halfway through the manifest
                path.with_name("." + path.name + ".%d.tmp" % os.getpid()).write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data, **kw)
        mm.atomic_write = killer
        m.save({str(tmp_path)!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert snapshot(OpticalMemory.load(tmp_path)) == old


# --------------------------------------------------------------------------- reader batching, CLI, eval
def test_reader_with_batch_method_gets_batches():
    m = filled(conversation(40), budget_tokens=400, recent_text_tokens=120)
    truth = {ci.image.tobytes(): ci.text for ci in m.context().images}

    class BatchReader:
        def __init__(self):
            self.batches = []

        def __call__(self, image):
            raise AssertionError("pages should go through batch()")

        def batch(self, images):
            self.batches.append(len(images))
            return [truth[im.tobytes()] for im in images]

    m.reader = BatchReader()
    texts = m.read_pages([ci.image for ci in m.context().images], batch_size=4)
    assert texts == [ci.text for ci in m.context().images]
    n = len(set(truth))
    assert m.reader.batches == [4] * (n // 4) + ([n % 4] if n % 4 else [])


def test_cli_add_show_recall(tmp_path, monkeypatch, capsys):
    from optictx.cli import main

    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"role": r, "content": t}) for r, t in conversation(30)) + "\n")
    note = tmp_path / "note.txt"
    note.write_text("Remember to water the ferns on Tuesday.")
    d = str(tmp_path / "mem")
    assert main(["memory", "add", str(chat), str(note), "--dir", d, "--budget", "300", "--recent", "80",
                 "--schedule", "mono"]) == 0
    assert main(["memory", "add", str(note), "--dir", d, "--document", "--budget", "9999"]) == 0  # settings kept
    capsys.readouterr()
    assert main(["memory", "show", "--dir", d, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    mem = OpticalMemory.load(d)
    assert len(mem.entries) == 32 and mem.entries[-1].role == "document" and mem.budget_tokens == 300
    led = mem.context().ledger
    assert (shown["budget"], shown["total_tokens"], shown["image_tokens"]) == (300, led.total_tokens, led.image_tokens)
    assert [r["level"] for r in shown["items"]] == [r.level for r in led.rows]
    assert main(["memory", "show", "--dir", d, "--budget", "150"]) == 0
    assert "decay schedule" in capsys.readouterr().out

    truth = {ci.image.tobytes(): ci.text for ci in mem.context().images}

    class FakeOCR:  # stands in for optictx.ocr.OCR: reads the pages' ground truth
        def __init__(self, model, **kw):
            assert model == "tiny"

        def __call__(self, image):
            return truth[image.tobytes()]

    import optictx.ocr

    monkeypatch.setattr(optictx.ocr, "OCR", FakeOCR)
    assert main(["memory", "recall", "What is the code for locker 17?", "--dir", d, "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "The code for locker 17 is 4831." in out and "image L" in out
    assert main(["memory", "show", "--dir", str(tmp_path / "none")]) == 2  # typed error, no traceback


def test_eval_memory_conversation_and_recall(tmp_path):
    from optictx.eval import memory_eval as me

    conv = me.make_conversation(3000, 6, seed=3)
    lines = conv.lines
    assert sum(text_tokens(s) for s in lines) >= 3000
    assert len({f.answer for f in conv.facts}) == 6
    for f in conv.facts:
        assert f.sentence in conv.turns[f.turn][1] and f.answer in f.sentence
    results = me.evaluate(conv, [250], reader=None, oracle=True)
    tokens = [text_tokens(s) for s in lines]
    window = me.text_window(lines, tokens, 250)
    assert sum(text_tokens(s) for s in window.split("\n")) <= 250
    for r, f in zip(results, conv.facts):
        assert r.text_window == (f.answer in window)
        assert r.optical_readable == (r.where != "forgotten")  # a perfect reader reads everything kept
        assert r.optical <= r.optical_readable
    assert sum(r.optical for r in results) > sum(r.text_window for r in results)


def test_eval_memory_cli_writes_table_and_plot(tmp_path, capsys):
    from optictx.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "memory", "--model", "oracle", "--budgets", "150,300", "--facts", "8", "--out",
                 str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["conversation_tokens"] >= 10 * 300
    assert [b["budget"] for b in data["summary"]["by_budget"]] == [150, 300]
    assert len(data["facts"]) == 16
    assert (out / "memory.png").stat().st_size > 10_000
    assert "recall vs age" in capsys.readouterr().out


def test_default_memory_renders_grid_pages_the_bundled_model_reads():
    """The default (tiny) schedule puts archived text on 256-px grid pages (optictx.data.ocr_pages), page
    count as rendered, within budget; the oldest items are forgotten when even that does not fit."""
    from optictx.data.ocr_pages import CELL_H, render_grid_pages
    from optictx.memory import GRID

    m = OpticalMemory(budget_tokens=300, recent_text_tokens=60)
    for role, text in conversation(60):
        m.add(role, text)
    assert m.schedule.levels[0].font_size == GRID and len(m.schedule.levels) == 1
    ctx = m.context()
    assert ctx.images and all(ci.image.size == (256, 256) for ci in ctx.images)
    check_ledger(m, 300)
    first = ctx.images[0]
    want = render_grid_pages(first.text, 256, 4)[0]
    assert want.text == first.text and np.array_equal(np.asarray(first.image), np.asarray(want.image))
    assert m.schedule.describe()[0]["font_px"] > CELL_H / 2
    assert DecaySchedule(**m.schedule.to_json()) == m.schedule


def test_tiny_schedule_refuses_ages():
    with pytest.raises(ConfigError, match="one level"):
        DecaySchedule.tiny(min_age=(4,))
