"""One run across several processes: torchrun + torch.distributed + FSDP2 + distributed checkpoint.

``torchrun --nproc-per-node N -m fastrft train ...`` starts N ranks; each reads its place from the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). A plain ``fastrft train``
is world size 1 and never touches torch.distributed. Nothing here is a process protocol of our own: the
ranks meet through ``init_process_group`` (env://), exchange Python objects with torch's object
collectives, shard the model with ``fully_shard`` and checkpoint with ``torch.distributed.checkpoint``.

How a round divides (docs/architecture.md, "The round"):

- **Rollouts.** A call's requests are the flat list of (prompt p, sample j) pairs, p-major. Rank r
  generates the contiguous share ``[N r / W, N (r + 1) / W)`` of it (:func:`share`): shares differ by at
  most one request, none is dropped, and a rank may hold part of a prompt's group or nothing at all.
  Each request samples from its own stream seeded from (seed, p, j) (:func:`fastrft.engine.request_seed`),
  so the union of the shares is, token for token, what one process generates. The shares are gathered
  on every rank, so every rank scores complete groups and computes the same advantages.
- **Training.** Every rank holds every sequence; each optimizer step's sequences are divided the same
  contiguous way, and each rank cuts its part into micro-batches of ``--max-tokens-per-step``. The
  aggregation weights come from the layout of the whole step over all ranks
  (:func:`fastrft.microbatch.step_weights`), so each rank's loss is its slice of the one global sum
  (token-mean is over all ranks' tokens). FSDP averages gradients over the ranks, so each rank's
  backward runs on W times its slice (exact in binary floating point for W a power of two; a custom
  divide factor would need PREMUL_SUM, which gloo lacks), and the gradients add up to the step's. Ranks
  with fewer micro-batches run zero-weight ones, because every FSDP forward is a collective.
- **Weights.** :class:`ShardedPrecision` keeps the fp32 masters and the AdamW state sharded across the
  ranks (``fully_shard`` per decoder layer and on the root, ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)`` in bf16-mixed), and a full copy in the compute dtype for the engine, the old
  log-probs and (frozen) the KL reference, refreshed in place from the shards after every step.
- **Evaluation** is split and gathered like the rollouts; only rank 0 writes metrics, plots and the
  summary. Checkpoints are DCP directories written by all ranks (fastrft.checkpoint).
"""

from __future__ import annotations

import copy
import datetime
import os
from dataclasses import dataclass

import torch

from fastrft.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank ``rank`` of ``size`` (``local_rank`` on its node).
    ``launched``: started by torchrun (WORLD_SIZE in the environment), even with one process. Such a run
    always takes the distributed path (FSDP2, DCP checkpoints), so a torchrun job's checkpoints resume
    under torchrun with any number of ranks, one included."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def distributed(self) -> bool:
        return self.launched or self.size > 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run's records (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def gather(self, obj):
        """Every rank's ``obj``, in rank order, on every rank (pickled; small objects only)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer; torchrun sets it, so launch "
                          "with torchrun (or unset it for a single-process run)") from None


def world_from_env() -> World:
    """The world torchrun describes in the environment; world size 1 without it."""
    launched = bool(os.environ.get("WORLD_SIZE"))
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={size} from the environment are inconsistent; launch with "
                          "torchrun --nproc-per-node N")
    return World(rank, size, local, launched)


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_world(device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """Join the job torchrun started (a no-op without torchrun) and return (world, this rank's device).

    CUDA ranks take ``cuda:LOCAL_RANK`` and NCCL; CPU ranks use gloo. ``timeout_s`` bounds the wait at
    the rendezvous and in every collective: a rank that cannot reach the others fails with a message
    instead of hanging."""
    world = world_from_env()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {world.local_rank} has no GPU: this node sees {torch.cuda.device_count()}; "
                              "lower --nproc-per-node to at most the number of GPUs")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if torch.distributed.is_initialized():
        return world, device
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                             **({"device_id": device} if device.type == "cuda" else {}))
        # init_process_group returns once the store is reached; the first collective proves that every
        # rank arrived, within the same timeout.
        torch.distributed.barrier()
    except (RuntimeError, ValueError, TimeoutError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ConfigError(f"rank {world.rank} of {world.size} could not meet the other ranks at the rendezvous "
                          f"{where} within {timeout_s:g} s (--dist-timeout): {first}. Check that every node runs "
                          "the same torchrun command with the same --rdzv-endpoint / --master-addr and "
                          "--master-port, and that the port is reachable") from None
    return world, device


def share(counts: list[int], world: World, rank: int | None = None) -> list[tuple[int, int, int]]:
    """Rank ``rank``'s (default: this rank's) share of a call whose prompt p asks for ``counts[p]``
    samples, as (prompt index, first sample, samples) triples: the contiguous slice
    ``[N r / W, N (r + 1) / W)`` of the p-major request list (N requests in all).

    >>> share([4], World(0, 2)), share([4], World(1, 2))
    ([(0, 0, 2)], [(0, 2, 2)])
    >>> share([1, 1, 1], World(1, 2))   # uneven: 1 and 2 requests
    [(1, 0, 1), (2, 0, 1)]
    """
    r = world.rank if rank is None else rank
    total = sum(counts)
    lo, hi = total * r // world.size, total * (r + 1) // world.size
    out, start = [], 0
    for p, n in enumerate(counts):
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            out.append((p, a - start, b - a))
        start += n
    return out


def split(items: list, world: World, rank: int | None = None) -> list:
    """Rank ``rank``'s contiguous share of ``items`` (the rule of :func:`share`)."""
    r = world.rank if rank is None else rank
    n = len(items)
    return items[n * r // world.size:n * (r + 1) // world.size]


class SplitEngine:
    """An engine whose ``generate`` divides each call's requests across the ranks (:func:`share`) and
    returns the whole call's completions on every rank. At world size 1 it is the engine's own call."""

    def __init__(self, engine, world: World):
        self.engine, self.world = engine, world

    def generate(self, prompt_ids: list[list[int]], *, n: int = 1, progress=None, **kwargs):
        if not self.world.distributed:
            return self.engine.generate(prompt_ids, n=n, progress=progress, **kwargs)
        mine = share([n] * len(prompt_ids), self.world)
        done = self.engine.generate([prompt_ids[p] for p, _, _ in mine], n=[k for _, _, k in mine],
                                    request_ids=[(p, first) for p, first, _ in mine], progress=progress,
                                    **kwargs) if mine else []
        groups: list[list] = [[] for _ in prompt_ids]
        for part in self.world.gather([(p, first, g) for (p, first, _), g in zip(mine, done)]):
            for p, first, g in part:
                groups[p].append((first, g))
        return [[c for _, g in sorted(parts, key=lambda x: x[0]) for c in g] for parts in groups]


# ------------------------------------------------------------------------------------------ FSDP2
class ShardedPrecision:
    """:class:`fastrft.precision.Precision`'s roles under FSDP2 (same attributes, same contract).

    ``master`` (= ``train_model``) is the model with ``fully_shard`` applied to every decoder layer and to
    the root: each rank keeps 1/W of the fp32 parameters, gradients and AdamW state. In bf16-mixed, FSDP
    all-gathers the parameters in bf16 for each forward/backward and reduce-scatters the gradients in
    fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``). ``rollout_model`` is a plain
    full copy in the compute dtype that the engine decodes with and that computes old log-probs; it is
    built before sharding (no extra load) and :meth:`after_step` rewrites it in place from the shards,
    one parameter at a time (``DTensor.full_tensor``), so at most one full fp32 parameter is in flight.
    """

    def __init__(self, model: torch.nn.Module, name: str, world: World):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        from fastrft.precision import DTYPES

        self.name, self.world = name, world
        self.master_dtype, self.compute_dtype = DTYPES[name]
        if self.master_dtype != torch.float32:
            raise ConfigError(f"precision (--precision) {name}: a multi-process run keeps fp32 master weights; use "
                              "bf16-mixed (bf16 compute) or fp32")
        memo = {id(p): torch.nn.Parameter(p.detach().to(self.compute_dtype, copy=True), requires_grad=False)
                for p in model.parameters()}
        self.rollout = copy.deepcopy(model, memo).requires_grad_(False)
        mesh = init_device_mesh(model.device.type, (world.size,))
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype if self.compute_dtype != torch.float32 else None,
                                  reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        register_fsdp_forward_method(model, "forward_packed")
        self.master = model
        self.trainable = list(model.parameters())
        names = dict(self.rollout.named_parameters())
        self._pairs = [(names[k], p) for k, p in model.named_parameters()]

    sharded = True  # checkpoints are DCP shards

    def reduce_grads(self) -> None:
        """FSDP reduce-scatters the gradients in the backward itself."""

    mixed = property(lambda self: self.compute_dtype != self.master_dtype)
    train_model = property(lambda self: self.master)
    rollout_model = property(lambda self: self.rollout)

    @torch.no_grad()
    def after_step(self) -> None:
        for full, sharded in self._pairs:
            full.copy_(sharded.full_tensor())

    def compute_bytes(self) -> int:
        """Memory beyond the sharded masters: the full rollout copy."""
        return sum(c.numel() * c.element_size() for c, _ in self._pairs)


def dcp_save(path, model, optimizer) -> None:
    """Write the sharded model and optimizer state as a DCP checkpoint under ``path`` (all ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(path))


def dcp_load(path, model, optimizer) -> None:
    """Load a DCP checkpoint into the sharded model and optimizer (all ranks); DCP reshards it when it
    was written by another number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def dcp_full_model_state(path, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full (unsharded) model weights of a DCP checkpoint, read in one process without a process
    group; ``template`` is a state dict of the right names and shapes (the freshly loaded base model's),
    filled in place and returned."""
    import torch.distributed.checkpoint as dcp

    import warnings

    state = {"model": template}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state["model"]
