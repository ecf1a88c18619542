"""Every seed design runs unchanged as a Composite child, on real Ray: Ray's own
get_or_create_callback() and initialize_node() (one download task per node, in another
process). The classes and functions are written as the seed documents show them
(tests/seed_callbacks.py); each hook records an event line to a file, read here."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import ray

from llm_otel_callbacks import catalog
from llm_otel_callbacks.serve._engine_start import dispatches, merge_extra_init_kwargs
from llm_otel_callbacks.telemetry import reset_telemetry
from tests._support.flow import make_llm_config, remove_pg, start_like_vllm_engine
from tests._support.otlp_receiver import OtlpHttpReceiver

S = "tests.seed_callbacks."
COMPOSITE = "llm_otel_callbacks.Composite"


@pytest.fixture(autouse=True)
def _fresh_telemetry() -> Iterator[None]:
    reset_telemetry()
    yield
    reset_telemetry()


@pytest.fixture
def events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "events.jsonl"
    path.touch()
    monkeypatch.setenv("SEED_EVENTS", str(path))  # the replica side (this process)
    return path


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def config(tiny_model_dir: Path, events: Path, callbacks: list[Any], **kw: Any) -> Any:
    # Ray passes ctx.runtime_env to its download tasks: the event file reaches them there.
    return make_llm_config(
        tiny_model_dir, COMPOSITE, {"callbacks": callbacks, **kw},
        runtime_env={"env_vars": {"SEED_EVENTS": str(events)}},
    )


def engine_start(callback: Any) -> None:
    """The two engine-start points ObservedLLMServer gives (the Serve test runs the real
    server); extra_init_kwargs are merged between them, before the engine is built."""

    async def run() -> None:
        # As EngineStart does: a hook nobody has is not dispatched (Ray would raise).
        if dispatches(callback, "on_before_engine_start"):
            await callback.run_callback("on_before_engine_start")
        merge_extra_init_kwargs(callback)
        if dispatches(callback, "on_after_engine_start"):
            await callback.run_callback("on_after_engine_start")

    asyncio.run(run())


def rays_group(llm_config: Any) -> Any:
    """The placement group Ray made for the callback (removed by the test when a child
    replaces it on the ctx, so the module's 4 CPUs are not used up)."""
    return llm_config.get_or_create_callback().ctx.placement_group


def policy_on_node(evs: list[dict[str, Any]]) -> list[str]:
    return [e["download_model"] for e in evs if e["event"] == "ray_download_argument"]


class _Monitoring(BaseHTTPRequestHandler):
    posts: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def monitoring() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    _Monitoring.posts = []
    server = HTTPServer(("127.0.0.1", 0), _Monitoring)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/events", _Monitoring.posts
    server.shutdown()


# --- seed 000 / 001 -----------------------------------------------------------------------------


def test_seed_000_production_callback_runs_as_written(
    ray_local: Any, tiny_model_dir: Path, events: Path,
    monitoring: tuple[str, list[dict[str, Any]]],
) -> None:
    url, posts = monitoring
    llm_config = config(tiny_model_dir, events, [
        {"callback_class": S + "ProductionCallback", "callback_kwargs": {"monitoring_url": url}},
        S + "PolicyProbe",
    ])
    callback = start_like_vllm_engine(llm_config)
    remove_pg(callback)
    assert [p["event"] for p in posts] == ["init_start", "init_complete"]
    assert posts[0]["model"] == "tiny"
    assert posts[1]["duration"] > 0
    # Its on_before_download ran on the node before Ray read the policy (it sets Ray's default).
    assert policy_on_node(read(events)) == ["MODEL_AND_TOKENIZER"]


def test_seed_download_policy_set_in_on_before_download_reaches_the_node(
    ray_local: Any, tiny_model_dir: Path, events: Path
) -> None:
    llm_config = config(tiny_model_dir, events, [
        S + "TokenizerOnlyDownload", S + "PolicyProbe",
    ])
    remove_pg(start_like_vllm_engine(llm_config))
    assert policy_on_node(read(events)) == ["TOKENIZER_ONLY"]


def test_on_before_download_returning_false_means_the_node_downloads_nothing(
    ray_local: Any, tiny_model_dir: Path, events: Path
) -> None:
    llm_config = config(tiny_model_dir, events, [
        S + "TokenizerOnlyDownload", S + "SkipDownload", S + "PolicyProbe",
    ])
    remove_pg(start_like_vllm_engine(llm_config))
    assert policy_on_node(read(events)) == ["NONE"]


def test_local_node_download_model_is_the_policy_of_the_replicas_node(
    ray_local: Any, tiny_model_dir: Path, events: Path
) -> None:
    # One node: the replica's own. Its task gets local_node_download_model, not the worker one.
    # (Two nodes, replica on each: test_core_ray's test_seed_local_node_download_model_...)
    llm_config = config(tiny_model_dir, events, [S + "LocalNodePolicy", S + "PolicyProbe"])
    remove_pg(start_like_vllm_engine(llm_config))
    assert policy_on_node(read(events)) == ["TOKENIZER_ONLY"]


# --- seed 003: eight hooks ----------------------------------------------------------------------


def test_eight_hook_class_runs_every_hook_in_order_at_rays_points(
    ray_local: Any, tiny_model_dir: Path, events: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    llm_config = config(tiny_model_dir, events, [
        S + "EightHooks", S + "Metrics", S + "PolicyProbe",
    ])
    callback = start_like_vllm_engine(llm_config)
    engine_start(callback)
    remove_pg(callback)
    evs = read(events)
    order = [e["event"] for e in evs if e["event"].startswith("on_")]
    assert order == [
        "on_pre_initialization", "on_pre_download", "on_post_download",
        "on_pre_placement_group", "on_post_placement_group", "on_pre_engine_init",
        "on_post_engine_init", "on_post_initialization",
    ]
    by = {e["event"]: e for e in evs}
    # on_pre_download ran in Ray's download task (another process), before Ray read the
    # policy: the policy it set is the one Ray's download received.
    assert by["on_pre_download"]["pid"] != by["on_pre_initialization"]["pid"]
    assert by["on_pre_download"]["policy"] == "NodeModelDownloadable.MODEL_AND_TOKENIZER"
    assert policy_on_node(evs) == ["EXCLUDE_SAFETENSORS"]
    assert by["on_post_download"]["download_result"] == str(tiny_model_dir)
    assert by["on_post_placement_group"]["has_pg"] is True
    # extra_init_kwargs went into the engine kwargs before the engine would be built.
    assert llm_config.engine_kwargs["max_num_seqs"] == 3
    assert llm_config.get_engine_config().get_initialization_kwargs()["max_num_seqs"] == 3
    # Seed 003's stateful example: post_initialization came last and printed its time.
    assert by["metrics_took"]["seconds"] > 0
    assert "Took " in capsys.readouterr().out


def test_pre_placement_group_false_uses_the_childs_own_group(
    ray_local: Any, tiny_model_dir: Path, events: Path
) -> None:
    from llm_otel_callbacks import CallbackConfigError  # noqa: F401 - the error type users see

    llm_config = config(tiny_model_dir, events, [S + "OwnPlacementGroup"])
    original = rays_group(llm_config)
    callback = start_like_vllm_engine(llm_config)
    try:
        assert callback.ctx.placement_group.bundle_specs == [{"CPU": 0.01}]
    finally:
        remove_pg(callback)
        ray.util.remove_placement_group(original)
    bad = config(tiny_model_dir, events, [S + "FalseWithoutPlacementGroup"])
    with pytest.raises(Exception, match=r"did not set ctx\.placement_group"):
        start_like_vllm_engine(bad)
    remove_pg(bad.get_or_create_callback())


# --- seed 002: phase functions ------------------------------------------------------------------


def test_phase_functions_sync_async_and_callable_class_see_every_phase(
    ray_local: Any, tiny_model_dir: Path, events: Path
) -> None:
    llm_config = config(tiny_model_dir, events, [
        S + "tracking_callback", S + "async_tracking_callback", S + "MetricsCollector",
        S + "custom_download", S + "PolicyProbe",
    ])
    callback = start_like_vllm_engine(llm_config)
    engine_start(callback)
    remove_pg(callback)
    evs = read(events)
    phases = {
        fn: [e["phase"] for e in evs if e["event"] == "phase" and e["fn"] == fn]
        for fn in ("sync", "async")
    }
    expected = [
        "pre_initialization", "pre_download", "post_download", "post_placement_group",
        "pre_engine_init", "post_engine_init", "post_initialization",
    ]
    assert phases["sync"] == expected
    assert phases["async"] == expected  # awaited, every phase
    post_download = next(e for e in evs if e.get("fn") == "async"
                         and e.get("phase") == "post_download")
    assert post_download["download_result"] == str(tiny_model_dir)
    # The class with __call__ (named by path) kept its state across phases.
    last = [e for e in evs if e["event"] == "collector"][-1]
    assert last["timings"] == sorted(
        ["post_download", "post_placement_group", "post_engine_init", "post_initialization"]
    )
    # custom_download's pre_download policy reached the node's task.
    assert policy_on_node(evs) == ["TOKENIZER_ONLY"]


def test_custom_initialization_replaces_node_init_with_its_group_and_env(
    ray_local: Any, tiny_model_dir: Path, events: Path
) -> None:
    llm_config = config(tiny_model_dir, events, [
        S + "custom_init", S + "tracking_callback", S + "PolicyProbe",
    ])
    original = rays_group(llm_config)
    callback = start_like_vllm_engine(llm_config)
    try:
        ctx = callback.ctx
        assert ctx.run_init_node is False
        assert callback.vetoed_by == ["custom_init"]
        assert ray.util.placement_group_table(ctx.placement_group)["name"] == "seed-custom-init"
        assert ctx.runtime_env == {"env_vars": {"CUSTOM_INIT": "1"}}
    finally:
        remove_pg(callback)
        ray.util.remove_placement_group(original)
    evs = read(events)
    assert policy_on_node(evs) == []  # no download task ran
    assert [e["phase"] for e in evs if e["event"] == "phase"] == [
        "pre_initialization", "custom_initialization", "post_download", "post_placement_group",
    ]


def test_initialize_class_replaces_node_init(
    ray_local: Any, tiny_model_dir: Path, events: Path
) -> None:
    llm_config = config(tiny_model_dir, events, [S + "MyInit", S + "PolicyProbe"])
    original = rays_group(llm_config)
    callback = start_like_vllm_engine(llm_config)
    try:
        engine_start(callback)
        ctx = callback.ctx
        assert ctx.run_init_node is False
        assert callback.vetoed_by == ["MyInit"]
        assert ray.util.placement_group_table(ctx.placement_group)["name"] == "seed-initialize"
        assert ctx.runtime_env == {"env_vars": {"FROM_INITIALIZE": "1"}}
        assert llm_config.engine_kwargs["max_num_seqs"] == 2
    finally:
        remove_pg(callback)
        ray.util.remove_placement_group(original)
    assert policy_on_node(read(events)) == []


# --- Ray's own callbacks, as Ray runs them ------------------------------------------------------


def test_ray_callback_with_its_own_getstate_reaches_the_node_after_a_hook(
    ray_local: Any, tiny_model_dir: Path, events: Path
) -> None:
    # Standalone, on our base: a hook runs (building per-process telemetry) before Ray
    # pickles the callback into the download task; the subclass's __dict__ copy must not
    # carry that telemetry along.
    llm_config = make_llm_config(
        tiny_model_dir, S + "LockedRayCallback",
        runtime_env={"env_vars": {"SEED_EVENTS": str(events)}},
    )
    remove_pg(start_like_vllm_engine(llm_config))
    assert [e["custom"] for e in read(events) if e["event"] == "locked_download"] == [True]


def test_ray_children_run_as_ray_runs_them(
    ray_local: Any, tiny_model_dir: Path, events: Path, otlp_receiver: OtlpHttpReceiver
) -> None:
    llm_config = config(
        tiny_model_dir, events,
        [S + "InitSeesCtx", S + "OwnDispatch", S + "ReplacesCtx"],
        telemetry={"endpoint": otlp_receiver.endpoint, "schedule_delay_ms": 100,
                   "otlp_metrics": False},
    )
    callback = llm_config.get_or_create_callback()
    try:
        ctx = callback.ctx
        # __init__ saw the replica's ctx (not a blank one), and what it wrote there stayed.
        assert ctx.custom_data["init_saw"] == {
            "placement_group": True, "policy": "MODEL_AND_TOKENIZER",
        }
        assert ctx.runtime_env["env_vars"]["SET_IN_INIT"] == "1"
        asyncio.run(callback.run_callback("on_before_node_init"))
        # Its own run_callback and _handle_callback_error ran (the error was its to handle).
        assert ctx.custom_data["dispatched"] == ["on_before_node_init"]
        assert ctx.custom_data["handled"] == (
            "on_before_node_init: handled by my own _handle_callback_error"
        )
        # A child that assigned a new ctx: Ray reads what it put there.
        assert callback.ctx.runtime_env == {"env_vars": {"REPLACED": "1"}}
        assert callback.child("ReplacesCtx").ctx is callback.ctx
        assert callback.child("OwnDispatch").ctx is callback.ctx
        with pytest.raises(KeyError, match="no child named 'nope'"):
            callback.child("nope")
        # A hook nobody has: AttributeError, as Ray's own _get_method raises.
        with pytest.raises(AttributeError, match="does not have method 'on_no_such_hook'"):
            asyncio.run(callback.run_callback("on_no_such_hook"))
    finally:
        remove_pg(callback)


def test_a_veto_stays_a_veto_and_names_every_vetoing_child(
    ray_local: Any, tiny_model_dir: Path, events: Path, otlp_receiver: OtlpHttpReceiver
) -> None:
    llm_config = config(
        tiny_model_dir, events,
        [S + "VetoByField", S + "SkipInit", S + "Reenables"],
        telemetry={"endpoint": otlp_receiver.endpoint, "schedule_delay_ms": 100,
                   "otlp_metrics": False},
    )
    callback = llm_config.get_or_create_callback()
    try:
        asyncio.run(callback.run_callback("on_before_node_init"))
        assert callback.ctx.run_init_node is False
        assert callback.vetoed_by == ["VetoByField", "SkipInit"]
    finally:
        remove_pg(callback)
    spans = otlp_receiver.wait_for_spans(
        lambda ss: any(ev[0] == catalog.EVENT_VETO_KEPT for s in ss for ev in s.events),
        timeout=60,
    )
    parent = next(s for s in spans if s.name == catalog.SPAN_HOOK_PREFIX + "on_before_node_init"
                  and s.attributes[catalog.A_CALLBACK] == "Composite")
    vetoes = [ev[1] for ev in parent.events if ev[0] == catalog.EVENT_VETO]
    assert [v[catalog.A_CALLBACK] for v in vetoes] == ["VetoByField", "SkipInit"]
    assert list(vetoes[-1][catalog.A_VETOED_BY]) == ["VetoByField", "SkipInit"]
    kept = next(ev[1] for ev in parent.events if ev[0] == catalog.EVENT_VETO_KEPT)
    assert kept[catalog.A_CALLBACK] == "Reenables"
