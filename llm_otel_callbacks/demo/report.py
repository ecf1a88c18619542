"""What the demo shows once the app runs: the startup waterfall, where the spans and metrics
went, the dashboards, and Prometheus scraping the demo (``--prometheus``)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path

from .. import catalog
from .._promql import VLLM_SUCCESS
from .console import Console
from .local_ray import LocalRay
from .prometheus import INSTALL_HINT, PrometheusServer, find_binary, start_prometheus
from .waterfall import (
    StartupTrace,
    engine_start_lines,
    phase_table,
    read_spans,
    render_waterfall,
)


def show_waterfall(console: Console, startup: StartupTrace) -> None:
    console.heading(
        f"Startup waterfall of the '{startup.model}' replica: {startup.root.seconds:.1f}s "
        f"(trace {startup.root.trace_id})"
    )
    console.say(render_waterfall(startup, width=console.width, unicode=console.unicode))
    console.say()
    console.say("Phases (Timing):")
    for phase, node, seconds, outcome in phase_table(startup):
        where = f" on node {node}" if node else ""
        console.say(f"  {phase:<26} {seconds:7.2f}s  {outcome}{where}")
    outcome = "error" if startup.root.failed else "ok"
    console.say(f"  {catalog.PHASE_TOTAL:<26} {startup.root.seconds:7.2f}s  {outcome}")
    console.say()
    for line in engine_start_lines(startup):  # where engine start goes, inside vLLM
        console.say(line)


def show_spans(console: Console, spans_path: Path) -> None:
    spans = read_spans(spans_path)
    console.heading("Where the spans went")
    console.say(f"  {spans_path}  ({len(spans)} spans, OTLP/JSON, one export request per line;")
    console.say("  an OpenTelemetry Collector's otlpjsonfile receiver can load it)")
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        console.say(f"  and to the collector at {endpoint} (OTEL_EXPORTER_OTLP_ENDPOINT)")
    else:
        console.say("  Set OTEL_EXPORTER_OTLP_ENDPOINT=http://<collector>:4318 to send them to "
                    "a collector as well.")


def show_metrics(console: Console, metrics_url: str, requests: int, observed_server: bool) -> None:
    console.heading("Metrics")
    console.say(f"  {metrics_url}  (Ray's metrics export port: point Prometheus here)")
    phase_count = catalog.STARTUP_PHASE_DURATION.exposed_name(ray=True) + "_count"
    wanted = [phase_count]
    if requests:  # the engine's and the requests' series, once Ray pushed them
        wanted.append(VLLM_SUCCESS.family)
        if observed_server:
            wanted.append(catalog.GENAI_REQUEST_DURATION.exposed_name(ray=True) + "_count")
    families, samples = _scrape(metrics_url, wanted)
    groups = (
        ("ray_llm_callback_", "this package: startup phases, hooks, download decisions ..."),
        ("ray_gen_ai_", "this package: GenAI request metrics (ObservedLLMServer)"),
        ("ray_vllm_", "vLLM's engine, exported by Ray"),
        ("ray_serve_", "Ray Serve"),
    )
    for prefix, what in groups:
        names = [n for n in families if n.startswith(prefix)]
        if names:
            console.say(f"  {prefix + '*':<20} {len(names):3d} metrics  ({what})")
    for labels, value in samples.get(phase_count, []):
        console.say(f"    e.g. {phase_count}{{phase=\"{labels.get(catalog.L_PHASE)}\"}} "
                    f"{value:g}")


Samples = dict[str, list[tuple[dict[str, str], float]]]


def _scrape(url: str, wanted: list[str], timeout_s: float = 20.0) -> tuple[set[str], Samples]:
    """Family names and {sample name: [(labels, value)]}, once every ``wanted`` sample shows
    (or ``timeout_s`` passed): Ray pushes its processes' metrics every second."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    families: set[str] = set()
    samples: Samples = {}
    while True:
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(
            url, timeout=5
        ) as resp:
            text = resp.read().decode("utf-8")
            families, samples = set(), {}
            for family in text_string_to_metric_families(text):
                families.add(family.name)
                for sample in family.samples:
                    samples.setdefault(sample.name, []).append(
                        (dict(sample.labels), float(sample.value)))
        if all(name in samples for name in wanted) or time.monotonic() > deadline:
            return families, samples
        time.sleep(1.0)


def show_dashboards(console: Console, files: list[Path]) -> None:
    console.heading("Grafana dashboards")
    for path in files:
        try:
            title = json.loads(path.read_text()).get("title", "")
        except ValueError:
            title = ""
        console.say(f"  {path}  {title}")
    if not files:
        console.say("  (dashboards/*.json are in the repository)")
    console.say("  Import: Grafana > Dashboards > New > Import > upload the JSON file, then")
    console.say("  pick your Prometheus data source (the 'datasource' variable). Prometheus")
    console.say("  must scrape Ray's metrics export port on every node (above).")


def prometheus_workdir(folder: Path) -> Path:
    """A folder of Prometheus's own: one already there (the user's, or a past run's) is
    neither used nor removed."""
    workdir = folder / "prometheus"
    if os.path.lexists(workdir):
        return Path(tempfile.mkdtemp(prefix="prometheus-", dir=folder))
    workdir.mkdir(parents=True)
    return workdir


def start_prometheus_for(console: Console, folder: Path, ray_run: LocalRay,
                      scrape_s: float) -> PrometheusServer | None:
    console.heading("Prometheus")
    if find_binary("prometheus") is None:
        console.say(f"  prometheus is not installed; {INSTALL_HINT}")
        return None
    workdir = prometheus_workdir(folder)
    server = start_prometheus([f"127.0.0.1:{ray_run.metrics_port}"], workdir,
                              scrape_interval_s=scrape_s)
    console.say(f"  {server.url}  scraping {ray_run.metrics_url} every {scrape_s:g}s")
    console.say(f"  In Grafana: add a Prometheus data source with URL {server.url}, then import "
                "the dashboards.")
    console.say(f"  Try: {server.url}/graph?g0.expr="
                + catalog.STARTUP_PHASE_DURATION.exposed_name(ray=True) + "_count")
    return server
