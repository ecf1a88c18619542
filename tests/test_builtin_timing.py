"""Timing on real Ray: Ray's LLMConfig, get_or_create_callback() and initialize_node(), spans
after a real OTLP/HTTP export, metrics after a real scrape of Ray's metrics export port."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from llm_otel_callbacks import CallbackConfigError, catalog
from llm_otel_callbacks.builtin import Timing
from llm_otel_callbacks.telemetry import reset_telemetry
from tests._support.flow import make_llm_config, remove_pg, start_like_vllm_engine
from tests._support.otlp_receiver import OtlpHttpReceiver, ReceivedSpan
from tests._support.ray_env import select, wait_for_metric

PHASE_COUNT = catalog.STARTUP_PHASE_DURATION.exposed_name(ray=True) + "_count"
PHASE_BUCKET = catalog.STARTUP_PHASE_DURATION.exposed_name(ray=True) + "_bucket"
STARTING = catalog.REPLICAS_STARTING.exposed_name(ray=True)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpHttpReceiver]:
    # One receiver for the module: Ray reuses its task workers, and a worker's telemetry
    # is built once, pointing at the first endpoint it saw.
    reset_telemetry()
    with OtlpHttpReceiver() as rx:
        yield rx
    reset_telemetry()


def _kwargs(rx: OtlpHttpReceiver, **extra: Any) -> dict[str, Any]:
    return {
        "telemetry": {"endpoint": rx.endpoint, "schedule_delay_ms": 100,
                      "service_name": "builtin-timing"},
        **extra,
    }


def _trace_id(callback: Any) -> str:
    owner = callback.startup_owner or callback
    return str(owner.trace_carrier["traceparent"].split("-")[1])


def _spans(rx: OtlpHttpReceiver, trace_id: str, want: set[str], timeout: float = 60) -> dict[
    str, list[ReceivedSpan]
]:
    """Spans of one trace by name, once every name in ``want`` has arrived."""

    def ready(spans: list[ReceivedSpan]) -> bool:
        return want <= {s.name for s in spans if s.trace_id == trace_id}

    out: dict[str, list[ReceivedSpan]] = {}
    for span in rx.wait_for_spans(ready, timeout=timeout):
        if span.trace_id == trace_id:
            out.setdefault(span.name, []).append(span)
    return out


def _phase(name: str) -> str:
    return catalog.SPAN_PHASE_PREFIX + name


# --- construction ----------------------------------------------------------------------------


def test_kwargs_are_validated_at_construction() -> None:
    with pytest.raises(CallbackConfigError) as err:
        Timing(llm_config=None, summary_log_level="loud")
    message = str(err.value)
    assert "summary_log_level" in message
    for level in ("DEBUG", "INFO", "WARNING"):
        assert level in message
    with pytest.raises(CallbackConfigError, match="warn_after_s"):
        Timing(llm_config=None, warn_after_s=0)
    with pytest.raises(CallbackConfigError, match="bogus"):
        Timing(llm_config=None, bogus=1)
    # Enum values in any case.
    assert Timing(llm_config=None, summary_log_level="warning").options.summary_log_level == (
        "WARNING"
    )


# --- the waterfall ---------------------------------------------------------------------------


def test_waterfall_after_real_initialize_node(
    ray_local: Any, tiny_model_dir: Path, receiver: OtlpHttpReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ray.llm._internal.serve.utils.node_initialization_utils import initialize_node

    llm_config = make_llm_config(
        tiny_model_dir, "llm_otel_callbacks.builtin.Timing", _kwargs(receiver)
    )
    callback = llm_config.get_or_create_callback()
    seen_starting: list[float] = []

    async def like_vllm_engine_start() -> None:
        await callback.run_callback("on_before_node_init")
        # Between the hooks the replica counts as starting.
        samples = wait_for_metric(
            ray_local.metrics_url, STARTING,
            lambda ss: any(v == 1 for _, v in select(ss, model="tiny")), timeout=30,
        )
        seen_starting.extend(v for _, v in select(samples, model="tiny"))
        ray.get(callback.ctx.placement_group.ready(), timeout=60)
        await initialize_node(llm_config)
        await callback.run_callback("on_after_node_init")

    t0 = time.time_ns()
    with caplog.at_level(logging.INFO, logger="llm_otel_callbacks.builtin.timing"):
        try:
            asyncio.run(like_vllm_engine_start())
        finally:
            remove_pg(callback)
    elapsed_s = (time.time_ns() - t0) / 1e9
    assert 1 in seen_starting

    spans = _spans(receiver, _trace_id(callback), {
        catalog.SPAN_STARTUP, _phase(catalog.PHASE_BEFORE_NODE_INIT),
        _phase(catalog.PHASE_NODE_INIT), _phase(catalog.PHASE_DOWNLOAD_TASK_START),
    })
    (root,) = spans[catalog.SPAN_STARTUP]
    (before,) = spans[_phase(catalog.PHASE_BEFORE_NODE_INIT)]
    (node_init,) = spans[_phase(catalog.PHASE_NODE_INIT)]
    (task_start,) = spans[_phase(catalog.PHASE_DOWNLOAD_TASK_START)]
    for span in (before, node_init, task_start):
        assert span.parent_span_id == root.span_id
        assert span.status_code != "STATUS_CODE_ERROR"
        assert span.attributes[catalog.A_OUTCOME] == "ok"
        assert span.attributes[catalog.A_MODEL] == "tiny"

    # Boundaries are the real moments: creation, on_before_node_init, the task's hook.
    assert before.start_time_unix_nano == callback.created_at_ns
    assert before.end_time_unix_nano == callback.node_init_started_ns
    assert node_init.start_time_unix_nano == callback.node_init_started_ns
    assert task_start.start_time_unix_nano == callback.node_init_started_ns
    # The task started inside node init, and node init fits in what the test measured.
    assert 0 < task_start.duration_s <= node_init.duration_s
    assert node_init.duration_s < elapsed_s
    # Measured where the download hook ran: Ray's task process, on this node.
    assert task_start.resource_attributes["process.pid"] != os.getpid()
    assert task_start.attributes[catalog.A_NODE_ID] == ray_local.node_id
    assert node_init.resource_attributes["process.pid"] == os.getpid()

    # Histograms, labelled by phase (and node for the per-node phase), via Ray's exporter.
    counts = wait_for_metric(
        ray_local.metrics_url, PHASE_COUNT,
        lambda ss: {lb.get("phase") for lb, _ in select(ss, model="tiny", outcome="ok")}
        >= {"before_node_init", "node_init", "download_task_start", "total"},
        timeout=60,
    )
    per_node = select(counts, phase="download_task_start", node=ray_local.node_id)
    assert per_node and per_node[0][1] >= 1
    # The observation sits in the bucket of the span's duration (Ray's exported _sum is
    # rebuilt from bucket midpoints, so the buckets are what can be checked exactly).
    buckets = select(
        wait_for_metric(ray_local.metrics_url, PHASE_BUCKET, timeout=30),
        model="tiny", phase="download_task_start",
    )
    by_le = {float(lb["le"]): v for lb, v in buckets}
    upper = min(b for b in catalog.PHASE_BUCKETS if b >= task_start.duration_s)
    assert by_le[upper] == 1
    # Every bucket below the duration is empty (none may be, for a very short phase).
    below = [by_le[b] for b in catalog.PHASE_BUCKETS if b < task_start.duration_s]
    assert below == [0] * len(below)
    # Startup over: no longer counted as starting.
    wait_for_metric(
        ray_local.metrics_url, STARTING,
        lambda ss: all(v == 0 for _, v in select(ss, model="tiny")), timeout=30,
    )

    summaries = [r for r in caplog.records if "started in" in r.getMessage()]
    assert len(summaries) == 1
    assert summaries[0].levelno == logging.INFO
    text = summaries[0].getMessage()
    assert "model 'tiny'" in text and "before_node_init" in text and "node_init" in text


def test_failed_startup_ends_open_phases_with_error(
    ray_local: Any, tiny_model_dir: Path, receiver: OtlpHttpReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As a Composite child: a sibling's download hook fails on the node, Ray's
    initialize_node raises, on_after_node_init never runs; the server wrapper (here the test)
    reports the failure with end_startup(error)."""
    llm_config = make_llm_config(
        tiny_model_dir, "llm_otel_callbacks.Composite",
        _kwargs(receiver, callbacks=[
            "llm_otel_callbacks.builtin.Timing", "tests.builtin_probes.FailingDownload",
        ]),
    )
    with pytest.raises(Exception, match="disk full") as failure:
        start_like_vllm_engine(llm_config)
    composite = llm_config.get_or_create_callback()
    remove_pg(composite)
    timing = composite.children[0].instance
    assert isinstance(timing, Timing)
    with caplog.at_level(logging.INFO, logger="llm_otel_callbacks.builtin.timing"):
        composite.end_startup(failure.value)

    spans = _spans(receiver, _trace_id(timing), {
        catalog.SPAN_STARTUP, _phase(catalog.PHASE_NODE_INIT),
        _phase(catalog.PHASE_DOWNLOAD_TASK_START),
    })
    (node_init,) = spans[_phase(catalog.PHASE_NODE_INIT)]
    assert node_init.status_code == "STATUS_CODE_ERROR"
    assert node_init.attributes[catalog.A_OUTCOME] == "error"
    assert "disk full" in node_init.status_message
    (root,) = spans[catalog.SPAN_STARTUP]
    assert root.status_code == "STATUS_CODE_ERROR"
    assert node_init.parent_span_id == root.span_id
    # The node's task did start (the failure came after): that phase is fine.
    (task_start,) = spans[_phase(catalog.PHASE_DOWNLOAD_TASK_START)]
    assert task_start.status_code != "STATUS_CODE_ERROR"

    counts = wait_for_metric(
        ray_local.metrics_url, PHASE_COUNT,
        lambda ss: bool(select(ss, model="tiny", phase="total", outcome="error"))
        and bool(select(ss, model="tiny", phase="node_init", outcome="error")),
        timeout=60,
    )
    assert select(counts, phase="total", outcome="error")[0][1] >= 1
    failed = [r for r in caplog.records if "failed after" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert "node_init" in failed[0].getMessage() and "(error)" in failed[0].getMessage()


def test_subclass_adds_its_own_phase(
    ray_local: Any, tiny_model_dir: Path, receiver: OtlpHttpReceiver
) -> None:
    """examples/timing_subclass.py: a per-node phase through record_phase()."""
    llm_config = make_llm_config(
        tiny_model_dir, "examples.timing_subclass.StorageProbeTiming", _kwargs(receiver)
    )
    callback = start_like_vllm_engine(llm_config)
    remove_pg(callback)
    spans = _spans(receiver, _trace_id(callback), {
        _phase("storage_probe"), _phase(catalog.PHASE_DOWNLOAD_TASK_START),
    })
    (probe,) = spans[_phase("storage_probe")]
    (task_start,) = spans[_phase(catalog.PHASE_DOWNLOAD_TASK_START)]
    assert probe.attributes[catalog.A_NODE_ID] == ray_local.node_id
    assert probe.parent_span_id == task_start.parent_span_id  # same startup trace
    assert probe.start_time_unix_nano >= task_start.end_time_unix_nano
    assert probe.resource_attributes["process.pid"] != os.getpid()
    wait_for_metric(
        ray_local.metrics_url, PHASE_COUNT,
        lambda ss: bool(select(ss, phase="storage_probe", node=ray_local.node_id)), timeout=60,
    )


def test_download_task_start_split_from_ray_worker_mains_times(monkeypatch: Any) -> None:
    """Ray's default_worker main keeps --worker-launch-time-ms (args) and
    worker_launched_time_ms: the task's own process reads them."""
    import sys
    import types

    from llm_otel_callbacks.builtin.timing import download_task_parts

    main = types.ModuleType("__main__")
    main.args = types.SimpleNamespace(worker_launch_time_ms=2_000)  # type: ignore[attr-defined]
    main.worker_launched_time_ms = 5_000.0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__main__", main)
    ms = 1_000_000
    assert download_task_parts(1_000 * ms, 9_000 * ms) == [
        (catalog.PHASE_DOWNLOAD_TASK_SCHEDULING, 1_000 * ms, 2_000 * ms),
        (catalog.PHASE_DOWNLOAD_TASK_WORKER_START, 2_000 * ms, 5_000 * ms),
        (catalog.PHASE_DOWNLOAD_TASK_IMPORTS, 5_000 * ms, 9_000 * ms),
    ]
    # A worker launched before node init began (prestarted, reused): nothing to split.
    assert download_task_parts(3_000 * ms, 9_000 * ms) == []
    # Not Ray's worker main (e.g. pytest's): nothing.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    assert download_task_parts(1_000 * ms, 9_000 * ms) == []
