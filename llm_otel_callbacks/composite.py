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
from typing import Any

from opentelemetry import trace

from . import catalog
from ._callers import call_async, call_sync, timeout_for
from ._children import (
    _class_name,
    _PickleError,
    _prefix,
    adopt_ctx,
    build_ray_child,
    check_kwargs,
    check_phase_signature,
    check_places,
)
from ._ctx_changes import Snapshot, diff, snapshot
from ._init_output import SEED_CTX_KEY, seed_ctx
from ._observe import HookObserver, error_text
from ._pickling import pickle_error, unpicklable_attributes
from ._ray import CALLBACK_BASES, node_model_downloadable
from ._startup_points import download_result, node_id, server_hooks
from ._validation import CallbackConfigError
from .adapters import (
    NODE_PRE_DOWNLOAD,
    RESERVED_NAMES,
    Child,
    FunctionChild,
    InitializeChild,
    SeedChild,
    Step,
    is_initialize_class,
    is_ray_style,
    is_seed_protocol,
)
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
        indices: list[int] = []
        for index, (spec, target) in enumerate(parse_child_specs(self.options.callbacks)):
            child = self._build_child(index, spec, target)
            if child is not None:
                self.children.append(child)
                indices.append(index)
        check_places(self.children, indices)
        #: Children that turned Ray's node initialization off, in order. A veto stays: a
        #: later child setting ``run_init_node`` back to True is recorded and refused.
        self.vetoed_by: list[str] = []
        #: Ray node id of the replica (set before the pickle): its node's download task
        #: applies the seed field ``local_node_download_model``.
        self.replica_node_id: str | None = None
        self._check_children_pickle("at construction")

    def child(self, name: str) -> Any:
        """The instance behind the child called ``name`` (a seed class, a function, or a Ray
        callback), e.g. to read what it recorded. Raises KeyError naming the children."""
        for child in self.children:
            if child.name == name:
                return child.instance
        raise KeyError(
            f"no child named {name!r}; children: {', '.join(c.name for c in self.children)}"
        )

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
        try:
            if name in RESERVED_NAMES:
                raise CallbackConfigError(
                    f"field 'name': '{name}' is a ctx.custom_data key the composite uses; "
                    "choose another name"
                )
            self.ctx.custom_data.setdefault(name, {})  # the child's namespaced slot
            if is_ray_style(target):
                return Child(name, build_ray_child(self, name, target, kwargs, policy), policy,
                             spec.timeout_s)
            if is_seed_protocol(target):
                check_kwargs(target, kwargs)
                return SeedChild(name, target(**kwargs), policy, spec.timeout_s, self.llm_config)
            if is_initialize_class(target):
                check_kwargs(target, kwargs)
                return InitializeChild(
                    name, target(**kwargs), policy, spec.timeout_s, self.llm_config
                )
            if inspect.isclass(target) and any("__call__" in vars(c) for c in target.__mro__[:-1]):
                # Seed 002's stateful phase callback: a class whose instances are called.
                check_kwargs(target, kwargs)
                instance = target(**kwargs)
                check_phase_signature(instance, {})
                return FunctionChild(name, instance, policy, spec.timeout_s, self.llm_config)
            if inspect.isclass(target):
                raise CallbackConfigError(
                    f"field 'callback_class': {target.__qualname__} is neither a subclass of "
                    "Ray's CallbackBase, nor a seed-protocol class (on_before_init / "
                    "on_before_download / on_after_init; the eight on_pre_* / on_post_* "
                    "hooks; or request hooks on_llm_start / on_llm_end / on_llm_error / "
                    "on_llm_stream_chunk), nor a class with initialize(llm_config) or "
                    "__call__(phase, llm_config, data)"
                )
            fn = functools.partial(target, **kwargs) if kwargs else target
            check_phase_signature(target, kwargs)
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
            HookTarget(c.name, c.instance, c.raise_error, c.timeout_s,
                       c.pool if c.timeout_s is not None else None)
            for c in self.children
        ]

    def after_unpickle(self) -> None:
        # Children of ours deferred their own after_unpickle to their first ctx read.
        for child in self.children:
            if isinstance(child.instance, RayServeLLMCallback):
                _ = child.instance.ctx
        if self.replica_node_id is None:
            return  # not a copy made for a download task
        # In Ray's download task on a node, Ray is about to read the download policy: seed
        # pre-download hooks run now, so what they decide is what this node downloads.
        if self._plan(NODE_PRE_DOWNLOAD, True):
            self.run_callback_sync(NODE_PRE_DOWNLOAD)
        self._apply_node_policy()

    def _apply_node_policy(self) -> None:
        seed = self.ctx.custom_data.get(SEED_CTX_KEY) or {}
        enum = node_model_downloadable()
        if seed.get("skip_download"):
            self.ctx.worker_node_download_model = enum.NONE
            return
        local = seed.get("local_node_download_model")
        if local is not None and self.replica_node_id == node_id():
            self.ctx.worker_node_download_model = local

    def startup_ended(self, error: BaseException | str | None) -> None:
        for child in self.children:
            if isinstance(child.instance, RayServeLLMCallback):
                child.instance._notify_startup_ended(error)

    # --- dispatch -----------------------------------------------------------------------------

    def _hook_method(self, method_name: str) -> tuple[Any, bool]:
        # Any hook Ray (or ObservedLLMServer) dispatches goes to the children, including
        # hooks added after this was written. A hook neither Ray's base, the composite nor
        # any child has raises AttributeError, as Ray's own _get_method does.
        impl = getattr(type(self), method_name, None)
        if method_name.startswith("on_") and (
            impl is None
            or any(impl is getattr(b, method_name, None) for b in CALLBACK_BASES)
            or impl is getattr(RayServeLLMCallback, method_name, None)
        ):
            if impl is None and not any(
                child.steps(method_name, self.ctx, sync) for child in self.children
                for sync in (False, True)
            ):
                raise AttributeError(
                    f"Callback {type(self).__name__} does not have method '{method_name}' "
                    f"(nor does any of its children: {', '.join(self._names()) or 'none'})"
                )
            return None, True
        return super()._hook_method(method_name)

    def _names(self) -> list[str]:
        return [c.name for c in self.children]

    def _plan(self, hook: str, sync: bool) -> list[tuple[Child, Step, HookObserver]]:
        """What runs for ``hook``: each child's steps, stage by stage (list order within a
        stage), with the child's observer. Memoized per process."""
        cache = self.process_cache
        key = ("plan", hook, sync)
        plan = cache.get(key)
        if plan is None:
            tel = self._observer.tel
            ranked = []
            for index, child in enumerate(self.children):
                for step in child.steps(hook, self.ctx, sync):
                    ranked.append((step.rank, index, child, step))
            plan = []
            for _rank, _index, child, step in sorted(ranked, key=lambda r: (r[0], r[1])):
                observer = cache.get(("observer", child.name))
                if observer is None:
                    observer = HookObserver(tel, child.name, child.class_name, self.model_id)
                    cache[("observer", child.name)] = observer
                plan.append((child, step, observer))
            cache[key] = plan
        return plan  # type: ignore[no-any-return]

    def _before_children(self, hook: str) -> None:
        if hook == "on_before_node_init":
            self.replica_node_id = node_id()
            self._warn_without_server()
        elif hook == "on_after_node_init":
            # What Ray's download tasks produced (all nodes agree; Ray keeps one path).
            seed = seed_ctx(self.ctx)
            seed["download_result"] = download_result(self.llm_config, self.ctx)

    def _after_children(self, hook: str) -> None:
        if hook == "on_after_node_init" and not self._defer_startup_end:
            extra = (self.ctx.custom_data.get(SEED_CTX_KEY) or {}).get("extra_init_kwargs")
            if extra:
                logger.warning(
                    "extra_init_kwargs %s were set but Ray's LLMServer has no point to merge "
                    "them into the engine kwargs; set server_cls="
                    "'llm_otel_callbacks.serve.ObservedLLMServer' (they are NOT applied)",
                    sorted(extra),
                )

    def _warn_without_server(self) -> None:
        """Engine or request hooks without ObservedLLMServer never run: say so, once."""
        if self._defer_startup_end or self.process_cache.get("warned_server"):
            return  # ObservedLLMServer armed the engine-start phase
        self.process_cache["warned_server"] = True
        needing = server_hooks(self)
        if needing:
            logger.warning(
                "callback(s) %s implement engine-start or request hooks, which only run with "
                "server_cls='llm_otel_callbacks.serve.ObservedLLMServer' in the LLMConfig; "
                "without it they never run", "; ".join(needing),
            )

    def _runs(self, step: Step) -> bool:
        return not step.only_if_replaced or not self.ctx.run_init_node

    async def _invoke_async(self, hook: str, method: Any, is_async: bool) -> None:
        if method is not None:  # a subclass's own hook runs first
            await call_async(method, hook, None)
        self._before_children(hook)
        parent = trace.get_current_span()  # the composite's span for this hook
        for child, step, observer in self._plan(hook, False):
            if not self._runs(step):
                continue
            before = snapshot(self.ctx)
            started = observer.start(hook, None, f"{catalog.SPAN_HOOK_PREFIX}{hook} {child.name}")
            error: BaseException | None = None
            result: Any = None
            try:
                timeout = timeout_for(child.timeout_s, hook)
                result = await call_async(step.fn, hook, timeout,
                                          pool=child.pool if timeout is not None else None)
            except Exception as exc:
                error = exc
            self._after_child(hook, child, before, parent, observer, started, error, result)
        self._after_children(hook)

    def _invoke_sync(self, hook: str, method: Any, is_async: bool) -> None:
        if method is not None:
            call_sync(method, hook, None)
        self._before_children(hook)
        parent = trace.get_current_span()  # the composite's span for this hook
        for child, step, observer in self._plan(hook, True):
            if not self._runs(step):
                continue
            before = snapshot(self.ctx)
            started = observer.start(hook, None, f"{catalog.SPAN_HOOK_PREFIX}{hook} {child.name}")
            error: BaseException | None = None
            result: Any = None
            try:
                timeout = timeout_for(child.timeout_s, hook)
                result = call_sync(step.fn, hook, timeout,
                                   pool=child.pool if timeout is not None else None)
            except Exception as exc:
                error = exc
            self._after_child(hook, child, before, parent, observer, started, error, result)
        self._after_children(hook)

    def _after_child(
        self,
        hook: str,
        child: Child,
        before: Snapshot,
        parent: trace.Span,
        observer: HookObserver,
        started: Any,
        error: BaseException | None,
        result: Any = None,
    ) -> None:
        if child.kind == "ray":
            adopt_ctx(self.ctx, child.instance)  # it may have assigned a new ctx to self.ctx
        self._record_changes(child, before, started[0], parent)
        if result is False and hook == "on_before_node_init":
            self._note_veto(child.name, parent)  # also when node init was already off
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
            if field == "run_init_node" and change.value is False:
                self._note_veto(child.name, parent)
            elif field == "run_init_node" and change.value is True and self.vetoed_by:
                # A veto stays a veto: the change is recorded above, and refused here.
                self.ctx.run_init_node = False
                event = {catalog.A_CALLBACK: child.name, catalog.A_VETOED_BY: self.vetoed_by}
                span.add_event(catalog.EVENT_VETO_KEPT, event)
                parent.add_event(catalog.EVENT_VETO_KEPT, event)
                logger.warning(
                    "callback '%s' set ctx.run_init_node back to True after %s turned Ray's "
                    "node initialization off; refused, node init stays off",
                    child.name, ", ".join(self.vetoed_by),
                )

    def _note_veto(self, name: str, parent: trace.Span) -> None:
        if name in self.vetoed_by:
            return
        self.vetoed_by.append(name)
        parent.add_event(
            catalog.EVENT_VETO, {catalog.A_CALLBACK: name, catalog.A_VETOED_BY: self.vetoed_by}
        )
        logger.info("callback '%s' turned Ray's node initialization off", name)

    def _after_dispatch(self, hook: str, error: BaseException | None) -> None:
        if isinstance(error, ChildHookError):
            # The child asked to raise: Ray sees the error whatever the composite's default.
            self.end_startup(error)
            raise Exception(
                f"Error running callback method '{hook}' on {type(self).__name__}: {error}"
            ) from error
        super()._after_dispatch(hook, error)


_PICKLING = threading.local()


CompositeCallback = Composite
