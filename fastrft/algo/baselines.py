"""Where an advantage estimator's baseline rewards come from, one object per source.

An estimator (:data:`fastrft.algo.ADVANTAGES`) names its baseline. The baseline owns what differs between
sources: the config it needs (:meth:`Baseline.check`), the responses drawn for it alone
(:meth:`Baseline.extra_samples`, which the sampler draws) and the reference rewards a group's advantages
are taken against (:meth:`Baseline.reference`). Adding a source is a subclass here and an estimator row.
"""

from __future__ import annotations

import torch

from fastrft.errors import ConfigError


class Baseline:
    """The group itself (grpo, rloo, dr_grpo, none): nothing from outside the group."""

    name = "group"

    def check(self, cfg) -> None:
        """Raise ConfigError where ``cfg`` (a TrainConfig) cannot serve this baseline."""

    def extra_samples(self, algo) -> int:
        """Responses per prompt drawn only for the baseline, scored and never trained on (0: none)."""
        return 0

    def reference(self, example_id: str, rewards: list[float], extra: list[float] | None,
                  history: dict[str, list[float]], algo) -> torch.Tensor | None:
        """The rewards the group's advantages are taken against (None: the group's own). ``rewards``: the
        group's scorable rewards; ``extra``: the scorable rewards of its extra samples; ``history``: the run's
        per-example reward record (run state, checkpointed)."""
        return None


class WindowBaseline(Baseline):
    """The example's last ``window`` rewards over all rounds so far, this round's included."""

    name = "window"

    def check(self, cfg) -> None:
        if cfg.algo.window < cfg.rollout.group_size:
            raise ConfigError(f"window (--window) {cfg.algo.window} is smaller than group_size (--group-size) "
                              f"{cfg.rollout.group_size}: the window must hold at least one round's rewards")

    def reference(self, example_id, rewards, extra, history, algo):
        hist = history.setdefault(example_id, [])
        hist.extend(rewards)
        del hist[:-algo.window]
        return torch.tensor(hist)


class ExtraSamplesBaseline(Baseline):
    """The rewards of M extra responses to the example, drawn this round only for the baseline."""

    name = "extra"

    def check(self, cfg) -> None:
        if cfg.algo.extra_samples > cfg.rollout.max_batch_size:
            raise ConfigError(f"extra_samples (--extra-samples) {cfg.algo.extra_samples} exceeds max_batch_size "
                              f"(--max-batch-size) {cfg.rollout.max_batch_size}")

    def extra_samples(self, algo) -> int:
        return algo.extra_samples

    def reference(self, example_id, rewards, extra, history, algo):
        return torch.tensor(extra)


GROUP, WINDOW, EXTRA = Baseline(), WindowBaseline(), ExtraSamplesBaseline()
