"""The run loop: rounds, with evaluations, checkpoints and stop requests around them.

    base evaluation (round 0) | resumed: the pending evaluation, if any
    for each round: [stop?] -> round -> record -> evaluate when due -> checkpoint when due
    summary.json

A round is atomic: a stop request (SIGINT/SIGTERM, fastrft.interrupt) is honoured at a round boundary,
agreed by all ranks; the run checkpoints the last completed round and raises RunInterrupted. A stop
during an evaluation abandons it (world size 1) and checkpoints its round with the evaluation pending,
which the resumed run measures first. Every rank runs this loop; rank 0 records.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

from fastrft.config import TrainConfig
from fastrft.errors import FastRFTError
from fastrft.interrupt import RunInterrupted, StopRequest
from fastrft.loop.checkpointing import Checkpoints
from fastrft.loop.evaluator import Evaluator
from fastrft.loop.metrics import postfix
from fastrft.loop.round import Stages, train_round
from fastrft.loop.types import RunState
from fastrft.report import before_after_table, plot_curves, read_metrics


class WallClock:
    """Seconds spent in run() over all sessions of a run: the checkpointed total plus this session's."""

    def __init__(self, before: float):
        self.start(before)

    def start(self, before: float) -> None:
        self.t0, self.before = time.monotonic(), before

    def total(self) -> float:
        return self.before + time.monotonic() - self.t0


class RunLoop:
    def __init__(self, cfg: TrainConfig, out_dir: Path, state: RunState, *, stages: Stages, evaluator: Evaluator,
                 checkpoints: Checkpoints, learner, world, clock: WallClock, resumed_from: int | None):
        self.cfg, self.out_dir, self.state, self.stages = cfg, out_dir, state, stages
        self.evaluator, self.checkpoints = evaluator, checkpoints
        self.learner, self.world, self.clock, self.resumed_from = learner, world, clock, resumed_from
        self._in_round = False  # between a round's start and its record (what a stop finishes)

    def run(self, train_example_ids: list[str], recorder) -> dict[str, Any]:
        """Train until round ``run.rounds``, recording through ``recorder`` (which it closes); return the
        run's summary (rank 0 writes summary.json)."""
        stop = StopRequest(describe=self._next_step)
        if self.resumed_from is not None:
            recorder.note(f"[resume] {self.out_dir}: continuing after round {self.resumed_from}")
        try:
            with stop:
                self._start(stop, recorder)
                for r in range(self.state.round + 1, self.cfg.run.rounds + 1):
                    if self.world.any(stop.requested is not None):  # agreed: a signal may reach ranks apart
                        self._stop(stop)
                    self._in_round = True
                    metrics = train_round(self.stages, self.state, r, recorder)
                    _check_finite(metrics, self.checkpoints.saved(), self.resume_hint())
                    self.state.round, self._in_round = r, False
                    recorder.round(metrics, postfix(metrics, kl=self.cfg.loss_spec.needs_ref))
                    self._after_round(r, stop, recorder)
        except KeyboardInterrupt as e:
            if isinstance(e, RunInterrupted):
                raise
            raise KeyboardInterrupt(f"aborted; {self.resume_hint()} to continue from the last checkpoint") from None
        finally:
            recorder.close()
        if not self.world.main:  # rank 0 writes the summary; the others return it once it is there
            self.world.barrier()
            return json.loads((self.out_dir / "summary.json").read_text())
        summary = self._summarise(train_example_ids)
        self.world.barrier()
        return summary

    def save(self) -> Path:
        """Checkpoint the end of round ``state.round``."""
        self.state.wall = self.clock.total()
        return self.checkpoints.save(self.state)

    def _next_step(self, abandoning: bool) -> str:
        """What the run does after a stop request, said when the signal arrives."""
        done = self.state.round
        if abandoning and done == 0 and self.resumed_from is None and self.state.pending_eval is None:
            return "abandoning the base model's evaluation; nothing is recorded yet, so there is nothing to checkpoint"
        if abandoning:
            return f"abandoning the evaluation after round {done}, then checkpointing round {done} with it pending"
        if self._in_round:
            return f"finishing round {done + 1}, then checkpointing it"
        return f"stopping after round {done}, then checkpointing it (unless that checkpoint exists)"

    def resume_hint(self) -> str:
        # Without --out the run directory has a timestamp, so the same command would start a new run.
        return "rerun the same command" if self.cfg.run.out else f"rerun the same command with --out {self.out_dir}"

    def _start(self, stop: StopRequest, recorder) -> None:
        """Before the first round of this session: the base model's evaluation, or a pending one."""
        if self.state.pending_eval is not None:  # stopped during this evaluation last time
            self._after_round(self.state.pending_eval, stop, recorder)  # as the run that was not stopped: no reset
            return
        if self.resumed_from is None:
            if not self._evaluate(0, stop, recorder):
                self._stop(stop, save=False)  # nothing was recorded: the rerun starts afresh
        if self.resumed_from in (None, 0):
            # Whether round 0 was measured, read from the shared cache or kept from an earlier attempt
            # (resumed after round 0), and whatever generated before it (a difficulty estimate), round 1
            # starts from the same engine state: an empty prefix cache and a fresh pool order.
            self.learner.reset_prefix_cache()

    def _after_round(self, r: int, stop: StopRequest, recorder) -> None:
        """Evaluate and checkpoint round ``r`` when due. A stop request during the evaluation abandons
        it and checkpoints round ``r`` with the evaluation pending (the resumed run measures it first)."""
        run = self.cfg.run
        self.state.pending_eval = None
        if r == run.rounds or (self.cfg.eval.eval_every and r % self.cfg.eval.eval_every == 0):
            if not self._evaluate(r, stop, recorder):
                self.state.pending_eval = r
                self._stop(stop)
        if r == run.rounds or (run.save_every and r % run.save_every == 0):
            self.save()

    def _evaluate(self, r: int, stop: StopRequest, recorder) -> bool:
        """Evaluate after round ``r`` and record it; False if a stop request abandoned it."""
        done = self.evaluator(r, base=r == 0 and self.state.updates == 0, stop=stop)
        if done is not None:
            recorder.evaluation(done.record, done.line(self.cfg.run.name), done.problems)
        return done is not None

    def _stop(self, stop: StopRequest, save: bool = True) -> None:
        """Checkpoint the last completed round (unless that checkpoint exists; round 0 = the base model's
        evaluation done) and raise RunInterrupted."""
        path = None
        if save:
            saved = self.checkpoints.saved()
            path = self.save() if self.state.pending_eval is not None or self.state.round not in saved \
                else saved[self.state.round]
        raise RunInterrupted(stop.requested or signal.SIGTERM, self.state.round, None if path is None else str(path),
                             self.resume_hint())

    def _summarise(self, train_example_ids: list[str]) -> dict[str, Any]:
        records = read_metrics(self.out_dir / "metrics.jsonl")
        evals = [x for x in records if x["kind"] == "eval"]
        try:
            plot = str(plot_curves(records, self.out_dir / "curves.png", title=self.cfg.run.name))
        except Exception as e:  # noqa: BLE001 - a plotting failure must not lose the run's summary
            plot = f"(plot failed: {e})"
        summary = {"out_dir": str(self.out_dir), "rounds": self.cfg.run.rounds, "updates": self.state.updates,
                   "skipped_rounds": self.state.skipped, "wall_s": self.clock.total(), "complete": True,
                   "train_examples": train_example_ids,
                   "first_eval": evals[0] if evals else None, "last_eval": evals[-1] if evals else None,
                   "plot": plot, "table": before_after_table(records)}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _check_finite(metrics: dict[str, Any], saved: dict[int, Path], hint: str) -> None:
    """A round whose update produced NaN or inf has diverged: stop with what happened, before its record
    is written (metrics.jsonl holds numbers only), pointing at the checkpoint a rerun continues from."""
    # A reward function's mean is NaN when it returned None throughout (TRL's convention): not divergence.
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)
           and not (k.startswith("reward_") and k != "reward_mean")]
    if bad:
        last = f"round {max(saved)}" if saved else "none yet"
        raise FastRFTError(f"round {metrics['round']} diverged: {', '.join(bad)} not finite (NaN or inf), so "
                           f"nothing of it was recorded. The last checkpoint is {last}; to continue from it with a "
                           f"lower --lr (or --precision fp32), {hint} with the change and --force")

