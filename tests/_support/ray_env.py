"""Start real Ray (one node, or several nodes on this machine) inside a temp folder.

Ray 2.60 left to itself writes its sessions under ``/tmp/ray`` and, because token
auth is on by default for a new local cluster, a token to ``~/.ray/auth_token``.
These helpers keep both inside the test's own folder:

* ``RAY_TMPDIR=<dir>`` and ``_temp_dir``/``temp_dir=<dir>/ray`` move the session
  dirs and the ``ray_current_cluster`` file (``Cluster`` writes that one with no
  temp dir argument, so the env var is what moves it).
* ``RAY_AUTH_MODE`` is always set explicitly, so ``ray.init`` never calls its
  "enable token auth by default" path (which writes ``~/.ray/auth_token``). In
  ``token`` mode the token is written by us to ``<tmp>/auth_token`` and found
  through ``RAY_AUTH_TOKEN_PATH``; the loader then never generates one.

Environment changes are made in ``os.environ`` (the raylets and workers we start
inherit them) and undone at shutdown. Ray caches the auth mode and token in this
process, so the cache is refreshed on start and on shutdown: a later start in the
same pytest process with another token or mode then works.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from llm_otel_callbacks.demo.local_ray import seed_llm_registries
from llm_otel_callbacks.demo.ports import free_port, free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]

# Ray's emitters push metrics to the node's agent every metrics_report_interval_ms
# (floored at 1000 ms); the default is 10 s. 1 s makes a counter incremented in a
# task visible on the export port about 1 s later.
FAST_METRICS_SYSTEM_CONFIG: dict[str, Any] = {"metrics_report_interval_ms": 1000}

AuthMode = Literal["token", "disabled"]
Samples = list[tuple[dict[str, str], float]]

# AF_UNIX socket paths must stay under 108 bytes. Ray puts sockets at
# <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store.<n> (~65 bytes
# after <temp>), so a longer temp dir is replaced by a short one under /tmp.
_MAX_RAY_TEMP_LEN = 40


def worker_pythonpath() -> str:
    """PYTHONPATH for Ray workers: the repo root (for ``llm_otel_callbacks`` and
    ``tests._support``) ahead of whatever this process already had."""
    parts = [str(REPO_ROOT)]
    parts += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))  # dedupe, keep order


def _refresh_ray_auth_cache() -> None:
    """Make this process re-read RAY_AUTH_* (Ray caches config and token in C++).

    Config first, then the token cache: the order Ray's own test utils use so a
    still-draining gRPC thread does not reload a token while in token mode.
    """
    from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


class _EnvPatch:
    """Set env vars now, put the old values back on ``restore()``."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)

    def restore(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved = {}


@dataclass
class _Sandbox:
    """Where one Ray instance keeps its files, and the env that points Ray there."""

    root: Path  # the caller's tmp dir: token file, and a link to a short ray dir
    ray_temp: Path  # Ray's temp dir (sessions, logs, sockets)
    owned_short_dir: Path | None  # created by us under /tmp; removed at shutdown
    env: dict[str, str]


def _make_sandbox(tmp_path: Path, auth: AuthMode, extra_env: Mapping[str, str] | None) -> _Sandbox:
    root = Path(tmp_path).resolve()
    root.mkdir(parents=True, exist_ok=True)
    base: Path = root
    owned: Path | None = None
    if len(str(root / "ray")) > _MAX_RAY_TEMP_LEN:
        owned = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        base = owned
        link = root / "ray-temp"
        if not link.exists():
            link.symlink_to(owned)  # so the logs can be found from tmp_path
    env = {
        # Default Ray temp dir (= $RAY_TMPDIR/ray) for code that ignores _temp_dir.
        "RAY_TMPDIR": str(base),
        "RAY_AUTH_MODE": auth,
        "RAY_USAGE_STATS_ENABLED": "0",  # no usage-stats reporting attempts
        "PYTHONPATH": worker_pythonpath(),
    }
    if auth == "token":
        token_file = root / "auth_token"
        if not token_file.exists():
            token_file.write_text(secrets.token_hex(16))
        env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    env.update(extra_env or {})
    return _Sandbox(root=root, ray_temp=base / "ray", owned_short_dir=owned, env=env)


def _runtime_env(env: Mapping[str, str], runtime_env: Mapping[str, Any] | None) -> dict[str, Any]:
    """Job runtime_env: our PYTHONPATH plus caller env vars, merged into the caller's."""
    out: dict[str, Any] = dict(runtime_env or {})
    env_vars = {"PYTHONPATH": env["PYTHONPATH"]}
    env_vars.update({k: v for k, v in env.items() if not k.startswith(("RAY_TMPDIR", "RAY_AUTH"))})
    env_vars.update(out.get("env_vars") or {})
    out["env_vars"] = env_vars
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


_RunT = TypeVar("_RunT", bound="_RayRun")


@dataclass
class _RayRun:
    """What local and cluster runs share: files, env, and an idempotent shutdown."""

    sandbox: _Sandbox
    runtime_env: dict[str, Any]  # the job runtime_env given to ray.init
    _env: _EnvPatch | None = field(default=None, repr=False)

    @property
    def temp_dir(self) -> Path:
        """Ray's temp dir (``session_latest/logs`` lives under it)."""
        return self.sandbox.ray_temp

    @property
    def logs_dir(self) -> Path:
        return self.sandbox.ray_temp / "session_latest" / "logs"

    @property
    def running(self) -> bool:
        return self._env is not None

    def _stop_nodes(self) -> None:
        """Stop processes ``ray.shutdown()`` does not (cluster raylets)."""

    def shutdown(self) -> None:
        """Disconnect, stop Ray, restore the env. Safe to call twice."""
        global _active
        if self._env is None:
            return
        import ray

        if _active is self:
            _active = None
        try:
            # Driver first: Cluster.remove_node refuses to kill the node the
            # driver is connected to.
            ray.shutdown()
            self._stop_nodes()
        finally:
            self._env.restore()
            self._env = None
            _refresh_ray_auth_cache()
            self._drop_short_dir()

    def _drop_short_dir(self) -> None:
        """Copy the logs of a /tmp short dir into tmp_path (pytest keeps that for
        debugging), then delete the short dir and its link."""
        short = self.sandbox.owned_short_dir
        if short is None:
            return
        logs = short / "ray" / "session_latest" / "logs"
        link = self.sandbox.root / "ray-temp"
        if link.is_symlink():
            link.unlink()
        with contextlib.suppress(OSError):
            shutil.copytree(logs, self.sandbox.root / "ray-logs", symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(short, ignore_errors=True)

    def __enter__(self: _RunT) -> _RunT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


@dataclass
class LocalRay(_RayRun):
    """A single-node Ray started by ``start_local_ray``; the driver is connected."""

    address: str = ""  # GCS address
    node_id: str = ""
    metrics_port: int = 0

    @property
    def metrics_url(self) -> str:
        return metrics_url(self.metrics_port)


@dataclass
class LocalCluster(_RayRun):
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


# The run this process started last and has not shut down: a driver is connected
# to one Ray at a time, so starting another must end this one first.
_active: _RayRun | None = None


def _set_active(run: _RayRun) -> None:
    global _active
    _active = run


def shutdown_active() -> None:
    """Shut down the run these helpers started, if one is still up."""
    if _active is not None:
        _active.shutdown()


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

    ``metrics_port``: Ray's Prometheus export port (a free one if None).
    ``env``: extra env vars, set in this process while Ray runs (raylet and
    workers inherit them) and added to the job ``runtime_env`` (Serve replicas
    get them). The job runtime_env always carries ``PYTHONPATH=<repo root>``.
    ``system_config`` is merged over ``FAST_METRICS_SYSTEM_CONFIG``.
    ``init_kwargs`` go to ``ray.init`` as is (e.g. ``object_store_memory``).
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("ray is already initialized; shut it down first")
    sandbox = _make_sandbox(tmp_path, auth, env)
    port = metrics_port or free_port()
    patch = _EnvPatch(sandbox.env)
    run = LocalRay(sandbox=sandbox, runtime_env=_runtime_env(sandbox.env, runtime_env), _env=patch)
    _set_active(run)
    try:
        _refresh_ray_auth_cache()
        ctx = ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=str(sandbox.ray_temp),
            _metrics_export_port=port,
            _system_config={**FAST_METRICS_SYSTEM_CONFIG, **(system_config or {})},
            runtime_env=run.runtime_env,
            **init_kwargs,
        )
        seed_llm_registries()
        run.address = str(ctx.address_info["gcs_address"])  # type: ignore[attr-defined]
        run.node_id = ray.get_runtime_context().get_node_id()
        run.metrics_port = port
    except BaseException:
        run.shutdown()
        raise
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
    sandbox = _make_sandbox(tmp_path, auth, env)
    patch = _EnvPatch(sandbox.env)
    run = LocalCluster(
        sandbox=sandbox, runtime_env=_runtime_env(sandbox.env, runtime_env), _env=patch
    )
    _set_active(run)
    ports = free_ports(len(nodes))
    cluster: Any = None
    try:
        _refresh_ray_auth_cache()
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


@contextlib.contextmanager
def local_ray(tmp_path: Path, **kwargs: Any) -> Iterator[LocalRay]:
    run = start_local_ray(tmp_path, **kwargs)
    try:
        yield run
    finally:
        run.shutdown()


@contextlib.contextmanager
def local_cluster(tmp_path: Path, **kwargs: Any) -> Iterator[LocalCluster]:
    run = start_cluster(tmp_path, **kwargs)
    try:
        yield run
    finally:
        run.shutdown()


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
