"""Activation recomputation: selective (the RAT+ mixer core) and megatron's full-layer recompute
give the gradients of a run without it; selective keeps fewer activation bytes for the backward."""

import pytest
import torch

from megatron_ratplus.config import preset
from megatron_ratplus.model import build_model, set_attention_pattern


def loss_grads_and_saved_bytes(model, tokens, pattern):
    """Loss, parameter gradients, and the bytes of distinct storages autograd saved for the backward."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    model.zero_grad()
    set_attention_pattern(model, pattern)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    params = {name: p for name, p in model.named_parameters()}
    saved = sum(storages.values()) - sum(p.untyped_storage().nbytes() for p in params.values()
                                          if p.untyped_storage().data_ptr() in storages)
    return loss.detach(), {name: p.grad.clone() for name, p in params.items()}, saved


def twin(reference, **recompute):
    """A model with ``reference``'s weights and the given recompute settings."""
    model = build_model(preset("tiny", **{**SHAPE, **recompute}))
    model.load_state_dict(reference.state_dict())
    return model


SHAPE = dict(num_layers=4, hidden_size=64, num_attention_heads=2, seq_length=96)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 384, (2, 96), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("recurrence", [True, False])
@pytest.mark.parametrize("pattern", ["dense", "dilated:8,w=4,p=2"])
def test_selective_recompute_same_gradients_fewer_saved_bytes(megatron_single, tokens, pattern, recurrence):
    torch.manual_seed(1)
    plain = build_model(preset("tiny", **SHAPE, recurrence=recurrence))
    selective = build_model(preset("tiny", **SHAPE, recurrence=recurrence, recompute_granularity="selective"))
    selective.load_state_dict(plain.state_dict())
    assert all(m.recompute_core for m in selective.modules() if hasattr(m, "recompute_core"))
    loss, grads, saved = loss_grads_and_saved_bytes(plain, tokens, pattern)
    loss_r, grads_r, saved_r = loss_grads_and_saved_bytes(selective, tokens, pattern)
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    if recurrence:  # at least k~, v~ and the rotated query of every layer ([s, b, hidden] fp32) are not kept
        per_tensor = tokens.numel() * SHAPE["hidden_size"] * 4
        assert saved - saved_r >= 3 * SHAPE["num_layers"] * per_tensor, (saved_r, saved)
    # Without the recurrence the core's inputs (the W_in output) are all it kept anyway on CPU,
    # where attention saves its own copies: no saving to claim there.


@pytest.mark.parametrize("method, layers", [("uniform", 1), ("uniform", 2), ("block", 2), ("block", 4)])
def test_full_recompute_same_gradients(megatron_single, tokens, method, layers):
    torch.manual_seed(2)
    plain = build_model(preset("tiny", **SHAPE))
    full = twin(plain, recompute_granularity="full", recompute_method=method, recompute_num_layers=layers)
    loss, grads, saved = loss_grads_and_saved_bytes(plain, tokens, "dilated:8,w=4,p=2")
    loss_r, grads_r, saved_r = loss_grads_and_saved_bytes(full, tokens, "dilated:8,w=4,p=2")
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert saved_r < saved
