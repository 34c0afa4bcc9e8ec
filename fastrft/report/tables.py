"""Tables made of metrics records: a run's evaluations before and after, and a study's comparison of
presets (Pass@1 over seeds, differences against the baseline with their standard errors, the dynamics
of the rounds). Markdown, for summary.json, ladder.md and the terminal.
"""

from __future__ import annotations

import statistics
from typing import Any

from fastrft.report.records import eval_records, round_records


def before_after_table(records: list[dict[str, Any]], keys: tuple[str, ...] | None = None) -> str:
    """A Markdown table of every evaluation (round by round) for the metrics present. A metric recorded with
    its 95% interval (``<key>_lo``, ``<key>_hi``: fastrft.evaluate) shows as value ± the interval's
    half-width (Wilson's interval is not symmetric; the bounds themselves are in metrics.jsonl)."""
    evals = eval_records(records)
    if not evals:
        return "(no evaluations recorded)"
    if keys is None:
        preferred = ["train_pass1", "test_pass1", "test_greedy", "train_pass1_gsm8k", "test_pass1_gsm8k"]
        at_k = sorted({k for r in evals for k in r if k.startswith(("test_pass@", "test_maj@"))
                       and not k.endswith(("_lo", "_hi"))}, key=lambda k: (k.split("@")[0], int(k.split("@")[1])))
        keys = tuple(k for k in [*preferred, *at_k, "train_response_len"] if any(k in r for r in evals))
    header = "| round | " + " | ".join(keys) + " |"
    rule = "|---:|" + "---:|" * len(keys)
    rows = [f"| {r['round']} | " + " | ".join(_fmt(k, r.get(k), r) for k in keys) + " |" for r in evals]
    return "\n".join([header, rule, *rows])


def _fmt(key: str, x: Any, record: dict[str, Any] | None = None) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if key.endswith("_len"):
            return f"{x:.1f}"
        lo, hi = (record or {}).get(f"{key}_lo"), (record or {}).get(f"{key}_hi")
        return f"{x:.3f} ± {(hi - lo) / 2:.3f}" if lo is not None and hi is not None else f"{x:.3f}"
    return str(x)


def curve(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["round"], float(r[key])) for r in eval_records(records) if r.get(key) is not None]


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0
    return m, sd


def _pm(xs: list[float], fmt: str = ".2f") -> str:
    """Mean ± standard deviation over seeds; one seed has no spread to show."""
    if not xs:
        return "–"
    m, sd = mean_std(xs)
    return f"{m:{fmt}}" if len(xs) == 1 else f"{m:{fmt}} ± {sd:{fmt}}"


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Pointwise mean over the rounds every curve has."""
    common = set.intersection(*(set(dict(c)) for c in curves)) if curves else set()
    return [(r, sum(dict(c)[r] for c in curves) / len(curves)) for r in sorted(common)]


def _run_mean(curve: list[tuple[int, float]]) -> float | None:
    """A run's Pass@1 averaged over its evaluations after round 0: how high it got, how fast, and how
    well it stayed there, in one number (the area under the curve, per round evaluated)."""
    after = [v for rd, v in curve if rd > 0]
    return sum(after) / len(after) if after else None


def layer_means(layer: dict[str, Any], key: str) -> list[float]:
    return [m for m in (_run_mean(curve(r["records"], key)) for r in layer["runs"]) if m is not None]


#: The smallest difference of run-mean Pass@1 called an effect, whatever the seeds say: on the CPU study's
#: 80 test problems one evaluation's sampling noise alone is about ±0.05.
MIN_EFFECT = 0.05


def compare(layer: dict[str, Any], base: dict[str, Any], key: str) -> dict[str, Any] | None:
    """``layer`` against ``base`` on the run-mean of ``key``: the difference of the seed means, its standard
    error (Welch: both layers' seed spreads), and a verdict. "helps"/"hurts" need |Δ| >= 2 SE and
    >= MIN_EFFECT; anything smaller is "within noise". With one seed on either side the spread is unknown:
    the SE is None and the verdict "no verdict". None when either layer has no finished run."""
    a, b = layer_means(layer, key), layer_means(base, key)
    if not a or not b:
        return None
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    delta = ma - mb
    if min(len(a), len(b)) < 2:  # one seed says nothing about how much another seed would differ
        return {"delta": delta, "se": None, "verdict": "no verdict"}
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
    if c is None:
        return "–"
    if c["se"] is None:
        return f"{c['delta']:+.2f} (1 seed: no verdict)"
    return f"{c['delta']:+.2f} ± {c['se']:.2f} {c['verdict']}"


def ladder_row(layer: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, str]:
    runs = layer["runs"]
    train = [curve(r["records"], "train_pass1") for r in runs]
    test = [curve(r["records"], "test_pass1") for r in runs]
    row = {"preset": layer["name"], "choice": layer["choice"], "seeds": str(len(runs))}
    row["train before"] = _pm([c[0][1] for c in train if c])
    row["train after"] = _pm([c[-1][1] for c in train if c])
    row["test before"] = _pm([c[0][1] for c in test if c])
    row["test after"] = _pm([c[-1][1] for c in test if c])
    mean_test = mean_curve([c for c in test if c])
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
        rounds = round_records(run["records"])
        if not rounds:
            continue
        correct = [float(r.get("correct_mean", 0.0)) for r in rounds]
        per_seed["correct"].append(sum(correct) / len(correct))
        last_fail = max((r["round"] for r, c in zip(rounds, correct) if c < 1.0), default=0)
        per_seed["settled"].append(float(last_fail))
        per_seed["flips"].append(float(sum((a >= 1.0) != (b >= 1.0) for a, b in zip(correct, correct[1:]))))
        # A step whose gradient norm is 0 (no signal, KL on) is a step: only skipped rounds took none.
        norms = [float(r["grad_norm"]) for r in rounds if not r.get("skipped") and r.get("grad_norm") is not None]
        if norms:
            per_seed["gn_med"].append(statistics.median(norms))
            per_seed["gn_max"].append(max(norms))
        tail = rounds[-5:]
        per_seed["len"].append(sum(float(r.get("response_len_mean", 0.0)) for r in tail) / len(tail))
        per_seed["skipped"].append(float(rounds[-1].get("skipped_total", 0)))

    def pm(key: str, fmt: str) -> str:
        return _pm(per_seed[key], fmt)

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

