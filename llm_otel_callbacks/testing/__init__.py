"""Helpers for users' own tests and for the benchmarks."""

from __future__ import annotations

from ..base import RayServeLLMCallback


class NoopCallback(RayServeLLMCallback):
    """Implements every node-init hook and does nothing: a baseline for overhead."""

    def on_before_node_init(self) -> None:
        return None

    def on_before_download_model_files_distributed(self) -> None:
        return None

    def on_after_node_init(self) -> None:
        return None


__all__ = ["NoopCallback"]
