"""``fastrft ladder``: every (layer, seed) pair of a bottom-up study, one after another or N at once, resumable.

Layout of a study directory::

    DIR/ladder.json                 the study's settings (layers, seeds, profile, overrides)
    DIR/<preset>/seed-<s>/          one ordinary run directory per pair (config.json, metrics.jsonl, ...)
    DIR/difficulty.json             pass-rate estimates shared by the pairs that select by difficulty
    DIR/base-eval.json              round-0 evaluations shared by the pairs with the same base model, seed
                                    and evaluation settings (L0-L3 of a seed evaluate once)
    DIR/*.json.lock                 the caches' lock files (writers from several processes take turns)
    DIR/ladder.md, DIR/curves.png   the comparison table and figure, rewritten after every finished pair
    DIR/<preset>/seed-<s>/job.log   with --jobs N > 1: the pair's output (its process writes no progress bar)

A pair whose run directory holds a complete summary is skipped on a rerun; an unfinished one resumes from
its last checkpoint (fastrft.checkpoint), so an interrupted study continues where it stopped.

``--jobs N`` (default 1: one pair after another, in this process) runs up to N pairs at once, each in its
own process (fastrft.ladder_jobs), and gives the results of the sequential ladder (bit for bit at equal
torch thread counts, see there): every run computes from its own config and seed alone, and the two
shared caches are written under a lock, re-read and added to, so concurrent writers lose no entry. The one thing order decides is who measures a shared
base-model evaluation. Sequentially the first pair in plan order measures it and the later ones record
``"shared_from": <its run name>``. In parallel, the pairs are grouped by the config fields that
evaluation depends on (model; rollout but group_size; eval but eval_every; data; seed); a pair that is
not the first of its group (its leader) starts only once base-eval.json holds an entry measured by the
leader's run, or the leader's process has ended, or the leader was complete before the study started.
The grouping is a prediction of fastrft.loop.evaluator.Evaluator.base_key from the config; where it is
wrong, a run measures the evaluation itself, as a run outside the group would, and its numbers stay
correct.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastrft.progress import bar as progress_bar

from fastrft import ladder_decide, lock, presets, rundir
from fastrft.config import GROUPS, TrainConfig, build_group
from fastrft.errors import ConfigError
from fastrft.report import MIN_EFFECT, baseline, dynamics_table, ladder_table, plot_ladder, plural, read_metrics


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
    if "name" in flags.get("run", {}):
        raise ConfigError("name (--name) is not accepted by the ladder: each run is named <preset>/seed-<s>; "
                          "name the study with --out")
    prof = presets.profile(profile_name)
    first = flags.get("run", {}).get("seed", base.get("run", {}).get("seed", 0))  # --seed: the study's first
    pairs = []
    for p in chosen:
        for s in range(first, first + seeds):
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


def run_ladder(pairs: list[Pair], out: Path, settings: dict[str, Any], *, force: bool = False,
               keep_checkpoints: bool = False, jobs: int = 1) -> dict[str, Any]:
    """Run every pair not yet complete, up to ``jobs`` at once (1: in this process, one after another);
    write ladder.md and curves.png; return {"table", "figure"}."""
    from fastrft import ladder_jobs

    ladder_jobs.check_jobs(jobs)
    # The study directory is locked for the ladder's life (a second ladder on it would run its pairs twice);
    # each run directory in it is locked by its own run (fastrft.lock).
    with lock.hold(out, lock.command_line()):
        return _run_ladder(pairs, out, settings, force, keep_checkpoints, jobs)


def _run_ladder(pairs: list[Pair], out: Path, settings: dict[str, Any], force: bool, keep_checkpoints: bool,
                jobs: int) -> dict[str, Any]:
    from fastrft import ladder_jobs
    from fastrft.checkpoint import CKPT_DIR

    meta = out / "ladder.json"
    if meta.exists() and not force:
        old = json.loads(meta.read_text())
        if old != json.loads(json.dumps(settings)):
            changed = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                                if old.get(k) != json.loads(json.dumps(settings)).get(k))
            raise ConfigError(f"{out} holds a ladder with other settings ({changed}); use a new --out, or --force "
                              "to continue it with these settings")
    meta.write_text(json.dumps(settings, indent=2))
    todo = [p for p in pairs if not rundir.is_complete(p.out)]
    print(f"fastrft ladder: {plural(len(pairs), 'run')} ({len(pairs) - len(todo)} already complete) in {out}",
          file=sys.stderr)
    overall = progress_bar(total=len(pairs), initial=len(pairs) - len(todo), desc="ladder", unit="run", position=0)

    def finished(pair: Pair, t0: float) -> None:
        overall.update(1)
        overall.write(f"[ladder] {pair.preset.name} seed {pair.seed} done in {time.monotonic() - t0:.0f} s",
                      file=sys.stderr)
        if not keep_checkpoints:  # a finished run needs no resume point; checkpoints are GBs each
            import shutil

            shutil.rmtree(pair.out / CKPT_DIR, ignore_errors=True)
        report(pairs, out)

    try:
        if jobs > 1:
            ladder_jobs.run_parallel(pairs, todo, out, jobs, force=force, overall=overall, finished=finished)
        else:
            from fastrft.trainer import Trainer

            for pair in todo:
                overall.set_postfix_str(f"{pair.preset.name} seed {pair.seed}")
                t0 = time.monotonic()
                Trainer(pair.config, force=force, base_eval_cache=out / "base-eval.json").run()
                _release_memory()
                finished(pair, t0)
    finally:
        overall.close()
    return report(pairs, out)


def _release_memory() -> None:
    """Free what a finished in-process run held before the next one starts: its KV cache and weights
    would otherwise stay in CUDA's caching allocator, and the next run would size its KV cache and its
    token budget from the memory left over (half as much, measured on an H200)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def collect(pairs: list[Pair]) -> list[dict[str, Any]]:
    """Per preset: its choice, worded with the values its runs used, and, per finished seed, the metrics
    records and the summary."""
    layers: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        choice = pair.preset.choice_text(pair.config.to_dict())
        entry = layers.setdefault(pair.preset.name, {"name": pair.preset.name, "layer": pair.preset.layer,
                                                     "choice": choice, "runs": []})
        if rundir.is_complete(pair.out):
            entry["runs"].append({"seed": pair.seed, "records": read_metrics(pair.out / "metrics.jsonl"),
                                  "summary": json.loads((pair.out / "summary.json").read_text())})
    return list(layers.values())


#: The settings ladder.md's header states, each worded from a resolved config: the values the runs used.
SETTINGS = (
    lambda c: plural(c.run.rounds, "round"),
    lambda c: ("evaluation at the start and the end" if not c.eval.eval_every or c.eval.eval_every >= c.run.rounds
               else "evaluation every round" if c.eval.eval_every == 1 else
               f"evaluation every {c.eval.eval_every} rounds and at the end"),
    lambda c: f"lr {c.optim.lr:g}" + ("" if c.optim.schedule == "constant" else f" ({c.optim.schedule})"),
    lambda c: f"responses ≤ {c.rollout.max_new_tokens} tokens",
    lambda c: f"G = {c.rollout.group_size}",
    lambda c: f"T = {c.rollout.temperature:g}",
    lambda c: f"KL {c.algo.kl_coef:g} ({c.algo.kl_estimator})" if c.algo.kl_coef else "no KL",
    lambda c: f"train Pass@1 from {plural(c.eval.train_samples, 'sample')}",
    lambda c: (f"test Pass@1 on {plural(c.eval.test_size, 'problem')}" if c.eval.test_size else
               "test Pass@1 on the whole test split"),
)


def settings_text(pairs: list[Pair]) -> str:
    """The settings every run used, in words; one that differs between presets is given per preset."""
    configs: dict[str, TrainConfig] = {}
    for pair in pairs:  # the seeds of a preset differ only in the seed
        configs.setdefault(pair.preset.name, pair.config)
    common, per_preset = [], []
    for words in SETTINGS:
        groups: dict[str, list[str]] = {}
        for name, cfg in configs.items():
            groups.setdefault(words(cfg), []).append(name)
        if len(groups) == 1:
            common.append(next(iter(groups)))
        else:
            per_preset.append("; ".join(f"{text} ({', '.join(names)})" for text, names in groups.items()))
    return "Every run: " + ", ".join(common) + "." + "".join(f" By preset: {x}." for x in per_preset)


def flags_text(pairs: list[Pair], settings: dict[str, Any]) -> str:
    """The profile and the flags given on the command line (ladder.json's "flags"), each flag with the
    value it replaced and where that came from: a flag wins over the profile and the presets."""
    profile = settings.get("profile")
    if profile is None:
        return ""
    prof = presets.PROFILES[profile][1] if profile in presets.PROFILES else {}
    base = settings.get("base") or TrainConfig().to_dict()
    chosen = list(dict.fromkeys(p.preset for p in pairs))
    given = [_flag(field, value) + (_seeds(value, settings.get("seeds", 1)) if (section, field) == ("run", "seed")
                                    else _replaced(chosen, base, (profile, prof), section, field, value))
             for section, fields in (settings.get("flags") or {}).items() for field, value in fields.items()
             if (section, field) != ("run", "progress")]  # a display switch, not a setting of the study
    if not given:
        return f"Profile `{profile}`; no setting given on the command line."
    return f"Profile `{profile}`; given on the command line, over the profile and the presets: {', '.join(given)}."


def _seeds(first: int, n: int) -> str:
    return f" (the first seed: runs seed-{first}" + (f" to seed-{first + n - 1})" if n > 1 else ")")


def _replaced(chosen: list[presets.Preset], base: dict[str, dict[str, Any]], profile: tuple[str, dict], section: str,
              field: str, value: Any) -> str:
    """' (instead of 60 from profile cpu-mini)': what a flag replaced, per preset where presets differ."""
    name, prof = profile
    was: dict[str, list[str]] = {}
    for p in chosen:
        old = presets.overlay(base, presets.L0_FIELDS, prof, p.overrides)[section].get(field)
        if _value(old) == _value(value):
            continue
        source = (p.name if field in p.overrides.get(section, {}) else f"profile {name}"
                  if field in prof.get(section, {}) else "L0" if field in presets.L0_FIELDS.get(section, {})
                  else "the base config")
        was.setdefault(f"{_value(old)} from {source}", []).append(p.name)
    parts = [w if len(ps) == len(chosen) else f"{w} for {', '.join(ps)}" for w, ps in was.items()]
    return f" (instead of {'; '.join(parts)})" if parts else ""


def _value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)  # as the flags spell it


def _flag(field: str, value: Any) -> str:
    name = field.replace("_", "-")
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    return f"--{name} {_value(value)}"


def report(pairs: list[Pair], out: Path) -> dict[str, Any]:
    """Write ladder.md (a header stating the settings the runs used, the comparison and the dynamics
    tables) and curves.png from the finished pairs; return {"table", "figure"}."""
    layers = collect(pairs)
    table = ladder_table(layers)
    base = baseline(layers)["name"] if layers else "L0-minimal"
    cfg = pairs[0].config
    try:
        settings = json.loads((out / "ladder.json").read_text())
    except (OSError, json.JSONDecodeError):
        settings = {}
    finished = sum(len(x["runs"]) for x in layers)
    runs = plural(len(pairs), "run") + ("" if finished == len(pairs) else f" ({finished} finished)")
    study = (f"{runs}: {plural(len(layers), 'preset')} x {plural(len({p.seed for p in pairs}), 'seed')}. "
             f"{settings_text(pairs)}")
    flags = flags_text(pairs, settings)  # empty for a study without ladder.json
    header = (f"# Ladder: {cfg.model.model} on {cfg.data.dataset}\n\n{study}\n\n"
              + (f"{flags}\n\n" if flags else "")
              + f"The 'choice' column words each preset's design choice with the values its runs used. Pass@1 "
              f"columns are mean ± std over seeds; 'best test' is the maximum of the seed-mean test "
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
    verdicts = ladder_decide.section(pairs, settings)
    (out / "ladder.md").write_text(header + table + "\n" + (f"\n{verdicts}" if verdicts else "") + dynamics)
    figure = plot_ladder(layers, out / "curves.png")
    return {"table": table, "figure": str(figure)}
