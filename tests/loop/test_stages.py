"""The round's stages on their typed inputs, without a model or a Trainer: the sampler, scoring with each
baseline source, the hand-off to the update, the round's metrics, and the round itself over stand-in
stages (docs/architecture.md, "The round")."""

from __future__ import annotations

import pytest

from fastrft.config import AlgoConfig, RolloutConfig, TrainConfig
from fastrft.data import Example
from fastrft.engine import Completion
from fastrft.loop import seeds
from fastrft.loop.metrics import rollout_metrics
from fastrft.loop.recorder import NullRecorder
from fastrft.loop.rollout import Sampler
from fastrft.loop.round import Stages, train_round
from fastrft.loop.scoring import score
from fastrft.loop.types import Rollouts, RoundBatch, RunState, Scores, TrainBatch, UpdateResult

EXAMPLES = [Example(f"arithmetic/add1/{i}", f"What is {i} + 1?", str(i + 1), "arithmetic") for i in range(2)]


def _said(text: str, finish: str = "stop") -> Completion:
    return Completion(token_ids=list(range(len(text))), logprobs=[-0.5] * len(text), finish_reason=finish, text=text)


def _batch(r: int = 1) -> RoundBatch:
    return RoundBatch(r, EXAMPLES, [[2, 5], [2, 6, 7]])


class FakeGen:
    """Records generate() calls; answers with the right answer on odd samples."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, *, n, seed, **kw):
        self.calls.append((len(prompt_ids), n, seed))
        return [[_said(f"{i + 1}" if j % 2 else "no") for j in range(n)] for i in range(len(prompt_ids))]


class FakeModel:
    def eval(self):
        return self


@pytest.mark.parametrize("advantage,extra", [("grpo", 0), ("window", 0), ("extra_samples", 3)])
def test_the_sampler_draws_the_groups_and_what_the_baseline_asks_for(advantage, extra):
    cfg = TrainConfig(rollout=RolloutConfig(group_size=4),
                      algo=AlgoConfig(advantage=advantage, extra_samples=max(extra, 2), window=8))
    gen = FakeGen()
    out = Sampler(gen, FakeModel(), cfg)(3, _batch().prompt_ids)
    assert [len(g) for g in out.groups] == [4, 4]
    assert (out.extra is None) == (extra == 0)
    want = [(2, 4, seeds.generation_seed(cfg.run.seed, 3, seeds.ROLLOUT))]
    if extra:
        assert [len(g) for g in out.extra] == [3, 3]
        want.append((2, 3, seeds.generation_seed(cfg.run.seed, 3, seeds.EXTRA_SAMPLES)))
    assert gen.calls == want


def test_scoring_with_each_baseline_source():
    groups = [[_said("1"), _said("no")], [_said("2"), _said("2")]]
    rollouts = Rollouts(groups)
    # The group itself (grpo): the first group has signal, the second (all correct) has none.
    s = score(_batch(), rollouts, AlgoConfig(advantage="grpo"), {})
    assert s.correct == [1.0, 0.0, 1.0, 1.0] and s.baselines == []
    assert s.advantages[0][0] > 0 > s.advantages[0][1] and s.advantages[1] == [0.0, 0.0]
    # The window: this round's rewards join the example's history, which the advantages are taken against.
    history = {EXAMPLES[1].id: [0.0, 0.0]}
    s = score(_batch(), rollouts, AlgoConfig(advantage="window", window=3), history)
    assert history[EXAMPLES[1].id] == [0.0, 1.0, 1.0] and s.baselines[1] == [0.0, 1.0, 1.0]
    assert s.advantages[1][0] > 0
    # Extra samples: scored against, never trained on.
    extra = Rollouts(groups, extra=[[_said("no"), _said("no")], [_said("2"), _said("no")]])
    s = score(_batch(), extra, AlgoConfig(advantage="extra_samples", extra_samples=2), {})
    assert s.baselines == [[0.0, 0.0], [1.0, 0.0]] and len(s.correct) == 4


def test_the_hand_off_to_the_update_and_the_rounds_metrics():
    rollouts = Rollouts([[_said("1"), _said("no", "length")], [_said("22")]])
    scores = Scores(correct=[1.0, 0.0, 0.0], rewards=[1.0, 0.0, 0.0], advantages=[[0.5, -0.5], [0.0]])
    train = TrainBatch.of(_batch(), rollouts, scores)
    assert train.prompts == [[2, 5], [2, 5], [2, 6, 7]] and train.advantages == [0.5, -0.5, 0.0]
    assert train.packed_lengths() == [2, 3, 4]
    assert [c.text for c in train.select([2, 0]).completions] == ["22", "1"]
    m = rollout_metrics(_batch(4), rollouts, scores)
    assert m["round"] == 4 and m["examples"] == [x.id for x in EXAMPLES] and m["kind"] == "round"


class FakeLearner:
    def __init__(self):
        self.calls = []

    def update(self, r, train, first_update):
        self.calls.append((r, len(train), first_update))
        return UpdateResult(steps=[{"loss": 1.0}, {"loss": 2.0}], record={"loss": 1.5, "optimizer_steps": 2})


class FakeData:
    def for_round(self, r):
        return _batch(r)


@pytest.mark.parametrize("answers,trained", [(["1", "no", "2", "x"], True), (["no", "no", "x", "x"], False)])
def test_the_round_updates_only_with_a_signal_and_counts_the_learners_steps(answers, trained):
    cfg = TrainConfig(rollout=RolloutConfig(group_size=2),
                      algo=AlgoConfig(advantage="grpo", kl_coef=0.0, entropy_coef=0.0))

    def sample(r, prompt_ids):
        it = iter(answers)
        return Rollouts([[_said(next(it)) for _ in range(2)] for _ in prompt_ids])

    learner, state = FakeLearner(), RunState(updates=5)
    record = train_round(Stages(cfg, FakeData(), sample, learner), state, 3, NullRecorder())
    assert record["skipped"] == (0 if trained else 1)
    assert learner.calls == ([(3, 4, 5)] if trained else [])
    assert state.updates == (7 if trained else 5) and state.skipped == (0 if trained else 1)
    assert ("optimizer_steps" in record) == trained
