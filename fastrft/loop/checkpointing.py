"""The checkpoint payload of a run, and the order in which a resume restores it.

A checkpoint (fastrft.checkpoint: atomic, checksummed) holds the end of a round: the master weights and
AdamW state (one file at world size 1; DCP shards across ranks), the run state, the training example ids,
the sizes of metrics.jsonl, problems.jsonl and rollouts.jsonl at that point, the config and the RNG state. A resume
restores, in this order: weights and optimizer; the compute copy's refresh; the run state; the logs,
truncated to their checkpointed sizes (records of a round that did not finish are dropped); the RNG
state, last, so that nothing after it draws from the restored streams before the next round does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fastrft import checkpoint as ckpt
from fastrft import rundir
from fastrft.config import TrainConfig
from fastrft.errors import ConfigError
from fastrft.loop.types import RunState
from fastrft.models import lora

LOGS = rundir.LOGS


class Checkpoints:
    """Saves and restores a run's checkpoints in ``out_dir`` for the ``learner`` (weights, optimizer)."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, learner, train_example_ids: list[str], world):
        self.cfg, self.out_dir, self.learner, self.world = cfg, out_dir, learner, world
        self.train_example_ids = train_example_ids

    def save(self, state: RunState) -> Path:
        """Checkpoint the end of round ``state.round``. The prefix cache is dropped, so that an uninterrupted
        run and one resumed from here compute the next round from the same engine state."""
        self.learner.reset_prefix_cache()
        sizes = {f"{name.split('.')[0]}_bytes": self._size(name) for name in LOGS}
        payload = {"state": state.to_dict(), "train_examples": self.train_example_ids, **sizes,
                   "config": self.cfg.to_dict()}
        policy, optimizer = self.learner.precision.master, self.learner.optimizer
        if self.learner.precision.sharded:  # every rank writes its part of the model and AdamW state
            from fastrft.distributed import dcp_save

            return ckpt.save_sharded_checkpoint(
                self.out_dir, state.round, {**payload, "world_size": self.world.size}, self.cfg.run.keep_checkpoints,
                self.world, lambda path: dcp_save(path, policy, optimizer))
        # One file: one process, or a replicated LoRA run's rank 0 (every rank holds the same adapters).
        payload.update(model=lora.checkpoint_state(policy), optimizer=optimizer.state_dict())
        path = (ckpt.save_checkpoint(self.out_dir, state.round, payload, self.cfg.run.keep_checkpoints)
                if self.world.main else ckpt.checkpoint_dir(self.out_dir, state.round))
        self.world.barrier()
        return path

    def saved(self) -> dict[int, Path]:
        """The finished checkpoints by round."""
        return dict(ckpt.checkpoint_dirs(self.out_dir))

    def restore(self, force: bool, keep_base_eval: bool = False) -> RunState | None:
        """Continue from the newest whole checkpoint: the run state it holds (``.round``: its round). With
        none, start over (None) only if nothing was recorded yet, or with ``force``, which keeps the old
        records beside the new ones: records are never dropped without the user asking. ``keep_base_eval``: a run that stopped
        in round 1 (a reward function that raised, a crash) with only the base model's evaluation recorded
        keeps it and continues with round 1: a fresh run state (round 0), as after an interrupt."""
        main = self.world.main
        if main:
            ckpt.clean_partial(self.out_dir)
        warnings: list[str] = []
        damaged: list[tuple] = []  # (checkpoint directory, problem)
        # Rank 0 picks and verifies the checkpoint; the others load the one it chose.
        found = ckpt.load_latest(self.out_dir, warn=warnings.append, damaged=damaged) if main else None
        chosen = self.world.broadcast(None if found is None else found[0])
        if not main and chosen is not None:
            found = ckpt.load_round(self.out_dir, chosen)
        if chosen is None:
            kept = self.world.broadcast(main and keep_base_eval and not damaged and rundir.base_eval_only(self.out_dir))
            if kept:
                if main:  # rollouts of the round that did not finish are dropped, as a checkpoint's restore does
                    ckpt.truncate(self.out_dir / "rollouts.jsonl", 0)
                    print(f"fastrft: {self.out_dir} holds the base model's evaluation and no checkpoint (the run "
                          "stopped in round 1); keeping the evaluation and starting round 1", file=sys.stderr)
                self.world.barrier()
                return RunState()
            if main:
                rundir.start_over(self.out_dir, damaged, force)
            self.world.barrier()
            return None
        for msg in warnings:
            print(msg, file=sys.stderr)
        round_, payload = found
        ckpt.check_layout(self.out_dir, round_, payload, self.learner.precision.sharded)
        if payload["train_examples"] != self.train_example_ids:
            raise ConfigError(f"{self.out_dir}: the checkpoint of round {round_} trained on {payload['train_examples']}"
                              f" but the requested config selects {self.train_example_ids}; use a new --out")
        self._load_weights(round_, payload)  # 1. weights and optimizer
        self.learner.refresh()  # 2. the compute copy takes the restored masters
        state = RunState.from_dict(payload["state"])  # 3. the run state
        if main:  # 4. the logs, cut back to the checkpoint
            for name in LOGS:  # (a checkpoint written before problems.jsonl existed has no size for it)
                size = payload.get(f"{name.split('.')[0]}_bytes")
                if size is not None:
                    ckpt.truncate(self.out_dir / name, size)
        ckpt.set_rng_state(payload["rng"])  # 5. the RNG streams, last
        self.world.barrier()
        assert state.round == round_, (state.round, round_)
        return state

    def _load_weights(self, round_: int, payload: dict) -> None:
        policy, optimizer = self.learner.precision.master, self.learner.optimizer
        if self.learner.precision.sharded:  # DCP reshards when the checkpoint was written by another world size
            from fastrft.distributed import dcp_load

            dcp_load(ckpt.shard_dir(self.out_dir, round_), policy, optimizer)
            if payload.get("world_size") != self.world.size and self.world.main:
                print(f"fastrft: the checkpoint of round {round_} was written by {payload.get('world_size')} ranks; "
                      f"resharded onto {self.world.size} (the run continues exactly up to rounding: the work is "
                      "divided differently)", file=sys.stderr)
        else:
            lora.load_checkpoint_state(policy, payload["model"])
            optimizer.load_state_dict(payload["optimizer"])

    def _size(self, name: str) -> int:
        p = self.out_dir / name
        return p.stat().st_size if p.exists() else 0
