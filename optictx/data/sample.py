"""What every visual-primitives task produces: one :class:`Sample` = image + prompt + gold answer + the ground
truth a verifier needs to score *any* model output for it.

A sample is a pure function of ``(seed, index)`` (and the generator's config): generators draw everything from
``rng(seed, index, task)``, so a training run, a GRPO rollout pool and an evaluation can all regenerate the
same sample from three integers instead of storing images.

Thinking modes (lineage §5.2 "Activation", and its limitation 2 which we go beyond):

* ``trigger`` — the prompt starts with ``<|visual_thinking|>`` and the gold answer thinks with primitives.
* ``auto``    — no trigger: the gold answer uses primitives exactly when the question needs them (counting,
  spatial relations, mazes, curves) and answers directly when it does not (``general`` questions), so the
  model learns *when* to think with primitives instead of depending on the trigger.
* ``direct``  — the prompt ends with "Answer directly." and the gold answer has no primitives: the data of the
  ablation without primitives in the reasoning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from optictx.errors import ConfigError

TRIGGER = "<|visual_thinking|>"
DIRECT_SUFFIX = " Answer directly."
MODES = ("trigger", "auto", "direct")

# Every task name a generator can produce; the id feeds the RNG so tasks with equal (seed, index) differ.
TASK_IDS = {"grounding": 1, "pointing": 2, "counting": 3, "spatial": 4, "general": 5, "maze": 6, "path": 7}


@dataclass
class Sample:
    """One training / evaluation example.

    ``answer`` is what the final ``\\boxed{}`` must hold ("" for grounding and pointing, whose answer *is* the
    primitive list). ``meta`` holds the verifier's ground truth as plain JSON-able values (0-999 units).
    """

    task: str
    image: Image.Image
    prompt: str
    target: str
    answer: str
    mode: str
    seed: int
    index: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_primitives(self) -> bool:
        """Whether the gold answer cites boxes or points."""
        return "<|box|>" in self.target or "<|point|>" in self.target


def rng(seed: int, index: int, task: str) -> np.random.Generator:
    """The one RNG of a sample: independent streams per (seed, index, task), stable across processes."""
    if task not in TASK_IDS:
        raise ConfigError(f"unknown task {task!r}; expected one of {sorted(TASK_IDS)}")
    if seed < 0 or index < 0:
        raise ConfigError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), int(index), TASK_IDS[task]])


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"thinking mode {mode!r} is not one of {MODES}")
    return mode


def check_side(side: int, what: str = "image side") -> int:
    """Image sides are multiples of 42 px (patch 14 × merge 3) so the ViT never pads or resizes."""
    if not isinstance(side, int) or side < 84 or side % 42:
        raise ConfigError(f"{what} must be a multiple of 42 px and at least 84, got {side!r}")
    return side


def wrap_prompt(question: str, mode: str) -> str:
    """The user text for a thinking mode (see module doc)."""
    check_mode(mode)
    if mode == "trigger":
        return TRIGGER + question
    if mode == "direct":
        return question + DIRECT_SUFFIX
    return question


def boxed(value: object) -> str:
    return f"\\boxed{{{value}}}"


def pick(r: np.random.Generator, items):
    """One element of a sequence, drawn with the sample's RNG (``r.choice`` would turn tuples into arrays)."""
    return items[int(r.integers(len(items)))]
