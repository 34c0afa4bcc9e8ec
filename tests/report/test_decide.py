"""fastrft.report.decide: the paired effect over seeds and problems, its verdicts, and the sequential
procedure's error rate under optional stopping, by simulation."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

from fastrft.report.decide import decide, effect, looks, t_quantile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from sim_decide import study as _study  # noqa: E402  (the simulated study bench/sim_decide.py measures)


def test_t_quantiles():
    assert t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert t_quantile(0.995, 30) == pytest.approx(2.7500, abs=1e-4)


def test_verdicts_follow_the_interval():
    probs = [f"p{j}" for j in range(600)]
    base = {j: 0.2 + 0.6 * (j % 5) / 4 for j in range(600)}  # scores 0.2 .. 0.8 across problems
    same = {s: {p: base[j] for j, p in enumerate(probs)} for s in range(6)}
    up = {s: {p: base[j] + 0.1 + 0.005 * (-1) ** s for j, p in enumerate(probs)} for s in range(6)}
    seeds = list(range(6))
    assert effect(same, up, seeds, margin=0.05).verdict == "helps"
    assert effect(up, same, seeds, margin=0.05).verdict == "hurts"
    near = {s: {p: base[j] + 0.002 * (-1) ** s for j, p in enumerate(probs)} for s in range(6)}
    assert effect(same, near, seeds, margin=0.05).verdict == "no difference"
    noisy = {s: {p: base[j] + 0.3 * (-1) ** s for j, p in enumerate(probs)} for s in range(2)}
    got = effect(same, noisy, [0, 1], margin=0.05)
    assert got.verdict == "undecided" and got.text() == "undecided at 2 seeds" and got.lo < 0 < got.hi
    assert effect(same, up, [0], margin=0.05).verdict == "undecided"  # one seed has no spread to judge
    # Every score 0 in both layers: no spread at all, but the binomial floor keeps the interval open.
    zero = {s: {p: 0.0 for p in probs[:4]} for s in range(2)}
    flat = effect(zero, zero, [0, 1], margin=0.05)
    assert flat.verdict == "undecided" and flat.hi - flat.lo > 0.1


def test_looks_are_fixed_in_advance():
    assert looks(3, 2, 10) == [3, 5, 7, 9, 10] and looks(3, 1, 3) == [3] and looks(4, 4, 12) == [4, 8, 12]


@pytest.mark.parametrize("shift,bad", [(0.0, ("helps", "hurts")), (0.35, ("hurts", "no difference"))])
def test_the_sequential_procedure_keeps_its_error_rate(shift, bad):
    """600 simulated studies, 3 planned seeds, 2 added per look, up to 15: with no effect, a 'helps' or
    'hurts' verdict is an error; with a real effect (about +0.06 in Pass@1, beyond the 0.05 margin), 'hurts'
    or 'no difference' is. Either way at most 5% (plus Monte Carlo slack: 5% + 2 standard errors)."""
    rng = random.Random(7)
    errors = decided = 0
    n = 600
    for _ in range(n):
        a, b = _study(rng, shift)
        eff, more = decide(a, b, list(range(15)), planned=3, step=2, max_seeds=15, margin=0.05)
        errors += eff.verdict in bad
        decided += eff.verdict != "undecided"
    assert errors / n <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / n), errors
    assert decided > 0  # the procedure does decide
