"""RAT+ (recurrence-augmented attention) for Hugging Face transformers, in plain torch.

Written by megatron-ratplus (``ratplus-convert --to hf``) next to the weights; loaded with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``. It must not import
megatron or megatron_ratplus, so it carries its own small copy of the math (docs/DESIGN.md §1,
§2, §5 of megatron-ratplus):

    x = RMSNorm(h);  [o, q, k, v, g] = W_in x          (W_in rows per head: o q k v g of head 0, ...)
    gate = sigmoid(g) in fp32;  k~_t = gate_t k~_{t-1} + (1 - gate_t) k_t  (same for v~)
    q, k~ = RoPE(q), RoPE(k~)                          (rotate-half, after the recurrence)
    h = h + W_out(sigmoid(o) * softmax-attention(q, k~, v~) under the layer's pattern)
    h = h + fc2(gelu(fc1(RMSNorm(h))));   logits = RMSNorm(h) E^T  (tied), padded ids -inf

Without the recurrence (the attention-only baseline) W_in has no g rows and k, v are used as is.

Attention patterns: query t may attend key j <= t iff (j + 1) % D == 0 (dilated), t - j <= W
(window) or j < P (sinks). Grammar (megatron-ratplus's, without top-k)::

    pattern      dense | dilated:D[,w=W][,p=P] | local:w=W[,p=P]   (':' may replace each ',')
    composition  item (';' item)* | 'cycle(' item (';' item)* ')'     one item per layer
    item         [N '*'] layer;  layer := heads | '(' heads ')';  heads := [N '*'] pattern ('|' ...)

Generation keeps, per layer and head group, only the slots a pattern can still see: P sinks,
a ring of the last W + 1 positions and the chunk ends (P + W + 1 + floor(T/D) slots; T for
dense), plus the fp32 recurrent state. Batches may be left- or right-padded (attention_mask).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_ratplus import RATPlusConfig

# ----------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Pattern:
    """One attention pattern; ``dilation`` None: no dilated term (local), 1: dense."""

    dilation: Optional[int] = 1
    window: int = 0
    sinks: int = 0

    def visible(self, t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        allowed = (t - j <= self.window) | (j < self.sinks)
        if self.dilation is not None:
            allowed = allowed | ((j + 1) % self.dilation == 0)
        return allowed & (j <= t)


MAX_VALUE = 2**31 - 1  # the largest D, W or P


def parse_pattern(text: str) -> Pattern:
    source = text
    kind, colon, rest = text.strip().lower().partition(":")
    kind = kind.strip()
    if kind == "dense" and not colon:
        return Pattern()
    if kind not in ("dilated", "local"):
        raise ValueError(f"attention pattern '{source}': this exported model supports dense, dilated and local")
    fields = {}
    for i, part in enumerate(p.strip() for p in re.split("[,:]", rest)):
        name, eq, value = part.partition("=")
        if not eq and kind == "dilated" and i == 0:
            name, value = "d", part
        elif not eq:
            raise ValueError(f"attention pattern '{source}': parameter '{part}' must look like name=value")
        name = name.strip()
        if name not in ({"d", "w", "p"} if kind == "dilated" else {"w", "p"}) or name in fields:
            raise ValueError(f"attention pattern '{source}': unexpected parameter '{name}'")
        # plain ASCII digits up to 2**31-1, as the training side's grammar: int() would also take
        # "1_6", other scripts' digits and values whose index arithmetic overflows
        if not re.fullmatch(r"\s*[0-9]+\s*", value) or int(value) > MAX_VALUE:
            raise ValueError(f"attention pattern '{source}': {name} must be an integer in 0..{MAX_VALUE}")
        fields[name] = int(value)
    if (kind == "dilated" and fields.get("d", 0) < 1) or (kind == "local" and "w" not in fields) \
            or min(fields.values(), default=0) < 0:
        raise ValueError(f"attention pattern '{source}': missing or negative parameter")
    return Pattern(fields["d"] if kind == "dilated" else None, fields.get("w", 0), fields.get("p", 0))


def _count(text: str):
    match = re.match(r"^\s*([0-9]+)\s*\*(.*)$", text)  # ASCII digits only, as the grammar says
    return (int(match.group(1)), match.group(2)) if match else (None, text)


def _layer_heads(text: str, num_heads: int) -> Tuple[Pattern, ...]:
    parts = text.split("|")
    groups = [_count(part) if len(parts) > 1 else (None, part) for part in parts]
    counts = [n for n, _ in groups]
    if all(n is None for n in counts):
        if num_heads % len(groups):
            raise ValueError(f"attention pattern '{text}': {len(groups)} head groups do not divide {num_heads} heads")
        counts = [num_heads // len(groups)] * len(groups)
    elif None in counts or sum(counts) != num_heads:
        raise ValueError(f"attention pattern '{text}': head counts must be given for every group and add up "
                         f"to {num_heads}")
    return tuple(parse_pattern(body) for (_, body), n in zip(groups, counts) for _ in range(n))


def resolve_patterns(text: str, num_layers: int, num_heads: int) -> List[Tuple[Pattern, ...]]:
    """[layer][head] -> Pattern for a composition string."""
    body = text.strip()
    cycle = body.lower().startswith("cycle(")
    if cycle:
        if not body.endswith(")"):
            raise ValueError(f"attention pattern '{text}': 'cycle(' needs a closing ')'")
        body = body[len("cycle("):-1]
    layers = []
    for item in body.split(";"):
        count, layer = (None, item) if "|" in item and "(" not in item else _count(item)
        layer = layer.strip()
        if layer.startswith("(") and layer.endswith(")"):
            layer = layer[1:-1]
        if not layer.strip() or "(" in layer or ")" in layer:
            raise ValueError(f"attention pattern '{text}': bad layer item '{item.strip()}'")
        if (count or 1) > num_layers:  # refused before the list is built: "3000000000*dense" would fill memory
            raise ValueError(f"attention pattern '{text}': {count} layers named, the model has {num_layers}")
        layers += [_layer_heads(layer, num_heads)] * (count or 1)
    if cycle or len(layers) == 1:
        if num_layers % len(layers):
            raise ValueError(f"attention pattern '{text}': {len(layers)} layer patterns do not divide {num_layers} layers")
        return layers * (num_layers // len(layers))
    if len(layers) != num_layers:
        raise ValueError(f"attention pattern '{text}' names {len(layers)} layers, the model has {num_layers}")
    return layers


def head_groups(patterns: Tuple[Pattern, ...]) -> List[Tuple[Pattern, int, int]]:
    """Runs of consecutive heads sharing a pattern: (pattern, first head, end head)."""
    runs = []
    for i, p in enumerate(patterns):
        if runs and runs[-1][0] == p:
            runs[-1] = (p, runs[-1][1], i + 1)
        else:
            runs.append((p, i, i + 1))
    return runs

# ----------------------------------------------------------------------------- ops


def gated_scan(x: torch.Tensor, log_gate: torch.Tensor, keep: torch.Tensor, h0: torch.Tensor,
               chunk: int = 32) -> torch.Tensor:
    """h_t = g_t h_{t-1} + (1 - g_t) x_t along dim -2 in fp32, with log g = log_gate, 1 - g = keep.

    Chunked, as one matrix product per chunk: h_t = sum_{s<=t} exp(sum_{s<r<=t} log g_r)
    (1 - g_s) x_s + exp(sum_{r<=t} log g_r) h_in, the segment sums taken by a cumulative sum
    over a masked matrix (no difference of large cumulative sums). x, log_gate, keep:
    [..., T, n]; h0: [..., n]. Returns all states [..., T, n].
    """
    out, h = [], h0
    for start in range(0, x.shape[-2], chunk):
        a = log_gate[..., start:start + chunk, :]
        u = keep[..., start:start + chunk, :] * x[..., start:start + chunk, :]
        n = a.shape[-2]
        later = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1).unsqueeze(-1)  # [r, s]: r > s
        terms = a.unsqueeze(-2).expand(*a.shape[:-1], n, a.shape[-1]).masked_fill(~later, 0.0)  # [.., r, s, n]
        seg = torch.cumsum(terms, dim=-3)  # [..., t, s, n] = sum_{s<r<=t} a_r
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril().unsqueeze(-1)
        weights = torch.exp(seg.masked_fill(~causal, float("-inf")))
        states = (weights * u.unsqueeze(-3)).sum(-2) + torch.exp(torch.cumsum(a, dim=-2)) * h.unsqueeze(-2)
        out.append(states)
        h = states[..., -1, :]
    return torch.cat(out, dim=-2)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of [b, h, s, d] at integer positions [b, s] (megatron's layout)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    angles = positions.float().unsqueeze(-1) * inv_freq
    emb = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # [b, 1, s, d]
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos().to(x.dtype) + torch.cat([-x2, x1], dim=-1) * emb.sin().to(x.dtype)

# ----------------------------------------------------------------------------- decode cache


class PatternSlots:
    """Keys/values of one head group under one pattern, for a batch: [sinks | ring | chunk ends].

    Each slot records the position it holds (-1: empty or held by another slot), and the
    pattern's rule on those positions decides what a query sees. A position goes to its sink slot
    (j < P), else its chunk-end slot ((j + 1) % D == 0), else the ring slot j % (W + 1); the ring
    therefore always covers the window. Dense patterns keep every position as a "chunk end".
    """

    def __init__(self, pattern: Pattern, batch: int, heads: int, head_dim: int, dtype, device):
        self.pattern = pattern
        dense = pattern.dilation == 1
        self.n_sink = 0 if dense else pattern.sinks
        self.n_ring = 0 if dense else pattern.window + 1
        fixed = self.n_sink + self.n_ring
        self.keys = torch.zeros(batch, heads, fixed, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((batch, fixed), -1, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        return self.positions.shape[1]

    def _grow(self, slots: int) -> None:
        extra = slots - self.slots
        if extra > 0:
            b, h, _, d = self.keys.shape
            self.keys = torch.cat([self.keys, self.keys.new_zeros(b, h, extra, d)], dim=2)
            self.values = torch.cat([self.values, self.values.new_zeros(b, h, extra, d)], dim=2)
            self.positions = torch.cat([self.positions, self.positions.new_full((b, extra), -1)], dim=1)

    def write(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Store [b, heads, n, d] keys/values at positions [b, n] where ``valid``; the newest tokens
        of each row must be among them (the ring keeps only the last W + 1 positions)."""
        d = self.pattern.dilation
        sink = valid & (positions < self.n_sink)
        end = valid & ~sink & ((positions + 1) % d == 0) if d else torch.zeros_like(valid)
        last = torch.where(valid, positions, -1).max(dim=1, keepdim=True).values
        ring = valid & (positions > last - self.n_ring) if self.n_ring else torch.zeros_like(valid)
        base = self.n_sink + self.n_ring
        if bool(end.any()):
            self._grow(base + int(((positions + 1) // d)[end].max()))
        targets = [(sink, positions, positions),
                   (end, base + (positions + 1) // (d or 1) - 1, positions),
                   # a sink or chunk end in the ring: evict the older occupant, count it only once
                   (ring, self.n_sink + positions % max(self.n_ring, 1), torch.where(sink | end, -1, positions))]
        for chosen, slot, held in targets:
            rows, cols = chosen.nonzero(as_tuple=True)
            if rows.numel():
                self.keys[rows, :, slot[rows, cols]] = keys[rows, :, cols]
                self.values[rows, :, slot[rows, cols]] = values[rows, :, cols]
                self.positions[rows, slot[rows, cols]] = held[rows, cols]

    def attend(self, query: torch.Tensor, t: torch.Tensor, scale: float) -> torch.Tensor:
        """[b, heads, d] queries at positions t [b] -> [b, heads, d] attention over the slots."""
        pos = self.positions
        mask = (pos >= 0) & self.pattern.visible(t.unsqueeze(1), pos)
        out = F.scaled_dot_product_attention(query.unsqueeze(2), self.keys, self.values,
                                             attn_mask=mask[:, None, None, :], scale=scale)
        return out.squeeze(2)


class RATPlusDecodeCache:
    """The generation cache: per layer, the slots of each head group and the recurrent state.

    Passed between ``forward`` calls as ``cache`` (returned in the output), like transformers'
    Cache objects; ``lengths`` [b] counts each row's real (unpadded) tokens so far.
    """

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: List[Optional[dict]] = [None] * num_layers
        self.lengths: Optional[torch.Tensor] = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.lengths is None else int(self.lengths.max())

    def slots(self, layer_idx: int) -> List[int]:
        """Slots held per head group of a layer (for one row: P + W + 1 + floor(T/D), T if dense)."""
        return [store.slots for store in self.layers[layer_idx]["stores"]]

# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class RATPlusMixer(nn.Module):
    def __init__(self, config: RATPlusConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.parts = 5 if config.recurrence else 4
        self.recurrence = config.recurrence
        self.theta = config.rope_theta
        self.scale = self.head_dim ** -0.5
        self.in_proj = nn.Linear(config.hidden_size, self.parts * config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.groups: List[Tuple[Pattern, int, int]] = [(Pattern(), 0, self.heads)]

    def _recur(self, k, v, gate_logits, valid, h0):
        """k~, v~ [b, h, s, d] (fp32) and the last state; padded tokens leave the state unchanged."""
        x = torch.cat([k, v], dim=-1).float()
        z = gate_logits.float()
        log_gate = F.logsigmoid(z).masked_fill(~valid[:, None, :, None], 0.0)
        keep = (1.0 - torch.sigmoid(z)).masked_fill(~valid[:, None, :, None], 0.0)
        states = gated_scan(x, torch.cat([log_gate, log_gate], -1), torch.cat([keep, keep], -1), h0)
        return states[..., :self.head_dim], states[..., self.head_dim:], states[..., -1, :]

    def forward(self, x, positions, valid, cache: Optional[RATPlusDecodeCache]):
        b, s, _ = x.shape
        mixed = self.in_proj(x).view(b, s, self.heads, self.parts, self.head_dim).permute(3, 0, 2, 1, 4)
        o, q, k, v = mixed[0], mixed[1], mixed[2], mixed[3]  # [b, heads, s, d]
        state = cache.layers[self.layer_idx] if cache is not None else None
        if self.recurrence:
            h0 = state["recurrent"] if state is not None else x.new_zeros(b, self.heads, 2 * self.head_dim).float()
            k32, v32, last = self._recur(k, v, mixed[4], valid, h0)
            k, v = k32.to(x.dtype), v32.to(x.dtype)
        q, k = rotate(q, positions, self.theta), rotate(k, positions, self.theta)
        if cache is None:
            y = self._attend_full(q, k, v, positions, valid)
        else:
            if state is None:
                state = cache.layers[self.layer_idx] = {
                    "stores": [PatternSlots(p, b, e - a, self.head_dim, k.dtype, k.device) for p, a, e in self.groups]}
            if self.recurrence:
                state["recurrent"] = last
            for (_, a, e), store in zip(self.groups, state["stores"]):
                store.write(k[:, a:e], v[:, a:e], positions, valid)
            y = self._attend_cached(q, positions, state["stores"]) if s == 1 else self._attend_full(
                q, k, v, positions, valid)
        y = torch.sigmoid(o) * y
        return self.out_proj(y.transpose(1, 2).reshape(b, s, -1))

    def _attend_full(self, q, k, v, positions, valid):
        """All positions at once (the prompt): a dense [s, s] mask per head group and row."""
        s = q.shape[2]
        order = torch.arange(s, device=q.device)
        causal = order.unsqueeze(1) >= order.unsqueeze(0)
        outs = []
        for pattern, a, e in self.groups:
            mask = pattern.visible(positions.unsqueeze(2), positions.unsqueeze(1)) & causal & valid.unsqueeze(1)
            mask = mask | torch.eye(s, dtype=torch.bool, device=q.device)  # padded queries: no empty rows
            outs.append(F.scaled_dot_product_attention(q[:, a:e], k[:, a:e], v[:, a:e],
                                                       attn_mask=mask.unsqueeze(1), scale=self.scale))
        return torch.cat(outs, dim=1)

    def _attend_cached(self, q, positions, stores):
        t = positions[:, 0]
        outs = [store.attend(q[:, a:e, 0], t, self.scale) for (_, a, e), store in zip(self.groups, stores)]
        return torch.cat(outs, dim=1).unsqueeze(2)


class RATPlusMLP(nn.Module):
    def __init__(self, config: RATPlusConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RATPlusBlock(nn.Module):
    def __init__(self, config: RATPlusConfig, layer_idx: int):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = RATPlusMixer(config, layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = RATPlusMLP(config)

    def forward(self, h, positions, valid, cache):
        h = h + self.mixer(self.input_norm(h), positions, valid, cache)
        return h + self.mlp(self.mlp_norm(h))

# ----------------------------------------------------------------------------- models


class RATPlusPreTrainedModel(PreTrainedModel):
    config_class = RATPlusConfig
    base_model_prefix = "model"
    _no_split_modules = ["RATPlusBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        if getattr(getattr(module, "weight", None), "_is_hf_initialized", False):
            return  # loaded by transformers 5, which may still call this on the module (AutoModel in 5.0)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)


class RATPlusModel(RATPlusPreTrainedModel):
    """The decoder without its head (``AutoModel``): hidden states after the final norm."""

    def __init__(self, config: RATPlusConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(RATPlusBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.set_attention_pattern(config.attention_pattern)
        self.post_init()

    def set_attention_pattern(self, text: str) -> None:
        """Switch every layer to a pattern or composition (no retraining needed)."""
        per_layer = resolve_patterns(text, self.config.num_hidden_layers, self.config.num_attention_heads)
        for layer, heads in zip(self.layers, per_layer):
            layer.mixer.groups = head_groups(heads)
        self.config.attention_pattern = text

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                cache=None, **unused):
        """With ``use_cache``, the prompt fills a new RATPlusDecodeCache (returned as the output's
        cache), and later calls feed new tokens one at a time. ``hidden_states``, when asked: the
        embeddings, then each layer's output, the last one after the final norm."""
        if output_attentions:  # SDPA never materialises the probabilities; refuse rather than return None
            raise ValueError("RAT+ attention runs fused (scaled_dot_product_attention) and has no attention "
                             "probabilities to return: output_attentions is not supported")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, RATPlusDecodeCache):
            raise ValueError("RAT+ decodes with its own RATPlusDecodeCache, not a transformers Cache")
        if cache is None and use_cache:
            cache = RATPlusDecodeCache(self.config.num_hidden_layers)
        embeds = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        collect = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        hidden, states = self._run(embeds, attention_mask, cache, collect)
        out = BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=states,
                                      **{_CACHE_FIELD: cache if use_cache else None})
        return out if _return_dict(self.config, return_dict) else out.to_tuple()

    def _run(self, embeds, attention_mask, cache, collect: bool):
        b, s = embeds.shape[:2]
        if cache is not None and cache.lengths is not None and s > 1:  # several new tokens: one at a time
            steps = [self._run(embeds[:, i:i + 1], None if attention_mask is None else
                               attention_mask[:, i - s:][:, :1], cache, collect) for i in range(s)]
            hidden = torch.cat([h for h, _ in steps], dim=1)
            return hidden, (tuple(torch.cat(parts, dim=1) for parts in zip(*(st for _, st in steps)))
                            if collect else None)
        valid = (attention_mask[:, -s:].bool() if attention_mask is not None
                 else torch.ones(b, s, dtype=torch.bool, device=embeds.device))
        start = cache.lengths if cache is not None and cache.lengths is not None else valid.new_zeros(b, dtype=torch.long)
        positions = start.unsqueeze(1) + torch.cumsum(valid.long(), dim=1) - 1  # real tokens count from 0
        positions = positions.clamp(min=0)
        h, states = embeds, [embeds]
        for layer in self.layers:
            h = layer(h, positions, valid, cache)
            states.append(h)
        if cache is not None:
            cache.lengths = start + valid.long().sum(1)
        h = self.norm(h)
        states[-1] = h
        return h, (tuple(states) if collect else None)


class RATPlusForCausalLM(RATPlusPreTrainedModel, GenerationMixin):
    def __init__(self, config: RATPlusConfig, **stray):
        if stray:  # e.g. lm-eval's key=value model_args split 'dilated:16,w=8' at its comma
            raise ValueError(f"unexpected model argument(s) {', '.join(sorted(stray))}: write a pattern's "
                             f"parameters with ':' (attention_pattern=dilated:16:w=8:p=2), which survives "
                             f"comma-separated argument lists")
        super().__init__(config)
        self.model = RATPlusModel(config)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own RATPlusDecodeCache on the first forward

    def set_attention_pattern(self, text: str) -> None:
        self.model.set_attention_pattern(text)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, labels=None,
                use_cache=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                cache=None, **unused):
        """Logits [b, s, vocab] (padded ids -inf); the cache as in RATPlusModel.forward."""
        out = self.model(input_ids, attention_mask, past_key_values, inputs_embeds, use_cache,
                         output_hidden_states, output_attentions, return_dict=True, cache=cache)
        logits = self._logits(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
        return result if _return_dict(self.config, return_dict) else result.to_tuple()

    def _logits(self, hidden):
        logits = F.linear(hidden, self.model.embed_tokens.weight)
        if self.config.real_vocab_size < self.config.vocab_size:
            logits[..., self.config.real_vocab_size:] = float("-inf")
        return logits


# transformers 5 renamed the outputs' cache field from past_key_values to cache
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _return_dict(config: RATPlusConfig, asked: Optional[bool]) -> bool:
    return asked if asked is not None else config.return_dict
