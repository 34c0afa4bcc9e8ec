"""RL math: advantage estimators, reward mapping, the policy-gradient loss spec, varlen packing.

Token log-probs from hidden states live with their kernels in :mod:`fastrft.kernels`."""

from fastrft.algo.advantage import ADVANTAGES, check_advantage, group_advantages, map_reward
from fastrft.algo.packing import PackedBatch, pack
from fastrft.algo.loss import AGGREGATIONS, KL_ESTIMATORS, PGLossSpec, aggregate, pg_loss

__all__ = ["ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "PGLossSpec", "aggregate", "check_advantage",
           "group_advantages", "map_reward", "pack", "PackedBatch", "pg_loss"]
