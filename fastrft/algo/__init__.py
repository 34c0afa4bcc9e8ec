"""RL math: advantage estimators, reward mapping, the policy-gradient loss spec, token log-probs."""

from fastrft.algo.advantage import ADVANTAGES, check_advantage, group_advantages, map_reward
from fastrft.algo.logprob import token_logprobs
from fastrft.algo.packing import PackedBatch, pack
from fastrft.algo.loss import AGGREGATIONS, KL_ESTIMATORS, PGLossSpec, aggregate, pg_loss

__all__ = ["ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "PGLossSpec", "aggregate", "check_advantage",
           "group_advantages", "map_reward", "pack", "PackedBatch", "pg_loss", "token_logprobs"]
