"""Every style of child, one shape: a name, a policy, and ``steps(hook)``.

* Ray style: a subclass of Ray's ``CallbackBase`` (public or internal; ours included); hooks
  are its methods. A child that overrides ``run_callback`` / ``run_callback_sync`` /
  ``_handle_callback_error`` is dispatched through them, as Ray would.
* Seed protocol (000/001 three hooks, 003 eight hooks): ``on_before_init(ctx)`` ... or
  ``on_pre_initialization(ctx)`` ..., sync or async.
* The original full replacement: ``initialize(llm_config)`` returning a placement group,
  runtime env and extra init kwargs (an object with those attributes, or a mapping).
* Phase function (002): ``fn(phase, llm_config, data)``, or a class with ``__call__``.

Each Ray hook the composite dispatches has ordered *stages*; a seed method or a phase runs
in its stage, and within a stage children run in list order (see :data:`STAGES` and
docs/seeds.md for the mapping and what Ray 2.60 cannot honour).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ._callers import BoundedPool, Timeout
from ._init_output import SEED_CTX_KEY, apply_init_output, seed_ctx
from ._ray import CALLBACK_BASES, CallbackCtx, node_model_downloadable

logger = logging.getLogger(__name__)

#: Seed-style pre-download hooks run here: on every node of the placement group, in Ray's
#: download task, *before* Ray reads ``ctx.worker_node_download_model`` (Ray's own
#: ``on_before_download_model_files_distributed`` runs after it has read the policy).
NODE_PRE_DOWNLOAD = "on_before_node_download"
ENGINE_HOOKS: tuple[str, ...] = ("on_before_engine_start", "on_after_engine_start")
#: The request hooks (called by ``serve.ObservedLLMServer``, see ``_request_hooks``).
REQUEST_HOOKS: tuple[str, ...] = (
    "on_llm_start", "on_llm_end", "on_llm_error", "on_llm_stream_chunk",
)

#: Ray hook (as dispatched on the composite) -> its stages, in order.
STAGES: dict[str, tuple[str, ...]] = {
    "on_before_node_init": ("pre_initialization", "custom_initialization"),
    NODE_PRE_DOWNLOAD: ("pre_download",),
    "on_after_node_init": ("post_download", "pre_placement_group", "post_placement_group"),
    "on_before_engine_start": ("pre_engine_init",),
    "on_after_engine_start": ("post_engine_init", "post_initialization"),
}
_STAGE_AT: dict[str, tuple[str, int]] = {
    stage: (hook, rank) for hook, stages in STAGES.items() for rank, stage in enumerate(stages)
}
#: Seed method -> stage (000/001 and 003 names; a class may mix them).
SEED_METHODS: dict[str, str] = {
    "on_before_init": "pre_initialization",
    "on_pre_initialization": "pre_initialization",
    "on_before_download": "pre_download",
    "on_pre_download": "pre_download",
    "on_after_init": "post_download",
    "on_post_download": "post_download",
    "on_pre_placement_group": "pre_placement_group",
    "on_post_placement_group": "post_placement_group",
    "on_before_engine_init": "pre_engine_init",
    "on_pre_engine_init": "pre_engine_init",
    "on_after_engine_init": "post_engine_init",
    "on_post_engine_init": "post_engine_init",
    "on_post_initialization": "post_initialization",
}
#: The phases of seed 002 a phase function is called with (custom_initialization only
#: after ``skip_default`` or an ``initialize()`` child).
FUNCTION_PHASES: tuple[str, ...] = (
    "pre_initialization", "custom_initialization", "pre_download", "post_download",
    "post_placement_group", "pre_engine_init", "post_engine_init", "post_initialization",
)
#: Stages that need ObservedLLMServer (Ray 2.60's LLMServer calls no hook there).
SERVER_STAGES = frozenset({"pre_engine_init", "post_engine_init", "post_initialization"})

#: CallbackCtx fields besides custom_data (read from Ray's dataclass, so new ones are seen).
CTX_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(CallbackCtx) if f.name != "custom_data"
)
#: Seed ctx fields Ray's CallbackCtx lacks, kept in ``ctx.custom_data[SEED_CTX_KEY]``:
#: ``local_node_download_model`` (the policy of the replica's own node),
#: ``extra_init_kwargs`` (merged into the engine kwargs by ObservedLLMServer) and
#: ``download_result`` (read-only: the model path Ray's download tasks returned).
SEED_FIELDS: tuple[str, ...] = ("local_node_download_model", "extra_init_kwargs", "download_result")
#: ``ctx.custom_data`` key of the ``data`` dict all phase functions share (seed 002).
PHASE_DATA_KEY = "phase_data"
RESERVED_NAMES = frozenset({SEED_CTX_KEY, PHASE_DATA_KEY})

Hook = Callable[[], Any]


class Step(NamedTuple):
    """One call a child makes for a hook: its stage's rank, and the zero-argument call."""

    rank: int
    fn: Hook
    stage: str = ""
    only_if_replaced: bool = False
    """Run only when Ray's node initialization is being replaced (custom_initialization)."""


def is_ray_style(obj: Any) -> bool:
    return inspect.isclass(obj) and issubclass(obj, CALLBACK_BASES)


def is_seed_protocol(obj: Any) -> bool:
    """A plain class with seed hooks (000/001 or 003) or request hooks, or both (a class with
    only request hooks is a seed-protocol child whose startup hooks are no-ops)."""
    return inspect.isclass(obj) and any(
        hasattr(obj, m) for m in (*SEED_METHODS, *REQUEST_HOOKS)
    )


def is_initialize_class(obj: Any) -> bool:
    """The original full replacement: a class with ``initialize(llm_config)``."""
    return inspect.isclass(obj) and callable(getattr(obj, "initialize", None))


def coerce_ctx_value(field: str, value: Any) -> Any:
    """Seed-style code sets download policies by name; Ray wants the enum."""
    if field in ("worker_node_download_model", "local_node_download_model") and isinstance(
        value, str
    ):
        enum = node_model_downloadable()
        try:
            return enum[value.strip().upper()]
        except KeyError:
            allowed = ", ".join(m.name for m in enum)
            raise ValueError(f"{field}: unknown value {value!r}; allowed: {allowed}") from None
    return value


def _is_default(cls: type, name: str) -> bool:
    """Whether ``cls.name`` is a base implementation (Ray's, or ours) and not the child's."""
    from .base import RayServeLLMCallback

    impl = getattr(cls, name, None)
    return impl is None or any(
        impl is getattr(base, name, None) for base in (*CALLBACK_BASES, RayServeLLMCallback)
    )


_DISPATCH = ("run_callback", "run_callback_sync", "_handle_callback_error")


class Child:
    """A composite child of Ray's style."""

    kind = "ray"

    def __init__(self, name: str, instance: Any, raise_error: bool, timeout_s: Timeout) -> None:
        self.name = name
        self.instance = instance
        self.raise_error = raise_error
        self.timeout_s = timeout_s
        #: Set when the child cannot be pickled (policy: log): it runs in the replica only.
        self.local_only = False
        cls = instance if inspect.isfunction(instance) else type(instance)
        self.class_name = f"{cls.__module__}.{cls.__qualname__}"
        self._pool: BoundedPool | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pool"] = None  # threads are per process
        return state

    @property
    def pool(self) -> BoundedPool:
        """This child's workers for timed sync hooks (per process, created on first use)."""
        if self._pool is None:
            self._pool = BoundedPool()
        return self._pool

    def steps(self, hook: str, ctx: Any, sync: bool) -> list[Step]:
        """What runs for ``hook`` (empty: nothing; a hook nobody implements costs nothing)."""
        instance = self.instance
        fn = getattr(instance, hook, None)
        if fn is None or not callable(fn):
            return []
        # Ray's CallbackBase ships no-op hooks; a child that did not override one is skipped.
        if _is_default(type(instance), hook):
            return []
        rank = _STAGE_AT.get(STAGES.get(hook, ("",))[0], ("", 0))[1]
        if not all(_is_default(type(instance), name) for name in _DISPATCH):
            # The child customised Ray's dispatch: run the hook the way Ray would.
            if sync:
                return [Step(rank, functools.partial(instance.run_callback_sync, hook))]
            return [Step(rank, functools.partial(instance.run_callback, hook))]
        return [Step(rank, fn)]


def _stage_step(stage: str, fn: Hook, only_if_replaced: bool = False) -> tuple[str, Step]:
    hook, rank = _STAGE_AT[stage]
    return hook, Step(rank, fn, stage, only_if_replaced)


class _ConfigChild(Child):
    """A child whose hooks are handed the ``LLMConfig`` (seed, initialize and phase styles)."""

    def __init__(
        self, name: str, instance: Any, raise_error: bool, timeout_s: Timeout, llm_config: Any
    ) -> None:
        super().__init__(name, instance, raise_error, timeout_s)
        self.llm_config = llm_config


class SeedChild(_ConfigChild):
    """A seed-protocol class (000/001 or 003): each method runs in its stage, on a view of
    the ctx with ``llm_config`` and the seed-only fields."""

    kind = "seed"

    def steps(self, hook: str, ctx: Any, sync: bool) -> list[Step]:
        out = []
        for method, stage in SEED_METHODS.items():
            if _STAGE_AT[stage][0] != hook:
                continue
            fn = getattr(self.instance, method, None)
            if fn is None or not callable(fn):
                continue
            out.append(_stage_step(stage, self._runner(fn, method, stage, ctx))[1])
        return out

    def _runner(self, fn: Callable[..., Any], method: str, stage: str, ctx: Any) -> Hook:
        view = SeedCtxView(ctx, self.llm_config, self.name, stage)
        name = self.name

        def apply(result: Any, before_pg: Any) -> Any:
            _apply_seed_result(ctx, name, method, stage, result, before_pg)
            return result

        if inspect.iscoroutinefunction(fn):

            async def run_async() -> Any:
                before_pg = ctx.placement_group
                return apply(await fn(view), before_pg)

            return run_async

        def run() -> Any:
            before_pg = ctx.placement_group
            result = fn(view)
            if inspect.isawaitable(result):

                async def finish() -> Any:
                    return apply(await result, before_pg)

                return finish()
            return apply(result, before_pg)

        return run


def _apply_seed_result(
    ctx: Any, name: str, method: str, stage: str, result: Any, before_pg: Any
) -> None:
    """What a seed hook's return value means (``False`` in the three stages where the seeds
    give it a meaning); any other non-None value is warned about, never silently dropped."""
    if result is None or result is True:
        return
    if result is False and stage == "pre_initialization":
        ctx.run_init_node = False  # skip Ray's node initialization
    elif result is False and stage == "pre_download":
        ctx.worker_node_download_model = node_model_downloadable().NONE
        seed_ctx(ctx)["skip_download"] = name
    elif result is False and stage == "pre_placement_group":
        if ctx.placement_group is None or ctx.placement_group is before_pg:
            raise ValueError(
                f"{method} returned False (skip Ray's placement group) but did not set "
                "ctx.placement_group to a placement group of its own"
            )
    else:
        logger.warning(
            "callback '%s': the value %s returned from %s has no meaning there and is not "
            "used (only False from on_before_init/on_pre_initialization, on_before_download/"
            "on_pre_download and on_pre_placement_group means something)",
            name, type(result).__name__, method,
        )


class InitializeChild(_ConfigChild):
    """The original full replacement: ``initialize(llm_config)`` replaces Ray's node
    initialization (in the custom_initialization stage of ``on_before_node_init``)."""

    kind = "initialize"

    def steps(self, hook: str, ctx: Any, sync: bool) -> list[Step]:
        if hook != "on_before_node_init":
            return []
        fn = self.instance.initialize
        where = f"callback '{self.name}': initialize()"

        def run() -> Any:
            result = fn(self.llm_config)
            if inspect.isawaitable(result):

                async def finish() -> bool:
                    apply_init_output(ctx, await result, where)
                    return False  # replaced: a veto of Ray's node initialization

                return finish()
            apply_init_output(ctx, result, where)
            return False

        return [_stage_step("custom_initialization", run)[1]]


class FunctionChild(_ConfigChild):
    """A phase function (or a callable object): called once per phase with a ``data`` dict
    all phase functions of the composite share (seed 002's ``CallbackRunner.data``)."""

    kind = "function"

    def steps(self, hook: str, ctx: Any, sync: bool) -> list[Step]:
        out = []
        for phase in FUNCTION_PHASES:
            if _STAGE_AT[phase][0] == hook:
                out.append(
                    _stage_step(phase, self._runner(phase, ctx),
                                only_if_replaced=phase == "custom_initialization")[1]
                )
        return out

    def _runner(self, phase: str, ctx: Any) -> Hook:
        fn = self.instance
        llm_config = self.llm_config

        def run() -> Any:
            data, given = _phase_data(ctx)
            had_skip = bool(data.get("skip_default"))  # set by an earlier function?
            result = fn(phase, llm_config, data)
            if inspect.isawaitable(result):

                async def finish() -> bool | None:
                    return _write_back(ctx, data, given, await result, phase, had_skip)

                return finish()
            return _write_back(ctx, data, given, result, phase, had_skip)

        return run


def _phase_data(ctx: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shared ``data`` with the ctx and seed fields filled in (and what was filled in)."""
    data: dict[str, Any] = ctx.custom_data.setdefault(PHASE_DATA_KEY, {})
    seed = seed_ctx(ctx)
    given = {f: getattr(ctx, f) for f in CTX_FIELDS}
    for f in SEED_FIELDS:
        given[f] = seed.get(f)
    data.update(given)
    return data, given


def _write_back(
    ctx: Any, data: dict[str, Any], given: dict[str, Any], result: Any, phase: str,
    had_skip: bool = False,
) -> bool | None:
    """Apply what a phase function set or returned; False when it vetoed node init."""
    if isinstance(result, Mapping):
        data.update(result)
    elif result is not None:
        logger.warning(
            "phase function returned a %s in phase '%s'; only a dict (merged into data) is "
            "used", type(result).__name__, phase,
        )
    seed = seed_ctx(ctx)
    for key in list(data):
        value = data[key]
        if key in given:
            del data[key]  # ctx and seed fields live on the ctx, not in data
            if value is given[key]:
                continue
            if key in CTX_FIELDS:
                value = coerce_ctx_value(key, value)
                if getattr(ctx, key) != value or getattr(ctx, key) is not value:
                    setattr(ctx, key, value)
            elif key == "download_result":
                logger.warning("phase '%s' changed download_result, which is read-only", phase)
            else:
                seed[key] = coerce_ctx_value(key, value)
    if data.get("skip_default") and phase == "pre_initialization":
        ctx.run_init_node = False
        if not had_skip:
            return False  # this function vetoed (not one before it)
    return None


class SeedCtxView:
    """What a seed-protocol hook sees as ``ctx``: Ray's CallbackCtx (reads and writes go
    straight to it) plus ``llm_config`` and the seed-only fields."""

    __slots__ = ("_ctx", "_name", "_stage", "llm_config")

    def __init__(self, ctx: Any, llm_config: Any, name: str, stage: str) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "llm_config", llm_config)

    def __getattr__(self, item: str) -> Any:
        if item in SEED_FIELDS:
            seed = seed_ctx(self._ctx)
            if item == "extra_init_kwargs":
                return seed.setdefault(item, {})  # seed code edits it in place
            return seed.get(item)
        return getattr(self._ctx, item)

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "llm_config":
            raise AttributeError("ctx.llm_config is read-only")
        if key == "download_result":
            raise AttributeError("ctx.download_result is read-only (Ray's download made it)")
        if key not in CTX_FIELDS and key not in SEED_FIELDS and key != "custom_data":
            raise AttributeError(
                f"CallbackCtx has no field '{key}'; fields: "
                f"{', '.join((*CTX_FIELDS, *SEED_FIELDS))}, custom_data"
            )
        _warn_if_too_late(self._name, self._stage, key)
        value = coerce_ctx_value(key, value)
        if key in SEED_FIELDS:
            seed_ctx(self._ctx)[key] = value
        else:
            setattr(self._ctx, key, value)


_DOWNLOADED = frozenset({"post_download", "pre_placement_group", "post_placement_group",
                         "pre_engine_init", "post_engine_init", "post_initialization"})
_ENGINE_BUILT = frozenset({"post_engine_init", "post_initialization"})


def _warn_if_too_late(name: str, stage: str, key: str) -> None:
    """A change Ray can no longer act on is said, never silently dropped."""
    late = (
        (key in ("worker_node_download_model", "local_node_download_model")
         and stage in _DOWNLOADED)
        or (key == "run_init_node" and stage in _DOWNLOADED)
        or (key == "extra_init_kwargs" and stage in _ENGINE_BUILT)
        or (key == "runtime_env" and stage in _ENGINE_BUILT)
        or (key == "placement_group" and stage in _ENGINE_BUILT)
    )
    if late:
        logger.warning(
            "callback '%s' set ctx.%s in stage '%s', after Ray used it: it has no effect on "
            "this replica (see docs/seeds.md for where each field is read)", name, key, stage,
        )
