"""The names LoRA options take (PEFT's), without torch: the config checks them before anything loads."""

from __future__ import annotations

from fastrft.errors import ConfigError

#: PEFT's target_modules names of the decoder's projections, in the order a layer runs them
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head
#: what --lora-train-embeddings unfreezes: PEFT's modules_to_save names
EMBEDDINGS = ("embed_tokens", "lm_head")


def expand_targets(names) -> tuple[str, ...]:
    """``names`` in the decoder's order, with ``all-linear`` expanded; raises on an unknown name, listing the
    model's linear layers."""
    names = tuple(names)
    if ALL_LINEAR in names:
        return TARGETS
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ConfigError(f"lora_targets (--lora-targets): no linear layer is named {', '.join(map(repr, unknown))}; "
                          f"the model's linear layers are {', '.join(TARGETS)} (or {ALL_LINEAR} for all of them)")
    if not names:
        raise ConfigError("lora_targets (--lora-targets) is empty; name at least one of " + ", ".join(TARGETS))
    return tuple(n for n in TARGETS if n in names)
