"""LoRA adapters on the decoder's linear layers (Hu et al., 2021), in PEFT's layout.

An adapted projection computes ``y = x W^T (+ b) + (dropout(x) A^T) B^T * scaling`` with ``A`` (r, in) and
``B`` (out, r): the same formula, order and names as PEFT's ``LoraLayer`` (``q_proj.lora_A.weight``…), so an
adapter moves between the two unchanged (:mod:`fastrft.models.peft_io`). ``scaling`` is ``alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski, 2023). ``A`` starts as PEFT's default (Kaiming-uniform, as
``nn.Linear``), from a generator seeded by the run's seed; ``B`` starts at zero, so step 0 is the base model.

The adapter's matrices are parameters of the :class:`fastrft.models.layers.Linear` they adapt, and the
model's backend computes them (:meth:`fastrft.models.ops.Ops.linear`): the engine samples with the tensors the
trainer updates, in the same forward, with no merge and no copy, and the exact mode's backends give the
adapter matmuls the same batch-invariant treatment as the base ones. Everything else (the base weights, the
embeddings and the LM head unless asked) is frozen: no gradient, no optimizer state, held once in the
compute dtype.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from fastrft.errors import ConfigError
from fastrft.models.lora_names import EMBEDDINGS, TARGETS, expand_targets

@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    rslora: bool = False
    train_embeddings: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_config(cls, model_cfg) -> "LoraSpec | None":
        """The spec of a run's ``model`` config section (fastrft.config.ModelConfig), or None without LoRA."""
        if not model_cfg.lora_rank:
            return None
        return cls(model_cfg.lora_rank, model_cfg.lora_alpha, model_cfg.lora_dropout,
                   expand_targets(model_cfg.lora_targets), model_cfg.lora_rslora, model_cfg.lora_train_embeddings)


def adapted(model: nn.Module):
    """(qualified name, layer) of every linear layer of ``model`` that carries an adapter."""
    return [(name, m) for name, m in model.named_modules() if getattr(m, "lora_A", None) is not None]


def attach(model: nn.Module, spec: LoraSpec, seed: int, dtype: torch.dtype = torch.float32) -> None:
    """Freeze ``model`` and give each target projection an adapter of ``spec`` in ``dtype`` (A: PEFT's init
    from a generator seeded with ``seed``, in module order; B: zeros). With ``spec.train_embeddings`` the
    embeddings and the LM head stay trainable."""
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    for name, layer in model.named_modules():
        # fastrft.models.layers.Linear (which imports this module's backend users, so it is not imported here)
        if not (isinstance(layer, nn.Linear) and hasattr(layer, "lora_A") and name.rsplit(".", 1)[-1] in spec.targets):
            continue
        a = nn.Linear(layer.in_features, spec.rank, bias=False, device="cpu", dtype=torch.float32)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5), generator=gen)  # nn.Linear's default, as PEFT's
        b = nn.Linear(spec.rank, layer.out_features, bias=False, device="cpu", dtype=torch.float32)
        nn.init.zeros_(b.weight)
        layer.lora_A, layer.lora_B = a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)
        layer.lora_scaling, layer.lora_dropout = spec.scaling, spec.dropout
    if spec.train_embeddings:  # trained: in the masters' dtype
        for name in EMBEDDINGS:
            module = _find(model, name)
            if module is not None:
                module.to(dtype).requires_grad_(True)
    if not adapted(model):
        raise ConfigError(f"lora_targets (--lora-targets): none of {', '.join(spec.targets)} is a linear layer of "
                          "this model")


def _find(model: nn.Module, leaf: str) -> nn.Module | None:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == leaf:
            return module
    return None


def _dropped(layer, x: torch.Tensor) -> torch.Tensor:
    """Dropout acts only in a training forward (with autograd on); the engine, the old-log-prob pass and the
    KL reference never drop."""
    if layer.lora_dropout and layer.training and torch.is_grad_enabled():
        return nn.functional.dropout(x, layer.lora_dropout, training=True)
    return x


def add_delta(layer, x: torch.Tensor, y: torch.Tensor, dense) -> torch.Tensor:
    """``y + (dropout(x) A^T) B^T * scaling`` for ``layer``'s adapter, PEFT's formula and order, each matmul by
    ``dense(x, w, bias)`` (the backend's GEMM) and the scale and the sum as their own elementwise ops: what
    the exact mode's backends use, since every step is then row-wise."""
    return y + dense(dense(_dropped(layer, x), layer.lora_A.weight, None), layer.lora_B.weight, None) * layer.lora_scaling


def fused_linear(layer, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` plus ``layer``'s adapter term, the plain backend's way: B's matmul, the scale and the add
    as one ``addmm_`` into the base GEMM's fresh output (which its backward does not keep), so one pass over
    the output instead of three and no new output-sized tensor. It rounds the scaled product once less than
    :func:`add_delta`: within fp32 (or bf16) rounding of PEFT's. A training forward on packed rows runs it as
    one autograd function (:class:`_AdaptedLinear`), whose backward adds the adapter's input gradient into
    the base's in place instead of summing two new tensors."""
    xd = _dropped(layer, x)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if xd is x and x.dim() == 2 and torch.is_grad_enabled():
        return _AdaptedLinear.apply(x, weight, bias, a, b, layer.lora_scaling)
    y = nn.functional.linear(x, weight, bias)
    h = nn.functional.linear(xd, a)
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.T, alpha=layer.lora_scaling)
    return y


class _AdaptedLinear(torch.autograd.Function):
    """y = x W^T + b + (x A^T) B^T * s on 2-d x, the forward's ops those of :func:`fused_linear`. The backward
    keeps x and h = x A^T, computes each gradient with one GEMM, and accumulates the adapter's part of dx
    into the base's with ``addmm_``."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float):
        y = nn.functional.linear(x, weight, bias)
        h = nn.functional.linear(x, a)
        y.addmm_(h, b.T, alpha=scaling)
        ctx.save_for_backward(x, weight, a, b, h)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, a, b, h = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dh = torch.mm(g, b).mul_(ctx.scaling) if need_x or need_a else None
        dx = torch.mm(g, weight).addmm_(dh, a) if need_x else None
        dw = torch.mm(g.T, x) if need_w else None
        db = g.sum(0) if need_bias and ctx.has_bias else None
        da = torch.mm(dh.T, x) if need_a else None
        dbb = torch.mm(g.T, h).mul_(ctx.scaling) if need_b else None
        return dx, dw, db, da, dbb, None


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters an optimizer steps, by name (every one without adapters)."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def reference_copy(model: nn.Module, shared=()) -> nn.Module:
    """A frozen copy of ``model`` with its adapters off that shares the parameters ``shared`` (the frozen base
    weights: not copied): the KL reference, the initial policy. Without adapters, a plain frozen copy."""
    memo = {id(p): p for p in shared}
    ref = copy.deepcopy(model, memo)
    for _, layer in adapted(ref):
        layer.lora_A = layer.lora_B = None
    return ref.requires_grad_(False)


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of ``model``: its state dict, or with a frozen base only the trainable tensors
    (the base is the source model's, loaded again on resume)."""
    state = model.state_dict()
    names = trainable(model)
    return state if len(names) == len(dict(model.named_parameters())) else {k: state[k] for k in names}


def load_checkpoint_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`checkpoint_state`'s dict into ``model``: all of it, or exactly its trainable tensors."""
    names = trainable(model)
    if len(names) == len(dict(model.named_parameters())):
        model.load_state_dict(state)
        return
    if set(state) != set(names):
        extra, missing = sorted(set(state) - set(names)), sorted(set(names) - set(state))
        raise RuntimeError(f"the checkpoint's tensors are not this run's trainable ones (extra: {extra[:3]}, "
                           f"missing: {missing[:3]})")
    with torch.no_grad():
        for k, v in state.items():
            names[k].copy_(v)


@torch.no_grad()
def merged_state(state: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """A full state dict with every adapter folded into its base weight (``W + scaling * B A`` in fp32,
    stored in W's dtype) and the adapter tensors dropped: what transformers loads without PEFT."""
    out = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    for key in state:
        if key.endswith(".lora_A.weight"):
            prefix = key.removesuffix(".lora_A.weight")
            a, b = state[key].float(), state[prefix + ".lora_B.weight"].float()
            w = out[prefix + ".weight"]
            out[prefix + ".weight"] = (w.float() + (b @ a) * spec.scaling).to(w.dtype)
    return out
