import os
import subprocess
import sys

# Triton reads this when a kernel is decorated, i.e. when ratplus_kernels is first imported,
# whichever test module does that first. The suite runs every kernel on CPU tensors, so in the
# interpreter, on a GPU machine too (compiled kernels are tools/gpu_check.py's); set
# TRITON_INTERPRET=0 to override.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
# This checkout's Triton kernels (kernels/ratplus_kernels) before any installed copy.
sys.path.insert(1, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# A SIGTERM that reaches the test runner itself (seen once in a full run, sender not yet found:
# some launcher in a test signalled the runner's process group) would end the whole session.
# The runner notes it and says so at the end instead; children exec'd by tests get the default
# action back, and preprocessing's forked workers reset it themselves.
_RUNNER_SIGTERMS = []


def pytest_sessionstart(session):
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: _RUNNER_SIGTERMS.append(signum))
    # A runner started in the background by a shell (`pytest ... &`, nohup) inherits Ctrl-C
    # ignored, and so would every console script the tests start and then interrupt: they would
    # never see it. Children exec'd from a runner that handles SIGINT get the default back.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_terminal_summary(terminalreporter):
    if _RUNNER_SIGTERMS:
        terminalreporter.write_line(f"WARNING: the test runner received SIGTERM {len(_RUNNER_SIGTERMS)} time(s) "
                                    "from a test's process (ignored)", yellow=True, bold=True)


@pytest.fixture(scope="session")
def megatron_single():
    """A one-rank process group with megatron's parallel_state (TP = PP = CP = 1)."""
    from megatron_ratplus import distributed

    distributed.initialize()
    yield


TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


def repo_env():
    """Environment for subprocesses: this checkout's packages first, and the test harnesses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "kernels"), TESTS, env.get("PYTHONPATH", "")])
    return env


def torchrun(nproc: int, *argv, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node NPROC ARGV...`` on CPU (gloo); ARGV is ``-m MODULE ARGS``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *map(str, argv)]
    return subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=timeout)
