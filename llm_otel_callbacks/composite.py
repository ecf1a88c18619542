"""Composite: several callbacks in one replica process, behind the one class Ray allows.

Children run in list order on the one ``CallbackCtx`` Ray reads, each under its own span
(nested in the composite's span for the hook) with its own metric series, its own raise
policy and timeout. Every change a child makes to the ctx is a span event, so "who changed
the placement group" is answered by the trace.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace

from . import catalog
from ._callers import call_async, call_sync
from ._ctx_changes import Snapshot, diff, snapshot
from ._observe import HookObserver, error_text
from ._pickling import pickle_error, unpicklable_attributes
from ._ray import CallbackBase
from ._validation import CallbackConfigError
from .adapters import Child, FunctionChild, Hook, SeedChild, is_seed_protocol
from .base import HookTarget, RayServeLLMCallback
from .config import ChildSpec, CompositeOptions, parse_child_specs

logger = logging.getLogger(__name__)


class ChildHookError(RuntimeError):
    """A child whose policy is to raise failed; the hook stops here."""

    def __init__(self, child: str, hook: str, error: BaseException) -> None:
        super().__init__(
            f"callback '{child}' failed in hook '{hook}': {type(error).__name__}: {error}"
        )
        self.child = child
        self.hook = hook
        #: Without the error's message (which may hold a secret): for clients, and for logs
        #: and spans under ``record_exception_messages: false``.
        self.summary = f"callback '{child}' failed in hook '{hook}': {type(error).__name__}"


class Composite(RayServeLLMCallback):
    """Runs the callbacks listed in ``callback_kwargs["callbacks"]`` (see :mod:`.config`)."""

    kwargs_model = CompositeOptions

    def __init__(
        self,
        llm_config: Any = None,
        raise_error_on_callback: bool = True,
        ctx_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            llm_config=llm_config,
            raise_error_on_callback=raise_error_on_callback,
            ctx_kwargs=ctx_kwargs,
            **kwargs,
        )
        #: Children that failed in ``__init__`` or cannot be pickled, under
        #: ``raise_error_on_callback: false``: name -> what went wrong. They do not run (an
        #: unpicklable one runs in the replica, not in the per-node download tasks).
        self.failed_children: dict[str, str] = {}
        self.children: list[Child] = []
        for index, (spec, target) in enumerate(parse_child_specs(self.options.callbacks)):
            child = self._build_child(index, spec, target)
            if child is not None:
                self.children.append(child)
        self.vetoed_by: str | None = None
        self._check_children_pickle("at construction")

    # --- construction -------------------------------------------------------------------------

    def _build_child(self, index: int, spec: ChildSpec, target: Any) -> Child | None:
        name = str(spec.name)
        label = f"callbacks[{index}] ({name})"
        policy = (
            self.raise_error_on_callback
            if spec.raise_error_on_callback is None
            else spec.raise_error_on_callback
        )
        kwargs = dict(spec.callback_kwargs)
        self.ctx.custom_data.setdefault(name, {})  # the child's namespaced slot
        try:
            if inspect.isclass(target) and issubclass(target, CallbackBase):
                instance: Any
                if issubclass(target, RayServeLLMCallback):
                    kwargs["callback_name"] = name
                    if "telemetry" in kwargs:
                        raise CallbackConfigError(
                            "field 'callback_kwargs.telemetry': telemetry is set once per "
                            "process, on the composite's own callback_kwargs"
                        )
                _check_kwargs(
                    target, kwargs, llm_config=None, raise_error_on_callback=True,
                    ctx_kwargs=None,
                )
                instance = target(  # type: ignore[call-arg]
                    llm_config=self.llm_config,
                    raise_error_on_callback=policy,
                    ctx_kwargs=None,
                    **kwargs,
                )
                instance.ctx = self.ctx  # one ctx for all: what a child sets, Ray reads
                if isinstance(instance, RayServeLLMCallback):
                    instance.startup_owner = self
                    # Spans a child makes itself (Timing's phases) go where the composite's go.
                    instance.telemetry_settings = self.telemetry_settings
                return Child(name, instance, policy, spec.timeout_s)
            if is_seed_protocol(target):
                _check_kwargs(target, kwargs)
                return SeedChild(name, target(**kwargs), policy, spec.timeout_s, self.llm_config)
            if inspect.isclass(target):
                raise CallbackConfigError(
                    f"field 'callback_class': {target.__qualname__} is neither a subclass of "
                    "Ray's CallbackBase nor a seed-protocol class (on_before_init / "
                    "on_before_download / on_after_init, or request hooks on_llm_start / "
                    "on_llm_end / on_llm_error / on_llm_stream_chunk)"
                )
            fn = functools.partial(target, **kwargs) if kwargs else target
            _check_phase_signature(target, kwargs)
            return FunctionChild(name, fn, policy, spec.timeout_s, self.llm_config)
        except CallbackConfigError as exc:
            # Wrong configuration fails whatever the policy: it is never silently skipped.
            raise CallbackConfigError(_prefix(label, str(exc))) from None
        except Exception as exc:
            # The child's own code failed while constructing: its policy decides.
            qualname = getattr(target, "__qualname__", repr(target))
            message = (
                f"callback '{name}' failed in hook '__init__' (constructing {qualname}): "
                + error_text(exc, self.telemetry_settings.record_exception_messages)
            )
            if policy:
                raise CallbackConfigError(f"{label}: {message}") from exc
            self._child_failed(name, _class_name(target), "__init__", exc, message)
            return None

    def _child_failed(
        self, name: str, class_name: str, hook: str, error: BaseException, message: str
    ) -> None:
        """A child skipped under ``raise_error_on_callback: false``: logged, and recorded
        like a failed hook call (an error span under the startup trace, the outcome metric)."""
        self.failed_children[name] = message
        logger.error("%s (raise_error_on_callback=False, continuing without it)", message)
        try:
            observer = HookObserver(self._observer.tel, name, class_name, self.model_id)
            started = observer.start(
                hook, self.startup_context(), f"{catalog.SPAN_HOOK_PREFIX}{hook} {name}"
            )
            observer.finish(
                hook, started, error,
                record_message=self.telemetry_settings.record_exception_messages,
            )
        except Exception as exc:  # recording must never turn a tolerated failure fatal
            logger.warning("could not record the failure of callback '%s': %s", name, exc)

    # --- pickling: Ray sends the composite to every node's download task -------------------

    def _check_children_pickle(self, when: str = "construction") -> list[Child]:
        """Children Ray could not send to the download tasks: raise for one whose policy is
        to raise, else keep it in the replica only (left out of the pickle) and record why.
        Checked at construction, and again when Ray pickles (state set by a hook since).
        Returns the children that travel."""
        travelling = []
        for index, child in enumerate(self.children):
            problem = None if child.local_only else self._pickle_problem(child)
            if problem is None:
                if not child.local_only:
                    travelling.append(child)
                continue
            message = (
                f"callback '{child.name}' does not survive pickling, which Ray does to send it "
                f"to every node's download task ({when}): {problem}. Create unpicklable "
                "handles (locks, clients, sockets) lazily, or drop them in __getstate__"
            )
            if child.raise_error:
                raise CallbackConfigError(f"callbacks[{index}] ({child.name}): {message}")
            child.local_only = True
            self._child_failed(
                child.name, child.class_name, "__getstate__", _PickleError(problem), message
            )
        return travelling

    def _pickle_problem(self, child: Child) -> str | None:
        instance = child.instance
        if isinstance(instance, RayServeLLMCallback):
            # Shared objects are checked once, with the composite, not per child.
            bad = unpicklable_attributes(instance, skip=(self, self.ctx, self.llm_config))
        elif pickle_error(instance) is None:
            return None
        else:
            bad = unpicklable_attributes(instance)
        if not bad:
            return None
        return "; ".join(f"attribute '{attr}' holds {what}" for attr, what in bad)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if getattr(_PICKLING, "active", False):
            # Re-entered while checking a child (something of its references us): the
            # outer call decides.
            travelling = [c for c in self.children if not c.local_only]
        else:
            _PICKLING.active = True
            try:
                travelling = self._check_children_pickle("at pickling")
            finally:
                _PICKLING.active = False
        if len(travelling) != len(self.children):
            state["children"] = travelling
        return state

    def hook_targets(self) -> list[HookTarget]:
        return [
            HookTarget(c.name, c.instance, c.raise_error, c.timeout_s) for c in self.children
        ]

    def after_unpickle(self) -> None:
        # Children of ours deferred their own after_unpickle to their first ctx read.
        for child in self.children:
            if isinstance(child.instance, RayServeLLMCallback):
                _ = child.instance.ctx

    def startup_ended(self, error: BaseException | str | None) -> None:
        for child in self.children:
            if isinstance(child.instance, RayServeLLMCallback):
                child.instance._notify_startup_ended(error)

    # --- dispatch -----------------------------------------------------------------------------

    def _hook_method(self, method_name: str) -> tuple[Any, bool]:
        # Any hook Ray (or ObservedLLMServer) dispatches goes to the children, including
        # hooks added after this was written.
        impl = getattr(type(self), method_name, None)
        if method_name.startswith("on_") and (
            impl is None
            or impl is getattr(CallbackBase, method_name, None)
            or impl is getattr(RayServeLLMCallback, method_name, None)
        ):
            return None, True
        return super()._hook_method(method_name)

    def _plan(self, hook: str) -> list[tuple[Child, Hook, HookObserver]]:
        """Children implementing ``hook``, with their observers (memoized per process)."""
        cache = self.process_cache
        plan = cache.get(("plan", hook))
        if plan is None:
            tel = self._observer.tel
            plan = []
            for child in self.children:
                fn = child.method(hook, self.ctx)
                if fn is not None:
                    observer = cache.get(("observer", child.name))
                    if observer is None:
                        observer = HookObserver(tel, child.name, child.class_name, self.model_id)
                        cache[("observer", child.name)] = observer
                    plan.append((child, fn, observer))
            cache[("plan", hook)] = plan
        return plan  # type: ignore[no-any-return]

    async def _invoke_async(self, hook: str, method: Any, is_async: bool) -> None:
        if method is not None:  # a subclass's own hook runs first
            await call_async(method, hook, None)
        parent = trace.get_current_span()  # the composite's span for this hook
        for child, fn, observer, before, started in self._starting(hook):
            error: BaseException | None = None
            try:
                await call_async(fn, hook, child.timeout_s)
            except Exception as exc:
                error = exc
            self._after_child(hook, child, before, parent, observer, started, error)

    def _invoke_sync(self, hook: str, method: Any, is_async: bool) -> None:
        if method is not None:
            call_sync(method, hook, None)
        parent = trace.get_current_span()  # the composite's span for this hook
        for child, fn, observer, before, started in self._starting(hook):
            error: BaseException | None = None
            try:
                call_sync(fn, hook, child.timeout_s)
            except Exception as exc:
                error = exc
            self._after_child(hook, child, before, parent, observer, started, error)

    def _starting(self, hook: str) -> Iterator[tuple[Child, Hook, HookObserver, Snapshot, Any]]:
        """Each child implementing ``hook`` as it starts: the ctx before it, its started span."""
        for child, fn, observer in self._plan(hook):
            before = snapshot(self.ctx)
            name = f"{catalog.SPAN_HOOK_PREFIX}{hook} {child.name}"
            yield child, fn, observer, before, observer.start(hook, None, name)

    def _after_child(
        self,
        hook: str,
        child: Child,
        before: Snapshot,
        parent: trace.Span,
        observer: HookObserver,
        started: Any,
        error: BaseException | None,
    ) -> None:
        self._record_changes(child, before, started[0], parent)
        observer.finish(
            hook, started, error,
            record_message=self.telemetry_settings.record_exception_messages,
        )
        if error is None:
            return
        if child.raise_error:
            raise ChildHookError(child.name, hook, error) from error
        logger.error(
            "callback '%s' failed in hook '%s' (raise_error_on_callback=False, continuing): "
            "%s", child.name, hook,
            error_text(error, self.telemetry_settings.record_exception_messages),
        )

    def _record_changes(
        self,
        child: Child,
        before: Snapshot,
        span: trace.Span,
        parent: trace.Span,
    ) -> None:
        changes = self._observer.tel.recorder(catalog.CTX_CHANGES)
        for change in diff(before, snapshot(self.ctx)):
            field = change.field
            attrs = {
                catalog.A_CALLBACK: child.name,
                catalog.A_FIELD: field,
                catalog.A_OLD: change.old,
                catalog.A_NEW: change.new,
            }
            span.add_event(catalog.EVENT_CTX_CHANGE, attrs)
            parent.add_event(catalog.EVENT_CTX_CHANGE, attrs)
            changes.add((self.model_id, child.name, field.split("[", 1)[0]))
            if field == "run_init_node" and change.value is False and self.vetoed_by is None:
                self.vetoed_by = child.name
                parent.add_event(catalog.EVENT_VETO, {catalog.A_CALLBACK: child.name})
                logger.info("callback '%s' turned Ray's node initialization off", child.name)

    def _after_dispatch(self, hook: str, error: BaseException | None) -> None:
        if isinstance(error, ChildHookError):
            # The child asked to raise: Ray sees the error whatever the composite's default.
            self.end_startup(error)
            raise Exception(
                f"Error running callback method '{hook}' on {type(self).__name__}: {error}"
            ) from error
        super()._after_dispatch(hook, error)


def _check_phase_signature(fn: Any, kwargs: dict[str, Any]) -> None:
    try:
        inspect.signature(fn).bind("phase", None, {}, **kwargs)
    except TypeError as exc:
        raise CallbackConfigError(
            f"field 'callback_class': function {getattr(fn, '__qualname__', fn)} must accept "
            f"(phase, llm_config, data) plus callback_kwargs {sorted(kwargs)}: {exc}"
        ) from None
    except ValueError:
        pass  # builtins without a signature: trust them


def _check_kwargs(target: Any, kwargs: dict[str, Any], **fixed: Any) -> None:
    """A class whose ``__init__`` does not take a ``callback_kwargs`` key fails here, naming
    the key, instead of with a TypeError from inside the constructor."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # no signature to check against (C types): the constructor decides
    try:
        signature.bind(**fixed, **kwargs)
    except TypeError as exc:
        raise CallbackConfigError(
            f"field 'callback_kwargs': {getattr(target, '__qualname__', target)} does not "
            f"accept these keyword arguments ({exc})"
        ) from None


def _class_name(target: Any) -> str:
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"


_PICKLING = threading.local()


class _PickleError(TypeError):
    """Stands for a pickling failure in a span and the outcome metric."""


def _prefix(label: str, message: str) -> str:
    return message if message.startswith(label) else f"{label}: {message}"


CompositeCallback = Composite
