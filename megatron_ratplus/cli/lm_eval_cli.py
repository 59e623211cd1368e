"""ratplus-lm-eval: lm-evaluation-harness's own command line with the ``ratplus`` model registered.

    ratplus-lm-eval --model ratplus --model_args load=CKPT,pattern=dilated:16,w=256,p=4 \\
        --tasks piqa,hellaswag --batch_size 16   (lm-eval's own flag; its default is 1)
    torchrun --nproc-per-node 2 -m megatron_ratplus.cli.lm_eval_cli --model ratplus --model_args load=CKPT ...

lm-eval 0.4 looks models up in its own registry only (no plugin entry points), so plain
``lm_eval --model ratplus`` cannot find an outside model; this wrapper imports the adapter
(which registers it) and hands every argument to lm-eval unchanged. Under torchrun the model
is split tensor-parallel over the ranks; results are written by local rank 0.
"""

import sys

from megatron_ratplus.cli import run_cli
from megatron_ratplus.optional import require


def _run(argv) -> None:
    require("lm_eval", "ratplus-lm-eval")
    from megatron_ratplus.evaluation.errors import DatasetMissingError
    from megatron_ratplus.evaluation.harness import OFFLINE_HINT
    from megatron_ratplus.evaluation.lm_eval_model import check_model_args  # registers "ratplus"
    from lm_eval.__main__ import cli_evaluate

    words = [w for arg in argv for w in (arg.split("=", 1) if arg.startswith("--model") and "=" in arg else [arg])]
    model = words[words.index("--model") + 1] if "--model" in words[:-1] else None
    if model == "ratplus":
        check_model_args(words[words.index("--model_args") + 1] if "--model_args" in words[:-1] else "")

    sys.argv = ["ratplus-lm-eval"] + list(argv)
    try:
        cli_evaluate()
    except ConnectionError as err:  # datasets' "Couldn't reach ... on the Hub": a task's data is missing offline
        raise DatasetMissingError(f"{err}; {OFFLINE_HINT}") from None


def main(argv=None) -> int:
    return run_cli("ratplus-lm-eval", lambda: _run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
