"""The CUDA-graph decode step's Python code (CudaGraphDecoder._step and everything it calls) run eagerly on
CPU tensors, the exact Triton kernels through the interpreter: its tokens and log-probs must be the eager
decode path's, bit for bit, with every backend. Graph capture itself needs a GPU; what it captures is this."""

from __future__ import annotations

import pytest
import torch

import fastrft.engine.model_runner as model_runner
from fastrft.engine import Engine, EngineConfig
from fastrft.models import ops
from fastrft.models.loader import load_model


def eager_capture(fn, pool):
    """A stand-in for cuda_graph_capture: "replaying" reruns the step's Python code."""
    out = fn()

    class Replay:
        replays = 0

        def replay(self):
            out.copy_(fn())
            Replay.replays += 1

        def pool(self):
            return None

    return Replay(), out


# The plain backend with the CUDA path's decode kernels (Triton KV store, paged attention and sampler, here in
# the interpreter) is "plain-triton": test_eager_decode_launches_the_graphs_split_k runs it, with split-K on.
CASES = [("plain", torch.float32), ("plain", torch.bfloat16), ("exact-torch", torch.float32),
         ("exact-torch", torch.bfloat16), ("exact-triton", torch.bfloat16)]


def _backend(name: str) -> ops.Ops:
    if "triton" in name:
        from fastrft.kernels import exact_triton

        if not exact_triton.available(torch.device("cpu")):
            pytest.skip("needs triton and TRITON_INTERPRET=1 (conftest sets it without a GPU)")
    return ops.Ops(kernels="triton") if name == "plain-triton" else ops.get(name)


@pytest.mark.parametrize("backend,dtype", CASES, ids=[f"{b}-{str(d)[6:]}" for b, d in CASES])
def test_the_graph_step_samples_what_eager_decode_samples(tiny_llama, monkeypatch, backend, dtype):
    model = load_model(tiny_llama, dtype=dtype)
    model.set_ops(_backend(backend))
    # 2 prompts x 2 samples: every decode step is a batch of 4, a bucket of its own, so the graph step runs
    # the eager step's shapes (the plain backend's GEMMs may round a row by the batch's row count).
    prompts, temperature = [[2, 5, 6, 7], [2, 9, 9, 4, 4, 8, 3]], 0.7
    monkeypatch.setattr(model_runner, "cuda_graph_capture", eager_capture)
    results = {}
    for graphs in (True, False):
        monkeypatch.setattr(model_runner, "GRAPH_DEVICES", ("cuda", "cpu") if graphs else ("cuda",))
        engine = Engine(model, config=EngineConfig(kv_cache_memory=2**20, max_num_seqs=4, max_model_len=64,
                                                   cuda_graphs=graphs))
        assert (engine.runner.graphs is not None) == graphs
        out = engine.generate(prompts, n=2, max_new_tokens=5, temperature=temperature, seed=3, eos_token_ids=[])
        results[graphs] = [(c.token_ids, c.logprobs) for group in out for c in group]
        if graphs:
            assert sum(type(g).replays for g in engine.runner.graphs.graphs.values()) >= 4  # the steps replayed
    assert results[True] == results[False]


def test_the_graph_step_reads_a_changed_head(tiny_llama, monkeypatch):
    """The graph reads the head's fp32 copy at a fixed address: an in-place update of a bf16 head (what
    an optimizer step's refresh does) reaches the next replay."""
    model = load_model(tiny_llama, dtype=torch.bfloat16)
    monkeypatch.setattr(model_runner, "cuda_graph_capture", eager_capture)
    monkeypatch.setattr(model_runner, "GRAPH_DEVICES", ("cuda", "cpu"))
    engine = Engine(model, config=EngineConfig(kv_cache_memory=2**20, max_num_seqs=4, max_model_len=64))
    before = engine.runner.head.weight()
    with torch.no_grad():
        model.lm_head_weight.mul_(2)
    after = engine.runner.head.weight()
    assert after.data_ptr() == before.data_ptr() and torch.equal(after, model.lm_head_weight.float())


def test_eager_decode_launches_the_graphs_split_k(tiny_llama, monkeypatch):
    """On a GPU the plain decode kernel splits each context (split-K) by a count that depends on the batch and
    the block-table width. The graph step runs at its bucket's batch and the full table width, so eager decode
    must launch with the same count, or the two round differently. Off a GPU the count is 1; here a heuristic
    that depends on both is switched on, so the check is real on CPU."""
    import fastrft.kernels.paged_attention_triton as pat

    _backend("plain-triton")
    monkeypatch.setattr(pat, "default_num_splits",
                        lambda batch, hkv, max_blocks, block_size, device: max(1, min(max_blocks, batch)))
    model = load_model(tiny_llama, dtype=torch.float32)  # fp32: a different split order shows in the bits
    model.set_ops(ops.Ops(kernels="triton"))
    prompts = [[2, 5, 6, 7], [2, 9, 9, 4, 4, 8, 3], [2, 3]]  # 3 sequences: the graph runs bucket 4
    monkeypatch.setattr(model_runner, "cuda_graph_capture", eager_capture)
    results = {}
    for graphs in (True, False):
        monkeypatch.setattr(model_runner, "GRAPH_DEVICES", ("cuda", "cpu") if graphs else ("cuda",))
        engine = Engine(model, config=EngineConfig(kv_cache_memory=2**20, max_num_seqs=4, max_model_len=32,
                                                   block_size=2, cuda_graphs=graphs))
        # 5 tokens: without the fix (eager launching at its own batch and width) this already differs (checked)
        out = engine.generate(prompts, n=1, max_new_tokens=5, temperature=0.7, seed=5, eos_token_ids=[])
        results[graphs] = [(c.token_ids, c.logprobs) for group in out for c in group]
    assert results[True] == results[False]


@pytest.mark.parametrize("backend", ["plain", "exact-torch"])
def test_the_graph_step_runs_the_adapters(tiny_llama, monkeypatch, backend):
    """LoRA adapters sit inside the captured step (they are part of every projection's forward): with trained
    (non-zero) adapters the graph step samples what eager decode samples, and not what the base model does."""
    from fastrft.models import lora

    def sample(graphs: bool, adapters: bool):
        model = load_model(tiny_llama, dtype=torch.bfloat16)
        if adapters:
            lora.attach(model, lora.LoraSpec(rank=4, alpha=8.0), seed=0, dtype=torch.bfloat16)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for _, layer in lora.adapted(model):
                    layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
        model.set_ops(_backend(backend))
        monkeypatch.setattr(model_runner, "GRAPH_DEVICES", ("cuda", "cpu") if graphs else ("cuda",))
        engine = Engine(model, config=EngineConfig(kv_cache_memory=2**20, max_num_seqs=4, max_model_len=64,
                                                   cuda_graphs=graphs))
        out = engine.generate([[2, 5, 6, 7], [2, 9, 9, 4, 4, 8, 3]], n=2, max_new_tokens=5, temperature=0.7, seed=3,
                              eos_token_ids=[])
        return [(c.token_ids, c.logprobs) for group in out for c in group]

    monkeypatch.setattr(model_runner, "cuda_graph_capture", eager_capture)
    graph = sample(True, True)
    assert graph == sample(False, True)
    assert [lp for _, lp in graph] != [lp for _, lp in sample(True, False)]
