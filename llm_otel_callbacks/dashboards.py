"""Grafana dashboards generated from the metric catalog.

``python -m llm_otel_callbacks dashboards`` writes them (and what derives from them: the
alerting rules and the Grafana ConfigMap, see :mod:`.alerts`); ``--check`` compares.

What the panels show is in :mod:`._dashboard_specs` (queries over :mod:`.catalog` metrics, built
in :mod:`._promql`); this module turns it into Grafana JSON with Grafana's own
dashboards-as-code library (``grafana-foundation-sdk``, the ``dev`` extra), writes
``dashboards/*.json``, and checks the committed files (a test regenerates them and fails on a
difference).

Ray builds histogram ``_sum`` from bucket midpoints, so means would be rough: panels show
quantiles; exact per-replica numbers are in the startup traces (links on the panels).
Exemplars: Ray's metrics path does not carry them; the ``prometheus_client`` backend (outside
Ray) and OTLP pipelines do. Latency panels ask for exemplars and link a point's ``trace_id``
to the trace, through the ``tracing`` data source variable or the ``trace_url`` prefix.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import alerts, catalog
from ._dashboard_specs import DashboardSpec, Panel, Row, dashboards
from ._promql import (
    ALL,
    NODE_LABEL,
    SERVE_HEALTHY,
    V_APP,
    V_DATASOURCE,
    V_DEPLOYMENT,
    V_MODEL,
    V_NODE,
    V_REPLICA,
    V_TRACE_URL,
    V_TRACING,
    Series,
    ours,
)

__all__ = ["DashboardSpec", "Panel", "Row", "Series", "dashboards", "generate", "render"]

DASHBOARD_DIR = Path(__file__).resolve().parents[1] / "dashboards"

# --- to Grafana JSON ------------------------------------------------------------------------------


def _startup_traces_url() -> str:
    """Grafana Explore with a TraceQL search for the startup traces of the selected models."""
    traceql = (f'{{name="{catalog.SPAN_STARTUP}" && '
               f'span.{catalog.A_MODEL}=~"${{{V_MODEL}:regex}}"}}')
    pane = {"datasource": f"${{{V_TRACING}}}",
            "queries": [{"refId": "A", "queryType": "traceql", "query": traceql}],
            "range": {"from": "${__from}", "to": "${__to}"}}
    return "/explore?left=" + json.dumps(pane, separators=(",", ":"))


def _trace_id_url() -> str:
    pane = {"datasource": f"${{{V_TRACING}}}",
            "queries": [{"refId": "A", "queryType": "traceql",
                         "query": "${__data.fields.trace_id}"}]}
    return "/explore?left=" + json.dumps(pane, separators=(",", ":"))


_GRID_WIDTH = 24


def _sdk(module: str) -> Any:
    """A module of grafana-foundation-sdk (the ``dev`` extra), typed loosely: its enums are
    Python 3.11 StrEnums, which the 3.10 type check of this package does not know."""
    return importlib.import_module(f"grafana_foundation_sdk.{module}")


def _build(spec: DashboardSpec) -> Any:
    gdb, gdm = _sdk("builders.dashboard"), _sdk("models.dashboard")

    board = (
        gdb.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(list(spec.tags))
        .editable()
        .time("now-3h", "now")
        .refresh("30s")
        .timezone("browser")
    )
    for variable in _variables():
        board = board.with_variable(variable)
    board = board.link(
        gdb.DashboardLink("Startup traces (Tempo)").url(_startup_traces_url())
        .include_vars(False).keep_time(False).target_blank(True)
    )
    next_id, y = 1, 0
    for row in spec.rows:
        board = board.with_row(gdb.Row(row.title).id(next_id)
                               .grid_pos(gdm.GridPos(h=1, w=24, x=0, y=y)))
        next_id, y = next_id + 1, y + 1
        x = line_height = 0
        for panel in row.panels:
            if x + panel.width > _GRID_WIDTH:  # wrap: panels never overflow the grid
                x, y, line_height = 0, y + line_height, 0
            where = gdm.GridPos(h=panel.height, w=panel.width, x=x, y=y)
            board = board.with_panel(_panel(panel, next_id).grid_pos(where))
            next_id, x, line_height = next_id + 1, x + panel.width, max(line_height, panel.height)
        y += line_height
    return board.build()


def _variables() -> list[Any]:
    gdb, gdm = _sdk("builders.dashboard"), _sdk("models.dashboard")

    ds = gdm.DataSourceRef(type_val="prometheus", uid=f"${{{V_DATASOURCE}}}")

    def query_var(name: str, label: str, query: str, hide: bool = False) -> Any:
        var = (
            gdb.QueryVariable(name).label(label).query(query).datasource(ds)
            .multi(True).include_all(True).refresh(gdm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(gdm.VariableSort.ALPHABETICAL_ASC)
            .current(gdm.VariableOption(selected=True, text=["All"], value=["$__all"]))
        )
        if hide:
            var = var.hide(gdm.VariableHide.HIDE_VARIABLE)
        return var.all_value(ALL) if name != V_REPLICA else var

    model_source = ours(catalog.HOOK_CALLS).family
    return [
        gdb.DatasourceVariable(V_DATASOURCE).label("Prometheus").type("prometheus"),
        query_var(V_MODEL, "Model", f"label_values({model_source}, {catalog.L_MODEL})"),
        query_var(V_NODE, "Node", f"label_values({NODE_LABEL})"),
        query_var(V_APP, "Serve app", f"label_values({SERVE_HEALTHY.family}, application)"),
        query_var(V_DEPLOYMENT, "Deployment",
                  f'label_values({SERVE_HEALTHY.family}{{application=~"${V_APP}"}}, deployment)'),
        # Serve replica ids of the chosen app/deployment: vLLM labels its series with them.
        query_var(V_REPLICA, "Replica",
                  f'label_values({SERVE_HEALTHY.family}{{application=~"${V_APP}", '
                  f'deployment=~"${V_DEPLOYMENT}"}}, replica)', hide=True),
        gdb.DatasourceVariable(V_TRACING).label("Traces").type("tempo"),
        gdb.TextBoxVariable(V_TRACE_URL).label("Trace URL prefix")
        .description("Prefix of a trace page in your tracing UI; the trace id is appended "
                     "(e.g. Jaeger: http://jaeger:16686/trace/).")
        .default_value(""),
    ]


def _panel(p: Panel, panel_id: int) -> Any:
    barchart, bargauge, stat = _sdk("builders.barchart"), _sdk("builders.bargauge"), _sdk(
        "builders.stat")
    table, timeseries, gprom = _sdk("builders.table"), _sdk("builders.timeseries"), _sdk(
        "builders.prometheus")
    gcommon, gdb = _sdk("builders.common"), _sdk("builders.dashboard")
    gcm, gdm, gpm = _sdk("models.common"), _sdk("models.dashboard"), _sdk("models.prometheus")

    builder: Any
    if p.kind == "timeseries":
        builder = (
            timeseries.Panel()
            .legend(gcommon.VizLegendOptions().show_legend(True)
                    .display_mode(gcm.LegendDisplayMode.LIST).placement(gcm.LegendPlacement.BOTTOM))
            .tooltip(gcommon.VizTooltipOptions().mode(gcm.TooltipDisplayMode.MULTI)
                     .sort(gcm.SortOrder.DESCENDING))
            .fill_opacity(10)
            .span_nulls(True)
        )
    elif p.kind == "stat":
        builder = (
            stat.Panel()
            .graph_mode(gcm.BigValueGraphMode.NONE)
            .color_mode(gcm.BigValueColorMode.VALUE)
            .text_mode(gcm.BigValueTextMode.VALUE_AND_NAME)
            .reduce_options(gcommon.ReduceDataOptions().calcs(["lastNotNull"]))
        )
    elif p.kind == "bargauge":
        builder = (
            bargauge.Panel()
            .orientation(gcm.VizOrientation.HORIZONTAL)
            .display_mode(gcm.BarGaugeDisplayMode.GRADIENT)
            .reduce_options(gcommon.ReduceDataOptions().calcs(["lastNotNull"]))
        )
    elif p.kind == "table":
        builder = table.Panel().show_header(True).cell_height(gcm.TableCellHeight.SM)
        builder = builder.with_transformation(
            gdm.DataTransformerConfig(id_val="merge", options={})
        ).with_transformation(_organize(p))
    else:
        builder = (
            barchart.Panel()
            .x_field(p.x_field)
            .orientation(gcm.VizOrientation.HORIZONTAL)
            .show_value(gcm.VisibilityMode.AUTO)
            .legend(gcommon.VizLegendOptions().show_legend(True)
                    .display_mode(gcm.LegendDisplayMode.LIST).placement(gcm.LegendPlacement.BOTTOM))
            .with_transformation(gdm.DataTransformerConfig(id_val="merge", options={}))
            .with_transformation(_organize(p))
        )
    for q in p.queries:
        if q.name in _COUNT_COLUMNS and p.unit != "short":
            builder = builder.override_by_name(
                q.name, [gdm.DynamicConfigValue(id_val="unit", value="short")])
    builder = (
        builder.id(panel_id).title(p.title).description(p.description)
        .datasource(gdm.DataSourceRef(type_val="prometheus", uid=f"${{{V_DATASOURCE}}}"))
        .unit(p.unit)
    )
    for index, q in enumerate(p.queries):
        target = gprom.Dataquery().expr(q.expr).ref_id(q.name or chr(ord("A") + index))
        if q.legend:
            target = target.legend_format(q.legend)
        if q.instant:
            target = target.instant()
            if p.kind in ("table", "barchart"):
                target = target.format(gpm.PromQueryFormat.TABLE)
        else:
            target = target.range()
        if p.exemplars and not q.instant:
            target = target.exemplar(True)
        builder = builder.with_target(target)
    if p.exemplars:
        builder = builder.data_links([
            gdb.DashboardLink("Trace ${__data.fields.trace_id}").url(_trace_id_url())
            .target_blank(True),
            gdb.DashboardLink("Trace ${__data.fields.trace_id} in your tracing UI")
            .url(f"${{{V_TRACE_URL}}}${{__data.fields.trace_id}}").target_blank(True),
        ])
    if p.trace_links:
        builder = builder.links([
            gdb.DashboardLink("Startup traces of these models (Tempo)")
            .url(_startup_traces_url()).target_blank(True),
        ])
    return builder


_COUNT_COLUMNS = ("count",)


def _organize(p: Panel) -> Any:
    """Name a merged table's value columns after their queries, keep the labels."""
    gdm = _sdk("models.dashboard")

    rename = {f"Value #{q.name}": q.name for q in p.queries if q.name}
    return gdm.DataTransformerConfig(
        id_val="organize",
        options={"excludeByName": {"Time": True}, "renameByName": rename},
    )


def render(spec: DashboardSpec) -> str:
    """The dashboard as stable, diff-friendly JSON text."""
    encoder = _sdk("cog.encoder").JSONEncoder
    model = json.loads(json.dumps(_build(spec), cls=encoder))
    return json.dumps(model, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def generate(out_dir: Path = DASHBOARD_DIR) -> list[Path]:
    """Write every dashboard into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in dashboards():
        path = out_dir / spec.file
        path.write_text(render(spec), encoding="utf-8")
        written.append(path)
    return written


def differences(out_dir: Path = DASHBOARD_DIR) -> list[str]:
    """Unified diffs between the committed dashboards and freshly generated ones."""
    diffs = []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p for p in generate(Path(tmp))}
        names = sorted(set(fresh) | {p.name for p in out_dir.glob("*.json")})
        for name in names:
            new = fresh[name].read_text().splitlines(keepends=True) if name in fresh else []
            old_path = out_dir / name
            old = old_path.read_text().splitlines(keepends=True) if old_path.exists() else []
            if old != new:
                diffs.append("".join(difflib.unified_diff(old, new, f"committed/{name}",
                                                          f"generated/{name}")))
    return diffs


# --- what the tests and the check need ------------------------------------------------------------


_VARIABLE = re.compile(r"\$\{?(\w+)(?::\w+)?\}?")


def instantiate(expr: str, range_s: int, rate_s: int, value: str = ALL) -> str:
    """An expression as Grafana would send it: ``$__range``/``$__rate_interval`` as durations,
    every dashboard variable as ``value`` (a regex; "All" is ``.*``)."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "__range":
            return f"{range_s}s"
        if name == "__rate_interval":
            return f"{rate_s}s"
        return value

    return _VARIABLE.sub(sub, expr)


def all_expressions() -> dict[str, str]:
    """Every query of every dashboard, keyed ``<file>#<panel id><refId>``."""
    out = {}
    for spec in dashboards():
        model = json.loads(render(spec))
        for panel_id, ref, target in panel_queries(model):
            out[f"{spec.file}#{panel_id}{ref}"] = str(target["expr"])
    return out


def panel_queries(model: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(panel id, refId, target) for every query of a dashboard's JSON model."""
    out = []
    for panel in model.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []) or []:
                out.append((str(inner.get("id", "")), str(target.get("refId", "")), target))
    return out


# --- CLI ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DASHBOARD_DIR,
                        help=f"folder to write the JSON into (default: {DASHBOARD_DIR})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the committed JSON is not what the "
                             "catalog generates")


def run(args: argparse.Namespace) -> int:
    try:
        import grafana_foundation_sdk  # noqa: F401
    except ImportError:
        print("grafana-foundation-sdk is missing: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    if args.check:
        diffs = differences(args.out)
        if args.out == DASHBOARD_DIR:  # the rules and the Grafana ConfigMap derive from them too
            diffs += alerts.differences()
        for diff in diffs:
            sys.stdout.write(diff)
        if diffs:
            print("dashboards are stale: run python -m llm_otel_callbacks dashboards",
                  file=sys.stderr)
            return 1
        print(f"dashboards in {args.out} match the catalog")
        return 0
    written = generate(args.out)
    if args.out == DASHBOARD_DIR:
        written += alerts.generate()
    for path in written:
        print(path)
    return 0
