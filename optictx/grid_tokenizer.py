"""Cell-tagged characters: the output vocabulary of the bundled tiny OCR model.

The tiny model reads a typewriter grid (optictx.data.ocr_pages): each vision token covers 8 columns x 4 lines
of character cells. With a BPE vocabulary its 4-layer decoder never learned to keep track of *where* on the
page the next character is (issue 6: it read the first token and then guessed), because that means adding up
the lengths of variable-length tokens since the last line break, a sum a small transformer does not learn.

So this vocabulary says the position out loud. A page is written as, for every line and every vision token
the line crosses, a marker naming the token (``<|tok5|>``) followed by the characters of that stretch, each
tagged with its cell inside the token (``e@13`` = "e", row 1, column 5 of the token). The token a character
sits in is the latest marker; its cell is one more than the previous tag. Both are read off the last few
input tokens, so the decoder only has to look at the right vision token and read the glyph in that cell.
``decode`` puts every character back at its (row, column): the text comes back with its line breaks, and
the tags never reach the user.

Plain characters (for prompts like "\\nFree OCR.") and the official special tokens are in the vocabulary too.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from optictx.errors import TokenizerError
from optictx.tokenizer import GRID_TOKENIZER_CLASS, SPECIAL_TOKENS, Tokenizer

UNK = "<unk>"
ALPHABET = string.printable[:95]  # digits, letters, punctuation, space: what the grid pages draw
PLAIN = ALPHABET + "\n"


def marker(token: int) -> str:
    return f"<|tok{token}|>"


def tagged(ch: str, cell: int) -> str:
    return f"{ch}@{cell}"


@dataclass(frozen=True)
class GridGeometry:
    """Vision tokens per page side, and character cells per vision token (columns x rows)."""

    grid: int = 4
    cols: int = 8
    rows: int = 4

    @property
    def cells(self) -> int:
        return self.cols * self.rows

    @property
    def page_tokens(self) -> int:
        """Ids of a full page: a tag per cell, and a marker each time a line enters a vision token."""
        return (self.cells + self.rows) * self.grid * self.grid

    def place(self, row: int, col: int) -> tuple[int, int]:
        """Page (row, column) of a character -> (vision token, cell inside it)."""
        token = (row // self.rows) * self.grid + col // self.cols
        return token, (row % self.rows) * self.cols + col % self.cols

    def locate(self, token: int, cell: int) -> tuple[int, int]:
        """Inverse of ``place``."""
        return ((token // self.grid) * self.rows + cell // self.cols,
                (token % self.grid) * self.cols + cell % self.cols)


def vocabulary(geom: GridGeometry) -> list[str]:
    """Specials first (BOS/EOS/PAD keep ids 0/1/2), then plain characters, markers, tagged characters."""
    return ([*SPECIAL_TOKENS, UNK] + list(PLAIN) + [marker(t) for t in range(geom.grid * geom.grid)]
            + [tagged(ch, cell) for cell in range(geom.cells) for ch in ALPHABET])


@dataclass
class GridTokenizer(Tokenizer):
    geom: GridGeometry = field(default_factory=GridGeometry)

    def __post_init__(self) -> None:
        vocab = self.hf.get_vocab()
        self.kind: dict[int, tuple] = {}  # id -> ("tag", ch, cell) | ("marker", token) | ("text", string)
        for tok, i in vocab.items():
            if tok.startswith("<|tok") and tok.endswith("|>") and tok[5:-2].isdigit():
                self.kind[i] = ("marker", int(tok[5:-2]))
            elif len(tok) >= 3 and tok[-1].isdigit() and "@" in tok[1:] and len(tok.rsplit("@", 1)[0]) == 1:
                ch, cell = tok.rsplit("@", 1)
                self.kind[i] = ("tag", ch, int(cell))
            else:
                self.kind[i] = ("text", tok)
        self.special = self.special_ids() | {vocab[UNK]}
        self.tag_ids = {(k[1], k[2]): i for i, k in self.kind.items() if k[0] == "tag"}
        self.marker_ids = {k[1]: i for i, k in self.kind.items() if k[0] == "marker"}

    # whole-sequence decode: a slice without its marker does not know where its characters go
    needs_full_context = True

    def encode_lines(self, lines: Sequence[str]) -> tuple[list[int], list[int]]:
        """Grid lines -> (ids, the vision token each id is about). Characters outside the alphabet raise."""
        ids, tokens = [], []
        for row, line in enumerate(lines):
            current = None
            for col, ch in enumerate(line):
                token, cell = self.geom.place(row, col)
                if token != current:
                    ids.append(self.marker_ids[token])
                    tokens.append(token)
                    current = token
                if (ch, cell) not in self.tag_ids:
                    raise TokenizerError(f"{ch!r} is not in the grid alphabet (printable ASCII)")
                ids.append(self.tag_ids[ch, cell])
                tokens.append(token)
        return ids, tokens

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        placed: dict[tuple[int, int], str] = {}
        token = 0

        def flush() -> None:
            if placed:
                out.append(layout(placed))
                placed.clear()

        for i in ids:
            kind = self.kind.get(int(i))
            if kind is None:
                continue
            if kind[0] == "marker":
                token = kind[1]
            elif kind[0] == "tag":
                placed[self.geom.locate(token, kind[2])] = kind[1]
            elif not (skip_special_tokens and int(i) in self.special):
                flush()
                out.append(kind[1])
        flush()
        return "".join(out)

    def save(self, folder: str | Path) -> None:
        super().save(folder)
        path = Path(folder) / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config.update(tokenizer_class=GRID_TOKENIZER_CLASS, grid=self.geom.grid, cell_cols=self.geom.cols,
                      cell_rows=self.geom.rows)
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def layout(placed: dict[tuple[int, int], str]) -> str:
    """{(row, col): char} -> text: rows joined by newlines, gaps inside a line filled with spaces."""
    rows: dict[int, dict[int, str]] = {}
    for (r, c), ch in placed.items():
        rows.setdefault(r, {})[c] = ch
    lines = []
    for r in range(max(rows) + 1):
        cols = rows.get(r, {})
        lines.append("".join(cols.get(c, " ") for c in range(max(cols) + 1)).rstrip() if cols else "")
    return "\n".join(lines)


def build_grid_tokenizer(geom: GridGeometry = GridGeometry()) -> GridTokenizer:
    vocab = {tok: i for i, tok in enumerate(vocabulary(geom))}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")  # one character per token
    hf.add_special_tokens(SPECIAL_TOKENS)
    return GridTokenizer(hf, geom=geom)


def from_config(hf: HFTokenizer, config: dict, names: dict) -> GridTokenizer:
    geom = GridGeometry(config.get("grid", 4), config.get("cell_cols", 8), config.get("cell_rows", 4))
    return GridTokenizer(hf, geom=geom, **names)
