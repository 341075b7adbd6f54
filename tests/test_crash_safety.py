"""Crash safety under SIGKILL at random moments: batch OCR resumes to every page exactly once, OpticalMemory.save
and training checkpoints always leave a loadable previous (or new) state.

Each kill hits a real process: a child forked from a resident "zygote" that imported torch and optictx once
(a fresh interpreter costs 3-8 s of imports here; 30 of them would blow the CI bound). The child runs the
real entry point (``optictx.cli.main(argv)`` for OCR, a save loop for memory and checkpoints), the test
watches its output files and sends ``SIGKILL`` to the child's pid after a seeded random delay, and the
zygote reports how the child ended (it must be the signal, not a clean exit).

Why seeded random moments rather than hand-picked ones: the code under test claims safety at *every*
instruction, and a fixed moment only probes one. The seed keeps a failure reproducible.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from optictx.prompts import PAGE_SPLIT
from test_ocr import save_random_model

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="forks a zygote; SIGKILL semantics of Linux")
ROOT = Path(__file__).resolve().parents[1]
SEED = 20240610
NEW_TOKENS = 8  # ~0.1-0.2 s per page with the micro model on one core
DOCS, PAGES = 3, 10

# The zygote: imports once, then forks one child per request line. Protocol (JSON lines):
#   in : {"argv": [...], "log": path} runs optictx.cli.main(argv); {"code": str, "log": path} execs code
#   out: {"pid": N} as soon as the child exists, then {"pid": N, "signal": S|null, "code": C|null} when it ends.
ZYGOTE = r"""
import json, os, sys, traceback
import torch
torch.set_num_threads(1)
import optictx.cli, optictx.ocr, optictx.commands.ocr, optictx.render.pdf, optictx.memory
import optictx.train.checkpoint
import rich.progress, safetensors.torch
# lazy work every child would otherwise repeat (seconds each on a busy machine): the command modules, the
# DeepSeek tokenizer (text-token counts), torch._dynamo (imported by the first optimizer) and page fonts
optictx.cli.build_parser()
optictx.budget.text_tokens("warm up")
torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())
warm = optictx.memory.OpticalMemory(budget_tokens=100, recent_text_tokens=10)
for t in range(6):
    warm.add("user", "Warming up the page renderer and its fonts, turn %d." % t)
warm.context()
del warm

print(json.dumps({"ready": True}), flush=True)
while True:
    line = sys.stdin.readline()
    if not line:
        break
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if "argv" in req:
                code = optictx.cli.main(req["argv"])
            else:
                exec(compile(req["code"], "<child>", "exec"), {"__name__": "__child__"})
                code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    print(json.dumps({"pid": pid, "signal": sig, "code": code}), flush=True)
"""


@dataclass
class Ended:
    signal: int | None
    code: int | None


class Zygote:
    """The resident parent process; ``start`` forks a child and returns its pid, ``wait`` how it ended."""

    def __init__(self, log_dir: Path):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_THREAD_LIMIT="1", HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        self.log_dir = log_dir
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        assert self._message(120).get("ready"), "the zygote did not start"

    def _message(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise TimeoutError(f"no message from the zygote in {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the zygote died: " + self.proc.stderr.read().decode()[-3000:])
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, name: str, **request) -> int:
        request["log"] = str(self.log_dir / f"{name}.log")
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        return self._message(30)["pid"]

    def ended(self) -> bool:
        """Has the running child already ended (its status line is waiting)?"""
        return b"\n" in self._buf or bool(self._sel.select(0))

    def wait(self, timeout: float = 120) -> Ended:
        msg = self._message(timeout)
        return Ended(msg["signal"], msg["code"])

    def run(self, name: str, timeout: float = 300, **request) -> Ended:
        self.start(name, **request)
        return self.wait(timeout)

    def close(self) -> None:
        """No child is running here and the zygote holds nothing to flush: kill it rather than wait seconds
        for torch's interpreter teardown."""
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("logs"))
    yield z
    z.close()


def kill_after(zygote: Zygote, pid: int, ready, delay: float, timeout: float = 120) -> float:
    """SIGKILL ``pid`` ``delay`` seconds after ``ready()`` first holds (or at once when ``ready()`` says
    "now"); returns the seconds from start to the kill. The child must still be running when it is killed."""
    t0 = time.monotonic()
    armed = None
    while True:
        now = time.monotonic()
        assert now - t0 < timeout, "the child never reached the kill window"
        state = ready()
        if armed is None and state:
            armed = now
        if armed is not None and (now - armed >= delay or state == "now"):
            break
        assert not zygote.ended(), "the child finished before it could be killed"
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    return time.monotonic() - t0


def last_reported(progress: Path) -> int:
    """The last number a child wrote to its progress file (0 before the first)."""
    lines = progress.read_text().split() if progress.exists() else []
    return int(lines[-1]) if lines else 0


def log_tail(zygote: Zygote, name: str) -> str:
    path = zygote.log_dir / f"{name}.log"
    return path.read_text(errors="replace")[-3000:] if path.is_file() else ""


# --------------------------------------------------------------------------- batch OCR
def make_pdfs(folder: Path) -> list[Path]:
    """3 PDFs x 10 pages of coarse random colour blocks; every page has its own size, so a record's ``size``
    names its page (the random model's text barely depends on the image)."""
    from reportlab.pdfgen import canvas

    rng = random.Random(SEED)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for d in range(DOCS):
        path = folder / f"doc{d}.pdf"
        c = canvas.Canvas(str(path))
        for i in range(PAGES):
            w, h = 140 + 6 * (d * PAGES + i), 200
            c.setPageSize((w, h))
            for gx in range(5):
                for gy in range(6):
                    c.setFillColorRGB(rng.random(), rng.random(), rng.random())
                    c.rect(gx * w / 5, gy * h / 6, w / 5, h / 6, stroke=0, fill=1)
            c.showPage()
        c.save()
        paths.append(path)
    return paths


def complete_lines(path: Path) -> list[bytes]:
    """The newline-terminated lines of a JSONL (a torn last line, if any, is not among them)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1].splitlines(keepends=True) if b"\n" in data else []


def expected_markdown(lines: list[bytes]) -> str:
    """What ``<name>.md`` must hold for these JSONL lines: pages in order, joined by the page split."""
    by_page: dict[int, str] = {}
    for raw in lines:
        rec = json.loads(raw)
        by_page.setdefault(rec["page"], rec["markdown"])
    return PAGE_SPLIT.join(by_page.get(p, f"<!-- page {p}: not processed -->") for p in range(1, PAGES + 1)) + "\n"


def check_outputs(out: Path, names: list[str]) -> dict[str, list[bytes]]:
    """After any kill: every complete JSONL line parses, is an ok record, no page appears twice, and any
    markdown file present is exactly what its JSONL says. Returns each document's complete lines."""
    lines = {}
    for name in names:
        got = complete_lines(out / f"{name}.jsonl")
        records = [json.loads(raw) for raw in got]  # raises on a corrupt line
        pages = [r["page"] for r in records]
        assert all(r["ok"] for r in records), [r.get("error") for r in records]
        assert len(pages) == len(set(pages)) and set(pages) <= set(range(1, PAGES + 1)), pages
        md = out / f"{name}.md"
        if md.exists():
            assert sorted(pages) == list(range(1, PAGES + 1))  # the markdown is written once a document is done
            assert md.read_text(encoding="utf-8") == expected_markdown(got)
        lines[name] = got
    return lines


def comparable(raw: bytes) -> dict:
    rec = json.loads(raw)
    rec.pop("timings")
    return rec


def test_batch_ocr_survives_random_sigkills(tmp_path, zygote):
    """30 pages, 12 SIGKILLs (10 at a random moment after a run's first new page record, 2 during start-up
    and resume preparation), each followed by ``--resume``: every page once, nothing redone, no corrupt file,
    and the result equals an uninterrupted run's."""
    model = save_random_model(tmp_path / "model", seed=0, eos=False)
    pdfs = make_pdfs(tmp_path / "in")
    names = [p.stem for p in pdfs]
    out, ref = tmp_path / "out", tmp_path / "ref"

    def argv(folder: Path, resume: bool) -> list[str]:
        return ["ocr", *map(str, pdfs), "--out", str(folder), "--model", str(model), "--max-new-tokens",
                str(NEW_TOKENS), "--quiet"] + (["--resume"] if resume else [])

    t0 = time.monotonic()
    ended = zygote.run("ocr-ref", argv=argv(ref, False))
    assert (ended.signal, ended.code) == (None, 0), (log_tail(zygote, "ocr-ref"),
                                                     complete_lines(ref / f"{names[0]}.jsonl")[:1])
    ref_s = time.monotonic() - t0
    reference = {n: complete_lines(ref / f"{n}.jsonl") for n in names}
    assert all(len(v) == PAGES for v in reference.values())

    rng = random.Random(SEED)
    kinds = ["after-record"] * 10 + ["start-up"] * 2
    rng.shuffle(kinds)
    kinds[0] = "after-record"  # the first run must produce something before anything is resumed
    history: list[tuple[str, int, float]] = []
    kept = {n: [] for n in names}
    for k, kind in enumerate(kinds):
        total_before = sum(len(v) for v in kept.values())
        delay = rng.uniform(0, 0.25) if kind == "after-record" else rng.uniform(0, 1.5)

        def ready(base=total_before):
            n = sum(len(complete_lines(out / f"{x}.jsonl")) for x in names)
            if kind == "start-up":  # from the start, but before the run's first new page is recorded
                return "now" if n >= base + 1 else True
            return "now" if n >= base + 2 else n >= base + 1  # at most ~2 pages per run: pages stay for later

        name = f"ocr-kill-{k}"
        pid = zygote.start(name, argv=argv(out, resume=k > 0))
        at = kill_after(zygote, pid, ready, delay)
        ended = zygote.wait()
        assert ended.signal == signal.SIGKILL, (ended, log_tail(zygote, name))
        now = check_outputs(out, names)
        for n in names:  # what a previous run finished is kept, byte for byte and in order
            assert now[n][: len(kept[n])] == kept[n]
        kept = now
        history.append((kind, sum(len(v) for v in now.values()), round(at, 3)))
    assert history[-1][1] < DOCS * PAGES, "every page was done before the last kill: the test lost its point"

    ended = zygote.run("ocr-final", argv=argv(out, resume=True))
    assert (ended.signal, ended.code) == (None, 0), log_tail(zygote, "ocr-final")
    final = check_outputs(out, names)
    for n in names:
        assert final[n][: len(kept[n])] == kept[n]
        assert sorted(json.loads(x)["page"] for x in final[n]) == list(range(1, PAGES + 1))
        assert (out / f"{n}.md").is_file()
        by_page = {json.loads(x)["page"]: comparable(x) for x in final[n]}
        assert [by_page[p] for p in range(1, PAGES + 1)] == [comparable(x) for x in reference[n]]
    leftovers = sorted(p.name for p in out.iterdir() if ".tmp" in p.name)
    print(f"\nocr kills (kind, pages done, s after start): {history}; reference run {ref_s:.1f} s; "
          f"temp files left by killed writers: {leftovers}")


# --------------------------------------------------------------------------- OpticalMemory.save
MEMORY_CHILD = r"""
import json, os
from pathlib import Path
from optictx.memory import OpticalMemory
folder, turns, progress = Path({folder!r}), json.loads(Path({turns!r}).read_text()), Path({progress!r})
if (folder / "manifest.json").exists():
    m = OpticalMemory.load(folder)
else:
    m = OpticalMemory(budget_tokens=400, recent_text_tokens=120)
for role, text in turns[len(m.entries):]:
    m.add(role, text)
    m.save(folder)
    with open(progress, "a") as f:
        f.write(f"{{len(m.entries)}}\n")
"""


def memory_turns(n: int) -> list[tuple[str, str]]:
    words = "the river stone paper lamp quiet seven orange table window garden morning letter bridge".split()
    return [("user" if t % 2 == 0 else "assistant",
             f"Turn {t}: " + " ".join(words[(t * 5 + i * 3) % len(words)] for i in range(40)) + ".")
            for t in range(n)]


def memory_snapshot(m) -> tuple:
    ctx = m.context()
    return ([(e.turn, e.role, e.text) for e in m.entries],
            [(ci.item, ci.level, ci.page, hashlib.sha256(ci.image.tobytes()).hexdigest()) for ci in ctx.images])


def fresh_memory(turns):
    from optictx.memory import OpticalMemory

    m = OpticalMemory(budget_tokens=400, recent_text_tokens=120)
    for role, text in turns:
        m.add(role, text)
    return m


def test_memory_save_survives_random_sigkills(tmp_path, zygote):
    """A process adding turns and saving after each one is killed at 6 random moments; every time the folder
    loads, holds the last reported save or the one after it, and its pages equal a fresh rendering."""
    from optictx.memory import OpticalMemory

    turns = memory_turns(80)
    (tmp_path / "turns.json").write_text(json.dumps(turns))
    folder, progress = tmp_path / "mem", tmp_path / "progress.txt"
    code = MEMORY_CHILD.format(folder=str(folder), turns=str(tmp_path / "turns.json"), progress=str(progress))
    rng = random.Random(SEED + 1)

    mid_save, counts = 0, []
    for k in range(6):
        before = last_reported(progress)
        pid = zygote.start(f"mem-{k}", code=code)
        kill_after(zygote, pid, lambda b=before: last_reported(progress) > b, rng.uniform(0, 0.6))
        ended = zygote.wait()
        assert ended.signal == signal.SIGKILL, (ended, log_tail(zygote, f"mem-{k}"))
        stray = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
        mid_save += bool(stray)
        done = last_reported(progress)
        m = OpticalMemory.load(folder)
        n = len(m.entries)
        assert n in (done, done + 1), (n, done)  # a finished save is never lost; at most one more landed
        assert memory_snapshot(m) == memory_snapshot(fresh_memory(turns[:n]))
        counts.append(n)
    assert counts[-1] < len(turns)
    # one clean save afterwards removes what the killed saves left behind
    m = OpticalMemory.load(folder)
    m.save(folder)
    named = {p["file"] for p in json.loads((folder / "manifest.json").read_text())["pages"]}
    assert {f"pages/{p.name}" for p in (folder / "pages").iterdir()} == named
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "pages"]
    print(f"\nmemory kills: entries after each kill {counts}; {mid_save} kill(s) left temp files behind")


# --------------------------------------------------------------------------- training checkpoints
CKPT_CHILD = r"""
import hashlib
from pathlib import Path
import torch
from optictx.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
root, progress = Path({root!r}), Path({progress!r})
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(384, 384), torch.nn.Linear(384, 384))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.ones(2, 384)
start = 0
if latest_checkpoint(root) is not None:
    start = load_checkpoint(latest_checkpoint(root), model, opt)["step"]
for step in range(start + 1, 100000):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    with torch.no_grad():  # the weights are a function of the step alone: the test can rebuild them
        g = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    save_checkpoint(root, step, model, opt, extra={{"digest": digest}}, keep=2)
    with open(progress, "a") as f:
        f.write(f"{{step}}\n")
"""


def ckpt_model():
    import torch

    return torch.nn.Sequential(torch.nn.Linear(384, 384), torch.nn.Linear(384, 384))


def expected_weights(step: int) -> list:
    import torch

    g = torch.Generator().manual_seed(step)
    return [torch.randn(p.shape, generator=g) for p in ckpt_model().parameters()]


def test_checkpoint_save_survives_random_sigkills(tmp_path, zygote):
    """A loop saving a checkpoint every step (keep=2) is killed at 8 random moments and resumed from the
    latest checkpoint each time: the latest always loads (model, optimizer, RNG), its files come from one
    save (state.json's digest and the optimizer's step match the weights), and no finished save is lost."""
    import torch

    from optictx.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

    root, progress = tmp_path / "ckpt", tmp_path / "progress.txt"
    code = CKPT_CHILD.format(root=str(root), progress=str(progress))
    rng = random.Random(SEED + 2)

    mid_save, steps = 0, []
    for k in range(8):
        before = last_reported(progress)
        pid = zygote.start(f"ckpt-{k}", code=code)
        kill_after(zygote, pid, lambda b=before: last_reported(progress) > b, rng.uniform(0, 0.5))
        ended = zygote.wait()
        assert ended.signal == signal.SIGKILL, (ended, log_tail(zygote, f"ckpt-{k}"))
        mid_save += any(p.name.startswith(".tmp-step-") for p in root.iterdir())
        done = last_reported(progress)
        latest = latest_checkpoint(root)
        model = ckpt_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        state = load_checkpoint(latest, model, opt)
        assert state["step"] in (done, done + 1), (state["step"], done)
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected_weights(state["step"])))
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        assert state["extra"]["digest"] == digest
        assert all(float(s["step"]) == state["step"] for s in opt.state.values())  # one optimizer step per step
        assert [int(p.name[5:]) for p in list_checkpoints(root)][-1] == state["step"]
        steps.append(state["step"])
    assert steps == sorted(steps) and steps[-1] > steps[0]
    print(f"\ncheckpoint kills: latest step after each kill {steps}; {mid_save} kill(s) landed mid-save")
