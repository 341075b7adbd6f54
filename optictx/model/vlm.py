"""DeepSeek-OCR: DeepEncoder slot embeddings spliced into the token sequence at the ``<image>`` positions.

``DeepseekOCRModel`` is one module holding both the decoder and the encoder, so its state-dict keys are the
official flat ones (``model.embed_tokens``, ``model.layers``, ``model.sam_model``, ``model.vision_model``,
``model.projector``, ``model.image_newline``, ``model.view_seperator``) and an official checkpoint loads
without renaming.
"""
from __future__ import annotations

from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from optictx.config import DeepseekOCRConfig
from optictx.errors import GenerationError
from optictx.model.cache import KVCache
from optictx.model.decoder import CausalLMOutput, DeepseekV2Model, causal_lm_loss, lm_head_logits
from optictx.model.deepencoder import DeepEncoder

if TYPE_CHECKING:
    from optictx.preprocess import ImageViews

IMAGE_TOKEN_ID = 128815  # official `<image>` id (reference §6); tokenizers trained here may use another


class DeepseekOCRModel(DeepseekV2Model, DeepEncoder):
    """Decoder (``forward``) and DeepEncoder (``encode``) sharing one ``model.*`` namespace."""

    def __init__(self, cfg: DeepseekOCRConfig):
        nn.Module.__init__(self)
        self._build_decoder(cfg.language_config)
        self._build_encoder(cfg)

    forward = DeepseekV2Model.forward  # DeepEncoder aliases forward to encode; the decoder's wins here


def splice_images(
    embeds: torch.Tensor, image_embeds: Sequence[torch.Tensor], images_seq_mask: torch.Tensor
) -> torch.Tensor:
    """Place image slot embeddings, in order, at the True positions of ``images_seq_mask`` [B, T].

    The slots are filled row-major (row 0's positions first), so ``image_embeds`` lists the images of
    row 0, then row 1, ... Any count mismatch is an error: a silent shift would garble every token after it.
    """
    n_slots = int(images_seq_mask.sum())
    n_embeds = sum(int(e.shape[0]) for e in image_embeds)
    if n_slots != n_embeds:
        raise GenerationError(
            f"the prompt has {n_slots} <image> slot(s) but the images produce {n_embeds} embeddings; "
            "build the prompt with the slot count of each image's mode (budget.image_slots)"
        )
    if n_slots == 0:
        return embeds
    flat = torch.cat(list(image_embeds)).to(embeds.dtype)
    return embeds.masked_scatter(images_seq_mask[..., None].to(embeds.device), flat)


class DeepseekOCRForCausalLM(nn.Module):
    """The whole DeepSeek-OCR model: ``model`` (encoder + decoder) and the untied ``lm_head``."""

    def __init__(self, cfg: DeepseekOCRConfig, image_token_id: int = IMAGE_TOKEN_ID):
        super().__init__()
        self.config = cfg
        self.image_token_id = image_token_id
        self.model = DeepseekOCRModel(cfg)
        self.lm_head = nn.Linear(cfg.language_config.hidden_size, cfg.language_config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        images: Sequence["ImageViews"] | None = None,
        images_seq_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """Embed tokens, splice images (prefill only), run the decoder, return fp32 logits (+ loss).

        ``images_seq_mask`` defaults to ``input_ids == image_token_id``. After prefill (``cache.seen > 0``)
        the images are already in the cache, so the vision path is skipped.
        """
        embeds = self.model.embed_tokens(input_ids)
        prefill = cache is None or cache.seen == 0
        if prefill:
            if images_seq_mask is None:
                images_seq_mask = input_ids == self.image_token_id
            image_embeds = self.model.encode(images) if images else []
            embeds = splice_images(embeds, image_embeds, images_seq_mask)
        hidden = self.model(inputs_embeds=embeds, position_ids=position_ids, cache=cache, attention_mask=attention_mask)
        logits = lm_head_logits(self.lm_head, hidden, 0 if labels is not None else logits_to_keep)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device | None = None
    ) -> "DeepseekOCRForCausalLM":
        """Load an official (or our own) checkpoint folder / hub id; see ``optictx.weights.from_pretrained``."""
        from optictx.weights import from_pretrained

        return from_pretrained(path_or_repo_id, dtype=dtype, device=device)

    def save_pretrained(self, directory: str | Path, dtype: str | torch.dtype | None = None) -> Path:
        """Write config.json + model-00001-of-000001.safetensors + index, in the official layout."""
        from optictx.weights import save_pretrained

        return save_pretrained(self, self.config, directory, dtype=dtype)
