"""The OpenAI-compatible HTTP API over an ``Engine``: /v1/completions (streamed as server-sent
events ending in ``[DONE]``), /v1/models, /health and /metrics (Prometheus text).

A request picks its pattern with the extra field ``attention_pattern`` (default: the first
offered). Every error, FastAPI's own included (unreadable body, unknown path, wrong method),
uses OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
requests, 404 for an unknown model, 429 (queue full) and 503 (shutting down) with Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import List, Optional, Union

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from megatron_ratplus.serving.engine import Draining, Engine, QueueFull
from megatron_ratplus.serving.sequence import SamplingParams, Sequence


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request this server honours. Fields it does not know
    are ignored (``user``, vendors' extras); OpenAI's own fields that would change the output but
    are not implemented (``UNSUPPORTED``) are refused unless left at their neutral value, so a
    request never gets a completion computed without them as if they had been applied. Numbers
    must be finite (JSON's NaN and Infinity are not), and a seed fits torch's generator."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: Optional[str] = None
    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    stop: Union[None, str, List[str]] = None
    seed: Optional[int] = Field(None, ge=-2**63, le=2**64 - 1)
    n: int = Field(1, ge=1, le=1)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    attention_pattern: Optional[str] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None


UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {})}  # field: its neutral values


class APIError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def response(self) -> JSONResponse:
        kind = {429: "rate_limit_error"}.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass
class ServedModel:
    """What the API needs to know besides the engine."""

    name: str
    patterns: List[str]
    tokenizer: object
    vocab_size: int
    max_model_len: int


def build_app(engine: Engine, served: ServedModel) -> FastAPI:
    app = FastAPI(title="ratplus-serve")
    stop_tokens = [served.tokenizer.eod] if getattr(served.tokenizer, "eod", None) is not None else []

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err: RequestValidationError):
        first = err.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return APIError(400, f"{param or 'body'}: {first.get('msg')}", param).response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, err: HTTPException):  # unknown path, wrong method, unreadable body
        return APIError(err.status_code, str(err.detail)).response()

    @app.get("/health")
    async def health():
        if engine.draining:
            raise APIError(503, "the server is shutting down", retry_after=5)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "megatron-ratplus", "attention_patterns": served.patterns,
                                            "max_model_len": served.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_metrics(engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.model is not None and body.model != served.name:
            raise APIError(404, f"model '{body.model}' is not served here (this server serves '{served.name}')",
                           "model", "model_not_found")
        _refuse_unsupported(body)
        prompts = _prompts(body, served, engine.max_waiting)
        params = _sampling(body, served, max(len(p) for p in prompts))
        pattern = body.attention_pattern or served.patterns[0]
        if pattern not in served.patterns:
            raise APIError(400, f"attention_pattern '{pattern}' is not offered (offered: {', '.join(served.patterns)})",
                           "attention_pattern")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def notify(seq: Sequence):  # on the engine thread: what changed, handed to this request's loop
            update = (seq, seq.take_delta(), len(seq.logprobs), seq.finish_reason)
            loop.call_soon_threadsafe(events.put_nowait, update)

        seqs = [Sequence(p, params, pattern, served.tokenizer, stop_tokens, notify) for p in prompts]
        try:
            engine.submit(seqs)
        except QueueFull as err:
            raise APIError(429, f"too many requests waiting: {err}", code="queue_full", retry_after=1) from None
        except Draining as err:
            raise APIError(503, str(err), code="shutting_down", retry_after=5) from None
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": served.name}
        if body.stream:
            return StreamingResponse(_stream(engine, seqs, events, head, body, served),
                                     media_type="text/event-stream")
        if not await _wait(engine, seqs, events, request):
            return Response(status_code=499)  # nobody is listening any more
        choices = [{"index": i, "text": (served.tokenizer.decode(s.prompt) if body.echo else "") + s.text,
                    "logprobs": _logprobs(s, served.tokenizer, 0, len(s.logprobs), body.echo),
                    "finish_reason": s.finish_reason} for i, s in enumerate(seqs)]
        return {**head, "choices": choices, "usage": _usage(seqs)}

    return app


def _refuse_unsupported(body: CompletionRequest) -> None:
    for name, neutral in UNSUPPORTED.items():
        if getattr(body, name) not in neutral:
            raise APIError(400, f"{name} is not supported by this server", name)
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")


def _text(value: str, param: str) -> str:
    """A string of the request that can be encoded: JSON may carry a lone surrogate (\\ud800)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise APIError(400, f"{param} holds a lone surrogate ({value[err.start]!r} at character {err.start}), "
                            "not text", param) from None
    return value


def _prompts(body: CompletionRequest, served: ServedModel, limit: int) -> List[List[int]]:
    """The request's prompts as token ids, checked against the vocabulary and max_model_len; more
    than ``limit`` (the queue's size) could never be queued: a 400 rather than a 429 to retry."""
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if len(raw) > limit:
        raise APIError(400, f"the request has {len(raw)} prompts; this server queues at most {limit}", "prompt")
    prompts = [served.tokenizer.encode(_text(p, "prompt")) if isinstance(p, str) else list(p) for p in raw]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt must not be empty", "prompt")
    for p in prompts:
        bad = [t for t in p if not 0 <= t < served.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{served.vocab_size - 1})", "prompt")
        if len(p) >= served.max_model_len:
            raise APIError(400, f"the prompt has {len(p)} tokens; this server's max_model_len is "
                                f"{served.max_model_len} (prompt plus max_tokens)", "prompt")
    return prompts


def _sampling(body: CompletionRequest, served: ServedModel, longest: int) -> SamplingParams:
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    if longest + max_tokens > served.max_model_len:
        raise APIError(400, f"max_tokens {max_tokens} does not fit: the prompt has {longest} tokens and "
                            f"max_model_len is {served.max_model_len}", "max_tokens")
    stop = [_text(s, "stop") for s in ([body.stop] if isinstance(body.stop, str) else body.stop or [])]
    if any(not s for s in stop):
        raise APIError(400, "stop strings must not be empty", "stop")
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          top_k=max(body.top_k, 0), seed=body.seed, stop=stop, logprobs=body.logprobs,
                          echo=body.echo)


DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


async def _wait(engine: Engine, seqs: List[Sequence], events: asyncio.Queue, request: Request) -> bool:
    """Wait until every sequence of a non-streaming request has finished -> True; a client that
    goes away first cancels them (their rows are freed at the next engine step) -> False."""
    left, getter = len(seqs), None
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        while left:
            getter = getter or asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if done:
                _, _, _, reason = getter.result()
                getter = None
                left -= reason is not None
            if left and loop.time() - checked >= DISCONNECT_POLL_S:  # every token notifies: check by the clock
                if await request.is_disconnected():
                    return False
                checked = loop.time()
        return True
    finally:
        if getter is not None:
            getter.cancel()
        if left:
            engine.cancel(seqs)


async def _stream(engine: Engine, seqs: List[Sequence], events: asyncio.Queue, head: dict,
                  body: CompletionRequest, served: ServedModel):
    """Server-sent events: one chunk per new piece of text, a last chunk per choice with its
    finish reason, usage if asked, then ``[DONE]``; a client that goes away cancels its sequences."""
    index = {seq.id: i for i, seq in enumerate(seqs)}
    sent_logprobs = [0] * len(seqs)
    left = len(seqs)
    try:
        if body.echo:
            for i, seq in enumerate(seqs):
                choice = {"index": i, "text": served.tokenizer.decode(seq.prompt), "logprobs": None,
                          "finish_reason": None}
                yield _event({**head, "choices": [choice]})
        while left:
            seq, delta, n_logprobs, reason = await events.get()
            i = index[seq.id]
            logprobs = None
            if body.logprobs is not None:
                logprobs = _logprobs(seq, served.tokenizer, sent_logprobs[i], n_logprobs, False)
                sent_logprobs[i] = n_logprobs
            if delta or reason is not None or logprobs:
                yield _event({**head, "choices": [{"index": i, "text": delta, "logprobs": logprobs,
                                                   "finish_reason": reason}]})
            left -= reason is not None
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _event({**head, "choices": [], "usage": _usage(seqs)})
        yield "data: [DONE]\n\n"
    finally:
        if left:
            engine.cancel(seqs)


def _event(chunk: dict) -> str:
    return f"data: {json.dumps(chunk)}\n\n"


def _usage(seqs: List[Sequence]) -> dict:
    prompt = sum(len(s.prompt) for s in seqs)
    completion = sum(len(s.tokens) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs(seq: Sequence, tokenizer, start: int, stop: int, echo: bool) -> Optional[dict]:
    """OpenAI's completions ``logprobs`` object for generated tokens [start, stop) (prompt first if echoed)."""
    if seq.params.logprobs is None:
        return None
    entries = (seq.prompt_logprobs if echo else []) + seq.logprobs[start:stop]
    tokens = (seq.prompt if echo else []) + [e.token for e in seq.logprobs[start:stop]]
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token, entry in zip(tokens, entries):
        text = tokenizer.decode([token])
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(None if entry is None else entry.logprob)
        out["top_logprobs"].append(None if entry is None else {tokenizer.decode([t]): lp for t, lp in entry.top})
    return out


def _metrics(engine: Engine) -> str:
    """Prometheus text exposition of the engine's state and counters."""
    stats = engine.stats
    lines = []

    def metric(name, kind, help_text, samples):
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("ratplus_requests_running", "gauge", "Sequences in the cache pool (decoding or prefilling in chunks).",
           [("", engine.running)])
    metric("ratplus_requests_waiting", "gauge", "Sequences queued for a free cache row.", [("", len(engine.waiting))])
    used = [(f'{{pattern="{p}",state="used"}}', pool.used * pool.row_bytes) for p, pool in engine.pools.items()]
    free = [(f'{{pattern="{p}",state="free"}}', pool.free * pool.row_bytes) for p, pool in engine.pools.items()]
    metric("ratplus_cache_pool_bytes", "gauge", "Decode-cache pool bytes by pattern, used and free.", used + free)
    rows = [(f'{{pattern="{p}"}}', pool.rows) for p, pool in engine.pools.items()]
    metric("ratplus_cache_pool_rows", "gauge", "Sequences each pattern's pool holds at most.", rows)
    metric("ratplus_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", stats.prompt_tokens)])
    metric("ratplus_generation_tokens_total", "counter", "Tokens generated.", [("", stats.generation_tokens)])
    metric("ratplus_requests_finished_total", "counter", "Sequences retired, by finish reason.",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(stats.finished.items())])
    metric("ratplus_step_seconds", "summary", "Engine steps (admit, prefill, decode) and their time.",
           [("_sum", stats.step_seconds), ("_count", stats.steps)])
    return "\n".join(lines) + "\n"
