"""ModuleSpecs that place the RAT+ mixer in megatron-core's TransformerLayer.

`local`: megatron-core's Column/RowParallelLinear and our RMSNorm (runs on CPU, used by tests).
`te`: Transformer Engine linears with the RMSNorm fused into the input projections (GPU, FP8).
TE classes are named by import path, so the TE spec object builds without TE installed;
building a model from it needs TE (see megatron_ratplus.optional).
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ratplus.layers.core_attention import PatternAttention
from megatron_ratplus.layers.mixer import RATPlusMixer, RATPlusMixerSubmodules
from megatron_ratplus.layers.norm import RMSNorm
from megatron_ratplus.optional import have

_TE = "megatron.core.extensions.transformer_engine"
BACKENDS = ("local", "te")


def _layer_spec(input_norm, pre_mlp_norm, linear_in, linear_out, fc1, fc2) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=RATPlusMixer,
                submodules=RATPlusMixerSubmodules(
                    linear_in=linear_in, core_attention=PatternAttention, linear_out=linear_out),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=fc1, linear_fc2=fc2)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def get_ratplus_layer_local_spec() -> ModuleSpec:
    """Layer spec on megatron-core's own tensor-parallel linears (CPU and GPU)."""
    return _layer_spec(RMSNorm, RMSNorm, ColumnParallelLinear, RowParallelLinear,
                       ColumnParallelLinear, RowParallelLinear)


def get_ratplus_layer_te_spec() -> ModuleSpec:
    """Layer spec on Transformer Engine linears (norm fused into W_in and fc1)."""
    norm_linear = ModuleSpec(module=(_TE, "TELayerNormColumnParallelLinear"))
    row_linear = ModuleSpec(module=(_TE, "TERowParallelLinear"))
    return _layer_spec(IdentityOp, IdentityOp, norm_linear, row_linear, norm_linear, row_linear)


def default_backend() -> str:
    """`te` where Transformer Engine is importable, else `local`."""
    return "te" if have("transformer_engine") else "local"


def get_ratplus_block_spec(config, backend: str = "local", vp_stage=None) -> TransformerBlockSubmodules:
    """Block spec: this pipeline stage's layers plus the final RMSNorm."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown layer backend '{backend}' (choose from {', '.join(BACKENDS)})")
    layer = get_ratplus_layer_te_spec() if backend == "te" else get_ratplus_layer_local_spec()
    final_norm = ModuleSpec(module=(_TE, "TENorm")) if backend == "te" else RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=final_norm)
