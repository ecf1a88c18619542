"""The core on real Ray: Ray's LLMConfig, get_or_create_callback() and initialize_node(),
so the download hook runs in a Ray task process after the pickle. Spans are checked after a
real OTLP/HTTP export, metrics after a real scrape of Ray's metrics export port."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llm_otel_callbacks import catalog
from llm_otel_callbacks.telemetry import reset_telemetry
from tests._support.flow import make_llm_config, remove_pg, start_like_vllm_engine
from tests._support.otlp_receiver import OtlpHttpReceiver
from tests._support.ray_env import wait_for_metric

HOOKS = (
    "on_before_node_init",
    "on_before_download_model_files_distributed",
    "on_after_node_init",
)


@pytest.fixture(autouse=True)
def _fresh_telemetry() -> Iterator[None]:
    # Telemetry is once per process; each test here points it at its own receiver.
    reset_telemetry()
    yield
    reset_telemetry()


def _telemetry(endpoint: str, otlp_metrics: bool = False) -> dict[str, object]:
    return {
        "endpoint": endpoint,
        "schedule_delay_ms": 100,
        "service_name": "core-test",
        "otlp_metrics": otlp_metrics,
        "metric_export_interval_ms": 200,
    }


def test_every_hook_is_one_trace_across_processes(
    ray_local, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver, tmp_path: Path
) -> None:
    llm_config = make_llm_config(
        tiny_model_dir,
        "tests.callbacks_for_tests.RecordingCallback",
        {"telemetry": _telemetry(otlp_receiver.endpoint, otlp_metrics=True),
         "report_dir": str(tmp_path)},
    )
    callback = start_like_vllm_engine(llm_config)
    try:
        spans = otlp_receiver.wait_for_spans(
            lambda ss: {s.attributes.get(catalog.A_HOOK) for s in ss} >= set(HOOKS)
            and any(s.name == catalog.SPAN_STARTUP for s in ss),
            timeout=60,
        )
    finally:
        remove_pg(callback)
    by_hook = {s.attributes[catalog.A_HOOK]: s for s in spans if catalog.A_HOOK in s.attributes}
    root = next(s for s in spans if s.name == catalog.SPAN_STARTUP)

    # One trace: the replica's startup span is the parent of every hook span.
    assert {s.trace_id for s in by_hook.values()} == {root.trace_id}
    assert all(s.parent_span_id == root.span_id for s in by_hook.values())

    for hook, span in by_hook.items():
        assert span.attributes[catalog.A_CLASS] == "tests.callbacks_for_tests.RecordingCallback"
        assert span.attributes[catalog.A_OUTCOME] == "ok"
        assert span.attributes[catalog.A_MODEL] == "tiny"
        assert span.status_code != "STATUS_CODE_ERROR", hook

    # The download hook ran in Ray's task process, not here, and its span says so.
    download = by_hook["on_before_download_model_files_distributed"]
    assert download.resource_attributes["process.pid"] != os.getpid()
    assert download.attributes[catalog.A_PID] != os.getpid()
    assert by_hook["on_before_node_init"].resource_attributes["process.pid"] == os.getpid()
    assert download.resource_attributes["service.name"] == "core-test"
    assert download.resource_attributes[catalog.R_RAY_NODE]

    # State set before the pickle was visible in the task process.
    (report,) = list(tmp_path.glob("download-*.txt"))
    marker, before_pid, task_pid = report.read_text().split("|")
    assert marker == "set-before-pickle"
    assert int(before_pid) == os.getpid()
    assert int(task_pid) != os.getpid()

    # Metrics, from both processes, through Ray's metrics system and its export port.
    calls = catalog.HOOK_CALLS.exposed_name(ray=True)
    samples = wait_for_metric(
        ray_local.metrics_url,
        calls,
        lambda ss: {lb.get("hook") for lb, _ in ss} >= set(HOOKS),
        timeout=60,
    )
    ours = [(labels, value) for labels, value in samples
            if labels.get("callback") == "RecordingCallback"]
    assert ours, samples
    assert all(labels["outcome"] == "ok" and labels["model"] == "tiny" and value >= 1
               for labels, value in ours), ours
    # And over OTLP too, since an endpoint is configured.
    otlp_calls = otlp_receiver.wait_for_metric(catalog.HOOK_CALLS.name, timeout=30)
    assert any(
        p["attributes"].get("hook") == HOOKS[0] for m in otlp_calls for p in m.points
    )
    duration = catalog.HOOK_DURATION.exposed_name(ray=True) + "_count"
    wait_for_metric(
        ray_local.metrics_url,
        duration,
        lambda ss: any(lb.get("hook") == HOOKS[1] for lb, _ in ss),
        timeout=60,
    )


def test_hook_error_raise_policy(
    ray_local, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver
) -> None:
    llm_config = make_llm_config(
        tiny_model_dir,
        "tests.callbacks_for_tests.RecordingCallback",
        {"telemetry": _telemetry(otlp_receiver.endpoint), "fail_after": True},
        raise_error_on_callback=True,
    )
    with pytest.raises(Exception, match=r"on_after_node_init.*after-init exploded"):
        start_like_vllm_engine(llm_config)
    remove_pg(llm_config.get_or_create_callback())
    spans = otlp_receiver.wait_for_spans(
        lambda ss: any(s.attributes.get(catalog.A_HOOK) == HOOKS[2] for s in ss)
        and any(s.name == catalog.SPAN_STARTUP for s in ss),
        timeout=30,
    )
    after = next(s for s in spans if s.attributes.get(catalog.A_HOOK) == HOOKS[2])
    assert after.attributes[catalog.A_OUTCOME] == "error"
    assert after.status_code == "STATUS_CODE_ERROR"
    assert "after-init exploded" in after.status_message
    assert any(name == "exception" for name, _ in after.events)
    # The failure ended the replica's startup span with an error too.
    root = next(s for s in spans if s.name == catalog.SPAN_STARTUP)
    assert root.status_code == "STATUS_CODE_ERROR"


def test_hook_error_log_policy(
    ray_local, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver, caplog
) -> None:
    llm_config = make_llm_config(
        tiny_model_dir,
        "tests.callbacks_for_tests.RecordingCallback",
        {"telemetry": _telemetry(otlp_receiver.endpoint), "fail_after": True},
        raise_error_on_callback=False,
    )
    callback = start_like_vllm_engine(llm_config)  # does not raise: Ray's log policy
    remove_pg(callback)
    spans = otlp_receiver.wait_for_spans(
        lambda ss: any(s.name == catalog.SPAN_STARTUP for s in ss), timeout=30
    )
    after = next(s for s in spans if s.attributes.get(catalog.A_HOOK) == HOOKS[2])
    assert after.attributes[catalog.A_OUTCOME] == "error"
    root = next(s for s in spans if s.name == catalog.SPAN_STARTUP)
    assert root.status_code != "STATUS_CODE_ERROR"  # the replica went on starting


def test_async_download_hook_in_a_ray_task_is_awaited_inside_its_span(
    ray_local, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver
) -> None:
    """Ray calls the download hook with run_callback_sync in a Ray task (no running loop
    there, so stock Ray runs it too): ours awaits the coroutine inside the hook's span, which
    is exported from the task's process. The running-loop defect of Ray's sync path is
    test_core_unit::test_async_hook_via_sync_path_inside_running_loop_fixed."""
    llm_config = make_llm_config(
        tiny_model_dir,
        "tests.callbacks_for_tests.AsyncDownloadCallback",
        {"telemetry": _telemetry(otlp_receiver.endpoint)},
    )
    callback = start_like_vllm_engine(llm_config)
    remove_pg(callback)
    span = otlp_receiver.wait_for_span(
        catalog.SPAN_HOOK_PREFIX + HOOKS[1], timeout=60
    )
    assert span.attributes[catalog.A_OUTCOME] == "ok"
    assert span.duration_s >= 0.01  # the coroutine's sleep really ran


class _Blackhole:
    """A collector that accepts connections and never answers: the worst case."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                return

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@pytest.mark.parametrize("collector", ["refused", "blackhole"])
def test_dead_or_slow_collector_never_slows_hooks(
    ray_local, tiny_model_dir: Path, collector: str
) -> None:
    """Exports wait up to export_timeout_s (3 s here) on a dead collector; a hook that waited
    for one would take that long. Every call must stay far below it."""
    hole = _Blackhole() if collector == "blackhole" else None
    endpoint = hole.endpoint if hole else f"http://127.0.0.1:{_dead_port()}"
    try:
        llm_config = make_llm_config(
            tiny_model_dir,
            "tests.callbacks_for_tests.RecordingCallback",
            {"telemetry": {"endpoint": endpoint, "schedule_delay_ms": 10,
                           "export_timeout_s": 3.0}},
        )
        callback = llm_config.get_or_create_callback()
        import asyncio

        durations = []
        for _ in range(30):
            t0 = time.perf_counter()
            asyncio.run(callback.run_callback("on_before_node_init"))
            durations.append(time.perf_counter() - t0)
            time.sleep(0.02)  # let the export thread try (and hang) in between
        remove_pg(callback)
        assert max(durations) < 1.0, durations
    finally:
        if hole:
            hole.close()


# --- several nodes on this machine (keep after every ray_local test: one Ray per driver) ---


@pytest.mark.cluster
def test_download_hook_on_every_node_joins_one_trace(
    ray_two_nodes, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver, tmp_path: Path
) -> None:
    llm_config = make_llm_config(
        tiny_model_dir,
        "tests.callbacks_for_tests.RecordingCallback",
        {"telemetry": _telemetry(otlp_receiver.endpoint), "report_dir": str(tmp_path)},
        bundles=[{"CPU": 1}, {"CPU": 1}],
        strategy="STRICT_SPREAD",
    )
    callback = start_like_vllm_engine(llm_config)
    remove_pg(callback)
    spans = otlp_receiver.wait_for_spans(
        lambda ss: sum(s.attributes.get(catalog.A_HOOK) == HOOKS[1] for s in ss) == 2
        and any(s.name == catalog.SPAN_STARTUP for s in ss),
        timeout=90,
    )
    root = next(s for s in spans if s.name == catalog.SPAN_STARTUP)
    downloads = [s for s in spans if s.attributes.get(catalog.A_HOOK) == HOOKS[1]]
    nodes = {s.resource_attributes[catalog.R_RAY_NODE] for s in downloads}
    assert nodes == {n.node_id for n in ray_two_nodes.nodes}  # one task per node
    assert {s.trace_id for s in downloads} == {root.trace_id}
    assert all(s.parent_span_id == root.span_id for s in downloads)
    assert len(list(tmp_path.glob("download-*.txt"))) == 2
    # Each node's metrics agent exports its own task's hook metrics.
    calls = catalog.HOOK_CALLS.exposed_name(ray=True)
    for node in ray_two_nodes.nodes:
        wait_for_metric(
            node.metrics_url, calls,
            lambda ss: any(lb.get("hook") == HOOKS[1] for lb, _ in ss), timeout=60,
        )



@ray.remote(num_cpus=0)
def _start_as_replica(llm_config: object) -> str | None:
    # The replica's side of the flow, run on the node this task is pinned to (a Serve replica
    # may live on any node of the group). Returns the node the Composite took as its own.
    callback = start_like_vllm_engine(llm_config)
    remove_pg(callback)
    return callback.replica_node_id  # type: ignore[no-any-return]


@pytest.mark.cluster
def test_seed_local_node_download_model_is_the_policy_of_the_replicas_node_only(
    ray_two_nodes, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Seed 000's LocalNodePolicy sets local_node_download_model=TOKENIZER_ONLY and
    # worker_node_download_model=EXCLUDE_SAFETENSORS; PolicyProbe records, in each node's
    # download task, the policy Ray's download_model_files received, with that task's node.
    events = tmp_path / "events.jsonl"
    seeds = "tests.seed_callbacks."
    llm_config = make_llm_config(
        tiny_model_dir, "llm_otel_callbacks.Composite",
        {"callbacks": [seeds + "LocalNodePolicy", seeds + "PolicyProbe"]},
        bundles=[{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD",
        runtime_env={"env_vars": {"SEED_EVENTS": str(events)}},
    )
    nodes = [n.node_id for n in ray_two_nodes.nodes]
    # The replica on each node in turn (one runtime env, so the second run reuses workers):
    # the local policy follows the replica, it is not tied to the head or the first bundle.
    for replica in nodes:
        events.write_text("")
        pinned = NodeAffinitySchedulingStrategy(node_id=replica, soft=False)
        task = _start_as_replica.options(scheduling_strategy=pinned).remote(llm_config)
        assert ray.get(task, timeout=120) == replica
        evs = [json.loads(line) for line in events.read_text().splitlines()]
        assert len(evs) == 2  # one download task per node, nothing else recorded
        policy = {e["node"]: e["download_model"] for e in evs}
        assert policy == {
            n: "TOKENIZER_ONLY" if n == replica else "EXCLUDE_SAFETENSORS" for n in nodes
        }, f"replica on {replica}"
