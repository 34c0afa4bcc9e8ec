"""fastrft.report.stats: pass@k, maj@k (against enumerating every draw) and Wilson's interval."""

from __future__ import annotations

import itertools
import random
from fractions import Fraction

import pytest

from fastrft.report.stats import maj_at_k, pass_at_k, wilson


def _maj_by_enumeration(samples: list[str | None], correct: set[str], k: int) -> float:
    """Every k-subset of the samples, the vote of each, a tie at the top split evenly."""
    total, draws = Fraction(0), 0
    for subset in itertools.combinations(samples, k):
        draws += 1
        votes: dict[str, int] = {}
        for a in subset:
            if a is not None:
                votes[a] = votes.get(a, 0) + 1
        if votes:
            top = max(votes.values())
            tied = [a for a, v in votes.items() if v == top]
            total += Fraction(sum(a in correct for a in tied), len(tied))
    return float(total / draws)


def test_maj_at_k_is_the_mean_vote_over_every_draw():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        samples = [rng.choice(["7", "8", "9", None, "7"]) for _ in range(n)]
        answers: dict[str, int] = {}
        for a in samples:
            if a is not None:
                answers[a] = answers.get(a, 0) + 1
        correct = {a for a in ("7", "8", "9") if rng.random() < 0.4}
        k = rng.randint(1, n)
        assert maj_at_k(answers, correct, n, k) == pytest.approx(_maj_by_enumeration(samples, correct, k), abs=1e-12)


def test_maj_at_1_is_the_share_of_correct_votes_and_pass_at_k_is_chen_s():
    assert maj_at_k({"7": 3, "8": 2}, {"7"}, 6, 1) == pytest.approx(0.5)  # one of six unparsed
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(16, 16, 16) == 1.0 and pass_at_k(16, 0, 1) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        maj_at_k({"7": 5}, {"7"}, 4, 2)  # more votes than samples


def test_wilson_values_edges_and_coverage():
    lo, hi = wilson(0.5, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)  # the textbook value
    assert wilson(0.0, 20)[0] == 0.0 and wilson(1.0, 20)[1] == 1.0 and 0 < wilson(0.0, 20)[1] < 0.2
    # Coverage of a 0/1 mean over 40 problems, 4,000 simulated evaluations at each p: at least 93%.
    rng = random.Random(1)
    for p in (0.05, 0.3, 0.5):
        hits = 0
        for _ in range(4000):
            m = sum(rng.random() < p for _ in range(40)) / 40
            lo, hi = wilson(m, 40)
            hits += lo <= p <= hi
        assert hits / 4000 >= 0.93, (p, hits)
