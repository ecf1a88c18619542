"""Small helpers the built-ins share: case-insensitive enum kwargs, where this process runs."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def upper_name(value: Any) -> Any:
    """Before-validator: enum names are accepted in any case (``pack`` -> ``PACK``)."""
    return value.strip().upper() if isinstance(value, str) else value


def this_node_id() -> str:
    """The Ray node id of this process, or "" outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return str(ray.get_runtime_context().get_node_id())
    except Exception as exc:  # never let a lookup break a hook
        logger.debug("node id unavailable: %s", exc)
    return ""


def short_id(node_id: str) -> str:
    """The first 8 hex digits: enough to tell nodes apart in a log line."""
    return node_id[:8] if node_id else "-"


def error_text(error: BaseException | str | None, with_message: bool) -> str:
    """An error for a log line or span status; the message only when allowed (secrets)."""
    if error is None:
        return ""
    if isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}" if with_message else type(error).__name__
