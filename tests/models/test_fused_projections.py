"""Fused q/k/v and gate/up projections change nothing a model computes."""

import gc
import weakref

import pytest
import torch

from flashmemory.config import LSAConfig
from flashmemory.models.adapter import decoder_layers
from flashmemory.models.fused_projections import fuse_projections
from flashmemory.models.tiny import TINY_FAMILIES, tiny_model
from flashmemory.runtime.generate import generate_ids

from ..conftest import SMALL_LSA


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fused_projections_keep_logits_weights_and_state_dict(family):
    model = tiny_model(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    undo = fuse_projections(model)
    attn, mlp = decoder_layers(model)[0].self_attn, decoder_layers(model)[0].mlp
    # one storage per group: the projections are views of the concatenated matrix
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_proj.weight.untyped_storage().data_ptr()
    fused_state = model.state_dict()
    assert fused_state.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(fused_state[k], v), k
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    undo()
    assert attn.k_proj.weight.untyped_storage().data_ptr() != attn.q_proj.weight.untyped_storage().data_ptr()
    assert "forward" not in vars(attn.k_proj)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_a_later_projection_called_on_another_input_computes_its_own_product():
    model = tiny_model("llama")
    attn = decoder_layers(model)[0].self_attn
    x, y = torch.randn(1, 3, model.config.hidden_size), torch.randn(1, 3, model.config.hidden_size)
    with torch.no_grad():
        want_k = attn.k_proj(y)
        fuse_projections(model)
        attn.q_proj(x)  # computes and keeps q/k/v of x
        torch.testing.assert_close(attn.k_proj(y), want_k)  # not the kept part of x


def test_lsa_decoding_is_unchanged_by_fused_projections():
    model = tiny_model("qwen2")
    ids = torch.randint(0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(1))
    lsa = LSAConfig(**{**SMALL_LSA, "budget": 0.5})
    plain, _ = generate_ids(model, ids, method="lsa", lsa=lsa, max_new_tokens=40)
    fuse_projections(model)
    fused, _ = generate_ids(model, ids, method="lsa", lsa=lsa, max_new_tokens=40)
    assert torch.equal(fused, plain)


def test_a_model_converted_after_fusing_still_computes_the_same():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.double()(ids).logits
        model.float()
        fuse_projections(model)
        model.double()  # every view becomes a matrix of its own; the fused one stays float32
        torch.testing.assert_close(model(ids).logits, want)


def test_fusing_releases_the_separate_weights_and_undo_restores_them():
    model = tiny_model("llama")
    attn = decoder_layers(model)[0].self_attn
    values = attn.k_proj.weight.detach().clone()
    separate = weakref.ref(attn.k_proj.weight)
    undo = fuse_projections(model)
    gc.collect()
    # a fused model must not hold its projection weights twice
    assert separate() is None
    undo()
    assert torch.equal(attn.k_proj.weight, values)
    assert attn.k_proj.weight.untyped_storage().nbytes() == values.untyped_storage().nbytes()


def test_a_fused_layer_compiles_as_one_graph_and_still_honours_a_replaced_weight():
    # fullgraph=True raises on a graph break: each break splits a compiled decoder layer into pieces that the
    # compiler cannot fuse across (the eager backend traces without generating code, so this takes a second)
    model = tiny_model("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
    fuse_projections(model)
    torch._dynamo.reset()
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
        attn = decoder_layers(model)[0].self_attn
        attn.k_proj.weight = torch.nn.Parameter(torch.zeros_like(attn.k_proj.weight))
        changed = model(ids).logits
    assert not torch.allclose(changed, want, atol=1e-3)  # the zeroed k_proj is used, not the fused copy
    torch._dynamo.reset()
