"""megatron-ratplus: RAT+ recurrence-augmented attention on megatron-core (train dense, infer sparse)."""

import warnings

# megatron-core warns four times at import that Transformer Engine and apex are missing (always so
# on CPU). Every entry point imports this package before megatron, so the warnings are dropped
# here; megatron_ratplus.optional.log_fused_kernels says once, in one line, which fused
# implementations a run uses, and a feature that needs TE or apex refuses in one line.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")
warnings.filterwarnings("ignore", category=FutureWarning, module="(torch.distributed|megatron)")
