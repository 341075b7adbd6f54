"""`optictx memory ...`: keep a conversation or documents as optical memory in a folder.

    optictx memory add notes.txt                    # one turn (role "user"); creates ./optictx-memory
    optictx memory add chat.jsonl                   # one turn per line: {"role": ..., "content": ...}
    optictx memory add paper.txt --document         # a document, chunked; its older chunks fade first
    optictx memory show --budget 2000               # ledger and decay schedule at that budget
    optictx memory recall "what is the code for locker 17?"   # decode the images, best passages
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from optictx.errors import ConfigError

DEFAULT_DIR = "optictx-memory"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="optical memory: old context kept as fading page images under a budget",
                       description=__doc__.split("\n\n")[0])
    cmd = p.add_subparsers(dest="memory_command", metavar="ACTION")

    a = cmd.add_parser("add", help="add a text file (one turn), a .jsonl chat, or a document (--document)")
    a.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text, .jsonl turns, or - for stdin")
    _dir(a)
    a.add_argument("--role", default="user", help="role of a plain-text turn (default user)")
    a.add_argument("--document", action="store_true", help="chunk the file as a document (one turn per chunk)")
    a.add_argument("--chunk-tokens", type=int, default=256, help="document chunk size in tokens (default 256)")
    new = a.add_argument_group("settings of a new memory (ignored when the folder already has one)")
    new.add_argument("--budget", type=int, default=2000, help="total context budget in tokens (default 2000)")
    new.add_argument("--recent", type=int, default=500, help="newest tokens kept as text (default 500)")
    new.add_argument("--schedule", choices=["tiny", "mono", "paper"], default="tiny",
                     help="tiny: 256-px grid pages the bundled model reads (one level, oldest forgotten); "
                          "mono: 256-px pages at 16->10 px fonts; paper: Large->Base->Small->Tiny->nano")
    new.add_argument("--by", choices=["budget", "age"], default="budget",
                     help="budget: scale the decay curve to fit; age: apply --min-age as given")
    new.add_argument("--min-age", help="turns at which each level after the first begins, e.g. 8,32,128")
    new.add_argument("--count", choices=["vision_tokens", "decoder_slots"], default="vision_tokens",
                     help="what an image costs: the paper's vision tokens or the decoder slots it fills")
    a.set_defaults(func=run_add)

    s = cmd.add_parser("show", help="print the ledger (item, age, mode, tokens) and the decay schedule")
    _dir(s)
    s.add_argument("--budget", type=int, help="budget to plan for (default: the memory's)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=run_show)

    r = cmd.add_parser("recall", help="decode the memory's images and print the passages best matching a query")
    r.add_argument("query")
    _dir(r)
    r.add_argument("--budget", type=int, help="budget to plan for (default: the memory's)")
    r.add_argument("-k", type=int, default=3, help="passages to print (default 3)")
    r.add_argument("--model", default="tiny", help="OCR model: tiny (bundled), a folder, or a hub id")
    r.add_argument("--mode", help="OCR mode override (default: the model's own)")
    r.set_defaults(func=run_recall)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])


def _dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"memory folder (default ./{DEFAULT_DIR})")


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no file at {path}") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise ConfigError(f"cannot read {path} as UTF-8 text: {e}") from None


def jsonl_turns(text: str, path: str) -> list[tuple[str, str]]:
    """``{"role": ..., "content": ...}`` per line (``text`` is accepted for ``content``); blank lines skipped."""
    turns = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            turns.append((str(obj["role"]), str(obj.get("content", obj.get("text")))))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{path}:{n}: expected a JSON object with 'role' and 'content'") from None
    return turns


def open_memory(args: argparse.Namespace, create: bool = False):
    from optictx.memory import DecaySchedule, OpticalMemory

    folder = Path(args.dir)
    if (folder / "manifest.json").exists() or not create:
        return OpticalMemory.load(folder)
    kw = {"by": args.by}
    if args.min_age:
        try:
            kw["min_age"] = tuple(int(v) for v in args.min_age.split(","))
        except ValueError:
            raise ConfigError(f"--min-age must be integers separated by commas, got {args.min_age!r}") from None
    schedule = {"tiny": DecaySchedule.tiny, "mono": DecaySchedule.mono, "paper": DecaySchedule.paper}[args.schedule](**kw)
    return OpticalMemory(args.budget, args.recent, schedule, count=args.count)


def run_add(args: argparse.Namespace) -> int:
    mem = open_memory(args, create=True)
    before = len(mem.entries)
    for path in args.files:
        text = _read(path)
        if args.document:
            mem.add_document(text, chunk_tokens=args.chunk_tokens)
        elif path.endswith(".jsonl"):
            for role, content in jsonl_turns(text, path):
                mem.add(role, content)
        else:
            mem.add(args.role, text)
    mem.save(args.dir)
    led = mem.context().ledger
    print(f"added {len(mem.entries) - before} turn(s) to {args.dir}: {len(mem.entries)} turns, "
          f"{led.total_tokens}/{led.budget} tokens in context standing for {led.represented_text_tokens} text tokens")
    return 0


def _fmt_age(v: float) -> str:
    return "never" if v == float("inf") else f"{v:g}"


def run_show(args: argparse.Namespace) -> int:
    mem = open_memory(args)
    led = mem.context(args.budget).ledger
    if args.json:
        rows = [dict(vars(r), compression=r.compression) for r in led.rows]
        print(json.dumps({"budget": led.budget, "count": led.count, "recent_text_tokens": led.recent_text_tokens,
                          "image_tokens": led.image_tokens, "total_tokens": led.total_tokens,
                          "image_text_tokens": led.image_text_tokens, "text_tokens_saved": led.text_tokens_saved,
                          "forgotten_text_tokens": led.forgotten_text_tokens,
                          "scale": None if led.scale == float("inf") else led.scale,
                          "schedule": [dict(r, from_age=None if r["from_age"] == float("inf") else r["from_age"])
                                       for r in led.schedule], "items": rows}, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    summary = Table(title=f"optical memory {args.dir}: {len(mem.entries)} turns", show_header=False)
    for k, v in (("budget", f"{led.budget} tokens ({led.count})"),
                 ("in context", f"{led.total_tokens} = {led.recent_text_tokens} recent text + "
                                f"{led.image_tokens} image"),
                 ("images stand for", f"{led.image_text_tokens} text tokens"),
                 ("text tokens saved", str(led.text_tokens_saved)),
                 ("forgotten", f"{led.forgotten_text_tokens} text tokens"),
                 ("decay scale", "none needed" if led.scale == float("inf")
                  else f"x{led.scale:.3g} of the schedule's ages")):
        summary.add_row(k, v)
    console.print(summary)
    sched = Table(title="decay schedule at this budget")
    for col in ("level", "mode", "page px", "font px", "tokens/page", "from age (turns)", "made by"):
        sched.add_column(col, justify="right")
    for r in led.schedule:
        sched.add_row(f"L{r['level']}", r["mode"], str(r["side"]), f"{r['font_px']:g}", str(r["tokens_per_page"]),
                      _fmt_age(r["from_age"]), r["made_by"])
    console.print(sched)
    items = Table(title="items, oldest first (vision/slots: image cost; text: tokens the item stands for)")
    for col in ("item", "turns", "age", "level", "mode", "font", "pages", "vision", "slots", "text", "ratio"):
        items.add_column(col, justify="right")
    for r in led.rows:
        gone = r.level is None
        items.add_row(str(r.item), f"{r.first_turn}-{r.last_turn}", str(r.age), "gone" if gone else f"L{r.level}",
                      "-" if gone else r.mode, "-" if gone else f"{r.font_px:g}", str(r.pages), str(r.vision_tokens),
                      str(r.decoder_slots), str(r.text_tokens), "-" if gone else f"{r.compression:.1f}x",
                      style="dim" if gone else None)
    console.print(items)
    return 0


def run_recall(args: argparse.Namespace) -> int:
    from optictx.ocr import OCR

    mem = open_memory(args)
    mem.reader = OCR(args.model, mode=args.mode, prompt="free-ocr", max_new_tokens=1024)
    for p in mem.recall(args.query, k=args.k, budget_tokens=args.budget):
        where = "recent text" if p.source == "text" else f"image L{p.level}, item {p.item}"
        print(f"[{p.score:5.1f}] turns {p.first_turn}-{p.last_turn} ({where}): {p.text}")
    return 0
