"""Tokenizers: the official DeepSeek-OCR ``tokenizer.json`` and the small byte-level BPE we train.

Both are HF ``tokenizers`` objects behind one small wrapper, so the rest of optictx only sees
``encode``/``decode`` and the ids it needs (BOS, EOS, PAD, ``<image>``). Grounding tokens are never
skipped when decoding: the boxes live in them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from optictx.errors import TokenizerError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image>"
# Official DeepSeek-OCR additions (reference §6), then the visual-primitives language (lineage §5.2).
OCR_TOKENS = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<td>", "</td>", "<tr>", "</tr>",
              "<|User|>", "<|Assistant|>"]
PRIMITIVE_TOKENS = ["<|box|>", "<|/box|>", "<|point|>", "<|/point|>", "<|visual_thinking|>"]
# Our tiny tokenizers put the specials first so BOS/EOS/PAD keep the official ids 0/1/2.
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE, *OCR_TOKENS, *PRIMITIVE_TOKENS]
GRID_TOKENIZER_CLASS = "OptictxGridTokenizer"  # tokenizer_config.json of the tiny model's cell-tagged characters


@dataclass
class Tokenizer:
    """A thin wrapper: ids for the prompt builder and decode that keeps special tokens."""

    hf: HFTokenizer
    bos_token: str = BOS
    eos_token: str = EOS
    pad_token: str = PAD

    def _id(self, token: str) -> int:
        idx = self.hf.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"tokenizer has no {token!r} token")
        return idx

    @property
    def bos_id(self) -> int:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int:
        return self._id(self.pad_token)

    @property
    def image_token_id(self) -> int:
        return self._id(IMAGE)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS (the prompt builder adds them)."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def special_ids(self) -> set[int]:
        return {i for t in SPECIAL_TOKENS if (i := self.hf.token_to_id(t)) is not None}

    # ------------------------------------------------------------------ I/O
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(folder / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Tokenizer":
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` for the BOS/EOS/PAD names) from a folder."""
        folder = Path(folder)
        path = folder / "tokenizer.json" if folder.is_dir() else folder
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json at {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception on bad json
            raise TokenizerError(f"cannot read {path}: {e}") from e
        names, cfg = {}, {}
        cfg_path = path.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{cfg_path} is not valid UTF-8 JSON: {e}") from None
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
            for key in ("bos_token", "eos_token", "pad_token"):
                value = cfg.get(key)
                if isinstance(value, dict):  # AddedToken serialisation
                    value = value.get("content")
                if isinstance(value, str):
                    names[key] = value
        if cfg.get("tokenizer_class") == GRID_TOKENIZER_CLASS:
            from optictx.grid_tokenizer import from_config

            tok = from_config(hf, cfg, names)
        else:
            tok = cls(hf, **names)
        if hf.token_to_id(IMAGE) is None:
            raise TokenizerError(f"{path} has no {IMAGE} token; it cannot drive an OCR model")
        return tok


def train_bpe(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts`, with the official special tokens at ids 0.. (BOS=0, EOS=1, PAD=2).

    Byte-level means any input round-trips through encode/decode, even characters never seen in training.
    """
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
