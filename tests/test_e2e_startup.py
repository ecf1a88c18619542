"""A real Ray Serve LLM app (build_openai_app + serve.run, the real VLLMEngine on the CPU,
Ray's plain LLMServer) whose callback is a Composite of every startup built-in and a user
callback. It answers a request; then the spans of its startup are checked after a real
OTLP/HTTP export, and its metrics after a real scrape of Ray's metrics export port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_otel_callbacks import catalog
from tests._support.otlp_receiver import OtlpHttpReceiver, ReceivedSpan
from tests._support.ray_env import wait_for_metric
from tests._support.serve_app import App, deployed

pytestmark = pytest.mark.e2e

HOOKS = (
    "on_before_node_init",
    "on_before_download_model_files_distributed",
    "on_after_node_init",
)
CHILDREN = ("Timing", "DownloadPolicy", "CustomPlacementGroup", "RecordingCallback")
# Which children implement which hook (a hook a child does not implement is not called).
IMPLEMENTS = {
    HOOKS[0]: set(CHILDREN),
    HOOKS[1]: {"Timing", "DownloadPolicy", "RecordingCallback"},
    HOOKS[2]: {"Timing", "RecordingCallback"},
}


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[App, OtlpHttpReceiver, Path]]:
    from tests.conftest import _ensure_ray_down

    _ensure_ray_down()
    tmp = tmp_path_factory.mktemp("e2e-startup")
    reports = tmp / "reports"
    reports.mkdir()
    with OtlpHttpReceiver() as rx:
        callback_config = {
            "callback_class": "llm_otel_callbacks.Composite",
            "callback_kwargs": {
                "callbacks": [
                    "llm_otel_callbacks.builtin.Timing",
                    {"callback_class": "llm_otel_callbacks.builtin.DownloadPolicy",
                     "callback_kwargs": {"worker_node": "tokenizer_only"}},
                    {"callback_class": "llm_otel_callbacks.builtin.CustomPlacementGroup",
                     "callback_kwargs": {"bundles": [{"CPU": 1}], "strategy": "PACK",
                                         "ready_timeout_s": 60}},
                    {"callback_class": "tests.callbacks_for_tests.RecordingCallback",
                     "callback_kwargs": {"report_dir": str(reports)}},
                ],
                "telemetry": {"endpoint": rx.endpoint, "schedule_delay_ms": 200,
                              "otlp_metrics": False, "service_name": "e2e-startup"},
            },
        }
        with deployed(tmp, tiny_model_dir, callback_config, num_cpus=6) as running:
            yield running, rx, reports


def _hook_spans(spans: list[ReceivedSpan], hook: str) -> dict[str, ReceivedSpan]:
    return {
        s.attributes[catalog.A_CALLBACK]: s
        for s in spans
        if s.attributes.get(catalog.A_HOOK) == hook
    }


def test_deployment_answers_and_its_startup_is_one_trace(
    app: tuple[App, OtlpHttpReceiver, Path],
) -> None:
    running, rx, reports = app
    answer = running.chat("hello")
    assert answer["choices"][0]["message"]["content"] is not None
    assert answer["usage"]["completion_tokens"] > 0

    spans = rx.wait_for_spans(
        lambda ss: set(_hook_spans(ss, HOOKS[2])) >= {"Composite", *IMPLEMENTS[HOOKS[2]]}
        and any(s.name == catalog.SPAN_STARTUP for s in ss),
        timeout=120,
    )
    root = next(s for s in spans if s.name == catalog.SPAN_STARTUP)
    # The replica's startup root carries where it ran: Serve app/deployment/replica, Ray ids.
    res = root.resource_attributes
    assert res["service.name"] == "e2e-startup"
    assert res[catalog.R_SERVE_DEPLOYMENT] and res[catalog.R_SERVE_REPLICA]
    assert res[catalog.R_RAY_ACTOR] and res[catalog.R_RAY_NODE]
    replica_pid = res["process.pid"]

    trace = [s for s in spans if s.trace_id == root.trace_id]
    for hook in HOOKS:
        by_callback = _hook_spans(trace, hook)
        assert set(by_callback) == {"Composite", *IMPLEMENTS[hook]}, hook
        for child in IMPLEMENTS[hook]:
            assert by_callback[child].attributes[catalog.A_OUTCOME] == "ok", (hook, child)
    download = _hook_spans(trace, HOOKS[1])["Composite"]
    assert download.resource_attributes["process.pid"] != replica_pid  # Ray's download task
    assert download.parent_span_id == root.span_id

    # The download task really received the policy DownloadPolicy chose.
    policy_span = _hook_spans(trace, HOOKS[1])["DownloadPolicy"]
    assert policy_span.attributes[catalog.A_POLICY] == "TOKENIZER_ONLY"
    # The engine runs in the group CustomPlacementGroup made; the change log says who.
    pg_span = _hook_spans(trace, HOOKS[0])["CustomPlacementGroup"]
    assert pg_span.attributes[catalog.A_PG_ID]
    changes = [
        ev[1] for ev in _hook_spans(trace, HOOKS[0])["Composite"].events
        if ev[0] == catalog.EVENT_CTX_CHANGE
    ]
    assert any(
        c[catalog.A_CALLBACK] == "CustomPlacementGroup" and c[catalog.A_FIELD] == "placement_group"
        for c in changes
    )
    # Timing's waterfall phases are in the same trace.
    phases = {
        s.attributes.get(catalog.A_PHASE): s for s in trace
        if s.name.startswith(catalog.SPAN_PHASE_PREFIX)
    }
    assert {catalog.PHASE_BEFORE_NODE_INIT, catalog.PHASE_NODE_INIT,
            catalog.PHASE_DOWNLOAD_TASK_START} <= set(phases)
    assert phases[catalog.PHASE_DOWNLOAD_TASK_START].attributes[catalog.A_NODE_ID]
    assert 0 < phases[catalog.PHASE_NODE_INIT].duration_s < 600
    # State set in the replica before the pickle reached the download task.
    (report,) = list(reports.glob("download-*.txt"))
    assert report.read_text().startswith("set-before-pickle|")


def test_startup_metrics_after_a_real_scrape(app: tuple[App, OtlpHttpReceiver, Path]) -> None:
    running, _rx, _reports = app
    url = running.ray.metrics_url

    def has(name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return wait_for_metric(
            url, name,
            lambda ss: any(all(lb.get(k) == v for k, v in labels.items()) for lb, _ in ss),
            timeout=90,
        )

    calls = catalog.HOOK_CALLS.exposed_name(ray=True)
    for child in CHILDREN:
        has(calls, callback=child, hook=HOOKS[0], model="tiny", outcome="ok")
    has(calls, callback="DownloadPolicy", hook=HOOKS[1])
    phase = catalog.STARTUP_PHASE_DURATION.exposed_name(ray=True) + "_count"
    for name in (catalog.PHASE_BEFORE_NODE_INIT, catalog.PHASE_NODE_INIT,
                 catalog.PHASE_DOWNLOAD_TASK_START):
        has(phase, phase=name, model="tiny")
    has(catalog.DOWNLOAD_DECISIONS.exposed_name(ray=True), policy="TOKENIZER_ONLY")
    has(catalog.PLACEMENT_GROUP_WAIT.exposed_name(ray=True) + "_count", strategy="PACK",
        outcome="ok")


