"""Training task for the bundled OCR model: read a rendered page back from its vision tokens.

Loss = next-token cross-entropy on the page text (the real objective)
     + ``ctc_weight``   x CTC of each vision token onto the characters its cell covers (grounds the encoder:
                          without it the encoder collapsed to a constant in the probes before this issue),
     + ``guide_weight`` x guided attention: one head in a few decoder layers is told which vision token
                          holds the next character (the decoder otherwise never learned to copy from its input).
Both auxiliary signals come free from the renderer's character positions; neither changes the model or its
inference, and the exported weights are the plain DeepSeek-OCR layout.

Curriculum: pages start with a line or two and grow to full pages; font sizes span low to ~10x compression.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optictx.data.ocr_pages import Level, OCRPage, OCRPageSource, heldout_pages
from optictx.model.attention import apply_rope
from optictx.model.decoder import causal_lm_loss
from optictx.model.vlm import DeepseekOCRForCausalLM
from optictx.tokenizer import Tokenizer

PROMPT_AFTER_IMAGE = "\nFree OCR."
CTC_ALPHABET = string.printable[:95]  # digits, letters, punctuation, space
CTC_INDEX = {c: i + 1 for i, c in enumerate(CTC_ALPHABET)}  # 0 = blank


@dataclass
class OCRTaskConfig:
    seed: int = 0
    batch_size: int = 8
    page_size: int = 256
    grid: int = 4  # vision tokens per side (page_size / 64)
    ctc_weight: float = 0.3
    ctc_frames: int = 96
    line_ctc_weight: float = 1.0  # CTC of each text line read off the SAM neck features (16-px patches)
    line_ctc_sub: int = 4  # frames per patch column for the line reader
    stage: str = "full"  # "encoder": ground the encoder with the CTC losses alone (no decoder), then "full"
    guide_weight: float = 0.5
    guide_layers: tuple[int, ...] = (1, 2)
    curriculum_steps: int = 4000  # steps to grow from 2 lines to full pages
    font_sizes: tuple[int, ...] = (10, 11, 12, 13, 14, 16)
    full_lines: int = 20
    eval_pages: int = 12
    eval_font_sizes: tuple[int, ...] = (10, 12, 14)
    eval_decode_pages: int = 3
    max_new_tokens: int = 400
    extra: dict = field(default_factory=dict)


class CTCHead(nn.Module):
    """Training-only probe: a vision token -> `frames` character distributions (CTC over printable ASCII)."""

    def __init__(self, dim: int, frames: int, hidden: int = 128):
        super().__init__()
        self.frames, self.hidden = frames, hidden
        self.expand = nn.Linear(dim, frames * hidden)
        self.out = nn.Linear(hidden, len(CTC_ALPHABET) + 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [N, D] -> [frames, N, C] log-probs
        h = F.gelu(self.expand(tokens).view(tokens.shape[0], self.frames, self.hidden))
        return self.out(h).log_softmax(-1).transpose(0, 1)


class LineCTCHead(nn.Module):
    """Training-only line reader on the SAM neck output: pool the patch rows under a text line, then
    `sub` frames per patch column -> characters. It grounds the encoder at full resolution (16-px patches,
    ~2.5 characters each) before the 16x compressor, where learning to see glyphs is fast."""

    def __init__(self, channels: int, sub: int, hidden: int = 128):
        super().__init__()
        self.sub, self.hidden = sub, hidden
        self.expand = nn.Linear(channels, sub * hidden)
        self.out = nn.Linear(hidden, len(CTC_ALPHABET) + 1)

    def forward(self, neck: torch.Tensor, rows: torch.Tensor, page_of_line: torch.Tensor) -> torch.Tensor:
        """neck [B, C, R, W], rows [L, R] pooling weights, page_of_line [L] -> log-probs [W*sub, L, classes]."""
        feats = torch.einsum("lr,lcrw->lwc", rows.to(neck.dtype), neck[page_of_line])
        h = F.gelu(self.expand(feats)).view(feats.shape[0], feats.shape[1] * self.sub, self.hidden)
        return self.out(h).log_softmax(-1).transpose(0, 1)


class OCRTrainModule(nn.Module):
    """The model plus its training-only heads, so one state dict checkpoints both.

    Everything that needs gradients happens in ``forward`` so that DDP sees (and all-reduces) it.
    """

    def __init__(self, model: DeepseekOCRForCausalLM, ctc_frames: int, line_sub: int = 4):
        super().__init__()
        self.model = model
        self.ctc_head = CTCHead(model.model.embed_tokens.embedding_dim, ctc_frames)
        self.line_head = LineCTCHead(model.model.sam_model.neck[-1].weight.shape[0], line_sub)

    def forward(self, pix: torch.Tensor, input_ids: torch.Tensor, guide_layers: tuple[int, ...] = (),
                with_ctc: bool = False, line_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                decode: bool = True):
        """-> (fp32 logits [B,T,V], token-CTC log-probs [frames, B*g*g, C] or None, guided-head log-attention
        list, line-CTC log-probs [frames, L, C] or None)."""
        model = self.model
        neck_out: list[torch.Tensor] = []
        neck_hook = model.model.sam_model.neck.register_forward_hook(lambda m, a, out: neck_out.append(out))
        try:
            slots, tokens = image_slots(model, pix)
        finally:
            neck_hook.remove()
        ctc = self.ctc_head(tokens.reshape(-1, tokens.shape[-1])) if with_ctc else None
        lines = self.line_head(neck_out[0], *line_rows) if line_rows is not None and len(line_rows[1]) else None
        if not decode:  # encoder stage: the decoder is not run at all
            return None, ctc, [], lines
        emb = model.model.embed_tokens(input_ids)
        emb = torch.cat([emb[:, :1], slots.to(emb.dtype), emb[:, 1 + slots.shape[1]:]], dim=1)
        captured: list[tuple] = []
        hooks = [model.model.layers[li].self_attn.register_forward_pre_hook(
            lambda mod, args: captured.append((mod, args[0], args[1]))) for li in guide_layers]
        try:
            hidden = model.model(inputs_embeds=emb)
        finally:
            for h in hooks:
                h.remove()
        logits = model.lm_head(hidden).float()
        return logits, ctc, [head_attention_logprobs(*c) for c in captured], lines


def pixels(image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in [-1, 1]: ToTensor then Normalize(mean=std=0.5), as the official transform."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy((arr - 0.5) / 0.5).permute(2, 0, 1).contiguous()


def image_slots(model: DeepseekOCRForCausalLM, pix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,3,S,S] -> (slots [B, g(g+1)+1, D] in the official no-tile layout, token grid [B, g*g, D])."""
    enc = model.model
    grid = enc.feature_grid(pix)  # [B, g, g, D]
    b, g, _, d = grid.shape
    newline = enc.image_newline.to(grid.dtype).expand(b, g, 1, d)
    rows = torch.cat([grid, newline], dim=2).reshape(b, g * (g + 1), d)
    sep = enc.view_seperator.to(grid.dtype).expand(b, 1, d)
    return torch.cat([rows, sep], dim=1), grid.reshape(b, g * g, d)


def slot_of_cell(cell: int, grid: int) -> int:
    """Index inside the image block of grid cell `cell` (row-major), skipping the per-row newlines."""
    return (cell // grid) * (grid + 1) + cell % grid


def token_cells(tok: Tokenizer, text: str, cells: list[int]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and, per token, the cell of its first non-space character (-1 if none)."""
    enc = tok.hf.encode(text, add_special_tokens=False)
    out = []
    for start, end in enc.offsets:
        i = start
        while i < min(end, len(text)) and text[i] == " ":
            i += 1
        if i >= len(text):
            out.append(-1)
        else:
            out.append(cells[i] if i < len(cells) else -1)
    return enc.ids, out


def ctc_targets(page: OCRPage, grid: int) -> list[list[int]]:
    """Per cell, the characters it covers in reading order (newlines dropped)."""
    per_cell: list[list[int]] = [[] for _ in range(grid * grid)]
    for ch, cell in zip(page.text, page.char_cells):
        if ch != "\n" and cell >= 0 and ch in CTC_INDEX:
            per_cell[cell].append(CTC_INDEX[ch])
    return per_cell


class OCRTask:
    def __init__(self, tok: Tokenizer, cfg: OCRTaskConfig):
        self.tok, self.cfg = tok, cfg
        self.source = OCRPageSource(cfg.seed, cfg.page_size, cfg.grid)
        self.n_slots = cfg.grid * (cfg.grid + 1) + 1
        self.prompt_ids = tok.encode(PROMPT_AFTER_IMAGE)
        self._eval_pages: list[OCRPage] | None = None

    # ------------------------------------------------------------------ data
    def level(self, step: int) -> Level:
        grow = min(1.0, step / max(1, self.cfg.curriculum_steps))
        return Level(max_lines=max(2, round(2 + grow * (self.cfg.full_lines - 2))), font_sizes=self.cfg.font_sizes)

    def collate(self, pages: list[OCRPage]) -> dict:
        cfg, tok = self.cfg, self.tok
        seqs, labels, guides, ctcs = [], [], [], []
        head = [tok.bos_id] + [tok.image_token_id] * self.n_slots + self.prompt_ids
        for page in pages:
            ids, cells = token_cells(tok, page.text, page.char_cells)
            seq = head + ids + [tok.eos_id]
            lab = [-100] * len(head) + ids + [tok.eos_id]
            # query position q predicts token q+1: guide it to the slot holding that token's first character
            g = [-1] * len(seq)
            for j, cell in enumerate(cells):
                if cell >= 0:
                    g[len(head) + j - 1] = 1 + slot_of_cell(cell, cfg.grid)
            seqs.append(seq), labels.append(lab), guides.append(g), ctcs.append(ctc_targets(page, cfg.grid))
        line_rows, line_page, line_targets = [], [], []
        patch = cfg.page_size / (cfg.grid * 4)  # SAM patch rows: grid*4 per page (16 px for the tiny model)
        for pi, page in enumerate(pages):
            for text, (_, y1, _, y2) in page.lines:
                edges = torch.arange(cfg.grid * 4 + 1, dtype=torch.float32) * patch
                overlap = (torch.minimum(edges[1:], torch.tensor(y2)) - torch.maximum(edges[:-1], torch.tensor(y1)))
                w = overlap.clamp(min=0)
                if w.sum() <= 0 or not text:
                    continue
                line_rows.append(w / w.sum())
                line_page.append(pi)
                line_targets.append([CTC_INDEX[c] for c in text if c in CTC_INDEX])
        t = max(map(len, seqs))
        pad = lambda rows, v: torch.tensor([r + [v] * (t - len(r)) for r in rows])  # noqa: E731
        return {
            "pixels": torch.stack([pixels(p.image) for p in pages]),
            "input_ids": pad(seqs, tok.pad_id),
            "labels": pad(labels, -100),
            "guide": pad(guides, -1),
            "ctc": ctcs,
            "line_rows": torch.stack(line_rows) if line_rows else torch.zeros(0, cfg.grid * 4),
            "line_page": torch.tensor(line_page, dtype=torch.long),
            "line_targets": line_targets,
            "texts": [p.text for p in pages],
        }

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict:
        cfg = self.cfg
        level = self.level(step)
        base = ((step * 64 + micro) * world + rank) * cfg.batch_size  # unique, replayable page indices
        return self.collate([self.source.page(base + i, level) for i in range(cfg.batch_size)])

    # ------------------------------------------------------------------ loss
    def loss(self, net: nn.Module, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        line_rows = (batch["line_rows"], batch["line_page"]) if cfg.line_ctc_weight > 0 else None
        decode = cfg.stage != "encoder"
        logits, ctc_logp, guide_logp, line_logp = net(batch["pixels"], batch["input_ids"],
                                                      cfg.guide_layers if cfg.guide_weight > 0 and decode else (),
                                                      cfg.ctc_weight > 0, line_rows, decode)
        parts = {"tokens": float((batch["labels"] != -100).sum())}
        total = torch.zeros((), device=batch["pixels"].device)
        if logits is not None:
            lm = causal_lm_loss(logits, batch["labels"])
            total = total + lm
            parts["lm"] = float(lm.detach())
        if guide_logp:
            guide = torch.stack([guided_attention_loss(lp, batch["guide"]) for lp in guide_logp]).mean()
            total = total + cfg.guide_weight * guide
            parts["guide"] = float(guide.detach())
        if ctc_logp is not None:
            ctc = ctc_loss(ctc_logp, [cell for page in batch["ctc"] for cell in page])
            total = total + cfg.ctc_weight * ctc
            parts["ctc"] = float(ctc.detach())
        if line_logp is not None:
            line = ctc_loss(line_logp, batch["line_targets"])
            total = total + cfg.line_ctc_weight * line
            parts["line_ctc"] = float(line.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    # ------------------------------------------------------------------ eval
    def eval_pages(self) -> list[OCRPage]:
        if self._eval_pages is None:
            per = max(1, self.cfg.eval_pages // len(self.cfg.eval_font_sizes))
            self._eval_pages = [p for fs in self.cfg.eval_font_sizes
                                for p in heldout_pages(per, fs, self.cfg.page_size, self.cfg.grid, seed=fs)]
        return self._eval_pages

    @torch.no_grad()
    def evaluate_encoder(self, net: "OCRTrainModule") -> dict[str, float]:
        """Go/no-go gate of the encoder stage: CER of the line reader and of the per-token reader on held-out
        pages (the per-token one says whether the 16 vision tokens carry the text the decoder must read)."""
        from optictx.eval.metrics import character_error_rate

        was_training = net.training
        net.eval()
        pages = self.eval_pages()
        batch = self.collate(pages)
        _, ctc_logp, _, line_logp = net(batch["pixels"], batch["input_ids"], (), True,
                                        (batch["line_rows"], batch["line_page"]), decode=False)
        net.train(was_training)
        line_pred = ctc_greedy(line_logp)
        line_true = ["".join(CTC_ALPHABET[c - 1] for c in t) for t in batch["line_targets"]]
        cells = [cell for page in batch["ctc"] for cell in page]
        cell_pred = ctc_greedy(ctc_logp)
        pairs = [(p, "".join(CTC_ALPHABET[c - 1] for c in t)) for p, t in zip(cell_pred, cells) if t]
        cer = lambda pairs: float(np.mean([character_error_rate(p, g, normalize=False) for p, g in pairs]))  # noqa
        return {"eval_line_cer": cer(list(zip(line_pred, line_true))), "eval_cell_cer": cer(pairs)}

    @torch.no_grad()
    def evaluate(self, net: nn.Module, step: int) -> dict[str, float]:
        """Held-out teacher-forced loss with the true and with swapped images (the gap says reading has
        started), plus greedy-decode precision on a few pages."""
        from optictx.eval.metrics import normalized_edit_distance, ocr_precision_recall

        net = getattr(net, "module", net)
        if self.cfg.stage == "encoder":
            return self.evaluate_encoder(net)
        was_training = net.training
        net.eval()
        pages = self.eval_pages()
        batch = self.collate(pages)
        true_loss = causal_lm_loss(net(batch["pixels"], batch["input_ids"])[0], batch["labels"])
        # control: every page decoded from another page's image
        swap_loss = causal_lm_loss(net(batch["pixels"].roll(1, dims=0), batch["input_ids"])[0], batch["labels"])
        scores = []
        chosen = pages[:: max(1, len(pages) // self.cfg.eval_decode_pages)][: self.cfg.eval_decode_pages]
        for page in chosen:
            pred = greedy_read(net.model, self.tok, page.image, self.cfg.grid, self.cfg.max_new_tokens)
            p, r = ocr_precision_recall(pred, page.text)
            scores.append((p, r, normalized_edit_distance(pred, page.text)))
        net.train(was_training)
        p, r, ned = (float(np.mean(col)) for col in zip(*scores))
        # precision alone rewards short guesses; recall and edit distance show whether the page was read
        return {"eval_loss": float(true_loss), "eval_swapped_loss": float(swap_loss),
                "gap": float(swap_loss - true_loss), "eval_precision": p, "eval_recall": r, "eval_ned": ned}


def ctc_greedy(logp: torch.Tensor) -> list[str]:
    """Best-path CTC decoding of [frames, N, C] log-probs into N strings."""
    out = []
    for seq in logp.argmax(-1).T.tolist():
        chars, prev = [], 0
        for s in seq:
            if s != prev and s != 0:
                chars.append(CTC_ALPHABET[s - 1])
            prev = s
        out.append("".join(chars))
    return out


def head_attention_logprobs(attn: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Causal log-attention [B, T, T] of head 0 of an MHAttention module, recomputed from its input."""
    b, t, _ = x.shape
    d = attn.head_dim
    q = apply_rope(attn.q_proj(x)[..., :d].view(b, 1, t, d), position_ids, attn.rope_theta)[:, 0]
    k = apply_rope(attn.k_proj(x)[..., :d].view(b, 1, t, d), position_ids, attn.rope_theta)[:, 0]
    scores = (q @ k.transpose(-1, -2)).float() / d**0.5
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
    return scores.masked_fill(~causal, float("-inf")).log_softmax(-1)


def guided_attention_loss(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log attention mass on the target key (the slot holding the next character), over guided queries."""
    mask = targets >= 0
    if not mask.any():
        return logp.sum() * 0
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked[mask]).mean()


def ctc_loss(logp: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """CTC of sequences ([frames, N, C] log-probs) onto their character targets, per target character.

    Empty targets are skipped (an empty cell has nothing to teach and would drown the rest in an average);
    targets longer than half the frames are cut, so CTC always has room for blanks between repeats.
    """
    frames_n = logp.shape[0]
    keep = [i for i, t in enumerate(targets) if t]
    if not keep:
        return logp.sum() * 0
    cut = [targets[i][: frames_n // 2] for i in keep]
    lengths = torch.tensor([len(t) for t in cut], device=logp.device)
    concat = torch.tensor([c for t in cut for c in t], dtype=torch.long, device=logp.device)
    frames = torch.full((len(keep),), frames_n, dtype=torch.long, device=logp.device)
    sel = logp[:, torch.tensor(keep, device=logp.device)].float()
    total = F.ctc_loss(sel, concat, frames, lengths, blank=0, reduction="sum", zero_infinity=True)
    return total / lengths.sum()


@torch.no_grad()
def greedy_read(model: DeepseekOCRForCausalLM, tok: Tokenizer, image, grid: int, max_new_tokens: int = 400) -> str:
    """Greedy decoding with the KV cache (a minimal reader used during training evaluation)."""
    from optictx.model.cache import KVCache

    pix = pixels(image)[None]
    slots, _ = image_slots(model, pix)
    head_ids = torch.tensor([[tok.bos_id] + [tok.image_token_id] * slots.shape[1] + tok.encode(PROMPT_AFTER_IMAGE)])
    emb = model.model.embed_tokens(head_ids)
    emb = torch.cat([emb[:, :1], slots.to(emb.dtype), emb[:, 1 + slots.shape[1]:]], dim=1)
    cache = KVCache(len(model.model.layers))
    hidden = model.model(inputs_embeds=emb, cache=cache)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model.lm_head(hidden[:, -1]).argmax(-1))
        if nxt == tok.eos_id:
            break
        out.append(nxt)
        hidden = model.model(input_ids=torch.tensor([[nxt]]), cache=cache)
    return tok.decode(out)
