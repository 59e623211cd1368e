"""tools/gpu_check.py stays runnable without a GPU: it imports, refuses plainly, and its dry run passes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "gpu_check.py"


def run(*args, timeout=60):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_help_and_no_gpu_message():
    assert run("--help").returncode == 0
    result = run()
    assert result.returncode == 2
    assert result.stderr.strip() == "gpu_check: no CUDA device (use --dry-run for the CPU smoke test)"


@pytest.mark.slow
def test_dry_run_checks_every_kernel(tmp_path):
    out = tmp_path / "check.json"
    result = run("--dry-run", "--json", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["correct"] and len(report["max_relative_error"]) == 6 and report["failures"] == {}
    assert {"copy_bandwidth_GBps", "scan_fwd", "scan_kv_fwd", "scan_kv_bwd", "attention T=32 dilated:4",
            "decode_ms"} <= set(report["timings"])
