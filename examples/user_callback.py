"""A small user callback: check free disk space where the model lands, on every node.

Use it alone or as a Composite child (the demo does)::

    callback_config={
        "callback_class": "llm_otel_callbacks.Composite",
        "callback_kwargs": {"callbacks": [
            "llm_otel_callbacks.builtin.Timing",
            {"callback_class": "user_callback.DiskSpaceCheck",
             "callback_kwargs": {"min_free_gb": 20}},
        ]},
    }

Ray workers must be able to import it: put this folder on ``PYTHONPATH`` in the deployment's
``runtime_env`` (or install it). The hook calls get spans and metrics from the base class; the
check adds its numbers to the current hook span.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field

from llm_otel_callbacks import RayServeLLMCallback

logger = logging.getLogger(__name__)


class DiskSpaceOptions(BaseModel):
    """``callback_kwargs`` of :class:`DiskSpaceCheck` (checked when Ray builds the callback)."""

    model_config = ConfigDict(extra="forbid")

    min_free_gb: float = Field(default=10.0, ge=0)
    """Warn (or fail, see ``fail``) when less than this is free."""
    path: str | None = None
    """Folder to check; default: the model's folder if local, else the Hugging Face cache."""
    fail: bool = False
    """Raise instead of warning, so the replica does not start on a full disk."""


class DiskSpaceCheck(RayServeLLMCallback):
    kwargs_model = DiskSpaceOptions

    def on_before_node_init(self) -> None:
        self._check("replica")

    def on_before_download_model_files_distributed(self) -> None:
        # Runs in Ray's download task on each node of the placement group.
        self._check("node")

    def _check(self, where: str) -> None:
        opts: DiskSpaceOptions = self.options
        folder = _existing_parent(Path(opts.path) if opts.path else self._model_folder())
        free_gb = shutil.disk_usage(folder).free / 1e9
        span = trace.get_current_span()
        span.set_attribute("disk.path", str(folder))
        span.set_attribute("disk.free_gb", round(free_gb, 2))
        if free_gb >= opts.min_free_gb:
            return
        message = (f"DiskSpaceCheck ({where}): only {free_gb:.1f} GB free in {folder} "
                   f"(min_free_gb={opts.min_free_gb:g})")
        if opts.fail:
            raise RuntimeError(message)
        logger.warning("%s", message)

    def _model_folder(self) -> Path:
        source = getattr(self.llm_config.model_loading_config, "model_source", None)
        if isinstance(source, str) and Path(source).exists():
            return Path(source)
        from huggingface_hub.constants import HF_HUB_CACHE

        return Path(HF_HUB_CACHE)


def _existing_parent(path: Path) -> Path:
    path = path.expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
