"""What each row rule costs (fastrft.models.row_rules): the exact mode's GEMM time against one plain call.

    python bench/bench_row_rules.py [--dtypes fp32,bf16] [--rows 1,3,16,64,600,2000]

For SmolLM2-135M's four linear shapes (576->576, 576->192, 576->1536, 1536->576), each rule of the
dtype's list runs the forward GEMMs of m rows as the exact mode would (padded calls, fixed blocks) and is
timed against one plain call of the same m rows (the ratio is the sum over the four shapes). m = 1-64 are
decode batches, 600-2,000 training forwards. The rule lists in row_rules.RULES are ordered by these
ratios; the probe at start-up then takes the first one that is batch-invariant on the machine. It also
prints which rule the probe chose here for each shape, the LM head and the attention tiles.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))


def _time(fn, budget_s: float = 0.3) -> float:
    fn()
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < budget_s:
        fn()
        reps += 1
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rows", default="1,3,16,64,600,2000")
    args = parser.parse_args()
    import torch

    import fastrft  # noqa: F401  (MKL's reproducibility mode, as in a run)
    from fastrft.models import row_rules
    from harness import cpu_features, device_name, git_sha, versions

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = [int(m) for m in args.rows.split(",")]
    print(f"{device_name()}; {cpu_features()}; {versions()}; commit {git_sha()}")
    g = torch.Generator().manual_seed(0)
    for name in args.dtypes.split(","):
        dtype = dtypes[name]
        rules = row_rules.RULES[dtype]
        weights = [torch.randn(n, k, generator=g).to(dtype) for k, n in SHAPES]
        print(f"\n{name}: time of each rule / one plain call, summed over the four shapes")
        print("| rows | plain (us) | " + " | ".join(str(r) for r in rules) + " |")
        print("|---:|---:|" + "---:|" * len(rules))
        for m in rows:
            xs = {k: torch.randn(m, k, generator=g).to(dtype) for k, _ in SHAPES}

            def total(rule):
                def go():
                    for (k, _), w in zip(SHAPES, weights):
                        rule.run(lambda piece, dest: row_rules.gemm(piece, w.T, out=dest), xs[k])
                return _time(go)

            base = total(row_rules.PLAIN)
            print(f"| {m} | {base * 1e6:,.0f} | " + " | ".join(f"{total(r) / base:.2f}" for r in rules) + " |",
                  flush=True)
    print("\nthe probe's choice on this machine:")
    sites = [row_rules.Site("linear", k, n, dt) for dt in dtypes.values() for k, n in SHAPES]
    sites += [row_rules.Site("head", 576, 49152, torch.float32), row_rules.Site("attention", 64, 3, torch.float32)]
    for site in sites:
        c = row_rules.choose(site)
        print(f"- {site}: {c.rule}{' (pre-packed)' if c.packed else ''}")


if __name__ == "__main__":
    main()
