"""When to stop a run early with a checkpoint: Megatron-LM's --exit-signal-handler,
--exit-duration-in-mins and --exit-interval.

A cluster ends jobs at a time limit or on preemption; SLURM can warn first with a signal
(``sbatch --signal=B:USR1@600``; examples/slurm/common.sh passes it to every rank). With
``--exit-signal-handler`` SIGTERM and SIGUSR1 only set a flag: the loop finishes the iteration,
saves a checkpoint and returns, so the process exits 0 and a requeued job resumes through
``--load SAVE --save SAVE``. Ranks agree before stopping (one small all-reduce per iteration,
only when a condition is enabled), because a signal may reach some ranks an iteration later
than others and every rank must take part in the save. Further signals change nothing, as in
Megatron-LM: a cluster may deliver one request more than once (a SIGTERM at the time limit
while the SIGUSR1 save runs), and the save is worth finishing within the grace time. SIGINT
(Ctrl-C) and SIGKILL still stop a run at once.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_ratplus import distributed

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class ExitConditions:
    """A context that, while entered, catches the exit signals (if asked); ``reason(iteration)``
    says why the run should stop after that iteration, the same on every rank, or None."""

    def __init__(self, signal_handler: bool = False, duration_mins: Optional[float] = None,
                 interval: Optional[int] = None, start_time: Optional[float] = None):
        self.signal_handler, self.duration_mins, self.interval = signal_handler, duration_mins, interval
        self.start_time = time.time() if start_time is None else start_time
        self.received: Optional[str] = None
        self._previous = {}

    @classmethod
    def from_config(cls, config) -> "ExitConditions":
        return cls(config.exit_signal_handler, config.exit_duration_in_mins, config.exit_interval)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:  # the first request names the reason; repeats are the same request
            self.received = signal.Signals(signum).name

    def __enter__(self) -> "ExitConditions":
        if self.signal_handler:
            for sig in EXIT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def reason(self, iteration: int) -> Optional[str]:
        if not (self.signal_handler or self.duration_mins or self.interval):
            return None
        flags = torch.tensor([
            self.received is not None,
            bool(self.duration_mins) and time.time() - self.start_time >= 60 * self.duration_mins,
            bool(self.interval) and iteration % self.interval == 0,
        ], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = flags.to(distributed.device())  # NCCL reduces CUDA tensors, gloo CPU ones
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, out_of_time, at_interval = flags.tolist()
        if signalled:
            return f"received {self.received or 'an exit signal on another rank'}"
        if out_of_time:
            return f"--exit-duration-in-mins {self.duration_mins:g} reached"
        if at_interval:
            return f"--exit-interval {self.interval} reached"
        return None


__all__ = ["ExitConditions", "EXIT_SIGNALS"]
