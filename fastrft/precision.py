"""Numeric precision of a run: which parameters the optimizer owns, which module computes.

``--precision`` (see :data:`fastrft.config.PRECISIONS`):

- ``fp32``: one fp32 model trains and serves rollouts (the CPU default: exact and bit-reproducible).
- ``bf16-mixed``: fp32 *master* weights and fp32 AdamW state, bf16 *compute*. A bf16 copy of the model
  runs the training forward and backward, the rollouts, evaluation and (a frozen copy of it) the KL
  reference. Each bf16 parameter's gradient is folded into its master's fp32 ``.grad`` as soon as the
  backward has accumulated it (a post-accumulate-grad hook), and the bf16 gradient is freed: micro-batch
  gradients add up in fp32, never in bf16. After every optimizer step :meth:`Precision.after_step`
  rounds the masters into the bf16 copy *in place*, so the engine's CUDA graphs, which captured those
  tensors' addresses, stay valid, and nothing is serialised or loaded twice. The CUDA default.
- ``bf16`` / ``fp16``: pure low-precision parameters. An AdamW step of relative size below the format's
  resolution rounds away (bf16 keeps 8 significant bits), so the trainer warns when the learning rate is
  too small for the weights (:func:`update_absorbed_fraction`).

The trainer only talks to :class:`Precision`: ``train_model`` runs forward + backward, ``rollout_model``
goes to the engine, ``master`` is what the optimizer steps, checkpoints save and export writes, and
``after_step`` runs after each optimizer step. Under FSDP2 the same roles map onto
``fully_shard(master, mp_policy=MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32))``: the
sharded fp32 module then trains itself (FSDP casts the gathered parameters to bf16 and reduces the
gradients in fp32, which is what the hooks here do on one device), and ``after_step`` fills a full bf16
rollout copy from it. Nothing of this design has to be undone for that.
"""

from __future__ import annotations

import copy
import sys
from functools import partial

import torch

from fastrft.config import PRECISIONS

#: precision -> (master dtype, compute dtype)
DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "fp32": (torch.float32, torch.float32),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
}
assert set(DTYPES) == set(PRECISIONS) - {"auto"}


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16-mixed on CUDA (tensor cores, half the activation memory), fp32 elsewhere (CPUs
    without bf16 matrix units run bf16 no faster, and fp32 keeps runs bit-reproducible)."""
    if name == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ValueError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")
    return name


def _fold_grad(master: torch.Tensor, param: torch.Tensor) -> None:
    """Add a compute parameter's fresh gradient into its master's fp32 gradient and free it."""
    if master.grad is None:
        master.grad = param.grad.to(master.dtype)
    else:
        master.grad.add_(param.grad)
    param.grad = None


class Precision:
    """The master / compute split of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, name: str):
        """``model``: loaded in the master dtype (``DTYPES[name][0]``); it becomes :attr:`master`."""
        if name not in DTYPES:
            raise ValueError(f"unknown precision {name!r}; choose one of: {', '.join(DTYPES)}")
        self.name = name
        self.master_dtype, self.compute_dtype = DTYPES[name]
        self.master = model
        params = dict(model.named_parameters())
        #: what the optimizer steps: every parameter, or with LoRA the adapters (the frozen base has no master)
        self.trainable = [p for p in params.values() if p.requires_grad]
        bad = {str(p.dtype) for p in self.trainable if p.dtype != self.master_dtype}
        if bad:
            raise ValueError(f"precision {name} expects {self.master_dtype} master weights; the model has {bad}")
        if self.master_dtype == self.compute_dtype:
            self.compute = model
            self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
            return
        # Pre-seeding deepcopy's memo with the cast parameters copies the module without ever holding a
        # second master-precision copy; tied weights (one Parameter used twice) stay tied. Frozen parameters
        # already in the compute dtype (a LoRA run's base) are shared, not copied: held once.
        memo = {id(p): p if not p.requires_grad and p.dtype == self.compute_dtype else
                torch.nn.Parameter(p.detach().to(self.compute_dtype), requires_grad=p.requires_grad)
                for p in model.parameters()}
        self.compute = copy.deepcopy(model, memo)
        compute = dict(self.compute.named_parameters())
        assert compute.keys() == params.keys()
        self._pairs = [(compute[k], params[k]) for k in params if params[k].requires_grad]
        for c, m in self._pairs:
            c.register_post_accumulate_grad_hook(partial(_fold_grad, m))

    sharded = False  # checkpoints hold one file (fastrft.distributed.ShardedPrecision: DCP shards)

    def reduce_grads(self) -> None:
        """Combine the gradients of the ranks before the optimizer step (one process: nothing to do)."""

    @property
    def mixed(self) -> bool:
        return self.compute is not self.master

    @property
    def train_model(self) -> torch.nn.Module:
        """The module whose forward + backward produce the masters' gradients."""
        return self.compute

    @property
    def rollout_model(self) -> torch.nn.Module:
        """The module the engine generates with (and evaluation, and the KL reference's copy)."""
        return self.compute

    @torch.no_grad()
    def after_step(self) -> None:
        """Round the masters into the compute copy, in place (same storage, same addresses)."""
        if self._pairs:
            torch._foreach_copy_([c for c, _ in self._pairs], [m for _, m in self._pairs])

    def compute_bytes(self) -> int:
        """Memory of the compute copy beyond the masters (0 when they are one model)."""
        return sum(c.numel() * c.element_size() for c, _ in self._pairs)


class ReplicatedPrecision(Precision):
    """:class:`Precision` on every rank of a torchrun job, for LoRA runs: each rank holds the whole frozen base
    (once, in the compute dtype) and the whole adapters, and :meth:`reduce_grads` averages the adapters'
    gradients across ranks after the step's backward (one all-reduce of one flat buffer). Sharding would save
    only the base's memory, and the base is what LoRA makes small; the adapters are a few MB. Every rank then
    takes the same AdamW step and keeps identical weights; checkpoints are one file, written by rank 0."""

    def __init__(self, model: torch.nn.Module, name: str, world):
        super().__init__(model, name)
        self.world = world

    @torch.no_grad()
    def reduce_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat.div_(self.world.size)
        for p, g in zip(self.trainable, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p)


@torch.no_grad()
def update_absorbed_fraction(model: torch.nn.Module, step: float) -> float:
    """Fraction of the model's parameter elements that an update of magnitude ``step`` changes when
    stored in their own dtype: those with ``step`` at least half the spacing of representable values
    around them (round to nearest). AdamW's per-element update is about ``lr`` in size, so
    ``update_absorbed_fraction(model, lr)`` says how much of a pure-bf16 model one step can move."""
    moved = total = 0
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        eps = torch.finfo(p.dtype).eps
        _, exp = torch.frexp(p.detach().float())  # |w| in [2^(exp-1), 2^exp): spacing 2^(exp-1) * eps
        spacing = torch.ldexp(torch.full_like(exp, eps, dtype=torch.float32), exp - 1)
        moved += int(((p == 0) | (step >= spacing / 2)).sum())
        total += p.numel()
    return moved / max(total, 1)


def warn_unabsorbed_updates(precision: Precision, lr: float) -> None:
    """Pure low-precision weights: say loudly when an AdamW step of size lr cannot move most of them."""
    if precision.master_dtype == torch.float32:
        return
    moved = update_absorbed_fraction(precision.master, lr)
    if moved < 0.5:
        print(f"fastrft: WARNING: with --precision {precision.name} the weights are stored in "
              f"{str(precision.master_dtype).removeprefix('torch.')}, and an AdamW step at --lr {lr:g} can change "
              f"only {moved:.1%} of them: the rest round back to their old value, so the run barely learns. "
              "Use --precision bf16-mixed (fp32 master weights, bf16 compute) or fp32.", file=sys.stderr)


def load_policy(config, precision: str, device: torch.device) -> torch.nn.Module:
    """The model a run trains (``config``: its TrainConfig), in the master dtype of ``precision``. With LoRA
    (fastrft.models.lora) the base is frozen and loaded in the compute dtype (held once: the compute copy
    shares it), and the adapters are the masters, initialised as PEFT's or from --lora-init."""
    from fastrft.models import load_model, lora, peft_io

    master, compute = DTYPES[precision]
    spec = lora.LoraSpec.from_config(config.model)
    if spec is None:
        return load_model(config.model.model, dtype=master, device=device)
    model = load_model(config.model.model, dtype=compute, device=device)
    lora.attach(model, spec, seed=config.run.seed, dtype=master)
    if config.model.lora_init is not None:
        peft_io.load_adapter(model, config.model.lora_init)
    return model


FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def make_adamw(params, *, lr: float, betas: tuple[float, float], weight_decay: float,
               device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``params`` (the masters), with torch's fused kernel wherever it runs: CPU and CUDA,
    FSDP2's DTensors included. It updates each parameter in one pass over weight, gradient and both
    moments, where the default on CPU is a Python loop of small ops per parameter (bench/RESULTS.md has
    the comparison with TRL's step). Loading a checkpoint restores the implementation it was written with
    (``load_state_dict`` sets each group's ``fused`` flag), so a run resumed from a checkpoint of an
    earlier version continues bit for bit."""
    params = list(params)
    fused = device.type in FUSED_ADAMW_DEVICES and all(p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
