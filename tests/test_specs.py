"""--transformer-impl resolution, the FP8 shape check, and checkpoints across local <-> TE specs.

Transformer Engine cannot be built on this CPU machine, so the checkpoint tests build the TE
layer spec with CPU stand-ins that register exactly the parameter and state names TE's modules
register (``layer_norm_weight``, ``weight``, ``_extra_state``) and compute the same function.
"""

import io

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp

from megatron_ratplus import checkpoint, optional
from megatron_ratplus.config import preset
from megatron_ratplus.errors import UserError
from megatron_ratplus.layers import specs
from megatron_ratplus.layers.norm import RMSNorm
from megatron_ratplus.model import build_model
from megatron_ratplus.precision import FP8ShapeError, check_fp8_shapes

NO_TE = not optional.have("transformer_engine")


def test_default_impl_is_local_without_te_or_cuda(monkeypatch):
    assert specs.resolve_transformer_impl(None) == ("local" if NO_TE or not torch.cuda.is_available()
                                                    else "transformer_engine")
    assert specs.resolve_transformer_impl("local") == "local"
    monkeypatch.setattr(specs, "have", lambda name: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert specs.resolve_transformer_impl(None) == "transformer_engine"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert specs.resolve_transformer_impl(None) == "local"


@pytest.mark.skipif(not NO_TE, reason="checks the message for a missing Transformer Engine")
def test_asking_for_te_without_it_is_one_line():
    with pytest.raises(UserError) as err:
        specs.resolve_transformer_impl("transformer_engine")
    assert isinstance(err.value, optional.MissingDependency) and "\n" not in str(err.value)
    assert str(err.value).startswith("--transformer-impl transformer_engine needs transformer_engine")


def test_asking_for_te_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(optional, "optional_import", lambda name: object())  # as if TE imported
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(optional.MissingDependency, match="^--transformer-impl transformer_engine needs a CUDA GPU"):
        specs.resolve_transformer_impl("transformer_engine")
    with pytest.raises(specs.TransformerImplError, match="choose from transformer_engine, local"):
        specs.resolve_transformer_impl("te")


def test_fp8_shape_check():
    check_fp8_shapes(preset("tiny"), micro_batch_size=2)  # sizes 128, 640, 128, 512 and 512 tokens
    check_fp8_shapes(preset("1.5b", tensor_model_parallel_size=8, sequence_parallel=True), micro_batch_size=1)
    bad = {"hidden size is 136": dict(hidden_size=136, num_attention_heads=4, kv_channels=32),
           "W_in output per tensor-parallel rank is 360": dict(num_attention_heads=3, kv_channels=24),
           "W_out input per tensor-parallel rank is 72": dict(num_attention_heads=3, kv_channels=24,
                                                              recurrence=False),
           "ffn hidden size per tensor-parallel rank is 520": dict(ffn_hidden_size=520),
           "tokens per micro-batch per rank is 100": dict(seq_length=100),
           "tokens per micro-batch per rank is 24": dict(seq_length=96, context_parallel_size=4)}
    for message, change in bad.items():
        with pytest.raises(FP8ShapeError, match=message):
            check_fp8_shapes(preset("tiny", **change))


def test_fp8_needs_the_te_impl(megatron_single):
    with pytest.raises(specs.TransformerImplError, match="FP8 needs --transformer-impl transformer_engine"):
        build_model(preset("tiny", num_layers=1, fp8="hybrid"), "local")


# ---- checkpoints across implementations ------------------------------------------------------

class TEStandInNormLinear(ColumnParallelLinear):
    """CPU stand-in for TELayerNormColumnParallelLinear: RMSNorm fused before the GEMM, with TE's
    parameter names (``layer_norm_weight``, ``weight``; ``_extra_state`` from megatron's linear)."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))
        self.eps = config.layernorm_epsilon

    def forward(self, x):
        return super().forward(F.rms_norm(x, (x.shape[-1],), self.layer_norm_weight, self.eps))


class TEStandInNorm(RMSNorm):
    """CPU stand-in for TENorm: TE modules carry FP8 metadata as a non-empty ``_extra_state``."""

    def get_extra_state(self):
        return io.BytesIO(b"fp8 metadata")

    def set_extra_state(self, state):
        self.loaded_extra_state = state


def te_structured_model(config, monkeypatch):
    """The real TE block spec (keys map included) with the TE classes swapped for the stand-ins."""
    monkeypatch.setattr(specs, "require", lambda *args, **kwargs: None)
    block = specs.get_ratplus_block_spec(config, "transformer_engine")
    layer = block.layer_specs[0].submodules
    assert layer.input_layernorm is IdentityOp and layer.pre_mlp_layernorm is IdentityOp
    mixer, mlp = layer.self_attention.submodules, layer.mlp.submodules
    assert mixer.linear_in.module == mlp.linear_fc1.module == (specs._TE, "TELayerNormColumnParallelLinear")
    assert mixer.linear_out.module == mlp.linear_fc2.module == (specs._TE, "TERowParallelLinear")
    assert block.layer_norm.module == (specs._TE, "TENorm")
    mixer.linear_in.module = mlp.linear_fc1.module = TEStandInNormLinear
    mixer.linear_out.module = mlp.linear_fc2.module = RowParallelLinear
    block.layer_norm = TEStandInNorm
    return GPTModel(config=config, transformer_layer_spec=block, vocab_size=config.vocab_size,
                    max_sequence_length=config.seq_length, share_embeddings_and_output_weights=True,
                    position_embedding_type="rope", rotary_base=config.rotary_base)


def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # norm weights too, so a swapped norm shows in the output
            param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen) if param.dim() == 1
                        else 0.05 * torch.randn(param.shape, generator=gen))


def forward(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), None)


def sharded_keys(model):
    return {v.key for v in model.sharded_state_dict().values()}


@pytest.mark.parametrize("direction", ["local_to_te", "te_to_local"])
def test_checkpoint_loads_across_transformer_impls(megatron_single, monkeypatch, tmp_path, direction):
    config = preset("tiny", num_layers=2)
    local, te = build_model(config, "local"), te_structured_model(config, monkeypatch)
    names = {n for n, _ in te.named_parameters()}
    assert "decoder.layers.0.self_attention.linear_in.layer_norm_weight" in names
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in names
    # One dist-checkpoint key set for both: TE has only its final norm's FP8 metadata on top.
    assert sharded_keys(te) - sharded_keys(local) == {"decoder.final_layernorm._extra_state"}
    assert sharded_keys(local) <= sharded_keys(te)

    source, target = (local, te) if direction == "local_to_te" else (te, local)
    randomize(source, seed=1)
    randomize(target, seed=2)
    tokens = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    want = forward(source, tokens)
    assert (forward(target, tokens) - want).abs().max() > 1e-3
    checkpoint.save(str(tmp_path), 1, [source], None, {"iteration": 1}, _meta(config))
    common = checkpoint.load(str(tmp_path), [target])
    assert common["iteration"] == 1
    torch.testing.assert_close(forward(target, tokens), want, rtol=0, atol=0)
    if direction == "local_to_te":
        assert not hasattr(target.decoder.final_layernorm, "loaded_extra_state")  # absent: starts fresh


def _meta(config) -> dict:
    """The metadata a checkpoint must carry (checkpoint.read_meta checks it)."""
    return {"model": checkpoint.model_meta(config), "tokenizer": "byte", "args": {}}


def test_checkpoint_missing_a_real_weight_is_still_an_error(megatron_single, tmp_path):
    small, big = build_model(preset("tiny", num_layers=1)), build_model(preset("tiny", num_layers=2))
    checkpoint.save(str(tmp_path), 1, [small], None, {}, _meta(small.config))
    with pytest.raises(checkpoint.CheckpointError, match="cannot load .*shape mismatch") as err:
        checkpoint.load(str(tmp_path), [big])
    assert "\n" not in str(err.value)


def test_without_the_keys_map_the_fused_norms_are_missing(megatron_single, monkeypatch, tmp_path):
    """The TE spec's sharded_state_dict_keys_map is what lets a local checkpoint load: drop it and fail."""
    config = preset("tiny", num_layers=1)
    checkpoint.save(str(tmp_path), 1, [build_model(config, "local")], None, {}, _meta(config))
    monkeypatch.setattr(specs, "TE_TO_LOCAL_CHECKPOINT_KEYS", {})
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"it has no decoder\.layers\.mlp\.linear_fc1\.layer_norm_weight \(2 keys missing\)"):
        checkpoint.load(str(tmp_path), [te_structured_model(config, monkeypatch)])


def te_init_parameters(class_name):
    """(positional names, required keyword-only, all keyword-only) of a megatron TE wrapper's
    __init__, read from megatron-core's source: without TE the classes themselves are mocks."""
    import ast
    import inspect

    from megatron.core.extensions import transformer_engine

    tree = ast.parse(inspect.getsource(transformer_engine))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    kwonly = [a.arg for a in init.args.kwonlyargs]
    required = {name for name, default in zip(kwonly, init.args.kw_defaults) if default is None}
    return [a.arg for a in init.args.args[1:]], required, set(kwonly)


def test_mixer_and_mlp_call_the_te_linears_with_their_signatures(megatron_single, monkeypatch):
    """What RATPlusMixer and megatron's MLP pass to W_in / W_out / fc1 / fc2 binds to megatron-core's
    TELayerNormColumnParallelLinear / TERowParallelLinear constructors."""
    calls = []

    def recording(cls, name):
        class Recording(cls):
            def __init__(self, *args, **kwargs):
                calls.append((name, args, kwargs))
                super().__init__(*args, **kwargs)
        return Recording

    monkeypatch.setattr(specs, "require", lambda *args, **kwargs: None)
    block = specs.get_ratplus_block_spec(preset("tiny", num_layers=1), "transformer_engine")
    layer = block.layer_specs[0].submodules
    mixer, mlp = layer.self_attention.submodules, layer.mlp.submodules
    assert mixer.linear_in is mlp.linear_fc1 and mixer.linear_out is mlp.linear_fc2  # one spec each
    mixer.linear_in.module = recording(TEStandInNormLinear, "TELayerNormColumnParallelLinear")
    mixer.linear_out.module = recording(RowParallelLinear, "TERowParallelLinear")
    block.layer_norm = TEStandInNorm
    config = preset("tiny", num_layers=1)
    GPTModel(config=config, transformer_layer_spec=block, vocab_size=config.vocab_size,
             max_sequence_length=config.seq_length, position_embedding_type="rope")
    shapes = [(name, args) for name, args, _ in calls]  # W_in, W_out, fc1, fc2 in build order
    assert shapes == [("TELayerNormColumnParallelLinear", (128, 640)), ("TERowParallelLinear", (128, 128)),
                      ("TELayerNormColumnParallelLinear", (128, 512)), ("TERowParallelLinear", (512, 128))]
    for name, args, kwargs in calls:
        positional, required, kwonly = te_init_parameters(name)
        assert len(args) == len(positional) == 2, name
        assert set(kwargs) <= kwonly, (name, set(kwargs) - kwonly)
        assert required <= set(kwargs), (name, required - set(kwargs))
        assert kwargs["is_expert"] is False and kwargs["bias"] is False, name
