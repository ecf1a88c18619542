"""RayServeLLMCallback: Ray's CallbackBase with every hook call traced and measured.

The wrapping happens where Ray dispatches (``run_callback`` / ``run_callback_sync``), not per
hook name, so hooks Ray adds later are covered without a release of ours.

Per-process state (tracer, recorders, the open startup span) lives in ``self._local``, which
is dropped on pickling and rebuilt lazily in the process that unpickles the callback (Ray's
per-node download tasks). The W3C trace carrier, a plain dict, travels instead.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode, Tracer, set_span_in_context
from pydantic import BaseModel

from . import _sigterm, catalog
from ._callers import BoundedPool, Timeout, call_async, call_sync, timeout_for
from ._observe import HookObserver, error_text
from ._ray import CallbackBase, handle_callback_error, hook_method
from ._validation import validate_kwargs
from .catalog import MetricSpec
from .config import parse_timeout
from .telemetry import TelemetrySettings, get_telemetry
from .telemetry.metrics import Recorder
from .telemetry.propagation import carrier_for, context_from
from .telemetry.providers import before_shutdown

logger = logging.getLogger(__name__)

#: process_cache key of the follow-up set by :meth:`RayServeLLMCallback.call_after_node_init`.
_AFTER_NODE_INIT = "base.after_node_init"
#: True while a Composite constructs a child: the composite checks the children against each
#: other once they all exist (check_callbacks_before), so a child does not check alone.
BUILDING_CHILD: ContextVar[bool] = ContextVar("llm_otel_callbacks_building_child", default=False)

#: The hook after which a replica's startup span is closed (unless something that knows
#: more, such as ObservedLLMServer's engine start, takes over closing it).
STARTUP_LAST_HOOK = "on_after_node_init"


def model_id_of(llm_config: Any) -> str:
    try:
        return str(llm_config.model_id)
    except Exception:
        return "unknown"


@dataclass(frozen=True)
class HookTarget:
    """One object whose hooks run for a callback: the callback itself, or a composite child."""

    name: str
    """Metric label and span attribute: the callback's (or child's) name."""
    instance: Any
    """Object whose hook methods are called (a child adapter for seed-style children)."""
    raise_error_on_callback: bool
    timeout_s: Timeout = None
    """Seconds for every hook, or a mapping hook -> seconds."""
    pool: BoundedPool | None = None
    """The workers its timed sync hooks run on (per process; None: a shared pool)."""


class _Local:
    """What one process knows about one callback instance. Never pickled: it pickles (and
    copies) as None, so a subclass's own ``__getstate__`` (``self.__dict__.copy()``) cannot
    carry tracers and locks into Ray's download tasks."""

    __slots__ = ("cache", "methods", "observer", "parent", "pool", "startup_span")

    def __init__(self, observer: HookObserver) -> None:
        self.observer = observer
        self.startup_span: Span | None = None
        self.parent: Context | None = None  # the context hook spans are parented on
        self.methods: dict[str, tuple[Any, bool]] = {}
        self.cache: dict[Any, Any] = {}  # per-process memo for subclasses (never pickled)
        self.pool: BoundedPool | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(None), ())


class RayServeLLMCallback(CallbackBase):  # type: ignore[misc]
    """Subclass this and override the hooks you need, sync or async:

    ``on_before_node_init``, ``on_after_node_init``,
    ``on_before_download_model_files_distributed`` (and any hook a newer Ray adds).

    Every call gets a span and metrics. ``callback_kwargs`` land in ``self.kwargs`` as in Ray,
    except ``telemetry`` (see :class:`TelemetrySettings`) and ``timeout_s`` (seconds for every
    hook, or a mapping hook -> seconds; a timed sync hook runs on this callback's few worker
    threads and fails fast as a timeout when they are all held by hung calls). Set
    ``kwargs_model`` to a pydantic model to have the kwargs validated at construction; the
    result is ``self.options``.
    """

    kwargs_model: ClassVar[type[BaseModel] | None] = None
    """Pydantic model validating ``self.kwargs`` at construction (None: no validation)."""
    server_hooks_optional: ClassVar[bool] = False
    """True when the engine-start / request hooks only add telemetry, so running without
    ObservedLLMServer is fine (no warning, ``check`` passes)."""

    def __init__(
        self,
        llm_config: Any = None,
        raise_error_on_callback: bool = True,
        ctx_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        telemetry = kwargs.pop("telemetry", None)
        name = kwargs.pop("callback_name", None)
        timeout_s = kwargs.pop("timeout_s", None)
        super().__init__(
            llm_config=llm_config,
            raise_error_on_callback=raise_error_on_callback,
            ctx_kwargs=ctx_kwargs,
            **kwargs,
        )
        self.callback_name: str = name or type(self).__name__
        self.timeout_s: Timeout = parse_timeout(
            timeout_s, f"{type(self).__qualname__} callback_kwargs"
        )
        self.telemetry_settings = TelemetrySettings.resolve(telemetry)
        self.model_id = model_id_of(llm_config)
        self.created_at_ns = time.time_ns()
        self.options: Any = None
        if self.kwargs_model is not None:
            self.options = validate_kwargs(
                self.kwargs_model, self.kwargs, f"{type(self).__qualname__} callback_kwargs"
            )
        # Travels with the pickle: the W3C parent for spans made in other processes.
        self.trace_carrier: dict[str, str] = {}
        self._unpickled = False
        self._local: _Local | None = None
        self._defer_startup_end = False
        # A composite sets itself here so its children share its startup trace.
        self.startup_owner: RayServeLLMCallback | None = None
        if not BUILDING_CHILD.get():
            self.check_callbacks_before(())

    def check_callbacks_before(self, before: Sequence[Any]) -> None:
        """Override to refuse, with :class:`CallbackConfigError`, a place this callback cannot
        work in. ``before``: the instances that run before it in a Composite, in order; empty
        when it is the replica's only callback. Called once at construction (standalone: at the
        end of this ``__init__``, so use only what it has set, e.g. ``self.options``)."""
        return None

    # --- pickling: telemetry never travels --------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_local"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = None
        self._unpickled = True
        # Deferred to the first read of ``ctx``: while the LLMConfig is still being
        # unpickled, ``self.llm_config`` may be half built. Ray reads ``ctx`` right after.
        self._pending_unpickle = True

    @property
    def ctx(self) -> Any:
        """Ray's CallbackCtx (shared by every child of a composite)."""
        if self.__dict__.get("_pending_unpickle"):
            self._pending_unpickle = False
            self._run_after_unpickle()
        return self.__dict__["_ctx"]

    @ctx.setter
    def ctx(self, value: Any) -> None:
        self.__dict__["_ctx"] = value

    def _run_after_unpickle(self) -> None:
        try:
            self.after_unpickle()
        except Exception as exc:
            handle_callback_error(self, "after_unpickle", exc)

    def after_unpickle(self) -> None:
        """Runs once in a process that unpickled this callback (e.g. a per-node download
        task), when ``ctx`` is first read there, which Ray does before using it. Override for
        node-local decisions. Errors follow ``raise_error_on_callback``."""

    # --- telemetry ----------------------------------------------------------------------------

    # --- the extension API: what a subclass records with (built-ins use only this) --------

    def metric(self, spec: MetricSpec) -> Recorder:
        """The recorder of one catalog metric (``catalog.TOKENS`` ...) in this process.

        ``add(labels, value=1)`` for counters and gauges; ``record(labels, value,
        exemplar=None)`` for histograms (``exemplar``: a span's context, linking the point to
        its trace). ``labels`` is a tuple in the order of ``spec.labels``. Created on first
        use, per process (never pickled), so it works in a per-node download task too.
        With telemetry disabled it records nothing."""
        return self._observer.tel.recorder(spec)

    @property
    def tracer(self) -> Tracer:
        """The OTel tracer of this process (a no-op tracer when nothing exports spans).

        Parent your spans on :meth:`startup_context` during the startup; during a request
        hook the request span is current (``opentelemetry.trace.get_current_span()``)."""
        return self._observer.tel.tracer

    @property
    def process_attributes(self) -> Mapping[str, Any]:
        """Where this process runs: ``host.name``, ``process.pid`` and, inside Ray, the
        Ray node/job/actor ids and the Serve app/deployment/replica (catalog ``R_*`` keys)."""
        return self._observer.tel.process_attributes

    @property
    def _observer(self) -> HookObserver:
        local = self._local
        if local is None:
            local = self._make_local()
        return local.observer

    @property
    def hook_pool(self) -> BoundedPool:
        """This callback's workers for timed sync hooks (per process)."""
        local = self._local or self._make_local()
        if local.pool is None:
            local.pool = BoundedPool()
        return local.pool

    @property
    def process_cache(self) -> dict[Any, Any]:
        """A dict private to this process and instance (dropped on pickling)."""
        return (self._local or self._make_local()).cache

    def _make_local(self) -> _Local:
        tel = get_telemetry(self.telemetry_settings)
        _sigterm.watch(tel)
        cls = type(self)
        local = _Local(HookObserver(tel, self.callback_name, f"{cls.__module__}.{cls.__qualname__}",
                                    self.model_id))
        self._local = local
        return local

    def startup_context(self) -> Context | None:
        """Parent context for spans of this replica's startup, in any process.

        In the replica, the first call opens the startup span (backdated to the callback's
        creation); in a process that unpickled the callback, the carried W3C context is used.
        """
        if self.startup_owner is not None:
            return self.startup_owner.startup_context()
        local = self._local or self._make_local()
        if local.parent is not None:
            return local.parent
        if self._unpickled:
            local.parent = context_from(self.trace_carrier)
            return local.parent
        span = self.tracer.start_span(
            catalog.SPAN_STARTUP,
            start_time=self.created_at_ns,
            attributes={catalog.A_MODEL: self.model_id, catalog.A_CLASS: local.observer.class_name},
        )
        local.startup_span = span
        local.parent = set_span_in_context(span)
        self.trace_carrier = carrier_for(span)
        _OPEN_STARTUPS.add((self, local))
        return local.parent

    def end_startup(self, error: BaseException | str | None = None) -> None:
        """Close this replica's startup span (ok, or ERROR with ``error``). Idempotent."""
        if self.startup_owner is not None:
            self.startup_owner.end_startup(error)
            return
        local = self._local
        if local is None or local.startup_span is None:
            return
        self._notify_startup_ended(error)
        _end_span(local.startup_span, error, self.telemetry_settings.record_exception_messages)
        local.startup_span = None
        local.parent = None
        _OPEN_STARTUPS.discard((self, local))

    def _notify_startup_ended(self, error: BaseException | str | None) -> None:
        try:
            self.startup_ended(error)
        except Exception as exc:  # a notification must not break the dispatch
            logger.warning("%s.startup_ended failed: %s", type(self).__name__, exc)

    def startup_ended(self, error: BaseException | str | None) -> None:
        """Called once when this replica's startup ends: ``error`` is None on success.

        It is also called with an error when the startup fails (a hook raised under the
        raise policy) or the process exits first. Override to close your own spans; never
        depend on ``on_after_node_init`` for that, a failed replica never reaches it."""

    def defer_startup_end(self) -> None:
        """Keep the startup span open past ``on_after_node_init``; the caller ends it."""
        if self.startup_owner is not None:
            self.startup_owner.defer_startup_end()
        self._defer_startup_end = True

    def hook_targets(self) -> list[HookTarget]:
        """Whose hooks run for this callback, in order (a composite lists its children).

        Request-time hooks (``on_llm_start`` ...) are looked up on these instances."""
        return [HookTarget(self.callback_name, self, self.raise_error_on_callback,
                           self.timeout_s, self.hook_pool if self.timeout_s else None)]

    # --- dispatch -----------------------------------------------------------------------------

    def _method(self, method_name: str) -> tuple[Any, bool]:
        """:meth:`_hook_method`, memoized per process: it inspects."""
        local = self._local or self._make_local()
        found = local.methods.get(method_name)
        if found is None:
            found = local.methods[method_name] = self._hook_method(method_name)
        return found

    def _hook_method(self, method_name: str) -> tuple[Any, bool]:
        """``(bound hook, is_async)`` as Ray looks it up (AttributeError when missing); the
        composite overrides it to dispatch any hook to its children."""
        return hook_method(self, method_name)

    async def run_callback(self, method_name: str) -> None:
        """Ray's async dispatch, with a span and metrics around the call."""
        method, is_async = self._method(method_name)
        observer = self._observer
        started = observer.start(method_name, self.startup_context())
        error: BaseException | None = None
        try:
            await self._invoke_async(method_name, method, is_async)
        except Exception as exc:
            error = exc
        observer.finish(method_name, started, error,
                        record_message=self.telemetry_settings.record_exception_messages)
        if error is not None or method_name == STARTUP_LAST_HOOK:
            self._after_dispatch(method_name, error)
        if method_name == STARTUP_LAST_HOOK and self._local is not None:
            follow_up = self._local.cache.pop(_AFTER_NODE_INIT, None)
            if follow_up is not None:
                await follow_up()

    def call_after_node_init(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Await ``fn`` in this process right after the ``on_after_node_init`` dispatch.

        Ray's engine start has no await point of ours between node init and building the
        engine; ObservedLLMServer begins the engine-start phase here. Kept per process
        (never pickled); an error ``fn`` raises leaves Ray's engine start like a hook's."""
        self.process_cache[_AFTER_NODE_INIT] = fn

    def run_callback_sync(self, method_name: str) -> None:
        """Ray's sync dispatch, with a span and metrics, and async hooks run correctly even
        when this thread already runs an event loop."""
        method, is_async = self._method(method_name)
        observer = self._observer
        started = observer.start(method_name, self.startup_context())
        error: BaseException | None = None
        try:
            self._invoke_sync(method_name, method, is_async)
        except Exception as exc:
            error = exc
        observer.finish(method_name, started, error,
                        record_message=self.telemetry_settings.record_exception_messages)
        if error is not None or method_name == STARTUP_LAST_HOOK:
            self._after_dispatch(method_name, error)

    async def _invoke_async(self, hook: str, method: Any, is_async: bool) -> None:
        """How the hook itself is called; the composite overrides this to run its children."""
        timeout = timeout_for(self.timeout_s, hook)
        if timeout is not None:
            await call_async(method, hook, timeout, pool=self.hook_pool)
        elif is_async:
            await method()
        else:
            await call_async(method, hook, None)

    def _invoke_sync(self, hook: str, method: Any, is_async: bool) -> None:
        timeout = timeout_for(self.timeout_s, hook)
        if timeout is not None:
            call_sync(method, hook, timeout, pool=self.hook_pool)
        elif is_async:
            call_sync(method, hook, None)
        else:
            result = method()
            if result is not None and inspect.isawaitable(result):
                call_sync(lambda: result, hook, None)

    def _after_dispatch(self, hook: str, error: BaseException | None) -> None:
        if error is not None and self.raise_error_on_callback:
            # The error leaves the replica's startup: that startup has failed.
            self.end_startup(error)
        elif hook == STARTUP_LAST_HOOK and not self._defer_startup_end:
            self.end_startup()
        if error is None:
            return
        if not self.raise_error_on_callback and \
                not self.telemetry_settings.record_exception_messages:
            # Ray's log line would carry the message (a secret, maybe): the same line, typed.
            logger.error("Error running callback method '%s' on %s: %s", hook,
                         type(self).__name__, error_text(error, False))
            return
        handle_callback_error(self, hook, error)  # Ray's raise-or-log, unchanged


def _end_span(span: Span, error: BaseException | str | None, record_message: bool) -> None:
    if error is not None and span.is_recording():
        if isinstance(error, BaseException):
            if record_message:
                span.record_exception(error)
            message = f"{type(error).__name__}: {error}" if record_message else type(error).__name__
        else:
            message = error
        span.set_status(Status(StatusCode.ERROR, message))
        span.set_attribute(catalog.A_OUTCOME, catalog.OUTCOME_ERROR)
    elif span.is_recording():
        span.set_attribute(catalog.A_OUTCOME, catalog.OUTCOME_OK)
    span.end()


# Startup spans still open when the process exits (a replica killed or failing between hooks)
# end with an error, so the failed attempt is visible rather than lost.
_OPEN_STARTUPS: set[tuple[RayServeLLMCallback, _Local]] = set()
_EXIT_LOCK = threading.Lock()


@before_shutdown
def _close_open_startups() -> None:
    _end_open_startups("process exited before the replica finished starting")


@_sigterm.before_flush
def _end_open_startups(reason: str) -> None:
    with _EXIT_LOCK:
        for callback, _local in list(_OPEN_STARTUPS):
            callback.end_startup(reason)
        _OPEN_STARTUPS.clear()
