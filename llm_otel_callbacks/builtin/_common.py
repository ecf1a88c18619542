"""Small helpers the built-ins share: case-insensitive enum kwargs, where this process runs."""

from __future__ import annotations

import atexit
import logging
import sys
from typing import Any

from .._observe import error_text as error_text  # shared with the built-ins' modules

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


# --- process exit -------------------------------------------------------------------------------
# At exit, Ray's log filter (it asks the core worker for task ids) can block forever in an
# exiting Ray worker, so what the built-ins say while the process exits goes to stderr.

_EXITING = False
_WATCHING = False


def _mark_exiting() -> None:
    global _EXITING
    _EXITING = True


def watch_exit() -> None:
    """Call once telemetry exists: atexit runs handlers last-in first-out, so this flag is set
    before telemetry's own exit handler ends the open startups."""
    global _WATCHING
    if not _WATCHING:
        _WATCHING = True
        atexit.register(_mark_exiting)


def exiting() -> bool:
    return _EXITING


def say(log: logging.Logger, level: int, message: str) -> None:
    """Log ``message`` on ``log``; while the process exits, write it to stderr instead."""
    if _EXITING:
        try:
            sys.stderr.write(f"{logging.getLevelName(level)} llm_otel_callbacks: {message}\n")
            sys.stderr.flush()
        except Exception:
            pass
        return
    log.log(level, "%s", message)
