"""Shared benchmark harness: repeated timing (median), peak memory, throughput, device and commit.

- :func:`measure` times a callable (CUDA-synchronised on GPU) after warm-up and returns a :class:`Result`.
- :func:`peak_memory` measures the peak memory a callable adds above what was allocated before it: the
  CUDA caching allocator's peak on GPU; the process's RSS high-water mark on CPU (meaningful when each
  case runs in a fresh process, which :func:`run_isolated` provides).
- :func:`report` prints a Markdown table (for bench/RESULTS.md) and appends every row to
  ``bench/results.csv`` (ignored by git; another file with ``csv_path``) with date, commit, device and
  shapes, so that each number can be traced to its run.
- :class:`Budget` is a benchmark's wall-clock allowance: each case is estimated before it starts and
  dropped, with the reason recorded, when it would not fit.
- :func:`write_outputs` writes a benchmark's table (``NAME.md``) and raw rows (``NAME.json``) into an
  output folder, after every case, so that a run stopped at its time limit keeps what it measured.
- ``python bench/harness.py summary WORK OUT`` joins the outputs of bench/gpu_suite.sh's stages into one
  Markdown page (see :func:`summarize`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import resource
import statistics
import string
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the suite's summary step runs without it.

CSV_PATH = Path(__file__).with_name("results.csv")


def device_name(device: str | None = None) -> str:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def cpu_features() -> str:
    """The CPU's vector extensions that change which kernels run (BLAS, oneDNN, ATen), and ATen's choice."""
    import torch

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
              "amx_bf16", "amx_tile")
    have = [f for f in wanted if f in flags] or ["unknown"]
    return f"ISA {' '.join(have)}; ATen kernels {torch.backends.cpu.get_cpu_capability()}"


def versions() -> str:
    import torch

    parts = [f"torch {torch.__version__}"]
    for pkg in ("triton", "transformers"):
        try:
            parts.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        parts.append(f"CUDA {torch.version.cuda}")
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
            if drv:
                parts.append(f"driver {drv[0]}")
        except (OSError, subprocess.SubprocessError):
            pass
    return ", ".join(parts)


def git_sha() -> str:
    """The commit of the working tree (+dirty), or FASTRFT_COMMIT where git cannot tell (a copied tree)."""
    if os.environ.get("FASTRFT_COMMIT"):
        return os.environ["FASTRFT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@dataclass
class Result:
    bench: str
    case: str
    median_s: float | None
    times_s: list[float] = field(default_factory=list)
    throughput: float | None = None
    unit: str = ""
    peak_mib: float | None = None
    shape: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    error: str = ""


def measure(bench: str, case: str, fn: Callable[[], float | None], *, device: str = "cpu", repeats: int = 5,
            warmup: int = 1, unit: str = "", work: float | None = None, shape: dict | None = None) -> Result:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs. ``fn`` may return the
    amount of work it did (tokens, FLOPs); otherwise ``work`` is used. throughput = work / median."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times, amounts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        amount = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        amounts.append(amount if amount is not None else work)
    med = statistics.median(times)
    known = [a for a in amounts if a is not None]
    return Result(bench, case, med, times, (statistics.median(known) / med) if known else None, unit,
                  shape=shape or {})


def _rss_mib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(fn: Callable[[], object], device: str) -> float:
    """MiB that ``fn`` adds at its peak above what is allocated when it starts."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_mib("VmRSS")
    fn()
    return _rss_mib("VmHWM") - base  # the process high-water mark: run one case per process


def run_isolated(script: str, args: list[str], timeout: float | None = 1800) -> dict:
    """Run ``script args`` in a fresh Python process that prints one JSON object as its last line. A
    process still running after ``timeout`` seconds is killed and reported as an error."""
    try:
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped at its time limit ({timeout:.0f} s)"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1])


def table(results: list[Result], title: str, device: str = "cpu", columns: tuple[str, ...] = (),
          time_unit: str = "ms") -> str:
    """The Markdown table of ``results`` under a header naming device, versions, commit and date."""
    header = (f"### {title}\n\ndevice: {device_name(device)}; {versions()}; commit {git_sha()}; "
              f"date {date.today().isoformat()}\n")
    extra_cols = list(columns)
    scale = {"ms": 1e3, "s": 1.0}[time_unit]
    rows = ["| " + " | ".join(["case", "median", "runs", "throughput", "peak extra MiB", *extra_cols]) + " |",
            "|---|---:|---:|---:|---:|" + "---:|" * len(extra_cols)]
    for r in results:
        cells = [_cell(r.extra.get(c)) for c in extra_cols]
        if r.error:  # what the case did measure still shows
            rows.append("| " + " | ".join([r.case, r.error, "–", "–", "–", *cells]) + " |")
            continue
        tp = f"{r.throughput:,.2f} {r.unit}" if r.throughput is not None else "–"
        peak = f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "–"
        rows.append("| " + " | ".join([r.case, f"{r.median_s * scale:,.2f} {time_unit}", str(len(r.times_s)), tp, peak,
                                       *cells]) + " |")
    return header + "\n" + "\n".join(rows) + "\n"


def report(results: list[Result], title: str, device: str = "cpu", columns: tuple[str, ...] = (),
           csv_path: Path | str | None = None, time_unit: str = "ms") -> str:
    """Print the table and append every row to ``csv_path`` (default bench/results.csv)."""
    text = table(results, title, device, columns, time_unit)
    print(text, flush=True)
    path = Path(csv_path) if csv_path else CSV_PATH
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["date", "commit", "device", "bench", "case", "shape", "median_ms", "runs", "throughput",
                             "unit", "peak_extra_mib", "extra", "error"])
        for r in results:
            writer.writerow([date.today().isoformat(), git_sha(), device_name(device), r.bench, r.case,
                             json.dumps(r.shape), None if r.median_s is None else round(r.median_s * 1e3, 4),
                             len(r.times_s), r.throughput, r.unit, r.peak_mib, json.dumps(r.extra), r.error])
    return text


def cuda_broken(error: str) -> bool:
    """Whether an error message says the process's CUDA context is unusable from now on."""
    return any(m in error for m in ("illegal memory access", "device-side assert", "CUDA error", "misaligned address",
                                    "unspecified launch failure"))


MIN_CASE_S = 3.0  # a case without an estimate starts only with at least this much time left


class Budget:
    """A benchmark's wall-clock allowance (``seconds=None``: unlimited). Before a case starts,
    :meth:`admit` compares its estimate with the time left and records the case as dropped when it would
    not fit; :meth:`timeout` is the hard limit to give a case that runs in its own process."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.t0 = time.monotonic()
        self.dropped: list[str] = []

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.t0)

    def admit(self, case: str, estimate: float | None = None) -> bool:
        left = self.left()
        if (estimate if estimate is not None else MIN_CASE_S) <= left:
            return True
        why = f"estimated {estimate:.0f} s" if estimate is not None else "no time for it"
        self.dropped.append(f"{case} ({why}, {max(left, 0):.0f} s left)")
        return False

    def timeout(self) -> float | None:
        left = self.left()
        return None if math.isinf(left) else max(left, 1.0)


def write_outputs(out_dir: Path | str, name: str, title: str, results: list[Result], text: str, *,
                  device: str = "cpu", dropped: list[str] = (), notes: list[str] = ()) -> None:
    """``NAME.md`` (the table, then the dropped cases and notes) and ``NAME.json`` (the raw rows) in
    ``out_dir``; called after every case, so that a run stopped at its time limit keeps what it measured."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = text
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if dropped:
        md += "\nDropped to stay within the time budget:\n" + "\n".join(f"- {d}" for d in dropped) + "\n"
    (out / f"{name}.md").write_text(md)
    meta = {"title": title, "device": device_name(device), "versions": versions(), "commit": git_sha(),
            "date": date.today().isoformat(), "dropped": list(dropped), "notes": list(notes),
            "results": [result_to_dict(r) for r in results]}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))


def _cell(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"
    return str(x)


def result_from_dict(d: dict) -> Result:
    return Result(**{k: v for k, v in d.items() if k in Result.__dataclass_fields__})


def result_to_dict(r: Result) -> dict:
    return asdict(r)


# ------------------------------------------------------------------ bench/gpu_suite.sh's summary page
STAGES = (("tests", "GPU tests"), ("logprob", "LM-head log-prob + PG loss"), ("round", "Round time"),
          ("rollout", "Rollout throughput"))
_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|tests? collected)")


def pytest_counts(text: str) -> dict[str, float]:
    """Outcome counts and wall seconds from pytest's final line ("3 passed, 1 skipped in 2.50s")."""
    for line in reversed(text.strip().splitlines()):
        found = _PYTEST_COUNT.findall(line)
        if found:
            counts: dict[str, float] = {}
            for n, what in found:
                key = "collected" if "collected" in what else "errors" if what.startswith("error") else what
                counts[key] = int(n)
            wall = re.search(r" in ([\d.]+)s", line)
            if wall:
                counts["wall s"] = float(wall.group(1))
            return counts
    return {}


def _tests_section(work: Path) -> str:
    path = work / "pytest.txt"
    if not path.exists():
        return "_not run_\n"
    text = path.read_text(errors="replace")
    counts = pytest_counts(text)
    lines = text.strip().splitlines()
    head = next((ln for ln in lines if ln.startswith("selection:")), "")
    out = [head, ""] if head else []
    if not counts:
        out.append("pytest printed no summary line (stopped at its time slice?); its last lines:\n")
        out += ["    " + ln for ln in lines[-8:]]
        return "\n".join(out) + "\n"
    out += ["| outcome | count |", "|---|---:|"] + [f"| {k} | {v:g} |" for k, v in counts.items()]
    bad = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    if "KeyboardInterrupt" in text or "Interrupted" in text:
        out.append("\nStopped at the end of its time slice: the counts cover the tests that ran.")
    if bad:
        out += ["", *bad[:40]] + ([f"... and {len(bad) - 40} more"] if len(bad) > 40 else [])
    return "\n".join(out) + "\n"


def summarize(work: Path | str, out_file: Path | str) -> str:
    """One Markdown page from the files the suite's stages left in ``work``: the suite's settings
    (``suite.txt``, "key: value" lines), the stages' status (``stages.tsv``: name, status, seconds, slice),
    the pytest output (``pytest.txt``) and each benchmark's ``NAME.md`` / ``NAME.json``."""
    work = Path(work)
    parts = ["# fastrft GPU suite\n"]
    info = work / "suite.txt"
    if info.exists():
        parts.append("\n".join(f"- {ln}" for ln in info.read_text().strip().splitlines()) + "\n")
    stages = work / "stages.tsv"
    dropped: list[str] = []
    if stages.exists():
        rows = ["| stage | status | seconds | time slice s |", "|---|---|---:|---:|"]
        for ln in stages.read_text().strip().splitlines():
            name, status, secs, slice_s = (ln.split("\t") + ["", "", "", ""])[:4]
            rows.append(f"| {name} | {status} | {secs} | {slice_s} |")
            if status.startswith("dropped"):
                dropped.append(f"stage {name}: {status}")
        parts.append("## Stages\n\n" + "\n".join(rows) + "\n")
    for key, title in STAGES:
        if key == "tests":
            body = _tests_section(work)
        else:
            md = work / f"{key}.md"
            body = md.read_text() if md.exists() else "_not run_\n"
            raw = work / f"{key}.json"
            if raw.exists():
                try:
                    dropped += [f"{key}: {d}" for d in json.loads(raw.read_text()).get("dropped", [])]
                except json.JSONDecodeError:
                    pass
        parts.append(f"## {title}\n\n{body}")
    parts.append("## Dropped\n\n" + ("\n".join(f"- {d}" for d in dropped) if dropped else "nothing") + "\n")
    text = "\n".join(parts)
    Path(out_file).write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description="helpers of bench/gpu_suite.sh")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary", help="join the stages' outputs in WORK into one Markdown page")
    s.add_argument("work")
    s.add_argument("out")
    sub.add_parser("env", help="device, versions, commit and where fastrft comes from, as key: value lines; "
                               "exit 1 when fastrft (with its kernels) cannot be imported")
    a = ap.parse_args()
    if a.cmd == "summary":
        summarize(a.work, a.out)
        return
    print(f"device: {device_name()}\nversions: python {platform.python_version()}, {versions()}\ncommit: {git_sha()}")
    try:
        import fastrft
        import fastrft.kernels  # noqa: F401
    except Exception as e:  # noqa: BLE001 - reported, and the exit status says it
        print(f"fastrft: NOT importable ({type(e).__name__}: {e})")
        sys.exit(1)
    print(f"fastrft: {fastrft.__version__} from {Path(fastrft.__file__).parent}")
    try:
        import fastrft._engine  # noqa: F401

        print("C++ extension: fastrft._engine imports (the engine's bookkeeping runs in C++)")
    except ImportError:
        print("C++ extension: NOT importable (the engine falls back to its Python twins)")


if __name__ == "__main__":
    main()


# ------------------------------------------------------------------ model shapes and random-weight models
# The bench scripts share these (no bench script imports another). Qwen2-shaped: the paper's models.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True),
}


def hf_config(shape: str) -> dict:
    return dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
                hidden_act="silu", eos_token_id=0, bos_token_id=0, **SHAPES[shape])


def build_model(shape: str, dtype: torch.dtype, device: str, seed: int = 0):
    """Our native model with random weights (std 0.02; norms at 1)."""
    import torch

    from fastrft.models.config import ArchConfig
    from fastrft.models.decoder import CausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalLM(ArchConfig.from_hf(hf_config(shape)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.02)
    model.reset_buffers()
    return model.to(dtype).eval()


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
#: --precision -> dtype of the random weights written to disk (the compute dtype; masters are cast on load)
FILE_DTYPE = {"fp32": "fp32", "bf16-mixed": "bf16", "bf16": "bf16", "fp16": "fp16"}


# ------------------------------------------------------------------ the random-weight model directory
def _filler(i: int) -> str:
    """A distinct token with no digits in it, so that decoded random text never reads as an answer."""
    letters = ""
    while True:
        letters = string.ascii_lowercase[i % 26] + letters
        i //= 26
        if i == 0:
            return f"<{letters}>"


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer without merges (one token per byte, as Qwen's tokenizer falls back to),
    padded with filler tokens to ``vocab_size``. transformers loads it as the class that config.json's
    model_type names (Qwen2Tokenizer), which rebuilds the byte-level pipeline: this vocabulary suits both."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<bos>", *sorted(pre_tokenizers.ByteLevel.alphabet())]
    words += [_filler(i) for i in range(vocab_size - len(words))]
    tk = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(words)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", bos_token="<bos>")
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(str(path))


def write_model_dir(shape: str, dtype: str, device: str, path: Path) -> Path:
    """config.json (no EOS), model.safetensors with random weights drawn on ``device``, tokenizer files."""
    import torch
    from safetensors.torch import save_file

    from fastrft.models.config import ArchConfig
    from fastrft.models.decoder import CausalLM

    hf = {k: v for k, v in hf_config(shape).items() if k != "eos_token_id"}
    hf.update(architectures=["Qwen2ForCausalLM"], dtype=DTYPES[dtype])
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=1))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CausalLM(ArchConfig.from_hf(hf)).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, shp in shapes.items():
        if "norm" in name:
            t = torch.ones(shp, device=device)
        else:
            t = torch.randn(shp, generator=g, device=device).mul_(0.02)
        state[name] = t.to(getattr(torch, DTYPES[dtype])).cpu()
    save_file(state, str(path / "model.safetensors"))
    write_tokenizer(path, hf["vocab_size"])
    return path
