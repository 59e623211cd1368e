"""A fresh machine gets what was tested: the kernels folder shadows nothing, the pinned versions
are the installed ones and satisfy setup.py's ranges, and the entry points start quietly."""

import ast
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as _norm
from packaging.version import Version

from conftest import REPO

CONSTRAINTS = os.path.join(REPO, "constraints.txt")


def _pins():
    """{normalised name: Version} from constraints.txt (local labels such as +cpu are not pinned)."""
    pins = {}
    with open(CONSTRAINTS, encoding="utf-8") as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                req = Requirement(line)
                (spec,) = req.specifier
                assert spec.operator == "==", f"{line}: constraints pin exact versions"
                pins[_norm(req.name)] = Version(spec.version)
    return pins


def _setup_requirements():
    """Every requirement string in setup.py (install_requires and all extras), read without running it."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in ("install_requires", "extras_require"):
            found += [n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant)
                      and isinstance(n.value, str) and any(c in n.value for c in "<>=")]
    return [Requirement(text) for text in found]


def test_kernels_folder_never_shadows_the_pypi_kernels_package():
    """From the repository root (the current directory is on sys.path), transformers' hub-kernels
    integration imports the PyPI `kernels` package, and our Triton kernels import as ratplus_kernels."""
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py"))
    code = ("import transformers.integrations.hub_kernels\n"
            "import kernels\n"
            "from kernels import CUDAProperties\n"
            "import ratplus_kernels.scan, ratplus_kernels.attention, ratplus_kernels.decode\n"
            "print(kernels.__file__)\n"
            "print(ratplus_kernels.scan.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    pypi_kernels, ours = done.stdout.split()
    assert not pypi_kernels.startswith(os.path.join(REPO, "kernels") + os.sep)
    assert ours.endswith(os.path.join("kernels", "ratplus_kernels", "scan.py"))


def test_pins_satisfy_setup_ranges():
    """A pin outside setup.py's range would mean the range admits what was never tested, or the
    pins were not made from this setup.py."""
    pins = _pins()
    checked = 0
    for req in _setup_requirements():
        pin = pins.get(_norm(req.name))
        if pin is not None:
            assert req.specifier.contains(pin, prereleases=True), f"pin {req.name}=={pin} outside setup.py's {req}"
            checked += 1
    assert checked >= 15


def test_installed_versions_are_the_pinned_ones():
    """tools/setup_env.sh installs with constraints.txt: what is installed is what the suite last passed with."""
    wrong = []
    for name, pin in _pins().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # pinned for another extra (the GPU stack) or another platform
        if Version(installed.public) != pin:
            wrong.append(f"{name} {installed} (pinned {pin})")
    assert not wrong, "installed versions differ from constraints.txt: " + ", ".join(wrong)


def test_every_console_script_is_checked():
    assert {"ratplus-pretrain", "ratplus-eval", "ratplus-serve"} <= set(SCRIPTS)


def test_transformer_engine_range_is_megatron_cores():
    """megatron-core 0.16.1 accepts Transformer Engine >=2.9,<2.12: the gpu extra must not admit more."""
    (te,) = [r for r in _setup_requirements() if _norm(r.name) == "transformer-engine"]
    assert te.specifier.contains("2.9.0") and te.specifier.contains("2.11.0")
    assert not te.specifier.contains("2.8.0") and not te.specifier.contains("2.12.0")


def _console_scripts():
    text = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
    return re.findall(r'"(ratplus-[a-z-]+)=', text)


SCRIPTS = _console_scripts()


@pytest.mark.integration
@pytest.mark.parametrize("argv", [[s, "--help"] for s in SCRIPTS]
                         + [[sys.executable, os.path.join(REPO, "tools", t), "--help"]
                            for t in ("estimate.py", "preprocess_data.py")])
def test_entry_points_start_quietly(argv):
    """No import-time warnings from megatron-core (missing TE/apex, deprecated defaults) on stderr."""
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
    assert done.stderr == ""


@pytest.mark.integration
def test_user_error_is_one_line_after_quiet_start(tmp_path):
    done = subprocess.run(["ratplus-generate", "--load", str(tmp_path / "missing"), "--prompt", "x"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ratplus-generate: error:"), done.stderr
