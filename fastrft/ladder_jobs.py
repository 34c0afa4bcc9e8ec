"""``fastrft ladder --jobs N``: up to N pairs of a study at once, each in its own process.

One small run does not fill a machine: on a CPU, torch's threads scale poorly at 135M parameters and
below, and on a GPU one short-sequence run leaves most of it idle. Independent runs side by side do.

Each pair runs ``python -m fastrft.ladder_pair`` (its config as JSON on stdin), so every child starts
with a fresh interpreter and the environment it is given, read before torch is imported:

- on CPU, ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = cores // N (at least 1; ``--threads`` wins when
  given). It is cores // N even when fewer than N pairs are left, so a resumed study runs its pairs
  with the thread count a fresh one used;
- on CUDA (device auto or cuda), job slot k sees one GPU, ``CUDA_VISIBLE_DEVICES`` = the k-th visible
  device modulo their number (with one GPU, all jobs share it). The config keeps saying ``auto`` or
  ``cuda``: the device string is part of the base-evaluation cache key, which must not depend on the slot;
- stdout and stderr go to ``<run dir>/job.log`` (appended), without progress bars; the parent shows the
  study's bar and a line per finished pair.

A child trains the pair's config (with its progress bar off, a display switch that config.json gets
back), so config.json and the shared caches are those of the sequential ladder (fastrft.ladder has the
order rule of shared base-model evaluations; the caches take a lock). metrics.jsonl is bit-equal to the
sequential run's at equal torch thread counts (``--threads T`` for both). A child has cores // N threads
and the sequential run all cores, and torch's CPU kernels round differently at different thread counts
(SmolLM2-135M, 1 against 2 threads: grad norm, loss, KL by ~1e-5 relative, the rollout-vs-trainer
log-prob gap by up to 20%; over a long run a flipped token). Most of that is MKL's matrix products, so
MKL runs in its reproducibility mode (``MKL_CBWR=AUTO,STRICT``, which ``import fastrft`` sets;
fastrft/__init__.py), whose products do not depend on the thread count. With it, a 4-pair SmolLM2 study and a tiny-model one
came out bit-equal at default threads (bench/RESULTS.md); other torch CPU kernels can still round by
thread count (a 3-round tiny-model run at lr 3e-3 differed from round 2 on), so only equal thread counts
guarantee equality. A value of MKL_CBWR already in the environment wins, and the children inherit the
parent's.

Errors: after a failed pair no new pair starts; the running ones finish, then a FastRFTError names each
failed pair with the end of its job.log. Ctrl-C reaches the children too (same process group): each
writes a checkpoint (fastrft.interrupt), the parent waits for them, and rerunning the same command
continues the study.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from fastrft import rundir
from fastrft.errors import ConfigError, FastRFTError

LOG = "job.log"
POLL_S = 0.25  # how often the parent looks at its children and at the base-evaluation cache
TAIL_LINES = 15  # lines of a failed pair's job.log quoted in the error


def cpu_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_jobs(jobs: int) -> None:
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"jobs (--jobs) must be an integer >= 1 (1 = one pair after another in this process, "
                          f"N = up to N pairs at once, each in its own process), got {jobs!r}")


def sharing_group(config) -> str:
    """What a pair's base-model (round-0) evaluation depends on, as far as the config tells: the fields
    fastrft.loop.evaluator.Evaluator.base_key hashes (model; rollout but G; evaluation but its interval;
    the seed) and the data section, which decides the evaluated prompts. Pairs with equal groups share
    that evaluation."""
    c = config.to_dict()
    rollout = {k: v for k, v in c["rollout"].items() if k != "group_size"}
    ev = {k: v for k, v in c["eval"].items() if k != "eval_every"}
    return json.dumps([c["model"], rollout, ev, c["data"], c["run"]["seed"]], sort_keys=True, default=str)


def leaders(pairs: list) -> dict[str, str]:
    """{run name: the run name of the first pair of its sharing group in plan order} (itself for a leader)."""
    first: dict[str, str] = {}
    out = {}
    for p in pairs:
        out[p.config.run.name] = first.setdefault(sharing_group(p.config), p.config.run.name)
    return out


def measured_by(cache: Path) -> set[str]:
    """The runs that stored a base-model evaluation in the study's cache ({} while it is missing or
    unreadable: a run that reads it reports the problem)."""
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return {e["run"] for e in data.values() if isinstance(e, dict) and isinstance(e.get("run"), str)}
    except (OSError, ValueError, AttributeError):
        return set()


@dataclass
class Job:
    pair: Any  # fastrft.ladder.Pair
    slot: int
    proc: subprocess.Popen
    t0: float

    @property
    def log(self) -> Path:
        return self.pair.out / LOG

    def label(self) -> str:
        return f"{self.pair.preset.name} seed {self.pair.seed}"


#: MKL's strict conditional numerical reproducibility: its GEMMs give the same bits at any thread count
#: (on this project's CPU, a 7x64 @ 64x85 product differs between 1 and 2 threads without it). The
#: ``import fastrft`` sets it before any matrix product (and :func:`thread_independent_blas` again, for a
#: process that imported fastrft after MKL had started), and the ladder's children inherit it, so a child with cores // N threads computes the matrix products of the
#: in-process sequential run with all cores. AUTO keeps the machine's own instruction set.
MKL_CBWR = "AUTO,STRICT"


def thread_independent_blas() -> None:
    """Ask MKL for thread-count-independent results, unless the user chose a mode (MKL_CBWR set). MKL
    reads the variable at its first call, so this must run before the process multiplies any matrices
    (``import fastrft`` does the same; ``fastrft ladder`` calls this first thing)."""
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)


def child_env(config, slot: int, jobs: int, cuda_devices: list[str] | None) -> tuple[dict[str, str], str]:
    """The environment of the child in job slot ``slot``, and a few words on what it was given."""
    import fastrft

    env = dict(os.environ)  # MKL_CBWR included: a child computes in its parent's MKL mode
    # The child imports the same fastrft as this process, even a source tree found through a path set in
    # code. An installed one is found anyway (and site-packages ahead of the standard library is no good).
    root = Path(fastrft.__file__).resolve().parent.parent
    if root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(root), env.get("PYTHONPATH")) if x)
    device = config.model.device
    if cuda_devices and device in ("auto", "cuda"):
        env["CUDA_VISIBLE_DEVICES"] = cuda_devices[slot % len(cuda_devices)]
        return env, f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}"
    if device == "cpu" or (device == "auto" and not cuda_devices):
        threads = config.run.threads or max(1, cpu_cores() // jobs)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        return env, f"{threads} CPU thread{'s' if threads > 1 else ''}"
    return env, f"device {device}"


def visible_cuda_devices() -> list[str] | None:
    """The CUDA devices children may be given, as CUDA_VISIBLE_DEVICES spells them; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [x.strip() for x in given.split(",") if x.strip()] or None
    return [str(i) for i in range(torch.cuda.device_count())]


def start(pair, slot: int, jobs: int, cuda_devices: list[str] | None, base_eval_cache: Path, force: bool) -> Job:
    env, given = child_env(pair.config, slot, jobs, cuda_devices)
    pair.out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fastrft.ladder_pair", "--base-eval-cache", str(base_eval_cache)]
    if force:
        cmd.append("--force")
    with open(pair.out / LOG, "a", encoding="utf-8") as log:
        log.write(f"[ladder] {pair.config.run.name}: started {datetime.now().isoformat(timespec='seconds')} in job "
                  f"slot {slot} ({given})\n")
        log.flush()
        # Same process group as this one (no new session): Ctrl-C in the terminal reaches the child.
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                text=True)
    proc.stdin.write(pair.config.to_json())
    proc.stdin.close()
    return Job(pair, slot, proc, time.monotonic())


def ending(returncode: int) -> str:
    """How a child ended, in words: 'exited with code 2', 'was stopped by SIGINT (exit code 130)'."""
    import signal

    signum = -returncode if returncode < 0 else returncode - 128  # killed by it; or exited 128 + it (a checkpoint)
    if signum in {s.value for s in signal.Signals}:
        name = signal.Signals(signum).name
        return f"was killed by {name}" if returncode < 0 else f"was stopped by {name} (exit code {returncode})"
    return f"exited with code {returncode}"


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        return f"(cannot be read: {e.strerror})"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty)"


def run_parallel(pairs: list, todo: list, out: Path, jobs: int, *, force: bool, overall,
                 finished: Callable[[Any, float], None]) -> None:
    """Run ``todo`` (pairs of ``pairs``, in plan order) with up to ``jobs`` children at once; call
    ``finished(pair, t0)`` in this process after each pair that completed."""
    from fastrft.models.embedded import ALIASES, ensure_converted

    cuda_devices = visible_cuda_devices()
    on_cpu = [p for p in todo if p.config.model.device == "cpu" or (p.config.model.device == "auto"
                                                                    and not cuda_devices)]
    if on_cpu and jobs > cpu_cores():
        print(f"fastrft ladder: --jobs {jobs} is more than the {cpu_cores()} CPU cores; each run gets 1 thread "
              "and the runs share the cores", file=sys.stderr)
    for model in dict.fromkeys(p.config.model.model for p in todo):
        if model in ALIASES:  # convert once here, not once per child at the same time
            ensure_converted(model)
    cache = out / "base-eval.json"
    leader = leaders(pairs)
    # Leaders complete before this study started count as ended: what they measured is in the cache.
    ended = {p.config.run.name for p in pairs if p not in todo}
    pending, running, failed, done = list(todo), [], [], []
    free = list(range(jobs))

    def ready(pair, measured: set[str]) -> bool:
        first = leader[pair.config.run.name]
        return first == pair.config.run.name or first in ended or first in measured

    def reap(interrupted: bool) -> None:
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            free.append(job.slot)
            free.sort()
            ended.add(job.pair.config.run.name)
            # A run that wrote its complete summary is done, even if a signal then cut its exit short.
            if job.proc.returncode == 0 or rundir.is_complete(job.pair.out):
                done.append(job.pair)
                finished(job.pair, job.t0)
            elif not interrupted:  # an interrupted child exits non-zero after writing its checkpoint
                failed.append(job)

    shown = ""
    try:
        while running or (pending and not failed):
            if not failed and free and pending:
                measured = measured_by(cache)
                for pair in [p for p in pending if ready(p, measured)][:len(free)]:
                    pending.remove(pair)
                    running.append(start(pair, free.pop(0), jobs, cuda_devices, cache, force))
                    overall.write(f"[ladder] {running[-1].label()} started (log: {pair.out / LOG})", file=sys.stderr)
            if shown != (now := ", ".join(j.label() for j in running)):
                shown = now
                overall.set_postfix_str(now)
            time.sleep(POLL_S)
            reap(interrupted=False)
    except KeyboardInterrupt:
        overall.write(f"[ladder] interrupted: waiting for {len(running)} running pair(s) to write a checkpoint",
                      file=sys.stderr)
        while running:
            try:
                for job in running:
                    job.proc.wait()
            except KeyboardInterrupt:
                pass  # the children received it too; a second one makes them stop at once
            reap(interrupted=True)
        raise KeyboardInterrupt(f"ladder stopped with {len(todo) - len(done)} of {len(pairs)} pairs unfinished; "
                                "rerun the same command to continue the study (interrupted runs resume from "
                                "their checkpoints)") from None
    if failed:
        why = "\n".join(f"{j.label()} ({j.pair.config.run.name}) {ending(j.proc.returncode)}; its log {j.log} "
                        f"ends with:\n{tail(j.log)}" for j in failed)
        held = f"; {len(pending)} pair(s) were not started" if pending else ""
        raise FastRFTError(f"ladder: {len(failed)} pair(s) failed{held}:\n{why}\nThe finished pairs are kept: fix "
                           "the cause and rerun the same command to continue the study")
