"""fastrft: kernel-backed reinforcement fine-tuning of LLMs.

>>> from fastrft import TrainConfig, Trainer          # doctest: +SKIP
>>> summary = Trainer(TrainConfig()).run()             # doctest: +SKIP
"""

from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig, RunConfig,
                            TrainConfig)
from fastrft.engine import Completion, SamplingParams, generate
from fastrft.models import load_model, load_tokenizer

__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainer pulls in tqdm, plotting and every subsystem; load it only when asked for.
    if name == "Trainer":
        from fastrft.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'fastrft' has no attribute {name!r}")


__all__ = ["AlgoConfig", "Completion", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "RolloutConfig",
           "RunConfig", "SamplingParams", "TrainConfig", "Trainer", "generate", "load_model", "load_tokenizer"]
