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


# --- composite children of every style ---------------------------------------------------


def _log(ctx: Any, entry: str) -> None:
    ctx.custom_data.setdefault("order", []).append(entry)


class RayStyleChild(RayServeLLMCallback):
    """Ray-style child (ours): logs the order, changes the download policy by name."""

    def on_before_node_init(self) -> None:
        _log(self.ctx, f"{self.callback_name}:before")
        policy = self.kwargs.get("policy")
        if policy:
            from ray.llm._internal.common.utils.download_utils import NodeModelDownloadable

            self.ctx.worker_node_download_model = NodeModelDownloadable[policy]

    def on_before_download_model_files_distributed(self) -> None:
        _log(self.ctx, f"{self.callback_name}:download")
        out = self.kwargs.get("report_dir")
        if out:
            with open(os.path.join(out, f"composite-download-{os.getpid()}.txt"), "w") as fh:
                fh.write(
                    ",".join(self.ctx.custom_data.get("order", []))
                    + "|" + self.ctx.worker_node_download_model.name
                    + "|" + str(self.ctx.custom_data.get("seed", {}).get("note"))
                )

    async def on_after_node_init(self) -> None:
        _log(self.ctx, f"{self.callback_name}:after")


class SeedStyleChild:
    """Seed-protocol child: (ctx) hooks, sync and async; can veto node init."""

    def __init__(self, veto: bool = False, note: str = "seeded") -> None:
        self.veto = veto
        self.note = note

    def on_before_init(self, ctx: Any) -> bool | None:
        _log(ctx, "seed:before")
        ctx.custom_data["seed"]["note"] = self.note
        return False if self.veto else None

    async def on_before_download(self, ctx: Any) -> None:
        _log(ctx, "seed:download")

    async def on_after_init(self, ctx: Any) -> None:
        _log(ctx, "seed:after")


def phase_child(
    phase: str, llm_config: Any, data: dict[str, Any], tag: str = "fn"
) -> dict[str, Any]:
    """Phase-function child: sets runtime_env env var names at pre_initialization."""
    data.setdefault("phases", []).append(phase)
    if phase == "pre_initialization":
        env = dict(data.get("runtime_env") or {})
        env_vars = dict(env.get("env_vars") or {})
        env_vars["PHASE_CHILD"] = tag
        env["env_vars"] = env_vars
        return {"runtime_env": env}
    return {}


class FailingChild(RayServeLLMCallback):
    def on_before_node_init(self) -> None:
        _log(self.ctx, f"{self.callback_name}:before")
        raise ValueError("child failure")


class SlowSyncChild(RayServeLLMCallback):
    def on_before_node_init(self) -> None:
        time.sleep(float(self.kwargs.get("sleep_s", 5)))


class SlowAsyncChild(RayServeLLMCallback):
    async def on_before_node_init(self) -> None:
        await asyncio.sleep(float(self.kwargs.get("sleep_s", 5)))


class NoopChild(RayServeLLMCallback):
    def on_before_node_init(self) -> None:
        return None


class UnpicklableChild(RayServeLLMCallback):
    """Holds a lock: Ray could not send it to the per-node download tasks."""

    def __init__(self, **kwargs: Any) -> None:
        import threading

        super().__init__(**kwargs)
        self.lock = threading.Lock()
