"""fastrft: kernel-backed reinforcement fine-tuning of LLMs.

>>> from fastrft import TrainConfig, Trainer          # doctest: +SKIP
>>> summary = Trainer(TrainConfig()).run()             # doctest: +SKIP

Every public name is imported on first use (see fastrft._lazy): ``fastrft --help`` and the config
classes do not import torch.
"""

import os as _os

from fastrft._lazy import lazy_exports

# MKL's strict reproducibility mode: each fp32 GEMM output element is computed in one order whatever the
# row count and thread count (the exact mode depends on it; fastrft.models.exact). MKL reads it at its
# first call, so it is set here, before fastrft imports torch; a value already in the environment wins.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

_EXPORTS = {**dict.fromkeys(("AlgoConfig", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "RolloutConfig",
                             "RunConfig", "TrainConfig"), "fastrft.config"),
            **dict.fromkeys(("Completion", "SamplingParams", "generate"), "fastrft.engine"),
            **dict.fromkeys(("load_model", "load_tokenizer"), "fastrft.models"),
            "Trainer": "fastrft.trainer"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
