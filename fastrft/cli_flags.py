"""The config flags of ``fastrft train``, ``demo`` and ``ladder``: one flag per config field
(``--field-name``, help text from the field), their parsing, and the config they build. Generated from
the config dataclasses, so the CLI can never drift from the Python API.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from fastrft.config import (ALIASES, GROUPS, LEGACY_DTYPES, PRECISIONS, ModelConfig, TrainConfig, build_group,
                            canonical, flag)
from fastrft.errors import ConfigError, read_json_object

_UNSET = object()


def _parse_optional(inner):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else _convert(inner, text, text)

    return parse


def _parse_tuple(inner):
    def parse(text: str):
        return tuple(_convert(inner, x.strip(), text) for x in text.split(",") if x.strip())

    return parse


_KINDS = {int: "an integer", float: "a number", str: "text"}


def _convert(inner, item: str, whole: str):
    """``inner(item)``; an item it refuses is named, with the expected kind (not argparse's "invalid parse
    value")."""
    if isinstance(inner, type) and inner in _KINDS:
        try:
            return inner(item)
        except ValueError:
            where = f" (in {whole!r})" if whole != item else ""
            many = "; give comma-separated values, e.g. 3,17" if whole != item or "," in whole else ""
            raise argparse.ArgumentTypeError(f"{item!r}{where} is not {_KINDS[inner]}{many}") from None
    return inner(item)


def _converter(tp: Any):
    """argparse ``type=`` for a dataclass field annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        return _parse_tuple(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)][0]
        return _parse_optional(_converter(inner))
    return tp


#: What ``fastrft ladder`` does with a flag instead of the train default, for its --help.
LADDER_HELP = {
    ("run", "out"): "the study's directory (default: runs/ladder-<profile>)",
    ("run", "seed"): "the study's first seed: its runs use seeds S, S+1, ..., S + --seeds - 1 (default: 0)",
    ("run", "name"): "not accepted by the ladder: each run is named <preset>/seed-<s>",
}


def add_config_flags(parser: argparse.ArgumentParser, ladder: bool = False) -> None:
    """One flag per config field. ``ladder``: say where the ladder's values come from instead of the train
    defaults (the profile and the presets set many fields; --out, --seed and --name mean other things)."""
    from fastrft.presets import fields_set_by_presets

    preset_fields = fields_set_by_presets() if ladder else set()
    for group_name, cls in GROUPS.items():
        group = parser.add_argument_group(group_name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            text = f"{f.metadata.get('help', '')} (default: {f.metadata.get('shown', shown)})"
            if (group_name, f.name) in LADDER_HELP and ladder:
                text = LADDER_HELP[group_name, f.name]
            elif (group_name, f.name) in preset_fields:
                text = f"{f.metadata.get('help', '')} (default: set by --profile and the preset)"
            kwargs: dict[str, Any] = dict(dest=f"{group_name}.{f.name}", default=_UNSET, help=text)
            if hints[f.name] is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _converter(hints[f.name])
                kwargs["metavar"] = f.name.upper()
            group.add_argument(flag(f.name), **kwargs)
        for (section, old), new in ALIASES.items():
            if section == group_name:
                group.add_argument(flag(old), dest=f"{group_name}.{old}", default=_UNSET, type=int, metavar=new.upper(),
                                   help=f"the old name of {flag(new)}")
        if cls is ModelConfig:
            group.add_argument("--dtype", dest="model.precision", default=_UNSET, type=_legacy_dtype,
                               metavar="DTYPE", help="older spelling of --precision: float32 | bfloat16 | float16 "
                                                     "= fp32 | bf16 | fp16")


def _legacy_dtype(text: str) -> str:
    if text not in LEGACY_DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(LEGACY_DTYPES)} (or use --precision "
                                         f"{' | '.join(PRECISIONS)})")
    return LEGACY_DTYPES[text]


def flag_values(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The config fields given on the command line, by section."""
    values: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not _UNSET:
            group, name = dest.split(".", 1)
            values.setdefault(group, {})[name] = value
    # An old flag name sets its field; both spellings with different values are refused (config.canonical).
    return {group: canonical(group, given) for group, given in values.items()}


def config_from_args(args: argparse.Namespace, base: TrainConfig, *layers: dict[str, dict[str, Any]]) -> TrainConfig:
    """Overlay ``layers`` (profile, preset) and then the flags given on the command line onto ``base``;
    validation happens on construction."""
    from fastrft.presets import overlay

    values = overlay(base.to_dict(), *layers, flag_values(args))
    return TrainConfig(**{g: build_group(GROUPS[g], v, g) for g, v in values.items()})


def load_config_file(path: str) -> TrainConfig:
    data = read_json_object(path, ConfigError, " (--config expects a run's config.json or a file like it)")
    return TrainConfig.from_dict(data)
