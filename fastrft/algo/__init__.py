"""RL math: advantage estimators, reward mapping, the policy-gradient loss spec, varlen packing.

Token log-probs from hidden states live with their kernels in :mod:`fastrft.kernels`. Names are imported
on first use (see fastrft._lazy); the choices the config validates against are in the torch-free
:mod:`fastrft.algo.choices`."""

from fastrft._lazy import lazy_exports

_EXPORTS = {**dict.fromkeys(("ADVANTAGES", "check_advantage", "group_advantages", "map_reward"),
                            "fastrft.algo.advantage"),
            **dict.fromkeys(("PackedBatch", "pack"), "fastrft.algo.packing"),
            **dict.fromkeys(("AGGREGATIONS", "KL_ESTIMATORS", "PGLossSpec", "aggregate", "pg_loss"), "fastrft.algo.loss")}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
