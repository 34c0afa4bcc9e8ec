"""Figures made of metrics records: a run's curves, a study's panels per preset with its differences
against the baseline, and several runs overlaid. matplotlib is imported on first use, with the
file-only Agg backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastrft.report.records import eval_records, plural, round_records
from fastrft.report.tables import MIN_EFFECT, baseline, compare, curve, layer_means, mean_curve


#: Colours of the --reward-funcs components (none of the reward's, the share correct's or the panels').
PART_COLORS = ("tab:olive", "tab:cyan", "tab:pink", "tab:gray", "tab:blue", "tab:orange")

CURVES = (("train_pass1", "train Pass@1", "-", "tab:blue"), ("test_pass1", "test Pass@1 (T=1)", "-", "tab:orange"),
          ("test_greedy", "test greedy", "--", "tab:orange"))


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
        band = [(r["round"], r[f"{key}_lo"], r[f"{key}_hi"]) for r in evals
                if r.get(f"{key}_lo") is not None and r.get(f"{key}_hi") is not None]
        if band:  # the 95% interval over problems (fastrft.report.stats)
            ax_pass.fill_between(*zip(*band), color=color, alpha=0.15 if style == "-" else 0.07, lw=0)
    ax_pass.set_ylim(-0.02, 1.02)
    ax_pass.set_ylabel("accuracy")
    _finish(ax_pass, "Pass@1 at each evaluation (bands: 95% intervals over problems)"
            if any("test_pass1_lo" in r for r in evals) else "Pass@1 at each evaluation")
    rounds = round_records(records)
    stepped = [r for r in rounds if not r.get("skipped")]
    series = [("reward_mean", "reward", "tab:green")]
    if any(r.get("correct_mean") != r.get("reward_mean") for r in rounds):  # {-1,+1} rewards: show both
        series.append(("correct_mean", "share correct", "tab:purple"))
    # --reward-funcs: each function's mean (dashed, its moving mean only) beside their weighted sum.
    parts = sorted({k for r in rounds for k in r if k.startswith("reward_") and k.endswith("_mean")} - {"reward_mean"})
    _round_panel(ax_reward, rounds, series, "reward per round" + (", and each reward function" if parts else ""))
    for i, key in enumerate(parts):
        pts = [(r["round"], float(r[key])) for r in rounds if r.get(key) is not None]
        if pts:
            xs, ys = zip(*pts)
            w = max(1, min(25, len(ys) // 8))
            ax_reward.plot(xs, _moving_mean(list(ys), w), color=PART_COLORS[i % len(PART_COLORS)], lw=1.4, ls="--",
                           label=key.removeprefix("reward_").removesuffix("_mean") + (f", mean of last {w}" if w > 1
                                                                                     else ""))
    if parts:
        ax_reward.legend(loc="best", fontsize=7)
    _loss_panel(ax_loss, stepped)
    kl_key = "kl_mean" if any("kl_mean" in r for r in stepped) else "kl"
    if any(r.get(kl_key) for r in stepped):
        _round_panel(ax_kl, stepped, [(kl_key, "KL", "tab:brown")], "KL to the initial policy per round")
    else:  # kl_coef 0 runs without a reference model, and records 0 or nothing
        ax_kl.text(0.5, 0.5, "KL off: no round recorded a KL", ha="center", va="center", transform=ax_kl.transAxes)
        _finish(ax_kl, "KL to the initial policy per round")
        ax_kl.set_xticks([])
        ax_kl.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _loss_panel(ax: Any, stepped: list[dict[str, Any]]) -> None:
    """The loss per round; when it is one constant (one step per round on fresh samples with a {0, 1}
    reward and no baseline: the loss is minus the mean advantage, -1 in every round that steps), it says
    nothing, so the mean log-prob of the trained tokens, which moves as the policy learns, is drawn
    instead, and the title says why."""
    losses = {round(float(r["loss"]), 9) for r in stepped if r.get("loss") is not None}
    if len(losses) == 1 and any(r.get("logp_mean") is not None for r in stepped):
        _round_panel(ax, stepped, [("logp_mean", "mean log-prob of the trained tokens", "tab:red")],
                     f"loss is {losses.pop():g} in every round that stepped (-mean advantage);\n"
                     "the trained tokens' log-prob instead")
        return
    _round_panel(ax, stepped, [("loss", "loss", "tab:red")], "loss per round (skipped rounds left out)")


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
        w = min(25, len(ys) // 8)
        if w > 1:
            ax.plot(xs, ys, color=color, lw=0.7, alpha=0.4, marker=".", ms=2, label=label)
            ax.plot(xs, _moving_mean(list(ys), w), color=color, lw=2.0, label=f"{label}, mean of last {w}")
        else:  # too few rounds for a moving mean: the values themselves, plainly
            ax.plot(xs, ys, color=color, lw=1.6, marker="o", ms=3, label=label)
    _finish(ax, title)


def _round_axis(ax: Any) -> None:
    """x is the round: integer ticks only (a 2-round study would otherwise get ticks at 0.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _finish(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=10)
    _round_axis(ax)
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="best", fontsize=8)


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
                ref = mean_curve([c for c in (curve(r["records"], key) for r in base["runs"]) if c])
                if ref:
                    ax.plot(*zip(*ref), color=color, lw=1.5, ls=":", alpha=0.8, zorder=1)
            curves = [c for c in (curve(r["records"], key) for r in layer["runs"]) if c]
            for c in curves:
                ax.plot(*zip(*c), color=color, lw=0.8, alpha=0.45)
            mean = mean_curve(curves)
            if mean:
                ax.plot(*zip(*mean), color=color, lw=2.4, marker="o", ms=3)
        ax.set_title(f"{layer['name']} ({plural(len(layer['runs']), 'seed')})", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        _round_axis(ax)
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
    reach = [abs(c["delta"]) + 2 * (c["se"] or 0.0) for c in compares if c] + [abs(x) for x in dots]
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
                       xerr=[2 * (c["se"] or 0.0) if c else 0.0 for c in cs], error_kw={"lw": 1, "capsize": 2},
                       label=label)
        for bar, c in zip(bars, cs):  # an effect within noise, or one seed's difference, is drawn pale
            if c is None or c["verdict"] not in ("helps", "hurts"):
                bar.set_alpha(0.3)
        ref = layer_means(base, key)
        if ref:
            ref_mean = sum(ref) / len(ref)
            for y, layer in zip(ys, layers):
                xs = [m - ref_mean for m in layer_means(layer, key)]
                dots += xs
                ax.plot(xs, [y + off] * len(xs), "o", color=color, mec="k", mew=0.5, ms=4, zorder=3)
    ax.axvspan(-MIN_EFFECT, MIN_EFFECT, color="0.5", alpha=0.12, lw=0, zorder=0)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(*delta_xlim(drawn, dots))
    ax.set_yticks(list(ys), [x["name"] for x in layers], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"run-mean Pass@1 minus {base['name']}'s\nbars: seed mean ± 2 SE; dots: seeds\n"
                  f"grey: |Δ| < {MIN_EFFECT}, never an effect", fontsize=8)
    ax.set_title("vs baseline: right helps, left hurts, pale = within noise", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="best", fontsize=7)


def plot_overlay(runs: list[tuple[str, list[dict[str, Any]]]], png: str | Path) -> Path:
    """Several runs on shared axes: train Pass@1 (left) and test Pass@1 (right), one colour and marker per
    run, each panel with its legend. Runs whose points coincide (several at 0, say) would hide one
    another: they are drawn once, named together in the legend."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(11, 4.4), dpi=110, sharey=True)
    markers = "osD^vP*Xh<>"
    for ax, key, title in zip(axes, ("train_pass1", "test_pass1"), ("train Pass@1", "test Pass@1 (T=1)")):
        groups: dict[tuple, list[int]] = {}
        for i, (_, records) in enumerate(runs):
            c = curve(records, key)
            if c:
                groups.setdefault(tuple(c), []).append(i)
        for points, same in groups.items():
            first = same[0]
            label = runs[first][0] if len(same) == 1 else " = ".join(runs[j][0] for j in same) + " (same points)"
            ax.plot(*zip(*points), color=f"C{first % 10}", marker=markers[first % len(markers)], ms=4, label=label)
        ax.set_title(title)
        _round_axis(ax)
        ax.set_ylim(-0.04, 1.04)
        ax.grid(alpha=0.3)
        if groups:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save(fig, png)
