"""Stage: the round's update, and the owner of everything it needs.

The learner owns the optimizer and its lr schedule, the token budget and micro-batch plan, and the
frozen reference model. It is the only caller of the compute copy's refresh (Precision.after_step) and
of the engine's prefix-cache reset: cached prompt KV belongs to the weights it was computed with.

One update = ``ppo_epochs`` passes over the round's sequences, each cut into ``mini_batches`` optimizer
steps (fastrft.loop.plan). With one step per round on fresh samples, old_logp is the current policy's
own detached log-prob and the ratio is exactly 1 (REINFORCE, clipping inert); with more, old_logp is the
policy's log-prob before the round's first step, so the clip acts (in exact mode the rollout's own
log-probs, which equal it bit for bit: no recomputing pass). Each step: micro-batches of packed
sequences through the model (final hidden states) and the fused LM-head loss (fastrft.kernels), backward
with gradients accumulating in the fp32 masters, gradient clipping, AdamW, the compute-copy refresh.
"""

from __future__ import annotations

import sys
import time

import torch

from fastrft.config import TrainConfig
from fastrft.distributed import World
from fastrft.kernels import fused_linear_pg_loss
from fastrft.loop import seeds
from fastrft.loop.logprobs import old_logprobs, packed, reference_logprobs, response_hidden
from fastrft.loop.plan import split_parts, step_plan
from fastrft.loop.types import MicroResult, TrainBatch, UpdateResult
from fastrft.microbatch import default_token_budget, merge_micro_stats
from fastrft.models import lora
from fastrft.models.ops import PLAIN, Ops
from fastrft.precision import make_adamw


def token_budget(cfg: TrainConfig, precision, device: torch.device, world: World) -> int | None:
    """Packed tokens per forward + backward: --max-tokens-per-step, or what the device's memory allows."""
    if cfg.optim.max_tokens_per_step is not None:
        return cfg.optim.max_tokens_per_step
    budget, how = default_token_budget(precision, device, cfg.model.activation_checkpointing)
    if device.type == "cuda" and world.main:
        print(f"fastrft: {budget:,} packed tokens per forward + backward ({how}); "
              "set --max-tokens-per-step to change it", file=sys.stderr)
    return budget


def reference_model(precision, cfg: TrainConfig):
    """The KL reference: the frozen initial policy in the compute precision; None when KL is off. With LoRA it
    is the base model with the adapters off, sharing the frozen base weights (no second copy)."""
    if not cfg.loss_spec.needs_ref:
        return None
    return lora.reference_copy(precision.rollout_model, shared=[p for p in precision.master.parameters()
                                                                  if not p.requires_grad])


class Learner:
    def __init__(self, cfg: TrainConfig, precision, *, ref, engine, token_budget: int | None, world: World,
                 device: torch.device, ops: Ops = PLAIN):
        self.cfg, self.precision, self.ref, self.engine = cfg, precision, ref, engine
        # The backend's LM-head GEMM, the engine's (the exact CPU ops take it under its row rule). With a
        # batch-invariant backend the sampler's log-probs are the pre-update policy's bit for bit, so they
        # serve as the old log-probs; otherwise a pass recomputes them. Both chosen once, here.
        self.logits_mm = ops.head_gemm
        self.old_logprobs = self.rollout_logprobs if ops.exact else self.recompute_old_logprobs
        self.token_budget, self.world, self.device = token_budget, world, device
        self.spec = cfg.loss_spec
        o = cfg.optim
        self.optimizer = make_adamw(precision.trainable, lr=o.lr, betas=(o.beta1, o.beta2),
                                    weight_decay=o.weight_decay, device=device)

    def reset_prefix_cache(self) -> None:
        """Forget the engine's cached prompt KV: after a weight change, and wherever a computation must not
        depend on what an earlier one left cached (an evaluation, a checkpoint)."""
        self.engine.reset_prefix_cache()

    def refresh(self) -> None:
        """Give the compute copy the masters' values (after a step or a restore)."""
        self.precision.after_step()

    def update(self, r: int, train: TrainBatch, first_update: int) -> UpdateResult:
        """Round ``r``'s optimizer steps over ``train``; ``first_update`` is the number of steps taken
        before (the lr schedule's position)."""
        cfg, a = self.cfg, self.cfg.algo
        multi = a.ppo_epochs * a.mini_batches > 1
        old = self.old_logprobs(train) if multi else None
        total_steps = cfg.run.rounds * a.ppo_epochs * a.mini_batches
        steps, t_fb, t_opt, n_tokens, lr = [], 0.0, 0.0, 0, cfg.optim.lr
        self.precision.train_model.train()
        for epoch in range(a.ppo_epochs):
            order = (seeds.minibatch_order(cfg.run.seed, r, epoch, len(train)) if a.mini_batches > 1
                     else list(range(len(train))))
            for part in split_parts(order, a.mini_batches):
                t0 = time.monotonic()
                lr = cfg.optim.lr_at(first_update + len(steps), total_steps)
                micros = self._accumulate(train, part, old, lr)
                t1 = time.monotonic()
                grad_norm = self._step()
                t_fb, t_opt = t_fb + t1 - t0, t_opt + time.monotonic() - t1
                n_tokens += sum(m.tokens for m in micros)
                # Each micro-batch's stats are means over its response tokens: merged, they weigh by those.
                stats = (dict(micros[0].stats) if len(micros) == 1 else
                         merge_micro_stats([m.stats for m in micros], [m.targets for m in micros]))
                loss_value = stats.pop("loss")
                steps.append({"loss": loss_value, "grad_norm": grad_norm, **stats, "micro_batches": len(micros)})
        for later in steps[1:]:  # the gap compares the sampler and trainer under the same weights: step 1's
            for key in ("logp_gap_mean", "logp_gap_max"):
                later.pop(key, None)
        return UpdateResult(steps, {**_merge_steps(steps), "lr": lr, "train_tokens": n_tokens,
                                    "optimizer_steps": len(steps), "time_fwd_bwd": t_fb, "time_optim": t_opt})

    def _accumulate(self, train: TrainBatch, part: list[int], old, lr: float) -> list[MicroResult]:
        """Forward and backward of one optimizer step's micro-batches (every rank's, under torchrun)."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # On CPU, freeing the gradients makes every backward fault in fresh pages for all of them
        # (a large share of a small model's step); CUDA's caching allocator makes freeing cheap.
        self.optimizer.zero_grad(set_to_none=self.device.type == "cuda")
        micros: list[MicroResult] = []
        kw = dict(temperature=cfg.rollout.temperature, backend=cfg.model.kernels, logits_mm=self.logits_mm)
        for micro, real in step_plan(train.select(part), self.token_budget, self.spec, self.world):
            ids = [part[j] for j in micro.members]
            batch = packed(train.select(ids), self.device)
            old_logp = None if old is None else torch.cat([old[i] for i in ids]).to(self.device)
            ref_logp = None if self.ref is None else reference_logprobs(self.ref, batch, **kw)
            hidden, weight = response_hidden(self.precision.train_model, batch)
            # The model gives hidden states; the fused op computes log-probs, entropy and the loss
            # without ever forming [N, V] logits.
            weights = None if micro.weights is None else micro.weights.to(self.device)
            loss, stats = fused_linear_pg_loss(hidden, weight, batch.targets, batch.advantages, batch.seq_ids,
                                               old_logp=old_logp, ref_logp=ref_logp, spec=self.spec,
                                               rollout_logp=batch.rollout_logp, weights=weights, **kw)
            # FSDP averages the ranks' gradients; each rank's loss is its slice of one global sum.
            (loss * self.world.size if self.world.distributed else loss).backward()
            if real:  # (a zero-weight stand-in keeps this rank in step with the others' collectives)
                micros.append(MicroResult({"loss": float(loss.detach()), **stats}, batch.num_tokens,
                                          int(batch.targets.numel())))
            del hidden, weight, loss
        if self.world.distributed:  # the step's stats over every rank's micro-batches
            micros = [m for part_ in self.world.gather(micros) for m in part_]
        return micros

    def _step(self) -> float:
        """Clip the gradient norm, AdamW step, refresh the compute copy; returns the norm before clipping."""
        clip = self.cfg.optim.grad_clip
        self.precision.reduce_grads()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.precision.trainable,
                                                   clip if clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.refresh()
        self.reset_prefix_cache()  # cached prompt KV belongs to the old weights
        return float(grad_norm)

    @staticmethod
    def rollout_logprobs(train: TrainBatch) -> list[torch.Tensor]:
        """The old log-probs with a batch-invariant backend: the sampler's, which are the pre-update policy's
        bit for bit (fastrft.models.exact), so the recomputing pass (:meth:`recompute_old_logprobs`) is skipped."""
        return [torch.tensor(c.logprobs, dtype=torch.float32) for c in train.completions]

    def recompute_old_logprobs(self, train: TrainBatch) -> list[torch.Tensor]:
        """The old log-probs recomputed: per sequence of ``train``, the policy's log-probs of its response
        tokens before the round's first step (CPU, fp32)."""
        return old_logprobs(self.precision.rollout_model, train, budget=self.token_budget, world=self.world,
                            device=self.device, temperature=self.cfg.rollout.temperature,
                            backend=self.cfg.model.kernels, logits_mm=self.logits_mm)


def _merge_steps(steps: list[dict[str, float]]) -> dict[str, float]:
    """One record for a round's optimizer steps: the mean of each stat (the min of ``*_min``, the max of
    ``*_max``)."""
    out: dict[str, float] = {}
    for k in steps[0]:
        vals = [p[k] for p in steps if k in p]
        out[k] = min(vals) if k.endswith("_min") else max(vals) if k.endswith("_max") else sum(vals) / len(vals)
    return out
