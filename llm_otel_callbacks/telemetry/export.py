"""Span export that can never stall or fail a hook, nor hold up process exit.

The design, and why (a dead or hanging collector, measured in tests/test_faults_collector.py):

* :class:`SpanQueueProcessor` replaces the SDK's ``BatchSpanProcessor``. A hook thread only
  appends to a bounded deque; when the deque is full the span is dropped and counted (the SDK's
  processor logs a warning per dropped span, on the hook's thread). Its worker thread is the
  only one that talks to the network, and ``force_flush``/``shutdown`` wait for it at most
  their timeout: they never export on the caller's thread.
* :class:`OneShotSession` is handed to the SDK's OTLP/HTTP exporters (their public
  ``session`` argument). It makes one bounded attempt per export: a refused or reset
  connection, a timeout or a 429/502/503/504 becomes an error the SDK does not retry. The
  SDK's own retry loop (sleeps of 1, 2, 4 s up to its timeout) is what kept a process
  exiting for many seconds, and its failing attempts are what made the garbage.
* :class:`GuardedSpanExporter` backs off after a failure (1 s doubling to 60 s): while the
  collector is down, batches are dropped and counted without encoding or connecting, so a
  dead collector costs one connection attempt per window.
* A shutdown deadline set on the session caps every request made while flushing at exit.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import requests
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

logger = logging.getLogger(__name__)

# Why a span was dropped: the ``reason`` label of catalog.EXPORT_FAILURES.
DROP_EXPORT_FAILED = "export_failed"
DROP_BACKOFF = "backoff"
DROP_QUEUE_FULL = "queue_full"
DROP_SHUTDOWN = "shutdown"

OnDrop = Callable[[int, str], None]

_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})


class ExportAttemptFailed(Exception):
    """One export attempt failed. Not a ``requests`` connection error on purpose: the SDK's
    OTLP/HTTP client retries those (and 429/5xx) with sleeps; this it reports at once."""


class OneShotSession(requests.Session):
    """A ``requests.Session`` for the SDK's OTLP/HTTP exporters: one attempt, bounded time.

    ``connect_timeout_s`` caps the TCP connect (a collector that is down answers a connect
    at once or never); ``deadline`` (a ``time.monotonic()`` value, set when the process
    shuts down) caps every request's total timeout.
    """

    def __init__(self, connect_timeout_s: float = 1.0) -> None:
        super().__init__()
        self.connect_timeout_s = connect_timeout_s
        self.deadline: float | None = None
        self._last_error: ExportAttemptFailed | None = None

    def bind(self, url: str, ca_file: str | None = None, client_cert: str | None = None,
             client_key: str | None = None) -> None:
        """Resolve once what ``requests`` would look up on every POST to ``url``.

        With ``trust_env`` on, each request reads ``.netrc``, the proxy variables and
        ``no_proxy`` (a measurable share of a small export); their values are taken here and
        ``trust_env`` is turned off. ``ca_file``/``client_cert``/``client_key``: TLS files
        (the ``OTEL_EXPORTER_OTLP_*CERTIFICATE``/``*CLIENT_KEY`` variables)."""
        from requests.utils import get_environ_proxies, get_netrc_auth

        self.proxies.update(get_environ_proxies(url))
        auth = get_netrc_auth(url)
        if auth:
            self.auth = auth
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        verify = ca_file or bundle
        if verify:
            self.verify = verify
        if client_cert:
            self.cert = (client_cert, client_key) if client_key else client_cert
        self.trust_env = False

    def release(self) -> None:
        """Drop the traceback of the last failure.

        The SDK keeps the error on a result object its export frame holds, and the
        traceback's frames hold their callers (up to that export frame and its batch of
        spans): a reference cycle. The spans are old by then (they waited in the queue, or
        in a request to a hanging collector), so only a full collection would free them,
        ~1,000 objects a second with a hanging collector. Without the traceback,
        reference counting frees them at once.
        """
        error, self._last_error = self._last_error, None
        if error is not None:
            error.__traceback__ = None
            error.__context__ = None

    def _fail(self, reason: str) -> ExportAttemptFailed:
        self.release()
        error = self._last_error = ExportAttemptFailed(reason)
        return error

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.release()
        timeout = kwargs.get("timeout")
        read = float(timeout) if isinstance(timeout, (int, float)) else 10.0
        if self.deadline is not None:
            read = min(read, self.deadline - time.monotonic())
            if read <= 0:
                raise self._fail("shutdown deadline passed")
        kwargs["timeout"] = (min(self.connect_timeout_s, read), read)
        try:
            response = super().request(method, url, *args, **kwargs)
        except requests.RequestException as exc:
            # The cause is named, the URL is not (its query may carry credentials).
            reason = type(exc).__name__
            del exc  # its traceback holds this frame's callers too
            raise self._fail(reason) from None
        if response.status_code in _RETRYABLE_STATUS:
            status = response.status_code
            response.close()
            raise self._fail(f"HTTP {status}")
        return response


class GuardedSpanExporter(SpanExporter):
    """Wraps an exporter: exponential back-off after failures, drops counted, never raises."""

    def __init__(
        self,
        inner: SpanExporter,
        on_drop: OnDrop | None = None,
        *,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        session: OneShotSession | None = None,
    ) -> None:
        self._inner = inner
        self._session = session
        self._on_drop = on_drop
        self._min = min_backoff_s
        self._max = max_backoff_s
        self._backoff = 0.0
        self._retry_at = 0.0
        self._warned = False
        self.attempts = 0
        """Exports handed to the inner exporter (the rest were skipped while backing off)."""

    @property
    def backing_off(self) -> bool:
        return time.monotonic() < self._retry_at

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if time.monotonic() < self._retry_at:
            self._dropped(len(spans), DROP_BACKOFF)
            return SpanExportResult.FAILURE
        self.attempts += 1
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the export thread
            logger.debug("span export raised: %s", type(exc).__name__)
            result = SpanExportResult.FAILURE
        if self._session is not None:
            self._session.release()  # frees the failed batch now (see release)
        if result is SpanExportResult.SUCCESS:
            self._backoff = 0.0
            return result
        self._backoff = min(self._max, max(self._min, self._backoff * 2))
        self._retry_at = time.monotonic() + self._backoff
        self._dropped(len(spans), DROP_EXPORT_FAILED)
        if not self._warned:
            # Once per process: the endpoint is not logged (it may carry credentials).
            logger.warning(
                "llm_otel_callbacks: span export failed; backing off (spans are dropped, "
                "hooks are unaffected)"
            )
            self._warned = True
        return result

    def _dropped(self, count: int, reason: str) -> None:
        if self._on_drop is not None:
            try:
                self._on_drop(count, reason)
            except Exception:
                pass

    def shutdown(self) -> None:
        try:
            self._inner.shutdown()
        except Exception:
            pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        try:
            return bool(self._inner.force_flush(timeout_millis))
        except Exception:
            return False


class SpanQueueProcessor(SpanProcessor):
    """A batch span processor whose hook-side cost is one bounded append, whatever the
    collector does, and whose flush and shutdown never outlive their timeout.

    ``on_drop(count, reason)`` counts spans dropped because the queue was full or the
    processor was shut down (the exporter counts the ones it fails to deliver).
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        on_drop: OnDrop | None = None,
        max_queue_size: int = 2048,
        max_export_batch_size: int = 512,
        schedule_delay_s: float = 5.0,
        shutdown_timeout_s: float = 5.0,
    ) -> None:
        self.exporter = exporter
        self._on_drop = on_drop
        self._max_queue = max_queue_size
        self._max_batch = max_export_batch_size
        self._delay = schedule_delay_s
        self._shutdown_timeout = shutdown_timeout_s
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._flush_waiters: list[threading.Event] = []
        self._stopping = False
        self._start_worker()
        if hasattr(os, "register_at_fork"):
            # A forked child (e.g. an engine process) inherits this object but no thread.
            ref = weakref.ref(self)

            def after_fork() -> None:
                processor = ref()
                if processor is not None:
                    processor._start_worker()

            os.register_at_fork(after_in_child=after_fork)

    def _start_worker(self) -> None:
        self._queue.clear()
        self._lock = threading.Lock()
        self._flush_waiters = []
        self._wake = threading.Event()
        self._pid = os.getpid()
        self._worker = threading.Thread(
            target=self._run, name="llm-otel-span-export", daemon=True
        )
        self._worker.start()

    @property
    def worker_ident(self) -> int | None:
        """Thread id of the only thread that calls the exporter."""
        return self._worker.ident

    # --- hook side -------------------------------------------------------------------------

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        if self._stopping:
            self._dropped(1, DROP_SHUTDOWN)
            return
        if len(self._queue) >= self._max_queue:
            self._dropped(1, DROP_QUEUE_FULL)
            return
        self._queue.append(span)
        if len(self._queue) >= self._max_batch and not self._wake.is_set():
            self._wake.set()

    def _dropped(self, count: int, reason: str) -> None:
        if self._on_drop is not None:
            try:
                self._on_drop(count, reason)
            except Exception:
                pass

    # --- worker side -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            with self._lock:
                # Taken before draining: a flush registered later is served next round.
                waiters, self._flush_waiters = self._flush_waiters, []
            self._drain()
            for waiter in waiters:
                waiter.set()
            if self._stopping:
                return

    def _drain(self) -> None:
        while self._queue:
            batch: list[ReadableSpan] = []
            try:
                while len(batch) < self._max_batch:
                    batch.append(self._queue.popleft())
            except IndexError:  # emptied (or cleared by a timed-out shutdown)
                pass
            if not batch:
                return
            try:
                self.exporter.export(batch)
            except Exception as exc:  # the worker must outlive any exporter error
                logger.debug("span export raised: %s", type(exc).__name__)

    # --- lifecycle -------------------------------------------------------------------------

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Ask the worker to export what is queued; wait at most ``timeout_millis``."""
        if not self._worker.is_alive():
            return not self._queue
        done = threading.Event()
        with self._lock:
            self._flush_waiters.append(done)
        self._wake.set()
        return done.wait(max(0.0, timeout_millis / 1000.0))

    def join(self, timeout_s: float) -> bool:
        """Wait for the worker to end after shutdown (an export in flight included)."""
        self._worker.join(timeout_s)
        return not self._worker.is_alive()

    def shutdown(self) -> None:
        """Export what is queued, waiting at most ``shutdown_timeout_s``, then stop."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._worker.join(self._shutdown_timeout)
        if self._worker.is_alive():
            # Still in an export (a hanging collector): what is left is dropped, counted.
            # Popped one by one: the worker may take some of them at the same time.
            left = 0
            try:
                while True:
                    self._queue.popleft()
                    left += 1
            except IndexError:
                pass
            if left:
                self._dropped(left, DROP_SHUTDOWN)
        try:
            self.exporter.shutdown()
        except Exception:
            pass


class OtlpJsonFileSpanExporter(SpanExporter):
    """The embedded default sink: one OTLP/JSON ``ExportTraceServiceRequest`` per line.

    The format is the OTLP/JSON mapping (ids in hex), which the OpenTelemetry Collector's
    ``otlpjsonfile`` receiver reads back, so a run without a collector can still be loaded
    into one later. Safe for several processes appending to one file (one write per batch).

    The file is created 0600 (its folder 0700), never opened through a symlink
    (``O_NOFOLLOW``), and not written past ``max_bytes``: a batch that would pass the cap
    fails, so it is dropped and counted, and the file is never rotated or truncated.
    """

    def __init__(self, path: str, max_bytes: int | None = None) -> None:
        self._path = os.path.abspath(path)
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._full_logged = False
        os.makedirs(os.path.dirname(self._path), mode=0o700, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        from google.protobuf.json_format import MessageToDict
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        message = MessageToDict(encode_spans(spans))
        _hex_ids(message)
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            # O_APPEND keeps lines from different processes whole; O_NOFOLLOW refuses a
            # symlink planted where the file goes (the open fails: the batch is counted).
            fd = os.open(self._path,
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600)
            try:
                if self._max_bytes is not None and \
                        os.fstat(fd).st_size + len(data) > self._max_bytes:
                    if not self._full_logged:
                        self._full_logged = True
                        logger.warning("traces_file %s reached its size cap (%d bytes): "
                                       "further spans are dropped and counted", self._path,
                                       self._max_bytes)
                    return SpanExportResult.FAILURE
                os.write(fd, data)
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(node: Any) -> None:
    """protobuf's JSON mapping writes bytes as base64; OTLP/JSON wants trace/span ids in hex."""
    import base64

    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)
