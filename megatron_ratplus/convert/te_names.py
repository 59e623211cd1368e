"""State-dict key names of the local layer spec <-> the Transformer Engine spec (docs/DESIGN.md §7).

The TE spec fuses each RMSNorm into the linear after it (TELayerNormColumnParallelLinear), so
the two norm weights of a layer live inside those linears; every other name is shared. Both
specs keep ``_extra_state`` entries (TE's FP8 metadata, megatron's placeholders) that belong to
one spec only: they are dropped, and the loading side starts from its own.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable

_LOCAL_TO_TE = (("input_layernorm.weight", "self_attention.linear_in.layer_norm_weight"),
                ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"))
_LAYER = r"^(.*\blayers\.\d+\.)"


def _mapping(names: Iterable[str], pairs) -> Dict[str, str]:
    out = {}
    for name in names:
        if name.endswith("_extra_state"):
            continue
        for src, dst in pairs:
            match = re.match(_LAYER + re.escape(src) + "$", name)
            if match:
                name_out = match.group(1) + dst
                break
        else:
            name_out = name
        out[name] = name_out
    return out


def local_to_te_keys(names: Iterable[str]) -> Dict[str, str]:
    """local-spec name -> TE-spec name for each of ``names`` (``_extra_state`` names are left out)."""
    return _mapping(names, _LOCAL_TO_TE)


def te_to_local_keys(names: Iterable[str]) -> Dict[str, str]:
    """TE-spec name -> local-spec name for each of ``names`` (``_extra_state`` names are left out)."""
    return _mapping(names, tuple((dst, src) for src, dst in _LOCAL_TO_TE))
