"""Architecture description parsed from a Hugging Face ``config.json``.

One decoder implementation covers four families; they differ only in the switches of :class:`Family`
(which projections carry a bias, where the q/k RMSNorm sits, pre- or post-sublayer norms). Everything the
checkpoint can say that this decoder cannot honour (sliding windows, unknown RoPE scalings, another
activation) is refused here, at load time, with the field to change — never silently approximated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastrft.errors import ModelLoadError, read_json_object


@dataclass(frozen=True)
class Family:
    """What distinguishes one decoder family from another. qk_norm: "none" | "head" (RMSNorm over each
    head's head_dim, Qwen3) | "full" (RMSNorm over all heads' concatenated projection, OLMo-2)."""

    qkv_bias: bool | None  # None: read the checkpoint's `attention_bias`
    o_bias: bool | None
    qk_norm: str
    post_norm: bool  # OLMo-2 normalises each sublayer's output instead of its input
    default_eps: float = 1e-6  # transformers' default when the checkpoint omits rms_norm_eps
    # The transformers class of the family, written to config.json's "architectures" by an export: TRL's
    # and vLLM's loaders pick their model class from that field.
    architecture: str = ""


FAMILIES: dict[str, Family] = {
    "llama": Family(qkv_bias=None, o_bias=None, qk_norm="none", post_norm=False, architecture="LlamaForCausalLM"),
    "qwen2": Family(qkv_bias=True, o_bias=False, qk_norm="none", post_norm=False, architecture="Qwen2ForCausalLM"),
    "qwen3": Family(qkv_bias=None, o_bias=None, qk_norm="head", post_norm=False, architecture="Qwen3ForCausalLM"),
    "olmo2": Family(qkv_bias=None, o_bias=None, qk_norm="full", post_norm=True, default_eps=1e-5,
                    architecture="Olmo2ForCausalLM"),
}


def with_architecture(hf: dict[str, Any]) -> dict[str, Any]:
    """``hf`` (a config.json dict) with "architectures" set from its model_type when it is missing or null,
    as GGUF conversion leaves it."""
    family = FAMILIES.get(hf.get("model_type", ""))
    if not hf.get("architectures") and family is not None:
        hf = {**hf, "architectures": [family.architecture]}
    return hf

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ArchConfig:
    """The decoder's shape. Field names follow our code; :meth:`from_hf` maps the HF names."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: str
    post_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ArchConfig":
        """Parse an HF config dict; ``source`` names the file in error messages."""

        def need(key: str, typ: type = int):
            if key not in hf or hf[key] is None:
                raise ModelLoadError(f"{source}: required field '{key}' is missing")
            value = hf[key]
            if typ is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ModelLoadError(f"{source}: field '{key}' must be a positive integer, got {value!r}")
            return value

        model_type = hf.get("model_type")
        if model_type not in FAMILIES:
            raise ModelLoadError(
                f"{source}: model_type {model_type!r} is not supported; fastrft's decoder covers "
                f"{', '.join(sorted(FAMILIES))} (Llama-3.x/SmolLM2, Qwen2/2.5, Qwen3, OLMo-2)"
            )
        fam = FAMILIES[model_type]
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise ModelLoadError(
                f"{source}: use_sliding_window=true is not supported; set it to false "
                "(the released Qwen2.5/Qwen3 checkpoints ship with it off)"
            )
        if hf.get("pretraining_tp", 1) not in (1, None):
            raise ModelLoadError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported (use 1)")

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = hf.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        head_dim = hf.get("head_dim") or hidden // heads
        attention_bias = bool(hf.get("attention_bias", False))
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", fam.default_eps)),
            rope=_parse_rope(hf, source),
            qkv_bias=attention_bias if fam.qkv_bias is None else fam.qkv_bias,
            o_bias=attention_bias if fam.o_bias is None else fam.o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=fam.qk_norm,
            post_norm=fam.post_norm,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=hf.get("dtype") or hf.get("torch_dtype"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ArchConfig":
        data = read_json_object(path, ModelLoadError, "; a model directory needs a config.json")
        return cls.from_hf(data, source=str(path))

    def replace(self, **changes: Any) -> "ArchConfig":
        return dataclasses.replace(self, **changes)


def _parse_rope(hf: dict[str, Any], source: str) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (with rope_theta inside); older checkpoints write
    # `rope_theta` plus an optional `rope_scaling` whose type key is `rope_type` or the legacy `type`.
    params = dict(hf.get("rope_parameters") or {})
    nested = [v for v in params.values() if isinstance(v, dict)]
    if nested:
        # transformers 5 may nest RoPE parameters per layer type ("full_attention": {...}); one decoder
        # RoPE serves every layer, so the layer types must agree.
        if any(v != nested[0] for v in nested):
            raise ModelLoadError(f"{source}: rope_parameters differ between layer types "
                                 f"({', '.join(params)}); per-layer RoPE is not supported")
        params = dict(nested[0])
    if hf.get("rope_scaling"):
        params = {**dict(hf["rope_scaling"]), **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: RoPE type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{source}: partial_rotary_factor != 1 is not supported")
    rope = RopeConfig(theta=float(theta), type=kind)
    if kind == "linear":
        rope = dataclasses.replace(rope, factor=float(params["factor"]))
    elif kind == "llama3":
        try:
            rope = dataclasses.replace(
                rope,
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(
                    params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
                ),
            )
        except KeyError as e:
            raise ModelLoadError(f"{source}: llama3 RoPE scaling needs the field {e.args[0]!r}") from None
    return rope
