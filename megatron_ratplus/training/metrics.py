"""Training metrics: TensorBoard scalars, a console progress bar with ETA, a closing summary line."""

from __future__ import annotations

import sys
from typing import Dict, Optional

import torch.distributed as dist


def _is_last_rank() -> bool:
    """Losses live on the last pipeline stage; the last rank reports them."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


class Metrics:
    def __init__(self, log_dir: Optional[str], total_iters: int, start_iter: int, progress_bar: bool = True):
        self.enabled = _is_last_rank()
        self.writer = None
        if self.enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir)
        self.bar = None
        if self.enabled and progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", file=sys.stderr,
                            dynamic_ncols=True, desc="pretrain")

    def log(self, iteration: int, scalars: Dict[str, float]) -> None:
        """Record one iteration's scalars (losses, lr, grad norm, tokens/s...)."""
        if not self.enabled:
            return
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, iteration)
        if self.bar is not None:
            shown = {k.split("/")[-1]: f"{v:.3f}" for k, v in scalars.items() if "loss" in k}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self, summary: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        print(summary)
