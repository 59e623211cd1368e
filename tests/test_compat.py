import pytest
import torch

from megatron_ratplus import cpu_compat, optional
from megatron_ratplus.errors import UserError
from megatron_ratplus.layers.specs import get_ratplus_block_spec, get_ratplus_layer_te_spec
from megatron_ratplus.config import preset


def test_shim_redirects_cuda_calls_to_cpu():
    assert cpu_compat.install() is True
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.arange(3, device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.cuda.synchronize() is None
    assert torch.ones(2).device.type == "cpu"  # calls without a device are untouched
    pinned = torch.tensor([1, 2], device="cpu", pin_memory=True).cuda(non_blocking=True)
    assert pinned.device.type == "cpu" and pinned.tolist() == [1, 2]


def test_model_parallel_rng_tracker_runs_on_cpu(megatron_single):
    from megatron.core import tensor_parallel

    cpu_compat.install()
    tensor_parallel.model_parallel_cuda_manual_seed(5, force_reset_rng=True)
    before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        pass
    assert torch.equal(torch.get_rng_state(), before)


def test_megatron_rope_slices_global_positions_under_cp():
    """megatron's CP slicer of RoPE tables (pinned memory + .cuda()) runs and keeps chunks r, 2CP-1-r."""
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank

    cpu_compat.install()
    table = torch.arange(16.0).view(16, 1, 1, 1)
    local = get_pos_emb_on_this_cp_rank(table, 0, SimpleNamespace(size=lambda: 4, rank=lambda: 1))
    assert local.flatten().tolist() == [2.0, 3.0, 12.0, 13.0]


def test_shim_is_inert_when_cuda_is_present(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_installed", False)  # as in a process that has not installed it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.zeros
    assert cpu_compat.install() is False
    assert torch.zeros is before and not cpu_compat.is_active()


def test_megatron_rope_runs_on_cpu():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    cpu_compat.install()
    freqs = RotaryEmbedding(kv_channels=16, rotary_percent=1.0)(8)
    assert freqs.shape == (8, 1, 1, 16) and freqs.device.type == "cpu"
    torch.testing.assert_close(freqs[3, 0, 0, 1], torch.tensor(3.0 / 10000 ** (2 / 16)))


def test_missing_optional_dependency_is_one_line():
    with pytest.raises(optional.MissingDependency) as err:
        optional.require("transformer_engine" if not optional.have("transformer_engine") else "nvidia.dali", "FP8")
    message = str(err.value)
    assert "\n" not in message and "not installed" in message and "pip install" in message


def test_te_spec_without_te_is_an_error_not_mocks(megatron_single):
    """megatron's TE wrappers are MagicMock subclasses without TE: the spec must refuse, not build mocks."""
    if optional.have("transformer_engine"):
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(optional.MissingDependency, match="transformer-impl transformer_engine needs"):
        get_ratplus_layer_te_spec()
    with pytest.raises(optional.MissingDependency):
        get_ratplus_block_spec(preset("tiny"), "transformer_engine")
    assert len(get_ratplus_block_spec(preset("tiny"), "local").layer_specs) == 4
    with pytest.raises(UserError, match="unknown --transformer-impl 'fast'"):
        get_ratplus_block_spec(preset("tiny"), "fast")
