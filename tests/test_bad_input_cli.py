"""Bad input through the real console scripts and tools, each case its own process, as a user
runs them: whatever an entry point prints at import time (megatron's warnings, lm-eval's INFO
lines, an "Exception ignored" at exit) is seen here. Every case must exit as stated with one
line on stderr and nothing on stdout, and the workspace must be unchanged (files and folders).

Cases by class (docs/DESIGN.md §10): typed values, user files, sizes before allocating, output
paths, one line per entry point, silently accepted state, lossy conversion. The cases run two at
a time (one module fixture), then one test per case checks its result.
"""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import repo_env
from test_bad_input import P, snapshot, workspace, write_int32_dataset  # noqa: F401  (workspace: fixture)
from test_convert import authors_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"pretrain": ["ratplus-pretrain"], "eval": ["ratplus-eval"], "generate": ["ratplus-generate"],
            "convert": ["ratplus-convert"], "lm-eval": ["ratplus-lm-eval"], "estimate": [sys.executable, os.path.join(REPO, "tools", "estimate.py")],
            "preprocess": [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py")],
            **{f"bench_{name}": [sys.executable, os.path.join(REPO, "tools", f"bench_{name}.py")]
               for name in ("train", "decode", "serve", "ops")}}
PROGS = {"estimate": "estimate.py", "preprocess": "preprocess_data.py",
         **{f"bench_{name}": f"bench_{name}.py" for name in ("train", "decode", "serve", "ops")}}
QUICK = ["--train-iters", "1", "--eval-iters", "1", "--eval-interval", "0", "--no-progress-bar",
         "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
         "--micro-batch-size", "2", "--global-batch-size", "2"]
G = ["--load", "{W}/ck", "--prompt", "a"]
A = ["--input", "{W}/authors.pt", "--output", "{W}/conv"]
HF = {"model_type": "ratplus", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
      "intermediate_size": 128, "max_position_embeddings": 32, "vocab_size": 384, "real_vocab_size": 257,
      "recurrence": True}

# (id, entry point, argv with {W} = the workspace, exit status)
BAD = [
    # typed values: finite, in range, plain digits, on every parser and in YAML
    ("lr_inf", "pretrain", P + ["--lr", "inf"], 2),
    ("adam_eps_nan", "pretrain", P + ["--adam-eps", "nan"], 2),
    ("clip_grad_overflow", "pretrain", P + ["--clip-grad", "1e999"], 2),
    ("exit_duration_nan", "pretrain", P + ["--exit-duration-in-mins", "nan"], 2),
    ("num_layers_underscore", "pretrain", P + ["--num-layers", "1_6"], 2),
    ("train_iters_float", "pretrain", P + ["--train-iters", "2.0"], 2),
    ("yaml_lr_inf", "pretrain", P + ["--config", "{W}/lr_inf.yaml"], 2),
    ("yaml_adam_eps_nan", "pretrain", P + ["--config", "{W}/eps_nan.yaml"], 2),
    ("yaml_duplicate_key", "pretrain", P + ["--config", "{W}/duplicate.yaml"], 2),
    ("yaml_latin1", "pretrain", P + ["--config", "{W}/latin1.yaml"], 2),
    ("generate_temperature_nan", "generate", G + ["--temperature", "nan"], 2),
    ("generate_temperature_inf", "generate", G + ["--temperature", "inf"], 2),
    ("generate_top_p_nan", "generate", G + ["--top-p", "nan"], 2),
    ("generate_max_length_0", "generate", G + ["--max-length", "0"], 2),
    ("generate_max_new_tokens_exponent", "generate", G + ["--max-new-tokens", "2e9"], 2),
    ("generate_seed_past_generator", "generate", G + ["--seed", str(2**64)], 2),
    ("generate_prompt_not_utf8", "generate", ["--load", "{W}/ck", "--prompt", "caf\udcff"], 2),
    ("generate_stop_not_utf8", "generate", G + ["--stop", "\udcfe"], 2),
    ("generate_stop_truncated_escape", "generate", G + ["--stop", "\\x"], 2),
    ("generate_stop_unknown_escape", "generate", G + ["--stop", "\\q"], 2),
    ("generate_pattern_dilation_past_int64", "generate", G + ["--pattern", "dilated:9223372036854775807"], 2),
    ("generate_pattern_window_huge", "generate", G + ["--pattern", "local:w=99999999999999999999"], 2),
    ("generate_pattern_topk_block_huge", "generate", G + ["--pattern", "topk:k=2,block=99999999999999999999"], 2),
    ("convert_seq_length_negative", "convert", A + ["--seq-length", "-5"], 2),
    ("convert_heads_0", "convert", A + ["--num-attention-heads", "0"], 2),
    ("convert_pretrain_lr_negative", "convert", A + ["--pretrain-lr", "-1"], 2),
    ("eval_search_budget_nan", "eval", ["--load", "{W}/ck", "--search-budget", "nan"], 2),
    ("eval_ruler_samples_0", "eval", ["--load", "{W}/ck", "--ruler-tasks", "vt", "--ruler-samples", "0"], 2),
    ("eval_buckets_underscore", "eval", ["--load", "{W}/ck", "--longbench-buckets", "1_000"], 2),
    ("estimate_mfu_0", "estimate", ["--train-iters", "1", "--mfu", "0"], 2),
    ("estimate_micro_batch_0", "estimate", ["--train-iters", "1", "--micro-batch-size", "0"], 2),
    ("estimate_train_iters_negative", "estimate", ["--train-iters", "-3"], 2),
    ("estimate_peak_tflops_inf", "estimate", ["--train-iters", "1", "--peak-tflops", "inf"], 2),
    ("estimate_num_layers_0", "estimate", ["--train-iters", "1", "--num-layers", "0"], 2),
    ("preprocess_workers_underscore", "preprocess", ["--input", "{W}/text.jsonl", "--output-prefix", "{W}/pre",
                                                     "--workers", "1_0"], 2),
    ("pretrain_seed_past_32_bits", "pretrain", P + ["--seed", "1099511627776"], 2),
    ("estimate_iters_and_tokens", "estimate", ["--train-iters", "10", "--train-tokens", "1000000"], 2),
    ("estimate_bf16_and_fp32", "estimate", ["--train-iters", "10", "--bf16", "--fp32"], 2),
    ("estimate_tp_over_heads", "estimate", ["--train-iters", "10", "--tensor-model-parallel-size", "1024",
                                            "--gpus", "1024"], 2),
    ("bench_train_repeats_0", "bench_train", ["--repeats", "0"], 2),
    ("bench_decode_context_negative", "bench_decode", ["--context", "-5"], 2),
    ("bench_serve_rate_inf", "bench_serve", ["--rate", "inf"], 2),
    ("lm_eval_batch_size_0", "lm-eval", ["--model", "ratplus", "--model_args", "load={W}/ck,batch_size=0",
                                         "--tasks", "piqa"], 2),
    ("lm_eval_max_length_nan", "lm-eval", ["--model", "ratplus", "--model_args=load={W}/ck,max_length=nan",
                                           "--tasks", "piqa"], 2),
    ("lm_eval_truncate_not_a_truth_value", "lm-eval", ["--model", "ratplus", "--model_args",
                                                        "load={W}/ck,truncate=maybe", "--tasks", "piqa"], 2),
    ("lm_eval_device_in_model_args", "lm-eval", ["--model", "ratplus", "--model_args", "load={W}/ck,device=cpu",
                                                 "--tasks", "piqa"], 2),
    ("lm_eval_load_missing", "lm-eval", ["--model", "ratplus", "--model_args", "load={W}/none", "--tasks", "piqa"], 2),
    ("lm_eval_pattern_bad", "lm-eval", ["--model", "ratplus", "--model_args", "load={W}/ck,pattern=dilated:1_6",
                                        "--tasks", "piqa"], 2),
    # user files: encoding and structure, one line naming the file
    ("generate_prompt_file_latin1", "generate", ["--load", "{W}/ck", "--prompt-file", "{W}/latin1.txt"], 2),
    ("generate_prompt_file_device", "generate", ["--load", "{W}/ck", "--prompt-file", "{W}/zero.txt"], 2),
    ("convert_hf_config_list", "convert", ["--input", "{W}/hf_list", "--output", "{W}/conv"], 2),
    ("convert_hf_config_string_layers", "convert", ["--input", "{W}/hf_str", "--output", "{W}/conv"], 2),
    ("convert_hf_config_latin1", "convert", ["--input", "{W}/hf_latin1", "--output", "{W}/conv"], 2),
    ("convert_hf_index_not_json", "convert", ["--input", "{W}/hf_index", "--output", "{W}/conv"], 2),
    ("convert_empty_authors_file", "convert", ["--input", "{W}/empty.pt", "--output", "{W}/conv"], 2),
    ("convert_authors_embedding_1d", "convert", ["--input", "{W}/authors_1d.pt", "--output", "{W}/conv"], 2),
    ("convert_hf_max_position_0", "convert", ["--input", "{W}/hf_seq0", "--output", "{W}/conv"], 2),
    ("convert_hf_real_vocab_past_rows", "convert", ["--input", "{W}/hf_real_big", "--output", "{W}/conv"], 2),
    ("convert_meta_float_heads", "convert", ["--input", "{W}/meta_float_heads", "--output", "{W}/conv",
                                             "--to", "hf"], 2),
    ("resume_meta_lr_string", "pretrain", ["--save", "{W}/meta_lr_str", "--load", "{W}/meta_lr_str"], 2),
    # sizes checked before allocating
    ("data_train_iters_huge", "pretrain", P + ["--data-path", "{W}/docs", "--train-iters", "1000000000000"], 2),
    ("data_eval_iters_huge", "pretrain", P + ["--data-path", "{W}/docs", "--eval-iters", "1000000000000"], 2),
    ("preprocess_workers_past_cores", "preprocess", ["--input", "{W}/text.jsonl", "--output-prefix", "{W}/pre",
                                                     "--workers", "100000"], 2),
    ("preprocess_partitions_past_open_files", "preprocess", ["--input", "{W}/text.jsonl", "--output-prefix",
                                                             "{W}/pre", "--partitions", "1000000"], 2),
    ("pretrain_hidden_huge", "pretrain", ["--save", "{W}/new_run", *QUICK[:6], "--hidden-size", "65536"], 2),
    ("pretrain_layers_huge", "pretrain", ["--save", "{W}/new_run", *QUICK[:6], "--num-layers", "100000",
                                          "--hidden-size", "256", "--num-attention-heads", "2"], 2),
    ("pattern_count_huge", "pretrain", P + ["--no-joint-training", "--attention-pattern", "3000000000*dense"], 2),
    ("generate_max_length_past_trained", "generate", G + ["--max-length", "1000"], 2),
    ("convert_hf_layers_huge", "convert", ["--input", "{W}/hf_huge", "--output", "{W}/conv"], 2),
    # output paths checked before the work
    ("eval_table_is_directory", "eval", ["--load", "{W}/ck", "--table", "{W}/table_dir.csv"], 2),
    ("pretrain_tensorboard_under_file", "pretrain", P + ["--tensorboard-dir", "{W}/a_file/tb"], 2),
    ("pretrain_tensorboard_uncreatable", "pretrain", P + ["--tensorboard-dir", "/proc/ratplus-tb"], 2),
    ("convert_max_shard_size_0", "convert", ["--input", "{W}/ck", "--output", "{W}/conv", "--to", "hf",
                                             "--max-shard-size", "0"], 2),
    ("convert_output_inside_input", "convert", ["--input", "{W}/ck", "--output", "{W}/ck/iter_0000099",
                                                "--to", "hf"], 2),
    ("preprocess_input_is_a_directory", "preprocess", ["--input", "{W}", "--output-prefix", "{W}/pre"], 2),
    ("preprocess_refused_makes_no_folder", "preprocess", ["--input", "{W}/empty.jsonl", "--output-prefix",
                                                          "{W}/made/sub/pre"], 2),
    ("bench_ops_json_is_directory", "bench_ops", ["--json", "{W}/table_dir.csv"], 2),
    # one line even where megatron's dataset would print "Exception ignored" when freed
    ("data_zero_byte_idx", "pretrain", P + ["--data-path", "{W}/zero_idx"], 2),
    ("data_empty_dataset", "pretrain", P + ["--data-path", "{W}/no_docs"], 2),
    ("data_bad_header", "pretrain", P + ["--data-path", "{W}/bad_header"], 2),
    # silently accepted state
    ("pattern_underscore_dilation", "pretrain", P + ["--no-joint-training", "--attention-pattern", "dilated:1_6"], 2),
    ("latest_marker_outside", "eval", ["--load", "{W}/marker_outside"], 2),
    ("data_ids_beyond_vocab", "pretrain", P + ["--data-path", "{W}/big_ids"], 2),
    ("convert_heads_flag_for_ours", "convert", ["--input", "{W}/ck", "--output", "{W}/conv", "--to", "hf",
                                                "--num-attention-heads", "2"], 2),
    ("convert_shard_size_for_authors", "convert", ["--input", "{W}/ck", "--output", "{W}/conv.pt", "--to", "authors",
                                                   "--max-shard-size", "1KB"], 2),
    ("convert_pattern_for_ours", "convert", A + ["--attention-pattern", "dilated:4"], 2),
    ("preprocess_input_twice", "preprocess", ["--input", "{W}/text.jsonl", "{W}/../{B}/text.jsonl",
                                              "--output-prefix", "{W}/pre"], 2),
    ("preprocess_file_and_model", "preprocess", ["--input", "{W}/text.jsonl", "--output-prefix", "{W}/pre",
                                                 "--tokenizer-file", "{W}/tok.json", "--tokenizer-model", "{W}/tok.json"], 2),
    # lossy conversion
    ("convert_hf_int64_tensor", "convert", ["--input", "{W}/hf_int64", "--output", "{W}/conv"], 2),
    ("convert_hf_garbage_tokenizer", "convert", ["--input", "{W}/hf_bad_tokenizer", "--output", "{W}/conv"], 2),
    ("convert_more_embeddings_than_byte_tokenizer", "convert", ["--input", "{W}/authors300.pt",
                                                                 "--output", "{W}/conv"], 2),
]


def _prepare(root):
    """The files the cases name, beside test_bad_input's workspace."""
    (root / "lr_inf.yaml").write_text("lr: .inf\n")
    (root / "eps_nan.yaml").write_text("adam_eps: .nan\n")
    (root / "duplicate.yaml").write_text("lr: 1.0e-2\nmicro_batch_size: 2\nlr: 1.0e-3\n")
    (root / "latin1.yaml").write_bytes("lr: 1.0e-2  # caf\xe9\n".encode("latin-1"))
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    os.symlink("/dev/zero", root / "zero.txt")  # reads without end
    (root / "table_dir.csv").mkdir()
    for name, config in (("hf_list", [HF]), ("hf_str", {**HF, "num_hidden_layers": "1"}),
                         ("hf_huge", {**HF, "num_hidden_layers": 300_000_000}), ("hf_index", HF)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "hf_latin1").mkdir()
    (root / "hf_latin1" / "config.json").write_bytes('{"model_type": "ratplus\xe9"}'.encode("latin-1"))
    (root / "hf_index" / "model.safetensors.index.json").write_text("{weight_map: nope")
    (root / "zero_idx.bin").write_bytes(b"")
    (root / "zero_idx.idx").write_bytes(b"")
    (root / "bad_header.bin").write_bytes(b"\0" * 8)
    (root / "bad_header.idx").write_bytes(b"NOTANIDX" * 8)
    write_int32_dataset(str(root / "no_docs"), [])
    write_int32_dataset(str(root / "big_ids"), [[5, 6, 100000, 7] * 20])
    outside = root / "marker_outside"
    shutil.copytree(root / "ck", outside, ignore=shutil.ignore_patterns(".lock", "tensorboard", "iter_*"))
    (outside / "latest").write_text("../ck/iter_0000002")
    state = authors_state()
    state["embedding.wte.weight"] = state["head.lm_head.weight"] = torch.randn(300, state["backbone.ln.weight"].numel())
    torch.save({"task": state}, root / "authors300.pt")
    (root / "empty.pt").write_bytes(b"")
    torch.save({"task": {**state, "embedding.wte.weight": torch.randn(300)}}, root / "authors_1d.pt")
    for name, config in (("hf_seq0", {**HF, "max_position_embeddings": 0}), ("hf_real_big", {**HF, "real_vocab_size": 1000})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    for name, change in (("meta_float_heads", lambda m: m["model"].update(num_attention_heads=2.0)),
                         ("meta_lr_str", lambda m: m["args"].update(lr="0.01"))):
        shutil.copytree(root / "ck", root / name, ignore=shutil.ignore_patterns(".lock", "tensorboard", "iter_0000001"))
        meta = json.loads((root / name / "iter_0000002" / "ratplus.json").read_text())
        change(meta)
        (root / name / "iter_0000002" / "ratplus.json").write_text(json.dumps(meta))
    write_int32_dataset(str(root / "docs"), [[5, 6, 7, 8] * 20] * 100)
    (root / "tok.json").write_text("{}")
    _hf_dirs(root)


def _hf_dirs(root):
    """HF directories with every tensor in place but one int64 tensor, or a tokenizer.json that is garbage."""
    from safetensors.torch import save_file

    from megatron_ratplus.convert.hf import local_to_hf_names
    from megatron_ratplus.convert.local import expected_shapes, model_config

    shape = {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "ffn_hidden_size": 128,
             "seq_length": 32, "vocab_size": 384, "real_vocab_size": 257, "recurrence": True}
    config = model_config({**shape, "attention_pattern": "dense"})
    names = local_to_hf_names(config.num_layers)
    tensors = {names[k]: torch.randn(s) for k, s in expected_shapes(config).items()}
    for name, change in (("hf_int64", True), ("hf_bad_tokenizer", False)):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(HF))
        first = sorted(tensors)[0]
        save_file({**tensors, first: tensors[first].long()} if change else tensors,
                  str(root / name / "model.safetensors"))
    (root / "hf_bad_tokenizer" / "tokenizer.json").write_text('{"model": garbage')


def _tree(root):
    folders = {os.path.relpath(d, root) for d, _, _ in os.walk(root)}
    return snapshot(root), folders


def _run(cli, argv, root):
    if cli == "pretrain":  # a quick run, should a case not be refused
        argv = argv + [word for flag, value in zip(QUICK[:6:2], QUICK[1:6:2]) if flag not in argv
                       for word in (flag, value)] + ["--no-progress-bar"]
    started = time.monotonic()
    words = [a.replace("{W}", str(root)).replace("{B}", root.name) for a in argv]  # {B}: the workspace's name
    result = subprocess.run(COMMANDS[cli] + words, cwd=str(root), env=repo_env(), capture_output=True, text=True,
                            timeout=600)
    return result, time.monotonic() - started


@pytest.fixture(scope="module")
def results(workspace):  # noqa: F811
    _prepare(workspace)
    before = _tree(workspace)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_run, cli, argv, workspace) for name, cli, argv, _ in BAD}
        done = {name: future.result() for name, future in futures.items()}
    return done, before, _tree(workspace)


@pytest.mark.parametrize("name,cli,argv,status", BAD, ids=[case[0] for case in BAD])
def test_bad_input_through_the_console_script(results, name, cli, argv, status):
    result, _seconds = results[0][name]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    prog = PROGS.get(cli, f"ratplus-{cli}")
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr[-2000:]
    assert result.stdout == "" and "Traceback" not in result.stderr


def test_nothing_written_nothing_removed(results):
    _, before, after = results
    assert after == before


def test_tiny_temperature_samples_the_best_token(workspace):  # noqa: F811
    """--temperature 1e-45 is legal: the same text as greedy decoding, no overflow to NaN."""
    outputs = []
    for temperature in ("0", "1e-45"):
        result = subprocess.run(["ratplus-generate", "--load", str(workspace / "ck"), "--prompt", "ab",
                                 "--max-new-tokens", "4", "--temperature", temperature, "--seed", "1"],
                                env=repo_env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]


def test_lm_eval_task_data_missing_offline(workspace, tmp_path):  # noqa: F811
    """A task whose data lm-eval cannot download (offline, empty cache) ends in one error line
    saying so and exit 2, after lm-eval's own progress log; no traceback."""
    env = {**repo_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(COMMANDS["lm-eval"] + ["--model", "ratplus", "--model_args", f"load={workspace / 'ck'}",
                                                   "--tasks", "piqa", "--limit", "1"],
                            env=env, capture_output=True, text=True, timeout=600)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("ratplus-lm-eval: error: Couldn't reach") and "piqa" in last and "HF_HOME" in last


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sig,status,word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_preprocess_stops_on_a_signal_without_debris(tmp_path, sig, status, word, workers):
    """Ctrl-C (to the whole process group, as a terminal sends it) or SIGTERM in the middle of a
    preprocess, in one process or with 2 workers: one line, the signal's status within a bounded
    time, no output, no temporary file and not the folder the run made; then a later run clears
    a dead writer's temporary file and succeeds."""
    corpus = tmp_path / "big.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(300_000):
            f.write(json.dumps({"text": f"document {i} " + "lorem ipsum dolor sit amet " * 4}) + "\n")
    prefix = tmp_path / "out" / "pre"
    proc = subprocess.Popen(COMMANDS["preprocess"] + ["--input", str(corpus), "--output-prefix", str(prefix),
                                                      "--workers", str(workers), "--no-progress-bar"],
                            env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(p.name.startswith("pre.bin.tmp-") for p in (tmp_path / "out").glob("*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.01)  # signalled at once: with workers, while the pool starts (a lost Ctrl-C was seen there)
    assert proc.poll() is None, "the run finished before the signal: give it a larger input"
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("preprocess hung after the signal")
    lines = err.strip().splitlines()
    assert proc.returncode == status and len(lines) == 1 and word in lines[0], err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err
    assert not (tmp_path / "out").exists()  # the folder this run made is gone with its temporary files
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / "pre.bin.tmp-999999999"  # a writer that no longer runs
    stale.write_bytes(b"debris")
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "hello"}\n')
    result = subprocess.run(COMMANDS["preprocess"] + ["--input", str(small), "--output-prefix", str(prefix)],
                            env=repo_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["pre.bin", "pre.idx"]
