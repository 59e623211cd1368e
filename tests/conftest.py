import os
import sys

# Triton reads this when a kernel is decorated, i.e. when ratplus_kernels is first imported,
# whichever test module does that first; the CPU suite runs every kernel in the interpreter.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def megatron_single():
    """A one-rank process group with megatron's parallel_state (TP = PP = CP = 1)."""
    from megatron_ratplus import distributed

    distributed.initialize()
    yield


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def repo_env():
    """Environment for subprocesses: import this checkout's packages first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env
