"""Where a request's time goes: named stages, recorded only while a request asks for them.

    with timing.record("rest") as stages:     # opened by whoever answers a request (REST route, demo function)
        image = lab.decode(data)              # the serving core marks its stages:
        lab.predict(image)                    #   decode, preprocess:<model>, forward:<model>, ensemble, ood
    stages  -> {"decode": 0.0004, "preprocess:cifar_cnn": 0.0003, "forward:cifar_cnn": 0.011, ...}  (seconds)

`stage()` costs one context-variable lookup when nothing records, so the core marks its stages always.
A record opened inside another adds to the outer one (the outer request owns the time). Each finished
outermost record goes into a bounded log, `recent()`, which /api/v1/stats and benchmarks/serving_latency.py
summarize: the same numbers for REST and Gradio requests, since both run in the serving core.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections import deque

import numpy as np

_current: contextvars.ContextVar[dict | None] = contextvars.ContextVar("cifar_timing", default=None)
_log: deque = deque(maxlen=2048)   # (source, {stage: seconds}); the newest last
_log_lock = threading.Lock()
TOTAL = "total"


@contextlib.contextmanager
def stage(name: str):
    """Add the time spent inside to `name` in the current record (no-op when none is open)."""
    stages = _current.get()
    if stages is None:
        yield
        return
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


@contextlib.contextmanager
def record(source: str):
    """Open a record for one request; yields its {stage: seconds} dict, which gets "total" on exit and is
    logged under `source` (e.g. "rest:predict", "gradio:predict"). Nested inside another record: yields
    the outer dict and logs nothing."""
    outer = _current.get()
    if outer is not None:
        yield outer
        return
    stages: dict[str, float] = {}
    token = _current.set(stages)
    t0 = time.perf_counter()
    try:
        yield stages
    finally:
        _current.reset(token)
        stages[TOTAL] = time.perf_counter() - t0
        with _log_lock:
            _log.append((source, dict(stages)))


def recent(source: str | None = None, clear: bool = False) -> list[tuple[str, dict]]:
    """The logged records, oldest first (only `source`'s when given); `clear` empties the log."""
    with _log_lock:
        rows = [r for r in _log if source is None or r[0] == source]
        if clear:
            _log.clear()
    return rows


def summary(rows: list[tuple[str, dict]]) -> dict[str, dict]:
    """{source: {"n": count, "stages": {stage: {"n", "p50_ms", "p95_ms"}}}} over logged records."""
    out: dict[str, dict] = {}
    for source in dict.fromkeys(s for s, _ in rows):
        records = [r for s, r in rows if s == source]
        names = list(dict.fromkeys(k for r in records for k in r))
        stages = {}
        for name in names:
            values = np.array([r[name] for r in records if name in r]) * 1000
            stages[name] = {"n": int(values.size), "p50_ms": round(float(np.percentile(values, 50)), 3),
                            "p95_ms": round(float(np.percentile(values, 95)), 3)}
        out[source] = {"n": len(records), "stages": stages}
    return out


def server_timing(stages: dict[str, float]) -> str:
    """The record as a W3C Server-Timing header value (browsers' developer tools show it):
    'decode;dur=0.41, forward-cifar_cnn;dur=11.2, ...' in milliseconds."""
    def token(name: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return ", ".join(f"{token(k)};dur={1000 * v:.3f}" for k, v in stages.items())
