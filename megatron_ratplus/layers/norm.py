"""RMSNorm that works with megatron-core sequence parallelism.

megatron-core's torch-backed norm (WrappedTorchNorm) refuses ``sequence_parallel``; apex and
Transformer Engine norms are GPU-only. The math is torch's ``rms_norm``; the only addition is
marking the weight ``sequence_parallel`` so megatron's gradient finalisation all-reduces its
gradient across the tensor-parallel group, as it does for its own fused norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """RMSNorm over the last dimension with megatron's norm signature."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        # where megatron's own modules put their parameters (the rank's GPU), so the model is on one device
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), self.weight.to(x.dtype), self.eps)
