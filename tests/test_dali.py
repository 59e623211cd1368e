"""--dataloader-type dali without DALI is one line (exit 2); the DALI feed is the plain loader's order."""

from argparse import Namespace

import numpy as np
import pytest
import torch

from megatron_ratplus import optional
from megatron_ratplus.cli import run_cli
from megatron_ratplus.data.dali import KEYS, MicrobatchFeed, dali_batches
from megatron_ratplus.data.datasets import TokenWindows
from megatron_ratplus.errors import UserError


@pytest.mark.skipif(optional.have("nvidia.dali") and torch.cuda.is_available(), reason="DALI is usable here")
def test_dali_without_the_package_or_a_gpu_is_one_line_exit_2(capsys):
    with pytest.raises(UserError):
        dali_batches(None, 0, 8, 1)  # refused before anything is built
    assert run_cli("ratplus-pretrain", lambda: dali_batches(None, 0, 8, 1)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ratplus-pretrain: error: --dataloader-type dali needs ")


def test_feed_hands_out_the_plain_loaders_microbatches_in_order(megatron_single):
    from megatron_ratplus.training.loop import BatchSource

    tokens = np.random.default_rng(0).integers(0, 300, 2000).astype(np.uint16)
    source = BatchSource(TokenWindows(tokens, 16), Namespace(micro_batch_size=2), shuffle=True, seed=5)
    consumed, global_batch, iterations = 8, 6, 3
    feed = MicrobatchFeed(source, consumed, global_batch, iterations)
    assert feed.per_iteration == 3
    index = 0
    for iteration in range(iterations):
        want = source.microbatches(consumed + iteration * global_batch, global_batch)
        for micro in want:
            info = Namespace(iteration=index) if index % 2 else index  # a BatchInfo, or a bare index
            got = feed(info)
            for key, array in zip(KEYS, got):
                assert array.dtype == micro[key].numpy().dtype
                np.testing.assert_array_equal(array, micro[key].numpy())
            index += 1
    with pytest.raises(StopIteration):
        feed(index)
