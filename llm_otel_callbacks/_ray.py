"""The one place that imports Ray's callback API, so a Ray upgrade touches one file.

Newer Ray exposes the callback API publicly under ``ray.serve.llm.callbacks``; Ray 2.60
only has the internal module. Everything else in this package imports from here.
"""

from __future__ import annotations

from typing import Any

try:  # newer Ray: the public module
    from ray.serve.llm.callbacks import (  # type: ignore[import-not-found,unused-ignore]
        CallbackBase,
        CallbackConfig,
        CallbackCtx,
    )
except ImportError:  # Ray 2.60
    from ray.llm._internal.common.callbacks.base import (
        CallbackBase,
        CallbackConfig,
        CallbackCtx,
    )

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
