"""Model configuration: megatron-core's TransformerConfig plus the RAT+ fields, and the presets.

The RAT+ architecture fixes most of TransformerConfig (RMSNorm 1e-6, GELU MLP without bias, no
dropout, std 0.02 everywhere, RoPE base 10000); :func:`preset` fills those in so that a preset
name and a few overrides describe a model completely.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.utils import init_method_normal

from megatron_ratplus.data.tokenizer import ByteTokenizer, padded_vocab_size
from megatron_ratplus.patterns import parse_composition


@dataclass
class RATPlusConfig(TransformerConfig):
    """TransformerConfig with the RAT+ mixer's settings.

    recurrence: the gated k/v recurrence (False: the attention-only baseline, W_in d -> 4d).
    attention_pattern: the pattern (or composition) the mixers start with (switchable later, see model.py).
    real_vocab_size: the tokenizer's vocabulary; ids from it up to the padded ``vocab_size`` are
    padding, whose logits are -inf (never scored or sampled). None: no padding.
    """

    recurrence: bool = True
    attention_pattern: str = "dense"
    vocab_size: int = 32000
    real_vocab_size: Optional[int] = None
    seq_length: int = 4096
    rotary_base: int = 10000
    # megatron's default "full" is deprecated and warns on every config; the empty list is its
    # new spelling of the same thing (capture the whole layer, if CUDA graphs are on at all).
    cuda_graph_scope: List = field(default_factory=list)

    def __post_init__(self):
        parse_composition(self.attention_pattern).validate(self.num_layers, self.num_attention_heads)  # fail early
        if self.init_method is None:
            self.init_method = init_method_normal(self.init_method_std)
        if self.output_layer_init_method is None:  # RAT+ uses std 0.02 for every matrix
            self.output_layer_init_method = init_method_normal(self.init_method_std)
        super().__post_init__()

    @property
    def mixer_parts(self) -> int:
        """Rows of W_in per channel: o, q, k, v (+ g with the recurrence)."""
        return 5 if self.recurrence else 4


# The fields that fix a model's shape: what a checkpoint records to rebuild the model.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
              "vocab_size", "real_vocab_size", "recurrence")

# Shapes from docs/DESIGN.md §1 (the authors' configs); `tiny` trains on a laptop CPU with the
# byte-level tokenizer (its vocabulary padded by megatron's rule).
PRESETS = {
    "tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=512,
                 seq_length=256, vocab_size=padded_vocab_size(ByteTokenizer.vocab_size)),
    "1.5b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=8192),
    "2.6b": dict(num_layers=28, hidden_size=2560, num_attention_heads=20, ffn_hidden_size=10240),
    "7.6b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=16384),
}

# The architecture every preset shares.
ARCHITECTURE = dict(
    normalization="RMSNorm",
    layernorm_epsilon=1e-6,
    add_bias_linear=False,
    gated_linear_unit=False,
    activation_func=F.gelu,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.02,
    bias_activation_fusion=False,
    bias_dropout_fusion=False,
    masked_softmax_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
)


def model_config(**settings) -> RATPlusConfig:
    """A RATPlusConfig from a complete shape (e.g. a checkpoint's) and any other RATPlusConfig
    field, with the architecture every RAT+ model shares."""
    unknown = sorted(set(settings) - {f.name for f in fields(RATPlusConfig)})
    if unknown:
        raise ValueError(f"unknown model setting '{unknown[0]}'")
    values = {**ARCHITECTURE, **settings}
    values.setdefault("use_cpu_initialization", not torch.cuda.is_available())
    return RATPlusConfig(**values)


def preset_settings(name: str, **overrides) -> dict:
    """Preset ``name``'s shape with ``overrides``; the MLP follows an overridden hidden size (4 d)
    unless it is given too, and what the preset leaves out is RATPlusConfig's default."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}' (choose from {', '.join(PRESETS)})")
    defaults = {f.name: f.default for f in fields(RATPlusConfig) if f.name in SHAPE_KEYS}
    values = {**defaults, **PRESETS[name], **overrides}
    if "ffn_hidden_size" not in overrides and "hidden_size" in overrides:
        values["ffn_hidden_size"] = 4 * values["hidden_size"]
    return values


def preset(name: str, **overrides) -> RATPlusConfig:
    """A RATPlusConfig for preset ``name`` with ``overrides`` (any RATPlusConfig field)."""
    return model_config(**preset_settings(name, **overrides))
