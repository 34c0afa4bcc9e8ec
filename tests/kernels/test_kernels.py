"""The fused LM-head log-prob / entropy kernel against a float64 reference, forward and backward.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py); on a
GPU the same tests run the compiled kernels. Tolerances are tied to the precision of the inputs:
- fp32: the kernel accumulates in fp32 like the reference does, so logp/entropy agree to ~1e-6 and the
  gradients to ~1e-6 of their largest entry (bounds 2e-5 / 2e-5 leave a 10x margin);
- fp16/bf16: the float64 reference sees the SAME rounded inputs, so logp/entropy still only carry fp32
  accumulation error (bound 1e-4); the gradients are returned in the input dtype, so they carry its
  rounding, at most eps/2 relative to each entry, plus the rounding of dz fed to the tensor cores on
  GPU: bounded by 2 * eps(dtype) of the largest entry. The tests also check that the kernel is never
  worse than 2x PyTorch's own low-precision path on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from fastrft.kernels import HAVE_TRITON, linear_logprob, linear_logprob_reference

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install 'fastrft[test]')")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _inputs(n, h, v, dtype, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype).to(DEVICE)
    weight = (torch.randn(v, h, generator=g) * scale).to(dtype).to(DEVICE)
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    return hidden, weight, targets


def _run(fn, hidden, weight, targets, g_logp, g_ent, **kw):
    """Forward, then backward of sum(logp * g_logp + entropy * g_ent); returns outputs and grads."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    logp, ent = fn(h, w, targets, **kw)
    ((logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _reference(hidden, weight, targets, temperature, compute_dtype=torch.float64):
    return lambda h, w, t, **kw: linear_logprob_reference(h, w, t, temperature=temperature, with_entropy=True,
                                                          compute_dtype=compute_dtype, chunk=None)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


SHAPES = [(37, 48, 1003), (1, 16, 17), (64, 96, 515), (130, 40, 2049), (33, 24, 300)]


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature,splits,chunk", [(1.0, None, None), (0.7, 3, 16), (1.3, 1, 50)])
def test_forward_backward_against_float64(n, h, v, dtype, temperature, splits, chunk):
    hidden, weight, targets = _inputs(n, h, v, dtype, seed=n + v)
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    out = _run(lambda *a, **k: linear_logprob(*a, **k, with_entropy=True, temperature=temperature, backend="triton",
                                              splits=splits, chunk=chunk), hidden, weight, targets, g_logp, g_ent)
    ref = _run(_reference(hidden, weight, targets, temperature), hidden.double(), weight.double(), targets, g_logp,
               g_ent)
    logp, ent, dh, dw = out
    assert logp.dtype == ent.dtype == torch.float32 and dh.dtype == dw.dtype == dtype
    fwd_tol = 2e-5 if dtype == torch.float32 else 1e-4
    assert (logp.double() - ref[0]).abs().max() <= fwd_tol
    assert (ent.double() - ref[1]).abs().max() <= fwd_tol
    grad_tol = 2e-5 if dtype == torch.float32 else 2 * EPS[dtype]
    assert _rel(dh, ref[2]) <= grad_tol
    assert _rel(dw, ref[3]) <= grad_tol
    if dtype != torch.float32 and DEVICE == "cuda":
        # Never worse than 2x PyTorch's own low-precision path on the same inputs.
        low = _run(_reference(hidden, weight, targets, temperature, compute_dtype=dtype), hidden, weight, targets,
                   g_logp, g_ent)
        assert (logp.double() - ref[0]).abs().max() <= 2 * (low[0].double() - ref[0]).abs().max() + 1e-6


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_backward_with_one_upstream_gradient(which):
    """Only one output feeds the loss: the other term must be absent, not zero-filled noise."""
    hidden, weight, targets = _inputs(29, 32, 257, torch.float32, seed=5)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = linear_logprob(h, w, targets, with_entropy=True, backend="triton")
    (logp if which == "logp" else ent).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    rl, re_ = linear_logprob_reference(h64, w64, targets, with_entropy=True, compute_dtype=torch.float64, chunk=None)
    (rl if which == "logp" else re_).sum().backward()
    assert _rel(h.grad, h64.grad) < 2e-5 and _rel(w.grad, w64.grad) < 2e-5


def test_only_hidden_needs_grad():
    hidden, weight, targets = _inputs(20, 32, 100, torch.float32, seed=6)
    h = hidden.clone().requires_grad_()
    logp, _ = linear_logprob(h, weight, targets, backend="triton")
    logp.sum().backward()
    h64 = hidden.double().requires_grad_()
    linear_logprob_reference(h64, weight.double(), targets, compute_dtype=torch.float64, chunk=None)[0].sum().backward()
    assert weight.grad is None and _rel(h.grad, h64.grad) < 2e-5


def test_empty_batch():
    hidden, weight, targets = _inputs(0, 32, 50, torch.float32)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = linear_logprob(h, w, targets, with_entropy=True, backend="triton")
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 32) and torch.count_nonzero(w.grad) == 0


def test_non_contiguous_inputs_are_read_through_their_strides():
    hidden, weight, targets = _inputs(40, 32, 300, torch.float32, seed=7)
    h_nc = hidden.T.contiguous().T  # column-major (N, H)
    w_wide = torch.zeros(300, 64, device=DEVICE)
    w_wide[:, ::2] = weight
    w_nc = w_wide[:, ::2]  # stride 2 along H
    t_nc = torch.stack([targets, targets], 1)[:, 0]  # stride 2
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous() or t_nc.is_contiguous())
    g = torch.randn(40, device=DEVICE)
    a = _run(lambda *x, **k: linear_logprob(*x, with_entropy=True, backend="triton"), hidden, weight, targets, g, g)
    b = _run(lambda *x, **k: linear_logprob(*x, with_entropy=True, backend="triton"), h_nc, w_nc, t_nc, g, g)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


_INT64_SCRIPT = r"""
import json, sys, torch
from fastrft.kernels import linear_logprob, linear_logprob_reference
operand, device = sys.argv[1], sys.argv[2]
h_dim, stride, n = 64, 2**19, 4097
big = torch.empty(n * stride + h_dim, dtype=torch.float16, device=device)
view = big.as_strided((n, h_dim), (stride, 1))
g = torch.Generator().manual_seed(9)
view.copy_((torch.randn(n, h_dim, generator=g) * 0.3).half())
small = (torch.randn(257 if operand == "hidden" else 3, h_dim, generator=g) * 0.3).half().to(device)
hidden, weight = (view, small) if operand == "hidden" else (small, view)
targets = torch.randint(0, weight.shape[0], (hidden.shape[0],), generator=g).to(device)
h = hidden.detach().requires_grad_()
w = weight.detach().requires_grad_()
logp, _ = linear_logprob(h, w, targets, backend="triton")
logp.sum().backward()
h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
ref = linear_logprob_reference(h64, w64, targets, compute_dtype=torch.float64, chunk=None)[0]
ref.sum().backward()
rel = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())
print(json.dumps({"logp": float((logp.double() - ref).abs().max()), "dh": rel(h.grad, h64.grad),
                  "dw": rel(w.grad, w64.grad)}))
"""


@pytest.mark.parametrize("operand", ["hidden", "weight"])
def test_int64_offsets_beyond_2_31_elements(operand):
    """4097 rows at a row stride of 2^19 elements put the last row at element 2^31: int32 index
    arithmetic would wrap (and read out of bounds). The 4 GiB buffer is virtual: only the rows the
    kernel reads are touched. Run in a subprocess so that an out-of-bounds access fails this test
    instead of killing the test session."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _INT64_SCRIPT, operand, DEVICE], capture_output=True, text=True,
                          timeout=600, env={**os.environ})
    assert proc.returncode == 0, f"kernel crashed or failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    assert err["logp"] < 1e-4
    assert err["dh"] < 2 * EPS[torch.float16] and err["dw"] < 2 * EPS[torch.float16]


@pytest.mark.parametrize("bad,match", [
    (dict(targets=torch.tensor([0, 5, 50])), r"targets must lie in \[0, V=50\); found 50"),
    (dict(targets=torch.tensor([0, -1, 3])), r"found -1"),
    (dict(targets=torch.tensor([0.0, 1.0, 2.0])), "targets must be int64"),
    (dict(targets=torch.tensor([0, 1])), r"targets must be \(3,\)"),
    (dict(weight=torch.randn(50, 7)), "hidden has H=8 but weight has H=7"),
    (dict(weight=torch.randn(50, 8, dtype=torch.float64)), "one dtype of float32/float16/bfloat16"),
    (dict(hidden=torch.randn(3, 2, 4)), r"hidden must be \(N, H\)"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(backend="cuda"), "backend 'cuda' is unknown"),
    (dict(chunk=0), "chunk must be a positive number of rows"),
])
def test_refused_inputs(bad, match):
    args = dict(hidden=torch.randn(3, 8), weight=torch.randn(50, 8), targets=torch.tensor([0, 1, 2]),
                temperature=1.0, backend="triton")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        linear_logprob(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


def test_auto_backend_uses_reference_on_cpu_and_matches_triton():
    hidden, weight, targets = _inputs(50, 32, 333, torch.float32, seed=11)
    if DEVICE == "cpu":
        auto = linear_logprob(hidden, weight, targets, with_entropy=True)
        tri = linear_logprob(hidden, weight, targets, with_entropy=True, backend="triton")
        for a, b in zip(auto, tri):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [None, 13])
def test_cpu_path_forward_backward_against_float64(dtype, chunk):
    """The PyTorch path (backend "reference", what CPU tensors run) is the same chunk loop with torch
    matmuls: fp32 accumulation, so fp32 tolerances; bf16 gradients carry their own rounding."""
    n, h, v = 45, 24, 777
    hidden, weight, targets = _inputs(n, h, v, dtype, seed=21)
    g = torch.Generator().manual_seed(2)
    g_logp, g_ent = torch.randn(n, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    out = _run(lambda *a, **k: linear_logprob(*a, **k, with_entropy=True, temperature=0.9, backend="reference",
                                              chunk=chunk), hidden, weight, targets, g_logp, g_ent)
    ref = _run(_reference(hidden, weight, targets, 0.9), hidden.double(), weight.double(), targets, g_logp, g_ent)
    assert (out[0].double() - ref[0]).abs().max() <= 2e-5 and (out[1].double() - ref[1]).abs().max() <= 2e-5
    grad_tol = 2e-5 if dtype == torch.float32 else 2 * EPS[dtype]
    assert _rel(out[2], ref[2]) <= grad_tol and _rel(out[3], ref[3]) <= grad_tol


GRID_AXIS_LIMITS = (2**31 - 1, 65_535, 65_535)  # CUDA's grid: x is unbounded in practice, y and z are not


def test_many_rows_no_grid_overflow(monkeypatch):
    """N = 65,600 rows (more than a 65,535 grid axis holds): rows live on the unbounded grid axis.

    On a GPU the launches run for real and are checked against float64. Triton's interpreter enforces no
    grid limit, so on CPU every launch of the forward and backward is recorded instead of run (the numbers
    are checked at odd shapes above), at N and 2N rows: every grid axis stays within CUDA's limit, and only
    the first (unbounded) axis grows with N, so no row count can overflow the others."""
    n, h, v = 65_600, 16, 40
    triton_fn = lambda *a, **k: linear_logprob(*a, with_entropy=True, backend="triton")  # noqa: E731
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        def launches(rows):
            grids = []

            def record(self, *args, grid, warmup, **kwargs):
                grids.append((self.fn.__name__, tuple(grid(kwargs) if callable(grid) else grid)))

            with monkeypatch.context() as m:
                m.setattr(InterpretedFunction, "run", record)
                hidden, weight, targets = _inputs(rows, h, v, torch.float32, seed=12, scale=1.0)
                g_logp = torch.ones(rows)
                _run(triton_fn, hidden, weight, targets, g_logp, g_logp)
            return grids

        once, twice = launches(n), launches(2 * n)
        names = [name for name, _ in once]
        assert {"_logits_stats_kernel", "_dz_kernel", "_dh_kernel", "_dw_kernel"} <= set(names), names
        assert names == [name for name, _ in twice]
        for (name, grid), (_, grid2) in zip(once, twice):
            assert all(0 < g <= limit for g, limit in zip(grid2, GRID_AXIS_LIMITS)), (name, grid2)
            assert grid2[1:] == grid[1:], f"{name}: a grid axis other than the first grows with the rows"
        assert any(g2[0] > g[0] for (_, g), (_, g2) in zip(once, twice))  # the rows are on the first axis
        return
    hidden, weight, targets = _inputs(n, h, v, torch.float32, seed=12, scale=1.0)
    g_logp = torch.ones(n, device=DEVICE)
    out = _run(triton_fn, hidden, weight, targets, g_logp, g_logp)
    ref = _run(_reference(hidden, weight, targets, 1.0), hidden.double(), weight.double(), targets, g_logp, g_logp)
    assert (out[0].double() - ref[0]).abs().max() <= 2e-5
    assert _rel(out[2], ref[2]) <= 2e-5 and _rel(out[3], ref[3]) <= 2e-5


def test_fp16_backward_keeps_the_vocabulary_tail():
    """A peaked distribution whose tail (2,047 tokens of p ~ 4e-11) shares one direction of W: column 1
    of dH comes from the tail alone. Each tail term g * p_j ~ 4e-7 is subnormal in fp16 (2-3 bits of
    precision), so a backward that rounded dz to fp16 would get it wrong by ~10%; the true sum, ~8e-4,
    is a normal fp16 number."""
    n, h, v = 8, 16, 2048
    g = torch.Generator().manual_seed(13)
    targets = torch.full((n,), 5)
    weight = torch.zeros(v, h)
    weight[:, 1] = 1.0  # the tail's shared direction
    weight[:, 2:] = 0.05 * torch.randn(v, h - 2, generator=g)
    weight[targets, 0], weight[targets, 1] = 3.0, 0.0
    hidden = torch.zeros(n, h)
    hidden[:, 0] = 8.0  # target logit 24 = 8 * 3; tail logits ~ 0
    hidden, weight = hidden.half().to(DEVICE), weight.half().to(DEVICE)
    targets = targets.to(DEVICE)
    upstream = torch.full((n,), 1e4, device=DEVICE)
    out = _run(lambda *a, **k: linear_logprob(*a, with_entropy=True, backend="triton"), hidden, weight, targets,
               upstream, torch.zeros(n, device=DEVICE))
    ref = _run(_reference(hidden, weight, targets, 1.0), hidden.double(), weight.double(), targets, upstream,
               torch.zeros(n, dtype=torch.float64, device=DEVICE))
    tail_col = ref[2][:, 1]
    assert tail_col.abs().min() > 1e-4  # the tail really carries this column
    assert (out[2][:, 1].double() - tail_col).abs().max() <= 2 * EPS[torch.float16] * tail_col.abs().max()


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU every test already runs the CUDA tiles")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_tile_table_in_the_interpreter(dtype, monkeypatch):
    """The tiles a GPU launch takes from TILES (16-row dz tiles, 128 x 128 x 64 GEMM tiles for bf16, ...),
    run through the interpreter at odd shapes smaller and larger than a tile: the masks at every edge."""
    from fastrft.kernels import lm_head_triton as tri

    monkeypatch.setattr(tri, "tile", lambda kernel, dt, h, device: tri.TILES[(kernel, tri._DTYPE_NAMES[dt],
                                                                              tri.shape_class(h))])
    n, h, v = 150, 72, 301
    hidden, weight, targets = _inputs(n, h, v, dtype, seed=31)
    g = torch.Generator().manual_seed(3)
    g_logp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    out = _run(lambda *a, **k: linear_logprob(*a, **k, with_entropy=True, temperature=0.8, backend="triton",
                                              chunk=130), hidden, weight, targets, g_logp, g_ent)
    ref = _run(_reference(hidden, weight, targets, 0.8), hidden.double(), weight.double(), targets, g_logp, g_ent)
    fwd_tol = 2e-5 if dtype == torch.float32 else 1e-4
    assert (out[0].double() - ref[0]).abs().max() <= fwd_tol and (out[1].double() - ref[1]).abs().max() <= fwd_tol
    grad_tol = 2e-5 if dtype == torch.float32 else 2 * EPS[dtype]
    assert _rel(out[2], ref[2]) <= grad_tol and _rel(out[3], ref[3]) <= grad_tol
