"""A local Ray whose files all stay in one folder, and that leaves nothing behind.

Left to itself, Ray 2.60 writes sessions under ``/tmp/ray`` and, because token authentication
is on by default for a new local cluster, a token under the home directory. Here:

* ``RAY_TMPDIR`` and ``ray.init(_temp_dir=...)`` put the session in ``<folder>/ray`` (or, when
  that path is too long for Ray's unix sockets, in a short folder under ``/tmp`` linked from
  ``<folder>/ray``);
* ``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN_PATH=<folder>/auth_token`` keeps the token in
  the folder (an explicit mode means Ray never writes its default token);
* a marker variable inherited by every process Ray starts lets :meth:`LocalRay.leftovers` find
  any that outlive ``ray.shutdown()``.

Environment changes are made in ``os.environ`` (Ray's processes inherit them) and undone by
:meth:`LocalRay.shutdown`, which also removes the session folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ports import free_port

MARKER_VAR = "LLM_OTEL_LOCAL_RAY_RUN"
# AF_UNIX socket paths must stay under 108 bytes; Ray adds about 65 after its temp dir.
_MAX_TEMP_LEN = 40


def _refresh_auth_cache() -> None:
    """Ray caches the auth mode and token per process (C++): re-read them after a change, so
    a second Ray in the same process (tests) works."""
    try:
        from ray._raylet import (  # type: ignore[attr-defined]
            AuthenticationTokenLoader,
            Config,
        )
    except ImportError:  # a Ray without token auth
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@dataclass
class LocalRay:
    """A running local Ray started by :func:`start_local_ray`; the driver is connected."""

    folder: Path
    temp_root: Path
    """``RAY_TMPDIR``: Ray's temp dir is ``temp_root / "ray"``."""
    short_dir: Path | None
    metrics_port: int
    run_id: str
    node_id: str = ""
    _saved_env: dict[str, str | None] = field(default_factory=dict, repr=False)
    _up: bool = field(default=True, repr=False)

    @property
    def temp_dir(self) -> Path:
        return self.temp_root / "ray"

    @property
    def logs_dir(self) -> Path:
        return self.temp_dir / "session_latest" / "logs"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def leftovers(self) -> list[int]:
        """Pids of live processes started by this Ray (they carry the marker variable)."""
        return _marked_processes(self.run_id)

    def shutdown(self, keep_logs_in: Path | None = None, grace_s: float = 20.0) -> list[int]:
        """Stop Ray, wait for its processes to end (killing stragglers it started), restore
        the environment, remove the session. Returns the pids that had to be killed."""
        if not self._up:
            return []
        self._up = False
        import ray

        killed: list[int] = []
        try:
            ray.shutdown()
            killed = _reap(self.run_id, grace_s)
        finally:
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            with contextlib.suppress(Exception):
                _refresh_auth_cache()
            if keep_logs_in is not None:
                with contextlib.suppress(OSError):
                    shutil.copytree(self.logs_dir, keep_logs_in, symlinks=True,
                                    dirs_exist_ok=True)
            self._remove_session()
        return killed

    def _remove_session(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        link = self.folder / "ray"
        if self.short_dir is not None:
            if link.is_symlink():
                link.unlink()
            shutil.rmtree(self.short_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.folder / "auth_token").unlink()


def start_local_ray(
    folder: Path,
    *,
    num_cpus: int = 4,
    env: Mapping[str, str] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    system_config: Mapping[str, Any] | None = None,
    logging_level: int = logging.INFO,
) -> LocalRay:
    """``ray.init`` a fresh single-node Ray whose session and token live under ``folder``.

    ``env`` is set in this process while Ray runs (Ray's processes inherit it).
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    short: Path | None = None
    temp_root = folder
    if len(str(folder / "ray")) > _MAX_TEMP_LEN:
        short = Path(tempfile.mkdtemp(prefix="llmotel-", dir="/tmp"))
        temp_root = short
        link = folder / "ray"
        if link.is_symlink() or link.exists():
            _remove_path(link)
        link.symlink_to(short / "ray")
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    run_id = secrets.token_hex(8)
    values = {
        "RAY_TMPDIR": str(temp_root),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        MARKER_VAR: run_id,
        **dict(env or {}),
    }
    port = free_port()
    run = LocalRay(folder=folder, temp_root=temp_root, short_dir=short, metrics_port=port,
                   run_id=run_id, _saved_env={k: os.environ.get(k) for k in values})
    os.environ.update(values)
    try:
        _refresh_auth_cache()
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging_level,
            _temp_dir=str(temp_root / "ray"),
            _metrics_export_port=port,
            _system_config=dict(system_config or {}),
            runtime_env=dict(runtime_env or {}),
        )
        seed_llm_registries()
        run.node_id = ray.get_runtime_context().get_node_id()
    except BaseException:
        run.shutdown()
        raise
    return run


def seed_llm_registries() -> None:
    """Write this process's Ray LLM component registrations into the connected cluster.

    Ray 2.60's LLM registries (``ray/llm/_internal/serve/utils/registry.py``) live in the
    cluster's KV store: a process registers the built-in KV-connector backends when it imports
    Ray's ``LLMConfig`` and flushes them once, at its first ``ray.init``. A process that starts
    a second cluster (tests, a demo after a test) has nothing left to flush, so the new
    cluster's store is empty, and two fresh workers that import ``LLMConfig`` at once (the
    per-node download tasks) race: check, check, put, put, and the second raises "already
    registered", failing Ray's ``initialize_node``. Seeding the store first removes the race.
    Uses Ray private names; does nothing if they move.
    """
    try:
        from ray import cloudpickle
        from ray.experimental.internal_kv import (
            _internal_kv_exists,
            _internal_kv_initialized,
            _internal_kv_put,
        )
        from ray.llm._internal.serve.engines.vllm.kv_transfer import factory  # noqa: F401
        from ray.llm._internal.serve.utils import registry
    except Exception:
        return
    if not _internal_kv_initialized():  # type: ignore[no-untyped-call]
        return
    for reg in list(getattr(registry, "_registries", {}).values()):
        for name, loader in list(getattr(reg, "_loader_cache", {}).items()):
            try:
                key = registry._make_key(reg.category, name)
                if not _internal_kv_exists(key):
                    _internal_kv_put(
                        key, cloudpickle.dumps(loader), overwrite=False  # type: ignore[no-untyped-call]
                    )
            except Exception as exc:  # never fail a start over this
                logging.getLogger(__name__).debug("registry %s not seeded: %s", name, exc)


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


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
