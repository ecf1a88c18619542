"""The series the dashboards read, and the PromQL they build from them.

Names come from :mod:`.catalog` (``ray=True``: what Ray's metrics export port shows); the few
series other components export (vLLM's engine, Ray Serve) are named once, here. Ray adds
``NodeAddress`` (the node's IP) to every series, which the ``node`` variable filters.

Startup metrics are recorded once per replica process, on series that process creates:
``rate()``/``increase()`` never see a series' first value, so startup panels take each series'
largest value over the dashboard range (``max_over_time(...[$__range])``): "the startups of the
replicas that ran in the range". Request-time metrics use ``rate()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from . import catalog
from .catalog import MetricSpec

RAY = True
"""The dashboards query the names Ray's metrics export port shows."""
NODE_LABEL = "NodeAddress"
"""Label Ray's metrics agent puts on every series: the IP of the node that recorded it."""
RANGE = "$__range"
RATE = "$__rate_interval"
ALL = ".*"
"""What a variable set to "All" matches (an absent label too)."""

# --- template variables ---------------------------------------------------------------------------
V_DATASOURCE = "datasource"
V_MODEL = "model"
V_NODE = "node"
V_APP = "app"
V_DEPLOYMENT = "deployment"
V_REPLICA = "replica"
V_TRACING = "tracing"
V_TRACE_URL = "trace_url"

Kind = Literal["counter", "histogram", "gauge"]


# --- series ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """A metric family as a scrape shows it, and the matchers that apply the variables."""

    family: str
    kind: Kind
    matchers: tuple[str, ...]
    spec: MetricSpec | None = None

    def sel(self, suffix: str = "", *extra: str) -> str:
        return f"{self.family}{suffix}{{{', '.join((*self.matchers, *extra))}}}"

    @property
    def bucket(self) -> str:
        return self.family + "_bucket"


def ours(spec: MetricSpec) -> Series:
    """A catalog metric, filtered by the model and node variables where it has those labels."""
    matchers = []
    if catalog.L_MODEL in spec.labels:
        matchers.append(f'{catalog.L_MODEL}=~"${V_MODEL}"')
    if catalog.L_GENAI_MODEL in spec.labels:
        matchers.append(f'{catalog.L_GENAI_MODEL}=~"${V_MODEL}"')
    matchers.append(f'{NODE_LABEL}=~"${V_NODE}"')
    return Series(spec.exposed_name(ray=RAY), spec.kind, tuple(matchers), spec)


def _vllm(name: str, kind: Kind) -> Series:
    # vLLM's Ray stat logger labels every series with the served model and the Serve replica.
    return Series(name, kind, (f'model_name=~"${V_MODEL}"', f'ReplicaId=~"${V_REPLICA}"',
                               f'{NODE_LABEL}=~"${V_NODE}"'))


def _serve(name: str, kind: Kind) -> Series:
    return Series(name, kind, (f'application=~"${V_APP}"', f'deployment=~"${V_DEPLOYMENT}"'))


# The only names typed here: series vLLM's engine and Ray Serve export (as Ray shows them).
VLLM_RUNNING = _vllm("ray_vllm_num_requests_running", "gauge")
VLLM_WAITING = _vllm("ray_vllm_num_requests_waiting", "gauge")
VLLM_TTFT = _vllm("ray_vllm_time_to_first_token_seconds", "histogram")
VLLM_ITL = _vllm("ray_vllm_inter_token_latency_seconds", "histogram")
VLLM_E2E = _vllm("ray_vllm_e2e_request_latency_seconds", "histogram")
VLLM_PROMPT_TOKENS = _vllm("ray_vllm_prompt_tokens_total", "counter")
VLLM_GENERATION_TOKENS = _vllm("ray_vllm_generation_tokens_total", "counter")
VLLM_KV_CACHE = _vllm("ray_vllm_kv_cache_usage_perc", "gauge")
VLLM_SUCCESS = _vllm("ray_vllm_request_success_total", "counter")
SERVE_HEALTHY = _serve("ray_serve_deployment_replica_healthy", "gauge")
SERVE_STARTUP = _serve("ray_serve_replica_startup_latency_ms", "histogram")
SERVE_REQUESTS = _serve("ray_serve_deployment_request_counter_total", "counter")


# --- PromQL ---------------------------------------------------------------------------------------


def _by(labels: Sequence[str]) -> str:
    return f"sum by ({', '.join(labels)}) " if labels else "sum "


def range_total(s: Series, by: Sequence[str] = (), *extra: str) -> str:
    """Per series its largest value in the range, summed: totals of once-per-process events."""
    return f"{_by(by)}(max_over_time({s.sel('', *extra)}[{RANGE}]))"


def range_count(s: Series, by: Sequence[str] = (), *extra: str) -> str:
    """Observations of a histogram in the range (see :func:`range_total`)."""
    return f"{_by(by)}(max_over_time({s.sel('_count', *extra)}[{RANGE}]))"


def range_quantile(s: Series, q: float, by: Sequence[str] = (), *extra: str) -> str:
    return (f"histogram_quantile({q:g}, {_by(('le', *by))}"
            f"(max_over_time({s.sel('_bucket', *extra)}[{RANGE}])))")


def live_quantile(s: Series, q: float, by: Sequence[str] = (), *extra: str) -> str:
    """Quantile over everything the live processes recorded (for once-per-process events)."""
    return f"histogram_quantile({q:g}, {_by(('le', *by))}({s.sel('_bucket', *extra)}))"


def rate_quantile(s: Series, q: float, by: Sequence[str] = (), *extra: str) -> str:
    return (f"histogram_quantile({q:g}, {_by(('le', *by))}"
            f"(rate({s.sel('_bucket', *extra)}[{RATE}])))")


def rate(s: Series, by: Sequence[str] = (), *extra: str, suffix: str = "") -> str:
    return f"{_by(by)}(rate({s.sel(suffix, *extra)}[{RATE}]))"


def current(s: Series, by: Sequence[str] = (), *extra: str) -> str:
    return f"{_by(by)}({s.sel('', *extra)})"


def is_(label: str, *values: str) -> str:
    return f'{label}=~"{"|".join(values)}"'


def isnt(label: str, *values: str) -> str:
    return f'{label}!~"{"|".join(values)}"'


def legend(labels: Iterable[str]) -> str:
    return " ".join("{{" + label + "}}" for label in labels)
