"""ratplus-convert: the authors' files (current and older layouts) both ways with identical tensors,
their pickled config without --trust-pickle, TE key names, resharding across TP/PP with equal
validation loss, training resumed across TP sizes, and every bad input as one line."""

import os
import pickle
import subprocess
import sys
import types

import pytest
import torch

from conftest import repo_env
from megatron_ratplus import checkpoint
from megatron_ratplus.cli import convert as convert_cli
from megatron_ratplus.cli import pretrain as pretrain_cli
from megatron_ratplus.convert.authors import block_heads, interleave_heads
from megatron_ratplus.convert.te_names import local_to_te_keys, te_to_local_keys

L, D, H, V = 2, 32, 2, 257  # the byte tokenizer's size: converts without --tokenizer-file


def authors_state(old_gate=False, prefix="", recurrence=True):
    torch.manual_seed(0)
    state = {"embedding.wte.weight": torch.randn(V, D), "backbone.ln.weight": torch.rand(D)}
    for i in range(L):
        p = f"{prefix}backbone.layers.{i}."
        in_proj = torch.randn((5 if recurrence else 4) * D, D)
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


def normalised(state):
    """The current layout of an older file: no prefixes, gate rows inside in_proj."""
    out = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    for key in [k for k in out if k.endswith("fgate_proj.weight")]:
        in_proj = key.replace("fgate_proj", "in_proj")
        out[in_proj] = torch.cat([out[in_proj], out.pop(key)])
    return out


def test_interleave_heads_by_index():
    w = torch.arange(5 * 6 * 3, dtype=torch.float).view(5 * 6, 3)  # parts=5, heads=2, head_dim=3
    out = interleave_heads(w, parts=5, heads=2)
    for head in range(2):
        for part in range(5):
            for c in range(3):
                assert torch.equal(out[(head * 5 + part) * 3 + c], w[part * 6 + head * 3 + c])
    assert torch.equal(block_heads(out, parts=5, heads=2), w)


FORMATS = {"current": {}, "fgate_proj": {"old_gate": True}, "orig_mod": {"prefix": "_orig_mod."},
           "baseline": {"recurrence": False}}


@pytest.mark.parametrize("fmt", FORMATS)
def test_authors_round_trip(tmp_path, capsys, fmt):
    state = authors_state(**FORMATS[fmt])
    src = tmp_path / "authors.pt"
    torch.save({"task": state}, src)
    out = tmp_path / "converted"
    rc = convert_cli.main(["--input", str(src), "--output", str(out), "--num-attention-heads", str(H),
                           "--seq-length", "64"])
    assert rc == 0, capsys.readouterr().err
    model, config, _ = checkpoint.load_model(str(out))
    parts = 5 if config.recurrence else 4
    assert (config.num_layers, config.hidden_size, config.vocab_size, config.real_vocab_size, config.recurrence) \
        == (L, D, 384, 257, fmt != "baseline")
    params = dict(model.named_parameters())
    emb = params["embedding.word_embeddings.weight"]
    assert torch.equal(emb[:V], state["embedding.wte.weight"]) and not emb[V:].any()
    source = normalised(state)
    for i in range(L):
        full_in = source[f"backbone.layers.{i}.seq_layer.in_proj.weight"]
        ours = params[f"decoder.layers.{i}.self_attention.linear_in.weight"]
        dh = D // H
        for head in range(H):
            for part in range(parts):  # o q k v (g) of this head
                got = ours[(head * parts + part) * dh:(head * parts + part + 1) * dh]
                assert torch.equal(got, full_in[part * D + head * dh: part * D + (head + 1) * dh])
    back = tmp_path / "back.pt"
    assert convert_cli.main(["--input", str(out), "--output", str(back), "--to", "authors"]) == 0
    blob = torch.load(back, weights_only=True)
    assert blob["task"].keys() == source.keys()
    for key, value in source.items():
        assert torch.equal(blob["task"][key], value), key
    assert blob["config"] == {"num_heads": H, "apply_re": fmt != "baseline", "vocab_size": V, "seq_len": 64}
    again = tmp_path / "again"  # ours -> authors -> ours: the same shape, seq_length included
    assert convert_cli.main(["--input", str(back), "--output", str(again)]) == 0
    assert checkpoint.read_meta(str(again))["model"] == checkpoint.read_meta(str(out))["model"]


def test_authors_easydict_config_loads_without_trust_pickle(tmp_path, monkeypatch, capsys):
    """Their trainer pickles its config as easydict.EasyDict; the file loads weights-only anyway,
    without the easydict package, and the config gives the head count and apply_re."""
    module = types.ModuleType("easydict")

    class EasyDict(dict):  # the package's behaviour: items mirrored as attributes
        def __init__(self, d=None):
            super().__init__()
            for k, v in (d or {}).items():
                setattr(self, k, v)

        def __setattr__(self, name, value):
            value = EasyDict(value) if isinstance(value, dict) and not isinstance(value, EasyDict) else value
            super().__setattr__(name, value)
            super().__setitem__(name, value)

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    module.EasyDict = EasyDict
    monkeypatch.setitem(sys.modules, "easydict", module)
    src = tmp_path / "authors.pt"
    config = EasyDict({"model": {"num_heads": 4, "apply_re": True}, "train": {"lr": 8e-4, "seq_len": 48}})
    torch.save({"task": authors_state(), "config": config}, src)
    monkeypatch.delitem(sys.modules, "easydict")
    out = tmp_path / "converted"
    assert convert_cli.main(["--input", str(src), "--output", str(out)]) == 0, capsys.readouterr().err
    shape = checkpoint.read_meta(str(out))["model"]
    assert (shape["num_attention_heads"], shape["seq_length"]) == (4, 48)  # not hidden // 128, not 4096


class NotATensor:
    pass


def test_untrusted_pickle_is_refused(tmp_path, capsys):
    src = tmp_path / "evil.pt"
    torch.save({"task": authors_state(), "extra": NotATensor()}, src, pickle_module=pickle)
    rc = convert_cli.main(["--input", str(src), "--output", str(tmp_path / "o"), "--num-attention-heads", str(H)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--trust-pickle" in err[0]
    assert not (tmp_path / "o").exists()


def _bad_state(kind):
    state = authors_state()
    if kind == "unused":
        state["backbone.layers.0.hidden_layer.fc1.bias"] = torch.zeros(4 * D)
    elif kind == "missing":
        del state["backbone.layers.1.hidden_layer.ln.weight"]
    elif kind == "misshaped":
        state["backbone.layers.1.seq_layer.out_proj.weight"] = torch.randn(D, D + 1)
    elif kind == "small_vocab":  # fewer embeddings than the byte tokenizer's 257 tokens
        state["embedding.wte.weight"] = state["head.lm_head.weight"] = torch.randn(200, D)
    return state


@pytest.mark.parametrize("kind, needle", [
    ("unused", "unused tensors backbone.layers.0.hidden_layer.fc1.bias"),
    ("missing", "missing tensors backbone.layers.1.hidden_layer.ln.weight"),
    ("misshaped", "misshaped tensors backbone.layers.1.seq_layer.out_proj.weight"),
    ("small_vocab", "the tokenizer has 257 tokens but the checkpoint only 200"),
    ("not_a_checkpoint", "cannot read"),
    ("output_exists", "already exists"),
    ("missing_input", "input not found"),
])
def test_bad_authors_inputs_are_one_line(tmp_path, capsys, kind, needle):
    src, out = tmp_path / "authors.pt", tmp_path / "out"
    if kind == "not_a_checkpoint":
        src.write_text("hello")
    elif kind != "missing_input":
        torch.save({"task": _bad_state(kind)}, src)
    if kind == "output_exists":
        out.mkdir()
    rc = convert_cli.main(["--input", str(src), "--output", str(out), "--num-attention-heads", str(H)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("ratplus-convert: error:") and needle in err[0], err
    assert os.listdir(out) == [] if kind == "output_exists" else not out.exists()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_te_key_names_round_trip(megatron_single):
    from megatron_ratplus.config import preset
    from megatron_ratplus.model import build_model

    names = list(build_model(preset("tiny", num_layers=2, hidden_size=32, num_attention_heads=2)).state_dict())
    to_te = local_to_te_keys(names)
    assert not [n for n in to_te if n.endswith("_extra_state")]
    assert to_te["decoder.layers.1.input_layernorm.weight"] == "decoder.layers.1.self_attention.linear_in.layer_norm_weight"
    assert to_te["decoder.layers.0.pre_mlp_layernorm.weight"] == "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"
    assert to_te["decoder.final_layernorm.weight"] == "decoder.final_layernorm.weight"
    assert to_te["decoder.layers.0.self_attention.linear_in.weight"] == "decoder.layers.0.self_attention.linear_in.weight"
    te_names = list(to_te.values()) + ["decoder.layers.0.self_attention.linear_in._extra_state"]
    back = te_to_local_keys(te_names)
    assert {to_te[k]: k for k in to_te} == back


# ---------------------------------------------------------------- layouts (multi-process)

FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "2", "--eval-interval", "0",
         "--no-progress-bar", "--lr", "1e-2", "--no-joint-training"]


def _pretrain(save, iters, tp):
    flags = [*FLAGS, "--tensor-model-parallel-size", str(tp), "--train-iters", str(iters), "--save", str(save),
             "--load", str(save), "--override-opt_param-scheduler"]  # each resume runs to a later --train-iters
    if tp == 1:  # in this process: one launch less
        assert pretrain_cli.main(flags) == 0
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp),
           "-m", "megatron_ratplus.cli.pretrain", *flags]
    result = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _valid_loss(path):
    model, config, _ = checkpoint.load_model(str(path))
    tokens = torch.randint(0, 257, (4, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(tokens[:, :-1], torch.arange(32).expand(4, 32), None, labels=tokens[:, 1:]).mean().item()


@pytest.fixture(scope="module")
def tp_trained(tmp_path_factory, megatron_single):
    """Training at TP1 (iterations 1-2), resumed at TP2 (3), resumed at TP1 again (4); returns the
    save directory and the TP2 checkpoint of iteration 3."""
    run = tmp_path_factory.mktemp("tp") / "run"
    _pretrain(run, 2, tp=1)
    _pretrain(run, 3, tp=2)
    tp2 = checkpoint.latest_checkpoint(str(run))
    _pretrain(run, 4, tp=1)
    return run, tp2


def test_training_resumes_across_tp_sizes(tp_trained):
    run, tp2 = tp_trained
    assert checkpoint.read_meta(tp2)["model"]["vocab_size"] == 384  # the byte tokenizer's padding at any TP
    assert checkpoint.read_meta(tp2)["args"]["tensor_model_parallel_size"] == 2
    assert checkpoint.read_meta(str(run))["iteration"] == 4
    steps = sorted(d for d in os.listdir(run) if d.startswith("iter_"))
    assert steps == ["iter_0000002", "iter_0000003", "iter_0000004"]
    states = [checkpoint.load_model(str(run / d))[0].state_dict() for d in steps]
    for before, after in zip(states, states[1:]):  # every resumed run trained
        assert not torch.equal(before["decoder.layers.0.mlp.linear_fc1.weight"],
                               after["decoder.layers.0.mlp.linear_fc1.weight"])


@pytest.mark.slow
def test_reshard_keeps_tensors_and_validation_loss(tp_trained, tmp_path):
    """ratplus-convert reshards TP2 -> TP1 -> TP2 and TP1 -> PP2 -> PP1, every tensor unchanged."""
    _, tp2 = tp_trained
    steps = [("tp1", tp2, 1, 1), ("tp2", "tp1", 2, 1), ("pp2", "tp1", 1, 2), ("pp1", "pp2", 1, 1)]
    for name, source, tp, pp in steps:
        source = source if os.path.isabs(source) else str(tmp_path / source)
        assert convert_cli.main(["--input", source, "--output", str(tmp_path / name),
                                 "--target-tensor-parallel-size", str(tp),
                                 "--target-pipeline-parallel-size", str(pp)]) == 0
        args = checkpoint.read_meta(str(tmp_path / name))["args"]
        assert (args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"]) == (tp, pp)
    reference = checkpoint.load_model(tp2)[0].state_dict()
    loss = _valid_loss(tp2)
    for name in ("tp1", "tp2", "pp2", "pp1"):
        state = checkpoint.load_model(str(tmp_path / name))[0].state_dict()
        for key, value in reference.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(state[key], value), (name, key)
        assert _valid_loss(tmp_path / name) == loss


def test_reshard_refuses_bad_layouts(tmp_path, capsys, megatron_single):
    src = tmp_path / "authors.pt"
    torch.save({"task": authors_state()}, src)
    assert convert_cli.main(["--input", str(src), "--output", str(tmp_path / "ours"), "--num-attention-heads",
                             str(H), "--seq-length", "64"]) == 0
    for flags, needle in ((["--target-tensor-parallel-size", "4"], "TP=4"),
                          (["--target-pipeline-parallel-size", "3"], "PP=3"),
                          (["--to", "hf", "--target-tensor-parallel-size", "2"], "--from ours --to ours")):
        assert convert_cli.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "o"), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert not (tmp_path / "o").exists()


def test_consolidated_single_file(tmp_path, megatron_single):
    src = tmp_path / "authors.pt"
    torch.save({"task": authors_state()}, src)
    assert convert_cli.main(["--input", str(src), "--output", str(tmp_path / "ours"), "--num-attention-heads",
                             str(H), "--seq-length", "64"]) == 0
    assert convert_cli.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "one.pt"),
                             "--to", "torch"]) == 0
    blob = torch.load(tmp_path / "one.pt", weights_only=True)
    model = checkpoint.load_model(str(tmp_path / "ours"))[0]
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert blob["model"].keys() == state.keys() and all(torch.equal(blob["model"][k], v) for k, v in state.items())
    assert blob["meta"]["model"]["real_vocab_size"] == 257
