"""Faulty composite children on real Ray, under ``raise_error_on_callback`` true and false.

What test_composite_ray / test_core_ray already cover (a child raising or timing out in
``on_before_node_init`` in the replica) is not repeated. Here:

* a child raising, and one hanging past its ``timeout_s``, in the *download* hook, which
  Ray runs with ``run_callback_sync`` in a task on the node, after the pickle;
* a child raising in ``__init__``;
* a child holding unpicklable state (a lock, a socket), at construction, when Ray pickles
  (state a hook made unpicklable), and in the offline ``check`` command (a subprocess).

With the raise policy the error reaches the caller and names the child, the hook and the
cause. With the log policy startup goes on (``on_after_node_init`` runs) and the failure is
an error span (after a real OTLP export, from whichever process it happened in) and an
outcome metric.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_otel_callbacks import CallbackConfigError, RayServeLLMCallback, catalog
from llm_otel_callbacks.telemetry import reset_telemetry
from tests._support.flow import make_llm_config, remove_pg, start_like_vllm_engine
from tests._support.otlp_receiver import OtlpHttpReceiver, ReceivedSpan
from tests._support.ray_env import REPO_ROOT, wait_for_metric

M = "tests.test_faults_callbacks."
COMPOSITE = "llm_otel_callbacks.Composite"
DOWNLOAD = "on_before_download_model_files_distributed"


# --- faulty children (Ray's workers import them from here by dotted path) --------------------


class AfterMarker(RayServeLLMCallback):
    """Proves startup went on: on_after_node_init ran."""

    def on_after_node_init(self) -> None:
        self.ctx.custom_data["after_ran"] = True


class RaisesInDownload(RayServeLLMCallback):
    def on_before_download_model_files_distributed(self) -> None:
        raise ValueError("mirror credentials rejected")


class HangsInDownload(RayServeLLMCallback):
    def on_before_download_model_files_distributed(self) -> None:
        time.sleep(float(self.kwargs.get("sleep_s", 8)))


class RaisesInInit(RayServeLLMCallback):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        raise RuntimeError("license server unreachable")

    def on_before_node_init(self) -> None:  # never runs
        self.ctx.custom_data["init_failed_child_ran"] = True


class HoldsLock(RayServeLLMCallback):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.guard = threading.Lock()

    def on_before_node_init(self) -> None:
        self.ctx.custom_data["lock_child_ran_in_replica"] = True

    def on_before_download_model_files_distributed(self) -> None:
        raise AssertionError("an unpicklable child must not reach the download task")


class LocksInHook(RayServeLLMCallback):
    """Picklable when built; a hook then opens a handle Ray cannot send to the nodes."""

    def on_before_node_init(self) -> None:
        self.guard = threading.Lock()

    def on_before_download_model_files_distributed(self) -> None:
        raise AssertionError("an unpicklable child must not reach the download task")


class HoldsSocket:
    """Seed protocol, with an open (unconnected) socket: no bind, no port."""

    def __init__(self) -> None:
        self.conn = socket.socket()

    def on_before_init(self, ctx: Any) -> None:
        return None


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_telemetry() -> Iterator[None]:
    reset_telemetry()
    yield
    reset_telemetry()


@pytest.fixture(autouse=True)
def _locks_unpicklable_as_in_a_replica() -> Iterator[None]:
    """Ray Serve's ``serve.ingress`` (ray/serve/_private/utils.py) registers process-wide
    cloudpickle reducers that turn a lock into a fresh one. An LLMServer replica never
    applies it, so there a lock on a callback fails Ray's pickle; but this pytest process
    may have (an earlier test deployed an app from here). Take them out for these tests."""
    from ray import cloudpickle

    dispatch = cloudpickle.CloudPickler.dispatch
    lock_types = (type(threading.Lock()), type(threading.RLock()))
    saved = {t: dispatch.pop(t) for t in lock_types if t in dispatch}
    yield
    dispatch.update(saved)


def _kwargs(rx: OtlpHttpReceiver, *children: dict[str, Any]) -> dict[str, Any]:
    return {
        "callbacks": [*children, {"callback_class": M + "AfterMarker", "name": "after"}],
        "telemetry": {"endpoint": rx.endpoint, "schedule_delay_ms": 100, "otlp_metrics": False},
    }


def _child_span(spans: list[ReceivedSpan], hook: str, child: str) -> ReceivedSpan | None:
    return next((s for s in spans if s.name == f"{catalog.SPAN_HOOK_PREFIX}{hook} {child}"), None)


def _wait_child_span(rx: OtlpHttpReceiver, hook: str, child: str) -> ReceivedSpan:
    spans = rx.wait_for_spans(lambda ss: _child_span(ss, hook, child) is not None, timeout=60)
    span = _child_span(spans, hook, child)
    assert span is not None
    return span


def _chain(exc: BaseException) -> str:
    """Every message along the cause chain (Ray wraps a task's error)."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


# --- a child failing in the download task, on the node ---------------------------------------


@pytest.mark.parametrize("raise_error", [True, False])
def test_download_hook_error_on_the_node(
    ray_local: Any, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver, raise_error: bool
) -> None:
    child = {"callback_class": M + "RaisesInDownload", "name": "mirror_auth",
             "raise_error_on_callback": raise_error}
    llm_config = make_llm_config(tiny_model_dir, COMPOSITE, _kwargs(otlp_receiver, child))
    if raise_error:
        with pytest.raises(Exception) as info:
            start_like_vllm_engine(llm_config)
        text = _chain(info.value)
        assert "callback 'mirror_auth' failed in hook " f"'{DOWNLOAD}'" in text, text
        assert "ValueError: mirror credentials rejected" in text, text
        callback = llm_config.get_or_create_callback()
        assert "after_ran" not in callback.ctx.custom_data
    else:
        callback = start_like_vllm_engine(llm_config)
        assert callback.ctx.custom_data.get("after_ran") is True  # startup went on
    remove_pg(callback)
    span = _wait_child_span(otlp_receiver, DOWNLOAD, "mirror_auth")
    assert span.attributes[catalog.A_OUTCOME] == "error"
    assert span.status_code == "STATUS_CODE_ERROR"
    assert "mirror credentials rejected" in span.status_message
    assert span.resource_attributes["process.pid"] != os.getpid()  # ran in Ray's task


@pytest.mark.parametrize("raise_error", [True, False])
def test_download_hook_hang_past_timeout_on_the_node(
    ray_local: Any, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver, raise_error: bool
) -> None:
    child = {"callback_class": M + "HangsInDownload", "name": "slow_mirror",
             "timeout_s": 0.5, "raise_error_on_callback": raise_error,
             "callback_kwargs": {"sleep_s": 8}}
    llm_config = make_llm_config(tiny_model_dir, COMPOSITE, _kwargs(otlp_receiver, child))
    t0 = time.monotonic()
    if raise_error:
        with pytest.raises(Exception) as info:
            start_like_vllm_engine(llm_config)
        text = _chain(info.value)
        assert f"callback 'slow_mirror' failed in hook '{DOWNLOAD}'" in text, text
        assert f"hook '{DOWNLOAD}' did not finish within 0.5s" in text, text
        callback = llm_config.get_or_create_callback()
    else:
        callback = start_like_vllm_engine(llm_config)
        assert callback.ctx.custom_data.get("after_ran") is True
    elapsed = time.monotonic() - t0
    remove_pg(callback)
    assert elapsed < 7.5, f"the 8 s hang was waited for ({elapsed:.1f}s)"
    span = _wait_child_span(otlp_receiver, DOWNLOAD, "slow_mirror")
    assert span.attributes[catalog.A_OUTCOME] == "timeout"
    assert span.status_code == "STATUS_CODE_ERROR"


# --- a child failing in __init__ -------------------------------------------------------------


def test_init_error_with_raise_policy_fails_construction(
    ray_local: Any, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver
) -> None:
    child = {"callback_class": M + "RaisesInInit", "name": "licensed"}
    llm_config = make_llm_config(tiny_model_dir, COMPOSITE, _kwargs(otlp_receiver, child))
    with pytest.raises(CallbackConfigError) as info:
        llm_config.get_or_create_callback()
    message = str(info.value)
    assert message.startswith("callbacks[0] (licensed): callback 'licensed' failed in hook "
                              "'__init__'"), message
    assert "RuntimeError: license server unreachable" in message
    _remove_all_groups()


def test_init_error_with_log_policy_skips_the_child_and_records_it(
    ray_local: Any, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver
) -> None:
    child = {"callback_class": M + "RaisesInInit", "name": "licensed",
             "raise_error_on_callback": False}
    llm_config = make_llm_config(tiny_model_dir, COMPOSITE, _kwargs(otlp_receiver, child))
    callback = start_like_vllm_engine(llm_config)
    remove_pg(callback)
    assert [c.name for c in callback.children] == ["after"]
    assert "license server unreachable" in callback.failed_children["licensed"]
    assert callback.ctx.custom_data.get("after_ran") is True
    assert "init_failed_child_ran" not in callback.ctx.custom_data
    span = _wait_child_span(otlp_receiver, "__init__", "licensed")
    assert span.attributes[catalog.A_OUTCOME] == "error"
    assert span.attributes[catalog.A_CLASS] == M + "RaisesInInit"
    assert "license server unreachable" in span.status_message
    # Under the replica's startup trace, like every hook span.
    spans = otlp_receiver.wait_for_spans(
        lambda ss: any(s.name == catalog.SPAN_STARTUP for s in ss), timeout=30)
    root = next(s for s in spans if s.name == catalog.SPAN_STARTUP)
    assert span.trace_id == root.trace_id and span.parent_span_id == root.span_id
    wait_for_metric(
        ray_local.metrics_url, catalog.HOOK_CALLS.exposed_name(ray=True),
        lambda ss: any(lb.get("callback") == "licensed" and lb.get("hook") == "__init__"
                       and lb.get("outcome") == "error" for lb, _ in ss),
        timeout=60,
    )


# --- unpicklable state ------------------------------------------------------------------------


def test_unpicklable_child_with_raise_policy_fails_construction(
    ray_local: Any, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver
) -> None:
    children = [{"callback_class": M + "HoldsLock", "name": "locked"},
                {"callback_class": M + "HoldsSocket", "name": "sock"}]
    llm_config = make_llm_config(tiny_model_dir, COMPOSITE, _kwargs(otlp_receiver, *children))
    with pytest.raises(CallbackConfigError) as info:
        llm_config.get_or_create_callback()
    message = str(info.value)
    assert message.startswith("callbacks[0] (locked): callback 'locked' does not survive "
                              "pickling"), message
    assert "attribute 'guard' holds a _thread.lock" in message, message
    _remove_all_groups()


def test_unpicklable_child_with_log_policy_stays_in_the_replica(
    ray_local: Any, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver
) -> None:
    children = [{"callback_class": M + "HoldsLock", "name": "locked",
                 "raise_error_on_callback": False},
                {"callback_class": M + "HoldsSocket", "name": "sock",
                 "raise_error_on_callback": False}]
    llm_config = make_llm_config(tiny_model_dir, COMPOSITE, _kwargs(otlp_receiver, *children))
    # Ray's initialize_node pickles the composite into the download task: it must not fail.
    callback = start_like_vllm_engine(llm_config)
    remove_pg(callback)
    ctx = callback.ctx
    assert ctx.custom_data.get("lock_child_ran_in_replica") is True
    assert ctx.custom_data.get("after_ran") is True
    assert "attribute 'guard'" in callback.failed_children["locked"]
    assert "attribute 'conn' holds a socket.socket" in callback.failed_children["sock"]
    span = _wait_child_span(otlp_receiver, "__getstate__", "locked")
    assert span.attributes[catalog.A_OUTCOME] == "error"
    assert "guard" in span.status_message
    # The download task ran, without the unpicklable children (HoldsLock would raise there).
    download = otlp_receiver.wait_for_span(catalog.SPAN_HOOK_PREFIX + DOWNLOAD, timeout=60)
    assert download.resource_attributes["process.pid"] != os.getpid()
    assert download.attributes[catalog.A_OUTCOME] == "ok"
    assert _child_span(otlp_receiver.spans(), DOWNLOAD, "locked") is None


@pytest.mark.parametrize("raise_error", [True, False])
def test_state_made_unpicklable_by_a_hook_is_caught_when_ray_pickles(
    ray_local: Any, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver, raise_error: bool
) -> None:
    child = {"callback_class": M + "LocksInHook", "name": "late_lock",
             "raise_error_on_callback": raise_error}
    llm_config = make_llm_config(tiny_model_dir, COMPOSITE, _kwargs(otlp_receiver, child))
    if raise_error:
        # Raised where Ray pickles the LLMConfig into the download task (initialize_node).
        with pytest.raises(CallbackConfigError) as info:
            start_like_vllm_engine(llm_config)
        message = str(info.value)
        assert message.startswith("callbacks[0] (late_lock): callback 'late_lock' does not "
                                  "survive pickling"), message
        assert "(at pickling)" in message and "attribute 'guard' holds a _thread.lock" in message
        remove_pg(llm_config.get_or_create_callback())
        return
    callback = start_like_vllm_engine(llm_config)
    remove_pg(callback)
    assert callback.ctx.custom_data.get("after_ran") is True
    assert "attribute 'guard'" in callback.failed_children["late_lock"]
    span = _wait_child_span(otlp_receiver, "__getstate__", "late_lock")
    assert span.attributes[catalog.A_OUTCOME] == "error"
    download = otlp_receiver.wait_for_span(catalog.SPAN_HOOK_PREFIX + DOWNLOAD, timeout=60)
    assert download.attributes[catalog.A_OUTCOME] == "ok"
    assert _child_span(otlp_receiver.spans(), DOWNLOAD, "late_lock") is None


def _check(tmp_path: Path, name: str, yaml_text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(yaml_text))
    return subprocess.run(
        [sys.executable, "-m", "llm_otel_callbacks", "check", str(path)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def test_offline_check_names_unpicklable_and_failing_children(tmp_path: Path) -> None:
    """Before deploy, whatever the policy: both would not run as written."""
    result = _check(tmp_path, "bad.yaml", f"""\
        applications:
          - name: llm
            import_path: ray.serve.llm:build_openai_app
            args:
              llm_configs:
                - model_loading_config: {{model_id: a, model_source: /models/a}}
                  callback_config:
                    callback_class: {COMPOSITE}
                    callback_kwargs:
                      callbacks:
                        - {{callback_class: {M}HoldsLock, name: locked}}
                - model_loading_config: {{model_id: b, model_source: /models/b}}
                  callback_config:
                    callback_class: {COMPOSITE}
                    callback_kwargs:
                      callbacks:
                        - {{callback_class: {M}HoldsSocket, name: sock,
                            raise_error_on_callback: false}}
                        - {{callback_class: {M}RaisesInInit, name: licensed,
                            raise_error_on_callback: false}}
                - model_loading_config: {{model_id: c, model_source: /models/c}}
                  callback_config:
                    callback_class: {M}HoldsLock
        """)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "FAIL applications[llm].args.llm_configs[0].callback_config:" in out
    assert "callbacks[0] (locked): callback 'locked' does not survive pickling" in out
    assert "attribute 'guard' holds a _thread.lock" in out
    assert "FAIL applications[llm].args.llm_configs[1].callback_config:" in out
    assert "callback 'sock' does not survive pickling" in out
    assert "attribute 'conn' holds a socket.socket" in out
    assert "callback 'licensed' failed in hook '__init__'" in out
    assert "RuntimeError: license server unreachable" in out
    # A callback used alone (not in a composite) is named by its attribute too.
    assert "FAIL applications[llm].args.llm_configs[2].callback_config:" in out
    assert "HoldsLock does not survive pickling" in out
    assert out.count("attribute 'guard' holds a _thread.lock") == 2, out


def _remove_all_groups() -> None:
    """get_or_create_callback() made a placement group before the construction failed."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    for pg_id, info in ray.util.placement_group_table().items():
        if info.get("state") != "REMOVED":
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))
