"""Composite on real Ray: children of three styles named by dotted path, run through Ray's
own get_or_create_callback() and initialize_node(); spans after a real OTLP export."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_otel_callbacks import catalog
from llm_otel_callbacks.adapters import NODE_PRE_DOWNLOAD
from llm_otel_callbacks.telemetry import reset_telemetry
from tests._support.flow import make_llm_config, remove_pg, start_like_vllm_engine
from tests._support.otlp_receiver import OtlpHttpReceiver, ReceivedSpan
from tests._support.ray_env import wait_for_metric

T = "tests.callbacks_for_tests."
COMPOSITE = "llm_otel_callbacks.Composite"


@pytest.fixture(autouse=True)
def _fresh_telemetry() -> Iterator[None]:
    reset_telemetry()
    yield
    reset_telemetry()


def _tel(rx: OtlpHttpReceiver) -> dict[str, Any]:
    return {"endpoint": rx.endpoint, "schedule_delay_ms": 100, "otlp_metrics": False}


def _three_styles(report_dir: Path, **seed: Any) -> list[Any]:
    return [
        {"callback_class": T + "RayStyleChild", "name": "ray_style",
         "callback_kwargs": {"policy": "TOKENIZER_ONLY", "report_dir": str(report_dir)}},
        {"callback_class": T + "SeedStyleChild", "name": "seed", "callback_kwargs": seed},
        {"callback_class": T + "phase_child", "name": "fn", "callback_kwargs": {"tag": "x"}},
    ]


def _child_spans(spans: list[ReceivedSpan], hook: str) -> dict[str, ReceivedSpan]:
    return {
        s.attributes[catalog.A_CALLBACK]: s
        for s in spans
        if s.attributes.get(catalog.A_HOOK) == hook and s.name.count(" ") == 2
    }


def test_three_styles_share_ctx_in_order_across_the_pickle(
    ray_local, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver, tmp_path: Path
) -> None:
    llm_config = make_llm_config(
        tiny_model_dir, COMPOSITE,
        {"callbacks": _three_styles(tmp_path), "telemetry": _tel(otlp_receiver)},
    )
    callback = start_like_vllm_engine(llm_config)
    remove_pg(callback)
    ctx = callback.ctx

    # Order, on the one shared ctx Ray reads.
    assert ctx.custom_data["order"] == [
        "ray_style:before", "seed:before", "ray_style:after", "seed:after",
    ]
    assert ctx.worker_node_download_model.name == "TOKENIZER_ONLY"
    assert ctx.runtime_env["env_vars"]["PHASE_CHILD"] == "x"
    # Phase functions share one data dict (seed 002), persisted across phases; pre_download
    # ran on the node (in Ray's download task), post_initialization waits for the engine.
    assert ctx.custom_data["phase_data"]["phases"] == [
        "pre_initialization", "post_download", "post_placement_group",
    ]
    assert set(ctx.custom_data) >= {"ray_style", "seed", "fn"}

    # In Ray's download task (another process) the children ran in order too, on a ctx
    # carrying what the replica set before the pickle.
    (report,) = list(tmp_path.glob("composite-download-*.txt"))
    order, policy, note = report.read_text().split("|")
    assert order.split(",")[-1] == "ray_style:download"
    assert policy == "TOKENIZER_ONLY"
    assert note == "seeded"

    spans = otlp_receiver.wait_for_spans(
        lambda ss: len(_child_spans(ss, "on_before_download_model_files_distributed")) == 1
        and len(_child_spans(ss, NODE_PRE_DOWNLOAD)) == 2
        and len(_child_spans(ss, "on_after_node_init")) == 3,
        timeout=60,
    )
    # Child spans nest under the composite's span for the same hook.
    for hook in ("on_before_node_init", "on_after_node_init",
                 "on_before_download_model_files_distributed", NODE_PRE_DOWNLOAD):
        parent = next(
            s for s in spans
            if s.name == catalog.SPAN_HOOK_PREFIX + hook
            and s.attributes[catalog.A_CALLBACK] == "Composite"
        )
        children = _child_spans(spans, hook)
        assert children, hook
        assert all(c.parent_span_id == parent.span_id for c in children.values())
        assert all(c.trace_id == parent.trace_id for c in children.values())
    # On the node: the seed's on_before_download and the phase function's pre_download run
    # before Ray reads the download policy (so what they set is what the node downloads);
    # Ray's own download hook runs where Ray calls it, after.
    assert set(_child_spans(spans, "on_before_download_model_files_distributed")) == {
        "ray_style"
    }
    assert set(_child_spans(spans, NODE_PRE_DOWNLOAD)) == {"seed", "fn"}

    # Change log: who changed what, old -> new, on the child's and the composite's span.
    before = _child_spans(spans, "on_before_node_init")
    events = {
        (ev[1][catalog.A_CALLBACK], ev[1][catalog.A_FIELD]): ev[1]
        for name, s in before.items() for ev in s.events if ev[0] == catalog.EVENT_CTX_CHANGE
    }
    change = events[("ray_style", "worker_node_download_model")]
    assert change[catalog.A_OLD] == "MODEL_AND_TOKENIZER"
    assert change[catalog.A_NEW] == "TOKENIZER_ONLY"
    assert ("fn", "runtime_env") in events
    assert "PHASE_CHILD" in events[("fn", "runtime_env")][catalog.A_NEW]
    assert "x" not in events[("fn", "runtime_env")][catalog.A_NEW].split("PHASE_CHILD")[1][:3]

    # Per-child metric series (label = the child's name), via Ray's export port.
    samples = wait_for_metric(
        ray_local.metrics_url, catalog.HOOK_CALLS.exposed_name(ray=True),
        lambda ss: {lb.get("callback") for lb, _ in ss} >= {"ray_style", "seed", "fn"},
        timeout=60,
    )
    assert samples
    wait_for_metric(
        ray_local.metrics_url, catalog.CTX_CHANGES.exposed_name(ray=True),
        lambda ss: any(lb.get("callback") == "ray_style"
                       and lb.get("field") == "worker_node_download_model" for lb, _ in ss),
        timeout=60,
    )


def test_veto_skips_node_init_and_is_recorded(
    ray_local, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver, tmp_path: Path
) -> None:
    llm_config = make_llm_config(
        tiny_model_dir, COMPOSITE,
        {"callbacks": _three_styles(tmp_path, veto=True), "telemetry": _tel(otlp_receiver)},
    )
    callback = start_like_vllm_engine(llm_config)
    remove_pg(callback)
    assert callback.ctx.run_init_node is False
    assert callback.vetoed_by == ["seed"]
    assert not list(tmp_path.glob("composite-download-*.txt"))  # no download task ran
    spans = otlp_receiver.wait_for_spans(
        lambda ss: any(s.name == catalog.SPAN_STARTUP for s in ss), timeout=30
    )
    composite_before = next(
        s for s in spans if s.name == catalog.SPAN_HOOK_PREFIX + "on_before_node_init"
    )
    vetoes = [ev for ev in composite_before.events if ev[0] == catalog.EVENT_VETO]
    assert vetoes and vetoes[0][1][catalog.A_CALLBACK] == "seed"
    assert not any(
        s.attributes.get(catalog.A_HOOK) == "on_before_download_model_files_distributed"
        for s in spans
    )


def test_per_child_error_policy(
    ray_local, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver, tmp_path: Path
) -> None:
    callbacks = [
        {"callback_class": T + "FailingChild", "name": "tolerated",
         "raise_error_on_callback": False},
        {"callback_class": T + "RayStyleChild", "name": "next_one"},
        {"callback_class": T + "FailingChild", "name": "fatal"},
        {"callback_class": T + "RayStyleChild", "name": "never"},
    ]
    llm_config = make_llm_config(
        tiny_model_dir, COMPOSITE, {"callbacks": callbacks, "telemetry": _tel(otlp_receiver)},
    )
    with pytest.raises(Exception, match="callback 'fatal' failed in hook 'on_before_node_init'"):
        start_like_vllm_engine(llm_config)
    callback = llm_config.get_or_create_callback()
    remove_pg(callback)
    # The tolerated failure let the next child run; the fatal one stopped the hook.
    assert callback.ctx.custom_data["order"] == [
        "tolerated:before", "next_one:before", "fatal:before",
    ]
    spans = otlp_receiver.wait_for_spans(
        lambda ss: len(_child_spans(ss, "on_before_node_init")) == 3, timeout=30
    )
    children = _child_spans(spans, "on_before_node_init")
    assert children["tolerated"].attributes[catalog.A_OUTCOME] == "error"
    assert children["tolerated"].status_code == "STATUS_CODE_ERROR"
    assert children["next_one"].attributes[catalog.A_OUTCOME] == "ok"
    assert children["fatal"].attributes[catalog.A_OUTCOME] == "error"
    assert "never" not in children


@pytest.mark.parametrize("style", ["SlowSyncChild", "SlowAsyncChild"])
def test_timeouts_sync_and_async(
    ray_local, tiny_model_dir: Path, otlp_receiver: OtlpHttpReceiver, style: str
) -> None:
    callbacks = [
        {"callback_class": T + style, "name": "slow_logged", "timeout_s": 0.3,
         "raise_error_on_callback": False, "callback_kwargs": {"sleep_s": 5}},
        {"callback_class": T + "RayStyleChild", "name": "after_slow"},
        {"callback_class": T + style, "name": "slow_fatal", "timeout_s": 0.3,
         "callback_kwargs": {"sleep_s": 5}},
    ]
    llm_config = make_llm_config(
        tiny_model_dir, COMPOSITE, {"callbacks": callbacks, "telemetry": _tel(otlp_receiver)},
    )
    import time

    t0 = time.monotonic()
    with pytest.raises(Exception, match=r"slow_fatal.*did not finish within 0\.3s"):
        start_like_vllm_engine(llm_config)
    assert time.monotonic() - t0 < 4.5  # neither 5 s sleep was waited for
    remove_pg(llm_config.get_or_create_callback())
    spans = otlp_receiver.wait_for_spans(
        lambda ss: len(_child_spans(ss, "on_before_node_init")) == 3, timeout=30
    )
    children = _child_spans(spans, "on_before_node_init")
    assert children["slow_logged"].attributes[catalog.A_OUTCOME] == "timeout"
    assert children["after_slow"].attributes[catalog.A_OUTCOME] == "ok"
    assert children["slow_fatal"].attributes[catalog.A_OUTCOME] == "timeout"


def test_bad_entries_fail_at_construction_with_pointed_messages(ray_local, tiny_model_dir) -> None:
    from llm_otel_callbacks import CallbackConfigError

    bad = [
        "nowhere.module.Cls",
        {"callback_class": T + "RayStyleChild", "timeout_s": 0},
        {"callback_class": T + "RayStyleChild", "name": "dup"},
        {"callback_class": T + "NoopChild", "name": "dup"},
        {"callback_kwargs": {}},
        {"callback_class": T + "RayStyleChild", "retries": 3},
    ]
    llm_config = make_llm_config(tiny_model_dir, COMPOSITE, {"callbacks": bad})
    with pytest.raises(CallbackConfigError) as info:
        llm_config.get_or_create_callback()
    message = str(info.value)
    assert "callbacks[0] (nowhere.module.Cls): field 'callback_class': cannot import" in message
    assert "callbacks[1]" in message and "'timeout_s'" in message
    assert "callbacks[3] (dup): field 'name': 'dup' is already used by callbacks[2]" in message
    assert "callbacks[4]" in message and "'callback_class'" in message
    assert "callbacks[5]" in message and "'retries'" in message

    wrong_kwargs = [{"callback_class": T + "SeedStyleChild", "callback_kwargs": {"nope": 1}}]
    llm_config = make_llm_config(tiny_model_dir, COMPOSITE, {"callbacks": wrong_kwargs})
    with pytest.raises(CallbackConfigError, match=r"callbacks\[0\] \(SeedStyleChild\).*nope"):
        llm_config.get_or_create_callback()


GOOD_YAML = """\
applications:
  - name: llm
    import_path: ray.serve.llm:build_openai_app
    args:
      llm_configs:
        - model_loading_config: {model_id: tiny, model_source: /models/tiny}
          callback_config:
            callback_class: llm_otel_callbacks.Composite
            callback_kwargs:
              callbacks:
                - tests.callbacks_for_tests.NoopChild
                - callback_class: tests.callbacks_for_tests.SeedStyleChild
                  name: seed
                  timeout_s: 10
                  callback_kwargs: {note: hi}
                - callback_class: tests.callbacks_for_tests.phase_child
                  raise_error_on_callback: false
"""


def test_offline_check_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests._support.ray_env import REPO_ROOT

    good = tmp_path / "good.yaml"
    good.write_text(GOOD_YAML)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        GOOD_YAML.replace("tests.callbacks_for_tests.NoopChild", "tests.nothing.Here")
        .replace("timeout_s: 10", "timeout_s: -1")
    )
    env_path = {"PYTHONPATH": str(REPO_ROOT)}
    import os

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llm_otel_callbacks", "check", str(path)],
            capture_output=True, text=True, env={**os.environ, **env_path}, timeout=300,
        )

    ok = check(good)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK   applications[llm].args.llm_configs[0].callback_config: Composite" in ok.stdout
    assert "NoopChild, seed, phase_child" in ok.stdout
    failed = check(bad)
    assert failed.returncode == 1
    assert "callbacks[0] (tests.nothing.Here): field 'callback_class'" in failed.stdout
    assert "callbacks[1] (seed)" in failed.stdout and "timeout_s" in failed.stdout
    bare = tmp_path / "bare.yaml"
    bare.write_text(textwrap.dedent("""\
        callback_class: llm_otel_callbacks.Composite
        callback_kwargs: {callbacks: [tests.callbacks_for_tests.UnpicklableChild]}
    """))
    failed = check(bare)
    assert failed.returncode == 1
    assert "does not survive pickling" in failed.stdout
