"""FP8 start-up checks: the shapes Transformer Engine's FP8 GEMMs accept, and the GPU a recipe needs.

Only the four GEMMs of a layer run in FP8 (docs/DESIGN.md §8): W_in, W_out, fc1, fc2. TE's FP8
kernels need every GEMM dimension a multiple of 16 (the weight's two sizes on this tensor-
parallel rank and the token count of a micro-batch on this rank); otherwise TE fails deep
inside the first forward pass. This check says which size is wrong before anything is built.
"""

from __future__ import annotations

import torch

from megatron_ratplus.errors import UserError

FP8_MULTIPLE = 16
# TE's MXFP8 recipe (block-scaled FP8) runs only on Blackwell tensor cores; older GPUs fail in the
# first forward pass.
MXFP8_CAPABILITY = (10, 0)


class FP8ShapeError(UserError):
    """A model or batch size that TE's FP8 GEMMs cannot take."""


def fp8_gemm_sizes(config, micro_batch_size: int = 1) -> dict:
    """name -> size of each dimension the FP8 GEMMs of one layer see on one rank."""
    tp = config.tensor_model_parallel_size
    width = config.kv_channels * config.num_attention_heads  # attention channels, all heads
    tokens = micro_batch_size * config.seq_length // max(1, config.context_parallel_size)
    return {
        "hidden size": config.hidden_size,
        "W_in output per tensor-parallel rank": config.mixer_parts * width // tp,
        "W_out input per tensor-parallel rank": width // tp,
        "ffn hidden size per tensor-parallel rank": config.ffn_hidden_size // tp,
        "tokens per micro-batch per rank": tokens // (tp if config.sequence_parallel else 1),
    }


def check_fp8_shapes(config, micro_batch_size: int = 1) -> None:
    """Raise FP8ShapeError unless every FP8 GEMM dimension is a multiple of 16."""
    for name, size in fp8_gemm_sizes(config, micro_batch_size).items():
        if size % FP8_MULTIPLE:
            raise FP8ShapeError(f"FP8 needs every GEMM dimension to be a multiple of {FP8_MULTIPLE}; "
                                f"the {name} is {size}")


def check_fp8_recipe(recipe: str) -> None:
    """Refuse ``--fp8-recipe mxfp8`` on a GPU below compute capability 10.0 (call with CUDA present)."""
    capability = tuple(torch.cuda.get_device_capability())
    if recipe == "mxfp8" and capability < MXFP8_CAPABILITY:
        raise UserError(f"--fp8-recipe mxfp8 needs compute capability {MXFP8_CAPABILITY[0]}.{MXFP8_CAPABILITY[1]} "
                        f"(Blackwell); this GPU has {capability[0]}.{capability[1]}: use delayed or tensorwise")
