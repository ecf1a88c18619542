"""Callbacks the built-in tests name by dotted path (Ray workers import them from the repo
root). The probes report what Ray's own download task really received, read from Ray's frame."""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import ray

from llm_otel_callbacks import RayServeLLMCallback
from llm_otel_callbacks.builtin import DownloadPolicy, DownloadPolicyOptions


def rays_download_argument() -> str | None:
    """The ``download_model`` argument of Ray's ``download_model_files`` frame that is
    running this hook (Ray reads it from the ctx before the hook runs)."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "download_model_files" and "download_model" in frame.f_locals:
            value = frame.f_locals["download_model"]
            return str(getattr(value, "name", value))
        frame = frame.f_back
    return None


def write_report(report_dir: str, llm_config: Any, extra: dict[str, Any] | None = None) -> None:
    """One JSON file per (process, node): what this download task got."""
    from ray.llm._internal.common.utils.download_utils import get_model_location_on_disk

    model_id = str(llm_config.get_engine_config().actual_hf_model_id)
    report = {
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "download_model": rays_download_argument(),
        "ray_model_location": get_model_location_on_disk(model_id),
        **(extra or {}),
    }
    path = os.path.join(report_dir, f"download-{report['node_id'][:12]}-{os.getpid()}.json")
    with open(path, "w") as fh:
        json.dump(report, fh)


class DownloadProbe(RayServeLLMCallback):
    """A composite child that reports Ray's download argument (place it after the policy)."""

    def on_before_download_model_files_distributed(self) -> None:
        write_report(self.kwargs["report_dir"], self.llm_config)


class _ProbedOptions(DownloadPolicyOptions):
    report_dir: str


class ProbedDownloadPolicy(DownloadPolicy):
    """DownloadPolicy used alone, reporting what Ray's task received."""

    kwargs_model = _ProbedOptions

    def on_before_download_model_files_distributed(self) -> None:
        super().on_before_download_model_files_distributed()
        write_report(self.options.report_dir, self.llm_config)


class FailingDownload(RayServeLLMCallback):
    """Fails every node's download hook (a download that cannot happen)."""

    def on_before_download_model_files_distributed(self) -> None:
        raise RuntimeError("disk full (test)")


class FailingAfterInit(RayServeLLMCallback):
    """Fails in the replica after node init (the replica's startup fails there)."""

    def on_after_node_init(self) -> None:
        raise RuntimeError("after-init failure (test)")
