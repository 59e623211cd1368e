"""ratplus-generate end to end on a tiny model (the checkpoint loader is stood in for)."""

import sys
import types

import pytest
import torch

from megatron_ratplus.cli import generate as cli
from megatron_ratplus.config import preset
from megatron_ratplus.errors import UserError
from megatron_ratplus.inference import SamplingConfig, generate
from megatron_ratplus.model import build_model, set_attention_pattern


class ByteTokenizer:
    eod = 256

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")


@pytest.fixture
def checkpoint(monkeypatch, megatron_single):
    torch.manual_seed(0)
    config = preset("tiny", num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=264, seq_length=64)
    model = build_model(config).eval()
    loaded = []

    def load_model(path, pattern=None, dtype="fp32"):
        if path != "CKPT":
            raise UserError(f"'{path}' is not a checkpoint directory")
        loaded.append(pattern)
        if pattern is not None:
            set_attention_pattern(model, pattern)
        return model, config, ByteTokenizer()

    monkeypatch.setitem(sys.modules, "megatron_ratplus.checkpoint", types.SimpleNamespace(load_model=load_model))
    return model, loaded


def test_generate_cli_prints_the_api_continuations(checkpoint, capsys):
    model, loaded = checkpoint
    assert cli.main(["--load", "CKPT", "--pattern", "cycle(dense;dilated:4)", "--prompt", "Hello",
                     "--prompt", "Hi there", "--max-new-tokens", "6", "--show-cache"]) == 0
    out = capsys.readouterr()
    assert loaded == ["cycle(dense;dilated:4)"]
    expected = generate(model, [list(b"Hello"), list(b"Hi there")],
                        SamplingConfig(max_new_tokens=6, stop_tokens=[256]), pattern="cycle(dense;dilated:4)")
    lines = out.out.splitlines()
    assert lines[0] == "Hello" + ByteTokenizer().decode(expected.tokens[0])
    assert lines[2] == "Hi there" + ByteTokenizer().decode(expected.tokens[1])
    assert f"decode cache: {expected.cache_bytes} bytes" in out.err


@pytest.mark.parametrize("argv, needle", [
    (["--load", "nowhere", "--prompt", "x"], "'nowhere' is not a checkpoint directory"),
    (["--load", "CKPT", "--prompt", "x", "--pattern", "dense;dense;dense"], "names 3 layers, but the model has 2"),
    (["--load", "CKPT", "--prompt", "x" * 60, "--max-new-tokens", "10"], "exceeds the model's maximum length"),
    (["--load", "CKPT", "--prompt", "x", "--stop", "ab"], "a stop string must be one token"),
    (["--load", "CKPT"], "give at least one --prompt"),
    (["--load", "CKPT", "--prompt", "x", "--max-new-tokens", "abc"], "argument --max-new-tokens: expected an integer, got 'abc'"),
])
def test_generate_cli_bad_input_is_one_line(checkpoint, capsys, argv, needle):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("ratplus-generate: error:")


def test_generate_cli_help():
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
