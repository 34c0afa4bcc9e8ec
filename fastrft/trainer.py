"""The round loop of reinforcement fine-tuning, readable top to bottom.

A round (DESIGN.md §3):
  1. take the training example(s);
  2. sample G responses per example from the current policy through the paged engine, which shares the
     trainer's model object (no weight sync) and forks each prompt's KV into its G samples;
  3. score them with the example's reward function, map scores to (fail, success) rewards and turn each
     group's rewards into per-sequence advantages;
  4. pack prompt + response pairs into one varlen batch, compute the response tokens' log-probs from the
     final hidden states (never full [N, V] logits), evaluate the policy-gradient loss (clipped
     surrogate, KL to the frozen initial policy, entropy bonus, aggregation);
  5. backward, clip the gradient norm, AdamW step; log the round to metrics.jsonl.
Every ``eval_every`` rounds (and at the start and the end) train/test Pass@1 is measured.

Simplifications, stated: one optimizer step per round on fresh on-policy samples (so old_logp is the
current policy's own detached log-prob and the ratio is exactly 1, i.e. REINFORCE with clipping inert);
a round whose advantages are all zero with KL and entropy off carries no gradient and skips the
backward pass (counted and logged). All formulas live in fastrft.algo; this file only orchestrates.
"""

from __future__ import annotations

import copy
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastrft import rewards
from fastrft.algo import group_advantages, map_reward, pack
from fastrft.config import TrainConfig
from fastrft.data import dedupe_against, encode_prompt, load_dataset
from fastrft.engine import Engine, EngineConfig, request_seed
from fastrft.errors import ConfigError
from fastrft.evaluate import EvalSet, evaluate
from fastrft.kernels import fused_linear_pg_loss, linear_logprob
from fastrft.models import load_model, load_tokenizer
from fastrft.report import MetricsLog, before_after_table, plot_curves, read_metrics


class Trainer:
    def __init__(self, config: TrainConfig):
        self.cfg = config
        self.out_dir = self._check_out_dir()
        torch.manual_seed(config.run.seed)
        self.device = _resolve_device(config.model.device)
        self.tokenizer = load_tokenizer(config.model.model)
        self.policy = load_model(config.model.model, dtype=config.model.dtype, device=self.device)
        self.spec = config.loss_spec
        # The KL reference is the frozen initial policy; it is held only when KL is on.
        self.ref = copy.deepcopy(self.policy).requires_grad_(False) if self.spec.needs_ref else None
        ro = config.rollout
        # The engine holds the policy object itself: rollouts always see the current weights.
        self.engine = Engine(self.policy, self.tokenizer, EngineConfig(
            block_size=ro.block_size, kv_cache_memory=ro.kv_cache_memory, max_num_seqs=ro.max_batch_size))
        self.train_set, self.test_set = self._load_data()
        o = config.optim
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                           weight_decay=o.weight_decay)
        self.updates = 0
        self.skipped = 0
        self._samples: MetricsLog | None = None
        # Created last: a run that fails to start leaves no directory behind.
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.json").write_text(config.to_json())

    # ---------------------------------------------------------------- set-up
    def _check_out_dir(self) -> Path:
        run = self.cfg.run
        out = Path(run.out) if run.out else Path("runs") / f"{run.name}-{datetime.now():%Y%m%d-%H%M%S}"
        if (out / "metrics.jsonl").exists():
            raise ConfigError(f"out (--out) {out} already holds a run (metrics.jsonl); "
                              "choose a new directory so nothing recorded there is overwritten")
        return out

    def _load_data(self) -> tuple[EvalSet, EvalSet]:
        d = self.cfg.data
        train = load_dataset(d.dataset, "train", path=d.train_file, level=d.level, seed=d.data_seed)
        test = load_dataset(d.dataset, "test", path=d.test_file, level=d.level, seed=d.data_seed)
        bad = [i for i in d.example_index if i >= len(train)]
        if bad:
            raise ConfigError(f"example_index (--example-index) {bad[0]} is out of range: the {d.dataset} train "
                              f"split has {len(train)} examples (valid 0..{len(train) - 1})")
        examples = [train[i] for i in d.example_index]
        test = dedupe_against(test, examples)  # a training problem never counts as a test problem
        size = self.cfg.eval.test_size
        if size is not None and size < len(test):
            keep = sorted(random.Random(d.data_seed).sample(range(len(test)), size))
            test = [test[i] for i in keep]

        def encode(exs):
            return EvalSet(exs, [encode_prompt(self.tokenizer, e, d.dataset, max_prompt_tokens=d.max_prompt_tokens)
                                 for e in exs])

        return encode(examples), encode(test)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """Train for ``run.rounds`` rounds; return the run's summary (also written to summary.json)."""
        cfg, start = self.cfg, time.monotonic()
        log = MetricsLog(self.out_dir / "metrics.jsonl")
        self._samples = MetricsLog(self.out_dir / "rollouts.jsonl") if cfg.run.log_samples else None
        bar = tqdm(total=cfg.run.rounds, desc="fastrft", unit="round", disable=not cfg.run.progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            self._evaluate(0, log, bar)
            for r in range(1, cfg.run.rounds + 1):
                metrics = self.round(r)
                log.write(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", skipped=self.skipped)
                if r == cfg.run.rounds or (cfg.eval.eval_every and r % cfg.eval.eval_every == 0):
                    self._evaluate(r, log, bar)
        finally:
            bar.close()
            log.close()
            if self._samples:
                self._samples.close()
        return self._summarise(time.monotonic() - start)

    def round(self, r: int) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.monotonic()
        groups = self.rollout(r)
        t1 = time.monotonic()
        scores, rewards_, advantages = self.score(groups)
        t2 = time.monotonic()
        if self._samples:
            self._log_samples(r, groups, rewards_)
        has_signal = any(a != 0 for group in advantages for a in group)
        metrics: dict[str, Any] = {
            "kind": "round", "round": r, "reward_mean": _mean(rewards_), "correct_mean": _mean(scores),
            "advantage_abs_mean": _mean([abs(a) for g in advantages for a in g]),
            "response_len_mean": _mean([len(c.token_ids) for g in groups for c in g]),
            "stop_frac": _mean([c.finish_reason == "stop" for g in groups for c in g]),
            "rollout_tokens": sum(len(c.token_ids) for g in groups for c in g),
        }
        if not has_signal and cfg.algo.skip_zero_signal and not self.spec.needs_ref and not self.spec.needs_entropy:
            self.skipped += 1
            metrics.update(skipped=1, skipped_total=self.skipped)
        else:
            metrics.update(self.update(r, groups, advantages), skipped=0, skipped_total=self.skipped)
        t3 = time.monotonic()
        metrics.update(time_rollout=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2,
                       rollout_tokens_per_s=metrics["rollout_tokens"] / max(t1 - t0, 1e-9))
        return metrics

    # ---------------------------------------------------------------- stages
    def rollout(self, r: int):
        ro = self.cfg.rollout
        self.policy.eval()
        return self.engine.generate(self.train_set.prompt_ids, n=ro.group_size, max_new_tokens=ro.max_new_tokens,
                                    temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                    seed=request_seed(self.cfg.run.seed, r, 0))

    def score(self, groups):
        a = self.cfg.algo
        scores = [[0.0 if a.fail_truncated and c.finish_reason == "length" else rewards.score(ex.reward, c.text,
                                                                                              ex.answer)
                   for c in g] for ex, g in zip(self.train_set.examples, groups)]
        rewards_ = [[map_reward(s, (a.reward_fail, a.reward_success)) for s in g] for g in scores]
        advantages = [group_advantages(a.advantage, torch.tensor(g), a.adv_eps).tolist() for g in rewards_]
        return [s for g in scores for s in g], [x for g in rewards_ for x in g], advantages

    def update(self, r: int, groups, advantages) -> dict[str, Any]:
        cfg, policy = self.cfg, self.policy
        prompts = [self.train_set.prompt_ids[i] for i, g in enumerate(groups) for _ in g]
        batch = pack(prompts, [c.token_ids for g in groups for c in g], [a for g in advantages for a in g],
                     [c.logprobs for g in groups for c in g]).to(self.device)
        lr = cfg.optim.lr * min(1.0, (self.updates + 1) / cfg.optim.warmup_rounds) if cfg.optim.warmup_rounds \
            else cfg.optim.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        policy.train()
        ref_logp = None
        if self.ref is not None:
            with torch.no_grad():
                ref_logp, _ = linear_logprob(*self._response_hidden(self.ref, batch), batch.targets,
                                             temperature=cfg.rollout.temperature, backend=cfg.model.kernels)
        hidden, weight = self._response_hidden(policy, batch)
        # The model gives hidden states; the fused op computes log-probs, entropy and the loss without
        # ever forming [N, V] logits.
        loss, stats = fused_linear_pg_loss(hidden, weight, batch.targets, batch.advantages, batch.seq_ids,
                                           ref_logp=ref_logp, spec=self.spec, temperature=cfg.rollout.temperature,
                                           rollout_logp=batch.rollout_logp, backend=cfg.model.kernels)
        # On CPU, freeing the gradients makes every backward fault in fresh pages for all of them (about
        # a third of a SmolLM2 step, measured); CUDA's caching allocator makes freeing cheap there.
        self.optimizer.zero_grad(set_to_none=self.device.type == "cuda")
        loss.backward()
        clip = cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.engine.reset_prefix_cache()  # cached prompt KV belongs to the old weights
        self.updates += 1
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr, "train_tokens": batch.num_tokens,
                **stats}

    def _log_samples(self, r: int, groups, rewards_) -> None:
        flat = [(ex, c) for ex, g in zip(self.train_set.examples, groups) for c in g]
        n = self.cfg.run.log_samples
        self._samples.write({"round": r, "samples": [
            {"example": ex.id, "text": c.text, "reward": rw, "tokens": len(c.token_ids), "finish": c.finish_reason}
            for (ex, c), rw in list(zip(flat, rewards_))[:n]]})

    @staticmethod
    def _response_hidden(model, batch):
        """(hidden (N, H) of the positions predicting the response tokens, LM-head weight (V, H))."""
        hidden = model.forward_packed(batch.input_ids, batch.cu_seqlens)
        return hidden.index_select(0, batch.target_pos), model.lm_head_weight

    def _evaluate(self, r: int, log: MetricsLog, bar) -> dict[str, float]:
        e, t0 = self.cfg.eval, time.monotonic()
        self.policy.eval()
        result = evaluate(self.engine, self.train_set, self.test_set, train_samples=e.train_samples,
                          temperature=e.eval_temperature,
                          max_new_tokens=e.eval_max_new_tokens or self.cfg.rollout.max_new_tokens,
                          greedy=e.greedy, seed=request_seed(self.cfg.run.seed, r, 1), extra_rewards=e.extra_rewards)
        record = {"kind": "eval", "round": r, **result, "time_eval": time.monotonic() - t0}
        log.write(record)
        shown = ", ".join(f"{k} {result[k]:.3f}" for k in ("train_pass1", "test_pass1", "test_greedy") if k in result)
        bar.write(f"[eval] round {r}: {shown} ({record['time_eval']:.0f} s)", file=sys.stderr)
        return result

    def _summarise(self, wall: float) -> dict[str, Any]:
        records = read_metrics(self.out_dir / "metrics.jsonl")
        evals = [x for x in records if x["kind"] == "eval"]
        try:
            plot = str(plot_curves(records, self.out_dir / "curves.png", title=self.cfg.run.name))
        except Exception as e:  # noqa: BLE001 - a plotting failure must not lose the run's summary
            plot = f"(plot failed: {e})"
        summary = {"out_dir": str(self.out_dir), "rounds": self.cfg.run.rounds, "updates": self.updates,
                   "skipped_rounds": self.skipped, "wall_s": wall, "first_eval": evals[0] if evals else None,
                   "last_eval": evals[-1] if evals else None, "plot": plot, "table": before_after_table(records)}
        import json

        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device (--device) {name!r} was requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else 0.0
