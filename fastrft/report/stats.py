"""The statistics of an evaluation: pass@k and maj@k from n samples per problem, and their 95% intervals.

pass@k is the unbiased estimator of Chen et al. (2021): with c correct among n >= k samples, the chance
that k of them drawn without replacement hold at least one correct, ``1 - C(n-c, k) / C(n, k)``.

maj@k is estimated the same way: the chance that a majority vote over k of the n samples, drawn without
replacement, lands on a correct final answer. Samples vote with their parsed final answer (the math
rewards' canonical form: fastrft.rewards.answer_key); a sample with no parsable answer takes a place in the
draw and votes for nothing. A tie at the top is split evenly: each tied answer wins with probability one
over the number tied (the expected value of a uniformly random tie-break), so the estimate does not depend
on the order the samples came in. A draw where no sample has an answer counts as wrong.

The interval beside a metric is Wilson's 95% score interval for a proportion, with the number of problems
as the sample size. Where each problem contributes a 0/1 outcome (Pass@1 of one sample), that is the
binomial setting Wilson's interval was made for, and it stays inside [0, 1] with a sensible width at 0 or
1 correct, where the normal interval collapses. Where a problem's value is a fraction (pass@k from n > k
samples, the mean of several samples), the variance of a value in [0, 1] with mean p is at most p(1 - p),
so the same interval is conservative: it is at least as wide as one built from the true variance. The
interval is over problems, the unit a benchmark samples: it says how far the same policy's number could
move on another draw of problems like these, not how far another seed's training could move it (the
ladder's intervals over seeds answer that).
"""

from __future__ import annotations

from fractions import Fraction
from math import comb, sqrt

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def maj_at_k(answers: dict[str, int], correct: set[str] | frozenset[str], n: int, k: int) -> float:
    """The chance that a majority vote over k of n samples, drawn without replacement, picks a correct
    answer. ``answers``: how many samples gave each parsed answer (the rest, up to n, gave none);
    ``correct``: the answers that are correct. Ties at the top are split evenly (module docstring).

    >>> maj_at_k({"7": 3, "8": 1}, {"7"}, 4, 1)  # one sample: as pass@1
    0.75
    >>> maj_at_k({"7": 2, "8": 2}, {"7"}, 4, 4)  # all four: a 2-2 tie, split
    0.5
    >>> maj_at_k({"7": 1}, {"7"}, 3, 3)  # one answer among three samples, two unparsed: it wins
    1.0
    """
    counts = list(answers.values())
    unparsed = n - sum(counts)
    if unparsed < 0 or not 1 <= k <= n or any(c < 0 for c in counts):
        raise ValueError(f"maj_at_k needs answer counts summing to at most n and 1 <= k <= n, got {answers}, "
                         f"n={n}, k={k}")
    names = list(answers)
    total = Fraction(0)
    for i, name in enumerate(names):
        if name not in correct or answers[name] == 0:
            continue
        others = [answers[m] for j, m in enumerate(names) if j != i]
        for j in range(1, min(answers[name], k) + 1):
            # ways[s][t]: ways to draw s more samples from the other answers and the unparsed ones such that
            # no other answer gets more than j votes and t of them get exactly j.
            ways = _ways_below(others, unparsed, k - j, j)
            wins = sum(Fraction(w, t + 1) for t, w in enumerate(ways[k - j]) if w)
            total += comb(answers[name], j) * wins
    return float(total / comb(n, k))


def _ways_below(others: list[int], unparsed: int, draws: int, cap: int) -> list[list[int]]:
    """ways[s][t] for s <= draws: the number of ways to draw s samples from the answers of sizes ``others``
    (each at most ``cap`` times; t of them exactly ``cap`` times) and from ``unparsed`` (any number)."""
    ways = [[comb(unparsed, s)] + [0] * len(others) for s in range(draws + 1)]
    for size in others:
        new = [[0] * (len(others) + 1) for _ in range(draws + 1)]
        for s in range(draws + 1):
            for t, w in enumerate(ways[s]):
                if not w:
                    continue
                for x in range(0, min(size, cap, draws - s) + 1):
                    new[s + x][t + (x == cap)] += w * comb(size, x)
        ways = new
    return ways


def wilson(mean: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion ``mean`` over ``n`` units (problems); (nan, nan) for n = 0.

    >>> lo, hi = wilson(0.0, 10); (round(lo, 4), round(hi, 4))
    (0.0, 0.2775)
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = min(max(mean, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The interval always holds p; the clamp keeps rounding from moving an end past it (at p = 0 or 1).
    return min(max(0.0, centre - half), p), max(min(1.0, centre + half), p)
