"""The ladder's verdicts: each layer against the layer it builds on, with a 95% interval over seeds and
problems, and ``--until-decided``, which adds seeds only where a comparison is still open.

The statistics are fastrft.report.decide's (the interval, the verdicts, the looks and their levels); this
module reads the finished runs' final evaluations (problems.jsonl), pairs them by seed, and drives the study:
after the planned seeds, every comparison still undecided gets the next ``--jobs`` seeds for both of its
layers, until all are decided or ``--max-seeds`` is reached. The verdicts are a function of the finished
runs alone, so an interrupted study, rerun with the same command, replays them and goes on. docs/deciding.md
says why the procedure keeps its error rate under this optional stopping.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from fastrft import rundir
from fastrft.errors import ConfigError
from fastrft.report.decide import ALPHA, Effect, decide

DEFAULT_MARGIN = 0.05


def check(seeds: int, until_decided: bool, max_seeds: int | None, margin: float) -> None:
    """Refuse impossible settings in one line."""
    if max_seeds is not None and not until_decided:
        raise ConfigError("max_seeds (--max-seeds) only applies with --until-decided")
    if until_decided and max_seeds is None:
        raise ConfigError("--until-decided needs --max-seeds N: the most seeds a comparison may get")
    if max_seeds is not None and max_seeds < seeds:
        raise ConfigError(f"max_seeds (--max-seeds) {max_seeds} is below the {seeds} planned seeds (--seeds); "
                          "raise it, or plan fewer seeds")
    if not 0 < margin < 1:
        raise ConfigError(f"margin (--margin) must be in (0, 1), got {margin}")


def problem_scores(run_dir: Path) -> dict[str, float] | None:
    """The final evaluation's test score of each problem (the mean of its samples), or None."""
    path = Path(run_dir) / "problems.jsonl"
    if not rundir.is_complete(run_dir) or not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    test = [r for r in records if r.get("split") == "test"]
    if not test:
        return None
    last = max(r["round"] for r in test)
    return {r["id"]: sum(r["scores"]) / len(r["scores"]) for r in test if r["round"] == last and r["scores"]}


def decisions(pairs: list, settings: dict[str, Any]) -> list[tuple[str, str, Effect, bool]]:
    """(layer, the layer it builds on, the effect at the deciding or last look, more seeds wanted) for each
    consecutive pair of the study's layers."""
    names = list(dict.fromkeys(p.preset.name for p in pairs))
    seeds = sorted({p.seed for p in pairs})
    scores: dict[str, dict[int, dict[str, float]]] = {n: {} for n in names}
    for p in pairs:
        got = problem_scores(p.out)
        if got is not None:
            scores[p.preset.name][p.seed] = got
    planned = int(settings.get("seeds", len(seeds)))
    until = bool(settings.get("until_decided"))
    max_seeds = int(settings["max_seeds"]) if until else planned
    step = int(settings.get("jobs", 1)) if until else 1
    margin = float(settings.get("margin", DEFAULT_MARGIN))
    out = []
    for base, layer in zip(names, names[1:]):
        eff, more = decide(scores[base], scores[layer], seeds, planned=planned, step=step, max_seeds=max_seeds,
                           margin=margin)
        out.append((layer, base, eff, more))
    return out


def section(pairs: list, settings: dict[str, Any]) -> str:
    """ladder.md's "Verdicts" section: the text and the table."""
    rows = decisions(pairs, settings)
    if not rows:
        return ""
    until = bool(settings.get("until_decided"))
    margin = float(settings.get("margin", DEFAULT_MARGIN))
    how = (f"sequentially (`--until-decided`: looks at {settings.get('seeds')} seeds and every "
           f"{settings.get('jobs', 1)} more, up to {settings.get('max_seeds')}; each look at level 0.05 / the "
           "number of looks)" if until else "at the planned seeds, level 0.05")
    lines = ["## Verdicts", "",
             "Each layer against the layer it builds on: the difference of the final evaluation's test Pass@1, "
             "paired by seed and by problem, with a 95% interval over seeds and problems (Student's t over the "
             f"seeds, the seed and problem variances added; docs/deciding.md), decided {how}. 'helps' or 'hurts' "
             f"when the interval excludes 0, 'no difference' when it lies within ±{margin:g}, else undecided.", "",
             "| layer | against | Δ test Pass@1 | interval | seeds | problems | verdict |",
             "|---|---|---:|---|---:|---:|---|"]
    for layer, base, eff, _ in rows:
        interval = f"[{eff.lo:+.3f}, {eff.hi:+.3f}]" if eff.seeds >= 2 else "–"
        diff = f"{eff.diff:+.3f}" if eff.seeds else "–"
        lines.append(f"| {layer} | {base} | {diff} | {interval} | {eff.seeds} | {eff.problems} | {eff.text()} |")
    return "\n".join(lines) + "\n"


def run_until_decided(all_pairs: list, out: Path, settings: dict[str, Any], run: Callable[..., dict],
                      **run_kw) -> dict[str, Any]:
    """Run the planned seeds, then add seeds ``settings["jobs"]`` at a time to the layers of every undecided
    comparison until none is left or ``settings["max_seeds"]`` is reached. ``all_pairs``: every pair up to
    the maximum; ``run``: fastrft.ladder.run_ladder (called with the pairs due so far)."""
    first = min(p.seed for p in all_pairs)
    planned, step, top = int(settings["seeds"]), max(1, int(settings.get("jobs", 1))), int(settings["max_seeds"])
    counts = {p.preset.name: planned for p in all_pairs}
    while True:
        due = [p for p in all_pairs if p.seed - first < counts[p.preset.name]]
        result = run(due, out, settings, **run_kw)
        grew = False
        for layer, base, eff, more in decisions(due, settings):
            if more:
                target = min(eff.seeds + step, top)
                for name in (layer, base):
                    if counts[name] < target:
                        counts[name], grew = target, True
        if not grew:
            break
        print(f"fastrft ladder: undecided; seeds per layer now {', '.join(f'{k} {v}' for k, v in counts.items())}",
              file=sys.stderr)
    return result


__all__ = ["ALPHA", "DEFAULT_MARGIN", "check", "decisions", "problem_scores", "run_until_decided", "section"]
