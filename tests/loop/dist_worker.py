"""Runs ``fastrft train`` jobs in one process, under torchrun or alone, for tests/loop/test_distributed.py.

``python tests/loop/dist_worker.py SPEC.json`` (or ``torchrun ... tests/loop/dist_worker.py SPEC.json``): SPEC is a
list of {"argv": [train flags], "dump": path or null}. With "dump", rank 0 also writes the round-1
rollouts (every request's tokens, log-probs and finish reason) before the run starts. Several jobs share
one launch, because starting torchrun costs most of a small test's time.
"""

from __future__ import annotations

import json
import sys

from fastrft import presets
from fastrft.cli import build_parser, config_from_args
from fastrft.config import TrainConfig
from fastrft.trainer import Trainer


def main(spec_path: str) -> None:
    for job in json.loads(open(spec_path).read()):
        args = build_parser().parse_args(["train", *job["argv"]])
        trainer = Trainer(config_from_args(args, TrainConfig(), presets.profile(args.profile)))
        if job.get("dump"):
            _, prompts = trainer.examples_for_round(1)
            groups = trainer.rollout(1, prompts)
            if trainer.world.main:
                with open(job["dump"], "w") as f:
                    json.dump([[{"tokens": c.token_ids, "logprobs": c.logprobs, "finish": c.finish_reason,
                                 "request": [c.prompt_index, c.sample_index]} for c in g] for g in groups], f)
        trainer.run()


if __name__ == "__main__":
    main(sys.argv[1])
