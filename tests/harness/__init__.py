"""Multi-process harnesses, run on every rank by torchrun as modules (``-m harness.parallel``,
``-m harness.inference``; see conftest.torchrun) and imported by the tests for the
single-process reference."""


def run_tensor_parallel(run, names):
    """The ``__main__`` of a TP harness: ``OUT PATTERN WEIGHTS`` from argv, one TP group over
    every rank, ``run(tp, pattern, weights)``; rank 0 saves its first outputs under ``names``."""
    import os
    import sys

    import torch
    import torch.distributed as dist

    from megatron_ratplus import distributed

    out, pattern, reference = sys.argv[1:4]
    distributed.initialize(tensor_parallel=int(os.environ["WORLD_SIZE"]))
    results = run(dist.get_world_size(), pattern, torch.load(reference)["weights"])
    if dist.get_rank() == 0:
        torch.save(dict(zip(names, results)), out)
    distributed.shutdown()
