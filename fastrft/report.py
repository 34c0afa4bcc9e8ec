"""Metrics on disk and what is made of them: the append-only metrics.jsonl, plots, the before/after table.

metrics.jsonl holds one JSON object per line with ``kind`` = "round" (one per training round) or
"eval" (one per evaluation). It is flushed and fsynced after every record, so an interrupted run leaves
every completed round readable; a torn last line (a crash mid-write) is skipped by the reader.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks; the caches are then safe for one writer at a time
    fcntl = None


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=False, default=_jsonable) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (a temporary sibling, then a rename): a reader, or a
    crash, never sees half a file. For the small caches a study shares between its runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for ``path`` (an advisory ``flock`` on the sibling ``<name>.lock``).

    The study caches are read-modify-write: two runs that read, add their entry and :func:`write_json`
    at the same time would each drop the other's entry. Writers that read and write inside this block
    never lose an entry; readers need no lock (a rename is atomic). The lock is on a sibling file
    because the cache itself is replaced by every write, and a lock on a replaced file locks nothing."""
    lock = Path(path).with_name(Path(path).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a", encoding="utf-8") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file is closed
        yield


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics.jsonl; a malformed line other than the last raises ValueError."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # torn final write of an interrupted run
            raise ValueError(f"{path} line {i + 1}: not valid JSON ({e})") from None
    return records


def eval_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "eval"]


def _round_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "round"]


CURVES = (("train_pass1", "train Pass@1", "-", "tab:blue"), ("test_pass1", "test Pass@1 (T=1)", "-", "tab:orange"),
          ("test_greedy", "test greedy", "--", "tab:orange"))


def plural(n: int, word: str) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, png: str | Path) -> Path:
    png = Path(png)
    fig.savefig(png)
    _pyplot().close(fig)
    return png


def plot_curves(records: list[dict[str, Any]], png: str | Path, title: str = "") -> Path:
    """A run's curves as a PNG: see :func:`curves_figure`."""
    return _save(curves_figure(records, title), png)


def curves_figure(records: list[dict[str, Any]], title: str = "") -> Any:
    """A 2x2 matplotlib Figure of one run's metrics.jsonl records: train/test Pass@1 (and greedy) at each
    evaluation; then, per round, the reward (and the share correct, where the reward is not it), the loss
    and the KL to the initial policy, each with a moving mean. Skipped rounds took no step: they have no
    loss or KL and are left out of those panels."""
    fig, axes = _pyplot().subplots(2, 2, figsize=(10.5, 7.0), dpi=110)
    (ax_pass, ax_reward), (ax_loss, ax_kl) = axes
    evals = eval_records(records)
    for key, label, style, color in CURVES:
        pts = [(r["round"], r[key]) for r in evals if r.get(key) is not None]
        if pts:
            ax_pass.plot(*zip(*pts), style, marker="o", color=color, label=label)
    ax_pass.set_ylim(-0.02, 1.02)
    ax_pass.set_ylabel("accuracy")
    _finish(ax_pass, "Pass@1 at each evaluation")
    rounds = _round_records(records)
    stepped = [r for r in rounds if not r.get("skipped")]
    series = [("reward_mean", "reward", "tab:green")]
    if any(r.get("correct_mean") != r.get("reward_mean") for r in rounds):  # {-1,+1} rewards: show both
        series.append(("correct_mean", "share correct", "tab:purple"))
    _round_panel(ax_reward, rounds, series, "reward per round")
    _round_panel(ax_loss, stepped, [("loss", "loss", "tab:red")], "loss per round (skipped rounds left out)")
    kl_key = "kl_mean" if any("kl_mean" in r for r in stepped) else "kl"
    if any(r.get(kl_key) for r in stepped):
        _round_panel(ax_kl, stepped, [(kl_key, "KL", "tab:brown")], "KL to the initial policy per round")
    else:  # kl_coef 0 runs without a reference model, and records 0 or nothing
        ax_kl.text(0.5, 0.5, "KL off: no round recorded a KL", ha="center", va="center", transform=ax_kl.transAxes)
        _finish(ax_kl, "KL to the initial policy per round")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _moving_mean(ys: list[float], w: int) -> list[float]:
    """Trailing mean over the last ``w`` values (fewer at the start)."""
    return [sum(ys[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(ys))]


def _round_panel(ax: Any, rounds: list[dict[str, Any]], series: list[tuple[str, str, str]], title: str) -> None:
    """Each (key, label, colour) of ``rounds`` as a thin line, with its moving mean bold over it: one
    round's value of a G = 1 run is 0 or 1, so only the mean shows a trend."""
    for key, label, color in series:
        pts = [(r["round"], float(r[key])) for r in rounds if r.get(key) is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, color=color, lw=0.7, alpha=0.4, marker=".", ms=2, label=label)
        w = min(25, len(ys) // 8)
        if w > 1:
            ax.plot(xs, _moving_mean(list(ys), w), color=color, lw=2.0, label=f"{label}, mean of last {w}")
    _finish(ax, title)


def _finish(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="best", fontsize=8)


def before_after_table(records: list[dict[str, Any]], keys: tuple[str, ...] | None = None) -> str:
    """A Markdown table of every evaluation (round by round) for the metrics present."""
    evals = eval_records(records)
    if not evals:
        return "(no evaluations recorded)"
    if keys is None:
        preferred = ["train_pass1", "test_pass1", "test_greedy", "train_pass1_gsm8k", "test_pass1_gsm8k",
                     "train_response_len"]
        keys = tuple(k for k in preferred if any(k in r for r in evals))
    header = "| round | " + " | ".join(keys) + " |"
    rule = "|---:|" + "---:|" * len(keys)
    rows = [f"| {r['round']} | " + " | ".join(_fmt(k, r.get(k)) for k in keys) + " |" for r in evals]
    return "\n".join([header, rule, *rows])


def _fmt(key: str, x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.1f}" if key.endswith("_len") else f"{x:.3f}"
    return str(x)


# ------------------------------------------------------------------------------------------ ladder
def _curve(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["round"], float(r[key])) for r in eval_records(records) if r.get(key) is not None]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return m, sd


def _pm(xs: list[float]) -> str:
    if not xs:
        return "–"
    m, sd = _mean_std(xs)
    return f"{m:.2f} ± {sd:.2f}"


def _mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Pointwise mean over the rounds every curve has."""
    common = set.intersection(*(set(dict(c)) for c in curves)) if curves else set()
    return [(r, sum(dict(c)[r] for c in curves) / len(curves)) for r in sorted(common)]


def _run_mean(curve: list[tuple[int, float]]) -> float | None:
    """A run's Pass@1 averaged over its evaluations after round 0: how high it got, how fast, and how
    well it stayed there, in one number (the area under the curve, per round evaluated)."""
    after = [v for rd, v in curve if rd > 0]
    return sum(after) / len(after) if after else None


def _layer_means(layer: dict[str, Any], key: str) -> list[float]:
    return [m for m in (_run_mean(_curve(r["records"], key)) for r in layer["runs"]) if m is not None]


#: The smallest difference of run-mean Pass@1 called an effect, whatever the seeds say: on the CPU study's
#: 80 test problems one evaluation's sampling noise alone is about ±0.05.
MIN_EFFECT = 0.05


def compare(layer: dict[str, Any], base: dict[str, Any], key: str) -> dict[str, Any] | None:
    """``layer`` against ``base`` on the run-mean of ``key``: the difference of the seed means, its standard
    error (Welch: both layers' seed spreads), and a verdict. "helps"/"hurts" need |Δ| >= 2 SE and
    >= MIN_EFFECT; anything smaller is "within noise". None when either layer has no finished run."""
    a, b = _layer_means(layer, key), _layer_means(base, key)
    if not a or not b:
        return None
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    delta = ma - mb
    se = (sa ** 2 / len(a) + sb ** 2 / len(b)) ** 0.5
    if abs(delta) >= max(2 * se, MIN_EFFECT):
        verdict = "helps" if delta > 0 else "hurts"
    else:
        verdict = "within noise"
    return {"delta": delta, "se": se, "verdict": verdict}


def baseline(layers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The layer the others are compared with: L0-minimal when the study has it, else its first preset."""
    return next((x for x in layers if x["name"] == "L0-minimal"), layers[0] if layers else None)


def _vs(layer: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
    if base is None or layer is base:
        return "(baseline)" if layer is base else "–"
    c = compare(layer, base, key)
    return "–" if c is None else f"{c['delta']:+.2f} ± {c['se']:.2f} {c['verdict']}"


def ladder_row(layer: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, str]:
    runs = layer["runs"]
    train = [_curve(r["records"], "train_pass1") for r in runs]
    test = [_curve(r["records"], "test_pass1") for r in runs]
    row = {"preset": layer["name"], "choice": layer["choice"], "seeds": str(len(runs))}
    row["train before"] = _pm([c[0][1] for c in train if c])
    row["train after"] = _pm([c[-1][1] for c in train if c])
    row["test before"] = _pm([c[0][1] for c in test if c])
    row["test after"] = _pm([c[-1][1] for c in test if c])
    mean_test = _mean_curve([c for c in test if c])
    if mean_test:
        best_round, best = max(mean_test, key=lambda p: (p[1], -p[0]))
        row["best test (round)"] = f"{best:.2f} ({best_round})"
    else:
        row["best test (round)"] = "–"
    reached = [next((rd for rd, v in c if v >= 0.9), None) for c in train if c]
    hits = [x for x in reached if x is not None]
    row["to 0.9"] = (f"{sum(hits) / len(hits):.0f} ({len(hits)}/{len(reached)})" if hits
                     else f"never (0/{len(reached)})" if reached else "–")
    walls = [float(r["summary"].get("wall_s", 0.0)) for r in runs]
    row["wall / run"] = f"{sum(walls) / len(walls) / 60:.1f} min" if walls else "–"
    row["train vs L0"] = _vs(layer, base, "train_pass1")
    row["test vs L0"] = _vs(layer, base, "test_pass1")
    return row


LADDER_COLUMNS = ("preset", "choice", "seeds", "train before", "train after", "test before", "test after",
                  "best test (round)", "to 0.9", "train vs L0", "test vs L0", "wall / run")


def ladder_table(layers: list[dict[str, Any]]) -> str:
    """The comparison table: one row per preset, Pass@1 as mean ± std over its finished seeds, and each
    preset's run-mean Pass@1 against the baseline's (see :func:`compare`)."""
    base = baseline(layers)
    rows = [ladder_row(layer, base) for layer in layers]
    tag = base["layer"] if base is not None else "L0"
    names = [c.replace("vs L0", f"vs {tag}") for c in LADDER_COLUMNS]
    out = ["| " + " | ".join(names) + " |", "|---|---|" + "---:|" * (len(LADDER_COLUMNS) - 2)]
    out += ["| " + " | ".join(r[c] for c in LADDER_COLUMNS) + " |" for r in rows]
    return "\n".join(out)


def dynamics_row(layer: dict[str, Any]) -> dict[str, str]:
    """How a preset's rounds went, from the per-round records: the share of correct rollouts, the round
    after which every rollout was correct, how often correctness flipped, the size of the updates, the
    response length at the end and the rounds skipped for want of signal (mean ± std over seeds)."""
    per_seed: dict[str, list[float]] = {k: [] for k in ("correct", "settled", "flips", "gn_med", "gn_max", "len",
                                                        "skipped")}
    for run in layer["runs"]:
        rounds = _round_records(run["records"])
        if not rounds:
            continue
        correct = [float(r.get("correct_mean", 0.0)) for r in rounds]
        per_seed["correct"].append(sum(correct) / len(correct))
        last_fail = max((r["round"] for r, c in zip(rounds, correct) if c < 1.0), default=0)
        per_seed["settled"].append(float(last_fail))
        per_seed["flips"].append(float(sum((a >= 1.0) != (b >= 1.0) for a, b in zip(correct, correct[1:]))))
        norms = sorted(float(r["grad_norm"]) for r in rounds if not r.get("skipped") and r.get("grad_norm"))
        if norms:
            per_seed["gn_med"].append(norms[len(norms) // 2])
            per_seed["gn_max"].append(norms[-1])
        tail = rounds[-5:]
        per_seed["len"].append(sum(float(r.get("response_len_mean", 0.0)) for r in tail) / len(tail))
        per_seed["skipped"].append(float(rounds[-1].get("skipped_total", 0)))

    def pm(key: str, fmt: str) -> str:
        xs = per_seed[key]
        if not xs:
            return "–"
        m, sd = _mean_std(xs)
        return f"{m:{fmt}} ± {sd:{fmt}}"

    return {"preset": layer["name"], "correct rollouts": pm("correct", ".2f"), "last failed round": pm("settled", ".0f"),
            "flips": pm("flips", ".1f"), "grad norm median": pm("gn_med", ".2g"), "grad norm max": pm("gn_max", ".0f"),
            "final length": pm("len", ".0f"), "skipped rounds": pm("skipped", ".0f")}


DYNAMICS_COLUMNS = ("preset", "correct rollouts", "last failed round", "flips", "grad norm median", "grad norm max",
                    "final length", "skipped rounds")


def dynamics_table(layers: list[dict[str, Any]]) -> str:
    """The rounds behind the curves, one row per preset (see :func:`dynamics_row`)."""
    rows = [dynamics_row(layer) for layer in layers]
    out = ["| " + " | ".join(DYNAMICS_COLUMNS) + " |", "|---|" + "---:|" * (len(DYNAMICS_COLUMNS) - 1)]
    out += ["| " + " | ".join(r[c] for c in DYNAMICS_COLUMNS) + " |" for r in rows]
    return "\n".join(out)


def plot_ladder(layers: list[dict[str, Any]], png: str | Path) -> Path:
    """The study's figure as a PNG: see :func:`ladder_figure`."""
    return _save(ladder_figure(layers), png)


def ladder_figure(layers: list[dict[str, Any]]) -> Any:
    """One panel per preset: train (blue) and test (orange) Pass@1 against the round, each seed a thin
    line, the seed mean bold, the baseline's means dotted behind. A last panel answers "which choice
    helps, which hurts": each preset's run-mean Pass@1 minus the baseline's (bars, ± 2 SE), one dot per
    seed. Returns the matplotlib Figure."""
    from matplotlib.lines import Line2D

    base = baseline(layers)
    others = [x for x in layers if x is not base]
    n = max(1, len(layers)) + (1 if others else 0)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = _pyplot().subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows + 0.6), dpi=110, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, layer in zip(axes.flat, layers):
        for key, color in (("train_pass1", "tab:blue"), ("test_pass1", "tab:orange")):
            if base is not None and layer is not base:
                ref = _mean_curve([c for c in (_curve(r["records"], key) for r in base["runs"]) if c])
                if ref:
                    ax.plot(*zip(*ref), color=color, lw=1.5, ls=":", alpha=0.8, zorder=1)
            curves = [c for c in (_curve(r["records"], key) for r in layer["runs"]) if c]
            for c in curves:
                ax.plot(*zip(*c), color=color, lw=0.8, alpha=0.45)
            mean = _mean_curve(curves)
            if mean:
                ax.plot(*zip(*mean), color=color, lw=2.4, marker="o", ms=3)
        ax.set_title(f"{layer['name']} ({plural(len(layer['runs']), 'seed')})", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_xlabel("round")
        ax.set_ylabel("Pass@1")
    if others:
        _plot_deltas(axes.flat[len(layers)], others, base)
    handles = [Line2D([], [], color="tab:blue", lw=2.4, marker="o", ms=3, label="train Pass@1 (seed mean)"),
               Line2D([], [], color="tab:orange", lw=2.4, marker="o", ms=3, label="test Pass@1 (seed mean)"),
               Line2D([], [], color="0.4", lw=0.8, alpha=0.6, label="one seed")]
    if others:
        handles.append(Line2D([], [], color="0.4", lw=1.5, ls=":", label=f"{base['name']} mean, for comparison"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.3 * rows + 0.6)))
    return fig


def delta_xlim(compares: list[dict[str, Any] | None], dots: list[float]) -> tuple[float, float]:
    """The difference panel's x range: symmetric, at least ±0.25 (a quarter of the Pass@1 scale) so that
    a difference within noise looks small, and wide enough for every bar with its 2 SE whisker and every
    seed's dot. Autoscaling would stretch a +0.04 across the whole panel."""
    reach = [abs(c["delta"]) + 2 * c["se"] for c in compares if c] + [abs(x) for x in dots]
    half = max([0.25] + [1.08 * x for x in reach])  # a margin, so an extreme dot is not cut in half
    return -half, half


def _plot_deltas(ax: Any, layers: list[dict[str, Any]], base: dict[str, Any]) -> None:
    """Horizontal bars: run-mean train and test Pass@1 of each preset minus the baseline's, ± 2 SE; a dot
    for each seed's run mean minus the baseline's seed mean; the band |Δ| < MIN_EFFECT shaded."""
    ys = range(len(layers))
    drawn: list[dict[str, Any] | None] = []
    dots: list[float] = []
    for off, key, color, label in ((-0.18, "train_pass1", "tab:blue", "train"), (0.18, "test_pass1", "tab:orange",
                                                                                "test")):
        cs = [compare(layer, base, key) for layer in layers]
        drawn += cs
        bars = ax.barh([y + off for y in ys], [c["delta"] if c else 0.0 for c in cs], height=0.34, color=color,
                       xerr=[2 * c["se"] if c else 0.0 for c in cs], error_kw={"lw": 1, "capsize": 2}, label=label)
        for bar, c in zip(bars, cs):  # an effect within noise is drawn pale
            if c is None or c["verdict"] == "within noise":
                bar.set_alpha(0.3)
        ref = _layer_means(base, key)
        if ref:
            ref_mean = sum(ref) / len(ref)
            for y, layer in zip(ys, layers):
                xs = [m - ref_mean for m in _layer_means(layer, key)]
                dots += xs
                ax.plot(xs, [y + off] * len(xs), "o", color=color, mec="k", mew=0.5, ms=4, zorder=3)
    ax.axvspan(-MIN_EFFECT, MIN_EFFECT, color="0.5", alpha=0.12, lw=0, zorder=0)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(*delta_xlim(drawn, dots))
    ax.set_yticks(list(ys), [x["name"] for x in layers], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"run-mean Pass@1 minus {base['name']}'s\n(bars: seed mean ± 2 SE; dots: seeds; "
                  f"grey: |Δ| < {MIN_EFFECT}, never an effect)", fontsize=8)
    ax.set_title("vs baseline: right helps, left hurts, pale = within noise", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="best", fontsize=7)


def plot_overlay(runs: list[tuple[str, list[dict[str, Any]]]], png: str | Path) -> Path:
    """Several runs on shared axes: train Pass@1 (left) and test Pass@1 (right), one colour per run."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.0), dpi=110, sharey=True)
    for i, (name, records) in enumerate(runs):
        color = f"C{i % 10}"
        for ax, key in zip(axes, ("train_pass1", "test_pass1")):
            c = _curve(records, key)
            if c:
                ax.plot(*zip(*c), color=color, marker="o", ms=3, label=name)
    for ax, title in zip(axes, ("train Pass@1", "test Pass@1 (T=1)")):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, png)
