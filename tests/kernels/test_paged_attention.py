"""Paged KV cache kernels: store_kv and split-K decode attention, against independent references.

On CPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py); on a
GPU the same tests run the compiled kernels. The decode oracle is built here, not from the module: each
sequence's K/V is drawn contiguous, scattered into pages through a randomly permuted block table whose
unused slots hold garbage (V = 1e4, so a wrongly read slot moves the output by ~1e4 * its softmax weight),
and plain softmax attention over the contiguous K/V in float64 is the truth. Tolerances:
- fp32: inputs are exact in fp32 and the kernel accumulates in fp32, so the error is ~1e-7 * a few
  hundred terms of O(1) values: bound 1e-5.
- fp16/bf16: the float64 truth sees the SAME rounded inputs, so the kernel's only real error is the
  final rounding of its fp32 result to the output dtype, at most half an ulp: bound 2 * eps(dtype) * |ref|
  per element (eps = ulp at 1.0) plus 1e-5 for the fp32 part. Also never worse than 2x the same attention
  computed by PyTorch in that dtype.
"""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest
import torch

from fastrft.kernels.paged_attention import (HAVE_TRITON, paged_attention_decode, paged_attention_decode_reference,
                                             store_kv, store_kv_reference)

pa = importlib.import_module("fastrft.kernels.paged_attention")
#: The paged-attention modules: the checks and functionals, the launchers and kernels, the tile table.
KERNEL_FILES = {importlib.import_module(f"fastrft.kernels.{m}").__file__
                for m in ("paged_attention", "paged_attention_triton", "paged_attention_tiles")}

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install 'fastrft[test]')")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
GARBAGE_V = 1e4
CTX = [1, 17, 255, 256, 257, 700]


def _paged(ctx_lens, hq, hkv, d, page, dtype, seed=0, q=None):
    """Random contiguous per-sequence K/V, scattered into pages via a permuted block table.
    Returns (q, k_cache, v_cache, block_tables, context_lens, ks, vs) with ks/vs the contiguous K/V."""
    g = torch.Generator().manual_seed(seed)
    used = [-(-n // page) for n in ctx_lens]
    max_blocks, num_blocks = max(used) + 1, sum(used) + 3  # trailing -1 columns and never-used blocks
    k_cache = torch.zeros(num_blocks, page, hkv, d, dtype=dtype)  # garbage: K = 0 gets real weight ...
    v_cache = torch.full((num_blocks, page, hkv, d), GARBAGE_V, dtype=dtype)  # ... and V = 1e4 shows it
    block_tables = torch.full((len(ctx_lens), max_blocks), -1, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=g)
    ks, vs, pos = [], [], 0
    for b, n in enumerate(ctx_lens):
        k = torch.randn(n, hkv, d, generator=g).to(dtype)
        v = torch.randn(n, hkv, d, generator=g).to(dtype)
        ids = perm[pos:pos + used[b]]
        pos += used[b]
        block_tables[b, :used[b]] = ids.int()
        for j, blk in enumerate(ids.tolist()):
            k_cache[blk, :len(k[j * page:(j + 1) * page])] = k[j * page:(j + 1) * page]
            v_cache[blk, :len(v[j * page:(j + 1) * page])] = v[j * page:(j + 1) * page]
        ks.append(k)
        vs.append(v)
    if q is None:
        q = torch.randn(len(ctx_lens), hq, d, generator=g).to(dtype)
    context_lens = torch.tensor(ctx_lens, dtype=torch.int32)
    to = lambda *ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    return (*to(q, k_cache, v_cache, block_tables, context_lens), ks, vs)


def _attention(q, ks, vs, scale, dtype):
    """Plain softmax attention per sequence over contiguous K/V, computed in ``dtype``."""
    outs = []
    for b, (k, v) in enumerate(zip(ks, vs)):
        rep = q.shape[1] // k.shape[1]
        k = k.to(dtype).repeat_interleave(rep, dim=1)
        v = v.to(dtype).repeat_interleave(rep, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].cpu().to(dtype), k) * scale, dim=-1)
        outs.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(outs)


def _check_close(out, ref64, dtype):
    err = (out.cpu().double() - ref64).abs()
    tol = 2 * EPS[dtype] * ref64.abs() + 1e-5
    assert out.dtype == dtype and out.shape == ref64.shape
    assert torch.isfinite(out).all()
    assert (err <= tol).all(), f"max err {err.max():.3g}, worst excess {(err - tol).max():.3g}"
    return err.max()


# ----------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("page", [16, 256])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_decode_against_float64_attention(page, d, hq, hkv, dtype, num_splits):
    q, kc, vc, bt, ctx, ks, vs = _paged(CTX, hq, hkv, d, page, dtype, seed=page + d + hq)
    scale = d**-0.5
    out = paged_attention_decode(q, kc, vc, bt, ctx, scale, num_splits=num_splits, backend="triton")
    ref64 = _attention(q, ks, vs, scale, torch.float64)
    err = _check_close(out, ref64, dtype)
    # The module's reference: fp32 compute meets the same bound; float64 compute equals the truth
    # up to the final rounding to the dtype.
    ref = paged_attention_decode_reference(q, kc, vc, bt, ctx, scale)
    _check_close(ref, ref64, dtype)
    torch.testing.assert_close(out, ref, atol=1e-5 + 4 * EPS[dtype], rtol=4 * EPS[dtype])
    exact = paged_attention_decode_reference(q, kc, vc, bt, ctx, scale, compute_dtype=torch.float64).cpu().double()
    subnormal_ulp = torch.finfo(dtype).smallest_normal * EPS[dtype]
    assert ((exact - ref64).abs() <= EPS[dtype] * ref64.abs() + subnormal_ulp).all()
    if dtype != torch.float32:
        low = _attention(q, ks, vs, scale, dtype).double()
        assert err <= 2 * (low - ref64).abs().max()


@pytest.mark.parametrize("ctx,hq,hkv,d,page", [
    ([3, 40, 1], 6, 2, 24, 1),      # block size 1, group of 3 (padded to 4), head_dim not a power of two
    ([33, 64, 65], 3, 1, 16, 32),   # all query heads on one kv head
    ([129], 4, 4, 64, 16),          # a single sequence
])
@pytest.mark.parametrize("num_splits", [1, 3, 10_000])
def test_decode_odd_shapes(ctx, hq, hkv, d, page, num_splits):
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(len(ctx), hq, 3 * d, generator=g).to(DEVICE)  # on the device, so the view stays strided
    q = wide[:, :, d:2 * d]  # a strided view, as q sliced out of a fused qkv projection
    q, kc, vc, bt, ctx_t, ks, vs = _paged(ctx, hq, hkv, d, page, torch.float32, seed=1, q=q)
    assert not q.is_contiguous()
    out = paged_attention_decode(q, kc, vc, bt, ctx_t, 0.3, num_splits=num_splits, backend="triton")
    _check_close(out, _attention(q, ks, vs, 0.3, torch.float64), torch.float32)


def test_decode_all_splits_but_first_empty_and_peaked_softmax():
    """Large scores (|s| ~ 100) exercise the running-max rescaling; a 1-token sequence next to a long
    one leaves every split after the first empty."""
    q, kc, vc, bt, ctx, ks, vs = _paged([1, 2, 300], 4, 2, 64, 16, torch.float32, seed=7)
    out = paged_attention_decode(q * 8, kc, vc, bt, ctx, 64**-0.5 * 2, num_splits=7, backend="triton")
    _check_close(out, _attention(q * 8, ks, vs, 64**-0.5 * 2, torch.float64), torch.float32)


def test_auto_backend_and_empty_batch():
    q, kc, vc, bt, ctx, ks, vs = _paged([5, 50], 4, 2, 32, 16, torch.float32, seed=2)
    auto = paged_attention_decode(q, kc, vc, bt, ctx, 0.2)
    tri = paged_attention_decode(q, kc, vc, bt, ctx, 0.2, backend="triton", num_splits=2)
    torch.testing.assert_close(auto, tri, atol=1e-5, rtol=1e-5)
    empty = paged_attention_decode(q[:0], kc, vc, bt[:0], ctx[:0], 0.2, backend="triton")
    assert empty.shape == (0, 4, 32)


def test_default_num_splits_depends_on_shapes_only():
    cpu = torch.device("cpu")
    assert pa.default_num_splits(1, 8, 1000, 16, cpu) == 1
    if DEVICE == "cuda":
        dev = torch.device("cuda")
        assert pa.default_num_splits(1, 8, 1024, 16, dev) == 16  # 16K tokens of capacity, few programs
        assert pa.default_num_splits(1, 8, 1, 16, dev) == 1  # capacity of 16 tokens: no split
        assert pa.default_num_splits(4096, 8, 1024, 16, dev) == 1  # B * Hkv fills the GPU already


# ----------------------------------------------------------------------------------------- store_kv
@pytest.mark.parametrize("page", [1, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_store_kv(page, dtype, slot_dtype):
    g = torch.Generator().manual_seed(page)
    t, hkv, d, num_blocks = 37, 2, 24, max(3, 80 // page)
    qkv = torch.randn(t, 3 * hkv, d, generator=g).to(dtype)
    k, v = qkv[:, hkv:2 * hkv], qkv[:, 2 * hkv:]  # strided views, as sliced out of a fused projection
    slots = torch.randperm(num_blocks * page, generator=g)[:t]
    slots[::5] = -1  # padding tokens
    sentinel = 7.0
    caches = [torch.full((num_blocks, page, hkv, d), sentinel, dtype=dtype, device=DEVICE) for _ in range(4)]
    k, v, slots = k.to(DEVICE), v.to(DEVICE), slots.to(slot_dtype).to(DEVICE)
    store_kv(k, v, caches[0], caches[1], slots, backend="triton")
    store_kv_reference(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    kf, vf = caches[0].view(-1, hkv, d).cpu(), caches[1].view(-1, hkv, d).cpu()
    written = torch.zeros(num_blocks * page, dtype=torch.bool)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(kf[s], k[i].cpu()) and torch.equal(vf[s], v[i].cpu())
            written[s] = True
    assert (kf[~written] == sentinel).all() and (vf[~written] == sentinel).all()
    assert written.sum() == (slots >= 0).sum().item()


def test_store_then_decode_round_trip():
    """The engine's order: store the new token's K/V, then attend over a context that includes it."""
    q, kc, vc, bt, ctx, ks, vs = _paged([20, 33], 4, 2, 32, 16, torch.float16, seed=4)
    g = torch.Generator().manual_seed(5)
    k_new = torch.randn(2, 2, 32, generator=g).half().to(DEVICE)
    v_new = torch.randn(2, 2, 32, generator=g).half().to(DEVICE)
    slots = torch.stack([bt[b, n // 16].long() * 16 + n % 16 for b, n in enumerate(ctx.tolist())])
    store_kv(k_new, v_new, kc, vc, slots, backend="triton")
    out = paged_attention_decode(q, kc, vc, bt, ctx + 1, 32**-0.5, num_splits=2, backend="triton")
    ks = [torch.cat([k, k_new[b, None].cpu()]) for b, k in enumerate(ks)]
    vs = [torch.cat([v, v_new[b, None].cpu()]) for b, v in enumerate(vs)]
    _check_close(out, _attention(q, ks, vs, 32**-0.5, torch.float64), torch.float16)


# ----------------------------------------------------------------------------------------- CUDA tiles
@pytest.mark.parametrize("num_splits", [1, 3, 10_000])
def test_decode_with_cuda_tiles(num_splits):
    """The CUDA launch's tiles from TILES (tests/kernels/test_compile_gate.py compiles them for sm_90a), here run
    through the interpreter: BLOCK_N=16 at head_dim 128 and group 6, and with 10_000 splits (clamped to
    the 70 blocks) the split class 256, whose combine merges the 128 columns in two programs of 64."""
    q, kc, vc, bt, ctx, ks, vs = _paged([1, 300, 1100], 12, 2, 128, 16, torch.bfloat16, seed=11)
    assert pa.cuda_tile("decode", torch.bfloat16, 128, 6)["BLOCK_N"] == 16
    if num_splits == 10_000:
        assert bt.shape[1] == 70 and pa.cuda_tile("combine", torch.bfloat16, 128, 70)["BLOCK_D"] == 64
    out = pa._decode_triton(q, kc, vc, bt, ctx, 128**-0.5, num_splits, cuda_tiles=True)
    _check_close(out, _attention(q, ks, vs, 128**-0.5, torch.float64), torch.bfloat16)


def test_store_kv_with_cuda_tiles():
    """head_dim 256 copies at most 8 kv heads per program: 10 heads take two programs per token."""
    g = torch.Generator().manual_seed(12)
    t, hkv, d, page, num_blocks = 5, 10, 256, 16, 2
    assert pa.cuda_tile("store_kv", torch.float16, d)["BLOCK_H"] == 8
    k, v = (torch.randn(t, hkv, d, generator=g).half().to(DEVICE) for _ in range(2))
    slots = torch.tensor([3, -1, 17, 0, 30], device=DEVICE)
    caches = [torch.zeros(num_blocks, page, hkv, d, dtype=torch.float16, device=DEVICE) for _ in range(4)]
    pa._store_triton(k, v, caches[0], caches[1], slots, cuda_tiles=True)
    store_kv_reference(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_cuda_tile_table():
    """Shape classes round up; shapes past the table have no tile (backend='triton' refuses them on CUDA,
    'auto' takes the PyTorch path); compile_cases(full=True) lists every entry for the compile gate."""
    tile = pa.cuda_tile
    assert tile("decode", torch.float16, 24, 3) is pa.TILES[("decode", "fp16", 64, 4)]
    assert tile("decode", torch.float32, 128, 7) is pa.TILES[("decode", "fp32", 128, 8)]
    assert tile("combine", torch.bfloat16, 80, 5) is pa.TILES[("combine", "bf16", 128, 16)]
    assert tile("store_kv", torch.bfloat16, 192) is pa.TILES[("store_kv", "bf16", 256)]
    assert tile("decode", torch.bfloat16, 512, 1) is None and tile("decode", torch.bfloat16, 64, 32) is None
    assert tile("store_kv", torch.bfloat16, 320) is None
    with pytest.raises(ValueError, match="no CUDA tile configuration for head_dim=64, GQA group=32"):
        z = lambda *shape, **kw: torch.zeros(*shape, device=DEVICE, **kw)  # noqa: E731
        pa._decode_triton(z(1, 32, 64), z(1, 16, 1, 64), z(1, 16, 1, 64), z(1, 1, dtype=torch.int32),
                          torch.ones(1, dtype=torch.int32, device=DEVICE), 0.125, 1, cuda_tiles=True)
    names = {c.name for c in pa.compile_cases(full=True)}
    for key in pa.TILES:
        kernel, dt, d = key[:3]
        if kernel == "decode":
            assert {f"pa-decode-split-{dt}-d{d}-g{key[3]}", f"pa-decode-direct-{dt}-d{d}-g{key[3]}"} <= names
        elif kernel == "combine":
            assert f"pa-combine-{dt}-d{d}-s{key[3]}" in names
        else:
            assert f"pa-store_kv-{dt}-d{d}-h{pa.TILES[key]['BLOCK_H']}" in names


# ----------------------------------------------------------------------------------------- refusals
def _decode_args(**bad):
    args = dict(q=torch.randn(2, 4, 16), k_cache=torch.randn(5, 16, 2, 16), v_cache=torch.randn(5, 16, 2, 16),
                block_tables=torch.tensor([[0, 1], [2, -1]], dtype=torch.int32),
                context_lens=torch.tensor([20, 3], dtype=torch.int32), scale=0.25)
    args.update(bad)
    return args


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.randn(2, 4, 8)), "q has head_dim=8 but the caches have head_dim=16"),
    (dict(q=torch.randn(2, 3, 16)), "num_heads=3 must be a multiple of the caches' num_kv_heads=2"),
    (dict(q=torch.randn(2, 4, 16).half()), "q must have the caches' dtype"),
    (dict(q=torch.randn(8, 16)), r"q must be \(B, num_heads, head_dim\)"),
    (dict(k_cache=torch.randn(5, 16, 2, 16).double(), v_cache=torch.randn(5, 16, 2, 16).double()),
     "k_cache and v_cache must share one dtype of float32/float16/bfloat16"),
    (dict(v_cache=torch.randn(5, 16, 2, 16).half()), "k_cache and v_cache must share one dtype"),
    (dict(v_cache=torch.randn(5, 16, 1, 16)), "v_cache must have k_cache's shape"),
    (dict(k_cache=torch.randn(5, 12, 2, 16), v_cache=torch.randn(5, 12, 2, 16)), "block_size .* power of two"),
    (dict(k_cache=torch.randn(5, 2, 16, 16).transpose(1, 2), v_cache=torch.randn(5, 16, 2, 16)),
     "must be contiguous"),
    (dict(block_tables=torch.tensor([[0, 1]], dtype=torch.int32)), r"block_tables must be \(B=2, max_blocks\)"),
    (dict(block_tables=torch.tensor([[0, 1], [2, -1]])), "block_tables must be int32"),
    (dict(block_tables=torch.zeros(2, 0, dtype=torch.int32)), "at least one column"),
    (dict(context_lens=torch.tensor([20], dtype=torch.int32)), r"context_lens must be \(B=2,\)"),
    (dict(context_lens=torch.tensor([20.0, 3.0])), "context_lens must be int32"),
    (dict(scale=0.0), "scale must be a finite Python number > 0"),
    (dict(scale=torch.tensor(0.25)), "scale must be a finite Python number"),
    # value checks (run on CPU tensors by default)
    (dict(context_lens=torch.tensor([20, 0], dtype=torch.int32)), r"context_lens must lie in \[1, .* = 32\]; found 0"),
    (dict(context_lens=torch.tensor([33, 3], dtype=torch.int32)), "found 33"),
    (dict(block_tables=torch.tensor([[0, -1], [2, -1]], dtype=torch.int32)), r"block_tables\[0, 1\] = -1"),
    (dict(block_tables=torch.tensor([[0, 1], [5, -1]], dtype=torch.int32)), r"block_tables\[1, 0\] = 5"),
    (dict(num_splits=0), "num_splits must be None or an int >= 1"),
    (dict(backend="cuda"), "backend 'cuda' is unknown"),
])
def test_decode_refuses(bad, match):
    backend = bad.pop("backend", "triton")
    with pytest.raises(ValueError, match=match):
        paged_attention_decode(**_decode_args(**bad), backend=backend)


def test_decode_value_checks_follow_validate():
    bad = _decode_args(context_lens=torch.tensor([20, 0], dtype=torch.int32))
    pa.check_decode_inputs(**bad, validate=False)  # skipped when asked (the default on CUDA)
    with pytest.raises(ValueError, match="context_lens must lie"):
        pa.check_decode_inputs(**bad, validate=True)


def _store_args(**bad):
    args = dict(k=torch.randn(3, 2, 16), v=torch.randn(3, 2, 16), k_cache=torch.randn(4, 8, 2, 16),
                v_cache=torch.randn(4, 8, 2, 16), slot_mapping=torch.tensor([0, -1, 31]))
    args.update(bad)
    return args


@pytest.mark.parametrize("bad,match", [
    (dict(k=torch.randn(3, 2, 8)), r"k must be \(T, num_kv_heads=2, head_dim=16\)"),
    (dict(v=torch.randn(2, 2, 16)), "v must have k's shape"),
    (dict(k=torch.randn(3, 2, 16).half(), v=torch.randn(3, 2, 16).half()), "k and v must have the caches' dtype"),
    (dict(slot_mapping=torch.tensor([0, 1])), r"slot_mapping must be \(3,\)"),
    (dict(slot_mapping=torch.tensor([0.0, 1.0, 2.0])), "slot_mapping must be int64"),
    (dict(slot_mapping=torch.tensor([0, 1, 32])), r"slot_mapping must lie in \[-1, .* = 32\); found 32"),
    (dict(slot_mapping=torch.tensor([0, -2, 3])), "found -2"),
    (dict(slot_mapping=torch.tensor([4, 1, 4])), "writes one slot twice"),
    (dict(k_cache=torch.randn(4, 6, 2, 16), v_cache=torch.randn(4, 6, 2, 16)), "power of two"),
])
def test_store_refuses(bad, match):
    with pytest.raises(ValueError, match=match):
        store_kv(**_store_args(**bad), backend="triton")


# ----------------------------------------------------------------------------------------- graph safety
_SYNCS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy", "nonzero", "unique")


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Make every host read of a tensor value (the calls that synchronise a GPU and break CUDA-graph
    capture) raise when it is called from the kernel module itself."""
    calls = []

    def guard(name, orig):
        def wrapper(self, *a, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if caller in KERNEL_FILES:
                calls.append(name)
                raise AssertionError(f"Tensor.{name} called from {caller}")
            return orig(self, *a, **kw)
        return wrapper

    for name in _SYNCS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    return calls


def test_launch_path_reads_no_tensor_values(forbid_host_reads):
    """validate=False is the CUDA default: the whole launch (checks, split choice, kernels, combine)
    must then run on shapes alone."""
    q, kc, vc, bt, ctx, _, _ = _paged([3, 40, 100], 4, 2, 16, 16, torch.float32, seed=6)
    k_new = torch.randn(3, 2, 16, device=DEVICE)
    store_kv(k_new, k_new, kc, vc, torch.tensor([0, -1, 5], device=DEVICE), backend="triton", validate=False)
    for splits in (None, 1, 3):
        paged_attention_decode(q, kc, vc, bt, ctx, 0.25, num_splits=splits, backend="triton", validate=False)
    assert forbid_host_reads == []
    # The guard does catch a host read: the value checks make one.
    with pytest.raises(AssertionError, match="Tensor.__int__|Tensor.__bool__"):
        paged_attention_decode(q, kc, vc, bt, ctx, 0.25, backend="triton", validate=True)


def test_launch_source_has_no_host_reads():
    """Belt and braces: the launchers' source never names a host read."""
    for fn in (pa._decode_triton, pa._store_triton, pa.default_num_splits):
        src = inspect.getsource(fn)
        for token in (".item(", ".tolist(", "int(", "float(", "bool(", ".cpu(", ".numpy(", "nonzero", ".any("):
            assert token not in src.replace("float(scale)", ""), f"{fn.__name__} contains {token}"


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU")
def test_decode_in_cuda_graph():
    q, kc, vc, bt, ctx, ks, vs = _paged([5, 300, 17], 8, 2, 128, 16, torch.bfloat16, seed=8)
    torch.cuda.set_sync_debug_mode("error")
    try:
        paged_attention_decode(q, kc, vc, bt, ctx, 128**-0.5)  # warm-up: compiles outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = paged_attention_decode(q, kc, vc, bt, ctx, 128**-0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ctx.copy_(torch.tensor([1, 250, 17], dtype=torch.int32))  # new values, same shapes
    graph.replay()
    ks = [ks[0][:1], ks[1][:250], ks[2]]
    vs = [vs[0][:1], vs[1][:250], vs[2]]
    _check_close(out, _attention(q, ks, vs, 128**-0.5, torch.float64), torch.bfloat16)


# ----------------------------------------------------------------------------------------- int64 offsets
_INT64_SCRIPT = r"""
import json, sys, torch
from fastrft.kernels.paged_attention import paged_attention_decode, paged_attention_decode_reference, store_kv
device = sys.argv[1]
page, hkv, d = 16, 1, 64
num_blocks = 2**21 + 2  # block 2**21 + 1 starts at element (2**21 + 1) * 1024 > 2**31
kc = torch.empty(num_blocks, page, hkv, d, dtype=torch.float16, device=device)  # 4 GiB, virtual
vc = torch.empty_like(kc)
g = torch.Generator().manual_seed(0)
blocks = torch.tensor([[num_blocks - 1, 0, num_blocks - 2]], dtype=torch.int32)
n = 40
slots = (blocks[0].long()[:, None] * page + torch.arange(page)).flatten()[:n]
k = torch.randn(n, hkv, d, generator=g).half()
v = torch.randn(n, hkv, d, generator=g).half()
q = torch.randn(1, 2, d, generator=g).half()
to = lambda t: t.to(device)
store_kv(to(k), to(v), kc, vc, to(slots), backend="triton")
out = paged_attention_decode(to(q), kc, vc, to(blocks), to(torch.tensor([n], dtype=torch.int32)), d**-0.5,
                             num_splits=2, backend="triton")
kk, vv = k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
p = torch.softmax(torch.einsum("hd,nhd->hn", q[0].double(), kk) * d**-0.5, -1)
ref = torch.einsum("hn,nhd->hd", p, vv)
print(json.dumps({"err": float((out[0].cpu().double() - ref).abs().max()), "ref": float(ref.abs().max())}))
"""


def test_int64_offsets_beyond_2_31_elements():
    """Blocks past element 2^31 of the caches: int32 address arithmetic would wrap and read or write
    elsewhere. The 4 GiB caches are virtual (only touched pages are real). A subprocess, so that an
    out-of-bounds access fails this test instead of killing the session."""
    import json
    import os
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _INT64_SCRIPT, DEVICE], capture_output=True, text=True, timeout=600,
                          env={**os.environ})
    assert proc.returncode == 0, f"kernel crashed or failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["err"] <= 2 * EPS[torch.float16] * res["ref"] + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4)])
def test_batched_cpu_path_equals_reference(dtype, hq, hkv):
    """The batched PyTorch path (what CPU tensors run) against the per-sequence reference, on a
    randomly permuted block table with garbage in the unused pages."""
    from fastrft.kernels.paged_attention import paged_attention_decode_reference, paged_attention_decode_torch

    g = torch.Generator().manual_seed(21)
    page, d, lens = 16, 64, [1, 17, 40, 33]
    blocks = [-(-n // page) for n in lens]
    num_blocks = sum(blocks) + 5
    # unused pages (and the tails of partial blocks) hold NaN and inf, as uninitialised memory may
    k_cache = torch.full((num_blocks, page, hkv, d), float("nan")).to(dtype)
    v_cache = torch.full((num_blocks, page, hkv, d), float("inf")).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.full((len(lens), max(blocks)), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        for j in range(blocks[b]):
            phys = perm.pop()
            table[b, j] = phys
            valid = min(page, n - j * page)
            k_cache[phys, :valid] = torch.randn(valid, hkv, d, generator=g).to(dtype)
            v_cache[phys, :valid] = torch.randn(valid, hkv, d, generator=g).to(dtype)
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    got = paged_attention_decode_torch(q, k_cache, v_cache, table, ctx, 0.125)
    want = paged_attention_decode_reference(q, k_cache, v_cache, table, ctx, 0.125)
    assert torch.isfinite(got).all()
    tol = 1e-5 if dtype == torch.float32 else 2 * 2.0**-7
    assert (got.float() - want.float()).abs().max() <= tol * max(1.0, float(want.float().abs().max()))


@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize("n", [1, 16, 37])
def test_cpu_path_of_a_lone_sequence_reads_exactly_its_tokens(consecutive, n):
    """Batch 1 on CPU reads its n tokens as a view of consecutive blocks (or gathered when they are not)
    and needs no mask: NaN and inf in every other slot, the tail of its last block included, leave the
    result equal to the reference's."""
    from fastrft.kernels.paged_attention import paged_attention_decode_reference, paged_attention_decode_torch

    g = torch.Generator().manual_seed(n)
    page, hq, hkv, d = 16, 6, 2, 32
    blocks = -(-n // page)
    k_cache = torch.full((12, page, hkv, d), float("nan"))
    v_cache = torch.full((12, page, hkv, d), float("inf"))
    ids = list(range(3, 3 + blocks)) if consecutive else [9, 2, 5][:blocks]
    for j, phys in enumerate(ids):
        valid = min(page, n - j * page)
        k_cache[phys, :valid] = torch.randn(valid, hkv, d, generator=g)
        v_cache[phys, :valid] = torch.randn(valid, hkv, d, generator=g)
    table = torch.tensor([ids + [-1]], dtype=torch.int32)
    q = torch.randn(1, hq, d, generator=g)
    ctx = torch.tensor([n], dtype=torch.int32)
    got = paged_attention_decode_torch(q, k_cache, v_cache, table, ctx, 0.2)
    want = paged_attention_decode_reference(q, k_cache, v_cache, table, ctx, 0.2)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))


def test_finite_pages_skips_the_zeroing_and_keeps_the_result():
    """The engine's caches start zeroed, so it may skip zeroing the slots past each context: with finite
    garbage there (1e4, which would dominate the output if it were read unmasked), the result is the
    reference's."""
    from fastrft.kernels.paged_attention import paged_attention_decode_reference, paged_attention_decode_torch

    g = torch.Generator().manual_seed(3)
    page, hq, hkv, d, lens = 16, 8, 2, 64, [5, 33, 16]
    k_cache = torch.full((10, page, hkv, d), 1e4)
    v_cache = torch.full((10, page, hkv, d), 1e4)
    table = torch.tensor([[0, -1, -1], [1, 2, 3], [4, -1, -1]], dtype=torch.int32)
    for b, n in enumerate(lens):
        for j in range(-(-n // page)):
            valid = min(page, n - j * page)
            k_cache[table[b, j], :valid] = torch.randn(valid, hkv, d, generator=g)
            v_cache[table[b, j], :valid] = torch.randn(valid, hkv, d, generator=g)
    q = torch.randn(3, hq, d, generator=g)
    ctx = torch.tensor(lens, dtype=torch.int32)
    want = paged_attention_decode_reference(q, k_cache, v_cache, table, ctx, 0.125)
    got = paged_attention_decode_torch(q, k_cache, v_cache, table, ctx, 0.125, finite_pages=True)
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
