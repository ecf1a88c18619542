"""What travels between the replica and vLLM's processes: the env config and phase reports."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from llm_otel_callbacks_vllm_plugin import ENV_CONFIG

__all__ = ["ENV_CONFIG", "ENV_TRACEPARENT", "ENV_TRACESTATE", "EngineEnv", "PhaseReport"]

# W3C trace context in the environment (the OTel spec's names for env carriers; vLLM's own
# startup tracing reads the same variables, so its spans join the same trace when it is on).
ENV_TRACEPARENT = "TRACEPARENT"
ENV_TRACESTATE = "TRACESTATE"

_MAX_DATAGRAM = 8192


@dataclass
class EngineEnv:
    """The replica's request, read by every vLLM process of its engine."""

    model: str
    report_port: int | None
    """UDP port on 127.0.0.1 where the replica collects phase reports."""
    node: str = ""
    """The replica's Ray node id (the engine core and local workers run there)."""
    telemetry: dict[str, Any] = field(default_factory=dict)
    """TelemetrySettings fields for the vLLM processes (span export only)."""
    resource: dict[str, str] = field(default_factory=dict)
    """The replica's Serve ids, added to the vLLM processes' resource attributes."""

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_environ(cls) -> EngineEnv | None:
        raw = os.environ.get(ENV_CONFIG)
        if not raw:
            return None
        data = json.loads(raw)
        return cls(**data)


@dataclass
class PhaseReport:
    """One phase event of one vLLM process; ``end_ns`` None while the phase is running."""

    phase: str
    role: str
    pid: int
    start_ns: int
    end_ns: int | None = None
    rank: int | None = None
    node: str = ""
    error: str | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()[:_MAX_DATAGRAM]

    @classmethod
    def decode(cls, data: bytes) -> PhaseReport | None:
        try:
            return cls(**json.loads(data))
        except Exception:
            return None


class Reporter:
    """Sends reports to the replica: non-blocking, a lost datagram is only a lost metric point."""

    def __init__(self, port: int | None) -> None:
        self._port = port
        self._sock: socket.socket | None = None
        if port:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    def send(self, report: PhaseReport) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(report.encode(), ("127.0.0.1", self._port or 0))
        except OSError:
            pass


def receive_all(sock: socket.socket) -> list[PhaseReport]:
    """Every report queued on the replica's socket (never blocks)."""
    out: list[PhaseReport] = []
    while True:
        try:
            data = sock.recv(_MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return out
        except OSError:
            return out
        report = PhaseReport.decode(data)
        if report is not None:
            out.append(report)
