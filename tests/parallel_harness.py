"""Run one forward/backward of a small RAT+ model on N ranks and return loss and full gradients.

Invoked as ``torchrun --nproc-per-node N tests/parallel_harness.py OUT TP PATTERN [REFERENCE]``; rank 0
writes {loss, grads} with every gradient gathered back to its unsharded shape, so tests can
compare any parallel layout with the single-process run on the same weights and data
(REFERENCE: the single-process run's output file, whose weights are loaded and sharded).
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core import parallel_state  # noqa: E402

from megatron_ratplus import distributed  # noqa: E402
from megatron_ratplus.config import preset  # noqa: E402
from megatron_ratplus.model import build_model  # noqa: E402

SEQ, BATCH = 24, 2


def small_config(pattern="dense", **overrides):
    return preset("tiny", num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256,
                  seq_length=SEQ, attention_pattern=pattern, **overrides)


def make_inputs():
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, 256, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _shard(param, full, rank, size):
    if getattr(param, "tensor_model_parallel", False) and size > 1:
        return full.chunk(size, dim=param.partition_dim)[rank]
    return full


def load_sharded(model, weights):
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    state = {}
    for name, value in model.state_dict().items():
        if name in weights and value is not None and "_extra_state" not in name:
            state[name] = _shard(params[name], weights[name], rank, size) if name in params else weights[name]
    model.load_state_dict(state, strict=False)


def gather_grads(model):
    size = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if getattr(param, "tensor_model_parallel", False) and size > 1:
            parts = [torch.empty_like(grad) for _ in range(size)]
            dist.all_gather(parts, grad.contiguous(), group=group)
            grad = torch.cat(parts, dim=param.partition_dim)
        grads[name] = grad.detach().clone()
    return grads


def run(tp=1, pattern="dense", weights=None):
    """One step; without ``weights`` (a TP=1 state dict) the model keeps its seeded init."""
    torch.manual_seed(42)
    model = build_model(small_config(pattern, tensor_model_parallel_size=tp))
    if weights is not None:
        load_sharded(model, weights)
    tokens, labels = make_inputs()
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, -1)
    loss = model(tokens, positions, None, labels=labels).float().mean()
    loss.backward()
    return loss.detach(), gather_grads(model), model.state_dict()


if __name__ == "__main__":
    out, tp, pattern = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    weights = torch.load(sys.argv[4])["weights"] if len(sys.argv) > 4 else None
    distributed.initialize(tensor_parallel=tp)
    loss, grads, state = run(tp, pattern, weights)
    if dist.get_rank() == 0:
        torch.save({"loss": loss, "grads": grads, "weights": state}, out)
    distributed.shutdown()
