"""megatron-core's own optimizers on CPU (through megatron_ratplus/cpu_compat.py; the one call of
theirs that needs CUDA is ``Tensor.type()`` compared with "torch.cuda.FloatTensor" /
"torch.cuda.BFloat16Tensor", which the shim answers for CPU tensors): the distributed optimizer's
sharded state round-trips through dist_checkpointing with the trainer's metadata, and a
non-finite gradient skips megatron's step (Float16OptimizerWithFloat16Params, used with --bf16 on
GPUs, and DistributedOptimizer) instead of writing NaN weights."""

from types import SimpleNamespace

import pytest
import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

from megatron_ratplus import checkpoint
from megatron_ratplus.config import model_config
from megatron_ratplus.model import build_model
from megatron_ratplus.training import data_parallel, optimizer as optimizer_module
from megatron_ratplus.training.data_parallel import wrap_model
from megatron_ratplus.training.optimizer import MegatronOptimizerAdapter, build_optimizer

OPTIMIZER_ARGS = dict(lr=1e-2, min_lr=0.0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                      clip_grad=1.0)


def _build(bf16: bool, distributed_optimizer: bool, seed: int):
    """Model chunks and optimizer as the trainer builds them (data_parallel.wrap_model, build_optimizer)."""
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = model_config(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=16,
                          vocab_size=128, real_vocab_size=128, bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype)
    chunks = wrap_model(build_model(config), config, use_distributed_optimizer=distributed_optimizer)
    args = SimpleNamespace(**OPTIMIZER_ARGS, bf16=bf16, use_distributed_optimizer=distributed_optimizer)
    chunks[0].model_meta = checkpoint.model_meta(config)
    return chunks, build_optimizer(chunks, args)


def _backward(chunks, seed: int, poison: bool = False):
    """One forward/backward into megatron DDP's fp32 grad buffers; ``poison`` puts a NaN in one gradient."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (2, 16), generator=generator)
    positions = torch.arange(16).expand(2, 16)
    for chunk in chunks:
        chunk.zero_grad_buffer()
        chunk(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).float().mean().backward()
        chunk.finish_grad_sync()
    if poison:
        next(p for p in chunks[0].parameters() if p.dim() > 1).main_grad.view(-1)[3] = float("nan")


def _inner(adapter):
    (inner,) = adapter.optimizer.chained_optimizers
    return inner


def _adam_state(adapter) -> list:
    """fp32 main parameters, Adam moments and step counts of the optimizer, in its parameter order."""
    torch_adam = _inner(adapter).optimizer
    out = []
    for group in torch_adam.param_groups:
        for param in group["params"]:
            state = torch_adam.state[param]
            out += [param.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone(),
                    torch.as_tensor(state["step"], dtype=torch.float32)]
    return out


def _weights(chunks) -> list:
    return [p.detach().float().clone() for chunk in chunks for p in chunk.parameters()]


@pytest.mark.parametrize("bf16", [False, True])
def test_distributed_optimizer_state_round_trips_through_dist_checkpointing(megatron_single, tmp_path, bf16):
    """megatron's DistributedOptimizer (built by build_optimizer, as with --use-distributed-optimizer)
    saves its sharded state with checkpoint.SHARDED_METADATA and loads it into a fresh optimizer:
    main weights and Adam moments come back equal, and the next step matches."""
    chunks, adapter = _build(bf16, True, seed=1)
    assert isinstance(adapter, MegatronOptimizerAdapter) and isinstance(_inner(adapter), DistributedOptimizer)
    for step in range(2):
        _backward(chunks, seed=10 + step)
        assert adapter.step()[0]
    meta = {"model": chunks[0].model_meta, "tokenizer": "byte", "args": {}}
    path = checkpoint.save(str(tmp_path / "ck"), 2, chunks, adapter, {"iteration": 2}, meta)
    fresh_chunks, fresh = _build(bf16, True, seed=2)
    assert not torch.equal(_weights(fresh_chunks)[0], _weights(chunks)[0])
    checkpoint.load(path, fresh_chunks, fresh)
    for a, b in zip(_weights(fresh_chunks), _weights(chunks), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    saved, loaded = _adam_state(adapter), _adam_state(fresh)
    assert len(saved) == len(loaded) > 0
    for a, b in zip(loaded, saved):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for c, opt in ((chunks, adapter), (fresh_chunks, fresh)):
        _backward(c, seed=20)
        assert opt.step()[0]
    for a, b in zip(_weights(fresh_chunks), _weights(chunks)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("distributed_optimizer, expected", [(False, Float16OptimizerWithFloat16Params),
                                                             (True, DistributedOptimizer)])
def test_non_finite_gradient_skips_megatrons_bf16_step(megatron_single, monkeypatch, distributed_optimizer, expected):
    """With --bf16 megatron's optimizer has no grad scaler, so its own step would apply a NaN
    gradient; the adapter skips the update, reports it (the loop counts it), and the next finite
    step updates. Built as on a GPU (megatron DDP + get_megatron_optimizer) with the CPU shim."""
    for module in (data_parallel, optimizer_module):
        monkeypatch.setattr(module, "uses_megatron_optimizer", lambda use_distributed_optimizer: True)
    chunks, adapter = _build(True, distributed_optimizer, seed=3)
    assert type(_inner(adapter)) is expected
    before, main_before = _weights(chunks), [p.detach().clone() for p in _inner(adapter).get_parameters()]
    _backward(chunks, seed=30, poison=True)
    updated, norm = adapter.step()
    assert not updated and not torch.isfinite(torch.tensor(norm))
    for a, b in zip(_weights(chunks), before, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(_inner(adapter).get_parameters(), main_before, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _backward(chunks, seed=31)
    updated, norm = adapter.step()
    assert updated and 0 < norm < float("inf")
    assert any(not torch.equal(a, b) for a, b in zip(_weights(chunks), before))
    assert all(torch.isfinite(w).all() for w in _weights(chunks))
