"""uvicorn's server with the drain a model server needs on SIGTERM (or Ctrl-C).

The first signal stops admitting (the API answers 503), gives running and queued requests up
to ``drain_timeout`` seconds, cuts off the rest (finish reason "length") and exits 0; uvicorn's
own handler would re-raise the signal after its shutdown. A second signal cuts off the rest at
once and exits 0 (left running, they would outlive uvicorn's graceful shutdown as 500s). An
engine that failed (a bug in a step) stops the server the same way, without the wait.
"""

from __future__ import annotations

import threading
import time

import uvicorn

from megatron_ratplus.serving.engine import Engine


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float):
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout

    def handle_exit(self, sig, frame) -> None:
        if self.engine.draining:  # a second signal: cut off what is running and exit now
            self.engine.stop()
            self.should_exit = True
            return
        self.start_drain()

    def start_drain(self) -> None:
        """Refuse new requests (503) and exit once the running ones finished or were cut off; also
        what an engine that failed calls (its sequences already ended with finish reason "error")."""
        self.engine.draining = True
        threading.Thread(target=self._drain, name="ratplus-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.engine.failure is None and not self.engine.idle and time.monotonic() < deadline:
            time.sleep(0.05)
        self.engine.stop()
        time.sleep(0.2)  # the cut-off responses go out before the connections close
        self.should_exit = True
