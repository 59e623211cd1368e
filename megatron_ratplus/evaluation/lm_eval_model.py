"""The lm-evaluation-harness model ``ratplus``: any RAT+ checkpoint at any attention pattern.

Importing this module registers the model with lm-eval (its ``@register_model`` registry;
lm-eval 0.4 finds no models outside its own package by itself, hence the ``ratplus-lm-eval``
console script, which imports this module and then runs lm-eval's own command line)::

    ratplus-lm-eval --model ratplus --model_args load=CKPT,pattern=dilated:16,w=256,p=4 --tasks piqa

lm-eval splits ``--model_args`` at commas, so a pattern's options arrive as their own
arguments (``w=256``, ``p=4``, ``k=``, ``block=``, ``pool=``, ``d=``) and are joined back onto
``pattern``. Under ``torchrun`` every rank loads the model tensor-parallel over all ranks and
runs every request; every rank reports rank 0 and world size 1, which is lm-eval's convention
for model-parallel launchers (it writes results on LOCAL_RANK 0 only).
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_ratplus.cli.types import positive_int
from megatron_ratplus.evaluation.errors import EvaluationError
from megatron_ratplus.evaluation.scoring import continuation_logprobs, greedy_until
from megatron_ratplus.model import set_attention_pattern

PATTERN_OPTIONS = ("w", "p", "k", "block", "pool", "d")
TRUTH = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}  # truncate's words


def pattern_from_args(pattern: str, options: dict) -> str:
    """``pattern`` with the options lm-eval split off it appended in the grammar's order."""
    unknown = sorted(set(options) - set(PATTERN_OPTIONS))
    if unknown:
        raise EvaluationError(f"unknown ratplus model argument(s): {', '.join(unknown)} (known: load, pattern, "
                              f"{', '.join(PATTERN_OPTIONS)}, batch_size, max_length, max_gen_toks, truncate, device, "
                              f"dtype)")
    return ",".join([str(pattern)] + [f"{k}={options[k]}" for k in PATTERN_OPTIONS if k in options])


def check_model_args(text: str) -> None:
    """The ``--model_args`` of ``--model ratplus`` checked before lm-eval starts (lm-eval logs its
    set-up first, so an error found in the model's constructor would follow several INFO lines)."""
    from lm_eval.utils import simple_parse_args_string

    from megatron_ratplus.checkpoint import EVAL_DTYPES, read_meta
    from megatron_ratplus.patterns import parse_composition

    args = simple_parse_args_string(text or "")
    if "load" not in args:
        raise EvaluationError("the ratplus model needs load=CHECKPOINT in --model_args")
    read_meta(str(args["load"]))
    for name in ("max_length", "max_gen_toks"):
        if name in args:
            positive_int.check(args[name], f"ratplus model argument {name}")
    if "batch_size" in args and not str(args["batch_size"]).startswith("auto"):
        positive_int.check(args["batch_size"], "ratplus model argument batch_size")
    if "device" in args:  # lm-eval passes its --device to the model as well: a TypeError, later
        raise EvaluationError("ratplus model argument device: give lm-eval's --device instead")
    if str(args.get("truncate", "false")).lower() not in TRUTH:
        raise EvaluationError(f"ratplus model argument truncate={args['truncate']}: choose true or false")
    if str(args.get("dtype", "fp32")) not in EVAL_DTYPES:
        raise EvaluationError(f"ratplus model argument dtype={args['dtype']}: choose one of {', '.join(EVAL_DTYPES)}")
    known = {"load", "pattern", "batch_size", "max_length", "max_gen_toks", "truncate", "device", "dtype",
             "max_batch_size", *PATTERN_OPTIONS}
    options = {k: v for k, v in args.items() if k in PATTERN_OPTIONS or k not in known}
    parse_composition(pattern_from_args(args.get("pattern", "dense"), options))


def _load(path: str, dtype: str):
    from megatron.core import parallel_state

    from megatron_ratplus import distributed
    from megatron_ratplus.checkpoint import load_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not parallel_state.model_parallel_is_initialized():
        distributed.initialize(tensor_parallel=world)  # torchrun: the model split over all ranks
    model, _, tokenizer = load_model(path, dtype=dtype)
    return model, tokenizer


@register_model("ratplus")
class RatPlusLM(TemplateLM):
    """lm-eval's three request types on a RAT+ model; requests batched longest first.

    ``load``: checkpoint directory, or pass ``model`` and ``tokenizer`` objects (Python use).
    ``max_length``: longest input (default the model's seq_length); ``truncate``: drop the
    oldest context tokens of longer inputs instead of failing; ``max_gen_toks``: default
    generation budget when a task gives none. ``dtype``: ``fp32`` (default) or ``bf16``, the
    parameters' type after loading (as ratplus-eval's --bf16).
    """

    def __init__(self, load: Optional[str] = None, pattern: str = "dense", batch_size=16,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, truncate: bool = False,
                 device: Optional[str] = None, model=None, tokenizer=None, max_batch_size=None,
                 dtype: str = "fp32", **pattern_options):
        super().__init__()
        if (load is None) == (model is None):
            raise EvaluationError("the ratplus model needs load=CHECKPOINT (or model and tokenizer objects)")
        if model is None:
            model, tokenizer = _load(str(load), str(dtype))
        self.model, self.tokenizer = model.eval(), tokenizer
        # lm-eval's CLI asks for "cuda" by default; without CUDA stay put, as its HF model does
        if device and (torch.device(device).type != "cuda" or torch.cuda.is_available()):
            self.model.to(device)
        self.pattern = pattern_from_args(pattern, pattern_options)
        set_attention_pattern(self.model, self.pattern)
        auto = str(batch_size).startswith("auto")  # lm-eval's "auto[:N]" -> the default
        self.batch_size = 16 if auto else positive_int.check(batch_size, "ratplus model argument batch_size")
        self.max_length = (model.config.seq_length if max_length is None
                           else positive_int.check(max_length, "ratplus model argument max_length"))
        self.max_gen_toks = positive_int.check(max_gen_toks, "ratplus model argument max_gen_toks")
        self.truncate = TRUTH.get(str(truncate).lower())
        if self.truncate is None:
            raise EvaluationError(f"ratplus model argument truncate={truncate}: choose true or false")
        self._device = next(self.model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = continuation_logprobs(self.model, pairs, self.max_length, self.batch_size, self.truncate)
        for (request, _, _), result in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Each text scored in windows of the model's length, every token predicted once."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1):
                windows.append(make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, continuation_logprobs(self.model, windows, self.max_length,
                                                                     self.batch_size)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy decoding through the sparse decode cache until a task's stop strings
        (``until``), the end-of-document token or ``max_gen_toks``; sampling settings are ignored."""
        budgets = {}
        for index, request in enumerate(requests):
            kwargs = dict(request.args[1] or {})
            until = kwargs.get("until") or []
            budgets.setdefault(int(kwargs.get("max_gen_toks", self.max_gen_toks)), []).append(
                (index, [until] if isinstance(until, str) else list(until)))
        texts = [None] * len(requests)
        for budget, items in budgets.items():
            prompts = []
            for index, _ in items:
                prompt = self.tok_encode(requests[index].args[0]) or [self.prefix_token_id]
                if self.truncate:
                    prompt = prompt[-(self.max_length - budget):]
                prompts.append(prompt)
            outputs = greedy_until(self.model, prompts, self.tok_decode, budget, self.max_length,
                                   [stops for _, stops in items], [self.eot_token_id], self.batch_size)
            for (index, _), text in zip(items, outputs):
                texts[index] = text
                self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return texts
