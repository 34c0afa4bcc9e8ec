"""What a run records: metrics.jsonl, problems.jsonl (each evaluation's problems), prompts.jsonl (each round's
training prompts), rollouts.jsonl, TensorBoard scalars, the progress bar.

Rank 0 records through a :class:`Recorder`; the other ranks get a :class:`NullRecorder`, which has the
same methods and does nothing, so every stage runs the same code on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fastrft.progress import bar as progress_bar

from fastrft.config import TrainConfig
from fastrft.errors import ConfigError
from fastrft.loop.types import Rollouts, RoundBatch, Scores
from fastrft.report import MetricsLog


class Recorder:
    """Opens the run's logs for appending (a resumed run continues them) and the progress bar at
    ``first_round - 1`` of ``rounds``."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, *, done: int, progress: bool):
        self.cfg = cfg
        self.metrics = MetricsLog(out_dir / "metrics.jsonl")
        self.problems = MetricsLog(out_dir / "problems.jsonl")
        self.prompt_log = MetricsLog(out_dir / "prompts.jsonl")
        self.samples = MetricsLog(out_dir / "rollouts.jsonl") if cfg.run.log_samples else None
        sinks = report_sinks(cfg)
        self.tb = _tensorboard(out_dir) if "tensorboard" in sinks else None
        self.wandb = _wandb(cfg, out_dir) if "wandb" in sinks else None
        self.bar = progress_bar(total=cfg.run.rounds, initial=done, desc=cfg.run.name, unit="round",
                                disable=not progress)

    def note(self, line: str) -> None:
        """A line above the progress bar, on stderr."""
        self.bar.write(line, file=sys.stderr)

    def round(self, metrics: dict[str, Any], postfix: dict[str, str]) -> None:
        self.metrics.write(metrics)
        self.scalars(metrics, metrics["round"], prefix="train/")
        self.bar.set_postfix(postfix, refresh=False)  # before the update, which draws the bar with it
        self.bar.update(1)

    def evaluation(self, record: dict[str, Any], line: str, problems: list[dict[str, Any]]) -> None:
        """The evaluation's problem records (problems.jsonl, each with its round), then its metrics."""
        for rec in problems:
            self.problems.write({"round": record["round"], **rec})
        self.metrics.write(record)
        self.scalars(record, record["round"], prefix="eval/")
        self.note(line)

    def prompts(self, records: list[dict[str, Any]]) -> None:
        """The round's training prompts and their pass rates (fastrft.loop.metrics.prompt_records)."""
        for rec in records:
            self.prompt_log.write(rec)

    def rollouts(self, batch: RoundBatch, rollouts: Rollouts, scores: Scores, extra: dict | None = None) -> None:
        """The round's first --log-samples responses with their rewards, to rollouts.jsonl; ``extra``: the
        columns reward functions logged (``log_extra``), one value per response."""
        if self.samples is None:
            return
        flat = [(ex, c) for ex, g in zip(batch.examples, rollouts.groups) for c in g]
        n = self.cfg.run.log_samples
        samples = [{"example": ex.id, "text": c.text, "reward": rw, "tokens": len(c.token_ids),
                    "finish": c.finish_reason} for (ex, c), rw in list(zip(flat, scores.rewards))[:n]]
        for column, values in (extra or {}).items():
            for sample, value in zip(samples, values):
                sample.setdefault(column, value if isinstance(value, (str, int, float, bool, type(None)))
                                  else str(value))
        self.samples.write({"round": batch.round, "samples": samples})

    def scalars(self, record: dict[str, Any], step: int, prefix: str) -> None:
        """The record's numbers as TensorBoard scalars and wandb metrics (--report-to), at step = round."""
        numbers = {prefix + k: v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()
        self.problems.close()
        self.prompt_log.close()
        if self.samples is not None:
            self.samples.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class NullRecorder:
    """What ranks other than 0 record to: nothing (rank 0 writes the run's records)."""

    def note(self, line: str) -> None:
        pass

    def round(self, metrics: dict[str, Any], postfix: dict[str, str]) -> None:
        pass

    def evaluation(self, record: dict[str, Any], line: str, problems: list[dict[str, Any]]) -> None:
        pass

    def prompts(self, records: list[dict[str, Any]]) -> None:
        pass

    def rollouts(self, batch: RoundBatch, rollouts: Rollouts, scores: Scores, extra: dict | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def report_sinks(cfg: TrainConfig) -> set[str]:
    """Where metrics go besides metrics.jsonl: --report-to, and --tensorboard (its older spelling)."""
    return (set(cfg.run.report_to) - {"none"}) | ({"tensorboard"} if cfg.run.tensorboard else set())


def check_sinks(cfg: TrainConfig) -> None:
    """Refuse, before anything loads, a --report-to whose package is missing."""
    import importlib.util

    for sink, module, extra in (("tensorboard", "tensorboard", "tensorboard"), ("wandb", "wandb", "wandb")):
        if sink in report_sinks(cfg) and importlib.util.find_spec(module) is None:
            flag = "--tensorboard / --report-to tensorboard" if sink == "tensorboard" else "--report-to wandb"
            raise ConfigError(f"report_to ({flag}) needs the {module} package: pip install {module} (or install "
                              f"fastrft with its [{extra}] extra)")


def _wandb(cfg: TrainConfig, out_dir: Path):
    """A wandb run for this run directory: the same id on every resume (kept in <run dir>/wandb-id, so a
    moved directory continues it too), named after the run directory unless --name was given; its files
    go to WANDB_DIR when that is set, else into the run directory."""
    import os
    import uuid

    import wandb

    from fastrft.config import RunConfig

    id_file = out_dir / "wandb-id"
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
    given = cfg.run.name not in (RunConfig.name, "demo")  # the defaults of train and demo name nothing
    extra = {} if os.environ.get("WANDB_DIR") else {"dir": str(out_dir)}
    return wandb.init(project=None, name=cfg.run.name if given else out_dir.resolve().name, id=run_id,
                      resume="allow", config=cfg.to_dict(), **extra)


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard (--tensorboard) needs the tensorboard package: pip install tensorboard "
                          "(or install fastrft with its [tensorboard] extra)") from None
    return SummaryWriter(str(out_dir / "tb"))
