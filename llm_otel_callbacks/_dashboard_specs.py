"""What the dashboards show: rows of panels, each a few PromQL queries over catalog metrics.

The rows iterate the catalog's groups; a catalog metric no curated panel shows gets a generic
panel in an "Other metrics" row, so a new metric is on a dashboard without a line here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from . import catalog
from ._promql import (
    RAY,
    SERVE_HEALTHY,
    SERVE_REQUESTS,
    SERVE_STARTUP,
    VLLM_E2E,
    VLLM_GENERATION_TOKENS,
    VLLM_ITL,
    VLLM_KV_CACHE,
    VLLM_PROMPT_TOKENS,
    VLLM_RUNNING,
    VLLM_SUCCESS,
    VLLM_TTFT,
    VLLM_WAITING,
    Series,
    current,
    is_,
    isnt,
    legend,
    live_quantile,
    ours,
    range_count,
    range_quantile,
    range_total,
    rate,
    rate_quantile,
)
from ._request_hooks import REQUEST_HOOKS
from .catalog import MetricSpec

# --- panels ---------------------------------------------------------------------------------------

PanelKind = Literal["timeseries", "stat", "bargauge", "table", "barchart"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    """Evaluated once at the end of the range (stat, table, bar panels)."""
    name: str = ""
    """Column name in a table (the query's refId)."""


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    kind: PanelKind
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 12
    height: int = 8
    exemplars: bool = False
    trace_links: bool = False
    """Panel link to this model's startup traces (TraceQL search)."""
    x_field: str = ""
    """Bar chart: the label on the x axis (queries are merged on it)."""


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    file: str
    title: str
    description: str
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = ("ray", "ray-serve", "llm", "opentelemetry", "llm-otel-callbacks")
    metrics: tuple[MetricSpec, ...] = field(default=())


def _quantiles(s: Series, by: Sequence[str], fn: Any, qs: Sequence[float] = (0.5, 0.95),
               *extra: str) -> tuple[Query, ...]:
    names = legend(by)
    return tuple(Query(fn(s, q, by, *extra), f"p{q * 100:g} {names}".strip()) for q in qs)


def _summary_table(title: str, description: str, s: Series, by: Sequence[str],
                   *extra: str, width: int = 12) -> Panel:
    """count, p50, p95, max per label set, over the range: one row each."""
    queries = (
        Query(range_count(s, by, *extra), instant=True, name="count"),
        Query(range_quantile(s, 0.5, by, *extra), instant=True, name="p50"),
        Query(range_quantile(s, 0.95, by, *extra), instant=True, name="p95"),
        Query(range_quantile(s, 1, by, *extra), instant=True, name="max"),
    )
    return Panel(title, description + " max is the upper bound of the highest bucket used.",
                 "table", queries, unit="s", width=width, height=8)


# --- the startup dashboard ------------------------------------------------------------------------

PHASES = ours(catalog.STARTUP_PHASE_DURATION)
STARTING = ours(catalog.REPLICAS_STARTING)
HOOK_DURATION = ours(catalog.HOOK_DURATION)
HOOK_CALLS = ours(catalog.HOOK_CALLS)
CTX_CHANGES = ours(catalog.CTX_CHANGES)
DECISIONS = ours(catalog.DOWNLOAD_DECISIONS)
PG_WAIT = ours(catalog.PLACEMENT_GROUP_WAIT)
EXPORT_FAILURES = ours(catalog.EXPORT_FAILURES)
FAILED = (catalog.OUTCOME_ERROR, catalog.OUTCOME_TIMEOUT)
_TOTAL = f'{catalog.L_PHASE}="{catalog.PHASE_TOTAL}"'


def _overview_row() -> Row:
    return Row("Overview", (
        Panel("Replicas starting now", "Replicas between callback creation and the end of their "
              "startup (Timing). Ray stops exporting a gauge its process no longer sets, so "
              "no series reads as 0.", "stat",
              (Query(f"{current(STARTING)} or vector(0)", "starting", instant=True),),
              width=6, height=5),
        Panel("Replica startups (range)", "Startup attempts of the replicas that ran in the "
              "range, by outcome.", "stat",
              (Query(range_count(PHASES, (catalog.L_OUTCOME,), _TOTAL), legend(
                  (catalog.L_OUTCOME,)), instant=True),),
              width=6, height=5),
        Panel("Startup time p95 (range)", "From callback creation to the end of the startup "
              "(the total phase).", "stat",
              (Query(range_quantile(PHASES, 0.95, (), _TOTAL, is_(catalog.L_OUTCOME,
                                                                  catalog.OUTCOME_OK)),
                     "p95", instant=True),),
              unit="s", width=6, height=5, trace_links=True),
        Panel("Hook errors and timeouts (range)", "Callback hook calls that failed or timed "
              "out, in replicas and download tasks that ran in the range.", "stat",
              (Query(range_total(HOOK_CALLS, (catalog.L_OUTCOME,),
                                 is_(catalog.L_OUTCOME, *FAILED)),
                     legend((catalog.L_OUTCOME,)), instant=True),),
              width=6, height=5),
    ))


_ENGINE = is_(catalog.L_PHASE, *catalog.ENGINE_PHASES)
_NOT_ENGINE = isnt(catalog.L_PHASE, *catalog.ENGINE_PHASES)


def _startup_row() -> Row:
    by_phase = (catalog.L_PHASE,)
    waterfall = tuple(
        Query(range_quantile(PHASES, q, by_phase, _NOT_ENGINE), instant=True, name=name)
        for name, q in (("p50", 0.5), ("p95", 0.95), ("max", 1))
    )
    return Row("Replica startup waterfall (Timing)", (
        Panel("Startup phases (range): p50, p95, max", "Duration of each startup phase over "
              "the replicas that started in the range. Phases overlap (download_task_start "
              "runs inside node_init); the exact waterfall of one replica is its startup trace "
              "(panel link).", "barchart", waterfall, unit="s", width=12, height=9,
              trace_links=True, x_field=catalog.L_PHASE),
        _summary_table("Phase durations by phase, node and outcome (range)",
                       "One row per phase, node (download_task_start) and outcome.", PHASES,
                       (catalog.L_PHASE, catalog.L_NODE, catalog.L_OUTCOME), _NOT_ENGINE),
        Panel("Phase p95, replicas alive", "p95 of each phase over the replicas alive at each "
              "moment; a step is a replica (re)starting. Exemplars link to startup traces "
              "where the backend records them.", "timeseries",
              _quantiles(PHASES, by_phase, live_quantile, (0.95,)), unit="s",
              exemplars=True, trace_links=True),
        Panel("Replicas starting", "Replicas between callback creation and the end of their "
              "startup, by model.", "timeseries",
              (Query(current(STARTING, (catalog.L_MODEL,)), legend((catalog.L_MODEL,))),)),
    ))


def _engine_row() -> Row:
    by_phase = (catalog.L_PHASE,)
    inside = tuple(
        Query(range_quantile(PHASES, q, by_phase, _ENGINE), instant=True, name=name)
        for name, q in (("p50", 0.5), ("max", 1))
    )
    return Row("Where engine start goes (inside vLLM)", (
        Panel("Engine-start phases (range): p50, max", "The engine_start phase broken down "
              "inside vLLM's own processes (engine core, each worker) and the replica's side "
              "of it, from ObservedLLMServer and the vllm.general_plugins entry point. Worker "
              "phases count once per worker; phases overlap (the engine core waits while the "
              "workers load), so the exact picture of one start is its trace (panel link).",
              "barchart", inside, unit="s", width=12, height=9, trace_links=True,
              x_field=catalog.L_PHASE),
        _summary_table("Engine-start phases by phase, node and outcome (range)",
                       "One row per engine-start phase, node and outcome; a failed start "
                       "shows the phase it failed in with outcome error.", PHASES,
                       (catalog.L_PHASE, catalog.L_NODE, catalog.L_OUTCOME), _ENGINE),
    ))


def _hooks_row() -> Row:
    by = (catalog.L_HOOK, catalog.L_CALLBACK, catalog.L_OUTCOME)
    startup_hook = isnt(catalog.L_HOOK, *REQUEST_HOOKS)
    return Row("Callback hooks (startup)", (
        _summary_table("Hook calls by hook, callback and outcome (range)",
                       "Every startup hook call (a composite's children each have their own "
                       "callback label).", HOOK_DURATION, by, startup_hook, width=24),
        Panel("Hook latency p95, replicas alive", "By hook and callback, over the replicas and "
              "download tasks alive at each moment. Exemplars (prometheus_client or OTLP "
              "backends) link to the hook's trace.", "timeseries",
              _quantiles(HOOK_DURATION, (catalog.L_HOOK, catalog.L_CALLBACK), live_quantile,
                         (0.95,), startup_hook), unit="s", exemplars=True),
        Panel("Hook failures by callback and hook (range)", "Errors and timeouts of the "
              "replicas and download tasks that ran in the range.", "bargauge",
              (Query(range_total(HOOK_CALLS, by, is_(catalog.L_OUTCOME, *FAILED), startup_hook),
                     legend(by), instant=True),)),
        Panel("CallbackCtx changes by child and field (range)", "Which composite child changed "
              "which field of Ray's CallbackCtx (each change is also a span event).",
              "bargauge",
              (Query(range_total(CTX_CHANGES, (catalog.L_CALLBACK, catalog.L_FIELD)),
                     legend((catalog.L_CALLBACK, catalog.L_FIELD)), instant=True),),
              width=24, height=6),
    ))


def _placement_row() -> Row:
    decision = (catalog.L_POLICY, catalog.L_RULE)
    return Row("Downloads and placement", (
        Panel("Download-policy decisions (range)", "What nodes downloaded and which rule "
              "decided it (DownloadPolicy).", "bargauge",
              (Query(range_total(DECISIONS, decision), legend(decision), instant=True),)),
        Panel("Download decisions by node (range)", "One row per node, policy and rule.",
              "table", (Query(range_total(DECISIONS, (catalog.L_NODE, *decision)),
                              instant=True, name="decisions"),)),
        _summary_table("Placement group wait (range)", "Time a CustomPlacementGroup waited for "
                       "its group to be placed, by strategy and outcome.", PG_WAIT,
                       (catalog.L_STRATEGY, catalog.L_OUTCOME)),
        Panel("Placement group wait p95, replicas alive", "By strategy.", "timeseries",
              _quantiles(PG_WAIT, (catalog.L_STRATEGY,), live_quantile, (0.95,)), unit="s"),
    ))


def _vllm_row() -> Row:
    reason = ("finished_reason",)
    return Row("Serving: vLLM engine (ray_vllm_*)", (
        Panel("Requests running and waiting", "vLLM scheduler state, by model.", "timeseries",
              (Query(current(VLLM_RUNNING, ("model_name",)), "running {{model_name}}"),
               Query(current(VLLM_WAITING, ("model_name",)), "waiting {{model_name}}")),
              width=8),
        Panel("Time to first token", "vLLM engine TTFT.", "timeseries",
              _quantiles(VLLM_TTFT, (), rate_quantile), unit="s", width=8),
        Panel("Inter-token latency", "vLLM engine time between output tokens.", "timeseries",
              _quantiles(VLLM_ITL, (), rate_quantile), unit="s", width=8),
        Panel("End-to-end request latency", "vLLM engine request latency.", "timeseries",
              _quantiles(VLLM_E2E, (), rate_quantile), unit="s", width=8),
        Panel("Token throughput", "Prompt and generated tokens per second.", "timeseries",
              (Query(rate(VLLM_PROMPT_TOKENS), "prompt"),
               Query(rate(VLLM_GENERATION_TOKENS), "generation")), unit="short", width=8),
        Panel("KV cache usage", "Share of the KV cache in use.", "timeseries",
              (Query(current(VLLM_KV_CACHE, ("model_name",)), "{{model_name}}"),),
              unit="percentunit", width=8),
        Panel("Finished requests by reason", "Requests vLLM finished, per second.",
              "timeseries", (Query(rate(VLLM_SUCCESS, reason), legend(reason)),),
              unit="reqps", width=8),
    ))


def _serve_row() -> Row:
    by = ("application", "deployment")
    return Row("Ray Serve", (
        Panel("Healthy replicas", "By application and deployment.", "timeseries",
              (Query(current(SERVE_HEALTHY, by), legend(by)),), width=8),
        Panel("Replica startup latency p95 (Serve's view)", "Serve's own measure of a replica's "
              "start, for comparison with the phases above.", "timeseries",
              _quantiles(SERVE_STARTUP, ("deployment",), live_quantile, (0.95,)), unit="ms",
              width=8),
        Panel("Requests per second by deployment", "Serve deployment request rate.",
              "timeseries", (Query(rate(SERVE_REQUESTS, by), legend(by)),), unit="reqps",
              width=8),
    ))


def _health_row() -> Row:
    by = (catalog.L_SIGNAL, catalog.L_REASON)
    return Row("Telemetry health", (
        Panel("Spans dropped (range)", "Spans that never reached the collector, by reason: "
              "export_failed, backoff (skipped while backing off from a failing collector), "
              "queue_full (a slow or hanging collector), shutdown. Hooks never wait for it.",
              "stat", (Query(range_total(EXPORT_FAILURES, by), legend(by), instant=True),),
              width=24, height=4),
    ))


# --- the requests dashboard -----------------------------------------------------------------------

GENAI_DURATION = ours(catalog.GENAI_REQUEST_DURATION)
GENAI_TTFT = ours(catalog.GENAI_TIME_TO_FIRST_TOKEN)
GENAI_TPOT = ours(catalog.GENAI_TIME_PER_OUTPUT_TOKEN)
GENAI_TOKENS = ours(catalog.GENAI_TOKEN_USAGE)
REJECTED = ours(catalog.REQUESTS_REJECTED)
TOKENS = ours(catalog.TOKENS)
COST = ours(catalog.COST)
UNPRICED = ours(catalog.COST_UNPRICED)
CHUNKS = ours(catalog.STREAM_CHUNKS)
STREAMS = ours(catalog.STREAMS_ACTIVE)


def _genai_row() -> Row:
    op = (catalog.L_GENAI_OPERATION,)
    outcome = (catalog.L_GENAI_OPERATION, catalog.L_ERROR_TYPE)
    token = (catalog.L_GENAI_TOKEN_TYPE,)
    return Row("Requests (OpenTelemetry GenAI semantic conventions, ObservedLLMServer)", (
        Panel("Requests per second by operation and error type", "error_type is empty for "
              "successful requests.", "timeseries",
              (Query(rate(GENAI_DURATION, outcome, suffix="_count"), legend(outcome)),),
              unit="reqps"),
        Panel("Request duration", "To the last output token or byte; exemplars link to the "
              "request's trace.", "timeseries", _quantiles(GENAI_DURATION, op, rate_quantile),
              unit="s", exemplars=True),
        Panel("Time to first token", "Streamed responses.", "timeseries",
              _quantiles(GENAI_TTFT, op, rate_quantile), unit="s", exemplars=True, width=8),
        Panel("Time per output token", "After the first token, streamed responses.",
              "timeseries", _quantiles(GENAI_TPOT, op, rate_quantile), unit="s",
              exemplars=True, width=8),
        Panel("Tokens per request", "Input and output tokens (the response's usage).",
              "timeseries", _quantiles(GENAI_TOKENS, token, rate_quantile), unit="short",
              width=8),
    ))


def _request_callbacks_row() -> Row:
    reason = (catalog.L_CALLBACK, catalog.L_REASON)
    by_type = (catalog.L_TOKEN_TYPE,)
    currency = (catalog.L_CURRENCY,)
    hooks = (catalog.L_HOOK, catalog.L_CALLBACK)
    failed = (catalog.L_CALLBACK, catalog.L_HOOK, catalog.L_OUTCOME)
    request_hook = is_(catalog.L_HOOK, *REQUEST_HOOKS)
    return Row("Request callbacks", (
        Panel("Request hook calls per second", "on_llm_start, on_llm_end, on_llm_error and "
              "on_llm_stream_chunk calls, by hook and callback.", "timeseries",
              (Query(rate(HOOK_CALLS, hooks, request_hook), legend(hooks)),), unit="ops"),
        Panel("Request hook latency p95", "Per call of on_llm_start, on_llm_end and "
              "on_llm_error; on_llm_stream_chunk: a stream's summed time in the hook. By hook "
              "and callback; exemplars link to the request's trace.", "timeseries",
              _quantiles(HOOK_DURATION, hooks, rate_quantile, (0.95,), request_hook),
              unit="s", exemplars=True),
        Panel("Request hook errors and timeouts per second", "Failed and timed-out request "
              "hook calls (the request goes on under the log policy).", "timeseries",
              (Query(rate(HOOK_CALLS, failed, request_hook, is_(catalog.L_OUTCOME, *FAILED)),
                     legend(failed)),), unit="ops"),
        Panel("Requests rejected per second", "Requests a request hook refused (e.g. a "
              "RateLimiter's HTTP 429), by callback and reason.", "timeseries",
              (Query(rate(REJECTED, reason), legend(reason)),), unit="reqps", width=8),
        Panel("Tokens per second (TokenCounter)", "By token type.", "timeseries",
              (Query(rate(TOKENS, by_type), legend(by_type)),), unit="short", width=8),
        Panel("Cost per hour (CostTracker)", "By currency.", "timeseries",
              (Query(f"3600 * {rate(COST, currency)}", legend(currency)),), unit="short",
              width=8),
        Panel("Unpriced requests per second (CostTracker)", "Requests of models without a "
              "price.", "timeseries", (Query(rate(UNPRICED, (catalog.L_MODEL,)),
                                             legend((catalog.L_MODEL,))),),
              unit="reqps", width=8),
        Panel("Chunks per streamed response (StreamingProgress)", "By outcome.", "timeseries",
              _quantiles(CHUNKS, (catalog.L_OUTCOME,), rate_quantile), unit="short", width=8),
        Panel("Streams in progress (StreamingProgress)", "By model.", "timeseries",
              (Query(current(STREAMS, (catalog.L_MODEL,)), legend((catalog.L_MODEL,))),),
              width=8),
    ))


# --- whatever the catalog gains later -------------------------------------------------------------


def _generic_panel(s: Series) -> Panel:
    """A panel for a catalog metric no curated panel shows yet, by kind."""
    assert s.spec is not None
    spec = s.spec
    by = tuple(label for label in spec.labels if label not in (catalog.L_MODEL,))[:3]
    unit = "s" if spec.unit == "s" else "short"
    if spec.kind == "histogram":
        queries = _quantiles(s, by, live_quantile)
    elif spec.kind == "counter":
        queries = (Query(current(s, by), legend(by)),)
    else:
        queries = (Query(current(s, by), legend(by)),)
    return Panel(spec.exposed_name(ray=RAY), spec.description, "timeseries", queries, unit=unit)


def _covered(rows: Iterable[Row]) -> set[str]:
    text = " ".join(q.expr for row in rows for p in row.panels for q in p.queries)
    return {spec.name for spec in catalog.ALL_METRICS if spec.exposed_name(ray=RAY) in text}


def dashboards() -> list[DashboardSpec]:
    """Every dashboard; catalog metrics no curated panel shows get a generic one."""
    startup_rows: tuple[Row, ...] = (_overview_row(), _startup_row(), _engine_row(), _hooks_row(),
                                     _placement_row(), _vllm_row(), _serve_row(), _health_row())
    request_rows: tuple[Row, ...] = (_genai_row(), _request_callbacks_row(), _vllm_row(),
                                     _serve_row())
    covered = _covered((*startup_rows, *request_rows))
    rest = [ours(spec) for spec in catalog.ALL_METRICS if spec.name not in covered]
    if rest:
        startup_rows += (Row("Other metrics of this package", tuple(map(_generic_panel, rest))),)
    return [
        DashboardSpec(
            "llm-otel-startup", "ray-serve-llm-startup.json",
            "Ray Serve LLM: replica startup and callbacks",
            "Replica startup waterfall, callback hooks, download and placement decisions, next "
            "to the vLLM engine and Ray Serve. From llm-otel-callbacks (generated).",
            startup_rows),
        DashboardSpec(
            "llm-otel-requests", "ray-serve-llm-requests.json",
            "Ray Serve LLM: requests and request callbacks",
            "GenAI request metrics (OpenTelemetry semantic conventions), request callbacks, "
            "the vLLM engine and Ray Serve. From llm-otel-callbacks (generated).",
            request_rows),
    ]
