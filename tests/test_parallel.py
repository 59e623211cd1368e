"""Every parallel layout against the single-process run on the same weights and data (gloo, CPU).

One torchrun launch per world size runs all its layouts (tests/harness/parallel.py --layouts):
imports dominate the cost on this 2-core machine. Layout names: tpN/ppN/cpN/vppN sizes, `sp`
sequence parallel, `dp2` pure data parallel; the world size fills the rest with data parallel.
Sequence 96 tokens: CP2 slices are 24 and CP4 slices 12 tokens, neither a multiple of D = 16.
Tolerance: fp32 everywhere; loss atol 1e-5, gradients atol 1e-6 + rtol 1e-4 (reduction order
differs between layouts, nothing else may).
"""

import pytest
import torch

from conftest import torchrun

pytestmark = pytest.mark.integration
PATTERNS = ("dense", "dilated:16,w=8,p=2")
JOINT = "dilated:64"  # joint training: the sparse half, then dense on the same batch
TWO = ("tp2", "tp2sp", "pp2", "pp2vpp2", "cp2", "dp2")
FOUR = ("cp4", "tp2cp2", "pp2cp2")
FOUR_MORE = ("tp2cp2sp", "dp2cp2")  # combinations of the above, in a second (slow) launch


def launch(nproc, out, patterns, layouts):
    result = torchrun(nproc, "-m", "harness.parallel", "--layouts", out, ";".join(patterns), *layouts, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    layouts = ("ref", "ref+joint", "cp2+joint", "tp2+save", "load:tp2") + TWO
    return launch(2, tmp_path_factory.mktemp("two") / "out.pt", PATTERNS + (JOINT,), layouts)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return launch(4, tmp_path_factory.mktemp("four") / "out.pt", PATTERNS, ("ref",) + FOUR)


@pytest.fixture(scope="module")
def four_ranks_more(tmp_path_factory):
    return launch(4, tmp_path_factory.mktemp("four_more") / "out.pt", PATTERNS, ("ref",) + FOUR_MORE)


def assert_same_step(got, want, what):
    torch.testing.assert_close(got["loss"], want["loss"], atol=1e-5, rtol=0, msg=f"{what}: loss")
    full_norm = torch.stack([g.norm() for g in want["grads"].values()]).norm()
    torch.testing.assert_close(want["grad_norm"], full_norm, atol=1e-6, rtol=1e-5, msg=f"{what}: reference norm")
    torch.testing.assert_close(got["grad_norm"], want["grad_norm"], atol=1e-6, rtol=1e-4, msg=f"{what}: grad norm")
    assert got["grads"].keys() == want["grads"].keys(), what
    for key, grad in want["grads"].items():
        assert grad.abs().sum() > 0, f"{what}: reference gradient of {key} is zero"
        torch.testing.assert_close(got["grads"][key], grad, atol=1e-6, rtol=1e-4, msg=f"{what}: grad {key}")


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", TWO)
def test_two_rank_layout_matches_single_process(two_ranks, layout, pattern):
    got, want = two_ranks[(layout, pattern)], two_ranks[("ref", pattern)]
    for key, weight in want["weights"].items():  # every layout starts from the same weights
        torch.testing.assert_close(got["weights"][key], weight, atol=0, rtol=0)
    assert_same_step(got, want, f"{layout} {pattern}")


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", FOUR)
def test_four_rank_layout_matches_single_process(four_ranks, layout, pattern):
    assert_same_step(four_ranks[(layout, pattern)], four_ranks[("ref", pattern)], f"{layout} {pattern}")


@pytest.mark.slow
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("layout", FOUR_MORE)
def test_more_four_rank_layouts_match_single_process(four_ranks_more, layout, pattern):
    assert_same_step(four_ranks_more[(layout, pattern)], four_ranks_more[("ref", pattern)], f"{layout} {pattern}")


def test_joint_training_step_under_cp2_matches_single_process(two_ranks):
    got, want = two_ranks[("cp2+joint", JOINT)], two_ranks[("ref+joint", JOINT)]
    assert_same_step(got["sparse"], want["sparse"], "cp2 joint, dilated:64 half")
    assert_same_step(got["dense"], want["dense"], "cp2 joint, dense half")
    assert abs(want["sparse"]["loss"] - want["dense"]["loss"]) > 1e-4  # the halves really differ


@pytest.mark.parametrize("pattern", PATTERNS)
def test_resume_tp2_checkpoint_at_tp1(two_ranks, pattern):
    saved, resumed, ref = two_ranks[("tp2+save", pattern)], two_ranks[("load:tp2", pattern)], two_ranks[("ref", pattern)]
    for key, weight in saved["saved"].items():
        torch.testing.assert_close(resumed["weights"][key], weight, atol=0, rtol=0, msg=key)
        assert not torch.equal(weight, ref["weights"][key]), f"{key}: the saved step changed nothing"
    assert abs(resumed["loss"] - ref["loss"]) > 1e-4  # it resumed the updated weights, not the shared ones


def test_pp2_vpp2_resume_with_optimizer_is_exact(tmp_path):
    """Interleaved pipeline: a save with the optimizer (each chunk's state under its own 'modelN'
    key) resumes to the same weights and per-rank RNG states as the uninterrupted run."""
    import numpy as np

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from megatron_ratplus import checkpoint, distributed

    flags = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
             "--micro-batch-size", "1", "--global-batch-size", "4", "--eval-iters", "2", "--eval-interval", "0",
             "--no-progress-bar", "--train-iters", "2", "--save-interval", "1", "--lr", "1e-2",
             "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]

    def run(save_dir):
        result = torchrun(2, "-m", "megatron_ratplus.cli.pretrain", *flags, "--save", save_dir, "--load", save_dir,
                          timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "differs" not in result.stderr  # no per-rank state in the common (rank-0) dict

    run(tmp_path / "full")
    (tmp_path / "resumed").mkdir()
    (tmp_path / "full" / "iter_0000001").rename(tmp_path / "resumed" / "iter_0000001")
    run(tmp_path / "resumed")  # iteration 2 from the iteration-1 checkpoint, Adam moments included

    distributed.initialize()
    full, resumed = (str(tmp_path / name / "iter_0000002") for name in ("full", "resumed"))
    want, got = (checkpoint.load_model(path)[0].state_dict() for path in (full, resumed))
    tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 10
    for key in tensors:
        assert torch.equal(got[key], want[key]), key

    def rng_states(path):
        template = {rank: ShardedObject(checkpoint.RNG_KEY, None, (2,), (rank,)) for rank in range(2)}
        return dist_checkpointing.load(template, path)

    want, got = rng_states(full), rng_states(resumed)
    assert not np.array_equal(want[0]["numpy"][1], want[1]["numpy"][1])  # ranks' states differ...
    for rank in range(2):  # ...and each rank resumed its own
        assert np.array_equal(got[rank]["numpy"][1], want[rank]["numpy"][1]) and got[rank]["python"] == want[rank]["python"]
