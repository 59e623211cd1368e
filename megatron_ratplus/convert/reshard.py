"""Offline resharding of our checkpoints to another TP/PP layout, and single-file outputs.

megatron's dist_checkpointing stores every tensor with its global shape and loads it into any
layout, so resharding is: start TP x PP ranks (local CPU processes, gloo), build each rank's
model chunk at the target layout, load, save. The result holds the model weights (no optimizer
state): it serves evaluation, generation, export and --adapt-pattern; to resume training at
another layout, --load the original checkpoint directly (it reshards on load).
"""

from __future__ import annotations

import glob
import os

import torch

from megatron_ratplus import checkpoint
from megatron_ratplus.convert import ConversionError, fresh_output
from megatron_ratplus.errors import first_line
from megatron_ratplus.userfiles import full_disk_named, make_parents, publish, remove_folders, remove_stale_temps


def _save_at_layout(rank: int, world: int, port: int, source: str, target: str, tp: int, pp: int) -> None:
    """One rank: build its chunk at TP x PP, load ``source`` into it, save it under ``target``."""
    from megatron_ratplus import distributed
    from megatron_ratplus.config import model_config
    from megatron_ratplus.training.schedule import build_model_chunks

    if world > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    meta = checkpoint.read_meta(source)
    distributed.initialize(tp, pp)
    config = model_config(**meta["model"], tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                    pipeline_dtype=torch.float32)
    chunks = build_model_chunks(config)
    common = checkpoint.load(meta["path"], chunks)
    layout = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    saved_meta = {k: v for k, v in meta.items() if k not in ("path", "iteration")}
    saved_meta["args"] = {**meta.get("args", {}), **layout}
    saved_meta["source"] = {"format": "ours", "path": os.path.abspath(meta["path"]), **layout}
    kept = {k: common[k] for k in ("iteration", "consumed_samples", "nan_skipped") if k in common}
    checkpoint.save(target, meta["iteration"], chunks, None, kept, saved_meta)
    if world > 1:
        distributed.shutdown()


def reshard(source: str, output: str, tp: int, pp: int) -> str:
    """Write ``source`` (our checkpoint) as the new checkpoint directory ``output`` at TP x PP."""
    from megatron_ratplus.distributed import _free_port
    from megatron_ratplus.training.parallel_layout import validate_parallel_config

    meta = checkpoint.read_meta(source)
    shape = meta["model"]
    try:
        validate_parallel_config(tp * pp, tp, pp, 1, None, shape["num_layers"], shape["num_attention_heads"],
                                 shape["seq_length"])
    except ValueError as err:
        raise ConversionError(f"target layout TP={tp} PP={pp}: {first_line(err)}") from None
    if shape["vocab_size"] % tp:
        raise ConversionError(f"target TP={tp} does not divide the padded vocabulary of {shape['vocab_size']}")
    world = tp * pp
    with fresh_output(output) as tmp:
        if world == 1:
            _save_at_layout(0, 1, 0, source, tmp, 1, 1)
        else:
            torch.multiprocessing.spawn(_save_at_layout, args=(world, _free_port(), source, tmp, tp, pp), nprocs=world)
    return checkpoint.latest_checkpoint(output)


def save_file(blob: dict, output: str) -> str:
    """One torch file (tensors and plain values only: it loads with ``weights_only=True``),
    written to a temporary name and renamed into place."""
    if os.path.lexists(output):
        raise ConversionError(f"output {output} already exists; refusing to write over it")
    created = make_parents(os.path.dirname(os.path.abspath(output)))
    tmp = f"{output}.tmp-{os.getpid()}"
    remove_stale_temps(glob.escape(output) + ".tmp-*")
    published = False
    try:
        with full_disk_named(output):
            torch.save(blob, tmp)
            publish(tmp, output)
        published = True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not published:  # a failed conversion leaves no new empty folders
            remove_folders(created)
    return output
