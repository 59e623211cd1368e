"""ratplus-serve: continuous batching over the sparse decode cache gives generate()'s tokens
whatever else is in the batch, and the OpenAI-compatible server answers the official client
and plain HTTP (streaming, stop strings, seeds, errors, queueing, disconnects, SIGTERM)."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import repo_env

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from megatron_ratplus import checkpoint  # noqa: E402
from megatron_ratplus.cli import generate as generate_cli  # noqa: E402
from megatron_ratplus.cli import serve as serve_cli  # noqa: E402
from megatron_ratplus.config import preset  # noqa: E402
from megatron_ratplus.convert.local import write_local  # noqa: E402
from megatron_ratplus.data.tokenizer import ByteTokenizer  # noqa: E402
from megatron_ratplus.inference import SamplingConfig, generate  # noqa: E402
from megatron_ratplus.model import build_model  # noqa: E402
from megatron_ratplus.serving.engine import Engine, QueueFull  # noqa: E402
from megatron_ratplus.serving.pool import PatternPool, row_bytes  # noqa: E402
from megatron_ratplus.serving.sequence import SamplingParams, Sequence  # noqa: E402

SEQ = 128  # --max-model-len of most servers here
TRAINED = 4096  # the checkpoint's seq_length: the longest --max-model-len it may serve
SPARSE = "dilated:4,w=3,p=2"  # past several dilation periods, windows and sinks within a few tokens
PATTERNS = ["dense", SPARSE]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, megatron_single):
    """A randomly initialised two-layer byte-level model (sharp distributions: no near-ties)."""
    torch.manual_seed(0)
    config = preset("tiny", num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=TRAINED,
                    vocab_size=384, real_vocab_size=257)
    state = {k: v.detach().clone() for k, v in build_model(config).state_dict().items()
             if not k.endswith("_extra_state")}
    state["embedding.word_embeddings.weight"].mul_(20.0)
    path = tmp_path_factory.mktemp("serve") / "tiny"
    write_local(state, checkpoint.model_meta(config), "byte", str(path), {"format": "test"})
    return str(path)


@pytest.fixture(scope="module")
def model(ckpt):
    return checkpoint.load_model(ckpt)[0]


def _engine(model, rows, max_num_seqs=8, max_waiting=64):
    pools = {p: PatternPool(model, p, rows, SEQ, torch.float32) for p in PATTERNS}
    return Engine(pools, max_num_seqs, max_waiting, max_prefill_tokens=64)


def _prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _reference(model, prompt, pattern, max_tokens):
    out = generate(model, [prompt], SamplingConfig(max_new_tokens=max_tokens, stop_tokens=[ByteTokenizer.eod]),
                   pattern=pattern)
    return out.tokens[0], out.finish_reasons[0]


def test_continuous_batching_equals_generate(model):
    """Sequences of two patterns join while others run, leave at their own lengths (rows move),
    and queue for 3 rows per pattern: each gets generate()'s greedy tokens for its prompt alone."""
    engine = _engine(model, rows=3, max_num_seqs=5)
    prompts = _prompts(10)
    seqs = [Sequence(p, SamplingParams(max_tokens=4 + 3 * (i % 4), temperature=0), PATTERNS[i % 2], ByteTokenizer(),
                     [ByteTokenizer.eod]) for i, p in enumerate(prompts)]
    engine.submit(seqs[:4])
    most_running, steps = 0, 0
    while not all(s.finished for s in seqs):
        if steps in (2, 5):  # join mid-way
            engine.submit(seqs[4:7] if steps == 2 else seqs[7:])
        engine.step()
        most_running, steps = max(most_running, engine.running), steps + 1
        assert all(pool.free >= 0 for pool in engine.pools.values()) and engine.running <= 5
        assert steps < 200
    assert most_running == 5  # max_num_seqs held sequences back, not just the rows
    for seq in seqs:
        tokens, reason = _reference(model, seq.prompt, seq.pattern, seq.params.max_tokens)
        assert seq.tokens == tokens and seq.finish_reason == reason, (seq.pattern, seq.params.max_tokens)
    engine.step()
    assert engine.running == 0 and engine.idle
    assert engine.stats.finished["length"] + engine.stats.finished["stop"] == len(seqs)


def test_chunked_prefill_interleaves_decode_and_equals_generate(model):
    """A prompt longer than --max-prefill-tokens is prefilled in chunks of at most that many
    tokens over several steps while another sequence keeps decoding (one token per step): both
    get generate()'s greedy tokens, and an echoed prompt's logprobs cover every chunk."""
    for pattern in PATTERNS:
        pools = {p: PatternPool(model, p, 2, SEQ, torch.float32) for p in PATTERNS}
        engine = Engine(pools, max_num_seqs=4, max_waiting=8, max_prefill_tokens=7)
        g = torch.Generator().manual_seed(9)
        short, long_prompt = torch.randint(0, 256, (5,), generator=g).tolist(), \
            torch.randint(0, 256, (61,), generator=g).tolist()  # 61 = 8 chunks of 7 and one of 5
        params = SamplingParams(max_tokens=20, temperature=0)
        running = Sequence(short, params, pattern, ByteTokenizer(), [])
        engine.submit([running])
        engine.step()
        chunked = Sequence(long_prompt, SamplingParams(max_tokens=6, temperature=0, logprobs=1, echo=True), pattern,
                           ByteTokenizer(), [])
        engine.submit([chunked])
        prefilled, decoded = [], []
        while not chunked.tokens:
            engine.step()
            prefilled.append(engine.stats.prompt_tokens - len(short))
            decoded.append(len(running.tokens))
        assert prefilled == [7 * i for i in range(1, 9)] + [61]  # one chunk per step, then the rest
        assert decoded == list(range(3, 3 + len(decoded)))  # the other sequence decoded between every chunk
        while not (chunked.finished and running.finished):
            engine.step()
        assert running.tokens == _reference(model, short, pattern, 20)[0]
        assert chunked.tokens == _reference(model, long_prompt, pattern, 6)[0], pattern
        assert len(chunked.prompt_logprobs) == 61 and chunked.prompt_logprobs[0] is None
        engine.step()
        assert engine.running == 0 and all(pool.free == 2 for pool in pools.values())


def test_seeded_sampling_ignores_batch(model):
    """A seeded sampled sequence draws the same tokens alone or beside other sequences."""
    def run(companions):
        engine = _engine(model, rows=4)
        params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=7)
        seq = Sequence(_prompts(1, seed=3)[0], params, SPARSE, ByteTokenizer(), [])
        others = [Sequence(p, SamplingParams(max_tokens=5, temperature=1.0), SPARSE, ByteTokenizer(), [])
                  for p in _prompts(companions, seed=4)]
        engine.submit(others + [seq])
        while not seq.finished:
            engine.step()
        return seq.tokens

    alone, crowded = run(0), run(3)
    assert alone == crowded and len(alone) == 12


def test_queue_limit(model):
    engine = _engine(model, rows=1, max_waiting=2)
    make = lambda: Sequence([1, 2, 3], SamplingParams(max_tokens=2), "dense", ByteTokenizer(), [])  # noqa: E731
    engine.submit([make(), make()])
    with pytest.raises(QueueFull):
        engine.submit([make()])


def test_stream_deltas_and_stop_strings():
    """Streamed deltas add up to the final text, never show a stop string or half a character."""
    tok = ByteTokenizer()
    text = "héllo wörld END tail"
    seq = Sequence([1], SamplingParams(max_tokens=100, stop=["END", "xyz"]), "dense", tok, [tok.eod])
    deltas = []
    for token in tok.encode(text):
        seq.add(token)
        deltas.append(seq.take_delta())
        assert "\ufffd" not in deltas[-1] and "EN" not in deltas[-1]
        if seq.finished:
            break
    assert seq.finish_reason == "stop" and seq.text == "héllo wörld " and "".join(deltas) == seq.text
    seq = Sequence([1], SamplingParams(max_tokens=3), "dense", tok, [tok.eod])
    for token in tok.encode("abcdef"):
        if not seq.finished:
            seq.add(token)
    assert seq.text == "abc" and seq.finish_reason == "length"


def test_engine_failure_ends_every_sequence(model):
    """A step that raises (a bug) ends waiting and running sequences with finish reason "error"
    and refuses new ones, instead of a dead engine thread leaving every client waiting forever."""
    engine = _engine(model, rows=2)
    failed = threading.Event()
    engine.on_failure = failed.set
    seqs = [Sequence(p, SamplingParams(max_tokens=8, temperature=0), "dense", ByteTokenizer(), [256])
            for p in _prompts(4)]

    def broken_step():
        raise RuntimeError("a bug in a step")

    engine.step = broken_step
    engine.submit(seqs)
    engine.start()
    assert failed.wait(60) and isinstance(engine.failure, RuntimeError)
    assert [s.finish_reason for s in seqs] == ["error"] * 4
    with pytest.raises(Exception, match="shutting down"):
        engine.submit([Sequence([1], SamplingParams(), "dense", ByteTokenizer(), [256])])
    engine.stop()


def test_sampling_extremes_stay_a_distribution():
    """top_p below float32's smallest number keeps the top token; a temperature past float32's
    range samples uniformly over the real vocabulary (the padded ids stay at -inf, not NaN)."""
    from megatron_ratplus.inference.generate import sample

    logits = torch.tensor([[3.0, 1.0, 2.0, float("-inf")]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, 1.0, 1e-300, g).tolist() == [0]
    drawn = {int(sample(logits, 1e300, 1.0, g)) for _ in range(200)}
    assert drawn == {0, 1, 2}


def test_bad_flags(ckpt, capsys, tmp_path):
    """Bad flags: one line on stderr, exit 2 (nothing listens)."""
    cases = [["--load", str(tmp_path / "missing")], ["--load", ckpt, "--patterns", "dilated:0"],
             ["--load", ckpt, "--max-num-seqs", "0"], ["--load", ckpt, "--cache-memory-gb", "1e-9"],
             ["--load", ckpt, "--patterns", "dense,dense"], ["--load", ckpt, "--max-model-len", str(TRAINED + 1)],
             ["--load", ckpt, "--host", "no such host"], ["--load", ckpt, "--dtype", "fp32", "--bf16"],
             ["--load", ckpt, "--served-model-name", " "],
             ["--load", ckpt, "--cache-memory-gb", "1e6", "--max-num-seqs", "100000000"]]  # far past host memory
    with socket.socket() as taken:  # a port in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve_cli.main(["--load", ckpt, "--port", str(taken.getsockname()[1])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot listen on 127.0.0.1" in err[0], err
    for argv in cases:
        assert serve_cli.main(argv + ["--port", str(_free_port())]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ratplus-serve: error: "), (argv, err)


# --- a real server process ----------------------------------------------------------------------

def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``ratplus-serve`` on 127.0.0.1 at a free port, stopped (killed if need be) on exit."""

    def __init__(self, ckpt, *flags, ranks=0):
        self.port = _free_port()
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks else []
        cmd = [sys.executable, *launch, "-m", "megatron_ratplus.cli.serve", "--load", ckpt, "--port", str(self.port),
               "--max-model-len", str(SEQ), *flags]
        self.proc = subprocess.Popen(cmd, env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)  # its own process group: torchrun's ranks too

    def __enter__(self):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            try:
                if self.get("/health")[0] == 200:
                    return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("ratplus-serve did not start")

    def __exit__(self, *exc):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started, whatever is left of it
        except ProcessLookupError:
            pass
        self.stderr = self.proc.communicate(timeout=30)[1]

    def request(self, method, path, body=None, raw=None, timeout=240):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (json.dumps(body) if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = resp.read().decode()
        conn.close()
        return resp.status, payload, resp

    def get(self, path):
        return self.request("GET", path)

    def post(self, body=None, raw=None):
        status, payload, resp = self.request("POST", "/v1/completions", body, raw)
        return status, json.loads(payload), resp

    def metrics(self):
        values = {}
        for line in self.get("/metrics")[1].splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=60)


def _settled(server, running=0, timeout=30):
    """/metrics once at most ``running`` sequences run (a response can reach its client a moment
    before the engine retires the row)."""
    deadline = time.monotonic() + timeout
    while (metrics := server.metrics())["ratplus_requests_running"] > running and time.monotonic() < deadline:
        time.sleep(0.05)
    return metrics


def _generate_cli(capsys, ckpt, prompt, pattern, max_tokens):
    assert generate_cli.main(["--load", ckpt, "--pattern", pattern, "--prompt", prompt,
                              "--max-new-tokens", str(max_tokens)]) == 0
    return capsys.readouterr().out[:-1]  # the prompt and its continuation, one print


@pytest.mark.integration
def test_server_openai_client(ckpt, capsys):
    """The openai client gets ratplus-generate's greedy text under either pattern; streaming
    equals non-streaming; stop strings cut; seeds reproduce; the listing, health and metrics."""
    pytest.importorskip("openai")
    prompts = ["The cat", "Once upon a time, far away"]
    expected = {(p, pat): _generate_cli(capsys, ckpt, p, pat, 24) for p in prompts for pat in PATTERNS}
    with Server(ckpt, "--patterns", ",".join(PATTERNS), "--max-num-seqs", "4") as server:
        client = server.client()
        models = client.models.list().data
        assert [m.id for m in models] == ["tiny"] and models[0].model_extra["attention_patterns"] == PATTERNS
        for pattern in PATTERNS:
            out = client.completions.create(model="tiny", prompt=prompts, max_tokens=24, temperature=0,
                                            extra_body={"attention_pattern": pattern})
            for choice in out.choices:
                assert prompts[choice.index] + choice.text == expected[(prompts[choice.index], pattern)]
            assert out.usage.prompt_tokens == sum(len(p.encode()) for p in prompts)
            assert out.usage.completion_tokens == sum(len(c.text.encode()) for c in out.choices)
            stream = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=24, temperature=0,
                                               stream=True, extra_body={"attention_pattern": pattern})
            chunks = list(stream)
            assert "".join(c.choices[0].text for c in chunks) == expected[(prompts[1], pattern)][len(prompts[1]):]
            assert chunks[-1].choices[0].finish_reason is not None
        default = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=24, temperature=0)
        assert prompts[0] + default.choices[0].text == expected[(prompts[0], PATTERNS[0])]

        full = expected[(prompts[1], SPARSE)][len(prompts[1]):]
        stop = full[5:8]
        cut = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=24, temperature=0, stop=[stop],
                                        extra_body={"attention_pattern": SPARSE})
        assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
        streamed = client.completions.create(model="tiny", prompt=prompts[1], max_tokens=24, temperature=0,
                                             stop=stop, stream=True, extra_body={"attention_pattern": SPARSE})
        assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text

        sampled = [client.completions.create(model="tiny", prompt=prompts[0], max_tokens=16, temperature=2.0, seed=s,
                                             extra_body={"top_k": 100}).choices[0].text for s in (11, 11, 12, 13, 14)]
        assert sampled[0] == sampled[1] and len(set(sampled)) > 1

        status, body, _ = server.post({"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "logprobs": 2,
                                       "echo": True})
        lp = body["choices"][0]["logprobs"]
        assert status == 200 and body["choices"][0]["text"].startswith("\x05\x06\x07")
        assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == 3 + 3
        assert all(max(top.values()) >= chosen - 1e-5 for top, chosen in zip(lp["top_logprobs"][1:],
                                                                              lp["token_logprobs"][1:]))
        status, text, resp = server.get("/metrics")
        assert status == 200 and "ratplus_cache_pool_bytes" in text
        metrics = _settled(server)
        assert metrics["ratplus_requests_running"] == 0 and metrics["ratplus_generation_tokens_total"] > 0
        assert metrics['ratplus_cache_pool_bytes{pattern="dense",state="used"}'] == 0


@pytest.mark.integration
def test_server_bad_requests_and_disconnect(ckpt):
    """Each bad request gets a 400 (404 for an unknown model) in OpenAI's error shape with one
    message (404 and 405 too, no request a 500); a client that drops a stream frees its row (seen in /metrics)."""
    with Server(ckpt, "--patterns", ",".join(PATTERNS)) as server:
        cases = [
            (None, "{not json"),
            ({"prompt": 5}, None),
            ({"prompt": "hi", "max_tokens": "ten"}, None),
            ({"prompt": "hi", "attention_pattern": "dilated:64"}, None),
            ({"prompt": "x" * SEQ}, None),
            ({"prompt": "hi", "max_tokens": SEQ}, None),
            ({"prompt": "hi", "temperature": -1}, None),
            ({"prompt": "hi", "top_p": 0}, None),
            ({"prompt": "hi", "n": 2}, None),
            ({"prompt": "", "max_tokens": 2}, None),
            ({"prompt": [1, 999]}, None),
            ({"prompt": "hi", "logprobs": 50}, None),
            # hostile values: a seed past torch's generator, lone surrogates, JSON's NaN, a body
            # the JSON parser gives up on, more prompts than the queue holds, OpenAI fields not
            # implemented (refused, not ignored), stream options without a stream or mistyped
            ({"prompt": "hi", "seed": 2**64}, None),
            (None, '{"prompt": "\\ud800abc"}'),
            (None, '{"prompt": "abc", "stop": ["\\udfff"]}'),
            (None, '{"prompt": "abc", "temperature": NaN}'),
            (None, '{"prompt": "abc", "top_p": Infinity}'),
            (None, '{"prompt": "hi", "max_tokens": ' + "9" * 5000 + '}'),
            (None, b'{"prompt": "caf\xe9"}'),
            ({"prompt": ["a"] * 257, "max_tokens": 1}, None),
            ({"prompt": [[1]] * 100_000, "max_tokens": 1}, None),
            ({"prompt": "hi", "logit_bias": {"5": 100}}, None),
            ({"prompt": "hi", "best_of": 3}, None),
            ({"prompt": "hi", "presence_penalty": 1.5}, None),
            ({"prompt": "hi", "stream_options": {"include_usage": True}}, None),
            ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}}, None),
        ]
        for body, raw in cases:
            status, payload, _ = server.post(body, raw)
            error = payload["error"]
            assert status == 400 and error["type"] == "invalid_request_error", (body, raw, payload)
            assert error["message"] and "\n" not in error["message"]
        status, payload, _ = server.post({"model": "other", "prompt": "hi"})
        assert status == 404 and payload["error"]["code"] == "model_not_found"
        for method, path, status in (("GET", "/v1/completions", 405), ("GET", "/v1/nothing", 404)):
            answer = server.request(method, path)
            assert answer[0] == status and json.loads(answer[1])["error"]["message"], answer[:2]
        neutral = {"best_of": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u"}
        status, payload, _ = server.post({"prompt": "hi", "max_tokens": 2, "seed": -1, **neutral})
        assert status == 200, payload
        for body in ({"top_p": 1e-300}, {"top_p": 1e-300, "temperature": 2.0}, {}):  # killed the engine thread
            status, payload, _ = server.post({"prompt": "hi", "max_tokens": 2, **body})
            assert status == 200, payload

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "abc", "max_tokens": SEQ - 8, "stream": True,
                                                             "temperature": 0}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            metrics = server.metrics()
            if metrics.get('ratplus_requests_finished_total{reason="cancelled"}') == 1:
                break
            time.sleep(0.1)
        assert metrics['ratplus_requests_finished_total{reason="cancelled"}'] == 1
        assert metrics["ratplus_requests_running"] == 0
        assert metrics["ratplus_generation_tokens_total"] < SEQ - 8
    assert "Traceback" not in server.stderr, server.stderr[-2000:]  # no request reached a 500


def _open_stream(server, body):
    """A streaming request left open (its first event read): the caller closes it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    return conn


@pytest.mark.integration
def test_server_chunked_prefill_equals_generate(ckpt, capsys):
    """With --max-prefill-tokens 8 a 90-token prompt is prefilled in 12 chunks while another
    request is decoding: its greedy text equals ratplus-generate's under either pattern."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 2
    expected = {pattern: _generate_cli(capsys, ckpt, prompt, pattern, 16) for pattern in PATTERNS}
    flags = ["--patterns", ",".join(PATTERNS), "--max-prefill-tokens", "8", "--max-model-len", "1024"]
    with Server(ckpt, *flags) as server:
        for pattern in PATTERNS:
            other = _open_stream(server, {"prompt": "abc", "max_tokens": 1000, "temperature": 0,
                                          "attention_pattern": pattern})
            before = server.metrics()["ratplus_generation_tokens_total"]
            status, body, _ = server.post({"prompt": prompt, "max_tokens": 16, "temperature": 0,
                                           "attention_pattern": pattern})
            assert status == 200 and prompt + body["choices"][0]["text"] == expected[pattern]
            metrics = _settled(server, running=1)
            assert metrics["ratplus_requests_running"] == 1  # the other request is still decoding
            assert metrics["ratplus_generation_tokens_total"] - before > 16 + 12  # and decoded between the chunks
            other.sock.shutdown(socket.SHUT_RDWR)
            other.close()
            assert _settled(server)["ratplus_requests_running"] == 0


@pytest.mark.integration
def test_server_cancels_dropped_non_streaming_request(ckpt):
    """A non-streaming request whose client closes the socket is cancelled: running sequences
    back to 0 and the pool's used bytes back to idle within seconds, long before its max_tokens."""
    with Server(ckpt, "--patterns", "dense", "--max-model-len", "4096") as server:
        idle = server.metrics()
        used = 'ratplus_cache_pool_bytes{pattern="dense",state="used"}'
        assert idle["ratplus_requests_running"] == 0 and idle[used] == 0
        body = json.dumps({"prompt": "abc", "max_tokens": 4000, "temperature": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while server.metrics()["ratplus_generation_tokens_total"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert server.metrics()[used] > 0
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        closed = time.monotonic()
        while (metrics := server.metrics())["ratplus_requests_running"] or metrics[used] != idle[used]:
            assert time.monotonic() - closed < 10, metrics
            time.sleep(0.05)
        assert metrics['ratplus_requests_finished_total{reason="cancelled"}'] == 1
        assert metrics["ratplus_generation_tokens_total"] < 4000
        assert metrics["ratplus_requests_waiting"] == 0


@pytest.mark.integration
def test_server_bf16_equals_generate_bf16(ckpt, model, capsys):
    """--bf16 (load_model's bf16 path: parameters, activations and decode cache): a greedy
    completion equals ratplus-generate --bf16 under either pattern; --dtype takes fp32 or bf16."""
    prompt = "Once upon a time"
    expected = {}
    for pattern in PATTERNS:
        assert generate_cli.main(["--load", ckpt, "--pattern", pattern, "--prompt", prompt, "--max-new-tokens", "20",
                                  "--bf16"]) == 0
        expected[pattern] = capsys.readouterr().out[:-1]
    assert serve_cli.main(["--load", ckpt, "--dtype", "fp16", "--port", str(_free_port())]) == 2
    assert "--dtype must be one of fp32, bf16" in capsys.readouterr().err
    with Server(ckpt, "--patterns", ",".join(PATTERNS), "--dtype", "bf16") as server:
        for pattern in PATTERNS:
            status, body, _ = server.post({"prompt": prompt, "max_tokens": 20, "temperature": 0,
                                           "attention_pattern": pattern})
            assert status == 200 and prompt + body["choices"][0]["text"] == expected[pattern], pattern
        metrics = _settled(server)
        for pattern in PATTERNS:  # bf16 key/value slots (the recurrent state stays fp32)
            rows = metrics[f'ratplus_cache_pool_rows{{pattern="{pattern}"}}']
            bf16, fp32 = (rows * row_bytes(model, pattern, SEQ, dtype) for dtype in (torch.bfloat16, torch.float32))
            assert metrics[f'ratplus_cache_pool_bytes{{pattern="{pattern}",state="free"}}'] == bf16 < fp32


@pytest.fixture(scope="module")
def export(ckpt, tmp_path_factory):
    """The checkpoint exported for Hugging Face (ratplus-convert --to hf)."""
    from megatron_ratplus.cli import convert as convert_cli

    path = str(tmp_path_factory.mktemp("export") / "tiny-hf")
    assert convert_cli.main(["--input", ckpt, "--output", path, "--to", "hf"]) == 0
    return path


@pytest.mark.integration
def test_server_loads_an_hf_export(ckpt, export, capsys):
    """--load of a Hugging Face export (ratplus-convert --to hf) serves the same greedy text as our
    checkpoint under either pattern; its name in the API is the export's folder."""
    capsys.readouterr()  # convert's "wrote ..."
    prompt = "Once upon a time"
    expected = {pattern: _generate_cli(capsys, ckpt, prompt, pattern, 20) for pattern in PATTERNS}
    assert {pattern: _generate_cli(capsys, export, prompt, pattern, 20) for pattern in PATTERNS} == expected
    with Server(export, "--patterns", ",".join(PATTERNS)) as server:
        for pattern in PATTERNS:
            status, body, _ = server.post({"prompt": prompt, "max_tokens": 20, "temperature": 0,
                                           "attention_pattern": pattern})
            assert status == 200 and prompt + body["choices"][0]["text"] == expected[pattern], pattern
            assert body["model"] == "tiny-hf"


@pytest.mark.integration
def test_server_burst_queues_then_sigterm_drains(ckpt):
    """A burst beyond the pool and queue: every admitted request completes, the rest get 429
    with Retry-After; SIGTERM then answers 503, lets the running request finish and exits 0."""
    with Server(ckpt, "--patterns", "dense", "--max-num-seqs", "2", "--max-waiting", "3") as server:
        results = [None] * 8

        def one(i):
            results[i] = server.post({"prompt": f"request {i}", "max_tokens": 30, "temperature": 0})

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        done = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 429]
        assert len(done) + len(refused) == 8 and len(done) >= 4 and refused  # >= 1 row taken + 3 queued
        assert all(len(r[1]["choices"][0]["text"].encode()) <= 30 and r[1]["usage"]["completion_tokens"] > 0
                   for r in done)
        assert all(int(r[2].getheader("Retry-After")) >= 1 and r[1]["error"]["code"] == "queue_full"
                   for r in refused)
        assert server.metrics()["ratplus_requests_waiting"] == 0

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "abc", "max_tokens": 100, "stream": True,
                                                             "temperature": 0}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, payload, resp503 = server.post({"prompt": "late", "max_tokens": 2})
        assert status == 503 and resp503.getheader("Retry-After") and payload["error"]["code"] == "shutting_down"
        rest = resp.read().decode()
        assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
        assert server.proc.wait(timeout=60) == 0


def test_server_second_signal_cuts_off_at_once(ckpt):
    """A second SIGTERM during a long drain cuts the running request off (a complete response,
    finish reason "length", fewer tokens than asked) and the server exits 0 without a traceback."""
    asked = TRAINED - 16
    with Server(ckpt, "--patterns", "dense", "--max-model-len", str(TRAINED), "--drain-timeout", "600") as server:
        result = {}
        client = threading.Thread(target=lambda: result.update(
            response=server.post({"prompt": "a long one", "max_tokens": asked, "temperature": 0})))
        client.start()
        deadline = time.monotonic() + 60
        while server.metrics()["ratplus_requests_running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        client.join(timeout=60)
        status, payload, _ = result["response"]
        assert status == 200 and payload["choices"][0]["finish_reason"] == "length"
        assert 0 < payload["usage"]["completion_tokens"] < asked
        assert "Traceback" not in server.proc.stderr.read()


@pytest.mark.integration
def test_server_tensor_parallel(ckpt, capsys):
    """Under torchrun with two ranks (gloo), rank 0 serves and the ranks split the heads: the
    greedy text of both patterns equals one process's ratplus-generate (the prompt prefilled in
    chunks, which the other rank replays); SIGTERM stops all ranks."""
    prompt = "Once upon a time"
    expected = {pattern: _generate_cli(capsys, ckpt, prompt, pattern, 20) for pattern in PATTERNS}
    with Server(ckpt, "--patterns", ",".join(PATTERNS), "--max-prefill-tokens", "5", ranks=2) as server:
        client = server.client()
        for pattern in PATTERNS:
            batch = client.completions.create(model="tiny", prompt=[prompt, "ab"], max_tokens=20, temperature=0,
                                              extra_body={"attention_pattern": pattern})
            assert prompt + batch.choices[0].text == expected[pattern]
        os.kill(_rank_zero(server.proc.pid), signal.SIGTERM)  # as a scheduler stopping the server's rank
        assert server.proc.wait(timeout=120) == 0  # rank 0 drained and stopped rank 1: torchrun saw both succeed


@pytest.mark.integration
def test_server_refuses_an_hf_export_under_tensor_parallelism(export):
    """An HF export holds whole weights: under torchrun every rank refuses it in one line naming
    the conversion to run, and exits 2 before building anything."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "megatron_ratplus.cli.serve", "--load", export, "--port", "0"]
    proc = subprocess.run(cmd, env=repo_env(), capture_output=True, text=True, timeout=180)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("ratplus-serve:")]
    expected = (f"ratplus-serve: error: {export} is a Hugging Face export, which loads on one rank; for tensor "
                f"parallelism convert it first: ratplus-convert --input {export} --output CKPT")
    # one line per rank that got there before torchrun stopped the other on the first failure
    assert ours and set(ours) == {expected} and "megatron_ratplus/" not in proc.stderr, proc.stderr  # no traceback of ours
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr  # torchrun's report of the failed rank


def _rank_zero(torchrun_pid):
    """The pid of the rank-0 worker among torchrun's children (RANK in its environment)."""
    with open(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children") as f:
        for pid in f.read().split():
            with open(f"/proc/{pid}/environ", "rb") as env:
                if b"RANK=0" in env.read().split(b"\0"):
                    return int(pid)
    raise LookupError("no rank-0 worker under torchrun")
