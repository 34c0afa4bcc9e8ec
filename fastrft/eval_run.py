"""``fastrft eval``: evaluate a base model, a run's checkpoint or an exported model, the way training does.

What is evaluated:
- a run directory (config.json and checkpoints/): the checkpoint of ``--round N`` (default: the newest
  whole one), with the run's own config. Nothing of the run is written; with no setting changed, the
  numbers and per-problem records equal that round's in-training evaluation bit for bit, since the same
  code computes them: a :class:`fastrft.trainer.Trainer` built from the run's config, its weights replaced
  by the checkpoint's, and its evaluator called for that round (same seeds, same problems, same backend);
- anything else is a model (a local or exported directory, an alias, a hub id), evaluated as a base model
  (round 0) under the default config, changed by the options.

Options (``--dataset``, ``--eval-split``, ``--test-size``, ``--eval-samples``, ``--eval-k``,
``--train-samples``, ``--max-new-tokens``, ``--seed``, ...) override the config. The results go to
``--out`` (default ``<run>/eval/round-NNNNNN``, or ``runs/eval-<model>-<stamp>``): problems.jsonl (one record
per problem, fastrft.evaluate.problem_record) and summary.json (the metrics, what was evaluated, the
config); the table with intervals is printed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastrft.config import TrainConfig
from fastrft.errors import ConfigError
from fastrft.report.records import MetricsLog, write_json


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def target_config(target: str, round_: int | None) -> tuple[TrainConfig, Path | None, int]:
    """(config, run directory or None, round) of what ``target`` names."""
    from fastrft.checkpoint import checkpoint_dirs

    path = Path(target).expanduser()
    if is_run_dir(path):
        try:
            cfg = TrainConfig.from_dict(json.loads((path / "config.json").read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path / 'config.json'}: not a config written by fastrft ({e})") from None
        if cfg.data.dataset == "custom" and not (cfg.data.train_file or cfg.data.test_file):
            raise ConfigError(f"{path}: its rows were passed from Python (Trainer(train_dataset=...)), so fastrft eval "
                              "cannot load them; evaluate it from Python, or export it and pass --dataset")
        saved = [r for r, _ in checkpoint_dirs(path)]
        if not saved:
            raise ConfigError(f"{path}: a run directory with no checkpoint; a run writes one every --save-every rounds "
                              "and at its end")
        if round_ is None:
            round_ = saved[-1]
        elif round_ not in saved:
            raise ConfigError(f"--round {round_}: {path} has no checkpoint of that round (it has "
                              f"{', '.join(map(str, saved))}; a run keeps its last --keep-checkpoints)")
        return cfg, path, round_
    if round_ is not None:
        raise ConfigError(f"--round {round_}: {target} is not a run directory (config.json and checkpoints/), so it "
                          "has no rounds")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"{path}: neither a model directory (no config.json) nor a run directory written by "
                          "fastrft train (config.json and checkpoints/)")
    return TrainConfig(), None, 0


def evaluate_target(target: str, overrides: dict[str, dict[str, Any]], *, round_: int | None = None,
                    out: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``target`` (module docstring) with ``overrides`` ({section: {field: value}}) applied to its
    config; returns the summary written to ``out``/summary.json."""
    from fastrft.report.tables import before_after_table
    from fastrft.rundir import stamp

    cfg, run_dir, round_ = target_config(target, round_)
    values = cfg.to_dict()
    if run_dir is None:
        values["model"]["model"] = target
    for section, fields in overrides.items():
        values[section].update(fields)
    scratch = Path(tempfile.mkdtemp(prefix="fastrft-eval-"))
    values["run"].update(out=str(scratch / "run"), progress=progress, tensorboard=False, report_to=[])
    cfg = TrainConfig.from_dict(values)
    name = Path(target).name or "model"
    dest = Path(out) if out else (run_dir / "eval" / f"round-{round_:06d}" if run_dir is not None
                                  else Path("runs") / f"eval-{name}-{stamp()}")
    try:
        evaluation = _measure(cfg, run_dir, round_)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(dest / "problems.jsonl.tmp")
    for rec in evaluation.problems:
        log.write({"round": round_, **rec})
    log.close()
    (dest / "problems.jsonl.tmp").replace(dest / "problems.jsonl")
    summary = {"target": str(target), "run_dir": str(run_dir) if run_dir else None, "round": round_,
               "metrics": evaluation.record, "table": before_after_table([evaluation.record]),
               "config": cfg.replace(run=dataclasses.replace(cfg.run, out=str(dest))).to_dict()}
    write_json(dest / "summary.json", summary)
    summary["out"] = str(dest)
    return summary


def _measure(cfg: TrainConfig, run_dir: Path | None, round_: int):
    """The evaluation of ``round_`` with the trainer's own evaluator, the weights the run's checkpoint."""
    from fastrft.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        if run_dir is not None:
            load_weights(trainer.precision, run_dir, round_)
            trainer.learner.refresh()  # the compute copy (and the engine's model) takes the masters
        evaluation = trainer.evaluator(round_, base=run_dir is None)
    finally:
        trainer.close()
    assert evaluation is not None
    return evaluation


def load_weights(precision, run_dir: Path, round_: int) -> None:
    """Load round ``round_``'s checkpoint of ``run_dir`` into ``precision.master``: a one-file checkpoint (the
    full model, or a LoRA run's adapters) or the full model assembled from DCP shards (a torchrun run)."""
    from fastrft import checkpoint as ckpt
    from fastrft.models import lora

    _, payload = ckpt.load_round(run_dir, round_)
    if "model" in payload:
        lora.load_checkpoint_state(precision.master, payload["model"])
        return
    from fastrft.distributed import dcp_full_model_state

    state = dcp_full_model_state(ckpt.shard_dir(run_dir, round_), precision.master.state_dict())
    precision.master.load_state_dict(state)


def print_summary(summary: dict[str, Any]) -> None:
    what = (f"round {summary['round']} of {summary['run_dir']}" if summary["run_dir"] else summary["target"])
    print(f"evaluated {what}: {summary['out']}\n{summary['table']}")
