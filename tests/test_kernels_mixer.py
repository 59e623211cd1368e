"""The RAT+ mixer gives the same output and gradients through the kernels as through the reference ops."""

import pytest
import torch
from test_mixer import make_mixer

from megatron_ratplus import backend
from ratplus_kernels import attention, scan

pytestmark = pytest.mark.usefixtures("megatron_single")


def run_mixer(mixer, x):
    x = x.clone().requires_grad_()
    out, _ = mixer(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weight).sum(), [x, *mixer.parameters()])
    return [out.detach(), *grads]


def test_mixer_through_kernels_matches_reference(monkeypatch):
    mixer, _ = make_mixer(pattern="dilated:4,w=2,p=1")
    x = torch.randn(21, 2, 32)
    monkeypatch.setenv(backend.ENV_VAR, "reference")
    want = run_mixer(mixer, x)

    used = []
    for module, name in ((scan, "gated_scan_kv"), (attention, "dilated_attention")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: used.append(_n) or _f(*a, **k))
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    got = run_mixer(mixer, x)
    assert sorted(used) == ["dilated_attention", "gated_scan_kv"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
