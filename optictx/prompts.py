"""The official DeepSeek-OCR prompts and the raw prompt layout the model was trained on.

The official ``infer()`` formats the conversation with the ``plain`` template, which drops roles and
separators and strips whitespace: the model sees only the prompt text (reference deepseek-ocr.md §7.1).
The processor then lays the ids out as (§3.3)::

    [BOS] + encode(text before <image>) + [<image> id] * n_slots + encode(text after <image>)

with no EOS, and ``images_seq_mask`` True exactly on the slots.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from optictx.errors import GenerationError

IMAGE = "<image>"
PAGE_SPLIT = "\n<--- Page Split --->\n"  # the official PDF runner joins pages' markdown with this

# reference §7.2 (README and the vLLM scripts' config.py)
PROMPTS: dict[str, str] = {
    "markdown": "<image>\n<|grounding|>Convert the document to markdown.",
    "ocr": "<image>\n<|grounding|>OCR this image.",
    "free-ocr": "<image>\nFree OCR.",
    "figure": "<image>\nParse the figure.",
    "describe": "<image>\nDescribe this image in detail.",
    "locate": "<image>\nLocate <|ref|>{target}<|/ref|> in the image.",
}


def prompt_text(name_or_text: str, target: str | None = None) -> str:
    """A prompt name (``markdown``, ``ocr``, ``free-ocr``, ``figure``, ``describe``, ``locate``) or raw text.

    Raw text must contain ``<image>`` (the model has to see the page). ``locate`` needs ``target``: the
    thing to find, written between ``<|ref|>`` tags.
    """
    if not isinstance(name_or_text, str) or not name_or_text.strip():
        raise GenerationError(f"prompt must be a name ({', '.join(PROMPTS)}) or text with <image>")
    key = name_or_text.strip().lower()
    if key in PROMPTS:
        if key == "locate":
            if not target or not str(target).strip():
                raise GenerationError("the 'locate' prompt needs a target, e.g. target='the signature'")
            if "<|" in target:
                raise GenerationError(f"target {target!r} must not contain special tokens")
            return PROMPTS[key].format(target=str(target).strip())
        if target is not None:
            raise GenerationError(f"target is only used by the 'locate' prompt, not {key!r}")
        return PROMPTS[key]
    if IMAGE not in name_or_text:
        raise GenerationError(
            f"prompt {name_or_text!r} is neither a known name ({', '.join(PROMPTS)}) nor text containing "
            "<image>; write e.g. '<image>\\nFree OCR.'"
        )
    return name_or_text


@dataclass
class Prompt:
    """Token ids and the image-slot mask of one raw prompt."""

    input_ids: list[int]
    images_seq_mask: list[bool]
    text: str

    @property
    def n_image_slots(self) -> int:
        return sum(self.images_seq_mask)

    def __len__(self) -> int:
        return len(self.input_ids)


def build_prompt(tokenizer, text: str, n_slots: int | Sequence[int]) -> Prompt:
    """BOS + text pieces (encoded without special-token additions) + ``n_slots[i]`` image ids per ``<image>``.

    ``n_slots`` is ``ImageViews.n_slots`` (one int, or one per ``<image>`` in order). Whitespace around the
    whole prompt is stripped, as the official ``plain`` template does.
    """
    text = text.strip()
    slots = [n_slots] if isinstance(n_slots, int) else list(n_slots)
    pieces = text.split(IMAGE)
    if len(pieces) - 1 != len(slots):
        raise GenerationError(f"the prompt has {len(pieces) - 1} <image> tag(s) but {len(slots)} image(s) were given")
    if any(n <= 0 for n in slots):
        raise GenerationError(f"image slot counts must be positive, got {slots}")
    image_id = tokenizer.image_token_id
    ids, mask = [tokenizer.bos_id], [False]
    for i, piece in enumerate(pieces):
        if piece:
            enc = tokenizer.encode(piece)
            ids += enc
            mask += [False] * len(enc)
        if i < len(slots):
            ids += [image_id] * slots[i]
            mask += [True] * slots[i]
    return Prompt(ids, mask, text)
