"""A local Ray whose files all stay in one folder, and that leaves nothing behind.

The one local-Ray helper of the demo, the tests and the benchmarks (the tests' multi-node
variant, ``tests/_support/ray_env.py``, builds on :func:`make_sandbox` and :class:`RayRun`).
Left to itself, Ray writes sessions under ``/tmp/ray`` and, because token authentication is on
by default for a new local cluster, a token under the home directory. Here:

* ``RAY_TMPDIR`` and ``ray.init(_temp_dir=...)`` put the session in ``<folder>/ray`` (or, when
  that path is too long for Ray's unix sockets, in a short ``/tmp/llmotel-*`` folder linked
  from ``<folder>/ray-temp``);
* ``RAY_AUTH_MODE`` is always explicit, so Ray never writes its default token; in ``token``
  mode the token (0600) is ``<folder>/auth_token``, found through ``RAY_AUTH_TOKEN_PATH``;
* a marker variable inherited by every process Ray starts lets :meth:`RayRun.leftovers` find
  any that outlive ``ray.shutdown()``.

Environment changes are made in ``os.environ`` (Ray's processes inherit them) and undone by
:meth:`RayRun.shutdown`. Ray caches the auth mode and token per process, so the cache is
re-read on start and on shutdown: a later start in the same process works.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

# Ray internals (auth cache, LLM registries) live in the Ray boundary; re-exported for the tests.
from .._ray import refresh_auth_cache, seed_llm_registries
from .ports import free_port

MARKER_VAR = "LLM_OTEL_LOCAL_RAY_RUN"
# AF_UNIX socket paths must stay under 108 bytes; Ray adds about 65 after its temp dir.
_MAX_TEMP_LEN = 40
# Ray's emitters push metrics to the node's agent every metrics_report_interval_ms (default
# 10 s); 1 s makes a metric recorded in a task visible on the export port about 1 s later.
FAST_METRICS_SYSTEM_CONFIG: dict[str, Any] = {"metrics_report_interval_ms": 1000}

AuthMode = Literal["token", "disabled"]


def pythonpath(*first: Path) -> str:
    """``PYTHONPATH`` for Ray's workers: ``first`` ahead of what this process already has, so
    a replica imports the repository's modules (the demo's examples, ``tests.*``,
    ``benchmarks.*``)."""
    parts = [str(p) for p in first]
    parts += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))  # dedupe, keep order


class EnvPatch:
    """Set env vars now, put the old values back on ``restore()``."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)

    def restore(self) -> None:
        saved, self._saved = self._saved, {}
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        for key in (k for k, v in saved.items() if v is None):
            os.environ.pop(key, None)


@dataclass
class Sandbox:
    """Where one Ray keeps its files, and the env that points Ray there."""

    root: Path  # the caller's folder: token file, and a link to a short ray dir
    ray_temp: Path  # Ray's temp dir (sessions, logs, sockets)
    owned_short_dir: Path | None  # created under /tmp when root is too long; removed at the end
    env: dict[str, str]
    run_id: str  # the marker variable's value
    #: What make_sandbox created in the caller's folder; only these are ever removed.
    created: list[Path] = field(default_factory=list)
    token: Path | None = None


def make_sandbox(
    folder: Path, auth: AuthMode = "token", extra_env: Mapping[str, str] | None = None
) -> Sandbox:
    """Make the folder (and a short /tmp dir if needed) and the env for a Ray living there.

    Nothing already in ``folder`` is used or removed: when ``ray``, ``ray-temp`` or
    ``auth_token`` is there already (a user's own, or another run's), the sandbox goes in a
    private subfolder it creates. :attr:`Sandbox.created` lists what it made."""
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    if any(os.path.lexists(root / name) for name in ("ray", "ray-temp", "auth_token")):
        root = Path(tempfile.mkdtemp(prefix="run-", dir=root))
        created.append(root)
    base = root
    owned: Path | None = None
    if len(str(root / "ray")) > _MAX_TEMP_LEN:
        owned = Path(tempfile.mkdtemp(prefix="llmotel-", dir="/tmp"))
        base = owned
        link = root / "ray-temp"
        link.symlink_to(owned)  # so the logs can be found from the folder
        created.append(link)
    else:
        created.append(root / "ray")  # Ray makes it; it was not there
    run_id = secrets.token_hex(8)
    env = {
        "RAY_TMPDIR": str(base),  # Ray's default temp dir for code that ignores _temp_dir
        "RAY_AUTH_MODE": auth,
        "RAY_USAGE_STATS_ENABLED": "0",
        MARKER_VAR: run_id,
    }
    token: Path | None = None
    if auth == "token":
        token = root / "auth_token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(16))
        created.append(token)
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    env.update(extra_env or {})
    return Sandbox(root=root, ray_temp=base / "ray", owned_short_dir=owned, env=env,
                   run_id=run_id, created=created, token=token)


_RunT = TypeVar("_RunT", bound="RayRun")


@dataclass
class RayRun:
    """A Ray started in a sandbox: its files, env, and an idempotent shutdown.

    ``clean``: shutdown removes Ray's session and the token too (the demo); otherwise the
    session stays in the folder for debugging (a short /tmp dir's logs are copied to
    ``<folder>/ray-logs``).
    """

    sandbox: Sandbox
    runtime_env: dict[str, Any]  # the job runtime_env given to ray.init
    _env: EnvPatch | None = field(default=None, repr=False)
    clean: bool = False

    @property
    def folder(self) -> Path:
        return self.sandbox.root

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

    def leftovers(self) -> list[int]:
        """Pids of live processes started by this Ray (they carry the marker variable)."""
        return _marked_processes(self.sandbox.run_id)

    def _stop_nodes(self) -> None:
        """Stop processes ``ray.shutdown()`` does not (a cluster's raylets)."""

    def shutdown(self, keep_logs_in: Path | None = None, grace_s: float | None = None) -> list[int]:
        """Disconnect, stop Ray, restore the env, drop the files. Safe to call twice.

        ``grace_s``: wait that long for Ray's processes to exit, then kill the stragglers it
        started; returns their pids. ``keep_logs_in``: copy Ray's logs there first.
        """
        if self._env is None:
            return []
        import ray

        killed: list[int] = []
        try:
            # Driver first: Cluster.remove_node refuses to kill the node the driver is on.
            ray.shutdown()
            self._stop_nodes()
            if grace_s is not None:
                killed = _reap(self.sandbox.run_id, grace_s)
        finally:
            self._env.restore()
            self._env = None
            with contextlib.suppress(Exception):
                refresh_auth_cache()
            if keep_logs_in is not None:
                with contextlib.suppress(OSError):
                    shutil.copytree(self.logs_dir, keep_logs_in, symlinks=True,
                                    dirs_exist_ok=True)
            self._drop_files()
        return killed

    def _drop_files(self) -> None:
        root, short = self.sandbox.root, self.sandbox.owned_short_dir
        created = self.sandbox.created
        if short is not None:
            link = root / "ray-temp"
            if link in created and link.is_symlink():
                link.unlink()
            if not self.clean:  # keep the logs with the folder (pytest keeps that)
                with contextlib.suppress(OSError):
                    shutil.copytree(short / "ray" / "session_latest" / "logs",
                                    root / "ray-logs", symlinks=True, dirs_exist_ok=True)
            shutil.rmtree(short, ignore_errors=True)
        if self.clean:  # only what make_sandbox created, newest first
            for path in reversed(created):
                if path.is_symlink() or path.is_file():
                    with contextlib.suppress(OSError):
                        path.unlink()
                else:
                    shutil.rmtree(path, ignore_errors=True)

    def __enter__(self: _RunT) -> _RunT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


@dataclass
class LocalRay(RayRun):
    """A single-node Ray started by :func:`start_local_ray`; the driver is connected."""

    address: str = ""  # GCS address
    node_id: str = ""
    metrics_port: int = 0

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def start_local_ray(
    folder: Path,
    *,
    num_cpus: int = 4,
    metrics_port: int | None = None,
    env: Mapping[str, str] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    system_config: Mapping[str, Any] | None = None,
    auth: AuthMode = "token",
    clean: bool = False,
    **init_kwargs: Any,
) -> LocalRay:
    """``ray.init`` a fresh single-node Ray whose session and token live under ``folder``.

    ``env`` is set in this process while Ray runs (Ray's processes inherit it);
    ``system_config`` is merged over :data:`FAST_METRICS_SYSTEM_CONFIG`; ``metrics_port`` is
    Ray's Prometheus export port (a free one if None); ``init_kwargs`` go to ``ray.init``.
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process; shut it down first")
    sandbox = make_sandbox(folder, auth, env)
    port = metrics_port or free_port()
    run = LocalRay(sandbox=sandbox, runtime_env=dict(runtime_env or {}),
                   _env=EnvPatch(sandbox.env), clean=clean)
    try:
        refresh_auth_cache()
        info = ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=str(sandbox.ray_temp),
            _metrics_export_port=port,
            _system_config={**FAST_METRICS_SYSTEM_CONFIG, **(system_config or {})},
            runtime_env=run.runtime_env,
            **init_kwargs,
        )
        seed_llm_registries()
        run.address = str(info.address_info["gcs_address"])  # type: ignore[attr-defined]
        run.node_id = ray.get_runtime_context().get_node_id()
        run.metrics_port = port
    except BaseException:
        run.shutdown()
        raise
    return run


def _marked_processes(run_id: str) -> list[int]:
    needle = f"{MARKER_VAR}={run_id}".encode()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return sorted(found)


def _reap(run_id: str, grace_s: float) -> list[int]:
    """Wait for Ray's processes to exit; SIGKILL the ones still there after ``grace_s``."""
    if not os.path.isdir("/proc"):
        return []
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _marked_processes(run_id):
            return []
        time.sleep(0.5)
    stragglers = _marked_processes(run_id)
    for pid in stragglers:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return stragglers
