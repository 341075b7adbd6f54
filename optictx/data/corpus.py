"""Text sources for synthetic pages, split so held-out evaluation text never appears in training.

Training text mixes
- natural English prose: docstrings of a fixed list of Python standard-library modules (PSF licence,
  present wherever Python is),
- Faker text, names, addresses, numbers (MIT),
- "numbers": training words interleaved with numbers and codes (``4831``, ``14A``, ``cedar42``, ``3.75``),
  since invoices, tables and remembered facts are mostly digits, and
- shuffled words and random character strings, which carry no language prior: the model can only
  get them right by reading the pixels (a decoder that leans on its language model fails them).

Held-out text comes from another source entirely: licence texts bundled in ``heldout.txt`` (copied
verbatim from Debian's /usr/share/common-licenses, which the licences themselves allow).
"""
from __future__ import annotations

import importlib
import inspect
import random
import re
import string
import warnings
from functools import lru_cache
from pathlib import Path

from optictx.errors import ConfigError

PRINTABLE = set(string.printable) - set("\t\r\x0b\x0c")
# Modules whose docstrings are training prose. Held-out text never comes from here.
TRAIN_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fileinput",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma",
    "mailbox", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "queue", "quopri",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "turtle", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "wave", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)
HELDOUT_PATH = Path(__file__).with_name("heldout.txt")


def clean(text: str) -> str:
    """Collapse whitespace and keep printable ASCII: what the bundled tiny model is trained to read."""
    text = re.sub(r"\s+", " ", text).strip()
    return "".join(c for c in text if c in PRINTABLE)


def _paragraphs(doc: str) -> list[str]:
    paras = [clean(p) for p in re.split(r"\n\s*\n", doc)]
    return [p for p in paras if len(p) >= 40 and not p.startswith((">>>", "..."))]


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[str, ...]:
    """Paragraphs from the docstrings of TRAIN_MODULES and their public members (deterministic order)."""
    out: list[str] = []
    with warnings.catch_warnings():  # e.g. typing.io deprecation warnings raised by merely looking
        warnings.simplefilter("ignore")
        for name in TRAIN_MODULES:
            out.extend(_module_paragraphs(name))
    return tuple(dict.fromkeys(out))  # de-duplicate, keep order


def _module_paragraphs(name: str) -> list[str]:
    try:
        module = importlib.import_module(name)
    except Exception:  # a module missing from a minimal Python build is skipped, not fatal
        return []
    docs = [inspect.getdoc(module) or ""]
    for attr in sorted(dir(module)):
        obj = None if attr.startswith("_") else getattr(module, attr, None)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == module.__name__:
            docs.append(inspect.getdoc(obj) or "")
    return [p for doc in docs for p in _paragraphs(doc)]


@lru_cache(maxsize=1)
def heldout_paragraphs() -> tuple[str, ...]:
    """Held-out evaluation paragraphs (licence texts), never used for training or the tokenizer."""
    text = HELDOUT_PATH.read_text(encoding="utf-8")
    return tuple(_paragraphs(text))


DEFAULT_WEIGHTS = {"prose": 0.45, "faker": 0.2, "shuffled": 0.2, "random": 0.15}
SOURCES = (*DEFAULT_WEIGHTS, "numbers", "caps")


class TextSampler:
    """Draws training text of a requested length from the mixture; a seed fixes the stream."""

    def __init__(self, seed: int, weights: dict[str, float] | None = None):
        from faker import Faker

        self.rng = random.Random(seed)
        self.faker = Faker("en_US")
        self.faker.seed_instance(seed)
        self.prose = prose_paragraphs()
        self.words = sorted({w for p in self.prose[:2000] for w in p.split() if w.isalpha() and len(w) < 14})
        self.weights = weights or DEFAULT_WEIGHTS
        unknown = set(self.weights) - set(SOURCES)
        if unknown:
            raise ConfigError(f"unknown text sources {sorted(unknown)}; choose from {sorted(SOURCES)}")

    def sample(self, n_chars: int) -> str:
        kind = self.rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        return getattr(self, f"_{kind}")(n_chars)[:n_chars].rstrip()

    def _prose(self, n: int) -> str:
        i = self.rng.randrange(len(self.prose))
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < n:
            para = self.prose[i % len(self.prose)]
            if not parts:  # start mid-paragraph at a word boundary for variety
                words = para.split()
                para = " ".join(words[self.rng.randrange(max(1, len(words) // 2)):])
            parts.append(para)
            i += 1
        return " ".join(parts)

    def _faker(self, n: int) -> str:
        parts: list[str] = []
        f = self.faker
        makers = [lambda: f.sentence(nb_words=10), f.name, lambda: f.address().replace("\n", ", "), f.company,
                  f.email, f.phone_number, lambda: f.date(), lambda: str(f.random_number(digits=7)), f.url]
        while sum(len(p) + 1 for p in parts) < n:
            parts.append(self.rng.choice(makers)())
        return clean(" ".join(parts))

    def _caps(self, n: int) -> str:
        """Prose in capitals, as licences and notices shout: with capitals only as word starts and in random
        strings, the reader garbled all-caps lines (session 8: 'AN "AS-IS" BASIS.' -> 'WY HASTES< 3ASLSS')."""
        return self._prose(n).upper()

    def _shuffled(self, n: int) -> str:
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < n:
            w = self.rng.choice(self.words)
            r = self.rng.random()
            w = w.capitalize() if r < 0.15 else w.upper() if r < 0.2 else w
            if self.rng.random() < 0.1:
                w += self.rng.choice(",.;:!?")
            parts.append(w)
        return " ".join(parts)

    def _numbers(self, n: int) -> str:
        """Training words with a number or code every few words: plain integers of 1-6 digits, a number with
        a letter (``14A``), a word with digits (``cedar42``), a decimal, a time or a date."""
        r = self.rng
        makers = [
            lambda: str(r.randrange(10 ** r.randint(1, 6))),
            lambda: f"{r.randrange(1, 100)}{r.choice(string.ascii_uppercase)}",
            lambda: f"{r.choice(self.words).lower()}{r.randrange(1, 1000)}",
            lambda: f"{r.randrange(0, 1000)}.{r.randrange(0, 100):02d}",
            lambda: f"{r.randrange(0, 24):02d}:{r.randrange(0, 60):02d}",
            lambda: f"{r.randrange(1, 29)}/{r.randrange(1, 13)}/{r.randrange(1900, 2100)}",
        ]
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < n:
            parts.append(r.choice(makers)() if r.random() < 0.35 else r.choice(self.words))
            if r.random() < 0.08:
                parts[-1] += r.choice(",.;:")
        return " ".join(parts)

    def _random(self, n: int) -> str:
        alphabet = string.ascii_letters + string.digits + string.punctuation
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < n:
            k = self.rng.randint(1, 9)
            parts.append("".join(self.rng.choice(alphabet) for _ in range(k)))
        return " ".join(parts)


def tokenizer_training_text(seed: int = 0, n_samples: int = 20000) -> list[str]:
    """The text the bundled BPE is trained on: all training prose plus samples of the other sources."""
    sampler = TextSampler(seed)
    return list(prose_paragraphs()) + [sampler.sample(400) for _ in range(n_samples)]
