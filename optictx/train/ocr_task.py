"""Training task for the bundled OCR model: read a rendered page back from its vision tokens.

Loss = next-token cross-entropy on the page text (the real objective)
     + ``glyph_weight`` x character probe on the SAM neck: each 16-px patch must tell which of its two grid
                          cells holds which character (grounds the encoder at full resolution, where seeing
                          glyphs is learned fastest),
     + ``token_weight`` x character probe on the vision tokens: each of the 16 tokens must tell the character
                          at each of its 32 grid cells (so the tokens carry the text the decoder must read),
     + ``guide_weight`` x guided attention: one head in a few decoder layers is told which vision token
                          holds the next character (the decoder otherwise never learned to copy from its input),
     + ``cursor_weight`` x cursor probe: a linear read-out of those layers' input must name the cell (0-31) of
                          the next character inside its vision token (the decoder read the first token only).
All auxiliary signals come free from the grid layout (optictx.data.ocr_pages); the probes are training-only
heads, so the exported weights are the plain DeepSeek-OCR layout. With the cell-tagged vocabulary
(optictx.grid_tokenizer, the bundled model's) every text id names its vision token and cell, so the guide
targets come straight from the tags and the cursor probe has nothing left to teach (cursor_weight 0).

Curriculum: pages start with a line or two and grow to full pages (16 lines, 6-9x compression).
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optictx.data.ocr_pages import (CELL_H, CELL_W, NEWLINE, Level, OCRPage, OCRPageSource, heldout_pages,
                                    newlines_look_ahead)
from optictx.model.decoder import causal_lm_loss
from optictx.model.vlm import DeepseekOCRForCausalLM
from optictx.grid_tokenizer import GridTokenizer
from optictx.tokenizer import Tokenizer
from optictx.train.guidance import guided_attention_loss, head_attention_logprobs

PROMPT_AFTER_IMAGE = "\nFree OCR."
CHAR_ALPHABET = string.printable[:95]  # digits, letters, punctuation, space
CHAR_INDEX = {c: i + 1 for i, c in enumerate(CHAR_ALPHABET)}  # 0 = unused (kept for a stable class layout)


@dataclass
class OCRTaskConfig:
    seed: int = 0
    batch_size: int = 8
    page_size: int = 256
    grid: int = 4  # vision tokens per side (page_size / 64)
    glyph_weight: float = 1.0  # character probe on the SAM neck (16-px patches)
    token_weight: float = 1.0  # character probe on the vision tokens
    stage: str = "full"  # "encoder": train the encoder with the probes alone (no decoder), then "full"
    guide_weight: float = 0.5
    cursor_weight: float = 0.0  # probe on the guided layers' input: which cell of its vision token is read next
    guide_layers: tuple[int, ...] = (1, 2)
    guide_heads: int = 1  # guided heads per layer: one head's 64-d value carries only part of a 32-cell token
    curriculum_steps: int = 4000  # steps to grow from 2 lines to full pages
    full_lines: int = 16
    eval_pages: int = 12
    eval_lines: tuple[int, ...] = (4, 8, 16)
    eval_decode_pages: int = 3
    max_new_tokens: int = 640  # a full grid page: <= 512 tagged characters + 64 markers
    text_weights: dict | None = None  # training text mixture (optictx.data.corpus.SOURCES); None = default
    extra: dict = field(default_factory=dict)


class CharProbe(nn.Module):
    """Training-only probe: (a feature vector, which grid cell of it) -> the character drawn in that cell.

    Each cell has its own first layer (all cells of all vectors in one GEMM, then the asked rows are picked):
    a vision token holds 32 cells, and a shared layer with an additive cell embedding left ~8 hidden units
    per cell, too few to read a character out of a 256-d token (the token probe stayed at chance).
    """

    def __init__(self, dim: int, cells: int, hidden: int = 128):
        super().__init__()
        self.cells, self.hidden = cells, hidden
        self.proj = nn.Linear(dim, cells * hidden)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, len(CHAR_ALPHABET) + 1))

    def forward(self, feats: torch.Tensor, index: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """feats [M, D] (every vector of the batch), index [N] into them, cell [N] -> logits [N, classes]."""
        h = self.proj(feats).view(feats.shape[0], self.cells, self.hidden)
        return self.mlp(h[index, cell])


class OCRTrainModule(nn.Module):
    """The model plus its training-only probes, so one state dict checkpoints both.

    Everything that needs gradients happens in ``forward`` so that DDP sees (and all-reduces) it.
    """

    def __init__(self, model: DeepseekOCRForCausalLM, patch_cells: int, token_cells: int):
        super().__init__()
        self.model = model
        self.glyph_probe = CharProbe(model.model.sam_model.neck[-1].weight.shape[0], patch_cells)
        self.token_probe = CharProbe(model.model.embed_tokens.embedding_dim, token_cells)
        self.cursor_probe = nn.Linear(model.model.embed_tokens.embedding_dim, token_cells)

    def forward(self, pix: torch.Tensor, input_ids: torch.Tensor, guide_layers: tuple[int, ...] = (),
                sites: "ProbeSites | None" = None, decode: bool = True, guide_heads: int = 1):
        """-> (fp32 logits [B,T,V] or None, guided-head log-attention list, glyph-probe logits [N, C] or None,
        token-probe logits [N, C] or None, cursor-probe logits list [B, T, cells] per guided layer)."""
        model = self.model
        neck_out: list[torch.Tensor] = []
        neck_hook = model.model.sam_model.neck.register_forward_hook(lambda m, a, out: neck_out.append(out))
        try:
            slots, tokens = image_slots(model, pix)
        finally:
            neck_hook.remove()
        glyph = token = None
        if sites is not None and len(sites.patch_index):
            neck = neck_out[0].permute(0, 2, 3, 1).flatten(0, 2)  # [B*R*W, C], row-major patches
            glyph = self.glyph_probe(neck, sites.patch_index, sites.patch_cell)
            token = self.token_probe(tokens.flatten(0, 1), sites.token_index, sites.token_cell)
        if not decode:  # encoder stage: the decoder is not run at all
            return None, [], glyph, token, []
        emb = model.model.embed_tokens(input_ids)
        emb = torch.cat([emb[:, :1], slots.to(emb.dtype), emb[:, 1 + slots.shape[1]:]], dim=1)
        guided: list[torch.Tensor] = []
        cursor: list[torch.Tensor] = []

        def read_layer(mod, args):
            # inside the layer's forward, where its weights are whole even when FSDP shards them between uses
            guided.append(head_attention_logprobs(mod, args[0], args[1], heads=guide_heads))
            cursor.append(self.cursor_probe(args[0]).float())

        hooks = [model.model.layers[li].self_attn.register_forward_pre_hook(read_layer) for li in guide_layers]
        try:
            hidden = model.model(inputs_embeds=emb)
        finally:
            for h in hooks:
                h.remove()
        logits = model.lm_head(hidden).float()
        return logits, guided, glyph, token, cursor


@dataclass
class ProbeSites:
    """Index of the SAM patch and of the vision token under every character, the cell inside each, labels."""

    patch_index: torch.Tensor
    patch_cell: torch.Tensor
    token_index: torch.Tensor
    token_cell: torch.Tensor
    label: torch.Tensor

    @staticmethod
    def of(pages: list[OCRPage], page_size: int, grid: int) -> "ProbeSites":
        found = [(pi, r, c, CHAR_INDEX[ch]) for pi, page in enumerate(pages) for r, (text, _) in enumerate(page.lines)
                 for c, ch in enumerate(text) if ch in CHAR_INDEX]
        page, row, col, label = torch.tensor(found, dtype=torch.long).reshape(-1, 4).unbind(1)
        patch = page_size // (grid * 4)  # 16-px SAM patches: grid*4 per side
        px, py = patch // CELL_W, patch // CELL_H  # grid cells per patch (2 x 1)
        tx, ty = px * 4, py * 4  # grid cells per vision token (8 x 4)
        per_side = grid * 4
        return ProbeSites(
            patch_index=(page * per_side + row // py) * per_side + col // px,
            patch_cell=(row % py) * px + col % px,
            token_index=(page * grid + row // ty) * grid + col // tx,
            token_cell=(row % ty) * tx + col % tx,
            label=label,
        )

    @staticmethod
    def cells(page_size: int, grid: int) -> tuple[int, int]:
        """(cells per patch, cells per token): how many first layers each probe needs."""
        patch = page_size // (grid * 4)
        n = (patch // CELL_W) * (patch // CELL_H)
        return n, n * 16


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
    """Token ids of `text` and, per token, the value `cells` gives its first non-space character (-1 if none)."""
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


def cursor_cells(page: OCRPage, tx: int, ty: int) -> list[int]:
    """Per character of `page.text`, which of the tx*ty grid cells of its vision token it sits in; a newline
    takes the next character's (where the reader goes next)."""
    out: list[int] = []
    for r, (text, _) in enumerate(page.lines):
        if r:
            out.append(NEWLINE)
        out += [(r % ty) * tx + c % tx for c in range(len(text))]
    return newlines_look_ahead(out)


class OCRTask:
    def __init__(self, tok: Tokenizer, cfg: OCRTaskConfig):
        self.tok, self.cfg = tok, cfg
        self.source = OCRPageSource(cfg.seed, cfg.page_size, cfg.grid, cfg.text_weights)
        self.n_slots = cfg.grid * (cfg.grid + 1) + 1
        patch = cfg.page_size // (cfg.grid * 4)
        self.token_shape = (patch // CELL_W * 4, patch // CELL_H * 4)  # grid cells per vision token (8 x 4)
        self.prompt_ids = tok.encode(PROMPT_AFTER_IMAGE)
        self._eval_pages: list[OCRPage] | None = None

    # ------------------------------------------------------------------ data
    def level(self, step: int) -> Level:
        grow = min(1.0, step / max(1, self.cfg.curriculum_steps))
        return Level(max_lines=max(2, round(2 + grow * (self.cfg.full_lines - 2))))

    def collate(self, pages: list[OCRPage]) -> dict:
        cfg, tok = self.cfg, self.tok
        seqs, labels, guides, cursors = [], [], [], []
        head = [tok.bos_id] + [tok.image_token_id] * self.n_slots + self.prompt_ids
        tx, ty = self.token_shape
        for page in pages:
            if isinstance(tok, GridTokenizer):  # cell-tagged characters: each id names its vision token
                ids, cells = tok.encode_lines([line for line, _ in page.lines])
                cur = [tok.kind[i][2] if tok.kind[i][0] == "tag" else -1 for i in ids]
            else:
                ids, cells = token_cells(tok, page.text, page.char_cells)
                _, cur = token_cells(tok, page.text, cursor_cells(page, tx, ty))
            seq = head + ids + [tok.eos_id]
            lab = [-100] * len(head) + ids + [tok.eos_id]
            # query position q predicts token q+1: guide it to the slot holding that token's first character,
            # and ask it where inside that slot the character is (the cursor)
            g, k = [-1] * len(seq), [-1] * len(seq)
            for j, (cell, cc) in enumerate(zip(cells, cur)):
                if cell >= 0:
                    g[len(head) + j - 1] = 1 + slot_of_cell(cell, cfg.grid)
                    k[len(head) + j - 1] = cc
            seqs.append(seq), labels.append(lab), guides.append(g), cursors.append(k)
        t = max(map(len, seqs))
        pad = lambda rows, v: torch.tensor([r + [v] * (t - len(r)) for r in rows])  # noqa: E731
        return {
            "pixels": torch.stack([pixels(p.image) for p in pages]),
            "input_ids": pad(seqs, tok.pad_id),
            "labels": pad(labels, -100),
            "guide": pad(guides, -1),
            "cursor": pad(cursors, -1),
            "sites": ProbeSites.of(pages, cfg.page_size, cfg.grid),
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
        decode = cfg.stage != "encoder"
        probe = cfg.glyph_weight > 0 or cfg.token_weight > 0
        guided = cfg.guide_layers if (cfg.guide_weight > 0 or cfg.cursor_weight > 0) and decode else ()
        logits, guide_logp, glyph, token, cursor = net(batch["pixels"], batch["input_ids"], guided,
                                                       batch["sites"] if probe else None, decode, cfg.guide_heads)
        parts = {"tokens": float((batch["labels"] != -100).sum())}
        total = torch.zeros((), device=batch["pixels"].device)
        if logits is not None:
            lm = causal_lm_loss(logits, batch["labels"])
            total = total + lm
            parts["lm"] = float(lm.detach())
        if cursor and cfg.cursor_weight > 0:
            where = torch.stack([F.cross_entropy(c.transpose(1, 2), batch["cursor"], ignore_index=-1)
                                 for c in cursor]).mean()
            total = total + cfg.cursor_weight * where
            parts["cursor"] = float(where.detach())
        if guide_logp and cfg.guide_weight > 0:
            guide = torch.stack([guided_attention_loss(lp, batch["guide"]) for lp in guide_logp]).mean()
            total = total + cfg.guide_weight * guide
            parts["guide"] = float(guide.detach())
        for name, weight, out in (("glyph", cfg.glyph_weight, glyph), ("token", cfg.token_weight, token)):
            if out is not None and weight > 0:
                loss = F.cross_entropy(out.float(), batch["sites"].label)
                total = total + weight * loss
                parts[name] = float(loss.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    # ------------------------------------------------------------------ eval
    def eval_pages(self) -> list[OCRPage]:
        if self._eval_pages is None:
            per = max(1, self.cfg.eval_pages // len(self.cfg.eval_lines))
            self._eval_pages = [p for n in self.cfg.eval_lines
                                for p in heldout_pages(per, n, self.cfg.page_size, self.cfg.grid, seed=n)]
        return self._eval_pages

    @torch.no_grad()
    def probe_accuracy(self, net: "OCRTrainModule") -> dict[str, float]:
        """Per-character accuracy of the two probes on held-out pages: the glyph probe says whether the encoder
        sees the characters, the token probe whether the 16 vision tokens still carry them all."""
        was_training = net.training
        net.eval()
        batch = self.collate(self.eval_pages())
        _, _, glyph, token, _ = net(batch["pixels"], batch["input_ids"], (), batch["sites"], decode=False)
        net.train(was_training)
        label = batch["sites"].label
        return {"eval_glyph_acc": float((glyph.argmax(-1) == label).float().mean()),
                "eval_token_acc": float((token.argmax(-1) == label).float().mean())}

    @torch.no_grad()
    def evaluate(self, net: nn.Module, step: int) -> dict[str, float]:
        """Held-out teacher-forced loss with the true and with swapped images (the gap says reading has
        started), plus greedy-decode precision on a few pages."""
        from optictx.eval.metrics import normalized_edit_distance, ocr_precision_recall

        net = getattr(net, "module", net)
        probes = self.probe_accuracy(net)
        if self.cfg.stage == "encoder":
            return probes
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
        return {**probes, "eval_loss": float(true_loss), "eval_swapped_loss": float(swap_loss),
                "gap": float(swap_loss - true_loss), "eval_precision": p, "eval_recall": r, "eval_ned": ned}


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
