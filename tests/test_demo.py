"""The README's first command: ``python -m llm_otel_callbacks demo`` end to end (a real Serve LLM
deployment on the CPU), and the waterfall it draws from the spans file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode, set_span_in_context

from llm_otel_callbacks import CallbackConfigError, catalog
from llm_otel_callbacks.demo import dashboard_files
from llm_otel_callbacks.demo.local_ray import MARKER_VAR
from llm_otel_callbacks.demo.waterfall import read_spans, render_waterfall, startup_traces
from llm_otel_callbacks.telemetry.export import OtlpJsonFileSpanExporter

REPO_ROOT = Path(__file__).resolve().parents[1]
S = 1_000_000_000
# Timing's phases that are spans (the total is the startup span itself).
SPAN_PHASES = set(catalog.TIMING_PHASES) - {catalog.PHASE_TOTAL}


def _write_startup(path: Path) -> str:
    """A startup trace written by the real OTLP/JSON file exporter: root, phases, a composite
    hook span with two children (one failed)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OtlpJsonFileSpanExporter(str(path))))
    tracer = provider.get_tracer("test")
    t0 = 1_700_000_000 * S
    root = tracer.start_span(catalog.SPAN_STARTUP, start_time=t0,
                             attributes={catalog.A_MODEL: "m"})
    ctx = set_span_in_context(root)

    def span(name: str, start: float, end: float, parent=ctx, **attrs: object):
        s = tracer.start_span(name, context=parent, start_time=t0 + int(start * S),
                              attributes=attrs)
        return s, end

    phases = [
        (catalog.PHASE_BEFORE_NODE_INIT, 0, 2),
        (catalog.PHASE_NODE_INIT, 2, 10),
        (catalog.PHASE_DOWNLOAD_TASK_START, 2, 9),
        (catalog.PHASE_ENGINE_START, 10, 40),
    ]
    for name, start, end in phases:
        s, e = span(catalog.SPAN_PHASE_PREFIX + name, start, end)
        s.end(end_time=t0 + int(e * S))
    hook, hook_end = span(catalog.SPAN_HOOK_PREFIX + "on_before_node_init", 2, 2.5)
    hook_ctx = set_span_in_context(hook)
    ok_child, _ = span(catalog.SPAN_HOOK_PREFIX + "on_before_node_init Timing", 2, 2.1,
                       parent=hook_ctx)
    ok_child.end(end_time=t0 + int(2.1 * S))
    bad_child, _ = span(catalog.SPAN_HOOK_PREFIX + "on_before_node_init Audit", 2.1, 2.5,
                        parent=hook_ctx)
    bad_child.set_status(Status(StatusCode.ERROR, "boom"))
    bad_child.end(end_time=t0 + int(2.5 * S))
    hook.end(end_time=t0 + int(hook_end * S))
    root.end(end_time=t0 + 40 * S)
    provider.shutdown()
    return format(root.get_span_context().trace_id, "032x")


def test_waterfall_draws_the_trace_from_the_spans_file(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    trace_id = _write_startup(path)
    (trace,) = startup_traces(read_spans(path))
    assert trace.root.trace_id == trace_id
    assert trace.phase_names() == SPAN_PHASES
    text = render_waterfall(trace, width=100)
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines)
    rows = [re.match(r"^(.*?)\s+(\d+\.\d)s\s+(\d+\.\d\d)s  (.*)$", line) for line in lines[1:]]
    assert all(rows), lines
    labels = [m.group(1).strip() for m in rows if m]
    # Depth first, siblings by start time; a composite's children under their hook span.
    assert labels == [
        "replica startup", "phase before_node_init", "hook on_before_node_init", "Timing",
        "Audit", "phase download_task_start", "phase node_init", "phase engine_start",
    ]
    bars = {m.group(1).strip(): m.group(4) for m in rows if m}
    # Bars are to scale: engine_start (30 s) is three quarters of the 40 s root, and starts
    # a quarter of the way in.
    root_bar, engine_bar = bars["replica startup"], bars["phase engine_start"]
    assert abs(len(engine_bar.strip()) / len(root_bar.strip()) - 0.75) < 0.05
    assert abs((len(engine_bar) - len(engine_bar.lstrip())) / len(root_bar) - 0.25) < 0.05
    assert bars["Audit"].endswith("✗") and not bars["Timing"].endswith("✗")
    ascii_text = render_waterfall(trace, width=100, unicode=False)
    assert ascii_text.isascii() and " !" in ascii_text


def test_example_user_callback_checks_disk_space(tmp_path: Path) -> None:
    """The demo's user callback: kwargs validated at construction, the check on the span,
    and ``fail`` turning a full disk into a hook error."""
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        from user_callback import DiskSpaceCheck
    finally:
        sys.path.remove(str(REPO_ROOT / "examples"))
    with pytest.raises(CallbackConfigError, match="min_free_gb"):
        DiskSpaceCheck(llm_config=None, min_free_gb=-1)
    fine = DiskSpaceCheck(llm_config=None, path=str(tmp_path / "not" / "yet"), min_free_gb=0)
    fine.run_callback_sync("on_before_node_init")
    full = DiskSpaceCheck(llm_config=None, path=str(tmp_path), min_free_gb=1e9, fail=True)
    with pytest.raises(Exception, match=r"DiskSpaceCheck .*only .* GB free"):
        full.run_callback_sync("on_before_node_init")


def _marked_pids() -> list[int]:
    """Processes started by a demo's Ray (they inherit its marker variable)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if any(item.startswith(MARKER_VAR.encode() + b"=") for item in environ.split(b"\0")):
            found.append(int(entry))
    return found


def _home_token_state() -> tuple[bool, int]:
    token = Path.home() / ".ray" / "auth_token"
    return (token.exists(), token.stat().st_mtime_ns if token.exists() else 0)


@pytest.mark.e2e
def test_demo_command_end_to_end(tmp_path: Path) -> None:
    from tests.conftest import _ensure_ray_down

    _ensure_ray_down()  # the demo needs the machine's memory, not a leftover Ray of ours
    folder = tmp_path / "demo"
    short_dirs_before = set(Path("/tmp").glob("llmotel-*"))
    token_before = _home_token_state()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "llm_otel_callbacks", "demo", "--dir", str(folder)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
        stdin=subprocess.DEVNULL, check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + "\n--- stderr ---\n" + proc.stderr[-4000:]

    # The waterfall, with every startup phase (engine_start comes from ObservedLLMServer),
    # and the phase table with the total.
    assert "Startup waterfall" in out and "replica startup" in out
    for phase in SPAN_PHASES:
        assert f"phase {phase}" in out, phase
    table = out.split("Phases (Timing):", 1)[1].split("\n\n", 1)[0]
    for phase in catalog.TIMING_PHASES:
        assert re.search(rf"^  {phase} +\d+\.\d+s", table, re.M), (phase, table)
    # Where engine start goes: its phases from vLLM's processes, and the share they explain.
    explained = re.search(r"Where engine start goes \(\d+\.\ds; the phases below explain "
                          r"(\d+)% of it\)", out)
    assert explained and int(explained.group(1)) >= 80, out[-4000:]
    for role, phase in (("engine core", catalog.PHASE_ENGINE_CORE_BOOT),
                        ("worker 0", catalog.PHASE_WORKER_WEIGHTS_LOAD),
                        ("replica", catalog.PHASE_ENGINE_CONFIG)):
        assert f"{phase} [{role}]" in out, (role, phase)  # in the waterfall, under engine start
    for step in range(1, 8):
        assert f"[{step}/7]" in out
    # It is the trace in the spans file, which the demo says where to find.
    spans_file = folder / "spans.jsonl"
    assert str(spans_file) in out
    traces = startup_traces(read_spans(spans_file))
    assert traces and traces[-1].root.trace_id in out
    # The download task's three parts are there when it got a new Ray worker (the demo's
    # usual case; a prestarted or reused worker has none).
    names = traces[-1].phase_names()
    assert SPAN_PHASES <= names <= SPAN_PHASES | set(catalog.DOWNLOAD_TASK_PHASES), names
    # The metrics endpoint and the dashboards, with how to import them.
    assert re.search(r"http://127\.0\.0\.1:\d+/metrics", out)
    assert catalog.STARTUP_PHASE_DURATION.exposed_name(ray=True) in out
    for path in dashboard_files():
        assert str(path) in out
    assert "Import" in out
    # Nothing left behind: processes, Ray's session, its token.
    assert "nothing left running" in out
    assert _marked_pids() == []
    for leftover in ("ray", "ray-temp"):
        assert not (folder / leftover).exists() and not (folder / leftover).is_symlink()
    assert not (folder / "auth_token").exists()
    assert set(Path("/tmp").glob("llmotel-*")) == short_dirs_before
    assert _home_token_state() == token_before
