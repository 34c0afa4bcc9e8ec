"""LoRA adapters (fastrft.models.lora): PEFT's formula, names and initialisation; a frozen base held once;
the exact mode kept with adapters (sampler and trainer log-probs bit for bit, CPU and the Triton path)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import exact_config, with_signal
from conftest import run_counting_preemptions as run
from fastrft.config import ModelConfig
from fastrft.errors import ConfigError
from fastrft.models import load_model, lora, ops
from fastrft.precision import Precision, load_policy


def _lora(cfg, rank=4, **kw):
    """``cfg`` with adapters, trained on a reward with signal in every group (so the adapters move)."""
    return with_signal(cfg.replace(model=dataclasses.replace(cfg.model, lora_rank=rank, **kw)))


def _randomize_b(model, seed=0):
    """Non-zero B matrices (a trained adapter), so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora.adapted(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05)


def test_names_init_and_formula_are_peft_s(tiny_llama):
    model = load_model(tiny_llama)
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    q = model.model.layers[0].self_attn.q_proj
    base = q(x)
    lora.attach(model, spec, seed=3)
    names = sorted(k for k in dict(model.named_parameters()) if ".lora_" in k)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "model.layers.1.mlp.down_proj.lora_B.weight" in names
    assert len(names) == 2 * 7 * model.config.num_layers
    assert set(lora.trainable(model)) == set(names)  # the base, embeddings and head are frozen
    assert q.lora_A.weight.shape == (4, q.in_features) and q.lora_B.weight.shape == (q.out_features, 4)
    assert torch.count_nonzero(q.lora_B.weight) == 0 and torch.equal(q(x), base)  # step 0 is the base model
    bound = 1 / math.sqrt(q.in_features)  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert q.lora_A.weight.abs().max() <= bound and q.lora_A.weight.std() > bound / 3
    _randomize_b(model)
    x64, a, b, w = x.double(), q.lora_A.weight.double(), q.lora_B.weight.double(), q.weight.double()
    ref = x64 @ w.T + (x64 @ a.T) @ b.T * (8.0 / 4)
    assert torch.allclose(q(x).double(), ref, rtol=0, atol=1e-5)
    rs = lora.LoraSpec(rank=4, alpha=8.0, rslora=True)
    assert rs.scaling == 8.0 / 2


def test_a_different_seed_draws_different_adapters_and_the_same_seed_the_same(tiny_llama):
    models = [load_model(tiny_llama) for _ in range(3)]
    for m, seed in zip(models, (0, 0, 1)):
        lora.attach(m, lora.LoraSpec(rank=2, alpha=2.0), seed=seed)
    a = [m.model.layers[1].mlp.up_proj.lora_A.weight for m in models]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])


def test_bf16_mixed_holds_the_base_once_in_bf16(tiny_llama, tmp_path):
    cfg = _lora(exact_config(tiny_llama, tmp_path, precision="bf16-mixed"), rank=4)
    model = load_policy(cfg, "bf16-mixed", torch.device("cpu"))
    p = Precision(model, "bf16-mixed")
    master, compute = dict(p.master.named_parameters()), dict(p.compute.named_parameters())
    for name, param in master.items():
        if ".lora_" in name:  # adapters: fp32 masters, bf16 compute copies
            assert param.dtype == torch.float32 and param.requires_grad
            assert compute[name].dtype == torch.bfloat16 and compute[name] is not param
        else:  # the base: bf16, frozen, one tensor for both roles
            assert param.dtype == torch.bfloat16 and not param.requires_grad and compute[name] is param
    assert p.trainable == [t for n, t in master.items() if ".lora_" in n]
    assert p.compute_bytes() == sum(compute[n].numel() * 2 for n in master if ".lora_" in n)


def test_the_kl_reference_is_the_base_without_a_copy(tiny_llama, tmp_path):
    from fastrft.loop.learner import reference_model

    cfg = _lora(exact_config(tiny_llama, tmp_path, precision="bf16-mixed"), rank=4)
    cfg = cfg.replace(algo=dataclasses.replace(cfg.algo, kl_coef=0.01))
    p = Precision(load_policy(cfg, "bf16-mixed", torch.device("cpu")), "bf16-mixed")
    _randomize_b(p.compute)
    ref = reference_model(p, cfg)
    assert not lora.adapted(ref)
    ids = torch.tensor([2, 7, 9, 4]), torch.tensor([0, 4], dtype=torch.int32)
    # The base weights are the policy's own tensors; the output is the base model's.
    assert ref.model.layers[0].self_attn.q_proj.weight is p.compute.model.layers[0].self_attn.q_proj.weight
    base = load_model(tiny_llama, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ref.forward_packed(*ids), base.forward_packed(*ids))
        assert not torch.equal(p.compute.forward_packed(*ids), base.forward_packed(*ids))


def test_bad_lora_options_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"lora_rank \(--lora-rank\) must be >= 1"):
        ModelConfig(lora_rank=-1)
    with pytest.raises(ConfigError, match="q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj") as e:
        ModelConfig(lora_rank=4, lora_targets=("q_proj", "qkv"))
    assert "'qkv'" in str(e.value)
    with pytest.raises(ConfigError, match="--lora-rank is 0"):
        ModelConfig(lora_alpha=16.0)
    from fastrft.config import TrainConfig
    from fastrft.models import exact

    with pytest.raises(ConfigError, match="on cannot be honoured: --lora-dropout"):
        exact.resolve(TrainConfig(model=ModelConfig(lora_rank=4, lora_dropout=0.1, exact_logprobs="on")),
                      torch.device("cpu"))
    assert lora.LoraSpec.from_config(ModelConfig(lora_rank=4, lora_targets=("all-linear",))).targets == \
        lora.TARGETS


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_exact_mode_with_adapters_gap_is_zero(tiny_llama, tmp_path, precision):
    """The exact mode's end-to-end check with adapters on every projection: G = 8, a cache that preempts, a
    budget that splits the steps, PPO epochs; from round 2 on the adapters are non-zero. The gap is 0 with
    the mode on, and not 0 with it off (so the check can fail)."""
    cfg = _lora(exact_config(tiny_llama, tmp_path / "on", precision=precision, ppo_epochs=2, mini_batches=2),
                rank=4)
    trainer, rounds, preempted = run(cfg, count_preemptions=True)
    assert trainer.ops.exact and preempted > 0 and max(r["micro_batches"] for r in rounds) > 1
    assert any(torch.count_nonzero(layer.lora_B.weight) for _, layer in lora.adapted(trainer.precision.master))
    trained = [r for r in rounds if not r["skipped"]]
    assert len(trained) >= 2
    assert [r["logp_gap_max"] for r in trained] == [0.0] * len(trained)
    off = cfg.replace(model=dataclasses.replace(cfg.model, exact_logprobs="off"),
                      run=dataclasses.replace(cfg.run, out=str(tmp_path / "off")))
    _, off_rounds, _ = run(off)
    assert max(r["logp_gap_max"] for r in off_rounds if not r["skipped"]) > 0


def test_exact_triton_path_with_adapters(tiny_llama, tmp_path):
    """The CUDA path's kernels in the interpreter: the adapter matmuls run the exact linear kernel too."""
    from fastrft.config import EvalConfig
    from fastrft.kernels import exact_triton

    if not exact_triton.available(torch.device("cpu")):
        pytest.skip("needs triton and TRITON_INTERPRET=1 (conftest sets it without a GPU)")
    cfg = _lora(exact_config(tiny_llama, tmp_path, precision="bf16-mixed", rounds=2), rank=2,
                lora_targets=("q_proj", "v_proj", "down_proj"), kernels="triton")
    cfg = cfg.replace(rollout=dataclasses.replace(cfg.rollout, group_size=4, max_new_tokens=6),
                      data=dataclasses.replace(cfg.data, examples_per_round=1),
                      eval=EvalConfig(eval_every=0, train_samples=1, test_size=1, eval_max_new_tokens=2,
                                      train_eval_size=1))
    trainer, rounds, _ = run(cfg)
    assert trainer.ops.name == "exact-triton"
    assert any(torch.count_nonzero(layer.lora_B.weight) for _, layer in lora.adapted(trainer.precision.master))
    trained = [r for r in rounds if not r["skipped"]]
    assert len(trained) == 2 and [r["logp_gap_max"] for r in trained] == [0.0, 0.0]


def test_the_backend_computes_the_adapter_matmuls(tiny_llama):
    """The exact backends send the adapter's two matmuls through their dense GEMM (what makes them
    batch-invariant); the plain one fuses B's matmul, the scale and the add into one addmm, within fp32
    rounding of the unfused sum."""
    from fastrft.models.exact import ExactTorchOps

    model = load_model(tiny_llama)
    lora.attach(model, lora.LoraSpec(rank=3, alpha=3.0, targets=("o_proj",)), seed=0)
    _randomize_b(model)
    calls = []

    class Counting(ExactTorchOps):
        def dense(self, x, weight, bias):
            calls.append(tuple(weight.shape))
            return super().dense(x, weight, bias)

    model.set_ops(Counting())
    o = model.model.layers[0].self_attn.o_proj
    x = torch.randn(5, o.in_features, generator=torch.Generator().manual_seed(0))
    unfused = o(x)
    assert calls == [tuple(o.weight.shape), (3, o.in_features), (o.out_features, 3)]
    model.set_ops(ops.PLAIN)
    assert torch.allclose(o(x), unfused, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias,x_grad", [(False, True), (True, True), (True, False)])
def test_the_plain_backends_adapted_linear_against_float64(bias, x_grad):
    """fastrft.models.lora.fused_linear in a training forward (one autograd function whose backward adds the
    adapter's dx into the base's in place): forward and every gradient against a float64 autograd reference
    of PEFT's formula, at odd shapes. Tolerance: fp32 GEMMs over K <= 61 terms of O(1) values round within
    a few 1e-6 (about K * 2^-24 * |terms|); 1e-4 relative leaves margin and fails on any wrong term."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(0)
    t, i, o, r, s = 37, 61, 29, 5, 0.7
    x = torch.randn(t, i, generator=g).requires_grad_(x_grad)
    w = torch.randn(o, i, generator=g) / i**0.5
    b0 = torch.randn(o, generator=g) if bias else None
    a, b = (torch.randn(r, i, generator=g) / i**0.5).requires_grad_(), torch.randn(o, r, generator=g).requires_grad_()
    layer = SimpleNamespace(lora_A=SimpleNamespace(weight=a), lora_B=SimpleNamespace(weight=b), lora_scaling=s,
                            lora_dropout=0.0, training=True)
    y = lora.fused_linear(layer, x, w, b0)
    assert type(y.grad_fn).__name__ == "_AdaptedLinearBackward"
    x64, a64, b64 = (v.detach().double().requires_grad_(v.requires_grad) for v in (x, a, b))
    ref = x64 @ w.double().T + (0 if b0 is None else b0.double()) + (x64 @ a64.T) @ b64.T * s
    up = torch.randn(t, o, generator=g)
    ours = torch.autograd.grad(y, [v for v in (x, a, b) if v.requires_grad], up)
    theirs = torch.autograd.grad(ref, [v for v in (x64, a64, b64) if v.requires_grad], up.double())
    assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-5)
    for mine, want in zip(ours, theirs):
        assert torch.allclose(mine.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with torch.no_grad():  # the engine's path: the same forward ops, so the same bits
        assert torch.equal(lora.fused_linear(layer, x, w, b0), y.detach())


def test_projections_of_one_input_share_the_a_gemm_against_float64():
    """fastrft.models.lora_group (q, k, v; gate, up on the plain backend): one GEMM for the stacked A
    matrices, dx accumulated in place. Outputs and every gradient against float64 PEFT, odd shapes, mixed
    biases and ranks; the no-grad path (decode, 3-d x) within fp32 rounding of the training path. Tolerance
    as in the single-projection test: fp32 GEMMs over K <= 61 O(1) terms round within a few 1e-6."""
    from types import SimpleNamespace

    from fastrft.models import lora_group

    g = torch.Generator().manual_seed(3)
    t, i, s = 29, 61, 0.7
    specs = [(23, 4, True), (11, 4, False), (37, 2, True)]  # (out, rank, bias)
    layers = []
    for o, r, bias in specs:
        layers.append(SimpleNamespace(
            weight=torch.randn(o, i, generator=g) / i**0.5, bias=torch.randn(o, generator=g) if bias else None,
            lora_A=SimpleNamespace(weight=(torch.randn(r, i, generator=g) / i**0.5).requires_grad_()),
            lora_B=SimpleNamespace(weight=torch.randn(o, r, generator=g).requires_grad_()),
            lora_scaling=s, lora_dropout=0.0, training=True))
    x = torch.randn(t, i, generator=g).requires_grad_()
    ys = lora_group.fused(layers, x)
    ups = [torch.randn(t, o, generator=g) for o, _, _ in specs]
    params = [x] + [p for L in layers for p in (L.lora_A.weight, L.lora_B.weight)]
    ours = torch.autograd.grad(ys, params, ups)
    x64 = x.detach().double().requires_grad_()
    p64 = [x64] + [p.detach().double().requires_grad_() for p in params[1:]]
    refs = []
    for j, L in enumerate(layers):
        a64, b64 = p64[1 + 2 * j], p64[2 + 2 * j]
        refs.append(x64 @ L.weight.double().T + (0 if L.bias is None else L.bias.double()) + (x64 @ a64.T) @ b64.T * s)
    theirs = torch.autograd.grad(refs, p64, [u.double() for u in ups])
    for y, ref in zip(ys, refs):
        assert torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-5)
    for mine, want in zip(ours, theirs):
        assert torch.allclose(mine.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with torch.no_grad():  # decode: a 3-d x, no autograd function
        for y, z in zip(ys, lora_group.fused(layers, x.detach().view(1, t, i))):
            assert torch.allclose(z.view(t, -1), y.detach(), rtol=0, atol=1e-5)


def test_activation_checkpointing_with_adapters_changes_nothing(tiny_llama, tmp_path):
    """The recomputed layers' adapters get their gradients (the checkpointed layers' inputs need none: the
    embeddings are frozen), and the run equals the one that keeps its activations."""
    from conftest import train_and_collect, untimed

    cfg = _lora(exact_config(tiny_llama, tmp_path / "kept", rounds=2, mode="off"), rank=4)
    ckpt = cfg.replace(model=dataclasses.replace(cfg.model, activation_checkpointing=True),
                       run=dataclasses.replace(cfg.run, out=str(tmp_path / "recomputed")))
    (a, wa), (b, wb) = train_and_collect(cfg), train_and_collect(ckpt)
    assert untimed(a) == untimed(b) and a[-1]["grad_norm"] > 0
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
