"""The names the config accepts for the algorithm's table-driven choices, importable without torch.

The tables themselves (estimator functions, KL estimators) live in advantage.py and loss.py, which
check at import that their keys are exactly these names.
"""

ADVANTAGE_NAMES = ("none", "grpo", "dr_grpo", "rloo", "window", "extra_samples")
KL_ESTIMATOR_NAMES = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
