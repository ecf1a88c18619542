"""The one place that imports Ray's callback API, so a Ray upgrade touches one file.

Newer Ray exposes the callback API publicly under ``ray.serve.llm.callbacks``; Ray 2.60
only has the internal module. Everything else in this package imports from here.
"""

from __future__ import annotations

from typing import Any

# The internal module first: trying ``ray.serve.llm.callbacks`` first imports the
# ``ray.serve.llm`` package, which imports vLLM (~10 s of a replica's start, measured by
# benchmarks/startup_overhead.py), even where that submodule does not exist (Ray 2.60).
try:  # Ray 2.60
    from ray.llm._internal.common.callbacks import base as _api
except ImportError:  # newer Ray: the public module
    from ray.serve.llm import callbacks as _api  # type: ignore[attr-defined,no-redef,unused-ignore]

# Typed loosely, as the public module was: Ray's hook stubs are declared async, ours may be
# sync (Ray runs both).
CallbackBase: Any = _api.CallbackBase
CallbackConfig: Any = _api.CallbackConfig
CallbackCtx: Any = _api.CallbackCtx

__all__ = [
    "CallbackBase",
    "CallbackConfig",
    "CallbackCtx",
    "cloud_file_system",
    "llm_server_class",
    "node_model_downloadable",
]


def node_model_downloadable() -> Any:
    """Ray's ``NodeModelDownloadable`` enum (imported lazily: it pulls in torch)."""
    from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable

    return NodeModelDownloadable


def cloud_file_system() -> Any:
    """Ray's ``CloudFileSystem`` (S3/GCS/Azure reads used by its model downloader)."""
    from ray.llm._internal.common.utils.cloud_utils import CloudFileSystem

    return CloudFileSystem


def llm_server_class() -> Any:
    """Ray's ``LLMServer`` deployment class (imported lazily: it needs vLLM)."""
    try:
        from ray.serve.llm import LLMServer  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        from ray.llm._internal.serve.core.server.llm_server import (  # type: ignore[assignment]
            LLMServer,
        )
    return LLMServer
