"""The round loop of reinforcement fine-tuning, readable top to bottom.

A round (DESIGN.md §3):
  1. take the training example(s);
  2. sample G responses per example from the current policy through the paged engine, which holds the
     trainer's compute model itself (no weight transfer; fastrft.precision) and forks each prompt's KV
     into its G samples;
  3. score them with the example's reward function, map scores to (fail, success) rewards and turn each
     group's rewards into per-sequence advantages;
  4. pack prompt + response pairs into one varlen batch, compute the response tokens' log-probs from the
     final hidden states (never full [N, V] logits), evaluate the policy-gradient loss (clipped
     surrogate, KL to the frozen initial policy, entropy bonus, aggregation);
  5. backward (in micro-batches of --max-tokens-per-step, gradients accumulating in the fp32 masters),
     clip the gradient norm, AdamW step, refresh the compute copy in place; log the round to metrics.jsonl.
Every ``eval_every`` rounds (and at the start and the end) train/test Pass@1 is measured.

With the default one optimizer step per round on fresh samples, old_logp is the current policy's own
detached log-prob and the ratio is exactly 1 (REINFORCE, clipping inert). With --ppo-epochs or
--mini-batches above 1, old_logp is the policy's log-prob before the round's first step, so the clip acts.
A round whose advantages are all zero with KL and entropy off carries no gradient and skips the backward
pass (counted and logged). Checkpoints (fastrft.checkpoint) make a killed run resume bit-identically on
CPU. Under torchrun the same loop runs on every rank (fastrft.distributed): generation is split by request
and gathered, each step's sequences are split across the ranks of an FSDP2-sharded model, and rank 0 writes
the records. All formulas live in fastrft.algo; this file only orchestrates.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastrft import checkpoint as ckpt
from fastrft import rewards, rundir
from fastrft.algo import ADVANTAGES, group_advantages, map_reward, pack
from fastrft.config import TrainConfig
from fastrft.data import dedupe_against, encode_prompt, load_dataset
from fastrft.data import selection
from fastrft.distributed import ShardedPrecision, SplitEngine, init_world, split
from fastrft.engine import Engine, EngineConfig, request_seed
from fastrft.errors import ConfigError
from fastrft.evaluate import BaseEvalCache, EvalSet, base_eval_key, eval_sequences, evaluate
from fastrft.interrupt import RunInterrupted, StopRequest
from fastrft.kernels import fused_linear_pg_loss, linear_logprob
from fastrft.microbatch import MicroBatch, default_token_budget, merge_micro_stats, micro_batches, step_weights
from fastrft.models import load_model, load_tokenizer
from fastrft.precision import DTYPES, Precision, make_adamw, resolve_precision, update_absorbed_fraction
from fastrft.report import MetricsLog, before_after_table, plot_curves, read_metrics


@dataclass
class RunState:
    """What the loop carries from round to round: saved in every checkpoint, restored on resume."""

    round: int = 0  # the last completed round
    updates: int = 0  # optimizer steps taken
    skipped: int = 0  # rounds without gradient signal
    history: dict[str, list[float]] = field(default_factory=dict)  # window baseline: example id -> rewards
    wall: float = 0.0  # seconds spent in run() up to the last checkpoint, over all sessions of the run
    # The evaluation of this round was abandoned by a stop request: the resumed run measures it first.
    pending_eval: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "updates": self.updates, "skipped": self.skipped, "history": self.history,
                "wall": self.wall, "pending_eval": self.pending_eval}


class Trainer:
    def __init__(self, config: TrainConfig, *, force: bool = False, base_eval_cache: str | Path | None = None):
        """``base_eval_cache``: a JSON file of round-0 evaluations shared with other runs of the same base
        model (see :class:`fastrft.evaluate.BaseEvalCache`); ``fastrft ladder`` passes one per study."""
        self._base_evals = BaseEvalCache(base_eval_cache) if base_eval_cache else None
        # Under torchrun each rank joins the job here and takes its device (fastrft.distributed); a plain
        # process is world size 1.
        self.world, self.device = init_world(_resolve_device(config.model.device), config.run.dist_timeout)
        if self.world.distributed and self.world.main:
            print(f"fastrft: torchrun job of {self.world.size} rank{'s' if self.world.size > 1 else ''}, backend "
                  f"{torch.distributed.get_backend()}, rank 0 on {self.device}", file=sys.stderr)
        # auto is resolved before the run directory is compared, so config.json records what ran and a
        # resume on hardware that resolves it differently is refused with the diff.
        precision = resolve_precision(config.model.precision, self.device)
        if precision != config.model.precision:
            config = config.replace(model=dataclasses.replace(config.model, precision=precision))
        self.cfg = config
        self.out_dir = self._out_dir()
        rundir.check_writable(self.out_dir)
        existing = rundir.existing_run(self.out_dir, config.to_dict(), force)
        self.world.barrier()  # every rank has read the run directory before rank 0 writes into it
        self._force = force
        self._progress = config.run.progress and self.world.main
        if config.run.threads:
            torch.set_num_threads(config.run.threads)
        torch.manual_seed(config.run.seed)
        self.tokenizer = load_tokenizer(config.model.model)
        # precision.master is what the optimizer steps, checkpoints hold and export writes; its compute
        # copy (the same model unless bf16-mixed) trains, decodes and evaluates.
        model = load_model(config.model.model, dtype=DTYPES[precision][0], device=self.device)
        self.precision = (ShardedPrecision(model, precision, self.world) if self.world.distributed
                          else Precision(model, precision))
        self.policy = self.precision.master
        if config.model.activation_checkpointing:
            _enable_checkpointing(self.precision.train_model)
        _warn_unabsorbed_updates(self.precision, config.optim.lr)
        self.token_budget = config.optim.max_tokens_per_step
        if self.token_budget is None:
            self.token_budget, how = default_token_budget(self.precision, self.device,
                                                          config.model.activation_checkpointing)
            if self.device.type == "cuda" and self.world.main:
                print(f"fastrft: {self.token_budget:,} packed tokens per forward + backward ({how}); "
                      "set --max-tokens-per-step to change it", file=sys.stderr)
        self.spec = config.loss_spec
        # The KL reference is the frozen initial policy, in the compute precision; held only when KL is on.
        self.ref = (copy.deepcopy(self.precision.rollout_model).requires_grad_(False) if self.spec.needs_ref
                    else None)
        ro = config.rollout
        # The engine holds the rollout model itself: rollouts always see the current weights (in bf16-mixed,
        # Precision.after_step rewrites them in place after every optimizer step).
        # Its prefill steps (rollouts, evaluation, difficulty) pack at most the step's token budget.
        self.engine = Engine(self.precision.rollout_model, self.tokenizer, EngineConfig(
            block_size=ro.block_size, kv_cache_memory=ro.kv_cache_memory, max_num_seqs=ro.max_batch_size,
            max_num_batched_tokens=self.token_budget))
        # Every generation (rollouts, evaluation, difficulty) goes through this: at world size > 1 each rank
        # generates its share of a call's requests and all ranks get the whole call back.
        self._gen = SplitEngine(self.engine, self.world)
        o = config.optim
        self.optimizer = make_adamw(self.policy.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                    weight_decay=o.weight_decay, device=self.device)
        self.state = RunState()
        self._samples: MetricsLog | None = None
        self._tb = None
        self.complete = existing == "complete"
        # The directory is created once the data and model have loaded: a run that fails to start leaves
        # nothing behind. Difficulty estimation writes its cache into it, so it comes after.
        self._prompt_cache: dict[int, list[int]] = {}
        self._load_data()
        self._select_examples()  # may estimate difficulty, whose cache is the only file written before here
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if existing in (None, "forced") and self.world.main:
                if existing == "forced":
                    (self.out_dir / "config.json").rename(self.out_dir / f"config.before-{rundir.stamp()}.json")
                (self.out_dir / "config.json").write_text(config.to_json())
        except OSError as e:
            raise ConfigError(f"out (--out) {self.out_dir}: cannot write there ({e.strerror}); choose a writable "
                              "directory") from None
        self.world.barrier()
        self.resumed_from: int | None = None
        if existing in ("resume", "forced") and not self.complete:
            self._restore()
        self._t0, self._wall0 = time.monotonic(), self.state.wall

    # ---------------------------------------------------------------- set-up
    def _out_dir(self) -> Path:
        run = self.cfg.run
        return Path(run.out) if run.out else Path("runs") / f"{run.name}-{rundir.stamp()}"

    def _encode(self, ex) -> list[int]:
        d = self.cfg.data
        return encode_prompt(self.tokenizer, ex, d.dataset, max_prompt_tokens=d.max_prompt_tokens)

    def _load_data(self) -> None:
        d = self.cfg.data
        split = load_dataset(d.dataset, "train", path=d.train_file, level=d.level, seed=d.data_seed, reward=d.reward)
        test = load_dataset(d.dataset, "test", path=d.test_file, level=d.level, seed=d.data_seed, reward=d.reward)
        if d.difficulty is None and not d.examples_per_round:
            bad = [i for i in d.example_index if i >= len(split)]
            if bad:
                raise ConfigError(f"example_index (--example-index) {bad[0]} is out of range: the {d.dataset} train "
                                  f"split has {len(split)} examples (valid 0..{len(split) - 1})")
            self.pool = [split[i] for i in d.example_index]
        else:
            self.pool = [split[i] for i in selection.pool_indices(len(split), d.train_pool, d.data_seed)]
        if d.examples_per_round > len(self.pool):
            raise ConfigError(f"examples_per_round (--examples-per-round) {d.examples_per_round} exceeds the training "
                              f"pool ({len(self.pool)} examples)")
        self._test_raw = test

    def _select_examples(self) -> None:
        """Fix the training examples (or the pool of the batch mode), then the evaluation sets."""
        d, e = self.cfg.data, self.cfg.eval
        if d.difficulty is not None:
            cands = [self.pool[i] for i in selection.candidate_order(len(self.pool), d.difficulty_candidates,
                                                                     d.data_seed)]
            counts = self._pass_counts(cands)
            chosen = selection.select_by_difficulty(cands, counts, d.difficulty_samples, d.difficulty,
                                                    None if d.examples_per_round else d.difficulty_count)
            self.pool = chosen
            if d.examples_per_round > len(self.pool):
                raise ConfigError(f"examples_per_round (--examples-per-round) {d.examples_per_round} exceeds the "
                                  f"{len(self.pool)} examples in the difficulty band {d.difficulty}")
        # A problem that may be trained on never counts as a test problem.
        test = dedupe_against(self._test_raw, self.pool)
        if not test and self._test_raw:
            raise ConfigError("the training pool covers every test problem; lower --train-pool (or use a dataset "
                              "with a separate test split)")
        if e.test_size is not None and e.test_size < len(test):
            keep = sorted(random.Random(d.data_seed).sample(range(len(test)), e.test_size))
            test = [test[i] for i in keep]
        if d.examples_per_round:
            n = min(e.train_eval_size, len(self.pool))
            train_eval = [self.pool[i] for i in sorted(random.Random(f"fastrft-train-eval/{d.data_seed}")
                                                       .sample(range(len(self.pool)), n))]
        else:
            train_eval = self.pool
        self.train_set = EvalSet(train_eval, [self._encode(x) for x in train_eval])
        self.test_set = EvalSet(test, [self._encode(x) for x in test])

    def _pass_counts(self, cands) -> dict[str, int]:
        """Correct-of-k counts of the base model on the candidates, from the cache or measured now."""
        d, ro, a = self.cfg.data, self.cfg.rollout, self.cfg.algo
        key = {"model": str(self.cfg.model.model), "precision": self.cfg.model.precision, "dataset": d.dataset,
               "level": d.level, "k": d.difficulty_samples, "max_new_tokens": ro.max_new_tokens,
               "max_prompt_tokens": d.max_prompt_tokens, "fail_truncated": a.fail_truncated, "temperature": 1.0,
               "seed": d.data_seed, **({"reward": d.reward} if d.reward else {})}
        cache = selection.DifficultyCache(d.difficulty_cache or self.out_dir / "difficulty.json", key)
        missing = cache.missing(cands)
        if missing and self.world.main:
            print(f"fastrft: estimating the base model's pass rate on {len(missing)} candidate problems "
                  f"({d.difficulty_samples} samples each, T = 1.0)", file=sys.stderr)
        if missing:
            self.precision.rollout_model.eval()

            def sample(exs):
                out = []
                chunk = max(1, ro.max_batch_size // d.difficulty_samples)
                bar = tqdm(total=len(exs), desc="difficulty", unit="problem", disable=not self._progress,
                           file=sys.stderr, dynamic_ncols=True)
                for i in range(0, len(exs), chunk):
                    part = exs[i:i + chunk]
                    groups = self._gen.generate([self._encode(x) for x in part], n=d.difficulty_samples,
                                                  max_new_tokens=ro.max_new_tokens, temperature=1.0,
                                                  seed=request_seed(d.data_seed, i, 3))
                    out += [[self._correct(x, c) for c in g] for x, g in zip(part, groups)]
                    bar.update(len(part))
                bar.close()
                return out

            self.out_dir.mkdir(parents=True, exist_ok=True)
            counts = selection.estimate_counts(missing, sample)
            if self.world.main:
                cache.update(counts)
            else:
                cache.counts.update(counts)
        return cache.counts

    def _correct(self, ex, completion) -> float:
        if self.cfg.algo.fail_truncated and completion.finish_reason == "length":
            return 0.0
        return rewards.score(ex.reward, completion.text, ex.answer)

    def _restore(self) -> None:
        """Continue from the newest whole checkpoint. With none, start over only if nothing was recorded
        yet, or with --force, which keeps the old records beside the new ones: records are never dropped
        without the user asking."""
        if self.world.main:
            ckpt.clean_partial(self.out_dir)
        damaged: list[str] = []
        # Rank 0 picks and verifies the checkpoint; the others load the one it chose.
        if self.world.main:
            found = ckpt.load_latest(self.out_dir, warn=damaged.append)
            chosen = None if found is None else found[0]
        chosen = self.world.broadcast(chosen if self.world.main else None)
        if not self.world.main and chosen is not None:
            found = ckpt.load_round(self.out_dir, chosen)
        if chosen is None:
            if self.world.main:
                rundir.start_over(self.out_dir, damaged, self._force)
            self.world.barrier()
            return
        for msg in damaged:
            print(msg, file=sys.stderr)
        round_, payload = found
        ckpt.check_layout(self.out_dir, round_, payload, self.world.distributed)
        ids = [x.id for x in self.train_set.examples]
        if payload["train_examples"] != ids:
            raise ConfigError(f"{self.out_dir}: the checkpoint of round {round_} trained on {payload['train_examples']}"
                              f" but the requested config selects {ids}; use a new --out")
        if self.world.distributed:  # DCP reshards when the checkpoint was written by another world size
            from fastrft.distributed import dcp_load

            dcp_load(ckpt.shard_dir(self.out_dir, round_), self.policy, self.optimizer)
            if payload.get("world_size") != self.world.size and self.world.main:
                print(f"fastrft: the checkpoint of round {round_} was written by {payload.get('world_size')} ranks; "
                      f"resharded onto {self.world.size} (the run continues exactly up to rounding: the work is "
                      "divided differently)", file=sys.stderr)
        else:
            self.policy.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        self.precision.after_step()  # the compute copy takes the restored masters
        s = payload["state"]
        self.state = RunState(round=s["round"], updates=s["updates"], skipped=s["skipped"],
                              history={k: list(v) for k, v in s["history"].items()}, wall=s.get("wall", 0.0),
                              pending_eval=s.get("pending_eval"))
        if self.world.main:
            ckpt.truncate(self.out_dir / "metrics.jsonl", payload["metrics_bytes"])
            ckpt.truncate(self.out_dir / "rollouts.jsonl", payload["rollouts_bytes"])
        ckpt.set_rng_state(payload["rng"])
        self.resumed_from = round_
        self.world.barrier()

    def save(self) -> Path:
        """Checkpoint the end of round ``state.round``; the prefix cache is dropped so that an uninterrupted
        run and one resumed from here compute the next round from the same engine state."""
        self.engine.reset_prefix_cache()
        self.state.wall = self._wall0 + time.monotonic() - self._t0

        def size(name):
            p = self.out_dir / name
            return p.stat().st_size if p.exists() else 0

        payload = {"state": self.state.to_dict(), "train_examples": [x.id for x in self.train_set.examples],
                   "metrics_bytes": size("metrics.jsonl"), "rollouts_bytes": size("rollouts.jsonl"),
                   "config": self.cfg.to_dict()}
        if self.world.distributed:  # sharded: every rank writes its part of the model and AdamW state
            from fastrft.distributed import dcp_save

            return ckpt.save_sharded_checkpoint(
                self.out_dir, self.state.round, {**payload, "world_size": self.world.size},
                self.cfg.run.keep_checkpoints, self.world,
                lambda path: dcp_save(path, self.policy, self.optimizer))
        payload.update(model=self.policy.state_dict(), optimizer=self.optimizer.state_dict())
        return ckpt.save_checkpoint(self.out_dir, self.state.round, payload, self.cfg.run.keep_checkpoints)

    # ---------------------------------------------------------------- the loop
    @property
    def updates(self) -> int:
        return self.state.updates

    @property
    def skipped(self) -> int:
        return self.state.skipped

    def run(self) -> dict[str, Any]:
        """Train until round ``run.rounds``; return the run's summary (also written to summary.json). A run
        directory that already holds this run continues from its last checkpoint."""
        cfg = self.cfg
        if self.complete:
            return json.loads((self.out_dir / "summary.json").read_text())
        self._t0, self._wall0 = time.monotonic(), self.state.wall
        main = self.world.main  # only rank 0 writes the run's records
        log = MetricsLog(self.out_dir / "metrics.jsonl") if main else _NullLog()
        self._samples = MetricsLog(self.out_dir / "rollouts.jsonl") if cfg.run.log_samples and main else None
        self._tb = _tensorboard(self.out_dir) if cfg.run.tensorboard and main else None
        first = self.state.round + 1
        bar = tqdm(total=cfg.run.rounds, initial=self.state.round, desc=cfg.run.name, unit="round",
                   disable=not self._progress, file=sys.stderr, dynamic_ncols=True)
        if self.resumed_from is not None and main:
            bar.write(f"[resume] {self.out_dir}: continuing after round {self.resumed_from}", file=sys.stderr)
        stop = StopRequest(describe=lambda: f"round {self.state.round + 1}")
        try:
            with stop:
                if self.state.pending_eval is not None:  # stopped during this evaluation last time
                    self._after_round(self.state.pending_eval, log, bar, stop)
                elif self.resumed_from is None:
                    if self._evaluate(0, log, bar, stop) is None:
                        self._stop(stop, save=False)  # nothing was recorded: the rerun starts afresh
                    # Whether round 0 was measured or read from the shared cache, round 1 starts from the
                    # same engine state (an empty prefix cache), so sharing changes nothing a run computes.
                    self.engine.reset_prefix_cache()
                for r in range(first, cfg.run.rounds + 1):
                    if self._stop_agreed(stop):
                        self._stop(stop)
                    metrics = self.round(r)
                    self.state.round = r
                    log.write(metrics)
                    self._tb_write(metrics, r)
                    bar.update(1)
                    bar.set_postfix(self._postfix(metrics), refresh=False)
                    self._after_round(r, log, bar, stop)
        except KeyboardInterrupt as e:
            if isinstance(e, RunInterrupted):
                raise
            raise KeyboardInterrupt(f"aborted; {self._resume_hint()} to continue from the last checkpoint") from None
        finally:
            bar.close()
            log.close()
            if self._samples:
                self._samples.close()
            if self._tb is not None:
                self._tb.close()
        if not main:  # rank 0 writes the summary; the others return it once it is there
            self.world.barrier()
            return json.loads((self.out_dir / "summary.json").read_text())
        summary = self._summarise(self._wall0 + time.monotonic() - self._t0)
        self.world.barrier()
        return summary

    def _stop_agreed(self, stop: StopRequest) -> bool:
        """Whether a stop was requested, agreed by all ranks (a signal may reach them at different times,
        and a rank that stopped alone would leave the others waiting in a collective)."""
        return self.world.any(stop.requested is not None)

    def _after_round(self, r: int, log: MetricsLog, bar, stop: StopRequest) -> None:
        """Evaluate and checkpoint round ``r`` when due. A stop request during the evaluation abandons
        it and checkpoints round ``r`` with the evaluation pending (the resumed run measures it first)."""
        cfg = self.cfg
        self.state.pending_eval = None
        if r == cfg.run.rounds or (cfg.eval.eval_every and r % cfg.eval.eval_every == 0):
            if self._evaluate(r, log, bar, stop) is None:
                self.state.pending_eval = r
                self._stop(stop)
        if r == cfg.run.rounds or (cfg.run.save_every and r % cfg.run.save_every == 0):
            self.save()

    def _stop(self, stop: StopRequest, save: bool = True) -> None:
        """Checkpoint the last completed round (unless that checkpoint exists; round 0 = the base model's
        evaluation done) and raise RunInterrupted."""
        path = None
        if save:
            saved = dict(ckpt.checkpoint_dirs(self.out_dir))
            if self.state.pending_eval is not None or self.state.round not in saved:
                path = self.save()
            else:
                path = saved[self.state.round]
        raise RunInterrupted(stop.requested or signal.SIGTERM, self.state.round, None if path is None else str(path),
                             self._resume_hint())

    def _resume_hint(self) -> str:
        # Without --out the run directory has a timestamp, so the same command would start a new run.
        return "rerun the same command" if self.cfg.run.out else f"rerun the same command with --out {self.out_dir}"

    def _postfix(self, metrics: dict[str, Any]) -> dict[str, str]:
        """The progress bar's per-round line: reward, then loss, KL and entropy of the update."""
        out = {"reward": f"{metrics['reward_mean']:.2f}"}
        if metrics.get("skipped"):
            out["loss"] = "skip"
        else:
            out["loss"] = f"{metrics['loss']:.4g}"
            if self.spec.needs_ref:
                out["kl"] = f"{metrics['kl_mean']:.3g}"
            out["entropy"] = f"{metrics['entropy_mean']:.3g}"
        out["skipped"] = str(self.state.skipped)
        return out

    def round(self, r: int) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.monotonic()
        examples, prompts = self.examples_for_round(r)
        groups = self.rollout(r, prompts)
        extra = self._extra_rollouts(r, prompts)
        t1 = time.monotonic()
        scores, rewards_, advantages = self.score(examples, groups, extra)
        t2 = time.monotonic()
        if self._samples:
            self._log_samples(r, examples, groups, rewards_)
        flat_adv = [a for g in advantages for a in g]
        has_signal = any(a != 0 for a in flat_adv)
        tokens = sum(len(c.token_ids) for g in groups for c in g)
        extra_tokens = sum(len(c.token_ids) for g in extra or [] for c in g)
        metrics: dict[str, Any] = {
            "kind": "round", "round": r, "examples": [x.id for x in examples],
            "reward_mean": _mean(rewards_), "correct_mean": _mean(scores),
            "advantage_mean": _mean(flat_adv), "advantage_std": _std(flat_adv),
            "advantage_abs_mean": _mean([abs(a) for a in flat_adv]),
            "response_len_mean": _mean([len(c.token_ids) for g in groups for c in g]),
            "stop_frac": _mean([c.finish_reason == "stop" for g in groups for c in g]),
            "rollout_tokens": tokens, "extra_rollout_tokens": extra_tokens,
        }
        if self._baselines:  # window / extra_samples: the rewards the baseline was taken from
            metrics.update(baseline_mean=_mean([_mean(b) for b in self._baselines]),
                           baseline_std=_mean([_std(b) for b in self._baselines]))
        if not has_signal and cfg.algo.skip_zero_signal and not self.spec.needs_ref and not self.spec.needs_entropy:
            self.state.skipped += 1
            metrics.update(skipped=1, skipped_total=self.state.skipped, time_fwd_bwd=0.0, time_optim=0.0)
        else:
            metrics.update(self.update(r, prompts, groups, advantages), skipped=0, skipped_total=self.state.skipped)
        t3 = time.monotonic()
        metrics.update(time_rollout=t1 - t0, time_reward=t2 - t1, time_update=t3 - t2,
                       rollout_tokens_per_s=(tokens + extra_tokens) / max(t1 - t0, 1e-9))
        if "train_tokens" in metrics:
            metrics["train_tokens_per_s"] = metrics["train_tokens"] / max(t3 - t2, 1e-9)
        return metrics

    # ---------------------------------------------------------------- stages
    def examples_for_round(self, r: int):
        """(examples, encoded prompts) that round ``r`` trains on."""
        d = self.cfg.data
        if not d.examples_per_round:
            return self.train_set.examples, self.train_set.prompt_ids
        idx = selection.batch_for_round(len(self.pool), d.examples_per_round, r, self.cfg.run.seed)
        for i in idx:
            if i not in self._prompt_cache:
                self._prompt_cache[i] = self._encode(self.pool[i])
        return [self.pool[i] for i in idx], [self._prompt_cache[i] for i in idx]

    def rollout(self, r: int, prompts):
        ro = self.cfg.rollout
        self.precision.rollout_model.eval()
        return self._gen.generate(prompts, n=ro.group_size, max_new_tokens=ro.max_new_tokens,
                                    temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                    seed=request_seed(self.cfg.run.seed, r, 0))

    def _extra_rollouts(self, r: int, prompts):
        """The extra_samples baseline's M samples per example: scored, never trained on."""
        if ADVANTAGES[self.cfg.algo.advantage].baseline != "extra":
            return None
        ro = self.cfg.rollout
        return self._gen.generate(prompts, n=self.cfg.algo.extra_samples, max_new_tokens=ro.max_new_tokens,
                                    temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
                                    seed=request_seed(self.cfg.run.seed, r, 2))

    def score(self, examples, groups, extra=None):
        a = self.cfg.algo
        pair = (a.reward_fail, a.reward_success)
        scores = [[self._correct(ex, c) for c in g] for ex, g in zip(examples, groups)]
        rewards_ = [[map_reward(s, pair) for s in g] for g in scores]
        kind = ADVANTAGES[a.advantage].baseline
        advantages, self._baselines = [], []
        for i, (ex, g) in enumerate(zip(examples, rewards_)):
            baseline = None
            if kind == "window":
                hist = self.state.history.setdefault(ex.id, [])
                hist.extend(g)
                del hist[:-a.window]
                baseline = torch.tensor(hist)
            elif kind == "extra":
                baseline = torch.tensor([map_reward(self._correct(ex, c), pair) for c in extra[i]])
            if baseline is not None:
                self._baselines.append(baseline.tolist())
            advantages.append(group_advantages(a.advantage, torch.tensor(g), a.adv_eps, baseline).tolist())
        return [s for g in scores for s in g], [x for g in rewards_ for x in g], advantages

    def update(self, r: int, prompts, groups, advantages) -> dict[str, Any]:
        """The round's optimizer step(s): ppo_epochs passes, each split into mini_batches steps."""
        cfg, model, a = self.cfg, self.precision.train_model, self.cfg.algo
        seq_prompts = [prompts[i] for i, g in enumerate(groups) for _ in g]
        seqs = [c for g in groups for c in g]
        seq_adv = [x for g in advantages for x in g]
        multi = a.ppo_epochs * a.mini_batches > 1
        old = self._old_logp(seq_prompts, seqs) if multi else None
        total_steps = cfg.run.rounds * a.ppo_epochs * a.mini_batches
        parts_stats, t_fb, t_opt, n_tokens, lr = [], 0.0, 0.0, 0, cfg.optim.lr
        model.train()
        for epoch in range(a.ppo_epochs):
            order = list(range(len(seqs)))
            if a.mini_batches > 1:
                random.Random(f"fastrft-minibatch/{cfg.run.seed}/{r}/{epoch}").shuffle(order)
            for part in _split(order, a.mini_batches):
                t0 = time.monotonic()
                lr = cfg.optim.lr_at(self.state.updates, total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                # On CPU, freeing the gradients makes every backward fault in fresh pages for all of them
                # (about a third of a SmolLM2 step, measured); CUDA's caching allocator makes freeing cheap.
                self.optimizer.zero_grad(set_to_none=self.device.type == "cuda")
                micro_stats, micro_tokens = [], []
                for micro, real in self._micro_batches([seq_prompts[i] for i in part], [seqs[i] for i in part]):
                    ids = [part[j] for j in micro.members]
                    batch = pack([seq_prompts[i] for i in ids], [seqs[i].token_ids for i in ids],
                                 [seq_adv[i] for i in ids], [seqs[i].logprobs for i in ids]).to(self.device)
                    old_logp = None if old is None else torch.cat([old[i] for i in ids]).to(self.device)
                    ref_logp = None
                    if self.ref is not None:
                        with torch.no_grad():
                            ref_logp, _ = linear_logprob(*self._response_hidden(self.ref, batch), batch.targets,
                                                         temperature=cfg.rollout.temperature,
                                                         backend=cfg.model.kernels)
                    hidden, weight = self._response_hidden(model, batch)
                    # The model gives hidden states; the fused op computes log-probs, entropy and the loss
                    # without ever forming [N, V] logits.
                    weights = None if micro.weights is None else micro.weights.to(self.device)
                    loss, stats = fused_linear_pg_loss(hidden, weight, batch.targets, batch.advantages,
                                                       batch.seq_ids, old_logp=old_logp, ref_logp=ref_logp,
                                                       spec=self.spec, temperature=cfg.rollout.temperature,
                                                       rollout_logp=batch.rollout_logp, backend=cfg.model.kernels,
                                                       weights=weights)
                    # FSDP averages the ranks' gradients; each rank's loss is its slice of one global sum.
                    (loss * self.world.size if self.world.distributed else loss).backward()
                    if real:  # (a zero-weight stand-in keeps this rank in step with the others' collectives)
                        micro_stats.append({"loss": float(loss.detach()), **stats})
                        micro_tokens.append(batch.num_tokens)
                    del hidden, weight, loss
                if self.world.distributed:  # the step's stats over every rank's micro-batches
                    parts = self.world.gather((micro_stats, micro_tokens))
                    micro_stats = [x for st, _ in parts for x in st]
                    micro_tokens = [x for _, nt in parts for x in nt]
                t1 = time.monotonic()
                clip = cfg.optim.grad_clip
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(),
                                                           clip if clip > 0 else float("inf"))
                if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                    grad_norm = grad_norm.full_tensor()
                self.optimizer.step()
                self.precision.after_step()
                self.engine.reset_prefix_cache()  # cached prompt KV belongs to the old weights
                self.state.updates += 1
                t_fb, t_opt = t_fb + t1 - t0, t_opt + time.monotonic() - t1
                n_tokens += sum(micro_tokens)
                step_stats = micro_stats[0] if len(micro_stats) == 1 else merge_micro_stats(micro_stats, micro_tokens)
                loss_value = step_stats.pop("loss")
                parts_stats.append({"loss": loss_value, "grad_norm": float(grad_norm), **step_stats,
                                    "micro_batches": len(micro_stats)})
        merged = _merge_stats(parts_stats)
        return {**merged, "lr": lr, "train_tokens": n_tokens, "optimizer_steps": len(parts_stats),
                "time_fwd_bwd": t_fb, "time_optim": t_opt}

    @torch.no_grad()
    def _old_logp(self, prompts, seqs) -> list[torch.Tensor]:
        """Per sequence, the current (pre-update) policy's log-probs of its response tokens, computed in
        micro-batches of the step's token budget."""
        # The rollout model holds the same compute weights as the training forward (the masters rounded to
        # the compute dtype, as FSDP's all-gather casts them), so the first step's ratio is exactly 1. Across
        # ranks each computes a contiguous share and all gather it.
        mine = split(list(range(len(seqs))), self.world)
        out: list[torch.Tensor] = []
        for group in micro_batches(_packed_lengths([prompts[i] for i in mine], [seqs[i] for i in mine]),
                                   self.token_budget):
            part = [seqs[mine[i]] for i in group]
            batch = pack([prompts[mine[i]] for i in group], [c.token_ids for c in part], [0.0] * len(part),
                         [c.logprobs for c in part]).to(self.device)
            logp, _ = linear_logprob(*self._response_hidden(self.precision.rollout_model, batch), batch.targets,
                                     temperature=self.cfg.rollout.temperature, backend=self.cfg.model.kernels)
            out.extend(logp.float().cpu().split([len(c.token_ids) for c in part]))
        if self.world.distributed:
            out = [t for part in self.world.gather(out) for t in part]
        return out

    def _log_samples(self, r: int, examples, groups, rewards_) -> None:
        flat = [(ex, c) for ex, g in zip(examples, groups) for c in g]
        n = self.cfg.run.log_samples
        self._samples.write({"round": r, "samples": [
            {"example": ex.id, "text": c.text, "reward": rw, "tokens": len(c.token_ids), "finish": c.finish_reason}
            for (ex, c), rw in list(zip(flat, rewards_))[:n]]})

    def _micro_batches(self, prompts, seqs) -> list[tuple[MicroBatch, bool]]:
        """This rank's (micro-batch, real) pairs of a step: the step's sequences (this rank's contiguous
        share of them at world size > 1) cut by --max-tokens-per-step. With more than one micro-batch in the
        step, each carries its tokens' aggregation weights within the whole step over all ranks (global
        normalisation). A rank with fewer micro-batches than another pads with zero-weight stand-ins
        (real = False), because every FSDP forward and backward is a collective."""
        lengths = _packed_lengths(prompts, seqs)
        if not self.world.distributed:
            groups = micro_batches(lengths, self.token_budget)
            if len(groups) == 1:
                return [(MicroBatch(groups[0], None), True)]
            weights = step_weights([len(c.token_ids) for c in seqs], self.spec)
            return [(MicroBatch(g, torch.cat([weights[j] for j in g])), True) for g in groups]
        weights = step_weights([len(c.token_ids) for c in seqs], self.spec)
        per_rank = []
        for rank in range(self.world.size):  # every rank knows every rank's plan: no communication needed
            idx = split(list(range(len(seqs))), self.world, rank)
            per_rank.append([[idx[j] for j in g] for g in micro_batches([lengths[i] for i in idx], self.token_budget)])
        mine = per_rank[self.world.rank]
        plan = [(MicroBatch(g, torch.cat([weights[j] for j in g])), True) for g in mine]
        pad = (MicroBatch([0], torch.zeros(len(seqs[0].token_ids))), False)
        return plan + [pad] * (max(len(p) for p in per_rank) - len(mine))

    @staticmethod
    def _response_hidden(model, batch):
        """(hidden (N, H) of the positions predicting the response tokens, LM-head weight (V, H))."""
        hidden = model.forward_packed(batch.input_ids, batch.cu_seqlens)
        return hidden.index_select(0, batch.target_pos), model.lm_head_weight

    def _evaluate(self, r: int, log: MetricsLog, bar, stop: StopRequest | None = None) -> dict[str, float] | None:
        """Evaluate after round ``r`` and log it; None if a stop request abandoned it (nothing logged)."""
        e, t0 = self.cfg.eval, time.monotonic()
        shared = key = None
        if r == 0 and self.state.updates == 0 and self._base_evals is not None:
            key = self._base_eval_key()
            shared = self._base_evals.get(key) if self.world.main else None
            shared = self.world.broadcast(shared)  # all ranks must agree whether to generate (a collective)
        if shared is not None:
            result = shared["result"]
        else:
            self.precision.rollout_model.eval()
            # Every evaluation starts from an empty prefix cache, so that its numbers do not depend on
            # whether the run was resumed just before it (a checkpoint empties the cache).
            self.engine.reset_prefix_cache()
            total = eval_sequences(self.train_set, self.test_set, train_samples=e.train_samples, greedy=e.greedy)
            with tqdm(total=total, desc=f"eval round {r}", unit="seq", leave=False, file=sys.stderr,
                      disable=not self._progress, dynamic_ncols=True) as ebar:
                measure = lambda: evaluate(  # noqa: E731
                    self._gen, self.train_set, self.test_set, train_samples=e.train_samples,
                    temperature=e.eval_temperature, max_new_tokens=e.eval_max_new_tokens or self.cfg.rollout.max_new_tokens,
                    greedy=e.greedy, seed=request_seed(self.cfg.run.seed, r, 1), extra_rewards=e.extra_rewards,
                    progress=ebar.update)
                # Across ranks an evaluation is not abandoned halfway (its generation is collective): a
                # stop request then waits for it to finish.
                abandonable = stop is not None and not self.world.distributed
                result = stop.run_abandonable(measure) if abandonable else measure()
            if result is None:
                return None
            if key is not None and self.world.main:
                self._base_evals.put(key, result, self.cfg.run.name)
        record = {"kind": "eval", "round": r, **result, "time_eval": time.monotonic() - t0}
        if shared is not None:
            record["shared_from"] = shared["run"]
        log.write(record)
        self._tb_write(record, r, prefix="eval/")
        shown = ", ".join(f"{k} {result[k]:.3f}" for k in ("train_pass1", "test_pass1", "test_greedy") if k in result)
        how = f"shared with {shared['run']}" if shared is not None else f"{record['time_eval']:.0f} s"
        if self.world.main:
            bar.write(f"[eval] {self.cfg.run.name} round {r}: {shown} ({how})", file=sys.stderr)
        return result

    def _base_eval_key(self) -> str:
        """What the base model's evaluation depends on; the training choices (algo, optim, G) are left out."""
        import fastrft

        c = self.cfg.to_dict()
        rollout = {k: v for k, v in c["rollout"].items() if k != "group_size"}
        ev = {k: v for k, v in c["eval"].items() if k != "eval_every"}
        settings = {"fastrft": fastrft.__version__, "torch": torch.__version__, "model": c["model"],
                    "device": str(self.device), "rollout": rollout, "eval": ev, "seed": self.cfg.run.seed}
        return base_eval_key(settings, self.train_set, self.test_set)

    def _tb_write(self, record: dict[str, Any], step: int, prefix: str = "train/") -> None:
        if self._tb is None:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round":
                self._tb.add_scalar(prefix + k, v, step)
        self._tb.flush()

    def _summarise(self, wall: float) -> dict[str, Any]:
        records = read_metrics(self.out_dir / "metrics.jsonl")
        evals = [x for x in records if x["kind"] == "eval"]
        try:
            plot = str(plot_curves(records, self.out_dir / "curves.png", title=self.cfg.run.name))
        except Exception as e:  # noqa: BLE001 - a plotting failure must not lose the run's summary
            plot = f"(plot failed: {e})"
        summary = {"out_dir": str(self.out_dir), "rounds": self.cfg.run.rounds, "updates": self.state.updates,
                   "skipped_rounds": self.state.skipped, "wall_s": wall, "complete": True,
                   "train_examples": [x.id for x in self.train_set.examples],
                   "first_eval": evals[0] if evals else None, "last_eval": evals[-1] if evals else None,
                   "plot": plot, "table": before_after_table(records)}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


class _NullLog:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's records)."""

    def write(self, record) -> None:
        pass

    def close(self) -> None:
        pass


def _split(order: list[int], parts: int) -> list[list[int]]:
    """``order`` cut into ``parts`` contiguous nearly equal pieces (empty ones dropped)."""
    n = len(order)
    bounds = [n * i // parts for i in range(parts + 1)]
    return [order[bounds[i]:bounds[i + 1]] for i in range(parts) if bounds[i + 1] > bounds[i]]


def _packed_lengths(prompts, seqs) -> list[int]:
    """Packed tokens of each (prompt, response) pair, as :func:`fastrft.algo.pack` lays them out."""
    return [len(p) + len(c.token_ids) - 1 for p, c in zip(prompts, seqs)]


def _merge_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in parts[0]:
        vals = [p[k] for p in parts if k in p]
        out[k] = min(vals) if k.endswith("_min") else max(vals) if k.endswith("_max") else sum(vals) / len(vals)
    return out


def _enable_checkpointing(model) -> None:
    if not getattr(model, "supports_activation_checkpointing", False):
        raise ConfigError(f"activation_checkpointing (--activation-checkpointing): {type(model).__name__} cannot "
                          "recompute its layers in the backward (it has no per-layer packed forward to "
                          "checkpoint); drop the flag, or lower --max-tokens-per-step to bound memory instead")
    model.activation_checkpointing = True


def _warn_unabsorbed_updates(precision: Precision, lr: float) -> None:
    """Pure low-precision weights: say loudly when an AdamW step of size lr cannot move most of them."""
    if precision.master_dtype == torch.float32:
        return
    moved = update_absorbed_fraction(precision.master, lr)
    if moved < 0.5:
        print(f"fastrft: WARNING: with --precision {precision.name} the weights are stored in "
              f"{str(precision.master_dtype).removeprefix('torch.')}, and an AdamW step at --lr {lr:g} can change "
              f"only {moved:.1%} of them: the rest round back to their old value, so the run barely learns. "
              "Use --precision bf16-mixed (fp32 master weights, bf16 compute) or fp32.", file=sys.stderr)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard (--tensorboard) needs the tensorboard package: pip install tensorboard "
                          "(or install fastrft with its [tensorboard] extra)") from None
    return SummaryWriter(str(out_dir / "tb"))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device (--device) {name!r} was requested but CUDA is not available; use --device cpu")
    return torch.device(name)


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else 0.0


def _std(xs) -> float:
    xs = [float(x) for x in xs]
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
