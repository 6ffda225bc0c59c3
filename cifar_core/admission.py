"""Admission control: how many requests may run model work at once, how many may wait, and for how long.

On a 2-core CPU two model requests at a time already use every core; more at once only makes each slower
(and the models serialize on their locks anyway). A burst beyond that waits in a short line; beyond the line,
or past the wait limit, a request is refused at once with a reason instead of hanging:

    gate = Admission(workers=2, waiting=16, wait_s=10)
    with gate.admit():          # raises Busy("... 16 requests are already waiting ...") when the line is full,
        answer(request)         #        Busy("... waited 10 s ...") when no worker freed up in time

The REST API maps Busy to 503 with Retry-After (api/app.py); the Gradio demo has its own queue (demo/app.py).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

from . import timing


class Busy(Exception):
    """Refused for capacity, not for anything the client sent: retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


@dataclass(frozen=True)
class Limits:
    workers: int = 2        # requests doing model work at once (one per core)
    waiting: int = 16       # requests allowed to wait for a worker; the next one is refused at once
    wait_s: float = 10.0    # the longest a request waits for a worker before it is refused

    def __post_init__(self):
        if self.workers < 1 or self.waiting < 0 or not self.wait_s > 0:
            raise ValueError(f"need workers >= 1, waiting >= 0 and wait_s > 0, got {self}")


class Admission:
    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self._slots = threading.BoundedSemaphore(self.limits.workers)
        self._lock = threading.Lock()
        self._running = 0
        self._waiting = 0
        self._refused = 0

    @contextlib.contextmanager
    def admit(self):
        limits = self.limits
        with self._lock:
            # a free worker admits at once, even when the line's length is 0
            if self._slots.acquire(blocking=False):
                self._running += 1
                acquired = True
            elif self._waiting >= limits.waiting:
                self._refused += 1
                raise Busy(f"the server is busy: {self._running} requests are running and {self._waiting} waiting "
                           f"(at most {limits.waiting} may wait); retry in a moment")
            else:
                self._waiting += 1
                acquired = False
        if not acquired:
            with timing.stage("queue"):
                got = self._slots.acquire(timeout=limits.wait_s)
            with self._lock:
                self._waiting -= 1
                if got:
                    self._running += 1
                else:
                    self._refused += 1
            if not got:
                raise Busy(f"the server is busy: no worker was free within {limits.wait_s:g} s; retry in a moment",
                           retry_after_s=max(1, round(limits.wait_s / 2)))
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
            self._slots.release()

    def depth(self) -> dict:
        """What /healthz shows: running and waiting now, refusals so far, and the limits."""
        with self._lock:
            return {"running": self._running, "waiting": self._waiting, "refused": self._refused,
                    "workers": self.limits.workers, "max_waiting": self.limits.waiting,
                    "max_wait_s": self.limits.wait_s}
