"""The ready-to-use configs: ``examples/serve_config.yaml`` (a Ray Serve config with the
Composite, the built-ins and ObservedLLMServer) passes the offline check, is a Serve config
whose LLMConfig validates, and runs with ``serve run`` on a local Ray (tiny CPU model in place
of the hub model); ``examples/kuberay/`` holds manifests of the right kinds, the RayService
carrying the very same Serve config."""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_otel_callbacks import alerts, catalog
from llm_otel_callbacks.__main__ import main
from tests._support.ray_env import REPO_ROOT, free_port, scrape, select, start_local_ray

SERVE_CONFIG = REPO_ROOT / "examples" / "serve_config.yaml"
KUBERAY = REPO_ROOT / "examples" / "kuberay"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _llm_config_dict(serve_config: dict[str, Any]) -> dict[str, Any]:
    (app,) = serve_config["applications"]
    (llm,) = app["args"]["llm_configs"]
    return dict(llm)


# --- the Serve config ----------------------------------------------------------------------------


def test_serve_config_passes_the_offline_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(SERVE_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert "OK   applications[llm].args.llm_configs[0].callback_config: Composite" in out
    for child in ("Timing", "DownloadPolicy", "TokenCounter", "CostTracker", "RateLimiter",
                  "StreamingProgress"):
        assert child in out


def _check_serve_config(doc: dict[str, Any]) -> None:
    """A Serve deploy config with one OpenAI app whose LLMConfig validates with our server
    class and a Composite of built-ins."""
    from ray.serve.llm import LLMConfig
    from ray.serve.schema import ServeDeploySchema

    from llm_otel_callbacks import Composite
    from llm_otel_callbacks.serve import ObservedLLMServer

    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "ray.serve.llm:build_openai_app"
    llm = LLMConfig.model_validate(_llm_config_dict(doc))
    assert llm.server_cls is ObservedLLMServer
    callback = llm.callback_config
    module, _, name = str(callback.callback_class).rpartition(".")
    assert getattr(importlib.import_module(module), name) is Composite
    children = [c if isinstance(c, str) else c["callback_class"]
                for c in callback.callback_kwargs["callbacks"]]
    assert all(c.startswith("llm_otel_callbacks.builtin.") for c in children), children


def test_serve_config_is_a_serve_config_whose_llm_config_validates() -> None:
    _check_serve_config(_load(SERVE_CONFIG))


# --- KubeRay -------------------------------------------------------------------------------------


def _containers(rayservice: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_folder_holds_the_four_manifests() -> None:
    kinds = {p.name: (_load(p)["apiVersion"], _load(p)["kind"])
             for p in sorted(KUBERAY.glob("*.yaml"))}
    assert kinds == {
        "rayservice.yaml": ("ray.io/v1", "RayService"),
        "podmonitor.yaml": ("monitoring.coreos.com/v1", "PodMonitor"),
        "grafana-dashboards.yaml": ("v1", "ConfigMap"),
        "prometheus-rule.yaml": ("monitoring.coreos.com/v1", "PrometheusRule"),
    }
    for path in KUBERAY.glob("*.yaml"):
        name = _load(path)["metadata"]["name"]
        assert name and len(name) <= 63 and name == name.lower(), (path.name, name)


def test_rayservice_carries_the_serve_config_and_exposes_the_metrics_port() -> None:
    service = _load(KUBERAY / "rayservice.yaml")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config == _load(SERVE_CONFIG)
    _check_serve_config(serve_config)
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"]
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    assert cluster["workerGroupSpecs"] and all(
        g["groupName"] and g["rayStartParams"]["metrics-export-port"] == "8080"
        for g in cluster["workerGroupSpecs"])
    for container in _containers(service):
        assert container["name"] and container["image"], container
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 8080, container["name"]
        env = {e["name"] for e in container["env"]}
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in env


def test_podmonitor_scrapes_the_ray_pods_metrics_port() -> None:
    monitor = _load(KUBERAY / "podmonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


def test_grafana_configmap_holds_the_committed_dashboards() -> None:
    configmap = _load(KUBERAY / "grafana-dashboards.yaml")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    committed = {p.name: p.read_text() for p in (REPO_ROOT / "dashboards").glob("*.json")}
    assert configmap["data"] == committed and len(committed) == 2
    for text in configmap["data"].values():
        assert json.loads(text)["uid"]
    assert (KUBERAY / "grafana-dashboards.yaml").read_text() == alerts.dashboards_configmap()


# --- serve run -----------------------------------------------------------------------------------


def _local_variant(model_dir: Path, port: int) -> dict[str, Any]:
    """examples/serve_config.yaml with the tiny local model and CPU engine settings in place of
    the hub model and GPU defaults; the callbacks and server class are untouched."""
    from tests._support.serve_app import ENGINE_KWARGS

    doc = _load(SERVE_CONFIG)
    doc["http_options"] = {"host": "127.0.0.1", "port": port}
    llm = doc["applications"][0]["args"]["llm_configs"][0]
    model_id = llm["model_loading_config"]["model_id"]
    llm["model_loading_config"]["model_source"] = str(model_dir)
    llm["engine_kwargs"] = dict(ENGINE_KWARGS)
    llm["placement_group_config"] = {"bundles": [{"CPU": 1}]}
    llm["deployment_config"] = {"num_replicas": 1}
    llm["experimental_configs"] = {"num_ingress_replicas": 1}
    assert model_id == "qwen-0.5b"
    return doc


@pytest.mark.e2e
def test_serve_config_runs_with_serve_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    import httpx
    from click.testing import CliRunner
    from ray import serve
    from ray.serve.scripts import cli

    from tests._support.serve_app import wait_ready
    from tests.conftest import VLLM_CPU_ENV, _ensure_ray_down

    _ensure_ray_down()
    port = free_port()
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(_local_variant(tiny_model_dir, port), sort_keys=False))
    run = start_local_ray(tmp_path / "ray", num_cpus=4, env=VLLM_CPU_ENV)
    try:
        # `serve run` itself (its click command), against the Ray this process started.
        result = CliRunner().invoke(cli, ["run", "--non-blocking", str(config)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, 420)
        resp = httpx.post(base + "/v1/chat/completions", timeout=120, json={
            "model": "qwen-0.5b", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4, "temperature": 0, "user": "u1"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] is not None
        # The callbacks ran in the replica: Timing's phases, ObservedLLMServer's request
        # metrics and TokenCounter's tokens, on Ray's metrics port.
        wanted = {
            catalog.STARTUP_PHASE_DURATION.exposed_name(ray=True) + "_count": {
                "model": "qwen-0.5b", "phase": catalog.PHASE_TOTAL, "outcome": "ok"},
            catalog.GENAI_REQUEST_DURATION.exposed_name(ray=True) + "_count": {
                catalog.L_GENAI_MODEL: "qwen-0.5b"},
            catalog.TOKENS.exposed_name(ray=True): {"model": "qwen-0.5b"},
        }
        deadline = time.monotonic() + 60
        missing = list(wanted)
        while missing and time.monotonic() < deadline:
            samples = scrape(run.metrics_url)
            missing = [n for n, labels in wanted.items()
                       if not any(v > 0 for _, v in select(samples.get(n, []), **labels))]
            time.sleep(1)
        assert not missing, missing
    finally:
        try:
            serve.shutdown()
        finally:
            run.shutdown()
