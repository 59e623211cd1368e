"""Configuration of RAT+ models exported by megatron-ratplus (``ratplus-convert --to hf``).

Self-contained (transformers only): this file is copied next to the weights and loaded with
``trust_remote_code=True``. ``attention_pattern`` uses megatron-ratplus's pattern grammar
(dense, dilated:D[,w=W][,p=P], local:w=W[,p=P], per-layer lists, cycles, per-head groups; see
modeling_ratplus.py) and can be set at load time:
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True, attention_pattern="dilated:16,w=256,p=4")``.
"""

from transformers import PretrainedConfig


class RATPlusConfig(PretrainedConfig):
    """Sizes of a RAT+ model. ``vocab_size`` is the padded embedding size; ids from
    ``real_vocab_size`` on are padding and get logit -inf."""

    model_type = "ratplus"

    def __init__(self, vocab_size=384, real_vocab_size=None, hidden_size=128, num_hidden_layers=4,
                 num_attention_heads=4, intermediate_size=512, max_position_embeddings=4096,
                 recurrence=True, attention_pattern="dense", rope_theta=10000.0, rms_norm_eps=1e-6,
                 initializer_range=0.02, use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.real_vocab_size = real_vocab_size if real_vocab_size is not None else vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.recurrence = recurrence
        self.attention_pattern = attention_pattern
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
