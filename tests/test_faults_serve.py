"""Serving under faults on the real CPU Serve deployment (one Ray, two apps).

App ``burst``: ``ObservedLLMServer`` with a Composite of every built-in, two replicas on one
node, telemetry pointed at the in-test receiver, which goes down (its port closed) before the
burst under test; Serve's own tracing off. It carries the burst test, the two-replicas test and
the download-worker-reuse test.

App ``sig``: a replica whose last Composite child sleeps in ``on_before_node_init``; the test
sends SIGTERM to that replica and checks that the spans already ended reach the in-test OTLP
receiver within the exit flush bound.

The classes below are composite children named by dotted path; replicas and Ray task workers
import this module (the repo root is on their PYTHONPATH).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llm_otel_callbacks import RayServeLLMCallback, catalog
from llm_otel_callbacks.demo.ports import free_port
from tests._support.otlp_receiver import OtlpHttpReceiver
from tests._support.ray_env import LocalRay, scrape, start_local_ray
from tests._support.serve_app import VLLM_CPU_ENV, tiny_llm_config, wait_ready

pytestmark = pytest.mark.e2e

MODEL = "tiny"
SIG_MODEL = "tiny-sig"
_HERE = "tests.test_faults_serve"  # how replicas import this module
BURST_REQUESTS = 200
BURST_CONCURRENCY = 16
BURST_MAX_TOKENS = 4
SIG_FLUSH_BOUND_S = 5.0  # shutdown_timeout_s of the sig app (the settings default)


# --- test-only children (imported in replicas and task workers) --------------------------------

_SEEN_LOCK = threading.Lock()
_SEEN = {"requests": 0}  # requests this process's probe saw in on_llm_start


def process_report() -> dict[str, Any]:
    """What this process holds: tracer providers, our telemetry registry, ports, ids."""
    import gc

    import ray
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from llm_otel_callbacks.telemetry import providers

    # vLLM gc.freeze()s after its engine start, and get_objects() skips frozen objects.
    frozen = gc.get_freeze_count()
    if frozen:
        gc.unfreeze()
    sdk = [o for o in gc.get_objects() if isinstance(o, TracerProvider)]
    if frozen:
        gc.freeze()
    states = list(providers._STATES.values()) if os.getpid() == providers._STATE_PID else []
    rc = ray.get_runtime_context()
    return {
        "pid": os.getpid(),
        "worker_id": rc.get_worker_id(),
        "actor_id": rc.get_actor_id(),
        "sdk_tracer_providers": sorted(id(p) for p in sdk),
        "global_provider": type(trace.get_tracer_provider()).__name__,
        "states": [
            {"endpoint": s.settings.endpoint, "tracer_provider": id(s.tracer_provider),
             "telemetry": id(s), "prometheus_port": s.prometheus_port,
             "backends": [b.name for b in s.backends]}
            for s in states
        ],
    }


class Probe(RayServeLLMCallback):
    """Counts the requests of its process; on a request from user ``probe`` (and in every
    download hook) appends a :func:`process_report` line to ``kwargs["path"]``."""

    def _write(self, hook: str, **extra: Any) -> None:
        line = json.dumps({"hook": hook, **process_report(), **extra}) + "\n"
        with open(self.kwargs["path"], "a") as fh:
            fh.write(line)

    async def on_llm_start(self, prompt: Any, **kwargs: Any) -> None:
        with _SEEN_LOCK:
            _SEEN["requests"] += 1
            seen = _SEEN["requests"]
        if kwargs.get("user") == "probe":
            self._write("on_llm_start", requests_seen=seen, tag=self.kwargs.get("tag"))

    def on_before_download_model_files_distributed(self) -> None:
        self._write("download", tag=self.kwargs.get("tag"))


class SleepInNodeInit(RayServeLLMCallback):
    """Writes ``<dir>/pid-<pid>`` and blocks the replica's loop in ``on_before_node_init``."""

    def on_before_node_init(self) -> None:
        Path(self.kwargs["dir"], f"pid-{os.getpid()}").write_text(str(time.time()))
        time.sleep(600)


# --- the deployments --------------------------------------------------------------------------


def _burst_children(probe_path: Path, tag: str) -> list[dict[str, Any]]:
    return [
        {"callback_class": "llm_otel_callbacks.builtin.Timing"},
        {"callback_class": "llm_otel_callbacks.builtin.DownloadPolicy",
         "callback_kwargs": {"worker_node": "tokenizer_only"}},
        {"callback_class": "llm_otel_callbacks.builtin.CustomPlacementGroup",
         "callback_kwargs": {"bundles": [{"CPU": 1}], "strategy": "PACK", "ready_timeout_s": 120}},
        {"callback_class": "llm_otel_callbacks.builtin.TokenCounter"},
        {"callback_class": "llm_otel_callbacks.builtin.CostTracker",
         "callback_kwargs": {"prices": {MODEL: {"input": 1.0, "output": 2.0}}}},
        {"callback_class": "llm_otel_callbacks.builtin.RateLimiter",
         "callback_kwargs": {"requests_per_minute": 1_000_000, "tokens_per_minute": 100_000_000,
                             "key": "global"}},
        {"callback_class": "llm_otel_callbacks.builtin.StreamingProgress",
         "callback_kwargs": {"event_every": 2}},
        {"name": "probe", "callback_class": f"{_HERE}.Probe",
         "callback_kwargs": {"path": str(probe_path), "tag": tag}},
    ]


def _llm_config(model_id: str, model_dir: Path, env: dict[str, str], children: list[Any],
                telemetry: dict[str, Any], num_replicas: int) -> Any:
    callback_config: Any = {
        "callback_class": "llm_otel_callbacks.Composite",
        "callback_kwargs": {"callbacks": children, "telemetry": telemetry},
    }
    return tiny_llm_config(
        model_dir, callback_config, env, model_id=model_id,
        # A short graceful shutdown: the sig replica's loop is blocked and never drains.
        deployment_config={"num_replicas": num_replicas, "graceful_shutdown_timeout_s": 1},
        server_cls="llm_otel_callbacks.serve.ObservedLLMServer",
    )


@dataclass
class Env:
    ray: LocalRay
    base: str
    tmp: Path
    model_dir: Path
    env: dict[str, str]
    rx: OtlpHttpReceiver  # the collector: up for the first burst, then down
    probe_path: Path
    sent: int = 0  # requests sent to the burst app
    output_tokens: int = 0
    figures: dict[str, Any] = field(default_factory=dict)

    def records(self, hook: str | None = None) -> list[dict[str, Any]]:
        if not self.probe_path.exists():
            return []
        out = [json.loads(x) for x in self.probe_path.read_text().splitlines() if x]
        return [r for r in out if hook is None or r["hook"] == hook]

    def burst_telemetry(self) -> dict[str, Any]:
        return {"endpoint": self.rx.endpoint, "export_timeout_s": 2}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Env]:
    from ray import serve
    from ray.serve.llm import build_openai_app

    from tests.conftest import _ensure_ray_down

    _ensure_ray_down()
    tmp = tmp_path_factory.mktemp("faults-serve")
    envv = dict(VLLM_CPU_ENV)
    # Logical CPUs: two replicas (own group + CustomPlacementGroup's) plus the sig replica.
    run = start_local_ray(tmp / "ray", num_cpus=10, env=envv)
    rx = OtlpHttpReceiver(port=free_port()).start()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})  # Serve tracing off
        e = Env(run, f"http://127.0.0.1:{port}", tmp, tiny_model_dir, envv,
                rx=rx,
                probe_path=tmp / "probe.jsonl")
        config = _llm_config(MODEL, tiny_model_dir, envv, _burst_children(e.probe_path, "burst"),
                             e.burst_telemetry(), num_replicas=2)
        app = build_openai_app({
            "llm_configs": [config],
            "ingress_cls_config": {"ingress_cls": "llm_otel_callbacks.serve.ObservedOpenAiIngress"},
        })
        t0 = time.monotonic()
        serve.run(app, name="burst", route_prefix="/", blocking=False)
        wait_ready(e.base, 420)
        e.figures["burst_app_ready_s"] = round(time.monotonic() - t0, 1)
        yield e
        print(f"\n[test_faults_serve] figures: {json.dumps(e.figures)}")
    finally:
        try:
            serve.shutdown()
        finally:
            rx.fail_status = 503
            rx.stop()
            run.shutdown()


# --- 1. burst with the collector down ---------------------------------------------------------


async def _burst(base: str, n: int, concurrency: int) -> list[tuple[int, float, bool, int]]:
    """(status, seconds, saw [DONE], completion tokens) per streamed chat request."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    body = {"model": MODEL, "stream": True, "max_tokens": BURST_MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hello there model"}]}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one(i: int) -> tuple[int, float, bool, int]:
            async with sem:
                t0 = time.perf_counter()
                async with client.stream("POST", base + "/v1/chat/completions",
                                         json={**body, "user": f"b{i}"}) as resp:
                    lines = [ln async for ln in resp.aiter_lines() if ln.startswith("data: ")]
                    status = resp.status_code
                elapsed = time.perf_counter() - t0
            done = bool(lines) and lines[-1] == "data: [DONE]"
            tokens = 0
            for ln in lines[:-1]:
                chunk = json.loads(ln[len("data: "):])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
            return status, elapsed, done, tokens

        return await asyncio.gather(*(one(i) for i in range(n)))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _run_burst(env: Env) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = asyncio.run(_burst(env.base, BURST_REQUESTS, BURST_CONCURRENCY))
    wall = time.perf_counter() - t0
    env.sent += len(results)
    env.output_tokens += sum(r[3] for r in results)

    statuses = [r[0] for r in results]
    assert statuses == [200] * BURST_REQUESTS, {s: statuses.count(s) for s in set(statuses)}
    assert all(r[2] for r in results), "a stream did not end with [DONE]"
    assert all(r[3] == BURST_MAX_TOKENS for r in results)  # complete streams
    lat = [r[1] for r in results]
    return {"wall_s": round(wall, 2), "p50_s": round(statistics.median(lat), 3),
            "p99_s": round(_pct(lat, 0.99), 3), "max_s": round(max(lat), 3)}


def test_burst_with_collector_down_every_request_succeeds(env: Env) -> None:
    import socket

    import httpx

    # Warm-up (the first request pays for sampling setup); counted like any other.
    warm = httpx.post(env.base + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "max_tokens": 2, "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}]})
    assert warm.status_code == 200, warm.text
    env.sent += 1
    env.output_tokens += warm.json()["usage"]["completion_tokens"]
    figures: dict[str, Any] = {"requests": BURST_REQUESTS, "concurrency": BURST_CONCURRENCY}

    # Baseline, same deployment: the collector is up and receives every request span.
    figures["collector_up"] = _run_burst(env)

    def chats(spans: list[Any]) -> list[Any]:
        return [s for s in spans if s.attributes.get("gen_ai.operation.name") == "chat"]

    env.rx.wait_for_spans(lambda ss: len(chats(ss)) >= BURST_REQUESTS + 1, timeout=30)

    # The collector goes down: its port closes (connections the exporters still hold get
    # 503s), and the same burst runs again.
    env.rx.fail_status = 503
    env.rx.stop()
    port = env.rx.port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1)
    figures["collector_down"] = _run_burst(env)
    env.figures["burst"] = figures
    with pytest.raises(OSError):  # it stayed down throughout
        socket.create_connection(("127.0.0.1", port), 1)


# --- 2. two replicas on one node --------------------------------------------------------------


def _probe_until_both_replicas(env: Env, max_probes: int = 60) -> dict[int, dict[str, Any]]:
    """Probe requests until both replicas answered one; the last report per replica pid."""
    import httpx

    for _ in range(max_probes):
        resp = httpx.post(env.base + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 2, "temperature": 0, "user": "probe",
            "messages": [{"role": "user", "content": "probe"}]})
        assert resp.status_code == 200, resp.text
        env.sent += 1
        env.output_tokens += resp.json()["usage"]["completion_tokens"]
        last = {r["pid"]: r for r in env.records("on_llm_start")}
        if len(last) >= 2:
            return last
    raise AssertionError(f"probes reached one replica only: {sorted(last)}")


def _ours(name: str) -> bool:
    return "llm_callback" in name or "gen_ai" in name


def test_two_replicas_one_series_each_no_double_count(env: Env) -> None:
    reports = _probe_until_both_replicas(env)
    assert len(reports) == 2
    for rep in reports.values():
        # One tracer provider in each replica process: ours (the collector-down one), built
        # once; Serve tracing is off, so the global slot stays Ray's/OTel's proxy.
        (state,) = rep["states"]
        assert state["endpoint"] == env.rx.endpoint
        assert rep["sdk_tracer_providers"] == [state["tracer_provider"]], rep
        assert rep["global_provider"] == "ProxyTracerProvider"
        # Inside Ray metrics go through Ray's export port: no port of our own to clash on.
        assert state["prometheus_port"] is None and "prometheus" not in state["backends"]
        assert "ray" in state["backends"]
    # Every request went through exactly one replica's hooks.
    assert sum(r["requests_seen"] for r in reports.values()) == env.sent
    assert all(r["requests_seen"] > 0 for r in reports.values())

    url = env.ray.metrics_url
    deadline = time.monotonic() + 40
    while True:
        m = scrape(url)
        counts = m.get("ray_gen_ai_server_request_duration_seconds_count", [])
        if sum(v for _, v in counts) >= env.sent or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    time.sleep(2.5)  # two more report intervals: a double count would show now
    m = scrape(url)
    counts = m["ray_gen_ai_server_request_duration_seconds_count"]
    assert sum(v for _, v in counts) == env.sent, counts
    calls = [(lab, v) for lab, v in m["ray_llm_callback_hook_calls_total"]
             if lab.get("callback") == "probe" and lab.get("hook") == "on_llm_start"]
    assert sum(v for _, v in calls) == env.sent, calls
    tokens = [(lab, v) for lab, v in m["ray_llm_callback_tokens_total"]
              if lab.get("token_type") == "output"]
    assert sum(v for _, v in tokens) == env.output_tokens, tokens
    # No series exposed twice (same name and labels), anywhere in our metrics.
    for name, samples in m.items():
        if _ours(name):
            keys = [tuple(sorted(lab.items())) for lab, _ in samples]
            assert len(keys) == len(set(keys)), (name, samples)
    # One series per replica when Ray keeps its WorkerId label on user metrics.
    by_worker = {lab.get("WorkerId") for lab, _ in calls}
    env.figures["request_series_worker_ids"] = sorted(w or "" for w in by_worker)
    assert None not in by_worker, calls
    per_worker = {lab["WorkerId"]: v for lab, v in calls}
    assert per_worker == {r["worker_id"]: r["requests_seen"] for r in reports.values()}
    # Both replicas healthy, and no replica logged a port clash.
    logs = env.ray.logs_dir
    clashes = [p.name for p in logs.glob("*.err") if "Address already in use" in
               p.read_text(errors="replace")]
    assert not clashes, clashes


# --- 3. the callback built again in one worker process ----------------------------------------


def test_download_worker_reused_across_deployments(env: Env) -> None:
    """Ray reuses an idle task worker (same runtime_env) for the next download task: the
    per-node download hook of a second deployment with the same config, then of one with
    another telemetry config, runs in the process that served the first. Driven by Ray's own
    ``initialize_node`` (what VLLMEngine.start calls), from the driver."""
    import ray
    from ray.llm._internal.serve.utils.node_initialization_utils import initialize_node
    from ray.util.placement_group import remove_placement_group

    path = env.tmp / "reuse.jsonl"
    other_endpoint = f"http://127.0.0.1:{free_port()}"  # another config, also down

    def run_init(tag: str, telemetry: dict[str, Any]) -> dict[str, Any]:
        config = _llm_config(MODEL, env.model_dir, env.env,
                             [{"name": "probe", "callback_class": f"{_HERE}.Probe",
                               "callback_kwargs": {"path": str(path), "tag": tag}}],
                             telemetry, num_replicas=1)
        callback = config.get_or_create_callback()  # Ray makes the group here, as in a replica
        try:
            ray.get(callback.ctx.placement_group.ready(), timeout=60)
            asyncio.run(initialize_node(config))
        finally:
            remove_placement_group(callback.ctx.placement_group)
        lines = [json.loads(x) for x in path.read_text().splitlines() if x]
        (mine,) = [r for r in lines if r["tag"] == tag]
        return dict(mine)

    first = run_init("a1", env.burst_telemetry())
    second = run_init("a2", env.burst_telemetry())
    if second["pid"] != first["pid"]:  # a worker still starting may take the first task
        first, second = second, run_init("a3", env.burst_telemetry())
    assert second["pid"] == first["pid"], "Ray did not reuse the download task worker"
    # Another config in the same process. Ray may hand a task to another idle worker: try
    # again (a fresh tag each time) until the reused worker takes one; it does within a few.
    for attempt in range(4):
        other = run_init(f"b{attempt}", {"endpoint": other_endpoint, "export_timeout_s": 2})
        if other["pid"] == first["pid"]:
            break
    env.figures["download_worker_pids"] = [first["pid"], second["pid"], other["pid"]]
    assert other["pid"] == first["pid"], "Ray never reused the worker for another config"

    # Same config in the same process: the same telemetry and the one tracer provider.
    (s1,) = first["states"]
    assert second["states"] == first["states"]
    assert second["sdk_tracer_providers"] == first["sdk_tracer_providers"] == [
        s1["tracer_provider"]]
    assert second["global_provider"] == "ProxyTracerProvider"
    # Another config: its own telemetry beside the first, never replacing it.
    assert len(other["states"]) == 2 and other["states"][0] == s1
    assert {s["endpoint"] for s in other["states"]} == {env.rx.endpoint, other_endpoint}
    assert len(other["sdk_tracer_providers"]) == 2
    assert other["global_provider"] == "ProxyTracerProvider"
    assert all(s["prometheus_port"] is None for s in other["states"])

    # Counters continue in the reused process: the download-hook series counts every call
    # (the two replicas' own downloads plus ours), none lost, none twice.
    replica_downloads = len(env.records("download"))
    expected = replica_downloads + len([x for x in path.read_text().splitlines() if x])

    def calls(m: dict[str, Any]) -> list[tuple[dict[str, str], float]]:
        return [(lab, v) for lab, v in m.get("ray_llm_callback_hook_calls_total", [])
                if lab.get("callback") == "probe"
                and lab.get("hook") == "on_before_download_model_files_distributed"]

    deadline = time.monotonic() + 30
    while sum(v for _, v in calls(scrape(env.ray.metrics_url))) < expected:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    time.sleep(2.5)
    m = scrape(env.ray.metrics_url)
    got = calls(m)
    env.figures["download_hook_series"] = [(lab.get("WorkerId", ""), v) for lab, v in got]
    assert sum(v for _, v in got) == expected, got
    keys = [tuple(sorted(lab.items())) for lab, _ in got]
    assert len(keys) == len(set(keys)), got
    assert ray.is_initialized()


# --- 4. SIGTERM during node init --------------------------------------------------------------


def test_sigterm_during_node_init_flushes_ended_spans(env: Env) -> None:
    from ray import serve
    from ray.serve.llm import build_openai_app

    pids = env.tmp / "sig-pids"
    pids.mkdir()
    with OtlpHttpReceiver() as rx:
        children = [
            {"callback_class": "llm_otel_callbacks.builtin.Timing"},
            {"callback_class": "llm_otel_callbacks.builtin.DownloadPolicy",
             "callback_kwargs": {"worker_node": "tokenizer_only"}},
            {"name": "sleeper", "callback_class": f"{_HERE}.SleepInNodeInit",
             "callback_kwargs": {"dir": str(pids)}},
        ]
        telemetry = {
            "endpoint": rx.endpoint, "otlp_metrics": False, "service_name": "sig",
            # No periodic export before the exit: only the exit flush can deliver.
            "schedule_delay_ms": 600_000, "shutdown_timeout_s": SIG_FLUSH_BOUND_S,
        }
        config = _llm_config(SIG_MODEL, env.model_dir, env.env, children, telemetry,
                             num_replicas=1)
        # serve.run waits for the app to be running, which this one never is.
        serve._run(build_openai_app({"llm_configs": [config]}), name="sig",
                   route_prefix="/sig", _blocking=False)
        try:
            deadline = time.monotonic() + 180
            while not list(pids.iterdir()):
                assert time.monotonic() < deadline, "the sig replica never reached node init"
                time.sleep(0.2)
            (pid_file,) = list(pids.iterdir())
            pid = int(pid_file.name.split("-")[1])
            time.sleep(1.0)
            assert not rx.spans(), "spans left before the exit (schedule delay not in force)"

            sent_at = time.monotonic()
            killed_at = time.time()
            os.kill(pid, signal.SIGTERM)
            hook = catalog.SPAN_HOOK_PREFIX + "on_before_node_init"
            wanted = {f"{hook} Timing", f"{hook} DownloadPolicy",
                      catalog.SPAN_PHASE_PREFIX + catalog.PHASE_BEFORE_NODE_INIT,
                      catalog.SPAN_STARTUP}

            def arrived(spans: list[Any]) -> bool:
                return wanted <= {s.name for s in spans}

            spans = rx.wait_for_spans(arrived, timeout=SIG_FLUSH_BOUND_S + 15)
            took = time.monotonic() - sent_at
            env.figures["sigterm_to_spans_s"] = round(took, 2)
            assert took <= SIG_FLUSH_BOUND_S + 1.0, took
            mine = [s for s in spans if s.resource_attributes.get("process.pid") == pid]
            names = {s.name for s in mine}
            assert wanted <= names, names
            # The hook that was running never ended: it is not claimed to have.
            assert f"{hook} sleeper" not in names
            startup = next(s for s in mine if s.name == catalog.SPAN_STARTUP)
            assert startup.status_code == "STATUS_CODE_ERROR"
            assert "SIGTERM" in startup.status_message
            # One trace: the ended hook spans are under the startup span.
            for s in mine:
                assert s.trace_id == startup.trace_id
            # Our flush held Ray's handler no longer than the bound: Ray's own exit began.
            # (It then waits for the in-flight startup task to drain, which never happens
            # here: the replica lives on until Serve kills it. That part is Ray's.)
            began = _ray_exit_logged_at(env.ray.logs_dir, pid, timeout=10)
            env.figures["sigterm_to_ray_exit_s"] = round(began - killed_at, 2)
            assert began - killed_at <= SIG_FLUSH_BOUND_S + 1.0
            env.figures["replica_alive_after_sigterm"] = _alive(pid)
        finally:
            serve.delete("sig", _blocking=False)


def _ray_exit_logged_at(logs: Path, pid: int, timeout: float) -> float:
    """When the core worker of ``pid`` logged the start of its SIGTERM exit (epoch s)."""
    from datetime import datetime

    deadline = time.monotonic() + timeout
    while True:
        for log in logs.glob(f"python-core-worker-*_{pid}.log"):
            for line in log.read_text(errors="replace").splitlines():
                if "Executing worker exit" in line and "SIGTERM" in line:
                    stamp = line[1:24]  # [2026-11-22 08:39:34,100 ...
                    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        assert time.monotonic() < deadline, "Ray never began the replica's exit"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
