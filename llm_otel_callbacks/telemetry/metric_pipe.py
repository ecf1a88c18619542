"""Record once, fan out at export: one measurement, several metric backends.

With OTLP metrics on (``otlp_metrics: true`` or ``OTEL_METRICS_EXPORTER=otlp``) a measurement
has two destinations: the local backend (Ray's metrics inside Ray, else prometheus_client) and
the OTel SDK meter that exports over OTLP. Recording into both on the caller's thread cost a
request twice (about a third of the request path's telemetry CPU, measured with
``benchmarks/profile_request_path.py``). Instead a hook or request appends one tuple to a
deque, and one worker thread hands it to every backend, a few times a second: counter and gauge
deltas of one label set are summed first, so a burst of calls becomes one update per backend.

Inside Ray the pipe runs even with Ray's metrics as the only backend: Ray's ``record``
releases the GIL around its C++ call, so on a replica's busy event loop each call could hand
the GIL to another thread (Serve's own loop runs on one) and wait to get it back; the worker
makes those calls instead of the request's thread.

What the wait costs: the local backend sees a measurement at most ``tick_s`` later (a scrape
may miss the last fraction of a second); ``flush`` drains at once (force_flush and shutdown
call it). The deque is bounded: past ``max_pending`` the caller drains it itself, so memory
stays bounded when the worker cannot keep up, and nothing is dropped.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

    from ..catalog import MetricSpec
    from .metrics import Labels, Recorder

logger = logging.getLogger(__name__)

_Entry = tuple[int, "Labels", float, "SpanContext | None"]


class MetricPipe:
    """The one recording point of several backends, and the worker that fans out."""

    def __init__(self, tick_s: float = 0.5, max_pending: int = 100_000) -> None:
        self._tick = tick_s
        self._max = max_pending
        self._sinks: list[tuple[bool, tuple[Recorder, ...]]] = []  # (histogram?, parts)
        self._queue: collections.deque[_Entry] = collections.deque()
        self._drain_lock = threading.Lock()
        self._stopping = False
        self._start_worker()
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def after_fork() -> None:  # a forked child inherits the deque, not the thread
                pipe = ref()
                if pipe is not None:
                    pipe._queue.clear()
                    pipe._drain_lock = threading.Lock()
                    pipe._start_worker()

            os.register_at_fork(after_in_child=after_fork)

    def _start_worker(self) -> None:
        self._wake = threading.Event()
        self._worker = threading.Thread(target=self._run, name="llm-otel-metrics", daemon=True)
        self._worker.start()

    def recorder(self, spec: MetricSpec, parts: Sequence[Recorder]) -> Recorder:
        """One recorder that feeds ``parts`` (one per backend) through the pipe."""
        self._sinks.append((spec.kind == "histogram", tuple(parts)))
        return _PipeRecorder(self, len(self._sinks) - 1)

    def _overflow(self) -> None:
        self.flush()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._tick)
            self.flush()

    def flush(self) -> None:
        """Hand every pending measurement to its backends, now."""
        with self._drain_lock:  # one drainer at a time keeps gauge updates in order
            popleft = self._queue.popleft
            sums: dict[tuple[int, Labels], float] = {}
            sinks = self._sinks
            while True:
                try:
                    index, labels, value, exemplar = popleft()
                except IndexError:
                    break
                histogram, parts = sinks[index]
                if histogram:
                    for part in parts:
                        try:
                            part.record(labels, value, exemplar)
                        except Exception as exc:  # one broken backend must not stop the rest
                            logger.debug("metric not recorded: %s", exc)
                else:
                    key = (index, labels)
                    sums[key] = sums.get(key, 0.0) + value
            for (index, labels), total in sums.items():
                for part in sinks[index][1]:
                    try:
                        part.add(labels, total)
                    except Exception as exc:
                        logger.debug("metric not recorded: %s", exc)

    def shutdown(self) -> None:
        """Drain what is pending and stop the worker."""
        self._stopping = True
        self._wake.set()
        self.flush()


class _PipeRecorder:
    """The caller's side: one append (and a length check) per measurement."""

    __slots__ = ("_index", "_pipe")

    def __init__(self, pipe: MetricPipe, index: int) -> None:
        self._pipe = pipe
        self._index = index

    def add(self, labels: Labels, value: float = 1.0) -> None:
        queue = self._pipe._queue
        queue.append((self._index, labels, value, None))
        if len(queue) > self._pipe._max:
            self._pipe._overflow()

    def record(self, labels: Labels, value: float, exemplar: SpanContext | None = None) -> None:
        queue = self._pipe._queue
        queue.append((self._index, labels, value, exemplar))
        if len(queue) > self._pipe._max:
            self._pipe._overflow()
