"""The Grafana dashboards: generated from the catalog (the committed JSON is what the generator
makes), every expression valid PromQL (promtool), every panel query answered by a real
Prometheus scraping a real run (the demo's Serve LLM deployment plus Ray's initialize_node
flows on the same cluster), and exemplars that link a latency point to its trace. On the same
run, a second Prometheus loads the alerting rules (tests/test_alerts.py has the rest) and the
failing request callback's alert goes pending or firing."""

from __future__ import annotations

import asyncio
import io
import json
import math
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from llm_otel_callbacks import _dashboard_specs, _promql, alerts, catalog, dashboards
from llm_otel_callbacks.demo import MODEL_ID, DemoContext, DemoOptions, run_demo
from llm_otel_callbacks.demo.prometheus import PrometheusServer, promtool_check, start_prometheus
from tests._support.prometheus import require_prometheus

GENERATOR = {Path(m.__file__).name: Path(m.__file__).read_text()
             for m in (dashboards, _dashboard_specs, _promql)}
RATE_S = 10  # $__rate_interval in the checks: 10 scrapes at the 1 s interval used here


@pytest.fixture(scope="module")
def prometheus_tools() -> tuple[str, str]:
    return require_prometheus()


def _models() -> dict[str, dict[str, Any]]:
    return {spec.file: json.loads(dashboards.render(spec)) for spec in dashboards.dashboards()}


# --- generated, not hand-written -----------------------------------------------------------


def test_committed_dashboards_are_what_the_catalog_generates() -> None:
    diffs = dashboards.differences()
    assert not diffs, "dashboards/ is stale; run python -m llm_otel_callbacks dashboards\n" + (
        "\n".join(diffs)[:4000])


def test_generation_is_deterministic(tmp_path: Path) -> None:
    first = [p.read_bytes() for p in dashboards.generate(tmp_path / "a")]
    second = [p.read_bytes() for p in dashboards.generate(tmp_path / "b")]
    assert first == second


def test_every_catalog_metric_has_a_panel() -> None:
    exprs = " ".join(dashboards.all_expressions().values())
    missing = [s.name for s in catalog.ALL_METRICS if s.exposed_name(ray=True) not in exprs]
    assert not missing


def test_no_metric_name_is_typed_twice() -> None:
    # Our names come from the catalog only ...
    for name, source in GENERATOR.items():
        for spec in catalog.ALL_METRICS:
            assert spec.name not in source, f"{spec.name} is typed in {name}"
    # ... and each series of another component is named exactly once.
    others = [v for v in vars(_promql).values() if isinstance(v, _promql.Series)
              and v.spec is None]
    assert len(others) >= 10
    everything = "".join(GENERATOR.values())
    for series in others:
        assert everything.count(f'"{series.family}"') == 1, series.family


def test_dashboards_are_grafana_models_with_the_variables_and_links() -> None:
    models = _models()
    assert len({m["uid"] for m in models.values()}) == len(models) == 2
    for name, model in models.items():
        assert model["schemaVersion"] >= 36
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for var in ("model", "node", "app", "deployment"):
            assert variables[var]["type"] == "query" and variables[var]["includeAll"], var
        assert variables["tracing"]["query"] == "tempo"
        assert variables["trace_url"]["type"] == "textbox"
        panels = [p for p in model["panels"] if p["type"] != "row"]
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in panels:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])
            # No panel may overlap another on Grafana's 24-column grid.
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        # Latency panels ask for exemplars and link the exemplar's trace id to the trace.
        exemplar_panels = [p for p in panels if any(t.get("exemplar") for t in p["targets"])]
        assert exemplar_panels, name
        for panel in exemplar_panels:
            urls = [link["url"] for link in panel["fieldConfig"]["defaults"]["links"]]
            assert any("${__data.fields.trace_id}" in u and "${tracing}" in u for u in urls)
            assert any(u.startswith("${trace_url}") for u in urls)
    startup = models["ray-serve-llm-startup.json"]
    rows = [p["title"] for p in startup["panels"] if p["type"] == "row"]
    assert any("vLLM" in r for r in rows) and any("waterfall" in r for r in rows)
    traceql = json.dumps(startup["links"])
    assert catalog.SPAN_STARTUP in traceql


def test_promtool_accepts_every_expression(prometheus_tools: tuple[str, str],
                                           tmp_path: Path) -> None:
    exprs = {key: dashboards.instantiate(expr, 3600, RATE_S)
             for key, expr in dashboards.all_expressions().items()}
    assert len(exprs) > 40
    ok, output = promtool_check(exprs, tmp_path, binary=prometheus_tools[1])
    assert ok, output
    assert f"SUCCESS: {len(exprs)} rules found" in output


def test_promtool_check_can_fail(prometheus_tools: tuple[str, str], tmp_path: Path) -> None:
    ok, output = promtool_check({"broken": "sum by (le (x)"}, tmp_path,
                                binary=prometheus_tools[1])
    assert not ok and "broken" in output


# --- exemplars: a latency point links to its trace -------------------------------------------


def test_exemplars_carry_the_trace_id_the_dashboard_links(
    prometheus_tools: tuple[str, str], tmp_path: Path
) -> None:
    """Outside Ray (prometheus_client backend, OpenMetrics exposition) a hook observation
    carries its span's trace id; Prometheus stores it, and the exemplar-enabled panel query,
    on that backend's names, returns it under the label the panel's data link reads."""
    from llm_otel_callbacks.demo.waterfall import read_spans
    from llm_otel_callbacks.telemetry import get_telemetry, reset_telemetry
    from tests.callbacks_for_tests import NoopChild

    reset_telemetry()
    spans_file = tmp_path / "spans.jsonl"
    callback = NoopChild(llm_config=None, telemetry={
        "metrics_backend": "prometheus", "prometheus_port": 0,
        "traces_file": str(spans_file), "schedule_delay_ms": 50,
    })
    try:
        for _ in range(3):
            callback.run_callback_sync("on_before_node_init")
        port = get_telemetry(callback.telemetry_settings).prometheus_port
        assert port
        with start_prometheus([f"127.0.0.1:{port}"], tmp_path / "prom", scrape_interval_s=1,
                              binary=prometheus_tools[0]) as prom:
            prom.wait_until_scraped()
            expr = _exemplar_expr()
            deadline = time.monotonic() + 30
            exemplars: list[dict[str, Any]] = []
            while time.monotonic() < deadline and not exemplars:
                found = prom.query_exemplars(expr, time.time() - 600, time.time() + 60)
                # Only this test's series: earlier tests in this process may have left
                # exemplars in the same (process-global) prometheus_client registry.
                exemplars = [
                    e for series in found
                    if series.get("seriesLabels", {}).get("callback") == "NoopChild"
                    for e in series["exemplars"]
                ]
                time.sleep(0.5)
    finally:
        reset_telemetry()
    hook_traces = {s.trace_id for s in read_spans(spans_file)
                   if s.attributes.get(catalog.A_HOOK) == "on_before_node_init"}
    assert exemplars, "no exemplar stored"
    linked = {e["labels"]["trace_id"] for e in exemplars}
    assert linked <= hook_traces and linked


def _exemplar_expr() -> str:
    """The hook-latency panel's query, on the prometheus_client backend's (unprefixed) names."""
    model = _models()["ray-serve-llm-startup.json"]
    for _, _, target in dashboards.panel_queries(model):
        ray_name = catalog.HOOK_DURATION.exposed_name(ray=True)
        if target.get("exemplar") and ray_name in target["expr"]:
            expr = target["expr"].replace(ray_name, catalog.HOOK_DURATION.exposed_name(ray=False))
            # Outside Ray there is no NodeAddress label: "All" matches its absence too.
            return dashboards.instantiate(expr, 3600, RATE_S)
    raise AssertionError("no exemplar-enabled hook latency panel")


# --- every panel answers on a real run -------------------------------------------------------

# Added to the demo's Composite so the request-callback panels have data too. The RateLimiter
# budget lets the first requests through and refuses the later ones.
REQUESTS_ALLOWED = 8
EXTRA_CALLBACKS: list[Any] = [
    "llm_otel_callbacks.builtin.tokens.TokenCounter",
    {"callback_class": "llm_otel_callbacks.builtin.cost.CostTracker", "name": "cost",
     "callback_kwargs": {"prices": {MODEL_ID: {"input": 0.5, "output": 1.5}}}},
    {"callback_class": "llm_otel_callbacks.builtin.cost.CostTracker", "name": "unpriced"},
    "llm_otel_callbacks.builtin.progress.StreamingProgress",
    {"callback_class": "llm_otel_callbacks.builtin.rate_limit.RateLimiter",
     "callback_kwargs": {"requests_per_minute": REQUESTS_ALLOWED, "key": "global"}},
    {"callback_class": "tests.dashboard_callbacks.FailingRequestHook",
     "raise_error_on_callback": False},
    {"callback_class": "tests.dashboard_callbacks.SlowRequestHook", "timeout_s": 0.05,
     "raise_error_on_callback": False},
]


def _startup_flows(ctx: DemoContext, tmp: Path) -> None:
    """Ray's real initialize_node, driven from this driver on the demo's cluster, with the
    children the demo does not have: a placement group of our own, a child that errors and
    one that times out (log policy), a startup that fails, a collector that is down."""
    from llm_otel_callbacks.telemetry import reset_telemetry
    from tests._support.flow import make_llm_config, remove_pg, start_like_vllm_engine
    from tests._support.ray_env import free_port

    telemetry = {"endpoint": f"http://127.0.0.1:{free_port()}", "otlp_metrics": False,
                 "traces_file": str(tmp / "flow-spans.jsonl"), "schedule_delay_ms": 100,
                 "export_timeout_s": 1.0}
    children = [
        "llm_otel_callbacks.builtin.Timing",
        "llm_otel_callbacks.builtin.DownloadPolicy",
        {"callback_class": "llm_otel_callbacks.builtin.CustomPlacementGroup",
         "callback_kwargs": {"bundles": [{"CPU": 0.5}], "ready_timeout_s": 60}},
        {"callback_class": "tests.callbacks_for_tests.FailingChild",
         "raise_error_on_callback": False},
        {"callback_class": "tests.callbacks_for_tests.SlowSyncChild",
         "callback_kwargs": {"sleep_s": 1.0}, "timeout_s": 0.1, "raise_error_on_callback": False},
    ]
    config = make_llm_config(ctx.model_dir, "llm_otel_callbacks.Composite",
                             {"callbacks": children, "telemetry": telemetry})
    callback = start_like_vllm_engine(config)
    try:
        # The replica-side hooks again, over a few scrapes (the driver is one process).
        for _ in range(3):
            time.sleep(1.5)
            asyncio.run(callback.run_callback("on_before_node_init"))
            asyncio.run(callback.run_callback("on_after_node_init"))
    finally:
        remove_pg(callback)
    failing = make_llm_config(ctx.model_dir, "llm_otel_callbacks.Composite", {
        "callbacks": ["llm_otel_callbacks.builtin.Timing",
                      "tests.callbacks_for_tests.FailingChild"],
        "telemetry": telemetry,
    })
    try:
        with pytest.raises(Exception, match="child failure"):
            start_like_vllm_engine(failing)
    finally:
        reset_telemetry()  # flush this driver's telemetry now, not at interpreter exit


def _chat(ctx: DemoContext, stream: bool) -> int:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 12, "temperature": 0, "stream": stream}
    request = urllib.request.Request(f"{ctx.http_url}/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _spaced_requests(ctx: DemoContext, count: int) -> list[int]:
    statuses = []
    for i in range(count):
        statuses.append(_chat(ctx, stream=i % 2 == 0))
        time.sleep(1.5)
    return statuses


def _has_data(result: list[dict[str, Any]]) -> bool:
    for series in result:
        points = series.get("values") or ([series["value"]] if "value" in series else [])
        if any(math.isfinite(float(v)) for _, v in points):
            return True
    return False


def _empty_panels(prom: PrometheusServer, since: float) -> list[str]:
    now = time.time()
    range_s = int(now - since) + 60
    empty = []
    for spec in dashboards.dashboards():
        model = json.loads(dashboards.render(spec))
        titles = {str(p["id"]): p["title"] for p in model["panels"]}
        for panel_id, ref, target in dashboards.panel_queries(model):
            expr = dashboards.instantiate(target["expr"], range_s, RATE_S)
            if target.get("instant"):
                result = prom.query(expr, at=now)
            else:
                result = prom.query_range(expr, since, now, step=1)
            if not _has_data(result):
                empty.append(f"{spec.file} / {titles[panel_id]} / {ref}: {expr}")
    return empty


# The shipped rules with short for: durations, and a rejected share the run's rate limiter
# exceeds (it refuses 3 or more of 14 requests).
ALERT_OVERRIDES = {"for.LLMCallbackHookFailing": "2s", "for.LLMRequestsRejected": "2s",
                   "rejected_share": "0.05", "rejected_min_requests": "1"}
HOOK_ALERT = {"alertname": "LLMCallbackHookFailing", "model": MODEL_ID,
              "callback": "FailingRequestHook", "hook": "on_llm_end", "outcome": "error"}
REJECTED_ALERT = {"alertname": "LLMRequestsRejected", "model": MODEL_ID, "callback": "RateLimiter"}


def _matching(found: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    return [a for a in found if labels.items() <= a["labels"].items()
            and a["state"] in ("pending", "firing")]


def _wait_for_alerts(prom: PrometheusServer, timeout: float = 60.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    found = prom.alerts()
    while time.monotonic() < deadline and not (
            _matching(found, HOOK_ALERT) and _matching(found, REJECTED_ALERT)):
        time.sleep(1)
        found = prom.alerts()
    return found


@pytest.mark.e2e
def test_every_panel_query_returns_data_on_a_real_run(
    prometheus_tools: tuple[str, str], tmp_path: Path
) -> None:
    from tests.conftest import _ensure_ray_down

    _ensure_ray_down()
    found: dict[str, Any] = {}
    rules = tmp_path / "alerts.yaml"
    rules.write_text(alerts.rule_file(alerts.AlertSettings().with_overrides(ALERT_OVERRIDES)))

    def on_ready(ctx: DemoContext) -> None:
        prom = ctx.prometheus
        assert prom is not None, "the demo did not start prometheus"
        since = time.time()
        with start_prometheus(prom.targets, tmp_path / "prom-alerts", scrape_interval_s=1,
                              binary=prometheus_tools[0], rule_files=[rules]) as alerting:
            prom.wait_until_scraped()
            _startup_flows(ctx, tmp_path)
            found["statuses"] = _spaced_requests(ctx, REQUESTS_ALLOWED + 3)
            time.sleep(5)  # Ray pushes every second, Prometheus scrapes every second
            found["empty"] = _empty_panels(prom, since)
            found["rule_health"] = [(r["name"], r["health"], r.get("lastError", ""))
                                    for g in alerting.api("rules")["groups"]
                                    for r in g["rules"]]
            found["alerts"] = _wait_for_alerts(alerting)

    out = io.StringIO()
    options = DemoOptions(folder=tmp_path / "demo", requests=3, prometheus=True,
                          prometheus_scrape_s=1.0, num_cpus=8, extra_callbacks=EXTRA_CALLBACKS)
    status = run_demo(options, out=out, on_ready=on_ready)
    assert status == 0, out.getvalue()[-4000:]
    statuses = found["statuses"]
    assert 200 in statuses and 429 in statuses, statuses  # served, then rate-limited
    assert not found["empty"], "panels without data:\n" + "\n".join(found["empty"])
    # The alerting rules, loaded by a real Prometheus scraping the same run.
    assert {name for name, _, _ in found["rule_health"]} == set(alerts.DEFAULT_FOR)
    assert all(health == "ok" for _, health, _ in found["rule_health"]), found["rule_health"]
    hook_alerts = _matching(found["alerts"], HOOK_ALERT)
    assert hook_alerts, f"no {HOOK_ALERT} among {found['alerts']}"
    notes = hook_alerts[0]["annotations"]
    assert notes["summary"] == (f"Callback FailingRequestHook fails in on_llm_end "
                                f"(model {MODEL_ID})")
    assert notes["runbook_url"] == "docs/alerts.md#llmcallbackhookfailing"
    assert hook_alerts[0]["labels"]["severity"] == "warning"
    assert float(hook_alerts[0]["value"]) >= 1
    rejected = _matching(found["alerts"], REJECTED_ALERT)
    assert rejected, f"no {REJECTED_ALERT} among {found['alerts']}"
