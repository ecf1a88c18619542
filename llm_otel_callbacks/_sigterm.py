"""Flush telemetry when a Ray worker process is sent SIGTERM.

What Ray 2.60 does on SIGTERM in a worker (its source, and observed on a Serve replica):
``Worker.main_loop`` installs a Python handler that raises ``SystemExit`` ("The process
receives a SIGTERM") through ``raise_sys_exit_with_custom_error_message``; the core worker's
signal check (every 10 ms on the main thread) turns that into a graceful
``CoreWorker::Exit(SYSTEM_ERROR)`` without a timeout, which first drains the in-flight tasks.
``atexit`` (where telemetry flushes) runs only once the drain is over. A replica whose
startup is inside a long hook never drains: it lives on until it is killed (``ray.kill``,
SIGKILL), a quick exit that skips ``atexit``, and the spans that had already ended were lost.

So in a Ray worker the flush runs inside Ray's SIGTERM handler, before Ray's exit: ended spans
leave, open startup spans end with an error, all within ``shutdown_timeout_s``; then Ray's
handler goes on unchanged. ``signal.signal`` cannot do it: only the main thread may call it,
and a Serve replica never runs our code there (an async actor runs even its constructor on
another thread). Ray's handler looks its exit function up in ``ray._private.worker`` at each
call, so that one name is wrapped (``_ray.chain_worker_sigterm_exit``), and only when the
installed handler is Ray's and uses it. Outside Ray workers nothing changes (``atexit``
flushes there).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

_LOCK = threading.RLock()  # re-entrant: the handler may interrupt watch() on its thread
_WATCHED: weakref.WeakSet[Any] = weakref.WeakSet()  # Telemetry objects of this process
_BEFORE_FLUSH: list[Callable[[str], None]] = []
_installed = False


def before_flush(fn: Callable[[str], None]) -> Callable[[str], None]:
    """Register ``fn(reason)`` to run before the SIGTERM flush (to end open spans)."""
    _BEFORE_FLUSH.append(fn)
    return fn


def watch(telemetry: Any) -> None:
    """Flush ``telemetry`` (anything with ``force_flush(timeout_s)`` and ``settings``) when
    this Ray worker is sent SIGTERM. Cheap after the first call in a process."""
    if telemetry is None or not getattr(telemetry.settings, "enabled", False):
        return
    with _LOCK:
        _WATCHED.add(telemetry)
        if not _installed:
            _install()


def _install() -> None:
    global _installed
    _installed = True  # one attempt per process, whatever its outcome
    try:
        from ._ray import chain_worker_sigterm_exit

        chain_worker_sigterm_exit(_flush_before_exit)
    except Exception as exc:  # never let this break telemetry or a hook
        logger.debug("llm_otel_callbacks: no SIGTERM flush: %s", exc)


def _flush_before_exit() -> None:
    flush_now("process received SIGTERM before the replica finished starting")


def flush_now(reason: str) -> float:
    """End open startup spans, then flush every watched telemetry; wait at most the largest
    ``shutdown_timeout_s`` among them. Returns the seconds waited.

    All of it runs on a daemon thread: the caller (Ray's handler, on the main thread) may have
    been interrupted holding a lock the hooks need, and must never wait past the bound."""
    started = time.monotonic()
    with _LOCK:
        states = list(_WATCHED)
    bound = max((float(s.settings.shutdown_timeout_s) for s in states), default=0.0)
    deadline = started + bound
    worker = threading.Thread(
        target=_flush_all, args=(states, reason, deadline), name="llm-otel-sigterm-flush",
        daemon=True,
    )
    worker.start()
    worker.join(bound)
    return time.monotonic() - started


def _flush_all(states: list[Any], reason: str, deadline: float) -> None:
    for fn in list(_BEFORE_FLUSH):
        try:
            fn(reason)
        except Exception as exc:
            logger.debug("SIGTERM pre-flush hook failed: %s", exc)
    # At once, each within its own bound: one slow exporter must not hold the others back.
    started = time.monotonic()
    pending = []
    for state in states:
        own = min(deadline, started + float(state.settings.shutdown_timeout_s))
        left = max(0.0, own - started)
        worker = threading.Thread(target=_quiet_flush, args=(state, left), daemon=True,
                                  name="llm-otel-sigterm-flush")
        worker.start()
        pending.append((worker, own))
    for worker, own in pending:
        worker.join(max(0.0, own - time.monotonic()))


def _quiet_flush(state: Any, timeout_s: float) -> None:
    try:
        state.force_flush(timeout_s)
    except Exception as exc:
        logger.debug("SIGTERM flush failed: %s", exc)
