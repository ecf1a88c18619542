"""The vllm.general_plugins entry point: which vLLM points it needs, inert by default, and
engine starts in real vLLM processes (a plain one, and a failed one with two workers).

The phases of a successful start in a real Serve deployment with ObservedLLMServer (trace,
coverage, metrics) are checked on the module-scoped deployment of tests/test_serve_e2e.py.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llm_otel_callbacks import catalog
from tests._support.otlp_receiver import OtlpHttpReceiver, ReceivedSpan

ROOT = Path(__file__).resolve().parent.parent


# --- the points (vLLM 0.29): a renamed one would shrink the breakdown ----------------------------


def test_vllm_0_29_has_every_point_the_engine_phases_hook():
    from vllm.compilation.backends import VllmBackend
    from vllm.v1.engine.core import EngineCore, EngineCoreProc
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    from llm_otel_callbacks.vllm_plugin._points import WORKER_NESTED_POINTS, WORKER_POINTS

    for method, _ in WORKER_POINTS:
        assert callable(getattr(CPUWorker, method)), method
    assert {m for _, _, m, _ in WORKER_NESTED_POINTS} == {"__call__", "capture_model"}
    assert callable(VllmBackend.__call__) and callable(GPUModelRunner.capture_model)
    assert callable(EngineCore._initialize_kv_caches) and callable(EngineCoreProc.run_busy_loop)
    assert callable(EngineCoreProc.process_input_sockets)
    assert callable(Executor.__init__)
    # The call sites the role comes from: vLLM loads its plugins there, with these locals.
    init_worker = inspect.getsource(WorkerWrapperBase.init_worker)
    assert "load_general_plugins()" in init_worker and "kwargs = all_kwargs" in init_worker
    core_init = inspect.getsource(EngineCore.__init__)
    assert "load_general_plugins()" in core_init
    assert "executor_class" in inspect.signature(EngineCore.__init__).parameters


def test_a_renamed_point_shrinks_the_breakdown_with_one_debug_line(caplog):
    from llm_otel_callbacks.vllm_plugin import _points

    class Worker:  # a "vLLM" whose worker lacks two of the points
        def init_device(self) -> None: ...
        def load_model(self) -> None: ...
        def compile_or_warm_up_model(self) -> None: ...

    class Recorder:
        role = catalog.ROLE_WORKER

        def __init__(self) -> None:
            self.seen: list[str] = []

        def begin(self, phase: str, start_ns: int | None = None) -> int:
            self.seen.append(phase)
            return len(self.seen)

        def end(self, token: Any, error: Any = None, attrs: Any = None,
                end_ns: Any = None) -> None: ...

    recorder = Recorder()
    config = type("C", (), {"parallel_config": type("P", (), {
        "worker_cls": f"{__name__}.{Worker.__qualname__}"})()})()
    original = _points._worker_class
    _points._worker_class = lambda _: Worker  # type: ignore[assignment]
    try:
        with caplog.at_level("DEBUG", logger=_points.__name__):
            missing = _points.install(recorder, {"vllm_config": config})  # type: ignore[arg-type]
    finally:
        _points._worker_class = original
    assert set(missing) >= {catalog.PHASE_WORKER_KV_PROFILE, catalog.PHASE_WORKER_KV_ALLOCATE}
    assert len([r for r in caplog.records if r.name == _points.__name__]) == 1
    Worker().init_device()
    Worker().load_model()
    assert recorder.seen == [catalog.PHASE_WORKER_INIT, catalog.PHASE_WORKER_DEVICE_INIT,
                             catalog.PHASE_WORKER_WEIGHTS_LOAD]


# --- inert unless asked -------------------------------------------------------------------------

_INERT = """
import importlib.metadata as md, logging, os, sys, threading, time
records = []
class H(logging.Handler):
    def emit(self, record): records.append(record.getMessage())
logging.getLogger().addHandler(H()); logging.getLogger().setLevel(logging.DEBUG)
threads = threading.active_count(); files = set(os.listdir('.'))
(ep,) = [e for e in md.entry_points(group='vllm.general_plugins') if e.name == 'llm_otel_callbacks']
t0 = time.perf_counter(); ep.load()(); cost = time.perf_counter() - t0
import json
print(json.dumps([cost, threading.active_count() - threads, len(records),
                  sorted(set(os.listdir('.')) - files), 'llm_otel_callbacks' in sys.modules,
                  'opentelemetry' in sys.modules]))
"""


def test_entry_point_is_inert_and_cheap_without_the_replicas_request(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "LLM_OTEL_CALLBACKS_ENGINE_PHASES"}
    out = subprocess.run([sys.executable, "-c", _INERT], cwd=tmp_path, env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    cost, threads, logs, files, package, otel = json.loads(out)
    print(f"\nentry point import + register() with nothing configured: {cost * 1e3:.2f} ms")
    assert (threads, logs, files, package, otel) == (0, 0, [], False, False)
    assert cost < 0.05  # one small module and one os.environ lookup


# --- real engine starts in their own processes ----------------------------------------------------


def _probe(*args: str, kv_cache_gib: str = "1", timeout: float = 600) -> dict[str, Any]:
    out = Path(args[2])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "VLLM_CPU_KVCACHE_SPACE": kv_cache_gib}
    proc = subprocess.run([sys.executable, "-m", "tests._support.engine_probe", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.exists(), proc.stderr[-8000:]
    result: dict[str, Any] = json.loads(out.read_text())
    result["stderr"] = proc.stderr
    return result


@pytest.mark.e2e
def test_plain_vllm_boots_unchanged_with_the_package_installed(tiny_model_dir: Path,
                                                             tmp_path: Path):
    env_before = os.environ.get("LLM_OTEL_CALLBACKS_ENGINE_PHASES")
    assert env_before is None
    r = _probe("plain", str(tiny_model_dir), str(tmp_path / "plain.json"))
    assert r["text_tokens"] == 4
    assert r["plugin_module_loaded"]  # vLLM did load our entry point ...
    assert not r["package_imported"]  # ... which returned without importing the package
    assert not [t for t in r["new_threads"] if "llm_otel" in t.lower() or "span" in t.lower()]
    assert "llm_otel" not in r["stderr"]  # not one log line, in any of vLLM's processes


@pytest.mark.e2e
def test_failed_start_with_two_workers_names_the_failing_phase(tiny_model_dir: Path,
                                                               tmp_path: Path):
    """Tensor parallel 2 on the CPU build, with more KV cache asked for than the machine has:
    both workers fail profiling memory for it. Each worker's phases appear once, with its
    rank; the failing ones end with an error status; the engine start names the phase."""
    with OtlpHttpReceiver() as rx:
        r = _probe("replica", str(tiny_model_dir), str(tmp_path / "failed.json"),
                   rx.endpoint, "2", kv_cache_gib="100000")
        engine = _wait_engine(rx)
        spans = rx.wait_for_spans(lambda ss: _phase_count(ss, engine) >= 12, 30)
    assert r["error"] and r["failed_phase"] == catalog.PHASE_WORKER_KV_PROFILE, r
    assert engine.attributes[catalog.A_FAILED_PHASE] == catalog.PHASE_WORKER_KV_PROFILE
    phases = [s for s in spans if s.parent_span_id == engine.span_id]
    workers = [s for s in phases if s.attributes[catalog.A_ENGINE_ROLE] == catalog.ROLE_WORKER]
    per_rank: dict[int, list[str]] = {}
    for s in workers:
        per_rank.setdefault(s.attributes[catalog.A_ENGINE_RANK], []).append(
            s.attributes[catalog.A_PHASE])
    before = [catalog.PHASE_WORKER_BOOT, catalog.PHASE_WORKER_INIT,
              catalog.PHASE_WORKER_DEVICE_INIT, catalog.PHASE_WORKER_WEIGHTS_LOAD,
              catalog.PHASE_WORKER_KV_PROFILE]
    assert set(per_rank) == {0, 1}
    for rank, names in per_rank.items():
        assert sorted(names) == sorted(before), (rank, names)  # each once, none after
    assert len({s.resource_attributes["process.pid"] for s in workers}) == 2
    for s in workers:
        failing = s.attributes[catalog.A_PHASE] == catalog.PHASE_WORKER_KV_PROFILE
        assert (s.status_code == "STATUS_CODE_ERROR") == failing, s
    kv_profile = catalog.PHASE_WORKER_KV_PROFILE
    failed = [s for s in workers if s.attributes[catalog.A_PHASE] == kv_profile]
    assert len(failed) == 2, failed  # one per rank
    assert all("ValueError" in s.status_message and "kv cache" in s.status_message.lower()
               for s in failed), [s.status_message for s in failed]
    core = {s.attributes[catalog.A_PHASE]: s for s in phases
            if s.attributes[catalog.A_ENGINE_ROLE] == catalog.ROLE_ENGINE_CORE}
    assert core[catalog.PHASE_ENGINE_KV_CACHE].status_code == "STATUS_CODE_ERROR"
    assert catalog.PHASE_ENGINE_CORE_SETUP not in core  # never reached
    assert core[catalog.PHASE_ENGINE_WORKERS_START].status_code != "STATUS_CODE_ERROR"


def _wait_engine(rx: OtlpHttpReceiver) -> ReceivedSpan:
    spans = rx.wait_for_spans(
        lambda ss: any(s.name == catalog.SPAN_ENGINE_START for s in ss), 30)
    return next(s for s in spans if s.name == catalog.SPAN_ENGINE_START)


def _phase_count(spans: list[ReceivedSpan], engine: ReceivedSpan) -> int:
    time.sleep(0)  # the predicate runs under the receiver's lock; keep it cheap
    return sum(1 for s in spans if s.parent_span_id == engine.span_id)


# --- the replica's accounting, from reports (no vLLM) ---------------------------------------------


def test_replica_accounts_reports_names_the_failed_phase_and_restores_its_environment(
    tmp_path: Path,
):
    from llm_otel_callbacks.demo.waterfall import read_spans
    from llm_otel_callbacks.telemetry import TelemetrySettings
    from llm_otel_callbacks.telemetry.providers import Telemetry
    from llm_otel_callbacks.vllm_plugin._replica import EnginePhases
    from llm_otel_callbacks.vllm_plugin._wire import (
        ENV_CONFIG,
        ENV_TRACEPARENT,
        EngineEnv,
        PhaseReport,
        Reporter,
    )

    spans_file = tmp_path / "spans.jsonl"
    tel = Telemetry(TelemetrySettings(traces_file=str(spans_file), metrics_backend="none"))
    try:
        t0 = time.time_ns()
        span = tel.tracer.start_span(catalog.SPAN_ENGINE_START, start_time=t0)
        phases = EnginePhases.open("m", tel, span, t0)
        assert phases is not None
        env = EngineEnv.from_environ()  # what vLLM's processes inherit
        assert env is not None and env.model == "m" and os.environ[ENV_TRACEPARENT]
        s = 1_000_000_000
        reporter = Reporter(env.report_port)
        for report in (
            PhaseReport(catalog.PHASE_ENGINE_CORE_BOOT, catalog.ROLE_ENGINE_CORE, 11,
                        t0 + s // 10, t0 + 2 * s),
            PhaseReport(catalog.PHASE_WORKER_WEIGHTS_LOAD, catalog.ROLE_WORKER, 12,
                        t0 + 2 * s, None, rank=0),  # begun, never ended: the worker died
            PhaseReport(catalog.PHASE_ENGINE_WORKERS_START, catalog.ROLE_ENGINE_CORE, 11,
                        t0 + 2 * s, t0 + 3 * s, error="RuntimeError: worker died"),
        ):
            reporter.send(report)
        phases.close(t0 + 4 * s, RuntimeError("engine core initialization failed"))
        span.end(end_time=t0 + 4 * s)
    finally:
        tel.shutdown()
    assert ENV_CONFIG not in os.environ and ENV_TRACEPARENT not in os.environ
    # The worker's phase left open is more precise than the engine core's that waited for it.
    assert phases.failed_phase == catalog.PHASE_WORKER_WEIGHTS_LOAD
    by_name = {sp.name: sp for sp in read_spans(spans_file)}
    config = by_name[catalog.SPAN_PHASE_PREFIX + catalog.PHASE_ENGINE_CONFIG]
    assert config.end_ns == t0 + s // 10 and not config.failed  # until the engine core began
    stand_in = by_name[catalog.SPAN_PHASE_PREFIX + catalog.PHASE_WORKER_WEIGHTS_LOAD]
    assert stand_in.failed and stand_in.attributes[catalog.A_PID] == 12
    assert stand_in.attributes[catalog.A_ENGINE_RANK] == 0
    assert catalog.SPAN_PHASE_PREFIX + catalog.PHASE_ENGINE_FRONTEND_READY not in by_name
    engine = by_name[catalog.SPAN_ENGINE_START]
    assert engine.attributes[catalog.A_FAILED_PHASE] == catalog.PHASE_WORKER_WEIGHTS_LOAD
    assert engine.attributes[catalog.A_PHASE_COVERAGE] == 1.0  # 0-0.1-2-3-4 s, all covered
