"""CustomPlacementGroup on a real two-node Ray cluster on this machine: the group it puts on
the ctx is the one Ray's initialize_node() schedules its per-node tasks on; named groups are
reused; an infeasible bundle fails within ready_timeout_s with a diagnostic; groups it created
are given back on failure, and the replica's own group is never touched."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group_table,
    remove_placement_group,
)

from llm_otel_callbacks import CallbackConfigError, catalog
from llm_otel_callbacks.builtin import CustomPlacementGroup, PlacementGroupTimeoutError
from llm_otel_callbacks.telemetry import reset_telemetry
from tests._support.flow import make_llm_config, start_like_vllm_engine
from tests._support.otlp_receiver import OtlpHttpReceiver, ReceivedSpan
from tests._support.ray_env import select, wait_for_metric

CPG = "llm_otel_callbacks.builtin.CustomPlacementGroup"
DOWNLOAD_HOOK = catalog.SPAN_HOOK_PREFIX + "on_before_download_model_files_distributed"
WAIT_COUNT = catalog.PLACEMENT_GROUP_WAIT.exposed_name(ray=True) + "_count"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpHttpReceiver]:
    reset_telemetry()
    with OtlpHttpReceiver() as rx:
        yield rx
    reset_telemetry()


@pytest.fixture
def groups() -> Iterator[list[PlacementGroup]]:
    """Groups a test made or saw; removed at the end so tests do not starve each other."""
    made: list[PlacementGroup] = []
    yield made
    for pg in made:
        if _state(pg) != "REMOVED":
            remove_placement_group(pg)


def _kwargs(rx: OtlpHttpReceiver, **extra: Any) -> dict[str, Any]:
    return {
        "telemetry": {"endpoint": rx.endpoint, "schedule_delay_ms": 100,
                      "service_name": "builtin-pg"},
        **extra,
    }


def _state(pg: PlacementGroup) -> str:
    return str(placement_group_table(pg)["state"])


def _nodes_of(pg: PlacementGroup) -> set[str]:
    return set(placement_group_table(pg)["bundles_to_node_id"].values())


def _trace_spans(rx: OtlpHttpReceiver, trace_id: str, ready: Any, timeout: float = 60) -> list[
    ReceivedSpan
]:
    def mine(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.trace_id == trace_id]

    return mine(rx.wait_for_spans(lambda ss: ready(mine(ss)), timeout=timeout))


def _trace_id(callback: Any) -> str:
    owner = callback.startup_owner or callback
    return str(owner.trace_carrier["traceparent"].split("-")[1])


# --- construction ----------------------------------------------------------------------------


def test_kwargs_are_validated_at_construction() -> None:
    with pytest.raises(CallbackConfigError) as err:
        CustomPlacementGroup(llm_config=None, bundles=[{"CPU": 1}], strategy="diagonal")
    for word in ("strategy", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        assert word in str(err.value)
    with pytest.raises(CallbackConfigError, match=r"bundles.*name"):
        CustomPlacementGroup(llm_config=None)
    with pytest.raises(CallbackConfigError, match="bundles"):
        CustomPlacementGroup(llm_config=None, bundles=[{"CPU": -1}])
    with pytest.raises(CallbackConfigError, match="bundles"):
        CustomPlacementGroup(llm_config=None, bundles=[{}])
    with pytest.raises(CallbackConfigError, match="bundles"):
        CustomPlacementGroup(llm_config=None, bundles=[{"CPU": 0}])
    with pytest.raises(CallbackConfigError, match="bundles"):
        CustomPlacementGroup(llm_config=None, bundles=[])
    with pytest.raises(CallbackConfigError, match="ready_timeout_s"):
        CustomPlacementGroup(llm_config=None, bundles=[{"CPU": 1}], ready_timeout_s=0)
    with pytest.raises(CallbackConfigError, match="placement"):
        CustomPlacementGroup(llm_config=None, bundles=[{"CPU": 1}], placement="x")
    ok = CustomPlacementGroup(llm_config=None, name="shared", strategy="strict_spread")
    assert ok.options.strategy == "STRICT_SPREAD"
    assert ok.options.ready_timeout_s == 60


# --- the group Ray uses ------------------------------------------------------------------------


def test_spread_group_is_where_initialize_node_runs(
    ray_two_nodes: Any, tiny_model_dir: Path, receiver: OtlpHttpReceiver,
    groups: list[PlacementGroup],
) -> None:
    llm_config = make_llm_config(
        tiny_model_dir, CPG,
        _kwargs(receiver, bundles=[{"CPU": 1}, {"CPU": 1}], strategy="strict_spread"),
    )
    callback = llm_config.get_or_create_callback()
    own = callback.ctx.placement_group  # the "replica's own" group Ray made (one bundle)
    groups.append(own)
    start_like_vllm_engine(llm_config)
    custom = callback.ctx.placement_group
    groups.append(custom)

    assert custom != own
    assert placement_group_table(custom)["strategy"] == "STRICT_SPREAD"
    both = {n.node_id for n in ray_two_nodes.nodes}
    assert _nodes_of(custom) == both
    assert len(_nodes_of(own)) == 1

    # Ray's initialize_node ran one download task per node of *our* group.
    spans = _trace_spans(
        receiver, _trace_id(callback),
        lambda ss: len([s for s in ss if s.name == DOWNLOAD_HOOK]) >= 2,
    )
    task_nodes = [s.attributes[catalog.A_NODE_ID] for s in spans if s.name == DOWNLOAD_HOOK]
    assert sorted(task_nodes) == sorted(both)
    (before,) = [s for s in spans if s.attributes.get(catalog.A_HOOK) == "on_before_node_init"]
    assert before.attributes[catalog.A_PG_ID] == custom.id.hex()
    assert before.attributes[catalog.A_PG_REPLACED] == own.id.hex()
    assert before.attributes[catalog.A_PG_CREATED] is True
    assert before.attributes[catalog.A_PG_STRATEGY] == "STRICT_SPREAD"
    assert before.attributes[catalog.A_PG_WAIT] >= 0

    head_metrics = ray_two_nodes.nodes[0].metrics_url  # the driver runs on the head node
    waits = wait_for_metric(
        head_metrics, WAIT_COUNT,
        lambda ss: bool(select(ss, strategy="STRICT_SPREAD", outcome="ok")), timeout=60,
    )
    assert select(waits, strategy="STRICT_SPREAD", outcome="ok")[0][1] >= 1

    # A successful startup keeps both groups; release() gives back only ours.
    assert _state(custom) == "CREATED" and _state(own) == "CREATED"
    callback.release()
    assert _wait_state(custom, "REMOVED")
    assert _state(own) == "CREATED"


def test_named_group_is_created_then_reused(
    ray_two_nodes: Any, tiny_model_dir: Path, receiver: OtlpHttpReceiver,
    groups: list[PlacementGroup],
) -> None:
    name = "llm-otel-test-shared"
    first_config = make_llm_config(
        tiny_model_dir, CPG, _kwargs(receiver, name=name, bundles=[{"CPU": 1}])
    )
    first = first_config.get_or_create_callback()
    groups.append(first.ctx.placement_group)
    start_like_vllm_engine(first_config)
    created = first.ctx.placement_group
    groups.append(created)
    assert placement_group_table(created)["name"] == name

    second_config = make_llm_config(tiny_model_dir, CPG, _kwargs(receiver, name=name))
    second = second_config.get_or_create_callback()
    groups.append(second.ctx.placement_group)
    start_like_vllm_engine(second_config)
    assert second.ctx.placement_group == created  # the same group, found by name

    spans = _trace_spans(
        receiver, _trace_id(second),
        lambda ss: any(s.attributes.get(catalog.A_PG_ID) for s in ss),
    )
    (before,) = [s for s in spans if s.attributes.get(catalog.A_PG_ID)]
    assert before.attributes[catalog.A_PG_CREATED] is False
    assert before.attributes[catalog.A_PG_NAME] == name

    # A reused group is never removed by the callback that reused it...
    second.release()
    assert _state(created) == "CREATED"
    # ...only by the one that created it.
    first.release()
    assert _wait_state(created, "REMOVED")

    # Without bundles, a missing name is an error that says so.
    missing = make_llm_config(tiny_model_dir, CPG, _kwargs(receiver, name="llm-otel-nope"))
    groups.append(missing.get_or_create_callback().ctx.placement_group)
    with pytest.raises(Exception, match="no placement group named 'llm-otel-nope'"):
        start_like_vllm_engine(missing)


def test_infeasible_bundle_fails_within_timeout_with_diagnostic(
    ray_two_nodes: Any, tiny_model_dir: Path, receiver: OtlpHttpReceiver,
    groups: list[PlacementGroup],
) -> None:
    timeout_s = 3.0
    llm_config = make_llm_config(
        tiny_model_dir, CPG,
        _kwargs(receiver, bundles=[{"CPU": 1000}, {"CPU": 1}], ready_timeout_s=timeout_s),
    )
    callback = llm_config.get_or_create_callback()
    own = callback.ctx.placement_group
    groups.append(own)
    before_ids = {pg_id for pg_id in placement_group_table()}
    started = time.monotonic()
    with pytest.raises(Exception) as err:
        start_like_vllm_engine(llm_config)
    elapsed = time.monotonic() - started
    assert timeout_s <= elapsed < timeout_s + 10

    cause = err.value.__cause__
    assert isinstance(cause, PlacementGroupTimeoutError)
    message = str(cause)
    assert f"ready_timeout_s={timeout_s:g}" in message
    assert "bundle 0 {CPU: 1000}: no node has that much in total (largest node: {CPU: 2})" in (
        message
    )
    assert "bundle 1" not in message  # that one fits
    assert "Available now, per node:" in message
    for node in ray_two_nodes.nodes:
        assert f"node {node.node_id[:8]}: {{CPU: " in message
    assert "it was removed, so it reserves nothing" in message

    # No leaked reservation: the group it created is gone; the replica's own is kept and
    # still on the ctx.
    (made_id,) = [i for i in placement_group_table() if i not in before_ids]
    assert placement_group_table()[made_id]["state"] == "REMOVED"
    assert callback.ctx.placement_group == own and _state(own) == "CREATED"
    wait_for_metric(
        ray_two_nodes.nodes[0].metrics_url, WAIT_COUNT,
        lambda ss: bool(select(ss, outcome="timeout", strategy="PACK")), timeout=60,
    )


def test_fallback_example_keeps_the_replica_group(
    ray_two_nodes: Any, tiny_model_dir: Path, receiver: OtlpHttpReceiver,
    groups: list[PlacementGroup], caplog: pytest.LogCaptureFixture,
) -> None:
    """examples/placement_group_subclass.py: three STRICT_SPREAD bundles on two nodes."""
    llm_config = make_llm_config(
        tiny_model_dir, "examples.placement_group_subclass.FallbackPlacementGroup",
        _kwargs(receiver, bundles=[{"CPU": 0.1}] * 3, strategy="STRICT_SPREAD",
                ready_timeout_s=2),
    )
    callback = llm_config.get_or_create_callback()
    own = callback.ctx.placement_group
    groups.append(own)
    with caplog.at_level(logging.WARNING, logger="examples.placement_group_subclass"):
        start_like_vllm_engine(llm_config)  # no error: it fell back
    assert callback.ctx.placement_group == own
    assert callback.ctx.custom_data["placement_group_fallback"] is True
    (warning,) = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert "STRICT_SPREAD needs 3 distinct nodes; the cluster has 2" in warning


def test_failed_startup_gives_the_group_back(
    ray_two_nodes: Any, tiny_model_dir: Path, receiver: OtlpHttpReceiver,
    groups: list[PlacementGroup],
) -> None:
    """As a Composite child: a sibling fails the replica in on_after_node_init."""
    llm_config = make_llm_config(
        tiny_model_dir, "llm_otel_callbacks.Composite",
        _kwargs(receiver, callbacks=[
            {"callback_class": CPG, "callback_kwargs": {"bundles": [{"CPU": 1}]}},
            "tests.builtin_probes.FailingAfterInit",
        ]),
    )
    composite = llm_config.get_or_create_callback()
    own = composite.ctx.placement_group
    groups.append(own)
    with pytest.raises(Exception, match="after-init failure"):
        start_like_vllm_engine(llm_config)
    custom = composite.ctx.placement_group
    groups.append(custom)
    assert custom != own
    assert _wait_state(custom, "REMOVED")  # given back when the startup failed
    assert _state(own) == "CREATED"  # never the replica's own


def test_replica_exit_after_failed_init(
    ray_two_nodes: Any, tiny_model_dir: Path, receiver: OtlpHttpReceiver,
    groups: list[PlacementGroup],
) -> None:
    """A detached actor plays a Serve replica (they are detached actors): node init fails on
    both nodes, the replica exits without reaching on_after_node_init. Timing's per-node
    phases came from both nodes of the SPREAD group, its open phase ends with an error at
    exit, and the group dies with the replica."""

    @ray.remote(num_cpus=0)
    class Replica:
        def start(self, model_dir: str, kwargs: dict[str, Any]) -> tuple[str, str, str, str]:
            # Imports here: this class travels by value; test-module globals would not.
            from llm_otel_callbacks.builtin import Timing
            from tests._support.flow import make_llm_config, start_like_vllm_engine

            config = make_llm_config(model_dir, "llm_otel_callbacks.Composite", kwargs)
            composite = config.get_or_create_callback()
            own = composite.ctx.placement_group
            try:
                start_like_vllm_engine(config)
                error = ""
            except Exception as exc:
                error = str(exc)
            timing = composite.children[0].instance
            assert isinstance(timing, Timing)
            trace_id = composite.trace_carrier["traceparent"].split("-")[1]
            return error, composite.ctx.placement_group.id.hex(), own.id.hex(), trace_id

        def exit(self) -> None:
            ray.actor.exit_actor()

    kwargs = _kwargs(receiver, callbacks=[
        "llm_otel_callbacks.builtin.Timing",
        {"callback_class": CPG,
         "callback_kwargs": {"bundles": [{"CPU": 0.5}, {"CPU": 0.5}], "strategy": "SPREAD"}},
        "tests.builtin_probes.FailingDownload",
    ])
    replica = Replica.options(name="llm-otel-test-replica", lifetime="detached").remote()
    error, custom_hex, own_hex, trace_id = ray.get(
        replica.start.remote(str(tiny_model_dir), kwargs), timeout=180
    )
    custom = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(custom_hex)))
    own = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(own_hex)))
    groups.extend([custom, own])
    assert "disk full" in error
    assert custom != own
    task_phase = catalog.SPAN_PHASE_PREFIX + catalog.PHASE_DOWNLOAD_TASK_START
    spans = _trace_spans(
        receiver, trace_id, lambda ss: len([s for s in ss if s.name == task_phase]) >= 2
    )
    # One per node of the SPREAD group: Ray ran a task on each.
    nodes = {s.attributes[catalog.A_NODE_ID] for s in spans if s.name == task_phase}
    assert nodes == _nodes_of(custom) == {n.node_id for n in ray_two_nodes.nodes}
    assert _state(custom) == "CREATED"  # the startup is not over yet: nothing removed

    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(replica.exit.remote(), timeout=60)
    node_init = catalog.SPAN_PHASE_PREFIX + catalog.PHASE_NODE_INIT
    spans = _trace_spans(
        receiver, trace_id,
        lambda ss: any(s.name == node_init for s in ss)
        and any(s.name == catalog.SPAN_STARTUP for s in ss),
    )
    (phase,) = [s for s in spans if s.name == node_init]
    (root,) = [s for s in spans if s.name == catalog.SPAN_STARTUP]
    assert phase.status_code == root.status_code == "STATUS_CODE_ERROR"
    assert "process exited" in phase.status_message
    assert _wait_state(custom, "REMOVED")  # fate-shared with the detached replica


def _wait_state(pg: PlacementGroup, state: str, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _state(pg) == state:
            return True
        time.sleep(0.2)
    return False
