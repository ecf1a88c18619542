"""Proves the test-support helpers (tests/_support, conftest fixtures) work for real."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests._support.otlp_receiver import OtlpHttpReceiver, ReceivedSpan
from tests._support.ray_env import LocalCluster, LocalRay, scrape, select, wait_for_metric
from tests._support.tiny_model import make_tiny_model

# -- tiny model -------------------------------------------------------------------


def test_tiny_model_loads_and_tokenizes(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (
        "llama",
        64,
        2,
        32,
    )
    assert cfg.tie_word_embeddings is True
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert len(tok) == cfg.vocab_size  # every model id decodes to a token
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")

    text = "Hello world, ray serve 42!"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # Llama-style BOS
    assert tok.decode(ids, skip_special_tokens=True) == text
    # Byte-level: text never seen in training still round-trips.
    odd = "zß✓ 🙂"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<s>user: hi</s>\n<s>assistant: "

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    assert next(model.parameters()).dtype == torch.float32
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 200_000
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    assert out.logits.shape == (1, len(ids), cfg.vocab_size)


def test_tiny_model_is_idempotent(tiny_model_dir: Path) -> None:
    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert make_tiny_model(tiny_model_dir) == tiny_model_dir
    assert time.perf_counter() - t0 < 0.5  # reused, not rebuilt
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == before


# -- OTLP receiver ------------------------------------------------------------------


def _tracer_provider(rx: OtlpHttpReceiver, **exporter_kwargs: Any) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": "selfcheck"}))
    exporter = OTLPSpanExporter(endpoint=rx.traces_url, timeout=5, **exporter_kwargs)
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # export on span end
    return provider


def test_receiver_decodes_sdk_spans(otlp_receiver: OtlpHttpReceiver) -> None:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.trace import Status, StatusCode

    provider = _tracer_provider(
        otlp_receiver, headers={"x-selfcheck": "yes"}, compression=Compression.Gzip
    )
    tracer = provider.get_tracer("selfcheck.scope")
    with tracer.start_as_current_span("parent", attributes={"a.str": "x", "a.int": 3}) as p:
        p.set_attribute("a.float", 1.5)
        p.set_attribute("a.bool", True)
        p.set_attribute("a.list", ["u", "v"])
        with tracer.start_as_current_span("child") as c:
            c.add_event("step", {"n": 1})
            try:
                raise ValueError("boom")
            except ValueError as exc:
                c.record_exception(exc)
                c.set_status(Status(StatusCode.ERROR, "boom happened"))
    provider.shutdown()

    spans = otlp_receiver.wait_for_spans(lambda ss: len(ss) >= 2, timeout=10)
    by_name: dict[str, ReceivedSpan] = {s.name: s for s in spans}
    parent, child = by_name["parent"], by_name["child"]
    assert parent.attributes == {
        "a.str": "x",
        "a.int": 3,
        "a.float": 1.5,
        "a.bool": True,
        "a.list": ["u", "v"],
    }
    assert parent.resource_attributes["service.name"] == "selfcheck"
    assert parent.scope_name == "selfcheck.scope"
    assert parent.parent_span_id == "" and len(parent.trace_id) == 32
    assert child.trace_id == parent.trace_id and child.parent_span_id == parent.span_id
    assert parent.status_code == "STATUS_CODE_UNSET"
    assert (child.status_code, child.status_message) == ("STATUS_CODE_ERROR", "boom happened")
    events = dict(child.events)
    assert events["step"] == {"n": 1}
    assert events["exception"]["exception.type"] == "ValueError"
    assert parent.start_time_unix_nano <= child.start_time_unix_nano
    assert child.end_time_unix_nano <= parent.end_time_unix_nano
    assert 0 <= parent.duration_s < 10

    reqs = otlp_receiver.requests("/v1/traces")
    assert reqs and all(r.headers.get("x-selfcheck") == "yes" for r in reqs)
    assert {r.content_encoding for r in reqs} == {"gzip"}
    assert otlp_receiver.errors() == []


def test_receiver_metrics_and_failures(otlp_receiver: OtlpHttpReceiver) -> None:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace.export import SpanExportResult

    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=otlp_receiver.metrics_url, timeout=5),
        export_interval_millis=60_000,  # only our explicit flush exports
    )
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("selfcheck")
    meter.create_counter("selfcheck.count").add(2, {"k": "v"})
    meter.create_histogram("selfcheck.latency", unit="s").record(0.25)
    provider.force_flush()
    provider.shutdown()
    assert {"selfcheck.count", "selfcheck.latency"} <= otlp_receiver.metric_names()
    count = otlp_receiver.wait_for_metric("selfcheck.count", timeout=5)[0]
    assert count.kind == "sum" and count.points[0] == {"attributes": {"k": "v"}, "value": 2}
    hist = otlp_receiver.metrics("selfcheck.latency")[0]
    assert hist.kind == "histogram" and hist.points[0]["count"] == 1 and hist.unit == "s"

    # A broken collector: the exporter gets the error (400 is not retried).
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider

    tp = TracerProvider()
    span = tp.get_tracer("t").start_span("lost")
    span.end()
    otlp_receiver.fail_status = 400
    exporter = OTLPSpanExporter(endpoint=otlp_receiver.traces_url, timeout=2)
    assert exporter.export([span]) == SpanExportResult.FAILURE  # type: ignore[list-item]
    otlp_receiver.fail_status = None
    assert exporter.export([span]) == SpanExportResult.SUCCESS  # type: ignore[list-item]
    assert [s.name for s in otlp_receiver.spans()] == ["lost"]
    with pytest.raises(TimeoutError, match="lost"):
        otlp_receiver.wait_for_span("never", timeout=0.3)


# -- Ray sandbox (no Ray started) ------------------------------------------------------


def test_sandbox_uses_short_dir_for_long_paths(tmp_path: Path) -> None:
    from llm_otel_callbacks.demo.local_ray import MARKER_VAR, RayRun, make_sandbox

    long_root = tmp_path / ("x" * 60)
    sb = make_sandbox(long_root, "token", {"FOO": "1"})
    # Long roots would overflow AF_UNIX socket paths: Ray gets a short /tmp dir,
    # linked from the root, and the token stays in the root.
    assert sb.owned_short_dir is not None and len(str(sb.ray_temp)) <= 40
    assert (long_root / "ray-temp").resolve() == sb.owned_short_dir.resolve()
    assert sb.env["RAY_TMPDIR"] == str(sb.owned_short_dir)
    assert Path(sb.env["RAY_AUTH_TOKEN_PATH"]).parent == long_root.resolve()
    assert sb.env["FOO"] == "1" and sb.env["RAY_AUTH_MODE"] == "token"
    assert sb.env[MARKER_VAR] == sb.run_id
    assert Path(sb.env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o777 == 0o600
    logs = sb.ray_temp / "session_x" / "logs"
    logs.mkdir(parents=True)
    (logs / "raylet.out").write_text("hi")
    (sb.ray_temp / "session_latest").symlink_to(sb.ray_temp / "session_x")
    RayRun(sandbox=sb, runtime_env={})._drop_files()
    # Teardown keeps the logs under the root and removes the /tmp dir.
    assert (long_root / "ray-logs" / "raylet.out").read_text() == "hi"
    assert not sb.owned_short_dir.exists() and not (long_root / "ray-temp").exists()
    off = make_sandbox(tmp_path / "off", "disabled", None)
    RayRun(sandbox=off, runtime_env={})._drop_files()
    assert "RAY_AUTH_TOKEN_PATH" not in off.env and not (off.root / "auth_token").exists()


# -- Ray, one node --------------------------------------------------------------------


def _ray_metrics_task() -> None:
    import ray
    from ray.util.metrics import Counter, Histogram

    @ray.remote
    def record() -> str:
        c = Counter("selfcheck_requests", description="d", tag_keys=("Model-Id", "route"))
        c.inc(2.0, tags={"Model-Id": "tiny", "route": "/v1"})
        h = Histogram("selfcheck_latency_s", boundaries=[0.1, 1.0], tag_keys=("route",))
        h.observe(0.5, tags={"route": "/v1"})
        return ray.get_runtime_context().get_node_id()

    ray.get(record.remote())


def test_ray_local_metrics_and_paths(ray_local: LocalRay) -> None:
    import ray
    from ray.util.metrics import Gauge

    # Workers see the repo root: our packages import there.
    @ray.remote
    def probe() -> tuple[bool, str, str]:
        import tests._support.ray_env as m

        found = importlib.util.find_spec("llm_otel_callbacks") is not None
        return found, m.__file__ or "", os.environ.get("PYTHONPATH", "")

    found, path, pythonpath = ray.get(probe.remote())
    assert found and path.startswith(str(Path(__file__).parent))
    assert pythonpath.split(os.pathsep)[0] == str(Path(__file__).parents[1])

    # Ray's session lives in our sandbox; the token file is ours, not ~/.ray's.
    node = ray._private.worker.global_worker.node
    assert node is not None
    session = Path(node.get_session_dir_path()).resolve()
    assert session.is_relative_to(ray_local.temp_dir.resolve())
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"])
    assert token.is_file() and token.parent == ray_local.sandbox.root
    assert os.environ["RAY_AUTH_MODE"] == "token"

    t0 = time.perf_counter()
    _ray_metrics_task()

    # A gauge only stays exported while its object lives (here: in an actor).
    @ray.remote
    class Holder:
        def __init__(self) -> None:
            self.g = Gauge("selfcheck_inflight", tag_keys=("route",))

        def set(self, v: float) -> None:
            self.g.set(v, tags={"route": "/v1"})

    holder = Holder.remote()  # type: ignore[attr-defined]
    ray.get(holder.set.remote(3))

    url = ray_local.metrics_url
    counter = wait_for_metric(url, "ray_selfcheck_requests_total", timeout=30)
    visible_s = time.perf_counter() - t0
    labels, value = counter[0]
    assert value == 2.0
    # "-" is not legal in a Prometheus label name: Ray rewrites it to "_".
    assert labels["Model_Id"] == "tiny" and labels["route"] == "/v1"
    assert {"Component", "NodeAddress", "SessionName", "WorkerId"} <= labels.keys()

    page = scrape(url)
    buckets = select(page["ray_selfcheck_latency_s_bucket"], route="/v1")
    assert {lab["le"]: v for lab, v in buckets} == {"0.1": 0.0, "1.0": 1.0, "+Inf": 1.0}
    assert page["ray_selfcheck_latency_s_count"][0][1] == 1.0
    # Ray rebuilds histograms in its agent from bucket counts, recording each
    # bucket's midpoint: the exported _sum is (0.1 + 1.0) / 2, not the observed 0.5.
    assert page["ray_selfcheck_latency_s_sum"][0][1] == pytest.approx(0.55)
    gauge = wait_for_metric(url, "ray_selfcheck_inflight", lambda s: s[0][1] == 3.0, timeout=30)
    assert gauge[0][0]["route"] == "/v1"
    assert "selfcheck_requests" not in page  # always the ray_ prefix
    print(f"\nray metrics visible {visible_s:.2f}s after the task started")
    ray.kill(holder)


# -- Ray, two nodes -------------------------------------------------------------------


@pytest.mark.cluster
def test_two_nodes_and_strict_spread(ray_two_nodes: LocalCluster) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]  # type: ignore[no-untyped-call]
    assert len(alive) == 2 and len(set(alive)) == 2
    assert {n.node_id for n in ray_two_nodes.nodes} == set(alive)
    assert ray.cluster_resources()["CPU"] == 4.0  # type: ignore[no-untyped-call]

    pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
    ray.get(pg.ready(), timeout=30)

    @ray.remote(num_cpus=1)
    def where() -> str:
        from ray.util.metrics import Counter

        Counter("selfcheck_node_hits").inc()
        return ray.get_runtime_context().get_node_id()

    ran_on = ray.get(
        [
            where.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, bundle_index)
            ).remote()
            for bundle_index in (0, 1)
        ]
    )
    table = ray.util.placement_group_table(pg)
    assert set(table["bundles_to_node_id"].values()) == set(alive)
    assert set(ran_on) == set(alive)
    remove_placement_group(pg)

    # Each node exports its own workers' metrics on its own port.
    for node in ray_two_nodes.nodes:
        hits = wait_for_metric(node.metrics_url, "ray_selfcheck_node_hits_total", timeout=30)
        assert sum(v for _, v in hits) == 1.0


def test_every_new_cluster_gets_the_llm_registrations(tmp_path: Path) -> None:
    """Ray LLM's registries flush once per process; a second cluster started from the same
    process must still have them in its KV store, or concurrent download tasks race at import
    ("kv_connector_backend 'NixlConnector' is already registered", seen in CI)."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_exists
    from ray.llm._internal.serve.engines.vllm.kv_transfer.factory import BUILTIN_BACKENDS
    from ray.llm._internal.serve.utils.registry import _make_key

    from tests._support.ray_env import start_local_ray
    from tests.conftest import _ensure_ray_down

    _ensure_ray_down()  # this module's Ray fixtures may still hold one
    keys = [_make_key("kv_connector_backend", name) for name in BUILTIN_BACKENDS]
    for attempt in range(2):
        run = start_local_ray(tmp_path / f"ray{attempt}", num_cpus=1)
        try:
            missing = [k for k in keys if not _internal_kv_exists(k)]
            assert not missing, (attempt, missing)
        finally:
            run.shutdown()
        assert not ray.is_initialized()
