"""``fastrft ladder``: every (layer, seed) pair of a bottom-up study, one after another, resumable.

Layout of a study directory::

    DIR/ladder.json                 the study's settings (layers, seeds, profile, overrides)
    DIR/<preset>/seed-<s>/          one ordinary run directory per pair (config.json, metrics.jsonl, ...)
    DIR/difficulty.json             pass-rate estimates shared by the pairs that select by difficulty
    DIR/base-eval.json              round-0 evaluations shared by the pairs with the same base model, seed
                                    and evaluation settings (L0-L3 of a seed evaluate once)
    DIR/ladder.md, DIR/curves.png   the comparison table and figure, rewritten after every finished pair

A pair whose run directory holds a complete summary is skipped on a rerun; an unfinished one resumes from
its last checkpoint (fastrft.checkpoint), so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fastrft import presets
from fastrft.config import GROUPS, TrainConfig, build_group
from fastrft.errors import ConfigError
from fastrft.report import MIN_EFFECT, baseline, dynamics_table, ladder_table, plot_ladder, read_metrics


@dataclass(frozen=True)
class Pair:
    preset: presets.Preset
    seed: int
    config: TrainConfig

    @property
    def out(self) -> Path:
        return Path(self.config.run.out)


def plan(base: dict[str, dict[str, Any]], flags: dict[str, dict[str, Any]], layers: list[str], seeds: int,
         profile_name: str, out: Path) -> list[Pair]:
    """The study's pairs: for each preset and seed, defaults < L0 < profile < preset < flags."""
    if seeds < 1:
        raise ConfigError(f"seeds (--seeds) must be >= 1, got {seeds}")
    chosen = []
    for name in layers:
        p = presets.resolve(name)
        if p not in chosen:
            chosen.append(p)
    if not chosen:
        raise ConfigError("layers (--layers) is empty; e.g. --layers L0,L1,L2,L3,L4")
    prof = presets.profile(profile_name)
    pairs = []
    for p in chosen:
        for s in range(seeds):
            run = {"seed": s, "out": str(out / p.name / f"seed-{s}"), "name": f"{p.name}/seed-{s}"}
            values = presets.overlay(base, presets.L0_FIELDS, prof, p.overrides, flags, {"run": run})
            if values["data"].get("difficulty_cache") is None:
                values["data"]["difficulty_cache"] = str(out / "difficulty.json")
            try:
                cfg = TrainConfig(**{g: build_group(GROUPS[g], v, g) for g, v in values.items()})
            except ConfigError as e:
                raise ConfigError(f"preset {p.name}: {e}") from None
            pairs.append(Pair(p, s, cfg))
    return pairs


def _complete(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "summary.json").read_text()).get("complete"))
    except (OSError, json.JSONDecodeError):
        return False


def run_ladder(pairs: list[Pair], out: Path, settings: dict[str, Any], *, force: bool = False,
               keep_checkpoints: bool = False) -> dict[str, Any]:
    """Run every pair not yet complete; write ladder.md and curves.png; return {"table", "figure"}."""
    from fastrft.checkpoint import CKPT_DIR
    from fastrft.trainer import Trainer

    out.mkdir(parents=True, exist_ok=True)
    meta = out / "ladder.json"
    if meta.exists() and not force:
        old = json.loads(meta.read_text())
        if old != json.loads(json.dumps(settings)):
            changed = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                                if old.get(k) != json.loads(json.dumps(settings)).get(k))
            raise ConfigError(f"{out} holds a ladder with other settings ({changed}); use a new --out, or --force "
                              "to continue it with these settings")
    meta.write_text(json.dumps(settings, indent=2))
    todo = [p for p in pairs if not _complete(p.out)]
    print(f"fastrft ladder: {len(pairs)} runs ({len(pairs) - len(todo)} already complete) in {out}", file=sys.stderr)
    overall = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="ladder", unit="run", file=sys.stderr,
                   dynamic_ncols=True, position=0)
    try:
        for i, pair in enumerate(todo):
            overall.set_postfix_str(f"{pair.preset.name} seed {pair.seed}")
            t0 = time.monotonic()
            Trainer(pair.config, force=force, base_eval_cache=out / "base-eval.json").run()
            overall.update(1)
            overall.write(f"[ladder] {pair.preset.name} seed {pair.seed} done in {time.monotonic() - t0:.0f} s",
                          file=sys.stderr)
            if not keep_checkpoints:  # a finished run needs no resume point; checkpoints are GBs each
                import shutil

                shutil.rmtree(pair.out / CKPT_DIR, ignore_errors=True)
            report(pairs, out)
    finally:
        overall.close()
    return report(pairs, out)


def collect(pairs: list[Pair]) -> list[dict[str, Any]]:
    """Per preset: its choice and, per finished seed, the metrics records and the summary."""
    layers: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        entry = layers.setdefault(pair.preset.name, {"name": pair.preset.name, "layer": pair.preset.layer,
                                                     "choice": pair.preset.choice, "runs": []})
        if _complete(pair.out):
            entry["runs"].append({"seed": pair.seed, "records": read_metrics(pair.out / "metrics.jsonl"),
                                  "summary": json.loads((pair.out / "summary.json").read_text())})
    return list(layers.values())


def report(pairs: list[Pair], out: Path) -> dict[str, Any]:
    layers = collect(pairs)
    table = ladder_table(layers)
    base = baseline(layers)["name"] if layers else "L0-minimal"
    cfg = pairs[0].config
    try:
        profile = json.loads((out / "ladder.json").read_text())["profile"]
    except (OSError, json.JSONDecodeError, KeyError):
        profile = None
    sizing = (f"Profile `{profile}`: {presets.PROFILES[profile][0]}. The 'choice' column describes each preset "
              "against the paper's settings; the profile's sizing applies to every row.\n\n"
              if profile in presets.PROFILES else "")
    header = (f"# Ladder: {cfg.model.model} on {cfg.data.dataset}\n\n{sizing}"
              f"{len(pairs)} runs: {len(layers)} presets x {len({p.seed for p in pairs})} seeds, {cfg.run.rounds} rounds "
              f"each. Pass@1 columns are mean ± std over seeds; 'best test' is the maximum of the seed-mean test "
              f"curve and its round; 'to 0.9' is the first evaluated round with train Pass@1 >= 0.9, averaged over "
              f"the seeds that reached it (how many did, in brackets). 'train/test vs' columns: the preset's Pass@1 "
              f"averaged over its evaluations after round 0 (the area under the curve, mean over seeds) minus "
              f"{base}'s, ± its standard error; 'helps' or 'hurts' when |Δ| >= 2 SE and >= {MIN_EFFECT}, else "
              f"'within noise'.\n\n")
    dynamics = ("\n## Training dynamics\n\nFrom the per-round records, mean ± std over seeds: the share of rollouts "
                "that were correct; the last round with an incorrect rollout (0: none failed); how many times the "
                "round's outcome flipped between all-correct and not; the median and largest gradient norm (before "
                "clipping) of the rounds that stepped; the response length over the last 5 rounds; the rounds "
                "skipped because no reward carried signal.\n\n" + dynamics_table(layers) + "\n")
    (out / "ladder.md").write_text(header + table + "\n" + dynamics)
    figure = plot_ladder(layers, out / "curves.png")
    return {"table": table, "figure": str(figure)}
