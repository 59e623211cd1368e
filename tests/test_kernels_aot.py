"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 within the shared memory a block
may opt into, at the tiles our launchers choose on CUDA (tools/kernels_aot.py; no GPU needed:
ptxas ships in the Triton wheel). The kernels run compiled only on a GPU; here they are built."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import repo_env

TOOL = Path(__file__).resolve().parent.parent / "tools" / "kernels_aot.py"
KERNELS = {"attention._fwd_kernel", "attention._dq_kernel", "attention._dkv_kernel", "slice_attention._fwd_kernel",
           "slice_attention._dq_kernel", "slice_attention._dkv_kernel", "topk._topk_kernel", "decode._split_kernel",
           "decode._merge_kernel", "scan._fwd_kernel", "scan._bwd_kernel"}


def python(code: str, timeout=600):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                            env=repo_env(), cwd=str(TOOL.parent))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_every_kernel_compiles_for_sm80_and_sm90_within_shared_memory(tmp_path):
    out = tmp_path / "aot.json"
    result = subprocess.run([sys.executable, str(TOOL), "--json", str(out)], capture_output=True, text=True,
                            timeout=900, env=repo_env())
    results = json.loads(out.read_text())
    for target in ("sm_80", "sm_90"):
        built = {r["kernel"] for r in results if r["target"] == target}
        assert built == KERNELS, target
        cases = {tuple(r["case"].rsplit(" ", 2)[1:]) for r in results if r["target"] == target}
        assert cases == {(dtype, f"d_h={d}") for dtype in ("bfloat16", "float32") for d in (64, 128)}
    bad = [(r["kernel"], r["case"], r["target"], r["shared"], r["limit"], r["error"]) for r in results if not r["fits"]]
    assert not bad and result.returncode == 0, bad
    assert all(r["registers"] > 0 and r["spill_bytes"] >= 0 for r in results)  # ptxas's report was read


@pytest.mark.integration
def test_the_check_sees_tiles_over_the_shared_memory_limit():
    """The former attention tiles at fp32, d_h 128 (128 x 64 forward) ask for more than either target allows."""
    found = python("""
import json, torch
from unittest import mock
import kernels_aot as aot
import ratplus_kernels.attention as attention
with mock.patch.object(attention, "_blocks", lambda device, *a: ((128, 64, 8), (64, 64, 4))):
    launches = aot.record_launches((torch.float32,), (128,), only="attention")
results = aot.compile_all([l for l in launches if l.kernel.__name__ == "_fwd_kernel"])
print(json.dumps([[r.target, r.shared, r.limit, r.fits] for r in results]))
""")
    assert {target for target, *_ in found} == {"sm_80", "sm_90"}
    assert all(shared > limit and not fits for _, shared, limit, fits in found), found
