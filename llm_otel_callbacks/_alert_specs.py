"""What the alerting rules watch: one :class:`AlertRule` per alert, its PromQL built from
:mod:`.catalog` metrics, its thresholds and ``for:`` durations from :class:`AlertSettings`.

Startup metrics are recorded once per replica process, on series that process creates, and
``rate()``/``increase()`` never see a series' first value. So every counter and histogram here
is read with :func:`window_increase`: what a series gained in the window, or, for a series
born in the window, all of it. Each process has its own series (Ray's ``WorkerId`` label), so
a restarted replica starts a new series instead of resetting one.

:mod:`.alerts` renders these into a Prometheus rule file, a ``PrometheusRule`` manifest and the
per-alert sections of docs/alerts.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import catalog
from .catalog import MetricSpec

# --- settings -------------------------------------------------------------------------------------

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


class AlertSettingsError(ValueError):
    """A threshold or duration override is unknown or malformed (the message names it)."""


def parse_duration(text: str, what: str) -> int:
    """Seconds of a Prometheus duration such as ``30m`` or ``1h30m`` (d, h, m, s)."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not text or match is None or not any(match.groups()):
        raise AlertSettingsError(f"{what}: {text!r} is not a duration like 30s, 10m, 1h30m, 7d")
    return sum(int(n) * unit for n, (_, unit) in zip(match.groups(), _UNITS, strict=True) if n)


def format_duration(seconds: int) -> str:
    if seconds == 0:
        return "0s"
    out = ""
    for suffix, unit in _UNITS:
        n, seconds = divmod(seconds, unit)
        if n:
            out += f"{n}{suffix}"
    return out


@dataclass(frozen=True)
class AlertSettings:
    """Thresholds, windows and ``for:`` durations; every one overridable at generation time
    (``python -m llm_otel_callbacks alerts --set NAME=VALUE``)."""

    ray: bool = True
    """Query the names Ray's metrics export port shows (``ray_`` prefix); False: the
    ``prometheus_client`` names a process outside Ray serves."""
    docs_url: str = "docs/alerts.md"
    """Where docs/alerts.md is published; each rule's ``runbook_url`` is this plus an anchor."""
    startup_slow_s: float = 600.0
    """LLMReplicaStartupSlow: a startup longer than this (one of the phase buckets)."""
    startup_window: str = "1h"
    """LLMReplicaStartupSlow: how long a finished slow startup keeps the alert on."""
    recent_window: str = "30m"
    """The *SlowerThanUsual alerts: the recent startups compared ..."""
    baseline_window: str = "7d"
    """... with the p95 of the startups in this window before them."""
    slower_ratio: float = 1.5
    """The *SlowerThanUsual alerts: recent p95 above this times the baseline p95."""
    baseline_min: int = 5
    """The *SlowerThanUsual alerts: fewest startups in the baseline to compare with."""
    hook_failures: float = 0.0
    """LLMCallbackHookFailing: more failed or timed-out calls than this in the window."""
    hook_window: str = "10m"
    export_failures: float = 0.0
    """LLMTelemetryDroppingSpans: more dropped spans than this in the window."""
    export_window: str = "10m"
    rejected_share: float = 0.2
    """LLMRequestsRejected: share of a model's requests one callback rejected."""
    rejected_min_requests: float = 10.0
    """LLMRequestsRejected: fewest requests in the window before a share means anything."""
    rejected_window: str = "10m"
    download_window: str = "1h"
    """LLMDownloadPolicyChanged: a node deciding two policies within this window."""
    for_: Mapping[str, str] = field(default_factory=dict)
    """``for:`` per alert name, over the defaults (``--set for.LLMReplicaStuckStarting=30m``)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_window"):
                parse_duration(value, f.name)
            elif f.type in ("float", "int") and (
                    isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value < 0):
                raise AlertSettingsError(f"{f.name}: {value!r} is not a number >= 0")
        if self.startup_slow_s not in catalog.PHASE_BUCKETS:
            raise AlertSettingsError(
                f"startup_slow_s: {self.startup_slow_s:g} is not a bucket bound of "
                f"{catalog.STARTUP_PHASE_DURATION.name}; pick one of "
                f"{', '.join(f'{b:g}' for b in catalog.PHASE_BUCKETS)}")
        if self.rejected_share > 1:
            raise AlertSettingsError(f"rejected_share: {self.rejected_share:g} is above 1")
        unknown = sorted(set(self.for_) - set(DEFAULT_FOR))
        if unknown:
            raise AlertSettingsError(f"for.{unknown[0]}: no such alert; alerts: "
                                     f"{', '.join(DEFAULT_FOR)}")
        for name, value in self.for_.items():
            parse_duration(value, f"for.{name}")

    def for_of(self, alert: str) -> str:
        return format_duration(parse_duration(self.for_.get(alert, DEFAULT_FOR[alert]),
                                              f"for.{alert}"))

    def seconds(self, name: str) -> int:
        return parse_duration(getattr(self, name), name)

    def with_overrides(self, overrides: Mapping[str, str]) -> AlertSettings:
        """These settings with ``NAME=VALUE`` strings applied (``for.<Alert>`` for a for:)."""
        types = {f.name: f.type for f in fields(self) if f.name != "for_"}
        changes: dict[str, Any] = {}
        for_ = dict(self.for_)
        for key, raw in overrides.items():
            if key.startswith("for."):
                for_[key[4:]] = raw
                continue
            if key not in types:
                raise AlertSettingsError(f"{key}: no such setting; settings: "
                                         f"{', '.join(sorted(types))}, for.<alert>")
            changes[key] = _convert(key, types[key], raw)
        return replace(self, **changes, for_=for_)


def _convert(key: str, type_name: Any, raw: str) -> Any:
    if type_name == "bool":
        if raw.lower() not in ("true", "false"):
            raise AlertSettingsError(f"{key}: {raw!r} is not true or false")
        return raw.lower() == "true"
    if type_name in ("float", "int"):
        try:
            value = float(raw)
        except ValueError:
            raise AlertSettingsError(f"{key}: {raw!r} is not a number") from None
        if type_name == "int":
            if not value.is_integer():
                raise AlertSettingsError(f"{key}: {raw!r} is not a whole number")
            return int(value)
        return value
    return raw


# --- PromQL ---------------------------------------------------------------------------------------


def window_increase(selector: str, window: str, offset: str = "") -> str:
    """What each series gained in ``window`` (ending ``offset`` ago); a series born in the
    window counts whole, since ``increase()`` would miss its first value."""
    at = f" offset {offset}" if offset else ""
    start = format_duration(parse_duration(window, "window") + (
        parse_duration(offset, "offset") if offset else 0))
    return (f"(max_over_time({selector}[{window}]{at}) - {selector} offset {start})"
            f" or max_over_time({selector}[{window}]{at})")


def _sel(name: str, *matchers: str) -> str:
    return f"{name}{{{', '.join(matchers)}}}" if matchers else name


def _is(label: str, *values: str) -> str:
    return f'{label}="{values[0]}"' if len(values) == 1 else f'{label}=~"{"|".join(values)}"'


def _le(bound: float) -> str:
    """Matches a bucket bound however the exporter formats it (``600`` or ``600.0``)."""
    text = f"{bound:g}"
    return f'le=~"{re.escape(text)}(\\\\.0)?"' if "." not in text and "e" not in text else (
        f'le="{text}"')


def _by(*labels: str) -> str:
    return f"sum by ({', '.join(labels)})"


def startup_phases() -> tuple[str, ...]:
    """Every startup phase the catalog names (its ``PHASE_*`` constants) except ``total``:
    a phase added to the catalog is watched without a change here."""
    found = [v for k, v in vars(catalog).items() if k.startswith("PHASE_") and isinstance(v, str)]
    return tuple(dict.fromkeys(p for p in found if p != catalog.PHASE_TOTAL))


# --- rules ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertRule:
    name: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    meaning: str
    """docs/alerts.md: what the alert means."""
    action: str
    """docs/alerts.md: what to do."""
    metrics: tuple[MetricSpec, ...]

    @property
    def anchor(self) -> str:
        return self.name.lower()


DEFAULT_FOR: dict[str, str] = {
    "LLMReplicaStartupSlow": "1m",
    "LLMReplicaStartupSlowerThanUsual": "5m",
    "LLMStartupPhaseSlowerThanUsual": "5m",
    "LLMReplicaStuckStarting": "15m",
    "LLMCallbackHookFailing": "1m",
    "LLMTelemetryDroppingSpans": "5m",
    "LLMRequestsRejected": "5m",
    "LLMDownloadPolicyChanged": "1m",
}


def alert_rules(s: AlertSettings | None = None) -> tuple[AlertRule, ...]:
    s = s or AlertSettings()
    node = "NodeAddress" if s.ray else "instance"
    worker = ("WorkerId",) if s.ray else ()

    def name(spec: MetricSpec, suffix: str = "") -> str:
        return spec.exposed_name(ray=s.ray) + suffix

    phases = catalog.STARTUP_PHASE_DURATION
    total = _is(catalog.L_PHASE, catalog.PHASE_TOTAL)
    ok = _is(catalog.L_OUTCOME, catalog.OUTCOME_OK)
    recent, base = s.recent_window, s.baseline_window

    def p95(by: tuple[str, ...], *matchers: str, window: str, offset: str = "") -> str:
        buckets = window_increase(_sel(name(phases, "_bucket"), *matchers), window, offset)
        return f"histogram_quantile(0.95, {_by('le', *by)} ({buckets}))"

    def baseline_count(by: tuple[str, ...], *matchers: str) -> str:
        counts = window_increase(_sel(name(phases, "_count"), *matchers), base, recent)
        return f"{_by(*by)} ({counts}) >= {s.baseline_min}"

    ratio = f"{s.slower_ratio:g}"
    model = (catalog.L_MODEL,)
    phase_re = _is(catalog.L_PHASE, *startup_phases())
    mp = (catalog.L_MODEL, catalog.L_PHASE)
    failed = _is(catalog.L_OUTCOME, catalog.OUTCOME_ERROR, catalog.OUTCOME_TIMEOUT)
    genai_count = window_increase(name(catalog.GENAI_REQUEST_DURATION, "_count"),
                                  s.rejected_window)
    requests = (f'label_replace({_by(catalog.L_GENAI_MODEL)} ({genai_count}), '
                f'"{catalog.L_MODEL}", "$1", "{catalog.L_GENAI_MODEL}", "(.*)")')
    see = "See the runbook for what to do."
    window = s.startup_window
    slow_bucket = _sel(name(phases, "_bucket"), total, _le(s.startup_slow_s))

    return (
        AlertRule(
            "LLMReplicaStartupSlow",
            f"{_by(*model)} ({window_increase(_sel(name(phases, '_count'), total), window)})\n"
            f"- {_by(*model)} ({window_increase(slow_bucket, window)})\n"
            f"> 0",
            s.for_of("LLMReplicaStartupSlow"), "warning",
            f"Replica startup of model {{{{ $labels.model }}}} took over {s.startup_slow_s:g}s",
            f"{{{{ $value }}}} replica startup(s) of model {{{{ $labels.model }}}} in the last "
            f"{s.startup_window} took longer than {s.startup_slow_s:g}s (the Timing phase "
            f"'{catalog.PHASE_TOTAL}': callback creation to the end of the startup). {see}",
            "A replica of the model took longer than `startup_slow_s` (default 600 s) from "
            "the creation of its callback to the end of its startup, counting failed attempts. "
            "The alert stays on for `startup_window` (default 1 h) after that startup ended.",
            "Open the replica's startup trace (the dashboard's *Startup traces* link, or "
            f"search for spans named `{catalog.SPAN_STARTUP}` of the model) and find the "
            "longest phase: `before_node_init` is the replica actor and placement group, "
            "`node_init` and `download_task_start` are Ray's node initialization and the "
            "model download on each node, `engine_start` is the engine. Then see the phase "
            "alert below for what each usually means.",
            (phases,),
        ),
        AlertRule(
            "LLMReplicaStartupSlowerThanUsual",
            f"{p95(model, total, ok, window=recent)}\n"
            f"> on ({catalog.L_MODEL}) {ratio} * "
            f"{p95(model, total, ok, window=base, offset=recent)}\n"
            f"and on ({catalog.L_MODEL}) {baseline_count(model, total, ok)}",
            s.for_of("LLMReplicaStartupSlowerThanUsual"), "warning",
            "Replica startups of model {{ $labels.model }} are slower than usual",
            f"p95 replica startup time of model {{{{ $labels.model }}}} over the last "
            f"{recent} is {{{{ $value | humanizeDuration }}}}, more than {ratio} times its p95 "
            f"over the {base} before. {see}",
            "The p95 startup time of the model's replicas in the last `recent_window` "
            "(default 30 m) is above `slower_ratio` (default 1.5) times the p95 of its "
            "successful startups in the `baseline_window` (default 7 d) before them, which "
            "held at least `baseline_min` (default 5) startups. Quantiles come from the "
            "histogram buckets, so they are as coarse as the buckets.",
            "Something changed: a new model version, image or node type, a slower model "
            "store, or a cluster short of resources. Compare a recent startup trace with an "
            "older one phase by phase (`LLMStartupPhaseSlowerThanUsual` names the phase).",
            (phases,),
        ),
        AlertRule(
            "LLMStartupPhaseSlowerThanUsual",
            f"{p95((*mp, catalog.L_NODE), phase_re, ok, window=recent)}\n"
            f"> on ({', '.join(mp)}) group_left () {ratio} * "
            f"{p95(mp, phase_re, ok, window=base, offset=recent)}\n"
            f"and on ({', '.join(mp)}) {baseline_count(mp, phase_re, ok)}",
            s.for_of("LLMStartupPhaseSlowerThanUsual"), "info",
            "Startup phase {{ $labels.phase }} of model {{ $labels.model }} is slower "
            "than usual",
            f"p95 of startup phase {{{{ $labels.phase }}}} of model {{{{ $labels.model }}}}"
            f"{{{{ if $labels.node }}}} on node {{{{ $labels.node }}}}{{{{ end }}}} over the "
            f"last {recent} is {{{{ $value | humanizeDuration }}}}, more than {ratio} times its "
            f"p95 over the {base} before. {see}",
            "One startup phase (Timing) of the model, on one node for the per-node phases, "
            "took longer in the last `recent_window` than `slower_ratio` times its p95 in "
            "the `baseline_window` before. It covers every phase the catalog names except "
            "`total`: " + ", ".join(f"`{p}`" for p in startup_phases()) + ".",
            "By phase: `before_node_init` slow means the replica actor or its placement "
            "group waited (cluster short of resources, autoscaler adding nodes); `node_init` "
            "or `download_task_start` on one node: that node's model download or its Ray "
            "task scheduling (check the node's disk, network and its model cache: "
            "`DownloadPolicy` decisions); `engine_start`: the engine (compilation, weights "
            "loading, memory profiling). The phase's spans in a recent startup trace carry "
            "the node id.",
            (phases,),
        ),
        AlertRule(
            "LLMReplicaStuckStarting",
            f"max by ({catalog.L_MODEL}, {node}{''.join(', ' + w for w in worker)}) "
            f"({name(catalog.REPLICAS_STARTING)}) > 0",
            s.for_of("LLMReplicaStuckStarting"), "critical",
            f"A replica of model {{{{ $labels.model }}}} has been starting for over "
            f"{s.for_of('LLMReplicaStuckStarting')}",
            f"A replica of model {{{{ $labels.model }}}} on {{{{ $labels.{node} }}}}"
            + (" (worker {{ $labels.WorkerId }})" if s.ray else "")
            + f" has been between on_before_node_init and the end of its startup for more "
              f"than {s.for_of('LLMReplicaStuckStarting')}. {see}",
            "A replica process has been in its startup (Timing's "
            f"`{catalog.REPLICAS_STARTING.name}` gauge above zero) for longer than the "
            "alert's `for:` (default 15 m), and has neither finished nor died.",
            "Look at the replica's open startup trace and Ray's logs for that worker: a "
            "download that hangs, a placement group that cannot be placed "
            "(`ray status` shows pending demands), an engine that does not come up. Ray "
            "Serve restarts a replica only when its health check or startup timeout says "
            "so; until then it waits.",
            (catalog.REPLICAS_STARTING,),
        ),
        AlertRule(
            "LLMCallbackHookFailing",
            f"{_by(catalog.L_MODEL, catalog.L_HOOK, catalog.L_CALLBACK, catalog.L_OUTCOME, node)} "
            f"({window_increase(_sel(name(catalog.HOOK_CALLS), failed), s.hook_window)})\n"
            f"> {s.hook_failures:g}",
            s.for_of("LLMCallbackHookFailing"), "warning",
            "Callback {{ $labels.callback }} fails in {{ $labels.hook }} "
            "(model {{ $labels.model }})",
            f"{{{{ $value }}}} call(s) of hook {{{{ $labels.hook }}}} of callback "
            f"{{{{ $labels.callback }}}} (model {{{{ $labels.model }}}}) ended with outcome "
            f"{{{{ $labels.outcome }}}} on {{{{ $labels.{node} }}}} in the last "
            f"{s.hook_window}. {see}",
            "A callback's hook raised (`outcome=\"error\"`) or overran its `timeout_s` "
            "(`outcome=\"timeout\"`) more than `hook_failures` (default 0) times in "
            "`hook_window` (default 10 m). Under the log policy (`raise_error_on_callback: "
            "false`) serving goes on without what the callback does (an audit record, a "
            "policy, a token count); under the raise policy the startup or request failed.",
            "The hook span (`llm_callback <hook> <callback>`) holds the exception and its "
            "message (unless `record_exception_messages` is false); the replica's log has "
            "the traceback. A timeout means the hook waited on something slow: raise its "
            "`timeout_s` or make the call asynchronous.",
            (catalog.HOOK_CALLS,),
        ),
        AlertRule(
            "LLMTelemetryDroppingSpans",
            f"{_by(catalog.L_SIGNAL, catalog.L_REASON, node)} "
            f"({window_increase(name(catalog.EXPORT_FAILURES), s.export_window)})\n"
            f"> {s.export_failures:g}",
            s.for_of("LLMTelemetryDroppingSpans"), "warning",
            "Telemetry is dropping {{ $labels.signal }} ({{ $labels.reason }})",
            f"{{{{ $value }}}} {{{{ $labels.signal }}}} dropped on {{{{ $labels.{node} }}}} in "
            f"the last {s.export_window}, reason {{{{ $labels.reason }}}}. {see}",
            "Spans were dropped instead of exported more than `export_failures` (default 0) "
            "times in `export_window` (default 10 m). Serving is not affected (a hook never "
            "waits for the collector); the traces are incomplete.",
            "By reason: `export_failed` and `backoff`: the collector refused, failed or timed "
            "out (is it up, reachable from the node, and is the endpoint right?); "
            "`queue_full`: the collector is too slow for the span rate; `shutdown`: spans "
            "left at process exit (the collector was slow or down at that moment).",
            (catalog.EXPORT_FAILURES,),
        ),
        AlertRule(
            "LLMRequestsRejected",
            f"{_by(catalog.L_MODEL, catalog.L_CALLBACK)} "
            f"({window_increase(name(catalog.REQUESTS_REJECTED), s.rejected_window)})\n"
            f"/ on ({catalog.L_MODEL}) group_left () {requests}\n"
            f"> {s.rejected_share:g}\n"
            f"and on ({catalog.L_MODEL}) {requests} >= {s.rejected_min_requests:g}",
            s.for_of("LLMRequestsRejected"), "warning",
            "Callback {{ $labels.callback }} rejects {{ $value | humanizePercentage }} "
            "of model {{ $labels.model }}'s requests",
            f"Callback {{{{ $labels.callback }}}} rejected {{{{ $value | humanizePercentage }}}} "
            f"of the requests to model {{{{ $labels.model }}}} in the last "
            f"{s.rejected_window} (alert above {s.rejected_share:.0%}). {see}",
            "A request callback (for example `RateLimiter`, HTTP 429) turned away more than "
            "`rejected_share` (default 20 %) of a model's requests in `rejected_window` "
            "(default 10 m), with at least `rejected_min_requests` (default 10) requests.",
            "If the load is legitimate, raise the limiter's budget or add replicas; if one "
            "client floods, the rejection spans (`llm_callback.request.rejected_by`, "
            "`llm_callback.request.reject_reason`) show which limit it hits.",
            (catalog.REQUESTS_REJECTED, catalog.GENAI_REQUEST_DURATION),
        ),
        AlertRule(
            "LLMDownloadPolicyChanged",
            f"count by ({catalog.L_MODEL}, {catalog.L_NODE}) "
            f"({_by(catalog.L_MODEL, catalog.L_NODE, catalog.L_POLICY)} "
            f"({window_increase(name(catalog.DOWNLOAD_DECISIONS), s.download_window)}) > 0)\n"
            f"> 1",
            s.for_of("LLMDownloadPolicyChanged"), "info",
            "Download policy of node {{ $labels.node }} changed (model "
            "{{ $labels.model }})",
            f"DownloadPolicy chose {{{{ $value }}}} different policies for model "
            f"{{{{ $labels.model }}}} on node {{{{ $labels.node }}}} in the last "
            f"{s.download_window}. {see}",
            "`DownloadPolicy` decided more than one policy for the same model on the same node "
            "within `download_window` (default 1 h): for example `none` while the node's "
            "cache held the model, then a full download after it was evicted.",
            "The `rule` label (and the decision span's `llm_callback.download.reason`) says "
            "why each policy was chosen: `local_cache` flips when the node's model cache "
            "changes (evicted, a new node under the same id, a disk wiped), `env` when an "
            "environment variable changed, `external` when another callback overrode it.",
            (catalog.DOWNLOAD_DECISIONS,),
        ),
    )
