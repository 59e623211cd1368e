"""Run one forward/backward of a small RAT+ model on N ranks and return loss and full gradients.

Two modes, both launched with ``torchrun --standalone --nproc-per-node N -m harness.parallel``
(conftest.torchrun):

``OUT TP PATTERN [REFERENCE]``: one TP layout through a plain forward/backward; rank 0 writes
{loss, grads} with every gradient gathered back to its unsharded shape (REFERENCE: the
single-process run's output file, whose weights are loaded and sharded).

``--layouts OUT "PATTERN;PATTERN" LAYOUT...``: several layouts in one launch (imports cost ~10 s
per launch). Per pattern, the seeded single-process model is saved with megatron's
dist_checkpointing; each LAYOUT (``ref`` = the single-process run, ``tp2``, ``pp2``, ``pp2vpp2``,
``cp4``, ``tp2cp2``, ``tp2sp``, ``dp2``, ...; ``+save`` also saves its weights, ``load:NAME``
loads those at TP1: the resharding resume; ``+joint`` adds joint training's dense half) loads it,
runs one global batch through megatron's schedule and gathers gradients and weights by their
sharded keys. Rank 0 writes {(layout, pattern): {loss, grads, weights}}.
"""

import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ratplus import distributed
from megatron_ratplus.config import preset
from megatron_ratplus.data.datasets import collate
from megatron_ratplus.model import build_model, set_attention_pattern
from megatron_ratplus.training.data_parallel import clip_grad_norm, wrap_model, zero_grads
from megatron_ratplus.training.schedule import build_model_chunks, forward_backward

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


if __name__ == "__main__" and sys.argv[1] != "--layouts":
    out, tp, pattern = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    weights = torch.load(sys.argv[4])["weights"] if len(sys.argv) > 4 else None
    distributed.initialize(tensor_parallel=tp)
    loss, grads, state = run(tp, pattern, weights)
    if dist.get_rank() == 0:
        torch.save({"loss": loss, "grads": grads, "weights": state}, out)
    distributed.shutdown()


# ---- --layouts mode -------------------------------------------------------------------------------------

LONG_SEQ, GLOBAL_BATCH, LAYERS = 96, 4, 4


def parse_layout(name):
    """'tp2cp2', 'pp2vpp2', 'tp2sp', 'dp2', 'ref' -> dict of sizes (dp is implied by the world size)."""
    import re

    sizes = {"tp": 1, "pp": 1, "cp": 1, "vpp": None, "sp": name.endswith("sp")}
    for key, value in re.findall(r"(vpp|tp|pp|cp|dp)(\d+)", name):
        if key != "dp":
            sizes[key] = int(value)
    return sizes


def layout_config(pattern, sizes):
    return preset("tiny", num_layers=LAYERS, hidden_size=32, num_attention_heads=4, vocab_size=256,
                  seq_length=LONG_SEQ, attention_pattern=pattern, tensor_model_parallel_size=sizes["tp"],
                  pipeline_model_parallel_size=sizes["pp"], context_parallel_size=sizes["cp"],
                  virtual_pipeline_model_parallel_size=sizes["vpp"], sequence_parallel=sizes["sp"],
                  pipeline_dtype=torch.float32)


def chunk_state(chunks):
    """Sharded state dict over all chunks (megatron prefixes virtual stages 'model0', 'model1', ...)."""
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_checkpoint(chunks, path):
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(chunk_state(chunks), path)


def load_checkpoint(chunks, path):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(chunk_state(chunks), path)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state if len(chunks) == 1 else state[f"model{i}"])


def _sharded_tensors(chunks):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return [t for t in nested_values(chunk_state(chunks)) if isinstance(t, ShardedTensor)]


def gather_by_key(chunks, value_of):
    """{sharded key: full tensor} of ``value_of(param)`` over all ranks, built from each shard's offset.

    The primary replica of every shard writes its slice; a world all-reduce assembles the rest.
    """
    params = {p.data_ptr(): p for chunk in chunks for p in chunk.parameters()}
    pieces = []
    for shard in _sharded_tensors(chunks):
        param = params.get(shard.data.data_ptr())
        if param is None or any(shard.replica_id if isinstance(shard.replica_id, tuple) else (shard.replica_id,)):
            continue
        pieces.append((shard.key, shard.global_shape, shard.global_offset, shard.prepend_axis_num, value_of(param)))
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, sorted({(k, s) for k, s, *_ in pieces}))
    full = {k: torch.zeros(s) for k, s in sorted(set().union(*map(set, shapes)))}
    for key, _, offset, prepend, value in pieces:
        index = tuple(offset[:prepend]) + tuple(slice(o, o + n) for o, n in zip(offset[prepend:], value.shape))
        full[key][index] = value.detach().float()
    for value in full.values():
        dist.all_reduce(value)
    return full


def microbatches_for(dp_rank, dp_size):
    gen = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, 256, (GLOBAL_BATCH, LONG_SEQ + 1), generator=gen)
    per_rank = GLOBAL_BATCH // dp_size
    mine = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [collate([{"tokens": row[:-1], "labels": row[1:], "loss_mask": torch.ones(LONG_SEQ),
                      "position_ids": torch.arange(LONG_SEQ)}]) for row in mine]


def one_step(chunks, wrapped, batches):
    zero_grads(wrapped)
    loss = torch.tensor(forward_backward(wrapped, batches, LONG_SEQ, 1))
    dist.broadcast(loss, src=dist.get_world_size() - 1)  # the last pipeline stage holds it
    grads = gather_by_key(chunks, lambda p: p.grad)
    norm = torch.tensor(clip_grad_norm(wrapped, 1e-3))  # clips: the weights below step with clipped grads
    return {"loss": loss, "grads": grads, "weights": gather_by_key(chunks, lambda p: p.data), "grad_norm": norm}


def run_layout(name, pattern, checkpoint):
    """One layout: NAME[+save][+joint]; 'ref' and 'load:NAME' run at TP = PP = CP = 1 on all the data
    (every rank computes the single-process result, so the data-parallel average changes nothing)."""
    base, *mods = name.split("+")
    single = base == "ref" or base.startswith("load:")
    sizes = parse_layout("ref" if single else base)
    distributed.initialize(sizes["tp"], sizes["pp"], sizes["cp"], sizes["vpp"])
    config = layout_config(pattern, sizes)
    torch.manual_seed(7 + dist.get_rank())  # weights come from the checkpoint, not this init
    chunks = build_model_chunks(config)
    source = os.path.join(checkpoint, base[5:]) if base.startswith("load:") else checkpoint
    load_checkpoint(chunks, os.path.join(source, "weights"))
    wrapped = wrap_model(chunks, config)
    batches = microbatches_for(0, 1) if single else microbatches_for(
        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
    result = one_step(chunks, wrapped, batches)
    if "save" in mods:  # save after an SGD step, so the resumed weights differ from the shared ones
        sgd_step(chunks)
        result["saved"] = gather_by_key(chunks, lambda p: p.data)
        save_checkpoint(chunks, os.path.join(checkpoint, base, "weights"))
    if "joint" in mods:  # joint training's second half: an SGD step, then the same batch with dense attention
        sgd_step(chunks)
        for chunk in chunks:
            set_attention_pattern(chunk, "dense")
        result = {"sparse": result, "dense": one_step(chunks, wrapped, batches)}
    return result


def sgd_step(chunks):
    for chunk in chunks:
        for param in chunk.parameters():
            param.data.add_(param.grad, alpha=-100.0)  # grads are clipped to norm 1e-3


def run_layouts(out, patterns, names):
    import shutil

    results = {}
    for index, pattern in enumerate(patterns):
        ckpt = os.path.join(os.path.dirname(os.path.abspath(out)), f"checkpoints{index}")
        distributed.initialize()
        torch.manual_seed(42)
        reference = build_model_chunks(layout_config(pattern, parse_layout("ref")))
        save_checkpoint(reference, os.path.join(ckpt, "weights"))
        for name in names:
            results[(name, pattern)] = run_layout(name, pattern, ckpt)
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(ckpt)
    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__" and sys.argv[1] == "--layouts":
    distributed.initialize()
    run_layouts(sys.argv[2], sys.argv[3].split(";"), sys.argv[4:])
    distributed.shutdown()
