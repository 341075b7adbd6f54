"""DeepSeek-OCR wrapper: image slots spliced in order, count mismatches refused, vision only at prefill."""
from __future__ import annotations

import pytest
import torch

from optictx.config import ocr_tiny
from optictx.errors import GenerationError
from optictx.model.cache import KVCache
from optictx.model.vlm import DeepseekOCRForCausalLM, splice_images

IMG = 7  # the tiny tests' <image> id


class Views:
    """Duck-typed ImageViews (global_view [3,H,W], crops [n,3,T,T], grid (nw, nh))."""

    def __init__(self, global_view, crops, grid=(1, 1)):
        self.global_view, self.crops, self.grid = global_view, crops, grid


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DeepseekOCRForCausalLM(ocr_tiny(), image_token_id=IMG).eval()


def _views(seed: int, tiles: bool) -> Views:
    g = torch.Generator().manual_seed(seed)
    crops = torch.rand(2, 3, 128, 128, generator=g) * 2 - 1 if tiles else torch.zeros(0, 3, 128, 128)
    return Views(torch.rand(3, 256, 256, generator=g) * 2 - 1, crops, (2, 1) if tiles else (1, 1))


def _prompt(n_slots: list[int], tail: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = [torch.tensor([0])]
    for n in n_slots:
        parts += [torch.full((n,), IMG), torch.randint(10, 4000, (2,), generator=g)]
    parts.append(torch.randint(10, 4000, (tail,), generator=g))
    return torch.cat(parts)[None]


def test_flat_official_namespace(model):
    keys = set(model.state_dict())
    for k in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
              "model.sam_model.patch_embed.proj.weight", "model.vision_model.pre_layrnorm.weight",
              "model.projector.layers.weight", "model.image_newline", "model.view_seperator", "lm_head.weight"):
        assert k in keys, k


def test_splice_places_embeddings_in_order():
    embeds = torch.zeros(2, 4, 3)
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    a, b = torch.full((2, 3), 1.0), torch.full((1, 3), 2.0)
    a[1] = 5.0
    out = splice_images(embeds, [a, b], mask)
    assert out[0, 1].tolist() == [1.0] * 3 and out[0, 2].tolist() == [5.0] * 3 and out[1, 0].tolist() == [2.0] * 3
    assert out[~mask].abs().sum() == 0
    with pytest.raises(GenerationError, match="3 <image> slot"):
        splice_images(embeds, [a], mask)


def test_images_change_exactly_the_slots_and_follow_encode(model):
    views = [_views(1, tiles=True), _views(2, tiles=False)]
    with torch.no_grad():
        feats = model.model.encode(views)
    n = [f.shape[0] for f in feats]
    assert n[0] > n[1]  # the tiled image has its local grid too
    ids = _prompt(n, tail=4)
    with torch.no_grad():
        out = model(ids, images=views).logits
        # same result when the slots are filled by hand and the decoder is run on embeddings
        emb = model.model.embed_tokens(ids)
        emb[ids == IMG] = torch.cat(feats)
        manual = model.lm_head(model.model(inputs_embeds=emb)).float()
    torch.testing.assert_close(out, manual)
    with pytest.raises(GenerationError, match="slot"):
        model(ids, images=views[:1])
    with pytest.raises(GenerationError, match="slot"):
        model(ids)  # slots but no images


def test_cached_decoding_matches_full_and_skips_vision(model, monkeypatch):
    views = [_views(3, tiles=False)]
    with torch.no_grad():
        n = model.model.encode(views)[0].shape[0]
    ids = _prompt([n], tail=5)
    t0 = ids.shape[1] - 4
    with torch.no_grad():
        full = model(ids, images=views).logits
        cache = KVCache(len(model.model.layers))
        steps = [model(ids[:, :t0], images=views, cache=cache).logits]

        def no_vision(*a, **k):
            raise AssertionError("vision path ran after prefill")

        monkeypatch.setattr(model.model, "encode", no_vision)
        for t in range(t0, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], images=views, cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_training_loss_reaches_the_encoder():
    torch.manual_seed(1)
    model = DeepseekOCRForCausalLM(ocr_tiny(), image_token_id=IMG).train()
    views = [_views(4, tiles=False)]
    with torch.no_grad():
        n = model.model.encode(views)[0].shape[0]
    ids = _prompt([n], tail=6)
    labels = ids.masked_fill(ids == IMG, -100)
    out = model(ids, images=views, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.sam_model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.model.view_seperator.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
