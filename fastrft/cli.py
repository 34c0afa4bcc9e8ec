"""Command line: ``fastrft train | demo | plot``.

The flags of ``train`` and ``demo`` are generated from the config dataclasses (one flag per field,
``--field-name``, help text from the field), so the CLI can never drift from the Python API. A flag
left out keeps the base config's value: the defaults for ``train`` (or a ``--config`` JSON file), the
demo preset for ``demo``. Errors a user can fix print one line, without a traceback, and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from fastrft.config import GROUPS, TrainConfig, build_group, flag
from fastrft.errors import ConfigError, FastRFTError, read_json_object

_UNSET = object()


def _parse_optional(inner):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else inner(text)

    return parse


def _parse_tuple(inner):
    def parse(text: str):
        return tuple(inner(x.strip()) for x in text.split(",") if x.strip())

    return parse


def _converter(tp: Any):
    """argparse ``type=`` for a dataclass field annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        return _parse_tuple(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        inner = [a for a in args if a is not type(None)][0]
        return _parse_optional(_converter(inner))
    return tp


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    for group_name, cls in GROUPS.items():
        group = parser.add_argument_group(group_name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            kwargs: dict[str, Any] = dict(dest=f"{group_name}.{f.name}", default=_UNSET,
                                          help=f"{f.metadata.get('help', '')} (default: {shown})")
            if hints[f.name] is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = _converter(hints[f.name])
                kwargs["metavar"] = f.name.upper()
            group.add_argument(flag(f.name), **kwargs)


def config_from_args(args: argparse.Namespace, base: TrainConfig) -> TrainConfig:
    """Overlay the flags given on the command line onto ``base``; validation happens on construction."""
    values = base.to_dict()
    for dest, value in vars(args).items():
        if "." in dest and value is not _UNSET:
            group, name = dest.split(".", 1)
            values[group][name] = value
    return TrainConfig(**{g: build_group(GROUPS[g], v, g) for g, v in values.items()})


def load_config_file(path: str) -> TrainConfig:
    data = read_json_object(path, ConfigError, " (--config expects a run's config.json or a file like it)")
    return TrainConfig.from_dict(data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastrft", description="Reinforcement fine-tuning of LLMs, bottom-up.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with any configuration (flags override --config or defaults)")
    train.add_argument("--config", help="a JSON file of config sections (as written to a run's config.json)")
    add_config_flags(train)
    demo = sub.add_parser("demo", help="the minimalist layer on SmolLM2-135M-Instruct, CPU-sized (~5 min)")
    add_config_flags(demo)
    plot = sub.add_parser("plot", help="redraw curves.png and print the table of a run directory")
    plot.add_argument("run_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plot":
            return _plot(Path(args.run_dir))
        from fastrft.demo import demo_config, run_demo

        if args.command == "demo":
            return run_demo(config_from_args(args, demo_config()))
        base = load_config_file(args.config) if args.config else TrainConfig()
        return _train(config_from_args(args, base))
    except FastRFTError as e:
        print(f"fastrft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastrft: interrupted; every completed round is in the run's metrics.jsonl", file=sys.stderr)
        return 130


def _train(config: TrainConfig) -> int:
    from fastrft.trainer import Trainer

    summary = Trainer(config).run()
    print(summary["table"])
    print(f"\nrun directory: {summary['out_dir']}  (plot: {summary['plot']})")
    return 0


def _plot(run_dir: Path) -> int:
    from fastrft.report import before_after_table, plot_curves, read_metrics

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FastRFTError(f"{path}: not found; pass a run directory written by fastrft train")
    try:
        records = read_metrics(path)
    except ValueError as e:
        raise FastRFTError(str(e)) from None
    print(before_after_table(records))
    print(f"\nplot: {plot_curves(records, run_dir / 'curves.png', title=run_dir.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
