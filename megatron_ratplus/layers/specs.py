"""ModuleSpecs that place the RAT+ mixer in megatron-core's TransformerLayer.

Two implementations, named as Megatron-LM's ``--transformer-impl`` names them:

`local`: megatron-core's Column/RowParallelLinear and our RMSNorm (runs on CPU, used by tests).
`transformer_engine`: Transformer Engine's linears with the RMSNorm fused into W_in and fc1
(``TELayerNormColumnParallelLinear``, told RMSNorm and its epsilon by ``config.normalization``
and ``config.layernorm_epsilon``), W_out and fc2 as ``TERowParallelLinear``, the final norm
``TENorm``. Under FP8 only these four GEMMs run in FP8 (docs/DESIGN.md §8).

Both write the same dist-checkpoint keys (docs/DESIGN.md §7): megatron's own linears already
carry TE-compatible ``_extra_state`` entries, and the TE layer maps its fused norm weights onto
the local norms' keys through TransformerLayer's ``sharded_state_dict_keys_map``.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ratplus.errors import UserError
from megatron_ratplus.layers.core_attention import PatternAttention
from megatron_ratplus.layers.mixer import RATPlusMixer, RATPlusMixerSubmodules
from megatron_ratplus.layers.norm import RMSNorm
from megatron_ratplus.optional import have, require

_TE = "megatron.core.extensions.transformer_engine"
TRANSFORMER_IMPLS = ("transformer_engine", "local")

# TE parameter name prefix -> the local spec's, per layer: checkpoints keep the local names.
TE_TO_LOCAL_CHECKPOINT_KEYS = {
    "self_attention.linear_in.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


class TransformerImplError(UserError):
    """An unknown or unusable --transformer-impl."""


def resolve_transformer_impl(requested: Optional[str] = None) -> str:
    """The layer implementation to build: Megatron-LM's ``--transformer-impl`` value.

    None picks ``transformer_engine`` where TE imports and a CUDA device is visible, else
    ``local``; asking for ``transformer_engine`` without either is a one-line error.
    """
    if requested is None:
        return "transformer_engine" if torch.cuda.is_available() and have("transformer_engine") else "local"
    if requested not in TRANSFORMER_IMPLS:
        raise TransformerImplError(f"unknown --transformer-impl '{requested}' "
                                   f"(choose from {', '.join(TRANSFORMER_IMPLS)})")
    if requested == "transformer_engine":
        require("transformer_engine", "--transformer-impl transformer_engine", cuda=True)
    return requested


def _layer_spec(input_norm, pre_mlp_norm, linear_in, linear_out, fc1, fc2, keys_map=None) -> ModuleSpec:
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
            sharded_state_dict_keys_map=dict(keys_map or {}),
        ),
    )


def get_ratplus_layer_local_spec() -> ModuleSpec:
    """Layer spec on megatron-core's own tensor-parallel linears (CPU and GPU)."""
    return _layer_spec(RMSNorm, RMSNorm, ColumnParallelLinear, RowParallelLinear,
                       ColumnParallelLinear, RowParallelLinear)


def get_ratplus_layer_te_spec() -> ModuleSpec:
    """Layer spec on Transformer Engine linears (norm fused into W_in and fc1); needs TE and CUDA.

    megatron's TE wrappers subclass MagicMocks when TE is absent, so a TE spec built without TE
    would construct a model of mocks: refuse instead.
    """
    resolve_transformer_impl("transformer_engine")
    norm_linear = ModuleSpec(module=(_TE, "TELayerNormColumnParallelLinear"))
    row_linear = ModuleSpec(module=(_TE, "TERowParallelLinear"))
    return _layer_spec(IdentityOp, IdentityOp, norm_linear, row_linear, norm_linear, row_linear,
                       keys_map=TE_TO_LOCAL_CHECKPOINT_KEYS)


def get_ratplus_block_spec(config, transformer_impl: Optional[str] = None,
                           vp_stage=None) -> TransformerBlockSubmodules:
    """Block spec: this pipeline stage's layers plus the final RMSNorm, in the resolved impl."""
    impl = resolve_transformer_impl(transformer_impl)
    if impl == "transformer_engine":
        if config.normalization != "RMSNorm":  # TE reads the norm type from the config
            raise TransformerImplError(f"RAT+ uses RMSNorm; the config asks for {config.normalization}")
        layer, final_norm = get_ratplus_layer_te_spec(), ModuleSpec(module=(_TE, "TENorm"))
    else:
        layer, final_norm = get_ratplus_layer_local_spec(), RMSNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=final_norm)
