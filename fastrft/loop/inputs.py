"""What a run takes besides its config: rows and reward functions passed from Python, folded into the
config that records them; and the check that the reward functions can run, made before the base
evaluation so that a function that cannot run at all costs one line and no work.
"""

from __future__ import annotations

import dataclasses

from fastrft.config import TrainConfig
from fastrft.errors import ConfigError
from fastrft.rewards import calling
from fastrft.rewards import funcs as reward_funcs


def with_rows(config: TrainConfig, train, test) -> tuple[TrainConfig, dict | None]:
    """``config`` with dataset "custom" when rows were passed from Python, and those rows by split."""
    if train is None:
        if test is not None:
            raise ConfigError("eval_dataset (Trainer argument) needs a train_dataset as well")
        return config, None
    rows = {"train": list(train), **({"test": list(test)} if test is not None else {})}
    data = dataclasses.replace(config.data, dataset="custom", train_file=None, test_file=None)
    return config.replace(data=data), rows


def with_metrics_hook(config: TrainConfig, fn) -> tuple[TrainConfig, tuple | None]:
    """``config`` recording the metrics hook (``compute_metrics``, else ``--eval-metrics``) by name, and the
    hook's (name, function) (fastrft.metrics_hook)."""
    from fastrft import metrics_hook

    spec, target = metrics_hook.resolve(config.eval.eval_metrics, fn)
    if target is None:
        return config, None
    return config.replace(eval=dataclasses.replace(config.eval, eval_metrics=spec)), (spec, target)


def with_reward_funcs(config: TrainConfig, funcs: list | None,
                       weights: list[float] | None) -> tuple[TrainConfig, list | None]:
    """``config`` recording ``funcs`` (callables or names) in data.reward_funcs, and the callables."""
    from fastrft.rewards.funcs import load, spec_of

    if funcs is None:
        if weights is not None:
            raise ConfigError("reward_weights (Trainer argument) needs reward_funcs as well")
        return config, None
    if not isinstance(funcs, (list, tuple)) or not funcs:
        raise ConfigError("reward_funcs (Trainer argument) must be a non-empty list of functions or names")
    specs = [f if isinstance(f, str) else spec_of(f) for f in funcs]
    bad = [f for f in funcs if not isinstance(f, str) and not callable(f)]
    if bad:
        raise ConfigError(f"reward_funcs (Trainer argument): {bad[0]!r} is neither a function nor a name")
    weights = tuple(float(w) for w in weights) if weights is not None else config.data.reward_weights
    data = dataclasses.replace(config.data, reward_funcs=tuple(specs), reward_weights=weights)  # validated
    return config.replace(data=data), [load(f) if isinstance(f, str) else f for f in funcs]


def check_rewards(funcs: list, config: TrainConfig, examples: list, tokenizer) -> None:
    """Call the correctness reward, and refuse a batched function that requires a column the loaded
    dataset lacks, then call every function once, on one probe completion (the first training example's
    reference answer), so that one that cannot run fails now, with one line, rather than in round 1
    after the base evaluation."""
    if not examples:
        return
    from fastrft import rewards

    probe = examples[0]
    try:  # the correctness reward (--reward, or the dataset's own), which the base evaluation calls
        rewards.score(probe.reward, probe.answer, probe.answer)
    except calling.RewardError as e:
        raise calling.RewardError(f"{e} [found before the run started, on a probe: example {probe.id}'s reference "
                                  "answer as the response]") from None
    if not funcs:
        return
    columns = {k for ex in examples for k in ex.meta} - {"prompt_messages"}
    for f in funcs:
        reward_funcs.check(f.spec, f.fn, config.data, columns | {config.data.answer_column})
    text = probe.answer
    ids = tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None else []
    from fastrft.loop.round import max_steps, reward_view

    try:
        with calling.quiet():
            reward_funcs.score(funcs, [text], [probe], [ids], calling.Progress(max_steps=max_steps(config),
                                                                               **reward_view(config)))
    except calling.RewardError as e:
        raise calling.RewardError(f"{e} [found before the run started, on a probe: example {probe.id}'s reference "
                                  "answer as the completion]") from None
