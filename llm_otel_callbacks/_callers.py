"""Calling one hook: sync or async, from sync or async code, with an optional timeout.

Ray's ``run_callback_sync`` cannot run an async hook when the calling thread already runs an
event loop (``run_until_complete`` refuses, then ``asyncio.run`` refuses, and the coroutine is
dropped). Here such a hook runs to completion on a helper thread with its own loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

#: Worker threads one callback (or composite child) may hold for timed sync hooks. A hook
#: that hangs past its timeout keeps its thread; once all are held, further calls fail at
#: once as timeouts instead of starting more threads.
POOL_WORKERS = 4

Timeout = float | Mapping[str, float] | None
"""``timeout_s`` as configured: seconds for every hook, or a mapping hook -> seconds."""


def timeout_for(timeout_s: Timeout, hook: str) -> float | None:
    """The timeout in force for ``hook`` (a mapping may name only some hooks)."""
    if timeout_s is None or isinstance(timeout_s, (int, float)):
        return timeout_s
    value = timeout_s.get(hook)
    return None if value is None else float(value)


class HookTimeoutError(TimeoutError):
    """A hook did not finish within its ``timeout_s``."""

    def __init__(self, hook: str, timeout_s: float) -> None:
        super().__init__(f"hook '{hook}' did not finish within {timeout_s:g}s")
        self.hook = hook
        self.timeout_s = timeout_s


class PoolFullError(HookTimeoutError):
    """Every worker of the callback's pool is still busy (hooks hanging past their timeout):
    the call fails at once, as a timeout, rather than starting another thread."""

    def __init__(self, hook: str, timeout_s: float, workers: int) -> None:
        TimeoutError.__init__(
            self,
            f"hook '{hook}' not started: all {workers} worker threads of this callback are "
            f"still running earlier calls that overran their timeout ({timeout_s:g}s)",
        )
        self.hook = hook
        self.timeout_s = timeout_s


class BoundedPool:
    """Daemon worker threads for one callback's timed sync hooks, at most ``workers``.

    Not ``concurrent.futures``: its threads are joined at interpreter exit, so a hook that
    hangs would hang the process's exit. A worker is taken only when free (never queued
    behind a hanging call); with none free the call fails fast. Per process, never pickled.
    """

    def __init__(self, workers: int = POOL_WORKERS) -> None:
        self.workers = workers
        self._free = threading.Semaphore(workers)
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._started = 0
        self._idle = 0
        self._lock = threading.Lock()

    @property
    def threads(self) -> int:
        return self._started

    def submit(
        self, job: Callable[[], None], hook: str, timeout_s: float,
        done: Callable[[], None] | None = None,
    ) -> None:
        """Run ``job`` on a worker; raises :class:`PoolFullError` when none is free.

        ``done`` is called after the worker is back in the pool. Signal the caller through
        it, not from ``job``: a caller woken by ``job`` itself could submit again before the
        worker counts as idle, and a second thread would start for a sequential caller.
        """
        if not self._free.acquire(blocking=False):
            raise PoolFullError(hook, timeout_s, self.workers)

        def run() -> None:
            try:
                job()
            finally:
                with self._lock:
                    self._idle += 1
                self._free.release()
                if done is not None:
                    done()

        with self._lock:
            spawn = self._idle == 0 and self._started < self.workers
            if spawn:
                self._started += 1
            else:
                self._idle -= 1
        self._jobs.put(run)
        if spawn:
            threading.Thread(
                target=self._work, name=f"llm-callback-{hook}", daemon=True
            ).start()

    def _work(self) -> None:
        while True:
            self._jobs.get()()


_DEFAULT_POOL = BoundedPool()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _in_thread(
    fn: Callable[[], Any], hook: str, timeout_s: float | None, pool: BoundedPool | None = None
) -> Any:
    """Run ``fn`` on a worker thread (with this context) and wait up to ``timeout_s``.

    A sync hook cannot be interrupted; on timeout it keeps running in the background (holding
    its worker) and the caller gets :class:`HookTimeoutError` at once. Without a pool (an
    async hook called from a thread whose loop is busy) a thread of its own is used.
    """
    box: dict[str, Any] = {}
    ctx = contextvars.copy_context()
    done = threading.Event()

    def work() -> None:
        try:
            box["value"] = ctx.run(fn)
        except BaseException as exc:
            box["error"] = exc

    def target() -> None:
        try:
            work()
        finally:
            done.set()

    if pool is None or timeout_s is None:
        threading.Thread(target=target, name=f"llm-callback-{hook}", daemon=True).start()
    else:
        pool.submit(work, hook, timeout_s, done=done.set)
    if not done.wait(timeout_s):
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


def call_sync(
    fn: Callable[..., Any], hook: str, timeout_s: float | None, *args: Any,
    pool: BoundedPool | None = None,
) -> Any:
    """Call a hook from sync code; an async hook is run to completion (never dropped). A
    timed sync hook runs on ``pool`` (the callback's own; a shared one if None)."""
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
        result = _in_thread(lambda: fn(*args), hook, timeout_s, pool or _DEFAULT_POOL)
    if inspect.isawaitable(result):  # e.g. a partial of an async function
        awaitable = result

        async def finish() -> Any:
            return await awaitable

        return call_sync(finish, hook, timeout_s)
    return result


def _on_pool(
    pool: BoundedPool, timeout_s: float, fn: Callable[..., Any], hook: str, *args: Any
) -> asyncio.Future[Any]:
    """Run a sync hook on the callback's pool. Not the loop's executor: a hook that overran
    its timeout would hold an executor thread and make loop shutdown wait for it."""
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

    box: list[Any] = [None, None]

    def target() -> None:
        try:
            box[0] = ctx.run(fn, *args)
        except BaseException as exc:
            box[1] = exc

    def done() -> None:
        try:
            loop.call_soon_threadsafe(settle, box[0], box[1])
        except RuntimeError:
            pass  # the loop is gone: nobody waits for this hook any more

    pool.submit(target, hook, timeout_s, done=done)
    return future


async def call_async(
    fn: Callable[..., Any], hook: str, timeout_s: float | None, *args: Any,
    pool: BoundedPool | None = None,
) -> Any:
    """Call a hook from async code; a sync hook with a timeout runs on ``pool`` (the
    callback's own bounded workers; a shared pool if None)."""
    if inspect.iscoroutinefunction(fn):
        return await _bounded(fn(*args), hook, timeout_s)
    if timeout_s is None:
        # Ray calls sync hooks inline on the loop; keep that (no thread hop) when unbounded.
        result = fn(*args)
    else:
        future = _on_pool(pool or _DEFAULT_POOL, timeout_s, fn, hook, *args)
        result = await _bounded(future, hook, timeout_s)
    if inspect.isawaitable(result):
        return await _bounded(result, hook, timeout_s)
    return result
