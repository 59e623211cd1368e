"""Hugging Face export: the exported directory loads offline in transformers, computes our logits
for any pattern, generates with its sparse cache as full-forward greedy decoding does, never
scores or samples padded vocabulary ids, and converts back to identical tensors."""

import ast
import json
import os
import subprocess

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it: everything here is local
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoModelForCausalLM  # noqa: E402

from megatron_ratplus import checkpoint  # noqa: E402
from megatron_ratplus.cli import convert as convert_cli  # noqa: E402
from megatron_ratplus.config import preset  # noqa: E402
from megatron_ratplus.convert.hf import read_safetensors  # noqa: E402
from megatron_ratplus.convert.local import write_local  # noqa: E402
from megatron_ratplus.hf import modeling_ratplus  # noqa: E402
from megatron_ratplus.inference import SamplingConfig, generate  # noqa: E402
from megatron_ratplus.model import build_model  # noqa: E402
from megatron_ratplus.patterns import parse_composition  # noqa: E402

LAYERS, HEADS, HIDDEN, SEQ, REAL = 3, 4, 32, 96, 300
NEW = 24  # generated tokens: past several dilation periods, windows and sinks
SPARSE = "dilated:4,w=3,p=2"
COMPOSITION = "dense;dilated:5,p=1;(local:w=2,p=1|dilated:3,w=1)"


def _tokenizer_file(path):
    """A 300-token word-level tokenizer.json (the 300-token model of the padding checks)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(REAL - 1)}
    vocab["</s>"] = REAL - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def _write_model(directory, recurrence=True, tokenizer_spec="byte", real=257, junk_padding=False):
    """Our checkpoint of a randomly initialised model (norm weights randomised too)."""
    torch.manual_seed(0)
    config = preset("tiny", num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, seq_length=SEQ,
                    vocab_size=384, real_vocab_size=real, recurrence=recurrence)
    model = build_model(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    for key in state:
        if "norm" in key:
            state[key] = 0.5 + torch.rand_like(state[key])
    emb = state["embedding.word_embeddings.weight"]
    emb.mul_(20.0)  # sharper distributions: greedy choices are not near-ties
    if junk_padding:  # padded rows as large as possible: they would win every draw if not masked
        emb[real:] = 5.0 * emb[real:].sign() * emb.abs().max()
    write_local(state, checkpoint.model_meta(config), tokenizer_spec, str(directory), {"format": "test"})
    return state


@pytest.fixture(scope="module")
def exported(tmp_path_factory, megatron_single):
    root = tmp_path_factory.mktemp("hf")
    state = _write_model(root / "ours")
    assert convert_cli.main(["--input", str(root / "ours"), "--output", str(root / "hf"), "--to", "hf"]) == 0
    return root, state


def _ours_logits(path, pattern, tokens):
    model, config, _ = checkpoint.load_model(str(path), pattern=pattern)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None), model


@pytest.mark.parametrize("pattern", ["dense", SPARSE, COMPOSITION])
def test_hf_logits_equal_ours(exported, pattern):
    root, _ = exported
    tokens = torch.randint(0, 257, (2, 70), generator=torch.Generator().manual_seed(1))
    ours, _ = _ours_logits(root / "ours", pattern, tokens)
    hf = AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=True, attention_pattern=pattern)
    assert hf.config.attention_pattern == pattern
    with torch.no_grad():
        theirs = hf(tokens).logits
    scale = ours[..., :257].abs().max()
    torch.testing.assert_close(theirs[..., :257], ours[..., :257], rtol=1e-5, atol=1e-5 * scale)
    assert torch.isneginf(ours[..., 257:]).all() and torch.isneginf(theirs[..., 257:]).all()
    if pattern != "dense":  # the pattern really changes the logits
        dense = AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=True)
        with torch.no_grad():
            assert (dense(tokens).logits[..., :257] - theirs[..., :257]).abs().max() > 1e-3 * scale


def test_load_model_reads_an_hf_export(exported):
    """ratplus-generate and ratplus-serve load an export directly: the same model, tokenizer and
    recorded pattern as our checkpoint, logits equal to the bit at any pattern."""
    root, _ = exported
    tokens = torch.randint(0, 257, (2, 60), generator=torch.Generator().manual_seed(13))
    for pattern in (None, SPARSE, COMPOSITION):
        ours, _ = _ours_logits(root / "ours", pattern, tokens)
        model, config, tokenizer = checkpoint.load_model(str(root / "hf"), pattern=pattern)
        with torch.no_grad():
            theirs = model(tokens, torch.arange(60).expand_as(tokens), None)
        assert torch.equal(theirs, ours), pattern
    _, ours_config, ours_tokenizer = checkpoint.load_model(str(root / "ours"))
    assert (config.seq_length, config.real_vocab_size, str(config.attention_pattern)) == \
           (ours_config.seq_length, ours_config.real_vocab_size, str(ours_config.attention_pattern))
    assert type(tokenizer) is type(ours_tokenizer)


def test_byte_tokenizer_exports_as_tokenizer_json(exported, tmp_path):
    from transformers import AutoTokenizer

    root, _ = exported
    assert convert_cli.main(["--input", str(root / "hf"), "--output", str(tmp_path / "back")]) == 0
    assert checkpoint.read_meta(str(tmp_path / "back"))["tokenizer"] == "byte"  # ours again, not a file
    tok = AutoTokenizer.from_pretrained(str(root / "hf"))
    text = "Grüße, 世界!\n\tok  "
    assert tok(text).input_ids == list(text.encode()) and tok.eos_token_id == 256
    assert tok.decode(list(text.encode())) == text


def test_attention_only_baseline_exports(tmp_path, megatron_single):
    _write_model(tmp_path / "ours", recurrence=False)
    assert convert_cli.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "hf"), "--to", "hf",
                             "--attention-pattern", SPARSE]) == 0
    tokens = torch.randint(0, 257, (1, 50), generator=torch.Generator().manual_seed(2))
    ours, _ = _ours_logits(tmp_path / "ours", SPARSE, tokens)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    assert hf.config.attention_pattern == SPARSE and not hf.config.recurrence
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs[..., :257], ours[..., :257], rtol=1e-5, atol=1e-5 * ours[..., :257].abs().max())


def _greedy_full_forward(hf, prompt, new):
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(new):
            logits = hf(seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("pattern", [SPARSE, COMPOSITION])
def test_generate_with_sparse_cache_equals_full_forward_greedy(exported, pattern):
    root, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=True, attention_pattern=pattern)
    prompt = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(3))
    cached = hf.generate(prompt, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(cached, _greedy_full_forward(hf, prompt, NEW))
    # ... and our own decoder gives the same tokens
    model, _, _ = checkpoint.load_model(str(root / "ours"))
    ours = generate(model, [prompt[0].tolist()], SamplingConfig(max_new_tokens=NEW), pattern=pattern)
    assert ours.tokens[0] == cached[0, 9:].tolist()


def test_decode_cache_holds_the_formula_slots(exported):
    """P + W + 1 + floor(T/D) key/value slots per sparse head group, T per dense one."""
    root, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=True, attention_pattern=COMPOSITION)
    tokens = torch.randint(0, 257, (1, 60), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = hf(tokens[:, :20], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for t in range(20, 60):
            logits = hf(tokens[:, t:t + 1], cache=cache, use_cache=True).logits
        full = hf(tokens, use_cache=False).logits
    torch.testing.assert_close(logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5 * full.abs().max())
    per_layer = [[p for p in parse_composition(COMPOSITION).resolve(LAYERS, HEADS)[i]] for i in range(LAYERS)]
    for i, heads in enumerate(per_layer):
        groups = modeling_ratplus.head_groups(tuple(heads))
        assert cache.slots(i) == [p.cache_slots(60) if not p.is_dense else 60 for p, _, _ in groups]
    assert cache.slots(1) == [1 + 0 + 1 + 60 // 5]  # dilated:5,p=1


def test_left_padded_batch_generates_like_single_prompts(exported):
    root, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=True, attention_pattern=SPARSE)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 257, (n,), generator=gen) for n in (11, 6)]
    batch = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, 11 - len(p):], mask[i, 11 - len(p):] = p, 1
    both = hf.generate(batch, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = hf.generate(p.unsqueeze(0), max_new_tokens=15, do_sample=False)
        assert both[i, 11:].tolist() == alone[0, len(p):].tolist()


def test_round_trip_ours_hf_ours_and_shards(tmp_path, megatron_single):
    tokenizer = _tokenizer_file(tmp_path / "tokenizer.json")
    state = _write_model(tmp_path / "ours", tokenizer_spec=f"json:{tokenizer}", real=REAL)
    assert convert_cli.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "hf"), "--to", "hf",
                             "--max-shard-size", "40KB"]) == 0
    files = sorted(os.listdir(tmp_path / "hf"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "tokenizer.json" in files
    with open(tmp_path / "hf" / "config.json") as f:
        config = json.load(f)
    assert (config["vocab_size"], config["real_vocab_size"], config["eos_token_id"]) == (384, REAL, REAL - 1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok("w5 w7").input_ids == [5, 7] and tok.eos_token_id == REAL - 1
    assert tok.pad_token_id == REAL - 1 and "token_type_ids" not in tok("w5", return_tensors="pt")
    with open(tmp_path / "hf" / "generation_config.json") as f:
        assert json.load(f) == {"eos_token_id": REAL - 1, "pad_token_id": REAL - 1}
    assert convert_cli.main(["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "back")]) == 0
    model, back_config, back_tok = checkpoint.load_model(str(tmp_path / "back"))
    assert back_tok.vocab_size == REAL and back_config.real_vocab_size == REAL
    assert back_tok.encode("w3 w9") == [3, 9]
    back = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    assert len(read_safetensors(str(tmp_path / "hf"))) == len(state)


def test_padded_ids_are_never_sampled_or_scored(tmp_path, megatron_single):
    """A 300-token model padded to 384 whose padded rows would dominate every draw if unmasked."""
    tokenizer = _tokenizer_file(tmp_path / "tokenizer.json")
    _write_model(tmp_path / "ours", tokenizer_spec=f"json:{tokenizer}", real=REAL, junk_padding=True)
    assert convert_cli.main(["--input", str(tmp_path / "ours"), "--output", str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    torch.manual_seed(6)
    prompt = torch.randint(0, REAL, (11, 4))
    sampled = hf.generate(prompt, max_new_tokens=95, do_sample=True, temperature=2.0, top_k=0)[:, 4:]
    assert sampled.numel() >= 1000 and int(sampled.max()) < REAL
    model, _, _ = checkpoint.load_model(str(tmp_path / "ours"))
    ours = generate(model, prompt.tolist(), SamplingConfig(max_new_tokens=10, temperature=2.0, seed=7))
    assert max(max(t) for t in ours.tokens) < REAL and sum(map(len, ours.tokens)) > 0
    # scoring: the loss is the cross entropy over the real vocabulary only
    tokens = torch.randint(0, REAL, (2, 33), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits = model(tokens[:, :-1], torch.arange(32).expand(2, 32), None)
        loss = model(tokens[:, :-1], torch.arange(32).expand(2, 32), None, labels=tokens[:, 1:]).mean()
        hf_loss = hf(tokens, labels=tokens).loss
    real_only = torch.nn.functional.cross_entropy(logits[..., :REAL].flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(loss, real_only, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hf_loss, real_only, rtol=1e-5, atol=1e-6)


def test_transformers_outputs_and_options(exported):
    """What a transformers causal LM offers: return_dict=False tuples, hidden states (the
    embeddings, each layer's output, the last after the final norm), inputs_embeds (forward and
    generate), AutoModel for the decoder alone; output_attentions and a pattern split at its
    commas into separate arguments are refused with one clear message."""
    from transformers import AutoModel

    root, _ = exported
    colon = SPARSE.replace(",", ":")
    hf = AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=True, attention_pattern=colon)
    base = AutoModel.from_pretrained(str(root / "hf"), trust_remote_code=True, attention_pattern=colon)
    tokens = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        out = hf(tokens, output_hidden_states=True)
        as_tuple = hf(tokens, return_dict=False)
        embedded = hf.get_input_embeddings()(tokens)
        from_embeds = hf(inputs_embeds=embedded).logits
        decoder = base(tokens).last_hidden_state
        first_layer = hf.model.layers[0](embedded, torch.arange(40).expand(2, 40), torch.ones(2, 40, dtype=torch.bool), None)
    ours, _ = _ours_logits(root / "ours", SPARSE, tokens)
    torch.testing.assert_close(out.logits[..., :257], ours[..., :257], rtol=1e-5, atol=1e-5 * ours[..., :257].abs().max())
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], out.logits)
    assert len(out.hidden_states) == LAYERS + 1 and torch.equal(out.hidden_states[0], embedded)
    torch.testing.assert_close(out.hidden_states[1], first_layer)
    torch.testing.assert_close(decoder, out.hidden_states[-1])
    torch.testing.assert_close(torch.nn.functional.linear(decoder, hf.get_input_embeddings().weight)[..., :257],
                               out.logits[..., :257])
    torch.testing.assert_close(from_embeds, out.logits)
    assert hf(tokens).hidden_states is None
    prompt = tokens[:1, :9]
    by_ids = hf.generate(prompt, max_new_tokens=8, do_sample=False)[0, 9:]
    by_embeds = hf.generate(inputs_embeds=hf.get_input_embeddings()(prompt), max_new_tokens=8, do_sample=False)[0]
    assert by_embeds.tolist() == by_ids.tolist()
    with pytest.raises(ValueError, match="output_attentions is not supported"):
        hf(tokens, output_attentions=True)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        hf(tokens, inputs_embeds=embedded)
    with pytest.raises(ValueError, match=r"attention_pattern=dilated:16:w=8:p=2"):
        AutoModelForCausalLM.from_pretrained(str(root / "hf"), trust_remote_code=True, attention_pattern="dilated:4",
                                             w=3, p=2)


_PROBE = """
import json, sys, torch, transformers
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
directory, pattern, tokens = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
tokenizer = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, attention_pattern=pattern)
with torch.no_grad():
    logits = model(tokens).logits[..., :257]
    hidden = AutoModel.from_pretrained(directory, trust_remote_code=True, attention_pattern=pattern)(tokens)[0]
    generated = model.generate(**tokenizer("RAT+ at", return_tensors="pt"), max_new_tokens=12, do_sample=False)
print(json.dumps({"version": transformers.__version__, "logits": logits.tolist(),
                  "decoder_matches": bool(torch.allclose(hidden, model(tokens, output_hidden_states=True).hidden_states[-1])),
                  "generated": generated[0].tolist()}))
"""

# The supported range's ends (setup.py: transformers>=4.57,<6), each with the hub and tokenizers
# versions it requires; the pinned version in between is what the rest of this file runs.
RANGE_ENDS = {"4.57.6": ["transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.0"],
              "5.0.0": ["transformers==5.0.0", "tokenizers==0.22.2", "huggingface_hub==1.3.0", "httpx==0.28.1",
                        "httpcore==1.0.9"]}


@pytest.mark.integration
@pytest.mark.parametrize("version", sorted(RANGE_ENDS))
def test_supported_transformers_range_ends(exported, tmp_path_factory, version):
    """The export, loaded by the oldest and the newest-major-start transformers we support (installed
    beside the pinned one, first on the path of a fresh interpreter), computes our logits at a
    sparse pattern given in its comma-free spelling, loads as AutoModel, and generates from
    ``tokenizer(text, return_tensors="pt")`` (4.x passed token_type_ids before the export set
    model_input_names) the tokens our own decoder generates."""
    import sys

    root, _ = exported
    target = tmp_path_factory.mktemp(f"transformers-{version}")
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                          *RANGE_ENDS[version]], capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    tokens = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(12))
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, "-c", _PROBE, str(root / "hf"), SPARSE.replace(",", ":"),
                           json.dumps(tokens.tolist())], env=env, cwd=str(target), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index('{"version"'):])  # after anything transformers prints
    assert result["version"] == version and result["decoder_matches"]
    ours, model = _ours_logits(root / "ours", SPARSE, tokens)
    torch.testing.assert_close(torch.tensor(result["logits"]), ours[..., :257], rtol=1e-5,
                               atol=1e-5 * ours[..., :257].abs().max())
    prompt = list("RAT+ at".encode())
    expected = generate(model, [prompt], SamplingConfig(max_new_tokens=12), pattern=SPARSE).tokens[0]
    assert result["generated"][:len(prompt)] == prompt and result["generated"][len(prompt):] == expected


def test_modeling_files_are_self_contained():
    for name in ("modeling_ratplus.py", "configuration_ratplus.py"):
        with open(os.path.join(os.path.dirname(modeling_ratplus.__file__), name)) as f:
            tree = ast.parse(f.read())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert roots <= {"torch", "transformers", "re", "dataclasses", "typing", "__future__"}, (name, roots)


@pytest.mark.parametrize("text", ["dense", "dilated:16,w=256,p=4", "dilated:16:w=256:p=4", "local:w=3:p=1",
                                  "dense;dilated:5:p=1;(local:w=2:p=1|dilated:3,w=1);dense", "local:w=3,p=1", "dense;dilated:4;dense;dilated:4",
                                  "cycle(dense;dilated:8,w=2)", "2*dense;2*dilated:4", "dense|dilated:4,p=1",
                                  "1*local:w=3|3*dilated:6,p=1;3*dilated:2", "2*(dense|dilated:3);2*dilated:5"])
def test_modeling_parser_agrees_with_ours(text):
    ours = parse_composition(text).resolve(4, 4)
    theirs = modeling_ratplus.resolve_patterns(text, 4, 4)
    assert [[(p.dilation, p.window, p.sinks) for p in layer] for layer in ours] == \
           [[(p.dilation, p.window, p.sinks) for p in layer] for layer in theirs]


@pytest.mark.parametrize("text", ["dilated:1_6", "dilated:\u0663", "dilated:9223372036854775807", "local:w=2147483648",
                                  "3000000000*dense", "5*dense", "\u0662*dense;\u0662*dilated:4", "dense:", "dilated:4,q=1"])
def test_modeling_parser_refuses_what_ours_refuses(text):
    """The export's own copy of the grammar has the same boundary: plain ASCII digits, numbers up
    to 2**31-1, no repeat count beyond the model's layers (checked before a list is built)."""
    from megatron_ratplus.patterns import PatternError

    with pytest.raises(PatternError):
        parse_composition(text).resolve(4, 4)
    with pytest.raises(ValueError, match="attention pattern"):
        modeling_ratplus.resolve_patterns(text, 4, 4)


def test_hf_import_bad_inputs(tmp_path, capsys, exported):
    root, _ = exported
    (tmp_path / "empty").mkdir()
    cases = [(["--from", "hf", "--input", str(tmp_path / "empty")], "no config.json")]
    broken = tmp_path / "broken"
    os.makedirs(broken)
    with open(root / "hf" / "config.json") as f:
        config = json.load(f)
    with open(broken / "config.json", "w") as f:
        json.dump(config, f)
    from safetensors.torch import save_file

    tensors = read_safetensors(str(root / "hf"))
    tensors.pop("model.norm.weight")
    save_file(tensors, str(broken / "model.safetensors"))
    cases.append((["--input", str(broken)], "missing tensors model.norm.weight"))
    cases.append((["--input", str(root / "ours"), "--to", "hf", "--attention-pattern", "dilated:0"], "dilation"))
    cases.append((["--input", str(root / "ours"), "--to", "hf", "--max-shard-size", "lots"], "invalid size"))
    cases.append((["--input", str(root / "ours"), "--to", "hf", "--max-shard-size", "0KB"], "at least 1 byte"))
    cases.append((["--input", str(root / "ours"), "--to", "hf", "--attention-pattern", "topk:k=2"], "top-k"))
    for flags, needle in cases:
        out = tmp_path / "out"
        assert convert_cli.main([*flags, "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ratplus-convert: error:") and needle in err[0], err
        assert not out.exists()


@pytest.mark.integration
@pytest.mark.parametrize("pattern", ["dense", SPARSE])
def test_stock_lm_eval_cli_scores_the_export_as_our_model(exported, tmp_path, pattern):
    """The README's command, `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`
    (plus `attention_pattern=` in the comma-free spelling for a sparse pattern), run as a user runs
    it (the console script, from the repository root, offline) on a local multiple-choice task:
    every per-choice log-likelihood it logs equals our model's at that pattern. The comma spelling,
    which lm-eval splits into separate arguments, is refused with the message naming the other."""
    from transformers import AutoTokenizer

    root, _ = exported
    docs = [{"question": f"q{i} " + "xy" * i, "choices": [f"a{i}", "bb", "ccc d"], "label": i % 3} for i in range(4)]
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    (tmp_path / "mc.yaml").write_text(
        "task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: label\ndoc_to_choice: '{{choices}}'\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    model_args = f"pretrained={root / 'hf'},trust_remote_code=True"

    def lm_eval(spelling):
        cmd = ["lm_eval", "--model", "hf", "--model_args", model_args + spelling, "--tasks", "local_mc",
               "--include_path", str(tmp_path), "--device", "cpu", "--batch_size", "2", "--log_samples",
               "--output_path", str(tmp_path / "out")]
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)

    if pattern != "dense":
        split = lm_eval(f",attention_pattern={pattern}")
        assert split.returncode != 0 and "attention_pattern=dilated:16:w=8:p=2" in split.stderr, split.stderr[-2000:]
    done = lm_eval("" if pattern == "dense" else f",attention_pattern={pattern.replace(',', ':')}")
    assert done.returncode == 0, done.stderr[-3000:]
    samples = [json.loads(line) for path in (tmp_path / "out").rglob("samples_local_mc_*.jsonl")
               for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(samples) == len(docs)
    tokenizer = AutoTokenizer.from_pretrained(str(root / "hf"), trust_remote_code=True)
    model, _, _ = checkpoint.load_model(str(root / "ours"), pattern=pattern)
    checked = 0
    for sample in samples:
        doc = sample["doc"]
        context = tokenizer(f"Q: {doc['question']}\nA:", add_special_tokens=False)["input_ids"]
        for choice, resp in zip(doc["choices"], sample["resps"]):
            target = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            tokens = torch.tensor([context + target])
            with torch.no_grad():
                logits = model(tokens, torch.arange(tokens.shape[1])[None], None).float()
            logp = torch.log_softmax(logits[0, len(context) - 1:-1], -1)
            ours = logp.gather(1, torch.tensor(target)[:, None]).sum().item()
            assert float(resp[0][0]) == pytest.approx(ours, abs=1e-4)  # lm-eval logs them as text
            checked += 1
    assert checked == 3 * len(docs)
