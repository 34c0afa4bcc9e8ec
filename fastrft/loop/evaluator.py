"""Evaluation after a round: train/test Pass@1 (and greedy accuracy, Pass@k, extra rewards) of the policy.

The evaluator owns the base-evaluation cache: a run's round-0 evaluation (the base model's) may be
shared with other runs of the same base model and evaluation settings (``fastrft ladder``), read from
the cache instead of measured. Every measured evaluation starts from an empty prefix cache, so its
numbers do not depend on whether the run was resumed just before it. A stop request may abandon an
evaluation at world size 1 (the caller then keeps it pending); across ranks it runs to its end, since
its generation is collective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from fastrft.progress import bar as progress_bar

from fastrft.config import TrainConfig
from fastrft.evaluate import BaseEvalCache, EvalSet, base_eval_key, eval_sequences, evaluate
from fastrft.interrupt import StopRequest
from fastrft.loop import seeds


@dataclass(frozen=True)
class Evaluation:
    """One evaluation's metrics record, its per-problem records (fastrft.evaluate.problem_record), and the run
    it was shared from (None: measured by this run)."""

    record: dict[str, Any]
    problems: list[dict[str, Any]]
    shared_from: str | None = None

    def line(self, name: str) -> str:
        """The one-line summary printed after the evaluation."""
        r = self.record
        shown = ", ".join(f"{k} {r[k]:.3f}" for k in ("train_pass1", "test_pass1", "test_greedy") if k in r)
        how = f"shared with {self.shared_from}" if self.shared_from is not None else f"{r['time_eval']:.0f} s"
        return f"[eval] {name} round {r['round']}: {shown} ({how})"


class Evaluator:
    def __init__(self, cfg: TrainConfig, gen, model, train_set: EvalSet, test_set: EvalSet, *, world,
                 device: torch.device, reset_prefix_cache: Callable[[], None], progress: bool,
                 base_eval_cache: str | Path | None = None, hook=None):
        """``gen``: the engine wrapper that generates with ``model``; ``base_eval_cache``: a JSON file of
        round-0 evaluations shared with other runs (:class:`fastrft.evaluate.BaseEvalCache`); ``hook``: the
        metrics hook's (name, function) (fastrft.metrics_hook)."""
        self.hook = hook
        self.cfg, self.gen, self.model, self.world, self.device = cfg, gen, model, world, device
        self.train_set, self.test_set = train_set, test_set
        self.reset_prefix_cache, self.progress = reset_prefix_cache, progress
        self.base_evals = BaseEvalCache(base_eval_cache) if base_eval_cache else None

    def __call__(self, r: int, *, base: bool, stop: StopRequest | None = None) -> Evaluation | None:
        """Evaluate the policy after round ``r`` (``base``: it is still the base model, never updated);
        None if a stop request abandoned the evaluation."""
        t0 = time.monotonic()
        shared = key = None
        if base and self.base_evals is not None:
            key = self.base_key()
            shared = self.base_evals.get(key) if self.world.main else None
            shared = self.world.broadcast(shared)  # all ranks must agree whether to generate (a collective)
        if shared is not None:
            result, problems = shared["result"], shared["problems"]
        else:
            measured = self._measure(r, stop)
            if measured is None:
                return None
            result, problems = measured
            if key is not None and self.world.main:
                self.base_evals.put(key, result, self.cfg.run.name, problems)
        record = {"kind": "eval", "round": r, **result, "time_eval": time.monotonic() - t0}
        if shared is not None:
            record["shared_from"] = shared["run"]
        return Evaluation(record, problems, shared["run"] if shared is not None else None)

    def _measure(self, r: int, stop: StopRequest | None) -> tuple[dict[str, float], list[dict]] | None:
        e = self.cfg.eval
        self.model.eval()
        self.reset_prefix_cache()
        total = eval_sequences(self.train_set, self.test_set, train_samples=e.train_samples, greedy=e.greedy,
                               test_samples=e.samples)
        with progress_bar(total=total, desc=f"eval round {r}", unit="seq", transient=True,
                          disable=not self.progress) as bar:
            def measure():
                return evaluate(self.gen, self.train_set, self.test_set, train_samples=e.train_samples,
                                temperature=e.eval_temperature,
                                max_new_tokens=e.eval_max_new_tokens or self.cfg.rollout.max_new_tokens,
                                greedy=e.greedy, seed=seeds.generation_seed(self.cfg.run.seed, r, seeds.EVALUATION),
                                extra_rewards=e.extra_rewards, test_samples=e.samples, eval_k=e.eval_k,
                                hook=self.hook, progress=bar.update)

            abandonable = stop is not None and not self.world.distributed
            return stop.run_abandonable(measure) if abandonable else measure()

    def base_key(self) -> str:
        """What the base model's evaluation depends on; the training choices (algo, optim, G) are left out."""
        import fastrft

        c = self.cfg.to_dict()
        rollout = {k: v for k, v in c["rollout"].items() if k != "group_size"}
        ev = {k: v for k, v in c["eval"].items() if k != "eval_every"}
        settings = {"fastrft": fastrft.__version__, "torch": torch.__version__, "model": c["model"],
                    "device": str(self.device), "rollout": rollout, "eval": ev, "seed": self.cfg.run.seed}
        return base_eval_key(settings, self.train_set, self.test_set)
