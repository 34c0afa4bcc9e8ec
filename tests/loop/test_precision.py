"""Mixed precision (fastrft.precision): fp32 masters and AdamW state, bf16 compute.

The paper's lr of 1e-6 moves a weight of size ~0.02 by 5e-5 of itself per AdamW step: below bf16's
resolution (8 significant bits, a spacing of 2^-7 relative), so pure bf16 weights cannot learn at it, while
fp32 masters (spacing 2^-23 relative) take every step. The tests use tiny random models whose weights are
larger (init 0.2), which only makes the bf16 case harder.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastrft.config import (AlgoConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig, RunConfig,
                            TrainConfig)
from fastrft.errors import ConfigError
from fastrft.report import read_metrics

# On a GPU machine these run on CUDA (bench/gpu_suite.sh selects the files that set DEVICE like this).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# bf16's unit roundoff: one rounding to nearest is off by at most 2^-9 relative; u = 2^-8 is the bound
# per operation the error analysis below is stated in.
U_BF16 = 2.0 ** -8


def _config(model_dir, out, precision, *, rounds=1, lr=1e-6, **algo):
    return TrainConfig(
        model=ModelConfig(model=str(model_dir), precision=precision, device=DEVICE),
        data=DataConfig(dataset="arithmetic", level="add1", example_index=(0, 1)),
        rollout=RolloutConfig(group_size=4, max_new_tokens=8),
        algo=AlgoConfig(**{"advantage": "none", "reward_fail": -1.0, "kl_coef": 0.0, **algo}),
        optim=OptimConfig(lr=lr),
        eval=EvalConfig(eval_every=0, train_samples=2, test_size=2, greedy=False),
        run=RunConfig(rounds=rounds, seed=3, out=str(out), progress=False, log_samples=0),
    )


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed_fraction(before, after) -> float:
    return sum(int((before[k] != after[k]).sum()) for k in before) / sum(v.numel() for v in before.values())


def test_one_bf16_mixed_step_at_lr_1e6_moves_the_fp32_masters(tiny_models, tmp_path, capsys):
    """One optimizer step at the paper's lr: bf16-mixed changes >= 99% of the fp32 master elements (as fp32
    does; the model is tied, so every row gets a gradient through the LM head), pure bf16 almost none and
    says so. The compute copy is the masters rounded to bf16, rewritten in place (same storage)."""
    from fastrft.trainer import Trainer

    model = tiny_models["qwen2"]  # tied embeddings
    moved = {}
    for precision in ("fp32", "bf16-mixed", "bf16"):
        t = Trainer(_config(model, tmp_path / precision, precision))
        before = _state(t.policy)
        ptrs = [p.data_ptr() for p in t.precision.rollout_model.parameters()]
        t.run()
        assert t.updates == 1
        moved[precision] = _changed_fraction(before, _state(t.policy))
        if precision == "bf16-mixed":
            assert all(p.dtype == torch.float32 for p in t.policy.parameters())
            compute = t.precision.rollout_model
            assert t.engine.model is compute and t.engine.runner.model is compute
            assert [p.data_ptr() for p in compute.parameters()] == ptrs  # in place: CUDA graphs stay valid
            for (name, c), m in zip(compute.named_parameters(), t.policy.parameters()):
                assert c.dtype == torch.bfloat16 and torch.equal(c, m.to(torch.bfloat16)), name
                assert c.grad is None  # folded into the master's fp32 gradient and freed
        err = capsys.readouterr().err
        assert ("WARNING" in err and "--precision bf16-mixed" in err) == (precision == "bf16")
    assert moved["fp32"] >= 0.99 and moved["bf16-mixed"] >= 0.99, moved
    assert moved["bf16"] < 0.05, moved


def test_gradients_of_micro_batches_add_up_in_fp32(tiny_models):
    """The post-accumulate hook adds each backward's bf16 gradient into the master's fp32 .grad: after two
    backwards the master gradient is exactly g1 + g2 summed in fp32 (not rounded to bf16 in between)."""
    from fastrft.models import load_model
    from fastrft.precision import Precision

    prec = Precision(load_model(tiny_models["qwen2"], dtype="float32", device=DEVICE), "bf16-mixed")
    model = prec.train_model
    ids = torch.tensor([2, 5, 9, 13, 40, 7, 11, 3, 4, 8, 21], device=DEVICE)
    cu = torch.tensor([0, 11], dtype=torch.int32, device=DEVICE)
    names, params = zip(*model.named_parameters())

    def loss(scale):
        return scale * (model.forward_packed(ids, cu) @ model.lm_head_weight.T).float().logsumexp(-1).sum()

    grads = []
    for scale in (1.0, 1e-3):
        # The bf16 gradients themselves (autograd.grad accumulates nothing, so no hook runs) ...
        grads.append(dict(zip(names, torch.autograd.grad(loss(scale), params))))
        loss(scale).backward()  # ... then the same backward for real: the hooks fold it into the masters
    masters = dict(prec.master.named_parameters())
    for name, m in masters.items():
        g1, g2 = grads[0][name], grads[1][name]
        assert g1.dtype == torch.bfloat16 and m.grad.dtype == torch.float32
        assert torch.equal(m.grad, g1.float() + g2.float()), name
    assert all(p.grad is None for p in model.parameters())


def _replayed_run(model_dir, out, precision, recorded, rounds):
    """A run whose rollouts are the ones in ``recorded`` (filled on the first call): both precisions then
    train on the same tokens, so their losses and log-probs can be compared round by round."""
    from fastrft.trainer import Trainer

    def replay(sample):
        def rollouts(r, prompts):
            if r not in recorded:
                recorded[r] = sample(r, prompts)
            return recorded[r]

        return rollouts

    t = Trainer(_config(model_dir, out, precision, rounds=rounds, advantage="grpo", reward_fail=0.0, kl_coef=0.05,
                        entropy_coef=0.01), sampler=replay)
    before = _state(t.policy)
    t.run()
    rounds_ = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "round"]
    return rounds_, before, _state(t.policy)


def test_bf16_mixed_rounds_follow_fp32(tiny_models, tmp_path):
    """Four rounds at lr 1e-6 on the same rollouts (sampling is the one place where a bf16 rounding can flip
    a token and send two runs apart, so the fp32 run's samples are replayed to the bf16-mixed run).

    Tolerances, from bf16's unit roundoff u = 2^-8: the bf16 model computes every log-prob from weights and
    activations rounded to bf16, each op off by at most u relative, and the errors of the two decoder layers,
    norms and the LM head compound to a few u; the mean log-prob and entropy must agree within 2u relative.
    The loss is -mean(A * ratio) + KL and entropy terms with the ratio exactly 1 in both runs, so it agrees
    within 2u of the entropy term's size plus the KL term. KL itself is not compared with fp32's (~1e-6 at
    this lr): bf16-mixed's measures the distance between two bf16 roundings of nearby masters, bounded by
    the rounding error itself. Measured: log-prob and entropy gaps 0.05u to 0.55u, loss gaps <= 2.3e-5."""
    model = tiny_models["qwen2"]
    recorded: dict = {}
    fp32, init, w32 = _replayed_run(model, tmp_path / "fp32", "fp32", recorded, 4)
    mixed, _, wmx = _replayed_run(model, tmp_path / "mixed", "bf16-mixed", recorded, 4)
    assert [r["reward_mean"] for r in mixed] == [r["reward_mean"] for r in fp32]  # the same samples
    for a, b in zip(fp32, mixed):
        assert not a["skipped"] and not b["skipped"]
        for key in ("logp_mean", "entropy_mean"):
            assert abs(b[key] - a[key]) <= 2 * U_BF16 * abs(a[key]), (a["round"], key, a[key], b[key])
        bound = 2 * U_BF16 * 0.01 * a["entropy_mean"] + 0.05 * b["kl_mean"] + 1e-6
        assert abs(b["loss"] - a["loss"]) <= bound, (a["round"], a["loss"], b["loss"])
        # bf16 rounding noise, not a drift: k3 ~ delta^2 / 2 for per-token log-prob gaps delta ~ 4u |logp|.
        assert abs(b["kl_mean"]) <= 0.5 * (4 * U_BF16 * a["logp_mean"]) ** 2
    # The masters moved as the fp32 weights did: the two displacements point the same way.
    d32 = torch.cat([(w32[k] - init[k]).flatten() for k in init])
    dmx = torch.cat([(wmx[k] - init[k]).flatten() for k in init])
    assert torch.nn.functional.cosine_similarity(d32, dmx, dim=0) > 0.95
    assert 0.9 < dmx.norm() / d32.norm() < 1.1


def test_export_of_a_bf16_mixed_run_writes_the_fp32_masters(tiny_models, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fastrft.checkpoint import load_latest
    from fastrft.export import export_run
    from fastrft.models import load_model
    from fastrft.trainer import Trainer

    run, out = tmp_path / "run", tmp_path / "export"
    Trainer(_config(tiny_models["llama-tied-bias"], run, "bf16-mixed", rounds=2, lr=1e-3)).run()
    export_run(run, out)
    masters = load_latest(run)[1]["model"]
    saved = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert all(saved[k].dtype == torch.float32 and torch.equal(saved[k], masters[k]) for k in saved)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    native = load_model(out)
    ids = torch.tensor([[2, 5, 9, 13, 40, 7, 11, 3, 4]])
    with torch.no_grad():
        theirs = hf(ids).logits[0]
        ours = native.forward_packed(ids[0], torch.tensor([0, 9], dtype=torch.int32)) @ native.lm_head_weight.T
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_resume_with_another_precision_is_refused_with_the_diff(tiny_llama, tmp_path):
    from fastrft.trainer import Trainer

    out = tmp_path / "run"
    Trainer(_config(tiny_llama, out, "auto")).run()
    # auto was resolved before config.json was written: fp32 on a CPU, bf16-mixed on CUDA.
    ran, other = ("bf16-mixed", "fp32") if DEVICE == "cuda" else ("fp32", "bf16-mixed")
    assert json.loads((out / "config.json").read_text())["model"]["precision"] == ran
    Trainer(_config(tiny_llama, out, ran))  # the same run: no diff
    with pytest.raises(ConfigError, match=rf"model\.precision: '{ran}' -> '{other}'"):
        Trainer(_config(tiny_llama, out, other))
    forced = Trainer(_config(tiny_llama, out, other), force=True)  # explicit: the fp32 masters load either way
    assert forced.precision.name == other and forced.complete is False


def test_older_dtype_spelling_still_reads(tmp_path):
    from fastrft.cli import build_parser, config_from_args
    from fastrft.rundir import config_diff

    cfg = TrainConfig.from_dict({"model": {"dtype": "bfloat16"}})
    assert cfg.model.precision == "bf16"
    with pytest.raises(ConfigError, match="fp32, bf16-mixed, bf16, fp16"):
        TrainConfig.from_dict({"model": {"dtype": "float64"}})
    # A run directory written before --precision: its config.json says dtype float32, which is fp32.
    stored = TrainConfig(model=ModelConfig(precision="fp32")).to_dict()
    stored["model"] = {**{k: v for k, v in stored["model"].items() if k != "precision"}, "dtype": "float32"}
    assert config_diff(stored, TrainConfig(model=ModelConfig(precision="fp32")).to_dict()) == ""
    args = build_parser().parse_args(["train", "--dtype", "bfloat16"])
    assert config_from_args(args, TrainConfig()).model.precision == "bf16"
    with pytest.raises(ConfigError, match=r"precision \(--precision\) must be one of auto, fp32, bf16-mixed"):
        ModelConfig(precision="mixed")


def test_unknown_precision_on_the_command_line_lists_the_valid_ones(capsys):
    from fastrft.cli import main

    assert main(["train", "--precision", "bf16_mixed", "--rounds", "0"]) == 2
    err = capsys.readouterr().err
    assert "--precision" in err and "auto, fp32, bf16-mixed, bf16, fp16" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
