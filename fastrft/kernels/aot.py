"""Ahead-of-time compilation of the Triton kernels for Hopper (sm_90a), on a machine without a GPU.

``triton.compile`` with an explicit ``GPUTarget("cuda", 90, 32)`` runs the whole pipeline (Triton IR,
LLVM, PTX) and Triton's bundled ptxas, with no driver. That catches, without a GPU, what would otherwise
show only on one: compile errors, register spills (ptxas ``-v``: ``N bytes spill stores, M bytes spill
loads``) and shared memory beyond Hopper's 227 KiB per block.

Protocol: every kernel module listed in :data:`MODULES` defines ``compile_cases(full: bool) ->
list[CompileCase]``, the configurations its launchers really produce for CUDA tensors (dtypes, model
shapes, tile configurations; ``full_only=True`` marks those only the full run compiles).
``tests/kernels/test_compile_gate.py`` compiles them all; ``python -m fastrft.kernels.aot [--full]`` prints the
table.

How a case mirrors a launch (triton 3.7.1's JIT specialisation, ``triton/runtime/jit.py``): every
pointer argument gets ``tt.divisibility = 16`` (torch's allocator returns 16-byte aligned storage); an
integer argument whose value is a multiple of 16 gets it too: write its type with Triton's AOT suffix,
``"i32:16"``; an integer argument equal to 1 (a unit stride) is compiled as the constant 1: put it in
``constexprs``. Floats and bools are never specialised.

The interpreter: with ``TRITON_INTERPRET=1`` set before the kernel modules are imported (the test
suite does that on CPU), ``@triton.jit`` returns interpreter functions that cannot be compiled. Compile
in a fresh process without it: :func:`compile_isolated` (what the test uses) runs this module's
``__main__`` in a subprocess with ``TRITON_INTERPRET`` removed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

MODULES = ("fastrft.kernels.paged_attention_triton", "fastrft.kernels.linear_logprob", "fastrft.kernels.sampling",
           "fastrft.kernels.exact_linear", "fastrft.kernels.exact_rms_norm", "fastrft.kernels.exact_attention")
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90 (opt-in maximum)
TARGET = ("cuda", 90, 32)  # backend, compute capability (90 -> sm_90a), warp size
TYPES = ("*fp32", "*bf16", "*fp16", "*i64", "*i32", "*i8", "*u8", "i32", "i64", "fp32")

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclasses.dataclass
class CompileCase:
    """One kernel configuration as a launcher produces it.

    signature: every non-constexpr parameter of ``fn`` -> its Triton type (:data:`TYPES`), ints that are
    multiples of 16 at run time with the suffix ``":16"`` ("i32:16"). constexprs: every ``tl.constexpr``
    parameter -> its value, plus integer arguments the launch passes as 1 (specialised to constants).
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    spill_free: bool = True
    full_only: bool = False
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra launch options (enable_fp_fusion)


@dataclasses.dataclass
class CompileResult:
    name: str
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int
    ptxas_log: str
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------- cases
def int_args(bits: int = 32, **values: int) -> tuple[dict[str, str], dict[str, int]]:
    """(signature part, constexprs part) for integer arguments with these representative run-time
    values, specialised as the JIT launcher does: 1 becomes the constant 1, a multiple of 16 gets
    ``":16"``; ``bits`` 32 or 64 (the launcher picks i64 only past 2^31 - 1)."""
    sig, const = {}, {}
    for name, v in values.items():
        if v == 1:
            const[name] = 1
        else:
            ty = "i64" if bits == 64 or not -2**31 <= v < 2**31 else "i32"
            sig[name] = ty + (":16" if v % 16 == 0 else "")
    return sig, const


def _python_fn(fn) -> Callable:
    """The Python function behind a JITFunction or an interpreter function."""
    return getattr(fn, "fn", fn)


def validate_case(case: CompileCase) -> None:
    """Refuse a case that does not name every parameter of its kernel exactly once, with a constexpr
    parameter outside ``constexprs`` or an unknown type: a kernel whose signature changed must fail the
    gate loudly, not compile a different specialisation."""
    params = inspect.signature(_python_fn(case.fn)).parameters
    where = f"compile case {case.name!r}"
    for name, p in params.items():
        is_constexpr = "constexpr" in str(p.annotation)
        if (name in case.signature) == (name in case.constexprs):
            raise ValueError(f"{where}: parameter {name!r} must be in exactly one of signature and constexprs")
        if is_constexpr and name not in case.constexprs:
            raise ValueError(f"{where}: {name!r} is a tl.constexpr parameter; give its value in constexprs")
    for name in [*case.signature, *case.constexprs]:
        if name not in params:
            raise ValueError(f"{where}: {name!r} is not a parameter of {_python_fn(case.fn).__name__}")
    for name, ty in case.signature.items():
        base, _, hint = ty.partition(":")
        if base not in TYPES or hint not in ("", "16"):
            raise ValueError(f"{where}: type {ty!r} of {name!r} is not one of {', '.join(TYPES)} "
                             f"(ints may carry ':16')")
    if not (isinstance(case.num_warps, int) and case.num_warps >= 1 and case.num_warps & (case.num_warps - 1) == 0):
        raise ValueError(f"{where}: num_warps must be a power of two; got {case.num_warps!r}")


def module_cases(module: str, full: bool) -> list[CompileCase]:
    mod = importlib.import_module(module)
    fn = getattr(mod, "compile_cases", None)
    if fn is None:
        raise RuntimeError(f"{module} has no compile_cases(full) -> list[CompileCase]: every module in "
                           f"fastrft.kernels.aot.MODULES must list its launch configurations")
    return list(fn(full))


def all_cases(full: bool, modules=MODULES) -> list[CompileCase]:
    """Every module's ``compile_cases(full)``; without ``full``, the cases marked full_only are dropped."""
    cases: list[CompileCase] = []
    for module in modules:
        cases += [c for c in module_cases(module, full) if full or not c.full_only]
    seen: set[str] = set()
    for case in cases:
        validate_case(case)
        if case.name in seen:
            raise ValueError(f"two compile cases are named {case.name!r}")
        seen.add(case.name)
    return cases


# ----------------------------------------------------------------------------------------- compile
def _specialise(case: CompileCase, arg_names: list[str]):
    """ASTSource's (signature, constexprs, attrs) for the case, as triton's JIT launcher builds them:
    the signature covers every parameter (constants typed "constexpr"), attrs are keyed by argument
    index paths and carry tt.divisibility=16 for pointers and for ints marked ':16'."""
    signature, attrs = {}, {}
    for i, name in enumerate(arg_names):
        if name in case.constexprs:
            signature[name] = "constexpr"
            continue
        base, _, hint = case.signature[name].partition(":")
        signature[name] = base
        if base.startswith("*") or hint == "16":
            attrs[(i, )] = [["tt.divisibility", 16]]
    return signature, dict(case.constexprs), attrs


def parse_ptxas_log(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v output of one entry function."""
    regs = _REGS.findall(log)
    spills = _SPILLS.findall(log)
    if not regs or not spills:
        raise RuntimeError(f"could not read registers and spills from the ptxas log:\n{log}")
    return (max(int(r) for r in regs), sum(int(s) for s, _ in spills), sum(int(ld) for _, ld in spills))


def compile_case(case: CompileCase) -> CompileResult:
    """Compile ``case`` for sm_90a in this process and read its resources. Raises on a compile error.
    Needs real ``@triton.jit`` functions: in a process that imported the kernels with TRITON_INTERPRET=1,
    use :func:`compile_isolated`."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(case.fn, JITFunction):
        raise RuntimeError(f"compile case {case.name!r}: {type(case.fn).__name__} is not a triton JITFunction "
                           f"(kernels imported with TRITON_INTERPRET=1?); use fastrft.kernels.aot.compile_isolated")
    validate_case(case)
    signature, constexprs, attrs = _specialise(case, case.fn.arg_names)
    out = io.StringIO()
    start = time.perf_counter()
    # A fresh cache directory: a cache hit would skip ptxas and with it the log we read.
    with tempfile.TemporaryDirectory(prefix="fastrft-aot-") as cache, knobs.cache.scope(), \
            knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(out):
        knobs.cache.dir = cache
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's output to stdout
        kernel = triton.compile(ASTSource(case.fn, signature, constexprs, attrs), target=GPUTarget(*TARGET),
                                options={"num_warps": case.num_warps, "num_stages": case.num_stages, **case.options})
    seconds = time.perf_counter() - start
    log = out.getvalue()
    regs, stores, loads = parse_ptxas_log(log)
    return CompileResult(case.name, regs, stores, loads, int(kernel.metadata.shared), log.strip(), seconds)


def check(result: CompileResult, case: CompileCase) -> list[str]:
    """The gate's complaints about a compiled case (a compile error is the caller's to report)."""
    problems = []
    if result.shared_bytes > SHARED_LIMIT:
        problems.append(f"shared memory {result.shared_bytes} B > {SHARED_LIMIT} B (227 KiB)")
    if case.spill_free and (result.spill_stores or result.spill_loads):
        problems.append(f"register spills: {result.spill_stores} B stores, {result.spill_loads} B loads "
                        f"at {result.registers} registers")
    return problems


# ----------------------------------------------------------------------------------------- isolated
def compile_isolated(full: bool = False, names=None, modules=MODULES, timeout: float = 1800,
                     extra_path=None, workers: int | None = None) -> dict[str, dict]:
    """Compile cases in fresh Python processes without TRITON_INTERPRET. Returns name -> the
    :class:`CompileResult` fields as a dict, or ``{"error": text}`` for a case that failed to compile.
    ``names``: only these cases (None: all of ``all_cases(full, modules)``, in one process); ``extra_path``:
    a directory put first on the child's PYTHONPATH (for modules outside the package); ``workers``: how
    many processes share the named cases (default: one per core, at most 4; ptxas is single-threaded)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), *filter(None, [env.get("PYTHONPATH")])])
    workers = max(1, min(workers or min(os.cpu_count() or 1, 4), len(names or [None])))
    groups = [list(names)[i::workers] for i in range(workers)] if names else [[]]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fastrft-aot-") as tmp:
        procs = []
        for i, group in enumerate(groups):
            out = os.path.join(tmp, f"results{i}.json")
            cmd = [sys.executable, "-m", "fastrft.kernels.aot", "--json", out, *(["--full"] if full else [])]
            for module in modules:
                cmd += ["--module", module]
            for name in group:
                cmd += ["--case", name]
            procs.append((out, subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                text=True)))
        for out, proc in procs:
            try:
                _, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for _, p in procs:
                    p.kill()
                raise
            if not os.path.exists(out):
                raise RuntimeError(f"the compile subprocess failed (exit {proc.returncode}) before writing results:\n"
                                   f"{stderr[-4000:]}")
            with open(out) as f:
                results.update(json.load(f))
    return results


# ----------------------------------------------------------------------------------------- main
def _row(cells, widths):
    return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastrft.kernels.aot",
                                 description="Compile the Triton kernels' launch configurations for Hopper "
                                             "(sm_90a) with Triton's bundled ptxas; no GPU needed.")
    ap.add_argument("--full", action="store_true", help="also the cases marked full_only")
    ap.add_argument("--module", action="append", help=f"kernel modules to gather (default: {', '.join(MODULES)})")
    ap.add_argument("--case", action="append", help="only the cases of this name (repeatable)")
    ap.add_argument("--json", metavar="PATH", help="write results as JSON (name -> fields or {error})")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        ap.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled for a GPU")
    cases = all_cases(args.full or bool(args.case), tuple(args.module or MODULES))
    if args.case:
        unknown = set(args.case) - {c.name for c in cases}
        if unknown:
            ap.error(f"no compile case named {', '.join(sorted(unknown))}")
        cases = [c for c in cases if c.name in set(args.case)]
    results: dict[str, dict] = {}
    widths = (max([len(c.name) for c in cases] + [4]), 5, 10, 10, 11, 6)
    table = args.json is None
    if table:
        print(_row(("case", "regs", "spill st B", "spill ld B", "shared KiB", "status"), widths), flush=True)
    failed = 0
    start = time.perf_counter()
    for case in cases:
        try:
            res = compile_case(case)
        except Exception as e:  # noqa: BLE001 - every compile failure is a gate result
            results[case.name] = {"error": f"{type(e).__name__}: {e}"}
            failed += 1
            if table:
                print(_row((case.name, "-", "-", "-", "-", "ERROR"), widths), flush=True)
                print(f"    {type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        results[case.name] = dataclasses.asdict(res)
        problems = check(res, case)
        failed += bool(problems)
        if table:
            status = "ok" if not problems else "FAIL: " + "; ".join(problems)
            if not case.spill_free and not problems and (res.spill_stores or res.spill_loads):
                status = "ok (spills allowed)"
            print(_row((case.name, res.registers, res.spill_stores, res.spill_loads,
                        f"{res.shared_bytes / 1024:.1f}", status), widths), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f)
    else:
        print(f"{len(cases)} cases, {failed} failing, {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
