"""Compile gate: every configuration the Triton launchers produce for CUDA tensors compiles for Hopper
(sm_90a) with Triton's bundled ptxas, on this CPU machine, and then fits: no register spills (in the
cases marked spill_free, the LM-head and attention kernels) and at most 227 KiB of shared memory.

No GPU is needed and none is asked for: the test is skipped only when triton is not installed. The
cases come from each kernel module's ``compile_cases`` (see ``fastrft/kernels/aot.py``, the module
``fastrft.kernels.aot``); they compile in subprocesses (one per core) without TRITON_INTERPRET (conftest.py sets it for
the session on CPU, and interpreter functions cannot be compiled), only those pytest selected.

The default run compiles the model shapes (~1 s a case). The full set adds every tile-table entry at
its class's largest shape and the other block sizes (~3 min for paged attention alone on 2 cores):

    FASTRFT_HOPPER_FULL=1 python -m pytest tests/kernels/test_compile_gate.py                 # everything
    FASTRFT_HOPPER_FULL=1 python -m pytest -m hopper_full tests/kernels/test_compile_gate.py  # the full-only cases

The same cases as a table (registers, spills, shared memory): ``python -m fastrft.kernels.aot --full``.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'fastrft[test]'); the compile gate "
                                     "needs its compiler and bundled ptxas, not a GPU")

from fastrft.kernels import aot  # noqa: E402

FULL = os.environ.get("FASTRFT_HOPPER_FULL", "0") == "1"
CASES = {case.name: case for case in aot.all_cases(full=FULL)}


@pytest.fixture(scope="module")
def compiled(request) -> dict[str, dict]:
    """All selected cases of test_case_fits, compiled in subprocesses, one per core."""
    names = [item.callspec.params["name"] for item in request.session.items
             if item.module.__name__ == __name__ and getattr(item, "originalname", "") == "test_case_fits"]
    return aot.compile_isolated(full=FULL, names=names) if names else {}


@pytest.mark.parametrize("name", [pytest.param(name, id=name, marks=[pytest.mark.hopper_full] if case.full_only else [])
                                  for name, case in CASES.items()])
def test_case_fits(name, compiled):
    res = compiled[name]
    assert "error" not in res, f"{name} does not compile for sm_90a:\n{res['error'][-4000:]}"
    result = aot.CompileResult(**res)
    problems = aot.check(result, CASES[name])
    assert not problems, f"{name}: {'; '.join(problems)}\nptxas:\n{result.ptxas_log}"


if not FULL:
    @pytest.mark.hopper_full
    def test_full_set_needs_the_switch():
        pytest.skip("the full compile gate runs with FASTRFT_HOPPER_FULL=1 "
                    "(FASTRFT_HOPPER_FULL=1 python -m pytest -m hopper_full tests/kernels/test_compile_gate.py)")


# ----------------------------------------------------------------------------------------- the gate can fail
NEGATIVE_MODULE = '''
import dataclasses

import triton
import triton.language as tl

from fastrft.kernels import paged_attention as pa
from fastrft.kernels.aot import CompileCase


@triton.jit
def _matmul(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.arange(0, BLOCK_M)
    n = tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + m[:, None] * K + (k0 + k)[None, :])
        b = tl.load(b_ptr + (k0 + k)[:, None] * BLOCK_N + n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + m[:, None] * BLOCK_N + n[None, :], acc)


@triton.jit
def _not_pow2(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)


def compile_cases(full):
    # The decode tile the launcher used before the table (BLOCK_N=16 at 4 warps for head_dim 128, group 6).
    case = next(c for c in pa.compile_cases(False) if c.name == "pa-decode-split-bf16-qwen2.5-1.5b")
    old = dataclasses.replace(case, name="old-decode-tile", constexprs={**case.constexprs, "BLOCK_N": 16},
                              num_warps=4)
    # 4 stages of 64x256 + 256x256 fp16 operand tiles: 640 KiB of shared memory.
    big = CompileCase("big-shared", _matmul, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32:16"},
                      {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 256}, num_warps=8, num_stages=4, spill_free=False)
    bad = CompileCase("not-pow2", _not_pow2, {"x_ptr": "*fp32"}, {"BLOCK": 3}, num_warps=1, num_stages=1)
    return [old, big, bad]
'''


def test_gate_catches_spills_shared_memory_and_compile_errors(tmp_path):
    (tmp_path / "gate_negative.py").write_text(textwrap.dedent(NEGATIVE_MODULE))
    res = aot.compile_isolated(modules=("gate_negative",), extra_path=tmp_path)
    # The pre-table decode tile (BLOCK_N=16, 4 warps) for Qwen2.5-1.5B: the measured 255 registers + spills.
    old = aot.CompileResult(**res["old-decode-tile"])
    assert old.spill_stores > 0 and old.registers >= 250, old.ptxas_log
    spill_case = aot.CompileCase("old-decode-tile", None, {}, {}, 4, 3)
    assert any("spill" in p for p in aot.check(old, spill_case))
    big = aot.CompileResult(**res["big-shared"])
    assert big.shared_bytes > aot.SHARED_LIMIT
    assert any("shared memory" in p for p in aot.check(big, aot.CompileCase("big", None, {}, {}, 8, 4,
                                                                           spill_free=False)))
    assert "power of 2" in res["not-pow2"]["error"]


def test_check_and_log_parsing():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size\n")
    assert aot.parse_ptxas_log(log) == (255, 8, 4)
    with pytest.raises(RuntimeError, match="ptxas log"):
        aot.parse_ptxas_log("nothing here")
    res = aot.CompileResult("k", 255, 8, 4, 1024, log)
    case = aot.CompileCase("k", None, {}, {}, 4, 3)
    assert len(aot.check(res, case)) == 1
    assert aot.check(res, dataclasses.replace(case, spill_free=False)) == []
    assert aot.check(dataclasses.replace(res, spill_stores=0, spill_loads=0, shared_bytes=aot.SHARED_LIMIT), case) == []
    assert aot.int_args(a=1, b=64, c=12, d=2**31) == ({"b": "i32:16", "c": "i32", "d": "i64:16"}, {"a": 1})


def test_cases_must_name_every_parameter():
    case = CASES["pa-decode-split-bf16-qwen2.5-1.5b"]
    aot.validate_case(case)
    missing = dataclasses.replace(case, signature={k: v for k, v in list(case.signature.items())[1:]})
    with pytest.raises(ValueError, match="exactly one of signature and constexprs"):
        aot.validate_case(missing)
    first = next(iter(case.signature))
    with pytest.raises(ValueError, match="not one of"):
        aot.validate_case(dataclasses.replace(case, signature={**case.signature, first: "*float"}))
    constexpr = "BLOCK_N"  # a tl.constexpr parameter
    moved = dataclasses.replace(case, signature={**case.signature, constexpr: "i32"},
                                constexprs={k: v for k, v in case.constexprs.items() if k != constexpr})
    with pytest.raises(ValueError, match="tl.constexpr"):
        aot.validate_case(moved)


def test_every_module_lists_its_cases(monkeypatch, tmp_path):
    (tmp_path / "no_cases.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="no compile_cases"):
        aot.all_cases(False, modules=("no_cases",))


# ----------------------------------------------------------------------------------------- every launcher
def _launched_kernels() -> set[str]:
    """module.function of every ``@triton.jit`` function that code in fastrft/kernels launches
    (``fn[grid](...)``), read from the source."""
    import ast
    from pathlib import Path

    found = set()
    for path in sorted((Path(aot.__file__).parent).glob("*.py")):
        tree = ast.parse(path.read_text())
        jitted = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                  and any("triton.jit" in ast.unparse(d) for d in f.decorator_list)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in jitted):
                found.add(f"fastrft.kernels.{path.stem}.{node.func.value.id}")
    return found


def test_every_launched_kernel_has_a_compile_case():
    """The gate finds every launcher in the package: a kernel launched somewhere in fastrft/kernels but
    listed by no module's compile_cases would never be compiled for sm_90a before a GPU sees it."""
    launched = _launched_kernels()
    assert len(launched) >= 10, launched  # the scan itself works (the kernels live in fastrft/kernels/)
    covered = {f"{aot._python_fn(c.fn).__module__}.{aot._python_fn(c.fn).__name__}" for c in aot.all_cases(full=True)}
    assert launched - covered == set()
