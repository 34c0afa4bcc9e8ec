"""``Trainer``: the public face of a run. It builds the run's parts, top to bottom, and runs the loop.

    trainer = Trainer(config)      # joins the job, loads model and data, restores a checkpoint if any
    summary = trainer.run()        # rounds until run.rounds; summary.json

The work is done by the modules of fastrft.loop, one owner per piece of state (docs/architecture.md):

- ``TrainingData`` (loop/data.py): the pool, the evaluation sets, each round's examples, the prompt cache;
- ``Learner`` (loop/learner.py): optimizer, lr schedule, token budget, micro-batch plan, reference model;
  the only caller of the weight refresh and of the prefix-cache reset;
- ``Evaluator`` (loop/evaluator.py): Pass@1 after a round, and the shared base-evaluation cache;
- ``Recorder`` (loop/recorder.py): metrics.jsonl, rollouts.jsonl, TensorBoard, the progress bar
  (a ``NullRecorder`` on ranks other than 0);
- ``Checkpoints`` (loop/checkpointing.py): the checkpoint payload and the restore order;
- ``RunLoop`` (loop/run.py): rounds, evaluations, checkpoints and stop handling;
- ``train_round`` (loop/round.py): one round as a list of stage calls.

Under torchrun the same code runs on every rank (fastrft.distributed): generation is split by request
and gathered, each step's sequences are split across the ranks of an FSDP2-sharded model, and rank 0
writes the records. All formulas live in fastrft.algo and fastrft.kernels.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from fastrft import lock, rundir
from fastrft.config import TrainConfig
from fastrft.distributed import ShardedPrecision, SplitEngine, init_world
from fastrft.engine import Engine, EngineConfig
from fastrft.errors import ConfigError
from fastrft.loop import difficulty, inputs
from fastrft.loop.checkpointing import Checkpoints
from fastrft.loop.data import TrainingData
from fastrft.loop.evaluator import Evaluator
from fastrft.loop.learner import Learner, reference_model, token_budget
from fastrft.loop.recorder import NullRecorder, Recorder, check_sinks
from fastrft.loop.rollout import Sampler
from fastrft.loop.round import Stages, train_round
from fastrft.loop.run import RunLoop, WallClock
from fastrft.loop.types import RunState
from fastrft.models import exact, load_tokenizer
from fastrft.precision import Precision, ReplicatedPrecision, load_policy, resolve_precision, warn_unabsorbed_updates
from fastrft.rewards.funcs import resolve as resolve_rewards

__all__ = ["RunState", "Trainer"]


class Trainer:
    def __init__(self, config: TrainConfig, *, force: bool = False, base_eval_cache: str | Path | None = None,
                 reward_funcs: list | None = None, reward_weights: list[float] | None = None,
                 train_dataset=None, eval_dataset=None, sampler=None, compute_metrics=None):
        """``base_eval_cache``: a JSON file of round-0 evaluations shared with other runs of the same base
        model (see :class:`fastrft.evaluate.BaseEvalCache`); ``fastrft ladder`` passes one per study.
        ``reward_funcs``, ``reward_weights``: TRL-style reward functions (callables or names) whose weighted
        sum is the training reward; they replace ``config.data.reward_funcs`` (and its weights) and are
        recorded there by name (fastrft.rewards.funcs). ``train_dataset``, ``eval_dataset``: rows of your
        own (a ``datasets.Dataset``, a list of dicts) with the columns ``config.data.prompt_column`` and
        ``answer_column`` (fastrft.data.custom); the run's dataset is then "custom". ``sampler``: a function
        given the run's :class:`fastrft.loop.rollout.Sampler` that returns what the rounds sample through, a
        callable ``(round, prompt ids) -> Rollouts`` (the sampler itself, a wrapper that records or replays
        rollouts, or your own). ``compute_metrics``: a function called at every evaluation with the test
        completions, answers and dataset columns, whose dict of floats is logged as ``eval_<name>``
        (fastrft.metrics_hook; it replaces ``config.eval.eval_metrics`` and is recorded there by name).

        The run directory is locked (fastrft.lock) from here until :meth:`run` returns, or :meth:`close`:
        a second process on it is refused with the name of this one, and writes nothing."""
        self._lock = None
        try:
            self._build(config, force, base_eval_cache, reward_funcs, reward_weights, train_dataset, eval_dataset,
                        sampler, compute_metrics)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the run directory's lock (a run that failed to start leaves no empty directory)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _build(self, config, force, base_eval_cache, reward_funcs, reward_weights, train_dataset, eval_dataset,
               sampler, compute_metrics):
        # 0. What only Python can pass (functions, rows) is folded into the config, which records it.
        config, given = inputs.with_reward_funcs(config, reward_funcs, reward_weights)
        config, hook = inputs.with_metrics_hook(config, compute_metrics)
        config, rows = inputs.with_rows(config, train_dataset, eval_dataset)
        # 1. Under torchrun each rank joins the job here and takes its device; a plain process is world size 1.
        self.world, self.device = init_world(_resolve_device(config.model.device), config.run.dist_timeout)
        if self.world.distributed and self.world.main:
            print(f"fastrft: torchrun job of {self.world.size} rank{'s' if self.world.size > 1 else ''}, backend "
                  f"{torch.distributed.get_backend()}, rank 0 on {self.device}", file=sys.stderr)
        # 2. auto is resolved before the run directory is compared, so config.json records what ran and a
        # resume on hardware that resolves it differently is refused with the diff.
        precision = resolve_precision(config.model.precision, self.device)
        if precision != config.model.precision:
            config = config.replace(model=dataclasses.replace(config.model, precision=precision))
        check_sinks(config)
        self.cfg = config
        self.reward_funcs = resolve_rewards(config.data.reward_funcs, config.data.reward_weights, given)
        run = config.run
        self.out_dir = Path(run.out) if run.out else Path("runs") / f"{run.name}-{rundir.stamp()}"
        rundir.check_writable(self.out_dir)
        self._take_lock()
        existing = rundir.existing_run(self.out_dir, config.to_dict(), force)
        self.world.barrier()  # every rank has read the run directory before rank 0 writes into it
        self._progress = run.progress and self.world.main
        if run.threads:
            torch.set_num_threads(run.threads)
        torch.manual_seed(run.seed)
        # 3. The model: precision.master is what the optimizer steps, checkpoints hold and export writes;
        # its compute copy (the same model unless bf16-mixed) trains, decodes and evaluates.
        self.tokenizer = load_tokenizer(config.model.model)
        model = load_policy(config, precision, self.device)
        # Under torchrun a full fine-tune shards (FSDP2); a LoRA run replicates its small adapters.
        self.precision = (Precision(model, precision) if not self.world.distributed
                          else ReplicatedPrecision(model, precision, self.world) if config.model.lora_rank
                          else ShardedPrecision(model, precision, self.world))
        if config.model.activation_checkpointing:
            _enable_checkpointing(self.precision.train_model)
        # The backend every module that samples or trains computes with (fastrft.models.ops): the exact
        # mode's batch-invariant ops where --exact-logprobs asks for them and this machine honours them.
        p = self.precision
        self.ops = exact.choose(config, self.device, precision, [p.master, p.train_model, p.rollout_model],
                                p.compute_dtype, notify=self.world.main)
        warn_unabsorbed_updates(self.precision, config.optim.lr)
        # 4. The learner's parts, then the engine, which holds the rollout model itself (rollouts always
        # see the current weights) and packs its prefill steps within the step's token budget. Every
        # generation goes through the split engine: each rank generates its share of a call's requests.
        budget = token_budget(config, self.precision, self.device, self.world)
        ref = reference_model(self.precision, config)
        ro = config.rollout
        self.engine = Engine(self.precision.rollout_model, self.tokenizer, EngineConfig(
            block_size=ro.block_size, kv_cache_memory=ro.kv_cache_memory, max_num_seqs=ro.max_batch_size,
            max_num_batched_tokens=budget))
        self._gen = SplitEngine(self.engine, self.world)
        self.learner = Learner(config, self.precision, ref=ref, engine=self.engine, token_budget=budget,
                               world=self.world, device=self.device, ops=self.ops)
        self.state = RunState()
        self.complete = existing is rundir.RunDir.COMPLETE
        # 5. The data; selecting by difficulty generates, and its cache is the only file written before the
        # run directory is created (a run that fails to start leaves nothing else behind).
        self.data = TrainingData(config, self.tokenizer, rows)
        if self.data.candidates is not None:  # --difficulty: the base model's pass counts choose the pool
            self.data.select(difficulty.pass_counts(
                self.data.candidates, cfg=config, gen=self._gen, model=self.precision.rollout_model,
                encode=self.data.encode, out_dir=self.out_dir, world=self.world, progress=self._progress))
        self.data.check_lengths(self.engine.check_fits)
        # Reward functions that cannot run fail here, on one probe completion, before anything costly.
        inputs.check_rewards(self.reward_funcs, config, self.data.train_set.examples, self.tokenizer)
        # 6. config.json: the run's identity (fastrft.config.TrainConfig.record).
        self._create_run_dir(existing)
        # 7. The evaluator and the checkpoints; then, for a run that exists, its last checkpoint.
        self.evaluator = Evaluator(config, self._gen, self.precision.rollout_model, self.data.train_set,
                                   self.data.test_set, world=self.world, device=self.device,
                                   reset_prefix_cache=self.learner.reset_prefix_cache, progress=self._progress,
                                   base_eval_cache=base_eval_cache, hook=hook)
        self.checkpoints = Checkpoints(config, self.out_dir, self.learner, self.data.train_example_ids, self.world)
        self.resumed_from: int | None = None
        if existing.has_run:
            restored = self.checkpoints.restore(force or existing is rundir.RunDir.UNSTARTED,
                                                keep_base_eval=existing is rundir.RunDir.RESUME)
            if restored is not None:
                self.resumed_from, self.state = restored.round, restored
        self._clock = WallClock(self.state.wall)
        # 8. The round's stages and the run loop, built once: the loop calls the stages, never this facade.
        default = Sampler(self._gen, self.precision.rollout_model, config)
        self.sampler = default if sampler is None else sampler(default)
        self.stages = Stages(config, self.data, self.sampler, self.learner, self.reward_funcs)
        self.loop = RunLoop(config, self.out_dir, self.state, stages=self.stages, evaluator=self.evaluator,
                            checkpoints=self.checkpoints, learner=self.learner, world=self.world, clock=self._clock,
                            resumed_from=self.resumed_from)

    def _take_lock(self) -> None:
        """Rank 0 locks the run directory; every rank raises the same one line when another process has it."""
        refused = None
        if self.world.main:
            try:
                self._lock = lock.hold(self.out_dir, lock.command_line())
            except Exception as e:  # noqa: BLE001 - every rank must raise, not wait in the broadcast
                refused = str(e) if isinstance(e, ConfigError) else \
                    f"out (--out) {self.out_dir}: cannot lock it ({type(e).__name__}: {e})"
        refused = self.world.broadcast(refused)
        if refused:
            raise ConfigError(refused)

    def _create_run_dir(self, existing: rundir.RunDir) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if existing.writes_config and self.world.main:
                if existing is not rundir.RunDir.NEW:
                    (self.out_dir / "config.json").rename(self.out_dir / f"config.before-{rundir.stamp()}.json")
                (self.out_dir / "config.json").write_text(self.cfg.record_json())
        except OSError as e:
            raise ConfigError(f"out (--out) {self.out_dir}: cannot write there ({e.strerror}); choose a writable "
                              "directory") from None
        self.world.barrier()

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Train until round ``run.rounds``; return the run's summary (also written to summary.json). A run
        directory that already holds this run continues from its last checkpoint."""
        if self.complete:
            self.close()
            return json.loads((self.out_dir / "summary.json").read_text())
        self._clock.start(self.state.wall)
        recorder = (Recorder(self.cfg, self.out_dir, done=self.state.round, progress=self._progress)
                    if self.world.main else NullRecorder())
        try:
            return self.loop.run(self.data.train_example_ids, recorder)
        finally:
            self.close()

    def round(self, r: int) -> dict[str, Any]:
        """Run round ``r`` (rollouts, scores, update) outside the run loop and return its metrics record,
        unrecorded (benchmarks, tests)."""
        return train_round(self.stages, self.state, r, NullRecorder())

    def save(self) -> Path:
        """Checkpoint the end of round ``state.round``."""
        return self.loop.save()

    # ------------------------------------------------------------------ single stages (benchmarks, tests)
    def examples_for_round(self, r: int) -> tuple[list, list[list[int]]]:
        """(examples, encoded prompts) that round ``r`` trains on."""
        batch = self.data.for_round(r)
        return batch.examples, batch.prompt_ids

    def rollout(self, r: int, prompts: list[list[int]]):
        """Round ``r``'s G responses to each of ``prompts``, grouped per prompt, from the run's sampler (to
        change what the rounds train on, pass ``Trainer(..., sampler=...)``)."""
        return self.sampler(r, prompts).groups

    # ------------------------------------------------------------------ what the README documents
    @property
    def policy(self) -> torch.nn.Module:
        """The master weights: what the optimizer steps, checkpoints hold and export writes."""
        return self.precision.master

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    @property
    def ref(self):
        return self.learner.ref

    @property
    def token_budget(self) -> int | None:
        return self.learner.token_budget

    @property
    def spec(self):
        return self.cfg.loss_spec

    @property
    def train_set(self):
        return self.data.train_set

    @property
    def test_set(self):
        return self.data.test_set

    @property
    def pool(self) -> list:
        return self.data.pool

    @property
    def updates(self) -> int:
        return self.state.updates

    @property
    def skipped(self) -> int:
        return self.state.skipped


def _enable_checkpointing(model) -> None:
    if not getattr(model, "supports_activation_checkpointing", False):
        raise ConfigError(f"activation_checkpointing (--activation-checkpointing): {type(model).__name__} cannot "
                          "recompute its layers in the backward (it has no per-layer packed forward to "
                          "checkpoint); drop the flag, or lower --max-tokens-per-step to bound memory instead")
    model.activation_checkpointing = True


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device (--device) {name!r} was requested but CUDA is not available; use --device cpu")
    return torch.device(name)
