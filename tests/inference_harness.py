"""Full-forward and step-decode logits of a small RAT+ model on N tensor-parallel ranks.

``torchrun --nproc-per-node N tests/inference_harness.py OUT TP PATTERN [REFERENCE]``: rank 0 writes
{full, decoded, weights}; REFERENCE (a TP=1 output) supplies the weights, sharded per rank.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel_harness import SEQ, load_sharded, small_config  # noqa: E402

from megatron_ratplus import distributed  # noqa: E402
from megatron_ratplus.inference import DecodeSession  # noqa: E402
from megatron_ratplus.model import build_model  # noqa: E402

PROMPT = 7


def run(tp, pattern, weights=None):
    torch.manual_seed(42)
    model = build_model(small_config(pattern, tensor_model_parallel_size=tp)).eval()
    if weights is not None:
        load_sharded(model, weights)
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(tokens, torch.arange(SEQ).expand(2, -1), None)
        full = torch.cat([full] if tp == 1 else _gather(full), dim=-1)
    with DecodeSession(model, 2, SEQ) as session:
        decoded = [session.prefill(tokens[:, :PROMPT], torch.tensor([PROMPT, PROMPT]))]
        decoded += [session.step(tokens[:, i]).unsqueeze(1) for i in range(PROMPT, SEQ)]
    return full, torch.cat(decoded, dim=1), model.state_dict()


def _gather(logits):
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, logits.contiguous())
    return parts


if __name__ == "__main__":
    out, tp, pattern = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    weights = torch.load(sys.argv[4])["weights"] if len(sys.argv) > 4 else None
    distributed.initialize(tensor_parallel=tp)
    full, decoded, state = run(tp, pattern, weights)
    if dist.get_rank() == 0:
        torch.save({"full": full, "decoded": decoded, "weights": state}, out)
    distributed.shutdown()
