"""Drive a callback the way Ray's ``VLLMEngine.start()`` does, with Ray's own pieces."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import ray


def make_llm_config(
    model_dir: Path | str,
    callback_class: str,
    callback_kwargs: dict[str, Any] | None = None,
    *,
    raise_error_on_callback: bool = True,
    bundles: list[dict[str, float]] | None = None,
    strategy: str = "PACK",
    model_id: str = "tiny",
    **extra: Any,
) -> Any:
    """A real ``ray.serve.llm.LLMConfig`` naming the callback by dotted string."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": str(model_dir)},
        placement_group_config={"bundles": bundles or [{"CPU": 1}], "strategy": strategy},
        callback_config={
            "callback_class": callback_class,
            "callback_kwargs": callback_kwargs or {},
            "raise_error_on_callback": raise_error_on_callback,
        },
        **extra,
    )


def start_like_vllm_engine(llm_config: Any, *, wait_pg_timeout_s: float = 60) -> Any:
    """``get_or_create_callback()`` then the hook sequence of ``VLLMEngine.start()``, with
    Ray's real ``initialize_node()`` (one task per node of ``ctx.placement_group``)."""
    from ray.llm._internal.serve.utils.node_initialization_utils import initialize_node

    callback = llm_config.get_or_create_callback()

    async def flow() -> None:
        await callback.run_callback("on_before_node_init")
        if callback.ctx.run_init_node:
            # In a Serve replica the group is the replica's own and already placed; a
            # driver-created one must be placed before Ray reads its bundle -> node table.
            ray.get(callback.ctx.placement_group.ready(), timeout=wait_pg_timeout_s)
            await initialize_node(llm_config)
        await callback.run_callback("on_after_node_init")

    asyncio.run(flow())
    return callback


def remove_pg(callback: Any) -> None:
    pg = getattr(callback.ctx, "placement_group", None)
    if pg is not None:
        try:
            ray.util.remove_placement_group(pg)
        except Exception:
            pass
