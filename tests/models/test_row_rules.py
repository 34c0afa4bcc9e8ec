"""The exact mode on any x86 CPU: row rules (fastrft.models.row_rules) under simulated BLAS behaviours.

The developers' and CI machines are Intel Xeons (MKL, AVX-512, AMX) or AMD EPYCs (AVX2 only), and each
BLAS rounds some GEMMs by row count in its own way. These tests put a simulated BLAS under every GEMM of
the exact CPU path (:func:`row_rules.gemm`: the linear layers, the LM head in the engine and the trainer,
the attention tiles), so the other vendor's behaviour is covered on whichever machine runs them:

- ``amd_like``: a call of fewer than 4 rows comes out one ulp off (MKL's fp32 GEMM on an AMD EPYC,
  measured: 1-3 rows differ from 4 or more, 4+ all agree);
- ``hopeless``: the last row of every call comes out one ulp off, so a row's bits always depend on its
  place in its call: no rule can fix that BLAS.

A last test runs the probe in a process whose MKL, oneDNN, ATen and OpenBLAS are held to AVX2, as on an
AMD EPYC.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from fastrft.cli import main
from fastrft.models import exact, row_rules
from fastrft.models.row_rules import RowRule, Site
from fastrft.trainer import Trainer

from conftest import exact_config
from conftest import run_counting_preemptions as run

REAL_GEMM = row_rules.gemm


def _ulp_up(y: torch.Tensor) -> None:
    y.copy_(torch.nextafter(y, torch.full_like(y, float("inf"))))


def amd_like(a, b, bias=None, packed=None, out=None):
    y = REAL_GEMM(a, b, bias, packed, out)
    if a.shape[-2] < 4:
        _ulp_up(y)
    return y


def hopeless(a, b, bias=None, packed=None, out=None):
    y = REAL_GEMM(a, b, bias, packed, out)
    _ulp_up(y.narrow(-2, y.shape[-2] - 1, 1))
    return y


@pytest.fixture
def blas(monkeypatch):
    """use(fn): every GEMM of the exact CPU path goes through ``fn``; the rules are probed afresh, and
    forgotten again afterwards (the next test probes the real BLAS)."""
    def use(fn):
        monkeypatch.setattr(row_rules, "gemm", fn)
        row_rules.forget()

    yield use
    row_rules.forget()


def test_the_probe_finds_what_each_blas_needs(blas):
    blas(amd_like)
    assert row_rules.choose(Site("linear", 40, 96, torch.float32)).rule == RowRule(0, 4)
    assert row_rules.choose(Site("head", 64, 83, torch.float32)).rule == RowRule(0, 4)
    assert row_rules.choose(Site("attention", 16, 2, torch.float32)).rule == RowRule(0, 4)
    # bf16's 32-row blocks with unpadded small calls: a decode batch of 1-3 rows would round apart.
    assert row_rules.choose(Site("linear", 40, 96, torch.bfloat16, True)).rule == RowRule(32, 32)
    blas(hopeless)
    with pytest.raises(row_rules.RowRuleError, match="one call; one call padded to >= 2 rows;.*blocks of 4 rows"):
        row_rules.choose(Site("linear", 40, 96, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chosen_rule_makes_rows_invariant_where_plain_calls_are_not(blas, dtype):
    blas(amd_like)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    x = torch.randn(300, 40, generator=g).to(dtype)
    full = exact.linear(x, w, b)
    for s, m in ((0, 1), (5, 1), (7, 2), (0, 3), (1, 4), (3, 33), (0, 299)):
        assert torch.equal(exact.linear(x[s:s + m], w, b), full[s:s + m]), (s, m)
    with torch.no_grad():  # the engine's forward (pre-packed where the probe allowed it) has the same bits
        assert torch.equal(exact.linear(x[2:3], w.requires_grad_(), b), full[2:3])
    plain = row_rules.gemm(x[:1], w.T, b)
    assert not torch.equal(plain, row_rules.gemm(x[:8], w.T, b)[:1])  # the simulation does bite


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_logprobs_stay_exact_under_a_blas_that_rounds_by_row_count(tiny_llama, tmp_path, blas, monkeypatch,
                                                                   precision):
    """The end-to-end check of tests/models/test_exact.py (G = 8, preemption, a budget that cuts steps, PPO)
    on the AMD-like BLAS: the probe pads the small calls, and logp_gap_max is exactly 0 in every round.
    With the rules forced to plain calls the same run has a gap: the check can fail."""
    blas(amd_like)
    cfg = exact_config(tiny_llama, tmp_path / "ruled", precision=precision, rounds=2, ppo_epochs=2, mini_batches=2)
    trainer, rounds, preempted = run(cfg, count_preemptions=True)
    assert trainer.ops.name == "exact-torch" and preempted > 0
    chosen = {s.kind: c.rule for s, c in row_rules._CHOSEN.items() if s.dtype == torch.float32}
    assert chosen == {"linear": RowRule(0, 4), "head": RowRule(0, 4), "attention": RowRule(0, 4)} or \
        precision == "bf16-mixed" and chosen == {"head": RowRule(0, 4), "attention": RowRule(0, 4)}
    trained = [r for r in rounds if not r["skipped"]]
    assert trained and [r["logp_gap_max"] for r in trained] == [0.0] * len(trained)
    if precision == "fp32":
        row_rules.forget()
        monkeypatch.setattr(row_rules, "probe", lambda site: row_rules.Choice(row_rules.PLAIN))
        _, plain_rounds, _ = run(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out=str(tmp_path / "p"))))
        assert max(r["logp_gap_max"] for r in plain_rounds if not r["skipped"]) > 0


def test_auto_runs_with_the_mode_off_where_nothing_can_make_it_exact(tiny_llama, tmp_path, blas, capsys):
    """--exact-logprobs auto with PPO epochs (where auto turns the mode on) never stops a run: one line
    says why the mode is off, and the run trains."""
    blas(hopeless)
    cfg = exact_config(tiny_llama, tmp_path / "auto", mode="auto", rounds=1, ppo_epochs=2)
    trainer = Trainer(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "exact-logprobs" in line]
    assert len(lines) == 1 and "--exact-logprobs auto: off on this machine" in lines[0], err
    assert "rules tried" in lines[0]
    assert trainer.ops.name == "plain" and not trainer.precision.train_model.exact
    assert trainer.run()["complete"]


def test_on_is_refused_in_one_line_and_nothing_is_written(tiny_llama, tmp_path, blas, capsys):
    blas(hopeless)
    out = tmp_path / "on"
    with pytest.raises(exact.ExactModeError, match="rules tried.*--exact-logprobs off"):
        Trainer(exact_config(tiny_llama, out))
    assert not out.exists()
    code = main(["train", "--model", str(tiny_llama), "--rounds", "1", "--exact-logprobs", "on", "--ppo-epochs", "2",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("fastrft: error: exact log-probs"), err
    assert "blocks of 32 rows" in err and "Traceback" not in err
    assert not out.exists()


def test_prepacked_weights_are_probed_not_assumed(blas, monkeypatch):
    """On a CPU without AVX-512 or AVX-NE-CONVERT, oneDNN's bf16 reorder raises: the probe takes the
    plain blocked calls, with the same bits, and nothing raises."""
    def no_avx512(weight, rows):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or "
                           "avx512bw, avx512vl and avx512dq")

    blas(REAL_GEMM)
    monkeypatch.setattr(row_rules, "reorder", no_avx512)
    choice = row_rules.choose(Site("linear", 40, 96, torch.bfloat16, False))
    assert not choice.packed and choice.rule.block
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 40, generator=g).bfloat16().requires_grad_()
    x = torch.randn(70, 40, generator=g).bfloat16()
    trained = exact.linear(x, w, None)
    with torch.no_grad():
        assert torch.equal(exact.linear(x, w, None), trained)
        assert torch.equal(exact.linear(x[3:4], w, None), trained[3:4])


AVX2_PROBE = r"""
import torch, fastrft
from fastrft.models import exact, row_rules
from fastrft.kernels import exact_triton as et
print("isa", torch.backends.cpu.get_cpu_capability())
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for k, n in ((64, 96), (96, 64)):
        choice = row_rules.choose(row_rules.Site("linear", k, n, dtype))
        w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(200, k, generator=g).to(dtype)
        full = exact.linear(x, w, None)
        with torch.no_grad():
            assert all(torch.equal(exact.linear(x[s:s + m], w, None), full[s:s + m])
                       for s, m in ((0, 1), (3, 2), (5, 3), (1, 4), (7, 33), (0, 199))), (dtype, k, n, choice)
        print("linear", dtype, k, n, choice.rule, "packed" if choice.packed else "plain")
print("attention", row_rules.choose(row_rules.Site("attention", 16, 2, torch.float32)).rule)
w, x = torch.randn(70, 40, generator=g), torch.randn(90, 40, generator=g)
full = et.linear(x, w, None)  # the Triton interpreter on numpy's AVX2 OpenBLAS
assert all(torch.equal(et.linear(x[-m:], w, None), full[-m:]) for m in (1, 3, 17, 65))
print("ok")
"""


def test_the_probe_on_an_avx2_only_machine():
    """MKL, oneDNN, ATen's kernels and numpy's OpenBLAS held to AVX2 (an AMD EPYC's instruction set): the
    probe chooses a rule for every site without raising, the rows are invariant under it, and the Triton
    interpreter's dots are invariant on OpenBLAS's AVX2 kernels."""
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2",
               OPENBLAS_CORETYPE="Haswell", TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", AVX2_PROBE], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("ok"), res.stdout + res.stderr[-3000:]
    assert "isa AVX2" in res.stdout, res.stdout
