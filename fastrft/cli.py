"""Command line: ``fastrft train | ladder | presets | export | demo | plot``.

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

from fastrft.config import GROUPS, LEGACY_DTYPES, PRECISIONS, ModelConfig, TrainConfig, build_group, flag
from fastrft.errors import ConfigError, FastRFTError, read_json_object

_UNSET = object()


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, naming the flag, with where to read more (not the 50-line usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parse_optional(inner):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else inner(text)

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
    return values


def config_from_args(args: argparse.Namespace, base: TrainConfig, *layers: dict[str, dict[str, Any]]) -> TrainConfig:
    """Overlay ``layers`` (profile, preset) and then the flags given on the command line onto ``base``;
    validation happens on construction."""
    from fastrft.presets import overlay

    values = overlay(base.to_dict(), *layers, flag_values(args))
    return TrainConfig(**{g: build_group(GROUPS[g], v, g) for g, v in values.items()})


def load_config_file(path: str) -> TrainConfig:
    data = read_json_object(path, ConfigError, " (--config expects a run's config.json or a file like it)")
    return TrainConfig.from_dict(data)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastrft", description="Reinforcement fine-tuning of LLMs, bottom-up.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train with any configuration (flags override --preset, --profile, "
                                         "--config and the defaults, in that order)")
    train.add_argument("--config", help="a JSON file of config sections (as written to a run's config.json)")
    train.add_argument("--preset", help="a layer preset, e.g. L0-minimal or L3 (see fastrft presets)")
    train.add_argument("--profile", default="paper", help="machine sizing: paper (default) | cpu-mini | auto "
                                                          "(cpu-mini on CPU with the embedded model, else paper)")
    train.add_argument("--force", action="store_true", help="resume into --out even if its config differs")
    add_config_flags(train)
    ladder = sub.add_parser("ladder", help="run every (layer, seed) pair of a bottom-up study; writes "
                                           "ladder.md and curves.png; a rerun resumes")
    ladder.add_argument("--layers", default="L0,L1,L2,L3,L4", help="presets or layer names, comma-separated "
                                                                   "(default: L0,L1,L2,L3,L4)")
    ladder.add_argument("--seeds", type=int, default=3, help="seeds per layer (default: 3)")
    ladder.add_argument("--profile", default="auto", help="auto (cpu-mini on CPU with the embedded model, else "
                                                          "paper) | paper | cpu-mini")
    ladder.add_argument("--config", help="a JSON file of config sections, the base of every run")
    ladder.add_argument("--force", action="store_true", help="continue a study whose settings differ")
    ladder.add_argument("--keep-models", action="store_true", help="keep each finished run's checkpoints "
                                                                         "(for fastrft export)")
    ladder.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="run up to N pairs at once, each in its own process with cores // N torch threads "
                             "(on CUDA: the visible GPUs in turn), its output in <run dir>/job.log; the results "
                             "of --jobs 1, bit for bit with the same --threads (default: 1, one pair after "
                             "another in this process)")
    add_config_flags(ladder, ladder=True)
    sub.add_parser("presets", help="list the layer presets and profiles")
    export = sub.add_parser("export", help="write a run's newest checkpoint as an HF-format model directory")
    export.add_argument("run_dir")
    export.add_argument("--out", required=True, help="new directory for config.json, model.safetensors, tokenizer")
    demo = sub.add_parser("demo", help="the minimalist layer on SmolLM2-135M-Instruct, sized for 2 CPU cores (2-3 min "
                                      "of compute)")
    add_config_flags(demo)
    plot = sub.add_parser("plot", help="redraw a run's curves.png and print its table; with several run "
                                       "directories, overlay them")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", help="PNG of the overlay (default: overlay.png in the current directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "ladder":
        # A fresh process (the command line) has multiplied no matrices yet, so MKL's reproducibility mode
        # still takes effect here, and the --jobs children inherit it (fastrft.ladder_jobs). A caller of
        # main([...]) may have used MKL already: it keeps its mode, and so do its children.
        from fastrft.ladder_jobs import thread_independent_blas

        thread_independent_blas()
    try:
        if args.command == "plot":
            return _plot([Path(d) for d in args.run_dirs], args.out)
        if args.command == "presets":
            from fastrft.presets import describe

            print(describe())
            return 0
        if args.command == "export":
            from fastrft.checkpoint import export_run

            print(f"exported: {export_run(args.run_dir, args.out)}")
            return 0
        if args.command == "ladder":
            return _ladder(args)
        from fastrft.demo import demo_config, run_demo

        if args.command == "demo":
            return run_demo(config_from_args(args, demo_config()))
        from fastrft import presets

        base = load_config_file(args.config) if args.config else TrainConfig()
        profile = _resolve_profile(args.profile, flag_values(args), base, "fastrft train")
        layers = [presets.L0_FIELDS, presets.profile(profile)] if args.preset else [presets.profile(profile)]
        if args.preset:
            layers.append(presets.resolve(args.preset).overrides)
        return _train(config_from_args(args, base, *layers), force=args.force)
    except FastRFTError as e:
        print(f"fastrft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from fastrft.interrupt import RunInterrupted

        if isinstance(e, RunInterrupted):
            print(f"fastrft: {e}", file=sys.stderr)
            return e.exit_code
        print(f"fastrft: {e or 'aborted; rerun the same command to continue from the last checkpoint'}",
              file=sys.stderr)
        return 130


def _resolve_profile(profile: str, flags: dict[str, dict[str, Any]], base: TrainConfig, command: str) -> str:
    """``auto``: cpu-mini on a CPU with the embedded model, else paper (said on stderr); others as given."""
    if profile != "auto":
        return profile
    from fastrft.models.embedded import DEFAULT_MODEL

    model = flags.get("model", {}).get("model", base.model.model)
    device = flags.get("model", {}).get("device", base.model.device)
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    chosen = "cpu-mini" if on_cpu and model == DEFAULT_MODEL else "paper"
    print(f"{command}: profile {chosen} (chosen by --profile auto; flags override its sizing)", file=sys.stderr)
    return chosen


def _ladder(args) -> int:
    from fastrft import ladder

    base = load_config_file(args.config) if args.config else TrainConfig()
    flags = flag_values(args)
    profile = _resolve_profile(args.profile, flags, base, "fastrft ladder")
    out = flags.get("run", {}).pop("out", None) or f"runs/ladder-{profile}"
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    pairs = ladder.plan(base.to_dict(), flags, layers, args.seeds, profile, Path(out))
    settings = {"layers": [p.name for p in dict.fromkeys(x.preset for x in pairs)], "seeds": args.seeds,
                "profile": profile, "flags": flags, "base": base.to_dict()}
    result = ladder.run_ladder(pairs, Path(out), settings, force=args.force, keep_checkpoints=args.keep_models,
                               jobs=args.jobs)
    print(result["table"])
    print(f"\ntable: {Path(out) / 'ladder.md'}\nfigure: {result['figure']}")
    return 0


def _train(config: TrainConfig, force: bool = False) -> int:
    from fastrft.trainer import Trainer

    trainer = Trainer(config, force=force)
    if trainer.complete and trainer.world.main:
        print(f"fastrft: {trainer.out_dir} holds this run, complete ({config.run.rounds} rounds): nothing to do; "
              "its results follow (a new --out starts another run)", file=sys.stderr)
    summary = trainer.run()
    if not trainer.world.main:  # under torchrun, rank 0 speaks for the job
        return 0
    print(summary["table"])
    print(f"\nrun directory: {summary['out_dir']}  (plot: {summary['plot']})")
    return 0


def _plot(run_dirs: list[Path], out: str | None) -> int:
    from fastrft.report import before_after_table, plot_curves, plot_overlay, read_metrics

    runs = []
    for run_dir in run_dirs:
        path = run_dir / "metrics.jsonl"
        if not path.exists():
            raise FastRFTError(f"{path}: not found; pass a run directory written by fastrft train")
        try:
            runs.append((str(run_dir), read_metrics(path)))
        except ValueError as e:
            raise FastRFTError(str(e)) from None
    if len(runs) == 1:
        print(before_after_table(runs[0][1]))
        print(f"\nplot: {plot_curves(runs[0][1], run_dirs[0] / 'curves.png', title=run_dirs[0].name)}")
        return 0
    for name, records in runs:
        print(f"## {name}\n\n{before_after_table(records)}\n")
    print(f"plot: {plot_overlay(runs, out or 'overlay.png').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
