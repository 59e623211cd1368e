"""Per-head compositions and step decode under tensor parallelism equal the single-process run."""

import pytest
import torch

from conftest import torchrun
from harness.inference import run

pytestmark = pytest.mark.integration
TOL = dict(atol=2e-5, rtol=1e-4)


def test_tensor_parallel_per_head_decode_matches_single_process(tmp_path, megatron_single):
    # rank 0 holds heads 0-1 (dense, dilated), rank 1 heads 2-3 (dilated; local in layer 2)
    pattern = "1*dense|3*dilated:4,w=1;2*dilated:3|2*local:w=2"
    full, decoded, weights = run(1, pattern)
    torch.save({"weights": weights}, tmp_path / "tp1.pt")
    torch.testing.assert_close(decoded, full, **TOL)
    result = torchrun(2, "-m", "harness.inference", tmp_path / "tp2.pt", pattern, tmp_path / "tp1.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    tp2 = torch.load(tmp_path / "tp2.pt")
    torch.testing.assert_close(tp2["full"], full, **TOL)
    torch.testing.assert_close(tp2["decoded"], full, **TOL)
