"""Dataclass configs whose field names equal the official ``config.json`` keys, plus presets.

``DeepseekOCRConfig.to_dict()`` writes the official layout (decoder keys at top level *and* under
``language_config``; ``vision_config.width`` holding the ``sam_vit_b`` / ``clip-l-14-224`` sub-dicts), so a
checkpoint folder we save looks like the official one and an official folder loads without conversion.
Fields the official builders hard-code (SAM patch size, window size, CLIP FFN width, ...) are extra fields
with the official values as defaults; they are only written when they differ, so scaled-down presets
round-trip too.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optictx.errors import ConfigError


def _from_dict(cls, d: dict[str, Any]):
    """Build a dataclass from a dict, ignoring unknown keys (official files carry leftovers)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"bad {cls.__name__} fields: {e}") from e


def dataclass_from(cls, values: dict | None, where: str):
    """Build a config dataclass from a recipe dict, refusing unknown keys (a typo in a recipe must not pass
    silently, unlike the leftovers of official files that ``_from_dict`` skips). JSON lists become tuples."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# --------------------------------------------------------------------------- language model
@dataclass
class DeepseekV2Config:
    """The decoder (DeepSeek-V2-style MoE). Defaults are the official DeepSeek-OCR values (reference §5.1)."""

    vocab_size: int = 129280
    hidden_size: int = 1280
    intermediate_size: int = 6848
    moe_intermediate_size: int = 896
    num_hidden_layers: int = 12
    num_attention_heads: int = 10
    num_key_value_heads: int = 10
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    num_experts_per_tok: int | None = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"  # "softmax" (V2) or "sigmoid" (V3: bias used for selection only)
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"  # "greedy" or "noaux_tc" (V3 selection bias)
    n_group: int = 1
    topk_group: int = 1
    use_mla: bool = False
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    lm_head: bool = True
    rm_head: bool = False
    torch_dtype: str = "bfloat16"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "first_k_dense_replace", "moe_layer_freq"):
            value = getattr(self, name)
            minimum = 0 if name == "first_k_dense_replace" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("n_routed_experts", "num_experts_per_tok", "n_shared_experts"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ConfigError(f"{name} must be null or an integer >= 0, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.n_routed_experts and self.num_experts_per_tok and self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError("num_experts_per_tok must not exceed n_routed_experts")
        if self.use_mla and not self.kv_lora_rank:
            raise ConfigError("use_mla=true needs kv_lora_rank")


# --------------------------------------------------------------------------- DeepEncoder
@dataclass
class SamConfig:
    """SAM ViT-B part of DeepEncoder (``vision_config.width.sam_vit_b`` plus the builder's hard-coded values)."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    downsample_channels: tuple[int, ...] = (512, 1024)
    # hard-coded in the official builder (written to config.json only when they differ)
    image_size: int = 1024  # abs-pos table covers image_size / patch_size per side (64)
    patch_size: int = 16
    window_size: int = 14
    out_chans: int = 256
    mlp_ratio: float = 4.0


@dataclass
class ClipConfig:
    """CLIP-L trunk (``vision_config.width['clip-l-14-224']`` plus hard-coded values)."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    patch_size: int = 14
    image_size: int = 224  # 224/14 = 16 -> 257 positions
    ffn_hidden_size: int = 4096
    layernorm_epsilon: float = 1e-5

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class VisionConfig:
    image_size: int = 1024
    mlp_ratio: float = 3.7362  # official leftover, unused
    model_name: str = "deeplip_b_l"
    model_type: str = "vision"
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)


@dataclass
class ProjectorConfig:
    input_dim: int = 2048
    n_embed: int = 1280
    projector_type: str = "linear"
    model_type: str = "mlp_projector"


_SAM_JSON_KEYS = ("downsample_channels", "global_attn_indexes", "heads", "layers", "width")
_CLIP_JSON_KEYS = ("heads", "image_size", "layers", "patch_size", "width")


def _extras(obj, json_keys) -> dict[str, Any]:
    """Fields outside the official json keys that differ from the official default."""
    default = type(obj)()
    return {
        f.name: _jsonable(getattr(obj, f.name))
        for f in dataclasses.fields(obj)
        if f.name not in json_keys and getattr(obj, f.name) != getattr(default, f.name)
    }


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


@dataclass
class DeepseekOCRConfig:
    """Whole DeepSeek-OCR model: DeepEncoder + projector + decoder, in the official config.json layout."""

    language_config: DeepseekV2Config = field(default_factory=DeepseekV2Config)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projector_config: ProjectorConfig = field(default_factory=ProjectorConfig)
    tile_tag: str = "2D"
    global_view_pos: str = "head"  # present in config.json, ignored by the official code (local, global, sep)
    candidate_resolutions: tuple = ((1024, 1024),)
    model_type: str = "deepseek_vl_v2"
    architectures: tuple[str, ...] = ("DeepseekOCRForCausalLM",)
    torch_dtype: str = "bfloat16"

    # ------------------------------------------------------------------ derived
    @property
    def vision_tokens_per_row(self) -> int:
        """Token-grid side for a view of `image_size` px: image_size / patch / 4 (two stride-2 convs)."""
        sam = self.vision_config.sam
        return -(-(sam.image_size // sam.patch_size) // 4)

    def validate(self) -> None:
        self.language_config.validate()
        v, p, lm = self.vision_config, self.projector_config, self.language_config
        if self.tile_tag != "2D":
            raise ConfigError(f"tile_tag {self.tile_tag!r} is not supported (only '2D', as the official code)")
        if p.input_dim != v.clip.width + v.sam.downsample_channels[-1]:
            raise ConfigError(
                f"projector input_dim {p.input_dim} must equal CLIP width {v.clip.width} + "
                f"SAM net_3 channels {v.sam.downsample_channels[-1]}"
            )
        if p.n_embed != lm.hidden_size:
            raise ConfigError(f"projector n_embed {p.n_embed} must equal decoder hidden_size {lm.hidden_size}")
        if v.sam.downsample_channels[-1] != v.clip.width:
            raise ConfigError("SAM net_3 channels must equal the CLIP width (it is fed as CLIP patch embeddings)")
        if p.projector_type != "linear":
            raise ConfigError(f"projector_type {p.projector_type!r} is not supported (DeepSeek-OCR uses 'linear')")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        lm = {k: _jsonable(v) for k, v in dataclasses.asdict(self.language_config).items()}
        v = self.vision_config
        sam = {k: _jsonable(getattr(v.sam, k)) for k in _SAM_JSON_KEYS} | _extras(v.sam, _SAM_JSON_KEYS)
        clip = {k: getattr(v.clip, k) for k in _CLIP_JSON_KEYS} | _extras(v.clip, _CLIP_JSON_KEYS)
        out: dict[str, Any] = {
            "architectures": list(self.architectures),
            "candidate_resolutions": [list(r) for r in self.candidate_resolutions],
            "global_view_pos": self.global_view_pos,
            "language_config": lm,
            "model_type": self.model_type,
            "projector_config": dataclasses.asdict(self.projector_config),
            "tile_tag": self.tile_tag,
            "torch_dtype": self.torch_dtype,
            "vision_config": {
                "image_size": v.image_size,
                "mlp_ratio": v.mlp_ratio,
                "model_name": v.model_name,
                "model_type": v.model_type,
                "width": {"clip-l-14-224": clip, "sam_vit_b": sam},
            },
        }
        out.update(lm)  # the official file repeats the decoder keys at top level
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeepseekOCRConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json must hold a JSON object")
        for key in ("language_config", "vision_config", "projector_config"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise ConfigError(f"{key} must be a JSON object, got {type(d[key]).__name__}")
        width = (d.get("vision_config") or {}).get("width")
        if width is not None and not (isinstance(width, dict) and all(isinstance(v, dict) for v in width.values())):
            raise ConfigError("vision_config.width must map sam_vit_b / clip-l-14-224 to JSON objects")
        try:
            return cls._from_checked_dict(d)
        except ConfigError:
            raise
        except (TypeError, ValueError, AttributeError, ZeroDivisionError, KeyError) as e:
            raise ConfigError(f"config.json has a field of the wrong type or value: {e}") from None

    @classmethod
    def _from_checked_dict(cls, d: dict[str, Any]) -> "DeepseekOCRConfig":
        lm_keys = {f.name for f in dataclasses.fields(DeepseekV2Config)}
        # The official modeling code reads the top-level decoder keys; language_config is the fallback.
        lm_dict = dict(d.get("language_config") or {}) | {k: v for k, v in d.items() if k in lm_keys}
        vd = d.get("vision_config") or {}
        width = vd.get("width") or {}
        vision = VisionConfig(
            image_size=vd.get("image_size", 1024),
            mlp_ratio=vd.get("mlp_ratio", 3.7362),
            model_name=vd.get("model_name", "deeplip_b_l"),
            model_type=vd.get("model_type", "vision"),
            sam=_from_dict(SamConfig, width.get("sam_vit_b") or {}),
            clip=_from_dict(ClipConfig, width.get("clip-l-14-224") or {}),
        )
        cfg = cls(
            language_config=_from_dict(DeepseekV2Config, lm_dict),
            vision_config=vision,
            projector_config=_from_dict(ProjectorConfig, d.get("projector_config") or {}),
            tile_tag=d.get("tile_tag", "2D"),
            global_view_pos=d.get("global_view_pos", "head"),
            candidate_resolutions=tuple(tuple(r) for r in d.get("candidate_resolutions", [[1024, 1024]])),
            model_type=d.get("model_type", "deepseek_vl_v2"),
            architectures=tuple(d.get("architectures", ["DeepseekOCRForCausalLM"])),
            torch_dtype=d.get("torch_dtype", "bfloat16"),
        )
        cfg.validate()
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> "DeepseekOCRConfig":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ConfigError(f"no config.json at {path}") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- visual primitives
@dataclass
class PrimitivesConfig:
    """Thinking-with-visual-primitives model: 14-px ViT + 3x3 merge + MLA/CSA decoder + V3 MoE.

    Field names follow DeepSeek-V3/V4 ``config.json`` keys where one exists.
    """

    # vision
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    patch_size: int = 14
    merge_size: int = 3
    min_image_tokens: int = 16
    max_image_tokens: int = 384
    # language (V3/V4 names)
    vocab_size: int = 4096
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    intermediate_size: int = 512
    moe_intermediate_size: int = 128
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    # V4 compressed sparse attention
    attention: str = "csa"  # "mla", "csa" or "mha"
    compress_ratios: tuple[int, ...] = (0, 4, 128, 4)
    sliding_window: int = 128
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 64
    o_groups: int = 1  # V4 grouped low-rank output projection (wo_a per group, then wo_b)
    o_lora_rank: int = 0  # 0: one plain ``wo`` instead of wo_a/wo_b
    compress_rope_theta: float = 10000.0  # RoPE base of CSA/HCA layers (V4-Flash: 160000)
    image_token_order: str = "block2x2"  # "raster" or "block2x2" (CSA blocks of 4 = 2x2 squares, see vit.py)
    image_token_id: int = 3  # the <image> placeholder the model replaces by image embeddings
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 2

    def to_dict(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrimitivesConfig":
        return _from_dict(cls, d)


# --------------------------------------------------------------------------- presets
def deepseek_ocr() -> DeepseekOCRConfig:
    """The official deepseek-ai/DeepSeek-OCR configuration (3,336,106,240 parameters)."""
    return DeepseekOCRConfig()


def ocr_tiny() -> DeepseekOCRConfig:
    """A scaled-down DeepEncoder + MoE decoder that trains on 2 CPU cores.

    Same module graph and key names as the official model. A 256-px view gives a 16x16 patch grid and
    4x4 = 16 vision tokens (4,096 px per token, the density of the official Tiny mode 512/64).
    """
    lm = DeepseekV2Config(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        max_position_embeddings=2048,
        torch_dtype="float32",
    )
    vision = VisionConfig(
        image_size=256,
        sam=SamConfig(
            width=192, layers=3, heads=4, global_attn_indexes=(2,), downsample_channels=(256, 256),
            image_size=256, window_size=8, out_chans=128,
        ),
        clip=ClipConfig(width=256, layers=2, heads=4, image_size=56, patch_size=14, ffn_hidden_size=512),
    )
    return DeepseekOCRConfig(
        language_config=lm,
        vision_config=vision,
        projector_config=ProjectorConfig(input_dim=512, n_embed=256),
        candidate_resolutions=((256, 256),),
        torch_dtype="float32",
    )


def primitives_tiny() -> PrimitivesConfig:
    """CPU-trainable visual-primitives model: 252 px -> 18x18 patches -> 6x6 = 36 tokens -> 9 KV entries."""
    return PrimitivesConfig()


def v4_flash_shaped() -> PrimitivesConfig:
    """A V4-Flash-shaped primitives config; build it on the ``meta`` device only (hundreds of billions)."""
    return PrimitivesConfig(
        vision_width=1024, vision_layers=24, vision_heads=16,
        vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64,
        q_lora_rank=1024, kv_lora_rank=512, qk_nope_head_dim=448, qk_rope_head_dim=64, v_head_dim=512,
        intermediate_size=2048, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=6, first_k_dense_replace=0, scoring_func="sigmoid", routed_scaling_factor=1.5,
        max_position_embeddings=1048576, compress_ratios=(0, 0) + (4, 128) * 20 + (4,),
        sliding_window=128, index_n_heads=64, index_head_dim=128, index_topk=512,
        o_groups=8, o_lora_rank=1024, compress_rope_theta=160000.0,
    )


PRESETS = {
    "deepseek-ocr": deepseek_ocr,
    "ocr-tiny": ocr_tiny,
    "primitives-tiny": primitives_tiny,
    "v4-flash-shaped": v4_flash_shaped,
}


def preset(name: str):
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
