"""DownloadPolicy on a real two-node Ray cluster on this machine. What is asserted is the value
Ray's own download task received: the ``download_model`` argument of Ray's
``download_model_files`` frame, read inside the remote task on each node (tests/builtin_probes).

The two nodes differ the way real machines do: each raylet has its own HF_HUB_CACHE (node B's
holds a pre-baked copy of ``acme/tiny``), node B sets policy environment variables and
announces the ``model_cache_warm`` resource. The models are named by hub id with no mirror, so
Ray downloads nothing (no network here) but still runs its per-node tasks and reads the policy.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from llm_otel_callbacks import CallbackConfigError, catalog
from llm_otel_callbacks.builtin import DownloadPolicy
from llm_otel_callbacks.builtin.download_policy import check_cached_model, model_cache_dir
from llm_otel_callbacks.telemetry import reset_telemetry
from tests._support.flow import make_llm_config, remove_pg, start_like_vllm_engine
from tests._support.otlp_receiver import OtlpHttpReceiver, ReceivedSpan
from tests._support.ray_env import LocalCluster, select, start_cluster, wait_for_metric

DECISIONS = catalog.DOWNLOAD_DECISIONS.exposed_name(ray=True)
DOWNLOAD_HOOK = "on_before_download_model_files_distributed"
SNAPSHOT = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"
NODE_B_ENV = {"DL_POLICY_NODE_B": "tokenizer_only", "DL_BAD_NODE_B": "fastest"}


def bake(cache_root: Path, model_id: str, source: Path, *, truncate: bool = False) -> Path:
    """A local model cache entry in the layout Ray's downloader writes (refs/main names a
    snapshot directory holding the files); returns the snapshot directory."""
    entry = cache_root / f"models--{model_id.replace('/', '--')}"
    snapshot = entry / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(SNAPSHOT)
    for item in source.iterdir():
        if item.is_file():
            shutil.copy(item, snapshot / item.name)
    if truncate:  # a download cut off half-way
        weights = snapshot / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    return snapshot


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    node_a, node_b = root / "node-a", root / "node-b"
    node_a.mkdir()
    node_b.mkdir()
    return {
        "a": node_a,
        "b": node_b,
        "b_snapshot": bake(node_b, "acme/tiny", tiny_model_dir),
        "b_partial": bake(node_b, "acme/tiny-partial", tiny_model_dir, truncate=True),
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, caches: dict[str, Path]) -> Iterator[
    LocalCluster
]:
    # Like conftest's ray_two_nodes, with per-node environments and resources.
    if ray.is_initialized():
        ray.shutdown()
    run = start_cluster(tmp_path_factory.mktemp("ray2n"), nodes=[
        {"num_cpus": 2, "env_vars": {"HF_HUB_CACHE": str(caches["a"])}},
        {"num_cpus": 2, "resources": {"model_cache_warm": 1},
         "env_vars": {"HF_HUB_CACHE": str(caches["b"]), **NODE_B_ENV}},
    ])
    try:
        yield run
    finally:
        run.shutdown()


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpHttpReceiver]:
    reset_telemetry()
    with OtlpHttpReceiver() as rx:
        yield rx
    reset_telemetry()


def _kwargs(rx: OtlpHttpReceiver, **extra: Any) -> dict[str, Any]:
    return {
        "telemetry": {"endpoint": rx.endpoint, "schedule_delay_ms": 100,
                      "service_name": "builtin-download"},
        **extra,
    }


def _run(model_id: str, callback_class: str, kwargs: dict[str, Any]) -> Any:
    """Ray's flow with a STRICT_SPREAD replica group: one download task on each node."""
    llm_config = make_llm_config(
        model_id, callback_class, kwargs, model_id=model_id.split("/")[-1],
        bundles=[{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD",
    )
    callback = llm_config.get_or_create_callback()
    try:
        start_like_vllm_engine(llm_config)
    finally:
        remove_pg(callback)
    return callback


def _reports(report_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in report_dir.glob("download-*.json"):
        report = json.loads(path.read_text())
        out[report["node_id"]] = report
    return out


def _decision_spans(rx: OtlpHttpReceiver, callback: Any, count: int) -> dict[str, ReceivedSpan]:
    """The download-hook spans carrying a decision, by node, once ``count`` have arrived."""
    trace_id = (callback.startup_owner or callback).trace_carrier["traceparent"].split("-")[1]

    def mine(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [
            s for s in spans
            if s.trace_id == trace_id and s.attributes.get(catalog.A_HOOK) == DOWNLOAD_HOOK
            and catalog.A_POLICY in s.attributes
        ]

    spans = mine(rx.wait_for_spans(lambda ss: len(mine(ss)) >= count, timeout=60))
    return {s.attributes[catalog.A_NODE_ID]: s for s in spans}


def _nodes(cluster: LocalCluster) -> tuple[str, str]:
    return cluster.nodes[0].node_id, cluster.nodes[1].node_id


# --- construction and the cache check (no Ray needed) ------------------------------------------


def test_kwargs_are_validated_at_construction() -> None:
    with pytest.raises(CallbackConfigError) as err:
        DownloadPolicy(llm_config=None, worker_node="everything")
    message = str(err.value)
    assert "worker_node" in message
    for name in ("MODEL_AND_TOKENIZER", "TOKENIZER_ONLY", "EXCLUDE_SAFETENSORS", "NONE"):
        assert name in message
    with pytest.raises(CallbackConfigError, match="env_var"):
        DownloadPolicy(llm_config=None, env_var="NOT A NAME")
    with pytest.raises(CallbackConfigError, match="skip_weigths"):
        DownloadPolicy(llm_config=None, skip_weigths=True)
    assert DownloadPolicy(llm_config=None, worker_node=" tokenizer_only").options.worker_node == (
        "TOKENIZER_ONLY"
    )


def test_complete_copy_is_checked_against_rays_layout(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants
    from ray.llm._internal.common.utils.download_utils import get_model_location_on_disk

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = bake(tmp_path, "org/m", tiny_model_dir)
    entry = model_cache_dir("org/m")
    assert entry == snapshot.parent.parent
    ok = check_cached_model(entry)
    assert ok.complete and ok.path == str(snapshot)
    # Ray's own reader resolves the same snapshot from that cache.
    assert get_model_location_on_disk("org/m") == str(snapshot)
    cut = check_cached_model(bake(tmp_path, "org/cut", tiny_model_dir, truncate=True).parent.parent)
    assert not cut.complete and "incomplete" in cut.reason
    # A sharded checkpoint whose index names a shard that is not there.
    sharded = bake(tmp_path, "org/sharded", tiny_model_dir)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
    }}))
    missing = check_cached_model(sharded.parent.parent)
    assert not missing.complete and "model-00002-of-00002.safetensors: missing" in missing.reason
    assert not check_cached_model(tmp_path / "models--nothing").complete
    # With a mirror whose hash cannot be read, the cached copy is not trusted.
    unverified = check_cached_model(entry, bucket_uri="nosuch://bucket/m")
    assert not unverified.complete and "mirror hash unreadable" in unverified.reason


# --- on the cluster ----------------------------------------------------------------------------


def test_fixed_policy_reaches_rays_download_task_on_each_node(
    cluster: LocalCluster, receiver: OtlpHttpReceiver, tmp_path: Path
) -> None:
    callback = _run("acme/fresh", "tests.builtin_probes.ProbedDownloadPolicy", _kwargs(
        receiver, worker_node="tokenizer_only", report_dir=str(tmp_path)
    ))
    node_a, node_b = _nodes(cluster)
    reports = _reports(tmp_path)
    assert set(reports) == {node_a, node_b}
    for report in reports.values():
        assert report["download_model"] == "TOKENIZER_ONLY"  # what Ray's task received
        assert report["pid"] != os.getpid()

    spans = _decision_spans(receiver, callback, 2)
    for node in (node_a, node_b):
        assert spans[node].attributes[catalog.A_POLICY] == "TOKENIZER_ONLY"
        assert spans[node].attributes[catalog.A_RULE] == "fixed"
        assert spans[node].attributes[catalog.A_DOWNLOAD_REPLICA_POLICY] == "TOKENIZER_ONLY"
    # Each node's decision is counted by that node's metrics agent.
    for info in cluster.nodes:
        samples = wait_for_metric(
            info.metrics_url, DECISIONS,
            lambda ss, n=info.node_id: bool(
                select(ss, node=n, policy="TOKENIZER_ONLY", rule="fixed", model="fresh")
            ),
            timeout=60,
        )
        assert select(samples, node=info.node_id, model="fresh")[0][1] == 1


def test_local_cache_rule_decides_per_node(
    cluster: LocalCluster, receiver: OtlpHttpReceiver, tmp_path: Path,
    caches: dict[str, Path],
) -> None:
    node_a, node_b = _nodes(cluster)

    def composite(report_dir: Path) -> dict[str, Any]:
        return _kwargs(receiver, callbacks=[
            {"callback_class": "llm_otel_callbacks.builtin.DownloadPolicy",
             "callback_kwargs": {"skip_weights_if_cached": True}},
            {"callback_class": "tests.builtin_probes.DownloadProbe",
             "callback_kwargs": {"report_dir": str(report_dir)}},
        ])

    (tmp_path / "full").mkdir()
    callback = _run("acme/tiny", "llm_otel_callbacks.Composite", composite(tmp_path / "full"))
    reports = _reports(tmp_path / "full")
    assert reports[node_a]["download_model"] == "MODEL_AND_TOKENIZER"  # empty cache
    assert reports[node_b]["download_model"] == "EXCLUDE_SAFETENSORS"  # pre-baked copy
    # The copy judged complete is the one Ray's own reader resolves on that node.
    assert reports[node_b]["ray_model_location"] == str(caches["b_snapshot"])
    spans = _decision_spans(receiver, callback, 2)
    assert spans[node_a].attributes[catalog.A_RULE] == "ray_default"
    assert spans[node_b].attributes[catalog.A_RULE] == "local_cache"
    assert spans[node_b].attributes[catalog.A_DOWNLOAD_CACHE_PATH] == str(caches["b_snapshot"])
    assert "no snapshot recorded" in spans[node_a].attributes[catalog.A_DOWNLOAD_REASON]
    wait_for_metric(
        cluster.nodes[1].metrics_url, DECISIONS,
        lambda ss: bool(select(ss, node=node_b, policy="EXCLUDE_SAFETENSORS",
                               rule="local_cache", model="tiny")),
        timeout=60,
    )

    # A copy cut off half-way is not complete: node B downloads everything.
    (tmp_path / "partial").mkdir()
    callback = _run("acme/tiny-partial", "llm_otel_callbacks.Composite",
                    composite(tmp_path / "partial"))
    reports = _reports(tmp_path / "partial")
    assert reports[node_b]["download_model"] == "MODEL_AND_TOKENIZER"
    spans = _decision_spans(receiver, callback, 2)
    assert "incomplete" in spans[node_b].attributes[catalog.A_DOWNLOAD_REASON]


def test_environment_variable_overrides_per_node(
    cluster: LocalCluster, receiver: OtlpHttpReceiver, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node_a, node_b = _nodes(cluster)
    (tmp_path / "env").mkdir()
    callback = _run("acme/fresh", "tests.builtin_probes.ProbedDownloadPolicy", _kwargs(
        receiver, worker_node="Exclude_Safetensors", env_var="DL_POLICY_NODE_B",
        report_dir=str(tmp_path / "env"),
    ))
    reports = _reports(tmp_path / "env")
    assert reports[node_a]["download_model"] == "EXCLUDE_SAFETENSORS"  # kwarg
    assert reports[node_b]["download_model"] == "TOKENIZER_ONLY"  # node B's variable
    spans = _decision_spans(receiver, callback, 2)
    assert spans[node_a].attributes[catalog.A_RULE] == "fixed"
    assert spans[node_b].attributes[catalog.A_RULE] == "env"
    assert spans[node_b].attributes[catalog.A_DOWNLOAD_REASON] == "DL_POLICY_NODE_B=TOKENIZER_ONLY"

    # A bad value on a node is ignored there (with a warning), not fatal.
    (tmp_path / "bad").mkdir()
    _run("acme/fresh", "tests.builtin_probes.ProbedDownloadPolicy", _kwargs(
        receiver, worker_node="none", env_var="DL_BAD_NODE_B", report_dir=str(tmp_path / "bad"),
    ))
    assert {r["download_model"] for r in _reports(tmp_path / "bad").values()} == {"NONE"}

    # A bad value in the replica fails the replica early, naming the variable and the choices.
    monkeypatch.setenv("DL_BAD_REPLICA", "sometimes")
    with pytest.raises(Exception) as err:
        _run("acme/fresh", "llm_otel_callbacks.builtin.DownloadPolicy",
             _kwargs(receiver, env_var="DL_BAD_REPLICA"))
    message = str(err.value)
    assert "DL_BAD_REPLICA='sometimes'" in message
    assert "MODEL_AND_TOKENIZER, TOKENIZER_ONLY, EXCLUDE_SAFETENSORS, NONE" in message


def test_subclass_rule_from_node_resources(
    cluster: LocalCluster, receiver: OtlpHttpReceiver, tmp_path: Path
) -> None:
    """examples/download_policy_subclass.py: node B announces model_cache_warm."""
    node_a, node_b = _nodes(cluster)
    callback = _run("acme/fresh", "llm_otel_callbacks.Composite", _kwargs(receiver, callbacks=[
        "examples.download_policy_subclass.WarmNodeDownloadPolicy",
        {"callback_class": "tests.builtin_probes.DownloadProbe",
         "callback_kwargs": {"report_dir": str(tmp_path)}},
    ]))
    reports = _reports(tmp_path)
    assert reports[node_a]["download_model"] == "MODEL_AND_TOKENIZER"
    assert reports[node_b]["download_model"] == "EXCLUDE_SAFETENSORS"
    spans = _decision_spans(receiver, callback, 2)
    assert spans[node_b].attributes[catalog.A_RULE] == "node_resource"
    assert spans[node_a].attributes[catalog.A_RULE] == "ray_default"
