"""Full-forward and step-decode logits of a small RAT+ model, tensor-parallel over all ranks.

``torchrun --nproc-per-node N -m harness.inference OUT PATTERN WEIGHTS`` (conftest.torchrun):
WEIGHTS (a file with a TP=1 state dict under "weights") is sharded per rank; rank 0 writes
{full, decoded}.
In-process, ``run(1, pattern)`` gives the single-process reference.
"""


import torch
from megatron.core import tensor_parallel

from harness import run_tensor_parallel
from harness.parallel import SEQ, load_sharded, small_config
from megatron_ratplus.inference import DecodeSession
from megatron_ratplus.model import build_model

PROMPT = 7


def run(tp, pattern, weights=None):
    torch.manual_seed(42)
    model = build_model(small_config(pattern, tensor_model_parallel_size=tp)).eval()
    if weights is not None:
        load_sharded(model, weights)
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(tokens, torch.arange(SEQ).expand(2, -1), None)
        full = tensor_parallel.gather_from_tensor_model_parallel_region(full)
    with DecodeSession(model, 2, SEQ) as session:
        decoded = [session.prefill(tokens[:, :PROMPT], torch.tensor([PROMPT, PROMPT]))]
        decoded += [session.step(tokens[:, i]).unsqueeze(1) for i in range(PROMPT, SEQ)]
    return full, torch.cat(decoded, dim=1), model.state_dict()


if __name__ == "__main__":
    run_tensor_parallel(run, ("full", "decoded"))
