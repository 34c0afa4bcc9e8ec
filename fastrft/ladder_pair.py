"""One pair of ``fastrft ladder --jobs N``, in a process of its own: ``python -m fastrft.ladder_pair``.

The parent (fastrft.ladder_jobs) starts it with the pair's config as JSON on stdin and the environment
it chose (threads, visible GPU); stdout and stderr go to the pair's job.log. The exit status says how
the pair ended: 0 done, 2 a FastRFTError (its message is in the log), 128 + N stopped by signal N after
writing a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from fastrft.errors import FastRFTError


def _worker(argv: list[str] | None = None) -> int:
    """One pair, in this process: the config (JSON) on stdin; the exit status says how it ended."""
    parser = argparse.ArgumentParser(prog="python -m fastrft.ladder_pair",
                                     description="one pair of `fastrft ladder --jobs` (started by the ladder)")
    parser.add_argument("--base-eval-cache", required=True)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    try:
        from fastrft.config import TrainConfig

        config = TrainConfig.from_dict(json.loads(sys.stdin.read()))
        run_pair(config, Path(args.base_eval_cache), force=args.force)
    except FastRFTError as e:
        print(f"fastrft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"fastrft: {e or 'aborted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    return 0


def run_pair(config, base_eval_cache: Path, *, force: bool = False) -> dict[str, Any]:
    """Train ``config`` as the sequential ladder does, without progress bars, in this (child) process."""
    import torch

    from fastrft.trainer import Trainer

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and not config.run.threads:
        torch.set_num_threads(int(threads))
    # The bars are switched off through the config (tqdm's TQDM_DISABLE does not override the trainer's
    # explicit disable=False). run.progress is a session setting: config.json is the sequential ladder's.
    trainer = Trainer(config.replace(run=dataclasses.replace(config.run, progress=False)), force=force,
                      base_eval_cache=base_eval_cache)
    return trainer.run()


if __name__ == "__main__":
    sys.exit(_worker())
