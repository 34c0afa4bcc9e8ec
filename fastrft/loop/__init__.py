"""The round loop of reinforcement fine-tuning, as small stage modules with one owner per piece of state.

Read in this order (docs/architecture.md draws the same map):

- ``types``: what stages hand each other (RoundBatch, Rollouts, Scores, TrainBatch) and RunState;
- ``round``: one round as a list of stage calls;
- the stages: ``data`` (examples), ``rollout``, ``scoring``, ``recorder`` (sample records, metrics),
  ``learner`` (the update; with ``plan`` and ``logprobs``), ``metrics``;
- around the rounds: ``run`` (the loop, stop handling), ``evaluator``, ``checkpointing``;
- ``seeds``: every random stream of a run; ``difficulty``: the base model's pass-rate estimate.

fastrft.trainer.Trainer builds these parts and is the public entry point. This package imports nothing
on its own import, so a stage module can be used without the others.
"""
