"""A decode step on a stand-in accelerator: its host work and host<->device traffic do not grow with
the vocabulary, it copies to the host once, and under CUDA graphs it is one replay.

The model, its KV cache and the engine live on PyTorch's "meta" device, which carries shapes, dtypes
and devices but no data, so a 64k vocabulary costs nothing. The test declares meta an accelerator: the
engine then takes its CUDA path (decode under graphs, the sampler as the custom op
``fastrft::sample_tokens`` whose fake kernel gives its (2, B) output), with everything the host does
around the device work unchanged. (A fake "cuda" device cannot stand in: on a CPU-only build PyTorch's
Python indexing opens a CUDA device guard, which fails.) Stand-ins replace what only a GPU runs: the
paged-attention and KV-store launches (empty outputs of their shapes) and the graph capture (it reruns
the captured function at each replay).

A dispatch mode records every operation: the tensors created on the host, and the copies between host
and device. Device-to-host copies return real zero tensors (token 0, log-prob 0.0), so the engine's
host side runs on. The same decode steps at V = 1,000 and V = 64,000 must record the same host tensors
and the same copies; the sampler of earlier versions, which drew B x V uniforms on the host and copied
them to the device every step, fails this.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastrft.engine.heads as heads
import fastrft.engine.model_runner as model_runner
import fastrft.kernels.paged_attention as paged_attention
import fastrft.kernels.sampling as sampling
import fastrft.models.ops as ops
from fastrft.engine import Engine, EngineConfig
from fastrft.models.config import ArchConfig
from fastrft.models.decoder import CausalLM


class Recorder(TorchDispatchMode):
    """Records host tensors and host<->device copies; answers device-to-host copies with real zeros."""

    def __init__(self):
        super().__init__()
        self.host = Counter()  # (op, shape) of every tensor an op creates on the host
        self.to_device = []  # bytes of each host -> device copy
        self.to_host = []  # bytes of each device -> host copy

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is torch.ops.aten._to_copy.default and src is not None:
            dst = torch.device(kwargs.get("device") or src.device)
            if src.device.type == "meta" and dst.type == "cpu":
                self.to_host.append(src.numel() * src.element_size())
                return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
            if src.device.type == "cpu" and dst.type == "meta":
                self.to_device.append(src.numel() * src.element_size())
        out = func(*args, **kwargs)
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.host[(str(func), tuple(t.shape))] += 1
        return out


class EagerGraph:
    """A CUDA graph stand-in: replay() reruns the captured function into its first outputs."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.fn())

    def pool(self):
        return None


def eager_capture(fn, pool):
    out = fn()
    return EagerGraph(fn, out), out


@pytest.fixture
def meta_accelerator(monkeypatch):
    monkeypatch.setattr(model_runner, "GRAPH_DEVICES", ("cuda", "meta"))
    monkeypatch.setattr(model_runner, "cuda_graph_capture", eager_capture)
    monkeypatch.setattr(sampling, "ACCELERATORS", ("cuda", "meta"))
    monkeypatch.setattr(paged_attention, "store_kv", lambda *a, **k: None)
    monkeypatch.setattr(ops, "varlen_attention", lambda q, *a, **k: torch.empty_like(q))


def _decode_steps(vocab: int, graphs: bool, top_k: int = 0, steps: int = 3) -> tuple[Recorder, list]:
    """A prefill of 5 requests, then ``steps`` decode steps, recorded."""
    cfg = ArchConfig.from_hf(dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                  eos_token_id=0))
    with torch.device("meta"):
        model = CausalLM(cfg)
    engine = Engine(model, config=EngineConfig(kv_cache_memory=2**22, max_num_seqs=8, max_model_len=256,
                                               cuda_graphs=graphs))
    engine.submit([[1, 2, 3], [4, 5, 6, 7]], n=[3, 2], max_new_tokens=16, temperature=0.9, top_p=1.0, top_k=top_k,
                  seed=0, eos_token_ids=[])
    recorder = Recorder()
    with recorder:
        engine.step()  # the prefill (its copies are checked below too)
    prefill = (list(recorder.to_device), list(recorder.to_host))
    recorder.to_device.clear(), recorder.to_host.clear(), recorder.host.clear()
    with recorder:
        for _ in range(steps):
            engine.step()
    graphs_ = [] if engine.runner.graphs is None else list(engine.runner.graphs.graphs.values())
    return recorder, graphs_, prefill


@pytest.mark.parametrize("graphs,top_k", [(True, 0), (False, 0), (False, 7)],
                         ids=["cuda-graphs", "eager", "eager-top-k"])
def test_decode_host_work_and_traffic_do_not_grow_with_the_vocabulary(meta_accelerator, graphs, top_k):
    small, graphs_small, prefill_small = _decode_steps(1_000, graphs, top_k)
    large, _, prefill_large = _decode_steps(64_000, graphs, top_k)
    assert large.host == small.host  # the same host tensors, of the same shapes
    assert (large.to_device, large.to_host) == (small.to_device, small.to_host)
    assert prefill_large == prefill_small
    # One device-to-host copy per step: the (2, B) int32 tokens and log-probs of the 5 requests.
    assert small.to_host == [2 * 5 * 4] * 3
    assert max(small.to_device) < 5_000  # a step's inputs: O(B x blocks), nothing of size V
    assert max(n for (_, shape) in small.host for n in [1, *shape]) < 1_000
    if graphs:
        assert sum(g.replays for g in graphs_small) == 3  # one replay per decode step


def test_the_check_fails_for_host_side_noise(meta_accelerator, monkeypatch):
    """The sampler of earlier versions, in the same harness: its B x V host uniforms and their copy to
    the device grow with V, and the comparison above catches them."""
    def host_noise_draw(logits, seeds, positions, inv_temperature, **kwargs):
        gens = [torch.Generator().manual_seed(int(s)) for s in range(logits.shape[0])]
        uniform = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in gens]).to(logits.device)
        tokens = (logits.float().softmax(-1) / uniform.log().neg()).argmax(-1)
        return torch.stack([tokens.int(), tokens.float().view(torch.int32)])

    monkeypatch.setattr(heads, "sample_tokens", host_noise_draw)  # prefill and decode both sample through the head
    small = _decode_steps(1_000, graphs=False)[0]
    large = _decode_steps(64_000, graphs=False)[0]
    assert large.host != small.host
    assert sum(large.to_device) - sum(small.to_device) == 3 * 5 * (64_000 - 1_000) * 4
