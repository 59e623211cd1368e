"""megatron-ratplus: RAT+ recurrence-augmented attention on megatron-core (train dense, infer sparse)."""

import os
import warnings

# megatron overlaps tensor/sequence-parallel communication with compute assuming one CUDA kernel
# queue, as Megatron-LM's launch scripts export. CUDA reads the variable when it initialises,
# which Transformer Engine's import may already do, so it is set here, at the first import of the
# package (torchrun and Python users included); a value the user set is kept, and
# --sequence-parallel refuses one other than 1 (training/config.py).
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

# megatron-core warns four times at import that Transformer Engine and apex are missing (always so
# on CPU). Every entry point imports this package before megatron, so the warnings are dropped
# here; megatron_ratplus.optional.log_fused_kernels says once, in one line, which fused
# implementations a run uses, and a feature that needs TE or apex refuses in one line.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).* not installed.*")
warnings.filterwarnings("ignore", category=FutureWarning, module="(torch.distributed|megatron)")
