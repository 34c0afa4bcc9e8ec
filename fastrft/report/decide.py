"""Deciding a ladder's comparisons: each layer against the layer it builds on, a paired difference with a
95% interval over seeds and problems, a verdict only where the interval gives one, and a sequential
procedure that adds seeds to the undecided comparisons without inflating false verdicts.

The effect. For a comparison B (the layer) against A (the one it builds on), both run with the same seeds
and evaluated on the same test problems, x[s, p] is the difference of their final-evaluation scores of
problem p at seed s (each the mean of that problem's samples). The effect is the mean of x over seeds and
problems. Its variance is estimated as ``var_s / S + var_p / P``: var_s is the variance over the S seeds
of the per-seed means (training randomness and the evaluation's sampling), var_p the variance over the P
problems of the per-problem means (which problems were drawn). This is the two-way crossed estimator
without its interaction correction, so it is conservative. It is never taken below the binomial variance
of the two layers' means with one success and one failure added to each (Agresti and Caffo), so that a
study where every score is 0 (a model that solves nothing yet) cannot produce a zero-width interval. The
interval is mean ± t * se with Student's t at S - 1 degrees of freedom: the seeds are the scarce
dimension, and t keeps the interval honest at 3 seeds.

The verdict, for a metric where more is better and an equivalence margin ``margin``:
- "helps" when the interval lies above 0, "hurts" when it lies below 0;
- "no difference" when it lies inside (-margin, +margin);
- otherwise "undecided at n seeds".

The sequence. ``--until-decided`` looks at each comparison at planned seed counts n0, n0 + J, n0 + 2J, ...
up to ``--max-seeds`` N (J = ``--jobs``): L looks at most, fixed before any result is seen. Each look uses
level alpha / L (Bonferroni over the looks), so the chance that any look of a comparison gives a false
verdict is at most alpha, however the looks turn out and wherever the study stops (optional stopping is
covered by the union bound). A comparison stops at its first deciding look; the verdicts are a function of
the runs alone (the first n seeds at each look), so a resumed study replays them and continues.
tests/report/test_decide.py checks the error rate by simulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

ALPHA = 0.05


@dataclass(frozen=True)
class Effect:
    """One comparison at one look: the mean difference, its interval, the seeds and problems it is over,
    the verdict ("helps", "hurts", "no difference" or "undecided"), and the level used."""

    diff: float
    lo: float
    hi: float
    seeds: int
    problems: int
    verdict: str
    level: float

    def text(self) -> str:
        if self.verdict == "undecided":
            return f"undecided at {self.seeds} seeds"
        return f"{self.verdict} (at {self.seeds} seeds)"


def effect(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], seeds: list[int], *, margin: float,
           alpha: float = ALPHA) -> Effect:
    """B against A over ``seeds``: ``a[seed][problem]`` and ``b[seed][problem]`` are the final evaluation's
    per-problem scores; the problems common to every run are compared. ``alpha``: two-sided level."""
    problems = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds))) if seeds else []
    n_s, n_p = len(seeds), len(problems)
    if n_s == 0 or n_p == 0:
        return Effect(math.nan, math.nan, math.nan, n_s, n_p, "undecided", alpha)
    x = [[b[s][p] - a[s][p] for p in problems] for s in seeds]
    by_seed = [sum(row) / n_p for row in x]
    by_problem = [sum(x[i][j] for i in range(n_s)) / n_s for j in range(n_p)]
    mean = sum(by_seed) / n_s
    if n_s < 2:
        return Effect(mean, -math.inf, math.inf, n_s, n_p, "undecided", alpha)
    # Never below the binomial variance of the two means, each with one success and one failure added
    # (Agresti & Caffo): scores that are all 0 (or all 1) do not make the interval a point.
    cells = n_s * n_p
    tilde = [(sum(r[s][p] for s in seeds for p in problems) + 1) / (cells + 2) for r in (a, b)]
    floor = sum(t * (1 - t) for t in tilde) / cells
    se = math.sqrt(max(_var(by_seed) / n_s + (_var(by_problem) / n_p if n_p > 1 else 0.0), floor))
    half = t_quantile(1 - alpha / 2, n_s - 1) * se
    lo, hi = mean - half, mean + half
    if lo > 0:
        verdict = "helps"
    elif hi < 0:
        verdict = "hurts"
    elif -margin < lo and hi < margin:
        verdict = "no difference"
    else:
        verdict = "undecided"
    return Effect(mean, lo, hi, n_s, n_p, verdict, alpha)


def looks(planned: int, step: int, max_seeds: int) -> list[int]:
    """The seed counts at which a comparison is looked at: planned, planned + step, ... up to max_seeds."""
    out = [planned]
    while out[-1] < max_seeds:
        out.append(min(out[-1] + max(step, 1), max_seeds))
    return out


def decide(a, b, seed_order: list[int], *, planned: int, step: int, max_seeds: int, margin: float,
           alpha: float = ALPHA) -> tuple[Effect, bool]:
    """The sequential verdict of B against A from the seeds run so far (``seed_order``: the study's seeds in
    the order they are added, those with both runs finished): (the effect at the deciding look, or at the
    last look the seeds reach; whether more seeds are wanted)."""
    plan = looks(planned, step, max_seeds)
    level = alpha / len(plan)
    done = [s for s in seed_order if s in a and s in b]
    last = None
    for n in plan:
        if n > len(done):
            break
        last = effect(a, b, done[:n], margin=margin, alpha=level)
        if last.verdict != "undecided":
            return last, False
    if last is None:
        return effect(a, b, done, margin=margin, alpha=level), True
    return last, last.seeds < plan[-1]


def _var(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


@lru_cache(maxsize=None)
def t_quantile(q: float, df: int) -> float:
    """Student's t quantile (0.5 < q < 1) by bisection on its CDF (the regularized incomplete beta).

    >>> round(t_quantile(0.975, 2), 3), round(t_quantile(0.975, 10), 3), round(t_quantile(0.995, 4), 3)
    (4.303, 2.228, 4.604)
    """
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < q:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def _t_cdf(t: float, df: int) -> float:
    x = df / (df + t * t)
    return 1 - 0.5 * _betainc(df / 2, 0.5, x) if t >= 0 else 0.5 * _betainc(df / 2, 0.5, x)


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta I_x(a, b) (continued fraction, modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1) / a
