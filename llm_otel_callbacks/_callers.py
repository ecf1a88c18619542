"""Calling one hook: sync or async, from sync or async code, with an optional timeout.

Ray's ``run_callback_sync`` cannot run an async hook when the calling thread already runs an
event loop (``run_until_complete`` refuses, then ``asyncio.run`` refuses, and the coroutine is
dropped). Here such a hook runs to completion on a helper thread with its own loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import Callable
from typing import Any


class HookTimeoutError(TimeoutError):
    """A hook did not finish within its ``timeout_s``."""

    def __init__(self, hook: str, timeout_s: float) -> None:
        super().__init__(f"hook '{hook}' did not finish within {timeout_s:g}s")
        self.hook = hook
        self.timeout_s = timeout_s


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_thread(fn: Callable[[], Any], hook: str, timeout_s: float | None) -> Any:
    """Run ``fn`` on a daemon thread (with this context) and wait up to ``timeout_s``.

    A sync hook cannot be interrupted; on timeout it keeps running in the background and
    the caller gets :class:`HookTimeoutError` at once.
    """
    box: dict[str, Any] = {}
    ctx = contextvars.copy_context()

    def target() -> None:
        try:
            box["value"] = ctx.run(fn)
        except BaseException as exc:
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"llm-callback-{hook}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise HookTimeoutError(hook, timeout_s or 0.0)
    if "error" in box:
        raise box["error"]
    return box.get("value")


async def _bounded(awaitable: Any, hook: str, timeout_s: float | None) -> Any:
    if timeout_s is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.TimeoutError:
        raise HookTimeoutError(hook, timeout_s) from None


def call_sync(fn: Callable[..., Any], hook: str, timeout_s: float | None, *args: Any) -> Any:
    """Call a hook from sync code; an async hook is run to completion (never dropped)."""
    if inspect.iscoroutinefunction(fn):
        if _loop_running():
            # This thread's loop is busy running us: give the coroutine a loop of its own.
            return _in_thread(
                lambda: asyncio.run(_bounded(fn(*args), hook, timeout_s)), hook,
                None if timeout_s is None else timeout_s + 1.0,
            )
        return asyncio.run(_bounded(fn(*args), hook, timeout_s))
    if timeout_s is None:
        result = fn(*args)
    else:
        result = _in_thread(lambda: fn(*args), hook, timeout_s)
    if inspect.isawaitable(result):  # e.g. a partial of an async function
        return call_sync(lambda: _await(result), hook, timeout_s)
    return result


def _on_daemon_thread(fn: Callable[..., Any], hook: str, *args: Any) -> asyncio.Future[Any]:
    """Run a sync hook on its own daemon thread. Not the loop's executor: a hook that
    overran its timeout would hold an executor thread and make loop shutdown wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    ctx = contextvars.copy_context()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def target() -> None:
        try:
            value, error = ctx.run(fn, *args), None
        except BaseException as exc:
            value, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, value, error)
        except RuntimeError:
            pass  # the loop is gone: nobody waits for this hook any more

    threading.Thread(target=target, name=f"llm-callback-{hook}", daemon=True).start()
    return future


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def call_async(fn: Callable[..., Any], hook: str, timeout_s: float | None, *args: Any) -> Any:
    """Call a hook from async code; a sync hook with a timeout runs on a worker thread."""
    if inspect.iscoroutinefunction(fn):
        return await _bounded(fn(*args), hook, timeout_s)
    if timeout_s is None:
        # Ray calls sync hooks inline on the loop; keep that (no thread hop) when unbounded.
        result = fn(*args)
    else:
        result = await _bounded(_on_daemon_thread(fn, hook, *args), hook, timeout_s)
    if inspect.isawaitable(result):
        return await _bounded(result, hook, timeout_s)
    return result
