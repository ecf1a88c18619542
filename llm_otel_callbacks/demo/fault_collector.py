"""A misbehaving OTLP/HTTP collector on 127.0.0.1, for the collector-fault tests and benchmark.

Modes (``FaultCollector(mode)``, a context manager with ``.endpoint``):

* ``healthy``: the real decoding receiver (:class:`OtlpHttpReceiver`), ``.receiver`` holds it.
* ``hang``: accepts every connection and never reads or answers (held open until stop).
* ``slow``: reads the request, waits ``slow_s`` (5 s), then answers 200 with an empty OTLP
  response.
* ``500`` / ``503``: reads the request and answers that status.
* ``reset``: accepts, then closes with SO_LINGER 0, so the client sees a TCP RST.
* ``closed``: a free port with nothing listening (connections are refused).

``.connections`` counts accepted connections (every mode but ``healthy`` and ``closed``),
so a test can see how often the exporter tried.
"""

from __future__ import annotations

import gc
import socket
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from .. import RayServeLLMCallback, catalog
from ..telemetry import get_telemetry
from .otlp_receiver import OtlpHttpReceiver
from .ports import free_port

MODES = ("healthy", "hang", "slow", "500", "503", "reset", "closed")
FAULT_MODES = tuple(m for m in MODES if m != "healthy")


class FaultCollector:
    def __init__(self, mode: str, slow_s: float = 5.0) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        self.mode = mode
        self.slow_s = slow_s
        self.connections = 0
        self.receiver: OtlpHttpReceiver | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._held: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultCollector:
        if self.mode == "healthy":
            self.receiver = OtlpHttpReceiver(port=self.port).start()
        elif self.mode != "closed":
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(64)
            listener.settimeout(0.1)
            self._listener = listener
            self._thread = threading.Thread(
                target=self._accept_loop, name=f"fault-collector-{self.mode}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.receiver is not None:
            self.receiver.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            held, self._held = self._held, []
        for conn in held:
            _close_quietly(conn)

    def __enter__(self) -> FaultCollector:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- server side -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _addr = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.connections += 1
            if self.mode == "hang":
                with self._lock:
                    self._held.append(conn)  # never read, never answered
            elif self.mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()  # linger 0: the close sends RST
            else:
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            if not _read_request(conn):
                return
            if self.mode == "slow":
                if self._stop.wait(self.slow_s):
                    return
                body = ExportTraceServiceResponse().SerializeToString()
                head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
            else:
                body = b"collector fault"
                reason = "Internal Server Error" if self.mode == "500" else "Service Unavailable"
                head = f"HTTP/1.1 {self.mode} {reason}\r\nContent-Type: text/plain\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            conn.sendall(head.encode() + body)
        except OSError:
            pass
        finally:
            _close_quietly(conn)


def _read_request(conn: socket.socket) -> bool:
    """Read one HTTP request (headers and a Content-Length body); False if the peer left."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip() or 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        body += chunk
    return True


def _close_quietly(conn: socket.socket) -> None:
    try:
        conn.close()
    except OSError:
        pass


# --- one measured run of hook calls against a collector ------------------------------------


@dataclass
class HookRun:
    """What one run of ``calls`` hook calls against a collector showed."""

    mode: str
    durations_s: list[float]
    spans_ended: int
    exporter_threads: set[int]
    hook_thread: int
    worker_thread: int | None
    export_attempts: int
    full_gcs: int
    full_gc_ms: list[float]
    old_garbage: int
    connections: int
    shutdown_s: float = 0.0
    delivered: int = 0
    dropped: dict[str, float] = field(default_factory=dict)
    worker_ended: bool = False

    def pct_us(self, q: float) -> float:
        ordered = sorted(self.durations_s)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e6

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "calls": len(self.durations_s),
            "median_us": round(self.pct_us(0.5), 1), "p99_us": round(self.pct_us(0.99), 1),
            "max_us": round(max(self.durations_s) * 1e6, 1),
            "full_gcs": self.full_gcs, "full_gc_ms": [round(x) for x in self.full_gc_ms],
            "old_garbage": self.old_garbage, "export_attempts": self.export_attempts,
            "connections": self.connections, "spans_ended": self.spans_ended,
            "delivered": self.delivered, "dropped": self.dropped,
            "shutdown_s": round(self.shutdown_s, 3),
        }


class _CountEnded(SpanProcessor):
    """Counts the sampled spans the provider ended (what should reach the collector)."""

    def __init__(self) -> None:
        self.count = 0

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self.count += 1


class NoopHooks(RayServeLLMCallback):
    """A callback with one empty hook: what the fault runs and benchmarks call."""

    def on_before_node_init(self) -> None:
        return None


def dropped_spans(port: int) -> dict[str, float]:
    """Scrape the prometheus_client exposition; spans dropped so far, by reason."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode("utf-8")
    out: dict[str, float] = {}
    name = catalog.EXPORT_FAILURES.name + "_total"
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get(catalog.L_SIGNAL) == "traces":
                reason = sample.labels.get(catalog.L_REASON, "")
                out[reason] = out.get(reason, 0.0) + float(sample.value)
    return out


def run_hooks(
    collector: FaultCollector,
    calls: int,
    *,
    pause_every: int = 10,
    pause_s: float = 0.001,
    telemetry: dict[str, Any] | None = None,
    shutdown: bool = True,
) -> HookRun:
    """``calls`` real hook calls through a ``RayServeLLMCallback`` exporting to ``collector``
    with the real OTLP/HTTP exporters; each call timed, full collections counted.

    The hook thread sleeps ``pause_s`` every ``pause_every`` calls, so the export worker
    runs during the window as it would between hooks in a replica.
    """
    settings: dict[str, Any] = {
        "endpoint": collector.endpoint, "metrics_backend": "prometheus", "prometheus_port": 0,
        "schedule_delay_ms": 50, "export_timeout_s": 2.0, "shutdown_timeout_s": 1.0,
        "metric_export_interval_ms": 200,
    }
    settings.update(telemetry or {})
    cb = NoopHooks(llm_config=None, ctx_kwargs={}, telemetry=settings)
    tel = get_telemetry(cb.telemetry_settings)  # the callback's telemetry, built now
    assert tel.prometheus_port is not None
    counter = _CountEnded()
    tel.tracer_provider.add_span_processor(counter)
    processor = tel.span_processors[0]
    guard = processor.exporter
    inner = guard._inner  # the SDK's OTLPSpanExporter
    threads: set[int] = set()
    real_export = inner.export

    def recording_export(spans: Any) -> Any:
        threads.add(threading.get_ident())
        return real_export(spans)

    inner.export = recording_export  # instrumentation only: the real export still runs
    before = dropped_spans(tel.prometheus_port)
    delivered_before = len(collector.receiver.spans()) if collector.receiver else 0
    attempts_before = guard.attempts

    durations, full, old_garbage = time_calls(cb, calls, pause_every, pause_s)
    run = HookRun(
        mode=collector.mode, durations_s=durations, spans_ended=0,
        exporter_threads=threads, hook_thread=threading.get_ident(),
        worker_thread=processor.worker_ident, export_attempts=0, full_gcs=len(full),
        full_gc_ms=full, old_garbage=old_garbage, connections=0,
    )
    if shutdown:
        t0 = time.perf_counter()
        tel.shutdown()
        run.shutdown_s = time.perf_counter() - t0
        # An export still in flight ends by the shutdown deadline; wait for its count.
        run.worker_ended = processor.join(settings["export_timeout_s"] + 2.0)
    run.spans_ended = counter.count
    run.export_attempts = guard.attempts - attempts_before
    run.connections = collector.connections
    if collector.receiver is not None:
        run.delivered = len(collector.receiver.spans()) - delivered_before
    after = dropped_spans(tel.prometheus_port)
    run.dropped = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
    return run


def time_calls(
    cb: RayServeLLMCallback, calls: int, pause_every: int = 10, pause_s: float = 0.001
) -> tuple[list[float], list[float], int]:
    """Time ``calls`` calls of a no-op hook one by one; count the full collections meanwhile
    (their durations in ms) and the old-generation garbage the window left.

    Old-generation garbage: cyclic garbage that survived young collections into the old
    generation, which only a full collection frees. Its growth is what triggers full
    collections (each ~350 ms in a process of Ray and vLLM). Measured as what a full
    collection finds after a young one, plus what full collections freed during the window.
    """
    full: list[float] = []
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started.append(time.perf_counter())
            else:
                full.append((time.perf_counter() - started[-1]) * 1e3)

    gc.collect()
    collected_before = gc.get_stats()[2]["collected"]
    gc.callbacks.append(on_gc)
    durations: list[float] = []
    try:
        cb.run_callback_sync("on_before_node_init")  # first call: metric children, untimed
        for i in range(calls):
            t0 = time.perf_counter()
            cb.run_callback_sync("on_before_node_init")
            durations.append(time.perf_counter() - t0)
            if i % pause_every == pause_every - 1:
                time.sleep(pause_s)
    finally:
        gc.callbacks.remove(on_gc)
    in_window = gc.get_stats()[2]["collected"] - collected_before
    gc.collect(1)  # young garbage goes; young survivors join the old generation
    old_garbage = in_window + gc.collect(2)
    return durations, full, old_garbage
