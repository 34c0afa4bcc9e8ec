"""The paper's bottom-up ladder as named presets, and the profiles that size a study for a machine.

Every preset is ONE design choice away from ``L0-minimal`` (the paper's minimalist layer), written as the config fields
it sets; everything else is the paper's setting, which is what :class:`fastrft.config.TrainConfig`'s
defaults are. A profile rescales a study to a machine (learning rate, response budget, evaluation
size, rounds) without touching any design choice; flags given on the command line override both.

Resolution order, lowest first: TrainConfig defaults (or a --config file) < profile < preset < flags.

A preset's ``choice`` is a template over the config (``{rollout.group_size}``), so that a table states the
values a run used, whatever the profile or a flag changed: :meth:`Preset.choice_text`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from fastrft.config import TrainConfig
from fastrft.errors import ConfigError


@dataclass(frozen=True, eq=False)
class Preset:
    name: str
    layer: str
    choice: str  # the design choice, in words; {section.field} and the names of _derived() are filled in
    overrides: dict[str, dict[str, Any]]

    def choice_text(self, values: dict[str, dict[str, Any]]) -> str:
        """The choice with the numbers of ``values`` (a resolved config as sections of fields, e.g.
        ``TrainConfig.to_dict()``): the settings the runs used, never ones they did not."""
        sections = {s: SimpleNamespace(**fields) for s, fields in values.items()}
        return self.choice.format_map({**sections, **_derived(values)})


def _derived(values: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Words for the choices that span fields (the choice templates name them {examples}, {clip}, {kl})."""
    data, algo = values["data"], values["algo"]
    if data["examples_per_round"]:
        examples = f"{data['examples_per_round']} examples per round"
    else:
        n = data["difficulty_count"] if data["difficulty"] else len(data["example_index"])
        examples = "1 example" if n == 1 else f"{n} examples"
    clip = f"{algo['clip_low']:g}" + ("" if algo["clip_high"] == algo["clip_low"] else f"/{algo['clip_high']:g}")
    kl = f"KL {algo['kl_coef']:g} ({algo['kl_estimator']})" if algo["kl_coef"] else "no KL"
    return {"examples": examples, "clip": clip, "kl": kl}


# The minimalist layer, spelled out (equal to the defaults; written here so the table reads on its own).
L0_FIELDS: dict[str, dict[str, Any]] = {
    "data": {"examples_per_round": 0, "difficulty": None},
    "rollout": {"group_size": 1, "temperature": 1.0, "max_new_tokens": 1024},
    "algo": {"advantage": "none", "reward_fail": 0.0, "reward_success": 1.0, "clip_low": 0.2, "clip_high": 0.2,
             "kl_coef": 0.001, "kl_estimator": "k3"},
    "optim": {"lr": 1e-6},
}

# The learning rate is left out of the choices on purpose: a profile sizes it for the machine (see PROFILES),
# and the study's header states the value used.
_TABLE = [
    Preset("L0-minimal", "L0", "{examples}, G = {rollout.group_size}, reward {{{algo.reward_fail:g},"
           "{algo.reward_success:g}}} as the signal, clip {clip}, {kl}", {}),
    Preset("L1-advantage", "L1", "+ advantage: mean/std over the example's last {algo.window} rewards (window "
           "baseline)", {"algo": {"advantage": "window", "window": 8}}),
    Preset("L1-advantage-extra", "L1", "+ advantage: mean/std of {algo.extra_samples} extra samples not trained on",
           {"algo": {"advantage": "extra_samples", "extra_samples": 4}}),
    *[Preset(f"L2-rollouts-{g}", "L2", "G = {rollout.group_size} rollouts per round", {"rollout": {"group_size": g}})
      for g in (2, 4, 8, 16)],
    Preset("L3-negative-reward", "L3", "reward {{{algo.reward_fail:g},+{algo.reward_success:g}}}: failures are "
           "pushed down", {"algo": {"reward_fail": -1.0}}),
    Preset("L4-hard-example", "L4", "an example the base model never solves (0 of {data.difficulty_samples} samples)",
           {"data": {"difficulty": "hard"}}),
    Preset("L5-batch", "L5", "{data.examples_per_round} examples per round drawn from the training pool",
           {"data": {"examples_per_round": 8}}),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _TABLE}

#: A layer name (or the spec's short names) stands for its primary preset.
ALIASES: dict[str, str] = {"L0": "L0-minimal", "L1": "L1-advantage", "L2": "L2-rollouts-4", "L2-rollouts": "L2-rollouts-4",
                           "L3": "L3-negative-reward", "L4": "L4-hard-example", "L5": "L5-batch"}

#: Profiles: machine sizing, never a design choice.
#: What --profile auto picks (fastrft.cli resolves it: it needs the device and the model).
AUTO_PROFILE = "cpu-mini on a CPU with the embedded model, else paper; the default of fastrft ladder"

PROFILES: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "paper": ("the paper's setting: lr 1e-6, responses <= 1024 tokens, evaluation every 100 rounds", {}),
    "cpu-mini": (
        "SmolLM2-135M on a 2-core CPU: 'What is 8 + 3?' (arithmetic add1), lr 2e-5, responses <= 96 tokens "
        "(a cut-off response scores 0), 60 rounds, evaluation every 15 rounds on the 80 other sums",
        {"data": {"dataset": "arithmetic", "level": "add1", "example_index": (65,), "train_pool": 40,
                  "difficulty_candidates": 40},
         "rollout": {"max_new_tokens": 96},
         "algo": {"fail_truncated": True},
         "optim": {"lr": 2e-5},
         "eval": {"eval_every": 15, "train_samples": 16, "test_size": None, "greedy": False},
         "run": {"rounds": 60, "save_every": 15, "keep_checkpoints": 1}},
    ),
}


def resolve(name: str) -> Preset:
    """A preset by its name or its layer's short name; an unknown name lists the valid ones."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ConfigError(f"unknown preset or layer {name!r}; valid presets: {', '.join(PRESETS)}; "
                          f"layer names: {', '.join(sorted(ALIASES))}")
    return PRESETS[key]


def profile(name: str) -> dict[str, dict[str, Any]]:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r} (--profile); choose one of: {', '.join(PROFILES)}, or auto "
                          f"({AUTO_PROFILE})")
    return PROFILES[name][1]


def fields_set_by_presets() -> set[tuple[str, str]]:
    """(section, field) of every field L0, a profile or a preset sets: their ladder value is not the
    train default."""
    layers = [L0_FIELDS, *(fields for _, fields in PROFILES.values()), *(p.overrides for p in PRESETS.values())]
    return {(section, name) for layer in layers for section, fields in layer.items() for name in fields}


def overlay(values: dict[str, dict[str, Any]], *layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Config dict ``values`` with each layer's fields written over it, in order (a new dict)."""
    out = {k: dict(v) for k, v in values.items()}
    for layer in layers:
        for section, fields in layer.items():
            out.setdefault(section, {}).update(fields)
    return out


def describe() -> str:
    """The table ``fastrft presets`` prints, each choice worded with the paper's values."""
    paper = overlay(TrainConfig().to_dict(), L0_FIELDS)
    rows = ["| preset | layer | what it changes from L0-minimal | fields |", "|---|---|---|---|"]
    for p in _TABLE:
        fields = ", ".join(f"{s}.{k}={v}" for s, kv in p.overrides.items() for k, v in kv.items()) or "–"
        rows.append(f"| {p.name} | {p.layer} | {p.choice_text(overlay(paper, p.overrides))} | {fields} |")
    aliases = ", ".join(f"{a} = {t}" for a, t in ALIASES.items())
    profiles = "\n".join([*(f"- {n}: {d}" for n, (d, _) in PROFILES.items()), f"- auto: {AUTO_PROFILE}"])
    return "\n".join(rows) + f"\n\nShort names: {aliases}.\n\nProfiles (--profile), machine sizing only:\n{profiles}"
