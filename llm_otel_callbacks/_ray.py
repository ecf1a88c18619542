"""The Ray boundary: every Ray name this package uses that is not Ray's stable public API.

A Ray upgrade touches this file only. Each accessor says what it needs from Ray and what
happens when that is missing: a fallback (the feature degrades, with a log line), or
:class:`UnsupportedRayError`, which names the supported Ray range. ``tests/test_ray_boundary.py``
resolves every accessor against the installed Ray.

The supported range is declared in ``_instruments`` and checked when this module is imported
(the first Ray-facing name used: ``RayServeLLMCallback``, ``Composite``, a built-in, the serve
classes; ``import llm_otel_callbacks`` alone loads no Ray), the way
opentelemetry-instrumentation declares and checks its ``_instruments``
(``get_dependency_conflicts``). Outside the range the import fails with one message, unless
``LLM_OTEL_CALLBACKS_SKIP_RAY_CHECK=1`` is set (then it is a warning, as OTel's
``skip_dep_check``). Public Ray names (``ray.serve.llm``, ``ray.serve.get_replica_context``,
``ray.util.*``, ``ray.get_runtime_context``) are used directly elsewhere.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

logger = logging.getLogger(__name__)

#: The Ray this package supports (pip requirement syntax), as in OTel's ``package.py``.
_instruments = ("ray[serve] >= 2.59, < 3",)
#: The Ray releases CI runs the tests on (the real-Ray subset on the oldest one).
TESTED_RAY_VERSIONS = ("2.59.0", "2.60.0")
#: Set to 1 to import with a Ray outside the range anyway (a warning instead of an error).
SKIP_CHECK_ENV = "LLM_OTEL_CALLBACKS_SKIP_RAY_CHECK"


class UnsupportedRayError(ImportError):
    """The installed Ray lacks something this package needs; the message names the range."""


@dataclass(frozen=True)
class RayVersionConflict:
    """What ``get_dependency_conflicts`` reports: the requirement, and what was found."""

    required: str
    found: str | None

    def __str__(self) -> str:
        found = "no ray installed" if self.found is None else f"ray {self.found}"
        return f'requested "{self.required}" but found {found}'


def installed_ray_version() -> str | None:
    """The installed Ray distribution's version, or None when Ray is not installed."""
    try:
        return metadata.version("ray")
    except metadata.PackageNotFoundError:
        return None


def ray_version_conflict(
    version: str | None, requirements: tuple[str, ...] = _instruments
) -> RayVersionConflict | None:
    """The first requirement Ray ``version`` (None: not installed) does not meet, or None."""
    from packaging.requirements import Requirement

    for text in requirements:
        if version is None or not Requirement(text).specifier.contains(version, prereleases=True):
            return RayVersionConflict(text, version)
    return None


def supported_range_text() -> str:
    tested = ", ".join(TESTED_RAY_VERSIONS)
    return f"{' and '.join(_instruments)} (tested on Ray {tested})"


def check_ray_version(version: str | None) -> None:
    """Raise :class:`UnsupportedRayError` for a Ray ``version`` outside ``_instruments`` (a
    warning instead with ``LLM_OTEL_CALLBACKS_SKIP_RAY_CHECK=1``). Runs at import."""
    conflict = ray_version_conflict(version)
    if conflict is None:
        return
    message = (
        f"llm-otel-callbacks supports {supported_range_text()}: {conflict}. Install a "
        f"supported Ray (pip install 'ray[serve]>=2.59,<3'), or set {SKIP_CHECK_ENV}=1 to try "
        "this one anyway (see docs/ray-versions.md)."
    )
    if os.environ.get(SKIP_CHECK_ENV, "").strip().lower() in ("1", "true", "yes"):
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    raise UnsupportedRayError(message)


def _unsupported(what: str, exc: BaseException) -> UnsupportedRayError:
    return UnsupportedRayError(
        f"llm-otel-callbacks: this Ray has no {what} ({type(exc).__name__}: {exc}); "
        f"supported: {supported_range_text()}."
    )


check_ray_version(installed_ray_version())

# --- Ray's callback API ------------------------------------------------------------------------
# Needs: CallbackBase, CallbackConfig, CallbackCtx. Ray 2.59-2.60 have them in
# ``ray.llm._internal.common.callbacks.base``; a newer Ray may only have the public
# ``ray.serve.llm.callbacks``. The internal module is tried first: trying the public one first
# imports the ``ray.serve.llm`` package, which imports vLLM (~10 s of a replica's start,
# measured by benchmarks/startup_overhead.py), even where that submodule does not exist.
# Missing both: UnsupportedRayError (nothing works without them).
try:
    from ray.llm._internal.common.callbacks import base as _api
except ImportError:
    try:
        from ray.serve.llm import callbacks as _api  # type: ignore[attr-defined,no-redef,unused-ignore]
    except ImportError as _exc:
        raise _unsupported("LLM callback API (CallbackBase)", _exc) from _exc

# Typed loosely, as the public module was: Ray's hook stubs are declared async, ours may be
# sync (Ray runs both).
CallbackBase: Any = _api.CallbackBase
CallbackConfig: Any = _api.CallbackConfig
CallbackCtx: Any = _api.CallbackCtx

# Upstream's public CallbackBase subclasses the internal one, and Ray's own callbacks (its
# CloudDownloader among them) are built on the internal class: accept both.
def _bases() -> tuple[type, ...]:
    found: list[type] = [CallbackBase]
    try:
        from ray.llm._internal.common.callbacks.base import CallbackBase as internal

        found.append(internal)
    except ImportError:  # a Ray that dropped the internal module
        pass
    # Importing ray.serve.llm.callbacks imports the ray.serve.llm package, and with it vLLM and
    # torch (~10 s in every process that unpickles a callback): only where the module exists.
    if _public_callbacks_module_exists():
        try:
            from ray.serve.llm.callbacks import (  # type: ignore[attr-defined,unused-ignore]
                CallbackBase as public,
            )

            found.append(public)
        except ImportError:
            pass
    return tuple(dict.fromkeys(found))


def _public_callbacks_module_exists() -> bool:
    """Whether this Ray ships ``ray.serve.llm.callbacks`` (Ray 2.59-2.60 do not), looked up
    on disk so that the answer costs no import of ``ray.serve.llm``."""
    import ray

    for root in getattr(ray, "__path__", ()):
        folder = os.path.join(root, "serve", "llm")
        if os.path.isfile(os.path.join(folder, "callbacks.py")) or os.path.isfile(
            os.path.join(folder, "callbacks", "__init__.py")
        ):
            return True
    return False


CALLBACK_BASES: tuple[type, ...] = _bases()
"""Every class a Ray-style callback may derive from (public and internal)."""

__all__ = [
    "CALLBACK_BASES",
    "TESTED_RAY_VERSIONS",
    "CallbackBase",
    "CallbackConfig",
    "CallbackCtx",
    "ReplicaInfo",
    "UnsupportedRayError",
    "chain_worker_sigterm_exit",
    "check_ray_version",
    "cloud_file_system",
    "error_response_classes",
    "handle_callback_error",
    "hook_method",
    "installed_ray_version",
    "llm_server_class",
    "llm_server_config",
    "node_model_downloadable",
    "openai_ingress_class",
    "raw_request_info_class",
    "ray_version_conflict",
    "refresh_auth_cache",
    "replica_info",
    "resources_per_node",
    "seed_llm_registries",
]


def hook_method(callback: Any, name: str) -> tuple[Any, bool]:
    """``(bound hook, is_async)``; AttributeError when the callback lacks the hook.

    Needs: Ray's private ``CallbackBase._get_method`` (so Ray's own lookup and message are
    used). Missing: the same lookup done here (getattr + ``inspect.iscoroutinefunction``)."""
    get = getattr(callback, "_get_method", None)
    if get is not None:
        found: tuple[Any, bool] = get(name)
        return found
    if not hasattr(callback, name):
        raise AttributeError(f"Callback {type(callback).__name__} does not have method '{name}'")
    method = getattr(callback, name)
    return method, inspect.iscoroutinefunction(method)


def handle_callback_error(callback: Any, hook: str, error: BaseException) -> None:
    """Ray's raise-or-log for a failed hook: raise (chained) under ``raise_error_on_callback``,
    else log at ERROR.

    Needs: Ray's private ``CallbackBase._handle_callback_error`` (Ray's exact message).
    Missing: the same behaviour and message done here."""
    handle = getattr(callback, "_handle_callback_error", None)
    if handle is not None:
        handle(hook, error)
        return
    message = f"Error running callback method '{hook}' on {type(callback).__name__}: {error}"
    if getattr(callback, "raise_error_on_callback", True):
        raise Exception(message) from error
    logging.getLogger("ray.llm").error(message)


def node_model_downloadable() -> Any:
    """Ray's ``NodeModelDownloadable`` enum (imported lazily: it pulls in torch).

    Needs: ``ray.llm._internal.common.utils.download_utils``. Missing: UnsupportedRayError
    (the values are what ``ctx.worker_node_download_model`` takes)."""
    try:
        from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable
    except ImportError as exc:
        raise _unsupported("NodeModelDownloadable", exc) from exc
    return NodeModelDownloadable


def cloud_file_system() -> Any:
    """Ray's ``CloudFileSystem`` (S3/GCS/Azure reads used by its model downloader).

    Needs: ``ray.llm._internal.common.utils.cloud_utils``. Missing: UnsupportedRayError;
    DownloadPolicy's cache rule treats any error as "cache unknown" and keeps Ray's choice."""
    try:
        from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem
    except ImportError as exc:
        raise _unsupported("CloudFileSystem", exc) from exc
    return CloudFileSystem


def llm_server_class() -> Any:
    """Ray's ``LLMServer`` deployment class (imported lazily: it needs vLLM).

    Public ``ray.serve.llm.LLMServer`` (2.59+); else the internal module; else
    UnsupportedRayError."""
    try:
        from ray.serve.llm import LLMServer  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        try:
            from ray.llm._internal.serve.core.server.llm_server import (  # type: ignore[assignment]
                LLMServer,
            )
        except ImportError as exc:
            raise _unsupported("LLMServer", exc) from exc
    return LLMServer


def llm_server_config(server: Any) -> Any | None:
    """The ``LLMConfig`` an ``LLMServer`` was built with, or None.

    Needs: the private ``LLMServer._llm_config`` attribute. Missing: None, and
    ObservedLLMServer then starts as Ray's LLMServer, unobserved, with a warning."""
    return getattr(server, "_llm_config", None)


#: The private OpenAiIngress method every endpoint's engine results pass through.
INGRESS_RESPONSE_METHOD = "_get_response"


def openai_ingress_class() -> tuple[Any, bool]:
    """``(OpenAiIngress, has_response_hook)``: Ray's public ingress class, and whether it has
    the private ``_get_response`` async generator that ObservedOpenAiIngress wraps.

    Needs: public ``ray.serve.llm.ingress.OpenAiIngress`` (else the internal module, else
    UnsupportedRayError) and its private ``_get_response``. Missing ``_get_response``: the
    ingress is Ray's unchanged (a rejection is Ray's JSON error, without ``Retry-After``)."""
    try:
        from ray.serve.llm.ingress import OpenAiIngress
    except ImportError:
        try:
            from ray.llm._internal.serve.core.ingress.ingress import (  # type: ignore[assignment]
                OpenAiIngress,
            )
        except ImportError as exc:
            raise _unsupported("OpenAiIngress", exc) from exc
    method = getattr(OpenAiIngress, INGRESS_RESPONSE_METHOD, None)
    return OpenAiIngress, inspect.isasyncgenfunction(method)


def error_response_classes() -> tuple[Any, Any]:
    """``(ErrorResponse, ErrorInfo)``: the error an engine yields in place of a response.

    Needs: public ``ray.serve.llm.openai_api_models.ErrorResponse`` (``ErrorInfo`` is the type of
    its ``error`` field); else the internal module; else UnsupportedRayError."""
    try:
        from ray.serve.llm.openai_api_models import ErrorResponse
    except ImportError:
        try:
            from ray.llm._internal.serve.core.configs.openai_api_models import (  # type: ignore[assignment]
                ErrorResponse,
            )
        except ImportError as exc:
            raise _unsupported("ErrorResponse", exc) from exc
    try:
        info = ErrorResponse.model_fields["error"].annotation
    except (AttributeError, KeyError) as exc:
        raise _unsupported("ErrorResponse.error field", exc) from exc
    return ErrorResponse, info


def raw_request_info_class() -> Any | None:
    """Ray's ``RawRequestInfo`` (the request headers ``LLMServer`` hands the engine), or None.

    Needs: ``ray.llm._internal.serve.core.protocol.RawRequestInfo`` (a dataclass with
    ``headers``). Missing: None; a request that came with no ``RawRequestInfo`` then reaches
    vLLM without our trace headers (vLLM's request span starts its own trace)."""
    try:
        from ray.llm._internal.serve.core.protocol import RawRequestInfo
    except ImportError as exc:
        logger.debug("no RawRequestInfo: %s", exc)
        return None
    return RawRequestInfo


@dataclass(frozen=True)
class ReplicaInfo:
    """Which Serve replica this process is."""

    app_name: str
    deployment: str
    replica_id: str


def replica_info() -> ReplicaInfo | None:
    """This process's Serve replica, or None outside a replica.

    Uses public ``ray.serve.get_replica_context()`` (it raises outside a replica). Missing or
    failing: None (spans lack the Serve app/deployment/replica attributes)."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return ReplicaInfo(str(ctx.app_name), str(ctx.deployment), str(ctx.replica_id.unique_id))
    except Exception:  # RayServeException outside a replica
        return None


def resources_per_node() -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]] | None:
    """``(available, total)`` resources per live node id, or None.

    Needs: ``ray._private.state`` (``available_resources_per_node``,
    ``total_resources_per_node``; a developer API). Missing: None, and CustomPlacementGroup's
    timeout diagnostic uses the cluster-wide sums instead."""
    try:
        from ray._private import state

        developer_api: Any = state
        return (dict(developer_api.available_resources_per_node()),
                dict(developer_api.total_resources_per_node()))
    except Exception as exc:
        logger.debug("per-node resources unavailable: %s", exc)
        return None


#: Ray's SIGTERM handler in a worker calls this ``ray._private.worker`` function by name.
_RAY_EXIT_NAME = "raise_sys_exit_with_custom_error_message"


def chain_worker_sigterm_exit(before: Callable[[], None]) -> bool:
    """In a Ray worker process, make Ray's SIGTERM handler call ``before()`` first.

    Needs: ``ray._private.worker`` (``global_worker.mode``, ``WORKER_MODE``, and the
    ``raise_sys_exit_with_custom_error_message`` its SIGTERM handler looks up at each call).
    Returns False (nothing changed) in a driver or plain process, or when Ray's handler is not
    the one expected; telemetry then flushes at ``atexit`` only (see ``_sigterm``)."""
    import signal

    import ray

    try:
        from ray._private import worker as ray_worker
    except ImportError as exc:
        logger.debug("llm_otel_callbacks: no ray._private.worker (%s); no SIGTERM flush", exc)
        return False
    if not ray.is_initialized() or ray_worker.global_worker.mode != ray_worker.WORKER_MODE:
        return False  # a driver or plain process: atexit flushes there
    handler = signal.getsignal(signal.SIGTERM)
    ray_exit = getattr(ray_worker, _RAY_EXIT_NAME, None)
    if (
        ray_exit is None
        or getattr(handler, "__globals__", None) is not vars(ray_worker)
        or _RAY_EXIT_NAME not in getattr(getattr(handler, "__code__", None), "co_names", ())
    ):
        logger.debug("llm_otel_callbacks: Ray's SIGTERM handler not found; no SIGTERM flush")
        return False

    def flush_then_exit(*args: Any, **kwargs: Any) -> Any:
        before()
        return ray_exit(*args, **kwargs)

    flush_then_exit.__wrapped__ = ray_exit  # type: ignore[attr-defined]
    setattr(ray_worker, _RAY_EXIT_NAME, flush_then_exit)
    return True


def refresh_auth_cache() -> None:
    """Make Ray re-read its auth mode and token (cached per process, in C++), so a second Ray
    started in the same process (tests, the demo) works. Config first, then the token cache:
    the order Ray's own test utils use, so a still-draining gRPC thread does not reload a
    token while in token mode.

    Needs: ``ray._raylet.Config`` and ``AuthenticationTokenLoader``. Missing (a Ray without
    token auth): nothing to refresh, does nothing."""
    try:
        from ray._raylet import (  # type: ignore[attr-defined]
            AuthenticationTokenLoader,
            Config,
        )
    except ImportError:
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def seed_llm_registries() -> None:
    """Write this process's Ray LLM component registrations into the connected cluster.

    Ray's LLM registries (``ray/llm/_internal/serve/utils/registry.py``, 2.59 and 2.60) live in
    the cluster's KV store: a process registers the built-in KV-connector backends when it
    imports Ray's ``LLMConfig`` and flushes them once, at its first ``ray.init``. A process that
    starts a second cluster (tests, a demo after a test) has nothing left to flush, so the new
    cluster's store is empty, and two fresh workers that import ``LLMConfig`` at once (the
    per-node download tasks) race: check, check, put, put, and the second raises "already
    registered", failing Ray's ``initialize_node``. Seeding the store first removes the race.

    Needs: ``ray.experimental.internal_kv`` (``_internal_kv_*``), the registry module's
    ``_registries`` / ``_loader_cache`` / ``_make_key``. Missing: does nothing (the race can
    come back only for a process that starts two clusters)."""
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
                logger.debug("registry %s not seeded: %s", name, exc)
