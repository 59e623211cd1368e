"""ratplus-convert: the authors' layout maps onto ours head by head, and bad files are refused."""

import pickle

import pytest
import torch

from megatron_ratplus import checkpoint
from megatron_ratplus.cli import convert as convert_cli
from megatron_ratplus.convert import interleave_heads

L, D, H, V = 2, 32, 2, 300


def authors_state(old_gate=False):
    torch.manual_seed(0)
    state = {"embedding.wte.weight": torch.randn(V, D), "backbone.ln.weight": torch.rand(D)}
    for i in range(L):
        p = f"_orig_mod.backbone.layers.{i}."
        in_proj = torch.randn(5 * D, D)
        if old_gate:
            state[p + "seq_layer.in_proj.weight"], state[p + "seq_layer.fgate_proj.weight"] = in_proj[:4 * D], in_proj[4 * D:]
        else:
            state[p + "seq_layer.in_proj.weight"] = in_proj
        state[p + "seq_layer.input_norm.weight"] = torch.rand(D)
        state[p + "seq_layer.out_proj.weight"] = torch.randn(D, D)
        state[p + "hidden_layer.ln.weight"] = torch.rand(D)
        state[p + "hidden_layer.fc1.weight"] = torch.randn(4 * D, D)
        state[p + "hidden_layer.fc2.weight"] = torch.randn(D, 4 * D)
    state["head.lm_head.weight"] = state["embedding.wte.weight"]
    return state


def test_interleave_heads_by_index():
    w = torch.arange(5 * 6 * 3, dtype=torch.float).view(5 * 6, 3)  # parts=5, heads=2, head_dim=3
    out = interleave_heads(w, parts=5, heads=2)
    for head in range(2):
        for part in range(5):
            for c in range(3):
                assert torch.equal(out[(head * 5 + part) * 3 + c], w[part * 6 + head * 3 + c])


@pytest.mark.parametrize("old_gate", [False, True])
def test_convert_round_trip(tmp_path, capsys, old_gate):
    state = authors_state(old_gate)
    src = tmp_path / "authors.pt"
    torch.save({"task": state}, src)
    out = tmp_path / "converted"
    rc = convert_cli.main(["--input", str(src), "--output", str(out), "--num-attention-heads", str(H),
                           "--seq-length", "64"])
    assert rc == 0, capsys.readouterr().err
    model, config, _ = checkpoint.load_model(str(out))
    assert (config.num_layers, config.hidden_size, config.vocab_size, config.recurrence) == (L, D, 384, True)
    params = dict(model.named_parameters())
    emb = params["embedding.word_embeddings.weight"]
    assert torch.equal(emb[:V], state["embedding.wte.weight"]) and not emb[V:].any()
    for i in range(L):
        p = f"_orig_mod.backbone.layers.{i}."
        full_in = state[p + "seq_layer.in_proj.weight"]
        if old_gate:
            full_in = torch.cat([full_in, state[p + "seq_layer.fgate_proj.weight"]])
        ours = params[f"decoder.layers.{i}.self_attention.linear_in.weight"]
        dh = D // H
        for head in range(H):
            for part in range(5):  # o q k v g of this head
                got = ours[(head * 5 + part) * dh:(head * 5 + part + 1) * dh]
                want = full_in[part * D + head * dh: part * D + (head + 1) * dh]
                assert torch.equal(got, want)
        assert torch.equal(params[f"decoder.layers.{i}.mlp.linear_fc2.weight"], state[p + "hidden_layer.fc2.weight"])
    # converting again into the same directory is refused
    capsys.readouterr()
    assert convert_cli.main(["--input", str(src), "--output", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


class NotATensor:
    pass


def test_untrusted_pickle_is_refused(tmp_path, capsys):
    src = tmp_path / "evil.pt"
    torch.save({"task": authors_state(), "extra": NotATensor()}, src, pickle_module=pickle)
    rc = convert_cli.main(["--input", str(src), "--output", str(tmp_path / "o"), "--num-attention-heads", str(H)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--trust-pickle" in err[0]
    assert not (tmp_path / "o").exists()
    assert convert_cli.main(["--input", str(tmp_path / "none.pt"), "--output", str(tmp_path / "o")]) == 2
