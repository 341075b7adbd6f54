"""Supervised stages of the visual-primitives pipeline (lineage §5.3, §9 step 7) on the generic loop.

One task class serves every SFT-shaped stage; a recipe stage only changes its *mixture* (which generators,
in which proportions, in which thinking modes) and, for unified RFT, replaces the gold answers by filtered
expert rollouts:

* pretrain on boxes and points (grounding + pointing answers, which *are* primitive lists);
* the grounding specialist (counting and spatial reasoning that cite boxes, plus general questions);
* the pointing specialist (counting that cites points, maze DFS narrations, path tracing, plus general);
* the ablation without primitives (every prompt "Answer directly", gold answers with no primitives);
* unified RFT: the same loss on expert rollouts (``records``), retrained from the pretrained checkpoint.

Sequence layout (ours; the paper does not publish its template): the image slots come first, so with the
block2x2 token order every CSA entry of a full 2×2 cell is a spatial square (vit.py), then the chat turn::

    <image>×N <|User|>{prompt}<|Assistant|>{answer}<eos>

Only the answer (and EOS) is supervised. A batch is right-padded; prompts are never left-padded during
generation either (rollouts batch equal-length prompts), so CSA blocks sit on the same slots in training
and inference.
"""
from __future__ import annotations

import bisect
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optictx.config import dataclass_from
from optictx.data import mazes, paths, scenes
from optictx.data.sample import MODES, Sample
from optictx.errors import ConfigError
from optictx.rewards import score
from optictx.tokenizer import Tokenizer
from optictx.train.guidance import guided_attention_loss, window_head_logprobs

USER, ASSISTANT = "<|User|>", "<|Assistant|>"
TASKS: dict[str, Callable[..., Sample]] = {
    "grounding": scenes.grounding, "pointing": scenes.pointing, "counting": scenes.counting,
    "spatial": scenes.spatial, "general": scenes.general, "maze": mazes.maze, "path": paths.path,
}
_CONFIG_OF = {"grounding": "scene", "pointing": "scene", "counting": "scene", "spatial": "scene",
              "general": "scene", "maze": "maze", "path": "path"}
_CONFIG_CLASS = {"scene": scenes.SceneConfig, "maze": mazes.MazeConfig, "path": paths.PathConfig}


# ----------------------------------------------------------------------------- mixtures


@dataclass
class Mixture:
    """Which samples a stage sees: task weights, thinking-mode weights and the generators' configs.

    ``modes`` may be one dict for all tasks or ``{task: {mode: weight}}`` per task.
    """

    tasks: dict[str, float]
    modes: dict[str, Any] = field(default_factory=lambda: {"trigger": 0.7, "auto": 0.3})
    scene: dict[str, Any] = field(default_factory=dict)
    maze: dict[str, Any] = field(default_factory=dict)
    path: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = set(self.tasks) - set(TASKS)
        if bad or not self.tasks or min(self.tasks.values()) < 0 or sum(self.tasks.values()) <= 0:
            raise ConfigError(f"mixture tasks {self.tasks} must be positive weights over {sorted(TASKS)}")
        self._names = sorted(self.tasks)
        self._p = np.array([self.tasks[t] for t in self._names], float)
        self._p /= self._p.sum()
        self._configs = {k: dataclass_from(_CONFIG_CLASS[k], getattr(self, k), f"mixture.{k}").validate()
                         for k in _CONFIG_CLASS}
        for t in self._names:
            self._mode_table(t)

    def _mode_table(self, task: str) -> tuple[list[str], np.ndarray]:
        spec = self.modes.get(task, self.modes) if isinstance(self.modes.get(task), dict) else self.modes
        spec = {k: v for k, v in spec.items() if k in MODES}
        if not spec or min(spec.values()) < 0 or sum(spec.values()) <= 0:
            raise ConfigError(f"mixture modes for {task} must be positive weights over {MODES}, got {self.modes}")
        names = sorted(spec)
        p = np.array([spec[m] for m in names], float)
        return names, p / p.sum()

    def config(self, task: str):
        return self._configs[_CONFIG_OF[task]]

    def draw(self, seed: int, index: int) -> tuple[str, str]:
        """(task, mode) of sample ``index``: a pure function of (seed, index)."""
        r = np.random.default_rng([int(seed), int(index), 97])
        task = self._names[int(r.choice(len(self._names), p=self._p))]
        modes, p = self._mode_table(task)
        return task, modes[int(r.choice(len(modes), p=p))]

    def sample(self, seed: int, index: int) -> Sample:
        task, mode = self.draw(seed, index)
        return make_sample(task, seed, index, mode, self.config(task))


def make_sample(task: str, seed: int, index: int, mode: str, cfg=None) -> Sample:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return TASKS[task](seed, index, cfg, mode=mode)


# ----------------------------------------------------------------------------- encoding


def image_tensor(sample_or_image, cfg) -> torch.Tensor:
    """PIL image -> the ViT's normalised [3, H, W] input (sides already multiples of 42 stay as they are)."""
    from optictx.model.vit import prepare_vit_image

    image = sample_or_image.image if isinstance(sample_or_image, Sample) else sample_or_image
    return prepare_vit_image(image, cfg)


def n_image_tokens(pixels: torch.Tensor, cfg) -> int:
    unit = cfg.patch_size * cfg.merge_size
    return (pixels.shape[-2] // unit) * (pixels.shape[-1] // unit)


def prompt_ids(tok: Tokenizer, n_image: int, prompt: str) -> list[int]:
    """``<image>×N <|User|>{prompt}<|Assistant|>`` (see module doc)."""
    return [tok.image_token_id] * n_image + tok.encode(f"{USER}{prompt}{ASSISTANT}")


def encode_example(tok: Tokenizer, pixels: torch.Tensor, prompt: str, answer: str, cfg) -> tuple[list[int], list[int]]:
    """(input ids, labels) with only the answer and EOS supervised."""
    head = prompt_ids(tok, n_image_tokens(pixels, cfg), prompt)
    body = tok.encode(answer) + [tok.eos_id]
    return head + body, [-100] * len(head) + body


def collate(tok: Tokenizer, examples: Sequence[tuple[torch.Tensor, str, str]], cfg, max_len: int,
            pointers: bool = False) -> dict:
    """Right-padded batch of (pixels, prompt, answer); answers longer than ``max_len`` total are cut.

    ``pointers``: also list, per cited coordinate group of each answer, (row, query position, image slot) for
    the pointer auxiliary (see :class:`PrimitivesTrainModule`), and give ``guide`` [B, T]: the image slot
    every position that writes a group's digits should look at (-1 elsewhere), for guided attention.
    """
    ids, labels, pix, ptr, xy, spans = [], [], [], [], [], []
    for row, (pixels, prompt, answer) in enumerate(examples):
        i, lab = encode_example(tok, pixels, prompt, answer, cfg)
        ids.append(i[:max_len])
        labels.append(lab[:max_len])
        pix.append(pixels)
        if pointers:
            head = len(i) - len(tok.encode(answer)) - 1
            for q, slot, x, y, last in pointer_targets(tok, answer, head, pixels, cfg):
                if q < max_len:
                    ptr.append((row, q, slot))
                    xy.append((x, y))
                    spans.append((row, q, min(last, max_len - 1), slot))
    t = max(map(len, ids))
    pad = lambda rows, v: torch.tensor([r + [v] * (t - len(r)) for r in rows])  # noqa: E731
    batch = {"input_ids": pad(ids, tok.pad_id), "labels": pad(labels, -100), "pixel_values": pix}
    if pointers:
        batch["pointers"] = torch.tensor(ptr, dtype=torch.long).reshape(-1, 3)
        batch["pointer_xy"] = torch.tensor(xy, dtype=torch.float32).reshape(-1, 2)
        guide = torch.full((len(ids), t), -1, dtype=torch.long)
        for row, first, last, slot in spans:
            guide[row, first:last + 1] = slot
        batch["guide"] = guide
    return batch


# ----------------------------------------------------------------------------- grounding auxiliaries

_COORDS = re.compile(r"\[(\d{1,3}),(\d{1,3})(?:,(\d{1,3}),(\d{1,3}))?\]")


def slot_order(pixels: torch.Tensor, cfg) -> tuple[int, int, torch.Tensor]:
    """(rows, cols, raster index -> position in the image span) of an image's merged tokens."""
    from optictx.model.vit import token_order

    unit = cfg.patch_size * cfg.merge_size
    hh, ww = pixels.shape[-2] // unit, pixels.shape[-1] // unit
    order = token_order(hh, ww, cfg.image_token_order)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return hh, ww, inverse


def pointer_targets(tok: Tokenizer, answer: str, head_len: int, pixels: torch.Tensor, cfg
                    ) -> list[tuple[int, int, float, float, int]]:
    """For each ``[x,y]`` / ``[x1,y1,x2,y2]`` in a gold answer: (the position whose next token is the group's
    first digit, the image slot holding the point / box centre, that point's x, y in 0..1, and the position
    whose next token is the group's last digit)."""
    hh, ww, inverse = slot_order(pixels, cfg)
    starts = [a for a, _ in tok.hf.encode(answer, add_special_tokens=False).offsets]
    out = []
    for m in _COORDS.finditer(answer):
        v = [int(g) for g in m.groups() if g is not None]
        x, y = ((v[0] + v[2]) / 2, (v[1] + v[3]) / 2) if len(v) == 4 else (v[0], v[1])
        col, row = min(ww - 1, int(x / 999 * ww)), min(hh - 1, int(y / 999 * hh))
        t = bisect.bisect_right(starts, m.start(1)) - 1  # the token holding the first digit
        last = bisect.bisect_right(starts, m.end() - 2) - 1  # ... and the last one (before "]")
        if t >= 1:
            out.append((head_len + t - 1, int(inverse[row * ww + col]), x / 999, y / 999, head_len + last - 1))
    return out


def appearance_targets(pixels: torch.Tensor, cfg) -> torch.Tensor:
    """[N, 27]: the mean colour of each 14-px patch of every merged token's 3×3 group, in image-span order."""
    _, _, inverse = slot_order(pixels, cfg)
    m, p = cfg.merge_size, cfg.patch_size
    pooled = F.avg_pool2d(pixels[None].float(), p)[0]  # [3, H/14, W/14]
    c, h, w = pooled.shape
    cells = pooled.view(c, h // m, m, w // m, m).permute(1, 3, 2, 4, 0).reshape(-1, m * m * c)  # raster
    out = torch.empty_like(cells)
    out[inverse] = cells
    return out


@dataclass
class AuxOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None
    vision_tokens: list[torch.Tensor] | None  # the image encoder's tokens, one tensor per image
    hidden: torch.Tensor | None  # final normed decoder states [B, T, D]
    guided: list[torch.Tensor] = field(default_factory=list)  # log-attention of the guided heads, per layer


class PrimitivesTrainModule(nn.Module):
    """The model plus two training-only heads that make it *look* (the exported model is ``.model``).

    Trained on primitives alone, a model from scratch learns the answer format and ignores the image (the
    teacher-forced loss with swapped images equals the true one). Two auxiliaries, both free from the data:

    * appearance: every image token predicts the mean colours of the 9 patches it merged (MSE), so tokens
      carry what their 42×42 px cell shows (cf. the OCR task's CTC head);
    * pointer: at the position that writes a coordinate group, a query projection of the decoder state must
      pick, among the image tokens' states, the one whose cell holds that point or box centre (cross-entropy;
      cf. the OCR task's guided attention, but on hidden states, so it works for MLA, CSA and MHA alike);
    * coordinates: that same state must hold the point's (x, y) linearly (MSE), which only attending to the
      right image token (and its frame stamp) can give; the LM head then spells it as digits;
    * guided attention: one head of a few decoder layers is told which image token the positions writing a
      coordinate group should look at (-log attention mass on it), as the OCR model's guided attention. The
      three above left the decoder blind in a first run (swapped-image loss gap 0.002 nats after 250 steps):
      the pointer head can match the *prompt's* object to the image tokens without the decoder ever reading
      them, and the coordinate MSE's gradient alone did not open the path.
    """

    def __init__(self, model: nn.Module, ptr_dim: int = 64):
        super().__init__()
        self.model = model
        d, m = model.config.hidden_size, model.config.merge_size
        self.appearance = nn.Linear(d, 3 * m * m)
        self.ptr_q = nn.Linear(d, ptr_dim)
        self.ptr_k = nn.Linear(d, ptr_dim)
        self.coord = nn.Linear(d, 2)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, pixel_values=None, labels=None, guide_layers: Sequence[int] = (),
                guide_heads: int = 1, **kwargs):
        captured: dict[str, Any] = {}
        guided: list[torch.Tensor] = []

        def read_layer(mod, args):  # the layer's own input, inside its forward
            guided.append(window_head_logprobs(mod, args[0], args[1], guide_heads))

        hooks = [self.model.vision.register_forward_hook(lambda mod, a, o: captured.__setitem__("vision", o)),
                 self.model.norm.register_forward_hook(lambda mod, a, o: captured.__setitem__("hidden", o))]
        hooks += [self.model.layers[i].self_attn.register_forward_pre_hook(read_layer) for i in guide_layers]
        try:
            out = self.model(input_ids=input_ids, pixel_values=pixel_values, labels=labels, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        return AuxOutput(out.logits, out.loss, captured.get("vision"), captured.get("hidden"), guided)

    def appearance_loss(self, vision_tokens: Sequence[torch.Tensor], pixel_values, cfg) -> torch.Tensor:
        pred = torch.cat([self.appearance(t) for t in vision_tokens])
        target = torch.cat([appearance_targets(p, cfg) for p in pixel_values]).to(pred)
        return F.mse_loss(pred, target)

    def pointer_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, pointers: torch.Tensor,
                     image_token_id: int) -> torch.Tensor:
        if len(pointers) == 0:
            return hidden.sum() * 0
        losses = []
        for row in pointers[:, 0].unique().tolist():
            mine = pointers[pointers[:, 0] == row]
            slots = (input_ids[row] == image_token_id).nonzero().squeeze(-1)
            keys = self.ptr_k(hidden[row, slots])  # [N, d]
            queries = self.ptr_q(hidden[row, mine[:, 1]])  # [k, d]
            logits = queries @ keys.T / keys.shape[-1] ** 0.5
            losses.append(F.cross_entropy(logits.float(), mine[:, 2], reduction="sum"))
        return torch.stack(losses).sum() / len(pointers)

    def coord_loss(self, hidden: torch.Tensor, pointers: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """The state that writes a coordinate group must hold the point's (x, y) linearly (MSE in 0..1 units)."""
        if len(pointers) == 0:
            return hidden.sum() * 0
        pred = self.coord(hidden[pointers[:, 0], pointers[:, 1]]).float()
        return F.mse_loss(torch.sigmoid(pred), xy.to(pred))


def tokenizer_texts(mixture: Mixture, seed: int, n: int) -> list[str]:
    """Prompts and answers of ``n`` samples: what the stage's BPE is trained on."""
    out = []
    for i in range(n):
        s = mixture.sample(seed, i)
        out.append(f"{USER}{s.prompt}{ASSISTANT}{s.target}")
    return out


# ----------------------------------------------------------------------------- generation


@dataclass
class Rollout:
    sample: Sample
    texts: list[str]
    token_ids: list[list[int]]
    prompt: list[int]
    pixels: torch.Tensor
    stopped: list[bool] = field(default_factory=list)  # ended with EOS (else cut by max_new_tokens)


@torch.no_grad()
def rollouts(model: nn.Module, tok: Tokenizer, samples: Sequence[Sample], n: int = 1, *,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             max_rows: int = 32, prompts: Sequence[str] | None = None,
             progress: str | None = None) -> list[Rollout]:
    """``n`` completions per sample, batching only prompts of equal length (no padding ever).

    ``prompts`` overrides each sample's prompt (the evaluation's "direct" ablation uses it); ``progress``
    names a progress bar over the samples (stderr), for long evaluations.
    """
    from tqdm import tqdm

    from optictx.generate import GenerationConfig, generate

    cfg = model.config
    was_training = model.training
    model.eval()
    items = []
    for k, s in enumerate(samples):
        pixels = image_tensor(s, cfg)
        prompt = prompts[k] if prompts is not None else s.prompt
        items.append(Rollout(s, [], [], prompt_ids(tok, n_image_tokens(pixels, cfg), prompt), pixels))
    by_len: dict[int, list[int]] = defaultdict(list)
    for k, item in enumerate(items):
        by_len[len(item.prompt)].append(k)
    per_batch = max(1, max_rows // n)
    call = 0
    bar = tqdm(total=len(items), desc=progress, unit="sample", disable=progress is None, leave=True)
    for length in sorted(by_len):
        group = by_len[length]
        for start in range(0, len(group), per_batch):
            chunk = group[start:start + per_batch]
            rows = [items[k].prompt for k in chunk for _ in range(n)]
            pix = [items[k].pixels for k in chunk for _ in range(n)]
            gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed * 100_003 + call, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
            out = generate(model, torch.tensor(rows), gen, prefill={"pixel_values": pix})
            call += 1
            for j, k in enumerate(chunk):
                ids = out.token_ids[j * n:(j + 1) * n]
                items[k].token_ids.extend(ids)
                items[k].texts.extend(tok.decode(t) for t in ids)
                items[k].stopped.extend(r == "eos" for r in out.finish_reasons[j * n:(j + 1) * n])
            bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return items


def greedy_scores(model: nn.Module, tok: Tokenizer, samples: Sequence[Sample], max_new_tokens: int) -> dict[str, float]:
    """Correct fraction and mean reward of one greedy decode per sample: every stage's training-time eval."""
    outs = rollouts(model, tok, samples, 1, max_new_tokens=max_new_tokens)
    rs = [score(o.sample, o.texts[0]) for o in outs]
    return {"eval_correct": float(np.mean([r.correct for r in rs])),
            "eval_reward": float(np.mean([r.total for r in rs]))}


# ----------------------------------------------------------------------------- the SFT task


@dataclass
class SFTConfig:
    seed: int = 0
    batch_size: int = 8
    max_len: int = 1024
    eval_samples: int = 24  # teacher-forced held-out loss
    eval_decode: int = 8  # greedy decodes scored with the rewards
    eval_seed: int = 1_000_003  # held-out seed range: never used for training
    max_new_tokens: int = 320
    appearance_weight: float = 0.0  # any auxiliary weight > 0: train through PrimitivesTrainModule
    pointer_weight: float = 0.0
    coord_weight: float = 0.0
    guide_weight: float = 0.0  # guided attention (see PrimitivesTrainModule)
    guide_layers: tuple[int, ...] = (1,)  # layer 0 cannot know yet which object the prompt asks for
    guide_heads: int = 1


@dataclass
class Record:
    """One RFT example: a sample id and the expert text that replaces its gold answer."""

    task: str
    seed: int
    index: int
    mode: str
    text: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__, ensure_ascii=False)


def read_records(path: str | Path) -> list[Record]:
    with open(path, encoding="utf-8") as f:
        return [Record(**json.loads(line)) for line in f if line.strip()]


class PrimitivesSFTTask:
    """Task protocol of ``train.loop``: batch(step, micro, rank, world), loss(net, batch, step), evaluate."""

    def __init__(self, tok: Tokenizer, model_cfg, mixture: Mixture, cfg: SFTConfig,
                 records: Sequence[Record] | None = None):
        self.tok, self.model_cfg, self.mixture, self.cfg = tok, model_cfg, mixture, cfg
        self.records = list(records) if records is not None else None
        if self.records is not None and not self.records:
            raise ConfigError("RFT needs at least one record (no expert rollout passed the filter)")
        self._eval: list[Sample] | None = None

    def example(self, index: int) -> tuple[torch.Tensor, str, str]:
        if self.records is None:
            s = self.mixture.sample(self.cfg.seed, index)
            return image_tensor(s, self.model_cfg), s.prompt, s.target
        rec = self.records[index % len(self.records)]
        s = make_sample(rec.task, rec.seed, rec.index, rec.mode, self.mixture.config(rec.task))
        return image_tensor(s, self.model_cfg), s.prompt, rec.text

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict:
        bs = self.cfg.batch_size
        base = ((step * 64 + micro) * world + rank) * bs  # unique, replayable sample indices
        if self.records is not None:  # epochs over the records, reshuffled per epoch
            order = np.random.default_rng([self.cfg.seed, base // max(1, len(self.records))]).permutation(
                len(self.records))
            idx = [int(order[(base + i) % len(self.records)]) for i in range(bs)]
        else:
            idx = [base + i for i in range(bs)]
        # pointer targets come from gold coordinates only (an RFT record's coordinates may be wrong)
        c = self.cfg
        pointers = (c.pointer_weight > 0 or c.coord_weight > 0 or c.guide_weight > 0) and self.records is None
        return collate(self.tok, [self.example(i) for i in idx], self.model_cfg, self.cfg.max_len, pointers)

    @property
    def auxiliary(self) -> bool:
        c = self.cfg
        return c.appearance_weight > 0 or c.pointer_weight > 0 or c.coord_weight > 0 or c.guide_weight > 0

    def loss(self, net: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        guide = self.cfg.guide_weight > 0 and "guide" in batch
        extra = {"guide_layers": self.cfg.guide_layers, "guide_heads": self.cfg.guide_heads} if guide else {}
        out = net(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"], **extra)
        tokens = float((batch["labels"] != -100).sum())
        total, parts = out.loss, {"lm": float(out.loss.detach()), "tokens": tokens}
        heads = getattr(net, "module", net)
        if self.cfg.appearance_weight > 0:
            app = heads.appearance_loss(out.vision_tokens, batch["pixel_values"], self.model_cfg)
            total = total + self.cfg.appearance_weight * app
            parts["appearance"] = float(app.detach())
        if self.cfg.pointer_weight > 0 and "pointers" in batch:
            ptr = heads.pointer_loss(out.hidden, batch["input_ids"], batch["pointers"], self.model_cfg.image_token_id)
            total = total + self.cfg.pointer_weight * ptr
            parts["pointer"] = float(ptr.detach())
        if self.cfg.coord_weight > 0 and "pointers" in batch:
            coord = heads.coord_loss(out.hidden, batch["pointers"], batch["pointer_xy"])
            total = total + self.cfg.coord_weight * coord
            parts["coord"] = float(coord.detach())
        if guide:
            ga = torch.stack([guided_attention_loss(lp, batch["guide"]) for lp in out.guided]).mean()
            total = total + self.cfg.guide_weight * ga
            parts["guide"] = float(ga.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    def eval_samples(self) -> list[Sample]:
        if self._eval is None:
            self._eval = [self.mixture.sample(self.cfg.eval_seed, i) for i in range(self.cfg.eval_samples)]
        return self._eval

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Held-out teacher-forced loss (and its gap to swapped images), rewards of a few greedy decodes."""
        model = getattr(model, "module", model)
        model = model.model if isinstance(model, PrimitivesTrainModule) else model
        was = model.training
        model.eval()
        samples = self.eval_samples()
        losses, swapped = [], []
        for start in range(0, len(samples), self.cfg.batch_size):
            chunk = samples[start:start + self.cfg.batch_size]
            b = collate(self.tok, [(image_tensor(s, self.model_cfg), s.prompt, s.target) for s in chunk],
                        self.model_cfg, self.cfg.max_len)
            losses.append(float(model(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                                      labels=b["labels"]).loss))
            # control: each answer read from another sample's image of the same size (the gap says the model
            # looks at the image; a model that ignores it has gap 0)
            other = [next((q for q in b["pixel_values"][k + 1:] + b["pixel_values"][:k] if q.shape == p.shape), p)
                     for k, p in enumerate(b["pixel_values"])]
            swapped.append(float(model(input_ids=b["input_ids"], pixel_values=other, labels=b["labels"]).loss))
        logs = {"eval_loss": float(np.mean(losses)), "gap": float(np.mean(swapped) - np.mean(losses))}
        if self.cfg.eval_decode:
            logs.update(greedy_scores(model, self.tok, samples[: self.cfg.eval_decode], self.cfg.max_new_tokens))
        model.train(was)
        return logs


# ----------------------------------------------------------------------------- model folders


def save_model(model: nn.Module, tok: Tokenizer, folder: str | Path, dtype: str = "float32") -> Path:
    """config.json + model.safetensors + tokenizer: a folder ``load_model`` (and ``optictx reason``) reads."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    tensors = {k: (v.to(torch_dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    tmp = folder / ".model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(folder / "model.safetensors")
    tok.save(folder)
    config = model.config.to_dict() | {"torch_dtype": dtype, "model_type": "optictx-primitives"}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """-> (PrimitivesModel in eval mode, Tokenizer) from a ``save_model`` folder."""
    from optictx.config import PrimitivesConfig
    from optictx.errors import WeightsError
    from optictx.model.reasoner import PrimitivesModel
    from optictx.weights import load_into

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder} has no config.json; expected a folder written by save_model / a stage")
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    raw = {k: v for k, v in raw.items() if k not in ("torch_dtype", "model_type")}
    cfg = PrimitivesConfig.from_dict(raw)
    model = PrimitivesModel(cfg)
    load_into(model, folder / "model.safetensors", dtype, device)
    return model.to(device=device, dtype=dtype).eval(), Tokenizer.from_pretrained(folder)
