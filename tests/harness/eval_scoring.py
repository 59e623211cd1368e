"""Evaluation scoring (continuation log-likelihoods, greedy decoding until stop strings) of a
small RAT+ model, tensor-parallel over all ranks.

``torchrun --nproc-per-node N -m harness.eval_scoring OUT PATTERN WEIGHTS`` (conftest.torchrun):
WEIGHTS (a file with a TP=1 state dict under "weights") is sharded per rank; every rank runs
every request and rank 0 writes {logprobs, texts}. In-process, ``run(1, pattern)`` gives the
single-process reference.
"""


import torch

from harness import run_tensor_parallel
from harness.parallel import SEQ, load_sharded, small_config
from megatron_ratplus.evaluation.scoring import continuation_logprobs, greedy_until
from megatron_ratplus.model import build_model


def decode(ids):
    return " ".join(str(i) for i in ids) + " "


def run(tp, pattern, weights=None):
    torch.manual_seed(42)
    model = build_model(small_config(pattern, tensor_model_parallel_size=tp)).eval()
    if weights is not None:
        load_sharded(model, weights)
    gen = torch.Generator().manual_seed(11)

    def tokens(n):
        return torch.randint(0, 256, (n,), generator=gen).tolist()

    pairs = [(tokens(n), tokens(m)) for n, m in ((5, 2), (14, 1), (3, 6), (9, 4))]
    logprobs = continuation_logprobs(model, pairs, SEQ, batch_size=3)
    prompts = [tokens(n) for n in (6, 11, 4)]
    texts = greedy_until(model, prompts, decode, 8, SEQ, stop_strings=[[], [" 7 "], []], batch_size=2)
    return logprobs, texts, model.state_dict()


if __name__ == "__main__":
    run_tensor_parallel(run, ("logprobs", "texts"))
