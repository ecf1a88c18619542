"""Real Ray for the tests (one node, or several nodes on this machine) inside a temp folder.

Built on the package's one local-Ray helper, :mod:`llm_otel_callbacks.demo.local_ray` (the
demo's), which keeps Ray's session, token and environment inside the folder. The tests add:
the repo root on every worker's ``PYTHONPATH`` (replicas import ``tests.*``), the env given
also in the job ``runtime_env`` (Serve replicas get it), the multi-node variant
(``ray.cluster_utils.Cluster``), the one run a driver may hold (:func:`shutdown_active`), and
Prometheus scraping.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_otel_callbacks.demo import local_ray as _local
from llm_otel_callbacks.demo.local_ray import (
    FAST_METRICS_SYSTEM_CONFIG,
    AuthMode,
    EnvPatch,
    LocalRay,
    RayRun,
    make_sandbox,
    pythonpath,
    refresh_auth_cache,
    seed_llm_registries,
)
from llm_otel_callbacks.demo.ports import free_port, free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]

__all__ = [
    "FAST_METRICS_SYSTEM_CONFIG",
    "REPO_ROOT",
    "LocalCluster",
    "LocalRay",
    "NodeInfo",
    "free_port",
    "scrape",
    "select",
    "shutdown_active",
    "start_cluster",
    "start_local_ray",
    "wait_for_metric",
    "worker_pythonpath",
]

Samples = list[tuple[dict[str, str], float]]


def worker_pythonpath() -> str:
    """PYTHONPATH for Ray workers: the repo root (for ``llm_otel_callbacks`` and
    ``tests._support``) ahead of whatever this process already had."""
    return pythonpath(REPO_ROOT)


def _env(env: Mapping[str, str] | None) -> dict[str, str]:
    out = {"PYTHONPATH": worker_pythonpath()}
    # The tests' span schedule (conftest) reaches Serve replicas through the runtime_env too.
    if "OTEL_BSP_SCHEDULE_DELAY" in os.environ:
        out["OTEL_BSP_SCHEDULE_DELAY"] = os.environ["OTEL_BSP_SCHEDULE_DELAY"]
    return {**out, **(env or {})}


def _runtime_env(env: Mapping[str, str], runtime_env: Mapping[str, Any] | None) -> dict[str, Any]:
    """Job runtime_env: our PYTHONPATH plus caller env vars, merged into the caller's."""
    out: dict[str, Any] = dict(runtime_env or {})
    out["env_vars"] = {"RAY_USAGE_STATS_ENABLED": "0", **env, **(out.get("env_vars") or {})}
    return out


def metrics_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/metrics"


@dataclass
class NodeInfo:
    node_id: str
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        return metrics_url(self.metrics_port)


@dataclass
class LocalCluster(RayRun):
    """Several raylets on this machine (``ray.cluster_utils.Cluster``); driver connected."""

    cluster: Any = None  # ray.cluster_utils.Cluster
    nodes: list[NodeInfo] = field(default_factory=list)  # head first, in add order

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @property
    def metrics_urls(self) -> list[str]:
        return [n.metrics_url for n in self.nodes]

    def _stop_nodes(self) -> None:
        if self.cluster is not None:
            self.cluster.shutdown()


# The run this process started last: a driver is connected to one Ray at a time, so starting
# another must end this one first.
_active: RayRun | None = None


def shutdown_active() -> None:
    """Shut down the run these helpers started, if one is still up."""
    global _active
    run, _active = _active, None
    if run is not None:
        run.shutdown()


def start_local_ray(
    tmp_path: Path,
    num_cpus: int = 4,
    metrics_port: int | None = None,
    env: Mapping[str, str] | None = None,
    *,
    auth: AuthMode = "token",
    system_config: Mapping[str, Any] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    **init_kwargs: Any,
) -> LocalRay:
    """``ray.init`` a fresh single-node Ray whose files all live under ``tmp_path``.

    ``env``: extra env vars, set in this process while Ray runs (raylet and workers inherit
    them) and added to the job ``runtime_env`` (Serve replicas get them). The job runtime_env
    always carries ``PYTHONPATH=<repo root>``. ``system_config`` is merged over
    ``FAST_METRICS_SYSTEM_CONFIG``; ``init_kwargs`` go to ``ray.init``.
    """
    global _active
    full = _env(env)
    run = _local.start_local_ray(
        tmp_path, num_cpus=num_cpus, metrics_port=metrics_port, env=full, auth=auth,
        system_config=system_config, runtime_env=_runtime_env(full, runtime_env), **init_kwargs,
    )
    _active = run
    return run


def start_cluster(
    tmp_path: Path,
    nodes: Sequence[Mapping[str, Any]] = ({"num_cpus": 2}, {"num_cpus": 2}),
    env: Mapping[str, str] | None = None,
    *,
    auth: AuthMode = "token",
    system_config: Mapping[str, Any] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    timeout: float = 60.0,
) -> LocalCluster:
    """Start one raylet per entry of ``nodes`` (the first is the head) and connect.

    Node dicts are ``RayParams`` keyword names (``num_cpus``, ``resources``,
    ``labels``, ``object_store_memory``, ``env_vars`` ...), not ``ray.init``
    ones: no leading underscores. Each node gets its own free
    ``metrics_export_port`` unless the dict names one; see ``.nodes``.
    """
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError("ray is already initialized; shut it down first")
    if not nodes:
        raise ValueError("need at least one node")
    global _active
    full = _env(env)
    sandbox = make_sandbox(tmp_path, auth, full)
    run = LocalCluster(
        sandbox=sandbox, runtime_env=_runtime_env(full, runtime_env), _env=EnvPatch(sandbox.env)
    )
    _active = run
    ports = free_ports(len(nodes))
    cluster: Any = None
    try:
        refresh_auth_cache()
        added = []
        for i, spec in enumerate(nodes):
            args: dict[str, Any] = {"metrics_export_port": ports[i], **spec}
            if i == 0:
                args.setdefault("include_dashboard", False)
                args.setdefault("temp_dir", str(sandbox.ray_temp))
                args["_system_config"] = {
                    **FAST_METRICS_SYSTEM_CONFIG,
                    **(system_config or {}),
                    **args.get("_system_config", {}),
                }
                cluster = Cluster(initialize_head=True, head_node_args=args)
                run.cluster = cluster
                added.append(cluster.head_node)
            else:
                added.append(cluster.add_node(**args))
        cluster.wait_for_nodes(timeout=timeout)
        # Cluster.connect() cannot pass a runtime_env, so connect ourselves.
        ray.init(address=cluster.address, runtime_env=run.runtime_env)
        seed_llm_registries()
        cluster.connected = True
        run.nodes = [
            NodeInfo(node_id=n.node_id, metrics_port=int(n.metrics_export_port)) for n in added
        ]
    except BaseException:
        run.shutdown()
        raise
    return run


# -- Prometheus scraping -------------------------------------------------------


def scrape(url: str, timeout: float = 5.0) -> dict[str, Samples]:
    """Fetch a Prometheus text page; ``{sample name: [(labels, value), ...]}``.

    Keys are the exact exposed sample names (``ray_foo_total``, ``ray_h_bucket``,
    ``ray_h_count``, ``ray_h_sum``), not family names.
    """
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode("utf-8")
    out: dict[str, Samples] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def select(samples: Samples, **labels: str) -> Samples:
    """Samples whose labels include all of ``labels``."""
    return [(lab, v) for lab, v in samples if all(lab.get(k) == val for k, val in labels.items())]


def wait_for_metric(
    url: str,
    name: str,
    predicate: Callable[[Samples], bool] | None = None,
    timeout: float = 30.0,
    interval: float = 0.25,
) -> Samples:
    """Scrape ``url`` until sample ``name`` exists and ``predicate(samples)`` holds.

    Connection errors count as "not yet" (the agent may still be starting).
    Returns the samples; raises TimeoutError with the closest names seen.
    """
    deadline = time.monotonic() + timeout
    last: dict[str, Samples] = {}
    last_err: Exception | None = None
    while True:
        try:
            last = scrape(url)
            last_err = None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last_err = exc
        samples = last.get(name)
        if samples and (predicate is None or predicate(samples)):
            return samples
        if time.monotonic() >= deadline:
            stem = name.split("_")[1] if name.count("_") else name
            near = sorted(k for k in last if stem in k)[:20]
            raise TimeoutError(
                f"{name} not satisfied at {url} after {timeout:.0f}s; "
                f"samples={samples!r:.500}; similar names={near}; last error={last_err!r}"
            )
        time.sleep(interval)
