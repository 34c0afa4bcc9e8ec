"""fastrft: kernel-backed reinforcement fine-tuning of LLMs.

>>> from fastrft import TrainConfig, Trainer          # doctest: +SKIP
>>> summary = Trainer(TrainConfig()).run()             # doctest: +SKIP

Every public name is imported on first use (see fastrft._lazy): ``fastrft --help`` and the config
classes do not import torch.
"""

from fastrft._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {**dict.fromkeys(("AlgoConfig", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "RolloutConfig",
                             "RunConfig", "TrainConfig"), "fastrft.config"),
            **dict.fromkeys(("Completion", "SamplingParams", "generate"), "fastrft.engine"),
            **dict.fromkeys(("load_model", "load_tokenizer"), "fastrft.models"),
            "Trainer": "fastrft.trainer"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
