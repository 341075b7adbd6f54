"""`optictx ocr`: a 3-page PDF survives a SIGKILL and --resume ends with each page exactly once; a corrupt image is
recorded and the exit code says so; usage errors exit 2; torn and failed JSONL lines are handled on resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optictx.prompts import PAGE_SPLIT
from test_ocr import noise_image, save_random_model

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 60  # ~0.5 s per page on one core with the micro model: room to kill between pages


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_THREAD_LIMIT="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "optictx.cli", "ocr", *args, "--quiet"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_random_model(tmp_path_factory.mktemp("model") / "micro", seed=0, eos=False)


def _three_page_pdf(path: Path) -> Path:
    from reportlab.lib.pagesizes import A6
    from reportlab.pdfgen import canvas

    c = canvas.Canvas(str(path), pagesize=A6)
    for i in range(3):
        c.setFont("Helvetica", 14 + 6 * i)
        c.drawString(20, 300 - 60 * i, f"Page {i + 1}: hello world")
        c.rect(20 + 30 * i, 40, 80, 60 + 20 * i, fill=i % 2)
        c.showPage()
    c.save()
    return path


def test_sigkill_after_page_one_then_resume_gives_each_page_once(tmp_path, model_dir):
    pdf = _three_page_pdf(tmp_path / "doc.pdf")
    out = tmp_path / "out"
    jsonl = out / "doc.jsonl"
    args = _cli(str(pdf), "--out", str(out), "--model", str(model_dir), "--max-new-tokens", str(NEW_TOKENS))
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if jsonl.is_file() and jsonl.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = _lines(jsonl)
    assert 1 <= len(killed) < 3 and killed[0]["page"] == 1 and killed[0]["ok"]
    assert not (out / "doc.md").exists()  # the markdown is only written when the document is complete
    page1 = jsonl.read_bytes().splitlines()[0]

    done = subprocess.run(args + ["--resume"], env=_env(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    records = _lines(jsonl)
    assert sorted(r["page"] for r in records) == [1, 2, 3]
    assert jsonl.read_bytes().splitlines()[0] == page1  # page 1 was kept, not redone
    assert all(r["ok"] and r["tokens"]["output"] == NEW_TOKENS and r["doc"] == str(pdf) for r in records)
    md = (out / "doc.md").read_text(encoding="utf-8")
    by_page = {r["page"]: r["markdown"] for r in records}
    assert md == PAGE_SPLIT.join(by_page[p] for p in (1, 2, 3)) + "\n"
    assert f"{len(killed)} already done" in done.stdout.decode()


def test_corrupt_image_is_recorded_and_exit_code_is_1(tmp_path, model_dir, capsys):
    from optictx.cli import main

    inp = tmp_path / "scans"
    (inp / "sub").mkdir(parents=True)
    noise_image(200, 300, 0).save(inp / "a.png")
    noise_image(300, 200, 1).save(inp / "sub" / "c.jpg")
    (inp / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (inp / "notes.txt").write_text("ignored: not an image or a PDF")
    out = tmp_path / "out"
    code = main(["ocr", str(inp), "--out", str(out), "--model", str(model_dir), "--max-new-tokens", "8",
                 "--annotate", "--quiet"])
    assert code == 1
    bad = _lines(out / "b.jsonl")
    assert len(bad) == 1 and bad[0]["ok"] is False and bad[0]["error"]["type"] == "ImageError"
    assert bad[0]["page"] == 1 and "b.png" in bad[0]["error"]["message"]
    for name in ("a", "sub/c"):
        (rec,) = _lines(out / f"{name}.jsonl")
        assert rec["ok"] and rec["page"] == 1 and rec["tokens"]["output"] == 8
        assert (out / f"{name}.md").read_text(encoding="utf-8") == rec["markdown"] + "\n"
        assert (out / f"{name}_annotated" / "page-0001.jpg").is_file()
    assert "failed: ImageError" in (out / "b.md").read_text(encoding="utf-8")
    assert not (out / "notes.jsonl").exists()
    assert "2 page(s) ok, 1 failed" in capsys.readouterr().out
    # resuming retries only the failed page; once the file is fixed everything is ok and the exit code is 0
    noise_image(100, 100, 2).save(inp / "b.png")
    assert main(["ocr", str(inp), "--out", str(out), "--model", str(model_dir), "--max-new-tokens", "8",
                 "--resume", "--quiet"]) == 0
    assert "1 page(s) ok, 0 failed, 2 already done" in capsys.readouterr().out
    assert [r["ok"] for r in _lines(out / "b.jsonl")] == [True]


def test_usage_errors_exit_2(tmp_path, capsys):
    from optictx.cli import main

    assert main(["ocr", str(tmp_path / "nope.pdf"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["ocr", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no images or PDFs" in capsys.readouterr().err
    good = tmp_path / "a.png"
    noise_image(50, 50, 0).save(good)
    assert main(["ocr", str(good), "--out", str(tmp_path / "o"), "--mode", "huge"]) == 2
    assert "unknown mode" in capsys.readouterr().err
    assert main(["ocr", str(good), "--out", str(tmp_path / "o"), "--prompt", "Read it."]) == 2
    assert "<image>" in capsys.readouterr().err
    with pytest.raises(SystemExit) as no_out:  # argparse: a missing required option
        main(["ocr", str(tmp_path)])
    assert no_out.value.code == 2


def test_resume_drops_torn_failed_and_duplicate_lines(tmp_path):
    from optictx.commands.ocr import prepare_jsonl, rebuild_markdown

    path = tmp_path / "x.jsonl"
    rec = lambda page, ok, md="": json.dumps({"page": page, "ok": ok, "markdown": md})  # noqa: E731
    path.write_text("\n".join([rec(1, True, "one"), rec(2, False), rec(1, True, "again"), rec(3, True, "three"),
                               "not json", ""]) + '{"page": 2, "ok": tr', encoding="utf-8")
    assert prepare_jsonl(path, resume=True) == {1, 3}
    assert [json.loads(x)["markdown"] for x in path.read_text().splitlines()] == ["one", "three"]
    rebuild_markdown(path, tmp_path / "x.md", 3)
    assert (tmp_path / "x.md").read_text() == PAGE_SPLIT.join(["one", "<!-- page 2: not processed -->", "three"]) + "\n"
    assert prepare_jsonl(path, resume=False) == set() and path.read_bytes() == b""
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind
