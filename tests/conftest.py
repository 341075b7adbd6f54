import os

for k, v in {"OMP_THREAD_LIMIT": "1", "ORT_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def micro_reasoner_config(tok, **overrides):
    """A two-layer PrimitivesConfig of a few thousand parameters for ``tok``: the micro model of the pipeline tests."""
    import dataclasses

    from optictx.config import primitives_tiny

    return dataclasses.replace(
        primitives_tiny(), vision_width=32, vision_layers=1, vision_heads=2, vocab_size=tok.vocab_size,
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, compress_ratios=(0, 4), sliding_window=16, index_n_heads=2, index_head_dim=8,
        index_topk=4, image_token_id=tok.image_token_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id, **overrides)


@pytest.fixture(scope="session")
def micro_config():
    """:func:`micro_reasoner_config`, for test modules (conftest is not imported by name)."""
    return micro_reasoner_config


@pytest.fixture(scope="module")
def micro_reasoner():
    """(tokenizer, random micro PrimitivesModel, counting+general mixture): the GRPO / RFT / OPD tests' model."""
    from optictx.model.reasoner import PrimitivesModel
    from optictx.tokenizer import train_bpe
    from optictx.train.primitives_task import Mixture, tokenizer_texts

    mixture = Mixture({"counting": 1, "general": 1}, scene={"side": 84, "max_objects": 3, "max_count": 2})
    tok = train_bpe(tokenizer_texts(mixture, 0, 60), vocab_size=300)
    torch.manual_seed(0)
    return tok, PrimitivesModel(micro_reasoner_config(tok, min_image_tokens=4)), mixture
