"""Command line: ``fastrft train | ladder | presets | export | demo | plot``.

The flags of ``train`` and ``demo`` are generated from the config dataclasses (fastrft.cli_flags: one
flag per field, ``--field-name``, help text from the field), so the CLI can never drift from the Python
API. A flag left out keeps the base config's value: the defaults for ``train`` (or a ``--config`` JSON
file), the demo preset for ``demo``. Errors a user can fix print one line, without a traceback, and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fastrft.cli_flags import add_config_flags, config_from_args, flag_values, load_config_file
from fastrft.config import TrainConfig
from fastrft.errors import FastRFTError

__all__ = ["add_config_flags", "build_parser", "config_from_args", "flag_values", "load_config_file", "main"]

class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, naming the flag, with where to read more (not the 50-line usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    ladder.add_argument("--until-decided", action="store_true",
                        help="after the planned seeds, add seeds (--jobs at a time) to each comparison of a layer "
                             "with the one it builds on until its 95%% interval decides it (docs/deciding.md)")
    ladder.add_argument("--max-seeds", type=int, default=None, metavar="N",
                        help="with --until-decided: the most seeds a comparison gets")
    ladder.add_argument("--margin", type=float, default=None, metavar="M",
                        help="equivalence margin of test Pass@1: 'no difference' when the interval lies within "
                             "±M (default: 0.05)")
    add_config_flags(ladder, ladder=True)
    sub.add_parser("presets", help="list the layer presets and profiles")
    export = sub.add_parser("export", help="write a run's checkpoint (the newest whole one, or --round N) as an "
                                           "HF-format model directory")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by fastrft train")
    export.add_argument("--out", required=True, help="new directory for config.json, model.safetensors, tokenizer")
    export.add_argument("--round", type=int, default=None, metavar="N",
                        help="the checkpoint of round N (default: the newest whole checkpoint; a run keeps its "
                             "last --keep-checkpoints of them)")
    export.add_argument("--adapter", action="store_true",
                        help="a LoRA run: write its adapters alone as a PEFT adapter directory (adapter_config.json, "
                             "adapter_model.safetensors; peft's PeftModel.from_pretrained loads it on the base model). "
                             "Without it a LoRA run's export merges the adapters into full weights")
    ev = sub.add_parser("eval", help="evaluate a base model, a run's checkpoint or an exported model the way training "
                                     "does; prints the table with 95%% intervals, writes problems.jsonl and summary.json")
    ev.add_argument("target", metavar="TARGET", help="a run directory (its newest whole checkpoint, or --round N, "
                                                      "with the run's config), or a model: a directory, an alias, a hub id")
    ev.add_argument("--round", type=int, default=None, metavar="N", help="a run's checkpoint of round N")
    add_config_flags(ev)  # any config field; --out is where the results go
    demo = sub.add_parser("demo", help="the minimalist layer on SmolLM2-135M-Instruct, sized for 2 CPU cores (under 2 "
                                      "min of compute on a 2-core Intel Xeon, 2026-12-07; about 3 min from a fresh "
                                      "clone, install included; slower machines take up to twice that)")
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
            from fastrft.export import export_checkpoint

            out, round_ = export_checkpoint(args.run_dir, args.out, args.round, adapter=args.adapter)
            which = "" if args.round is not None else " (its newest whole checkpoint)"
            what = "the LoRA adapter of " if args.adapter else ""
            print(f"exported {what}round {round_} of {args.run_dir}{which}: {out}")
            return 0
        if args.command == "ladder":
            return _ladder(args)
        if args.command == "eval":
            from fastrft.eval_run import evaluate_target, print_summary

            overrides = flag_values(args)
            out = overrides.get("run", {}).pop("out", None)
            progress = overrides.get("run", {}).pop("progress", True)
            print_summary(evaluate_target(args.target, overrides, round_=args.round, out=out, progress=progress))
            return 0
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
        print(f"fastrft: {str(e) or _interrupted(args.command)}", file=sys.stderr)
        return 130


def _interrupted(command: str) -> str:
    """What a Ctrl-C outside a run's rounds stopped (a run's loop says so itself)."""
    if command == "ladder":
        return "ladder interrupted; rerun the same command to continue (finished runs are kept)"
    if command in ("train", "demo"):
        return ("interrupted while starting (loading the model and data, before the first round): nothing was "
                "trained; rerun the same command to start again")
    return f"{command} interrupted"


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
    from fastrft import ladder, ladder_decide

    base = load_config_file(args.config) if args.config else TrainConfig()
    flags = flag_values(args)
    profile = _resolve_profile(args.profile, flags, base, "fastrft ladder")
    out = flags.get("run", {}).pop("out", None) or f"runs/ladder-{profile}"
    layers = [x.strip() for x in args.layers.split(",") if x.strip()]
    pairs = ladder.plan(base.to_dict(), flags, layers, args.seeds, profile, Path(out))
    margin = ladder_decide.DEFAULT_MARGIN if args.margin is None else args.margin
    ladder_decide.check(args.seeds, args.until_decided, args.max_seeds, margin)
    settings = {"layers": [p.name for p in dict.fromkeys(x.preset for x in pairs)], "seeds": args.seeds,
                "profile": profile, "flags": flags, "base": base.to_dict()}
    if args.margin is not None:
        settings["margin"] = margin
    kw = dict(force=args.force, keep_checkpoints=args.keep_models, jobs=args.jobs)
    if args.until_decided:  # every pair up to --max-seeds is planned; the driver runs those it needs
        settings.update(until_decided=True, max_seeds=args.max_seeds, jobs=args.jobs)
        pairs = ladder.plan(base.to_dict(), flags, layers, args.max_seeds, profile, Path(out))
        result = ladder_decide.run_until_decided(pairs, Path(out), settings, ladder.run_ladder, **kw)
    else:
        result = ladder.run_ladder(pairs, Path(out), settings, **kw)
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
