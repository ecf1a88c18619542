"""Three styles of child, one shape: a name, a policy, and ``method(hook)``.

* Ray style: a subclass of Ray's ``CallbackBase`` (ours included); hooks are its methods.
* Seed protocol: a class with ``on_before_init(ctx)`` / ``on_before_download(ctx)`` /
  ``on_after_init(ctx)`` (sync or async); ``on_before_init`` returning ``False`` skips Ray's
  node initialization.
* Phase function: ``fn(phase, llm_config, data)``; a returned dict is merged into ``data``.

Mapping onto Ray's hooks:

=============================================  ==========================  =========================
Ray hook                                       seed protocol method        phase-function phase(s)
=============================================  ==========================  =========================
``on_before_node_init``                        ``on_before_init``          ``pre_initialization``
``on_before_download_model_files_distributed``  ``on_before_download``      ``pre_download``
``on_after_node_init``                         ``on_after_init``           ``post_download``,
                                                                           ``post_initialization``
``on_before_engine_start``                     ``on_before_engine_init``   ``pre_engine_init``
``on_after_engine_start``                      ``on_after_engine_init``    ``post_engine_init``
=============================================  ==========================  =========================
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable
from typing import Any

from ._ray import CallbackBase, CallbackCtx, node_model_downloadable

logger = logging.getLogger(__name__)

SEED_METHODS: dict[str, str] = {
    "on_before_node_init": "on_before_init",
    "on_before_download_model_files_distributed": "on_before_download",
    "on_after_node_init": "on_after_init",
    "on_before_engine_start": "on_before_engine_init",
    "on_after_engine_start": "on_after_engine_init",
}
PHASES: dict[str, tuple[str, ...]] = {
    "on_before_node_init": ("pre_initialization",),
    "on_before_download_model_files_distributed": ("pre_download",),
    "on_after_node_init": ("post_download", "post_initialization"),
    "on_before_engine_start": ("pre_engine_init",),
    "on_after_engine_start": ("post_engine_init",),
}
#: CallbackCtx fields besides custom_data (read from Ray's dataclass, so new ones are seen).
CTX_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(CallbackCtx) if f.name != "custom_data"
)
#: Seed-protocol fields Ray's CallbackCtx does not have: kept in the child's slot, with a
#: warning, rather than silently dropped.
_SEED_ONLY_FIELDS = ("local_node_download_model", "extra_init_kwargs")

Hook = Callable[[], Any]


#: The request hooks (called by ``serve.ObservedLLMServer``, see ``_request_hooks``).
REQUEST_HOOKS: tuple[str, ...] = (
    "on_llm_start", "on_llm_end", "on_llm_error", "on_llm_stream_chunk",
)


def is_seed_protocol(obj: Any) -> bool:
    """A plain class with startup hooks of the seed protocol or request hooks, or both (a
    class with only request hooks is a seed-protocol child whose startup hooks are no-ops)."""
    return inspect.isclass(obj) and any(
        hasattr(obj, m) for m in (*SEED_METHODS.values(), *REQUEST_HOOKS)
    )


def coerce_ctx_value(field: str, value: Any) -> Any:
    """Seed-style code sets download policies by name; Ray wants the enum."""
    if field == "worker_node_download_model" and isinstance(value, str):
        enum = node_model_downloadable()
        try:
            return enum[value.strip().upper()]
        except KeyError:
            allowed = ", ".join(m.name for m in enum)
            raise ValueError(
                f"worker_node_download_model: unknown value {value!r}; allowed: {allowed}"
            ) from None
    return value


class Child:
    """A composite child of any style."""

    kind = "ray"

    def __init__(
        self, name: str, instance: Any, raise_error: bool, timeout_s: float | None
    ) -> None:
        self.name = name
        self.instance = instance
        self.raise_error = raise_error
        self.timeout_s = timeout_s
        #: Set when the child cannot be pickled (policy: log): it runs in the replica only.
        self.local_only = False
        cls = instance if inspect.isfunction(instance) else type(instance)
        self.class_name = f"{cls.__module__}.{cls.__qualname__}"

    def method(self, hook: str, ctx: Any) -> Hook | None:
        """The zero-argument callable (sync or async) running ``hook``, or None to skip."""
        fn = getattr(self.instance, hook, None)
        if fn is None or not callable(fn):
            return None
        # Ray's CallbackBase ships no-op hooks; a child that did not override one is skipped
        # so a hook nobody implements costs nothing.
        impl = getattr(type(self.instance), hook, None)
        if impl is not None and getattr(CallbackBase, hook, None) is impl:
            return None
        return fn  # type: ignore[no-any-return]


class SeedChild(Child):
    kind = "seed"

    def __init__(
        self, name: str, instance: Any, raise_error: bool, timeout_s: float | None,
        llm_config: Any,
    ) -> None:
        super().__init__(name, instance, raise_error, timeout_s)
        self.llm_config = llm_config

    def method(self, hook: str, ctx: Any) -> Hook | None:
        seed_name = SEED_METHODS.get(hook, hook)
        fn = getattr(self.instance, seed_name, None)
        if fn is None or not callable(fn):
            return None
        view = SeedCtxView(ctx, self.llm_config, self.name)
        veto = hook == "on_before_node_init"

        def apply(result: Any) -> Any:
            if veto and result is False:
                ctx.run_init_node = False
            return result

        if inspect.iscoroutinefunction(fn):

            async def run_async() -> Any:
                return apply(await fn(view))

            return run_async

        def run() -> Any:
            return apply(fn(view))

        return run


class FunctionChild(Child):
    kind = "function"

    def __init__(
        self, name: str, instance: Any, raise_error: bool, timeout_s: float | None,
        llm_config: Any,
    ) -> None:
        super().__init__(name, instance, raise_error, timeout_s)
        self.llm_config = llm_config

    def method(self, hook: str, ctx: Any) -> Hook | None:
        phases = PHASES.get(hook)
        if phases is None:
            return None
        fn = self.instance
        name = self.name

        def run() -> None:
            slot = ctx.custom_data.setdefault(name, {})
            for phase in phases:
                data = {**slot, **{f: getattr(ctx, f) for f in CTX_FIELDS}}
                result = fn(phase, self.llm_config, data)
                if isinstance(result, dict):
                    data.update(result)
                _write_back(ctx, slot, data)

        return run


def _write_back(ctx: Any, slot: dict[str, Any], data: dict[str, Any]) -> None:
    for key, value in data.items():
        if key in CTX_FIELDS:
            value = coerce_ctx_value(key, value)
            if getattr(ctx, key) is not value and getattr(ctx, key) != value:
                setattr(ctx, key, value)
        elif key == "skip_default":
            if value:
                ctx.run_init_node = False
        else:
            slot[key] = value


class SeedCtxView:
    """What a seed-protocol hook sees as ``ctx``: Ray's CallbackCtx (reads and writes go
    straight to it) plus ``llm_config``; fields Ray lacks land in the child's slot."""

    __slots__ = ("_ctx", "_name", "llm_config")

    def __init__(self, ctx: Any, llm_config: Any, name: str) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "llm_config", llm_config)

    def __getattr__(self, item: str) -> Any:
        if item in _SEED_ONLY_FIELDS:
            return self._ctx.custom_data.get(self._name, {}).get(item)
        return getattr(self._ctx, item)

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "llm_config":
            raise AttributeError("ctx.llm_config is read-only")
        if key in _SEED_ONLY_FIELDS:
            logger.warning(
                "callback '%s' set ctx.%s, which Ray %s's CallbackCtx does not have; it is "
                "kept in ctx.custom_data['%s'] and has no effect on Ray",
                self._name, key, _ray_version(), self._name,
            )
            self._ctx.custom_data.setdefault(self._name, {})[key] = value
            return
        if key not in CTX_FIELDS and key != "custom_data":
            raise AttributeError(
                f"CallbackCtx has no field '{key}'; fields: {', '.join(CTX_FIELDS)}, custom_data"
            )
        setattr(self._ctx, key, coerce_ctx_value(key, value))


def _ray_version() -> str:
    try:
        import ray

        return str(ray.__version__)
    except Exception:
        return "?"
