"""Evaluation and generation in bf16 (--bf16, docs/DESIGN.md §8): they run on CPU and stay close to fp32."""

import pytest
import torch

from megatron_ratplus import checkpoint
from megatron_ratplus.cli import eval as eval_cli
from megatron_ratplus.cli import generate as generate_cli
from megatron_ratplus.errors import UserError
from megatron_ratplus.training import pretrain

MICRO = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1", "--eval-interval", "0",
         "--no-progress-bar", "--lr", "1e-2", "--train-iters", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    save = tmp_path_factory.mktemp("bf16") / "ck"
    pretrain(MICRO + ["--save", str(save)])
    return str(save)


def test_bf16_perplexity_is_close_to_fp32_at_dense_and_sparse_patterns(trained):
    argv = ["--load", trained, "--patterns", "dense,dilated:4,w=2,p=1", "--eval-samples", "6"]
    fp32 = eval_cli.evaluate(argv)["perplexity"]
    bf16 = eval_cli.evaluate(argv + ["--bf16"])["perplexity"]
    assert [r.pattern for r in bf16] == [r.pattern for r in fp32]
    for a, b in zip(fp32, bf16):
        assert abs(a.loss - b.loss) < 0.02 * a.loss and a.loss != b.loss, (a, b)  # bf16 rounding, not a copy


def test_bf16_load_casts_every_parameter_and_generation_runs(trained, capsys):
    model, config, _ = checkpoint.load_model(trained, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and config.params_dtype == torch.bfloat16
    reference = checkpoint.load_model(trained)[0]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q.to(torch.bfloat16), msg=name)  # the same weights, rounded
    assert generate_cli.main(["--load", trained, "--bf16", "--prompt", "ab", "--max-new-tokens", "4",
                              "--pattern", "dilated:4,w=2,p=1", "--show-cache"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ab") and "decode cache:" in out.err


def test_unknown_dtype_is_a_user_error(trained):
    with pytest.raises(UserError, match="dtype must be one of fp32, bf16, not 'fp16'"):
        checkpoint.load_model(trained, dtype="fp16")


def test_lm_eval_model_loads_in_bf16(trained):
    from megatron_ratplus.evaluation.lm_eval_model import RatPlusLM

    lm = RatPlusLM(load=trained, pattern="dilated:4", w="2", p="1", dtype="bf16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16} and lm.pattern == "dilated:4,w=2,p=1"
    (logprob, greedy), = lm._loglikelihood_tokens([(("", "ab"), [1, 2], [3, 4])])
    assert logprob < 0 and isinstance(greedy, bool)
