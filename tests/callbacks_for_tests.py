"""Callbacks the tests name by dotted path (Ray workers import them from the repo root)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from llm_otel_callbacks import RayServeLLMCallback


class RecordingCallback(RayServeLLMCallback):
    """Writes what it saw into ctx.custom_data; async before/after, sync download hook."""

    async def on_before_node_init(self) -> None:
        await asyncio.sleep(0.01)
        self.marker = "set-before-pickle"
        self.ctx.custom_data["before_pid"] = os.getpid()

    def on_before_download_model_files_distributed(self) -> None:
        # Runs in Ray's per-node task: report what survived the pickle through a file.
        out = self.kwargs.get("report_dir")
        if out:
            path = os.path.join(out, f"download-{os.getpid()}.txt")
            with open(path, "w") as fh:
                fh.write(f"{self.marker}|{self.ctx.custom_data.get('before_pid')}|{os.getpid()}")

    async def on_after_node_init(self) -> None:
        if self.kwargs.get("fail_after"):
            raise RuntimeError("after-init exploded")


class AsyncDownloadCallback(RayServeLLMCallback):
    """An async download hook: Ray's own run_callback_sync would drop it in a running loop."""

    async def on_before_download_model_files_distributed(self) -> None:
        await asyncio.sleep(0.01)
        self.ctx.custom_data["async_download_ran"] = True


class SlowHook(RayServeLLMCallback):
    def on_before_node_init(self) -> None:
        time.sleep(float(self.kwargs.get("sleep_s", 0.0)))


def unpicklable_kwargs() -> dict[str, Any]:
    return {}
