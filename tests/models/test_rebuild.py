"""fastrft.models.rebuild: the MLP's silu(gate) and product, an RMSNorm's output and a low-precision input's
fp32 copy are rebuilt in the backward instead of kept; every gradient stays bit for bit a plain backward's."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fastrft.models import load_model, lora, rebuild


def _grads(model, ids, cu, off: bool):
    """Gradients of a packed forward (a fixed random projection of the hidden states), with the rebuild
    turned off when ``off``."""
    model.zero_grad(set_to_none=True)
    scope = rebuild.scope
    if off:
        rebuild.scope = lambda on=True: contextlib.nullcontext()
    try:
        h = model.forward_packed(ids, cu)
    finally:
        rebuild.scope = scope
    probe = torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(h.dtype)
    (h.float() * probe.float()).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype,rank", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 4),
                                        (torch.bfloat16, 4)])
def test_gradients_are_bit_for_bit_and_the_recipes_run_once(tiny_llama, monkeypatch, dtype, rank):
    model = load_model(tiny_llama, dtype=dtype)
    if rank:
        lora.attach(model, lora.LoraSpec(rank=rank, alpha=8.0), seed=0, dtype=dtype)
        with torch.no_grad():
            for _, layer in lora.adapted(model):
                layer.lora_B.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, model.config.vocab_size, (23,), generator=torch.Generator().manual_seed(0))
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)
    made, built = [], []
    real_init, real_get = rebuild._Recipe.__init__, rebuild._Recipe.get

    def init(self, fn):
        made.append(self)
        real_init(self, fn)

    def get(self):
        if self.value is None:
            built.append(self)
        return real_get(self)

    monkeypatch.setattr(rebuild._Recipe, "__init__", init)
    monkeypatch.setattr(rebuild._Recipe, "get", get)
    plain = _grads(model, ids, cu, off=True)
    assert made == []
    rebuilt = _grads(model, ids, cu, off=False)
    assert plain.keys() == rebuilt.keys() and len(plain) > 0
    assert all(torch.equal(plain[n], rebuilt[n]) for n in plain)
    layers = model.config.num_layers
    # Per layer: two in the MLP, and per norm its output, and in bf16 its input's fp32 copy; the final norm's
    # copy too (its output feeds the LM head, outside the layers' scopes: marked, never saved). With LoRA the
    # embeddings are frozen: the first norm's input and output need no gradient, so neither is marked.
    per_norm = 2 if dtype == torch.bfloat16 else 1
    want = (2 + 2 * per_norm) * layers + (per_norm - 1) - (per_norm if rank else 0)
    assert len(built) == want and len(set(map(id, built))) == want  # each rebuilt once
    assert len(made) == want + 1


def test_nothing_is_marked_without_gradients_or_under_checkpointing(tiny_llama, monkeypatch):
    model = load_model(tiny_llama, dtype=torch.bfloat16)
    made = []
    real_init = rebuild._Recipe.__init__

    def init(self, fn):
        made.append(self)
        real_init(self, fn)

    monkeypatch.setattr(rebuild._Recipe, "__init__", init)
    ids = torch.arange(11) % model.config.vocab_size
    cu = torch.tensor([0, 11], dtype=torch.int32)
    with torch.no_grad():
        model.forward_packed(ids, cu)
    model.activation_checkpointing = True
    model.forward_packed(ids, cu).float().sum().backward()
    # Checkpointed layers are rebuilt whole, and nothing else is marked then.
    assert made == []
    model.activation_checkpointing = False
    model.forward_packed(ids, cu)
    assert made  # (the counting works)
