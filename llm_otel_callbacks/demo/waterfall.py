"""Read spans back from the embedded OTLP/JSON file and draw a replica's startup waterfall.

The file holds one OTLP/JSON ``ExportTraceServiceRequest`` per line, written by every process
of the deployment (replica, per-node download tasks). A startup trace is the root span
``catalog.SPAN_STARTUP`` and everything under it: Timing's phase spans, hook spans, and a
composite's per-child spans.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import catalog


@dataclass(frozen=True)
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status: str  # "", "STATUS_CODE_OK", "STATUS_CODE_ERROR"
    resource: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e9

    @property
    def failed(self) -> bool:
        return self.status == "STATUS_CODE_ERROR"


def _value(any_value: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in any_value:
            return any_value[key]
    if "intValue" in any_value:
        return int(any_value["intValue"])
    if "arrayValue" in any_value:
        return [_value(v) for v in any_value["arrayValue"].get("values", [])]
    return None


def _attrs(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    return {item["key"]: _value(item.get("value", {})) for item in items}


def read_spans(path: Path) -> list[Span]:
    """Every span in an OTLP/JSON lines file (a line still being written is skipped)."""
    spans: list[Span] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return spans
    for line in text.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        spans.extend(_spans_of(message))
    return spans


def _spans_of(message: dict[str, Any]) -> Iterator[Span]:
    for resource_spans in message.get("resourceSpans", []):
        resource = _attrs(resource_spans.get("resource", {}).get("attributes", []))
        for scope_spans in resource_spans.get("scopeSpans", []):
            for raw in scope_spans.get("spans", []):
                yield Span(
                    name=raw.get("name", ""),
                    trace_id=raw.get("traceId", ""),
                    span_id=raw.get("spanId", ""),
                    parent_id=raw.get("parentSpanId", ""),
                    start_ns=int(raw.get("startTimeUnixNano", 0)),
                    end_ns=int(raw.get("endTimeUnixNano", 0)),
                    attributes=_attrs(raw.get("attributes", [])),
                    status=raw.get("status", {}).get("code", ""),
                    resource=resource,
                )


@dataclass(frozen=True)
class StartupTrace:
    """One replica startup: its root span and every span of its trace."""

    root: Span
    spans: tuple[Span, ...]

    @property
    def model(self) -> str:
        return str(self.root.attributes.get(catalog.A_MODEL, "?"))

    def phases(self) -> list[Span]:
        """Timing's phase spans, in start order (not the engine-start phases)."""
        found = [s for s in self.spans if s.name.startswith(catalog.SPAN_PHASE_PREFIX)
                 and catalog.A_ENGINE_ROLE not in s.attributes]
        return sorted(found, key=lambda s: s.start_ns)

    def engine_start(self) -> Span | None:
        return next((s for s in self.spans if s.name == catalog.SPAN_ENGINE_START), None)

    def engine_phases(self) -> list[Span]:
        """The engine-start phases (vLLM's processes and the replica's side), in start order."""
        found = [s for s in self.spans if catalog.A_ENGINE_ROLE in s.attributes]
        return sorted(found, key=lambda s: s.start_ns)

    def phase_names(self) -> set[str]:
        return {s.name[len(catalog.SPAN_PHASE_PREFIX):] for s in self.phases()}


def startup_traces(spans: Iterable[Span]) -> list[StartupTrace]:
    """Startup traces in start order (a replica that was retried has several)."""
    by_trace: dict[str, list[Span]] = {}
    for span in spans:
        by_trace.setdefault(span.trace_id, []).append(span)
    out = []
    for members in by_trace.values():
        for span in members:
            if span.name == catalog.SPAN_STARTUP and not span.parent_id:
                out.append(StartupTrace(span, tuple(members)))
    return sorted(out, key=lambda t: t.root.start_ns)


# --- drawing ----------------------------------------------------------------------------------

_EIGHTHS = " ▏▎▍▌▋▊▉█"
_TICK_STEPS = (0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600)


def _label(span: Span) -> str:
    name = span.name
    if name == catalog.SPAN_STARTUP:
        return "replica startup"
    if name.startswith(catalog.SPAN_PHASE_PREFIX) and catalog.A_ENGINE_ROLE in span.attributes:
        return f"{name[len(catalog.SPAN_PHASE_PREFIX):]} [{engine_role(span)}]"
    if name.startswith(catalog.SPAN_PHASE_PREFIX):
        label = "phase " + name[len(catalog.SPAN_PHASE_PREFIX):]
        node = span.attributes.get(catalog.A_NODE_ID)
        return f"{label} [node {str(node)[:8]}]" if node else label
    if name.startswith(catalog.SPAN_HOOK_PREFIX):
        rest = name[len(catalog.SPAN_HOOK_PREFIX):]
        hook, _, child = rest.partition(" ")
        return child if child else f"hook {hook}"
    if name == catalog.SPAN_ENGINE_START:
        return "engine start"
    return name


def _ordered(trace: StartupTrace) -> list[tuple[int, Span]]:
    """Depth-first, siblings by start time: (depth, span)."""
    children: dict[str, list[Span]] = {}
    ids = {s.span_id for s in trace.spans}
    for span in trace.spans:
        if span is trace.root:
            continue
        parent = span.parent_id if span.parent_id in ids else trace.root.span_id
        children.setdefault(parent, []).append(span)
    out: list[tuple[int, Span]] = []

    def walk(span: Span, depth: int) -> None:
        out.append((depth, span))
        for child in sorted(children.get(span.span_id, []), key=lambda s: (s.start_ns, s.name)):
            walk(child, depth + 1)

    walk(trace.root, 0)
    return out


def _tick_step(total_s: float, width: int) -> float:
    for step in _TICK_STEPS:
        if total_s / step <= max(1, width // 10):
            return step
    return _TICK_STEPS[-1]


def _fmt_tick(value: float) -> str:
    return f"{value:g}s" if value < 120 else f"{value / 60:g}m"


def _bar(start: float, end: float, width: int, unicode: bool) -> str:
    """Cells ``[start, end)`` (fractions of cells allowed), at least one eighth wide."""
    first = min(width - 1, math.floor(start))
    end = max(end, first + 0.125)
    cells = [" "] * width
    for i in range(first, width):
        cover = min(1.0, end - i)
        if cover <= 0:
            break
        if unicode:
            cells[i] = _EIGHTHS[max(1, min(8, round(cover * 8)))]
        else:
            cells[i] = "#" if cover >= 0.5 else "|"
    return "".join(cells).rstrip()


def render_waterfall(trace: StartupTrace, width: int = 100, unicode: bool = True) -> str:
    """The startup as a table with a bar per span, on one time axis."""
    rows = _ordered(trace)
    t0 = min(s.start_ns for _, s in rows)
    t1 = max(s.end_ns for _, s in rows)
    total = max((t1 - t0) / 1e9, 1e-3)
    label_w = min(50, max(len("  " * d + _label(s)) for d, s in rows) + 1)
    prefix_w = label_w + 17  # label, start and took columns
    bar_w = max(20, width - prefix_w - 2)  # 2: room for the failure flag
    scale = bar_w / total
    step = _tick_step(total, bar_w)

    axis = [" "] * max(bar_w, width - prefix_w)
    tick = 0.0
    while tick <= total + 1e-9:
        text = _fmt_tick(tick)
        col = round(tick * scale)
        if col + len(text) <= len(axis):
            axis[col:col + len(text)] = list(text)
        tick += step
    lines = [f"{'span':<{label_w}} {'start':>6} {'took':>7}  {''.join(axis).rstrip()}"]
    for depth, span in rows:
        label = ("  " * depth + _label(span))[:label_w]
        start = (span.start_ns - t0) / 1e9
        flag = (" ✗" if unicode else " !") if span.failed else ""
        bar = _bar(start * scale, start * scale + span.seconds * scale, bar_w, unicode)
        lines.append(f"{label:<{label_w}} {start:>5.1f}s {span.seconds:>6.2f}s  {bar}{flag}")
    return "\n".join(lines)


def phase_table(trace: StartupTrace) -> list[tuple[str, str, float, str]]:
    """(phase, node, seconds, outcome) for each Timing phase span."""
    out = []
    for span in trace.phases():
        phase = span.name[len(catalog.SPAN_PHASE_PREFIX):]
        node = str(span.attributes.get(catalog.A_NODE_ID, ""))[:8]
        outcome = str(span.attributes.get(catalog.A_OUTCOME, "error" if span.failed else "ok"))
        out.append((phase, node, span.seconds, outcome))
    return out


def engine_role(span: Span) -> str:
    """``replica``, ``engine core`` or ``worker <rank>``."""
    role = str(span.attributes.get(catalog.A_ENGINE_ROLE, ""))
    if role == catalog.ROLE_WORKER:
        return f"worker {span.attributes.get(catalog.A_ENGINE_RANK, '?')}"
    return role.replace("_", " ")


def engine_breakdown(trace: StartupTrace) -> tuple[Span, list[Span], float] | None:
    """(engine-start span, its phases, the share of it they explain), or None without them."""
    from ..vllm_plugin._replica import Interval, coverage

    engine = trace.engine_start()
    phases = trace.engine_phases()
    if engine is None or not phases:
        return None
    share = coverage([Interval(s.name, s.start_ns, s.end_ns) for s in phases],
                     engine.start_ns, engine.end_ns)
    return engine, phases, share


def engine_start_lines(trace: StartupTrace) -> list[str]:
    """Where engine start goes: its phases inside vLLM's processes, and how much they explain."""
    found = engine_breakdown(trace)
    if found is None:
        return ["Where engine start goes: no phases from vLLM's processes in this trace (is the "
                "vllm.general_plugins entry point installed?)"]
    engine, phases, share = found
    lines = [f"Where engine start goes ({engine.seconds:.1f}s; the phases below explain "
             f"{share:.0%} of it):"]
    for span in phases:
        phase = span.name[len(catalog.SPAN_PHASE_PREFIX):]
        start = (span.start_ns - engine.start_ns) / 1e9
        flag = "  error" if span.failed else ""
        lines.append(f"  {engine_role(span):<12} {phase:<26} +{start:6.2f}s "
                     f"{span.seconds:7.2f}s{flag}")
    return lines
