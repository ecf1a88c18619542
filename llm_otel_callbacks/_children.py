"""Building a composite's Ray-style children as Ray would (their ``__init__`` sees the
replica's ctx), keeping one shared ctx, and the early checks of an entry's kwargs."""

from __future__ import annotations

import inspect
from typing import Any

from ._validation import CallbackConfigError
from .adapters import CTX_FIELDS
from .base import BUILDING_CHILD, RayServeLLMCallback


def build_ray_child(
    composite: Any, name: str, target: Any, kwargs: dict[str, Any], policy: bool
) -> Any:
    """Construct a Ray-style child as Ray would, except that its ``__init__`` already
    sees the replica's ctx (placement group, download policy, ...): what it writes
    there reaches the one ctx Ray reads."""
    if issubclass(target, RayServeLLMCallback):
        kwargs["callback_name"] = name
        for field, where in (("telemetry", "on the composite's own callback_kwargs"),
                             ("timeout_s", "on the composite's entry for this child")):
            if field in kwargs:
                raise CallbackConfigError(
                    f"field 'callback_kwargs.{field}': set '{field}' {where}"
                )
    check_kwargs(
        target, kwargs, llm_config=None, raise_error_on_callback=True, ctx_kwargs=None,
    )
    given = {f: getattr(composite.ctx, f) for f in CTX_FIELDS}
    token = BUILDING_CHILD.set(True)
    try:
        instance = target(
            llm_config=composite.llm_config,
            raise_error_on_callback=policy,
            ctx_kwargs={**given, "custom_data": composite.ctx.custom_data},
            **kwargs,
        )
    finally:
        BUILDING_CHILD.reset(token)
    adopt_ctx(composite.ctx, instance, given)
    if isinstance(instance, RayServeLLMCallback):
        instance.startup_owner = composite
        # The composite ends the replica's startup, never a child's own dispatch.
        instance._defer_startup_end = True
        # Spans a child makes itself (Timing's phases) go where the composite's go.
        instance.telemetry_settings = composite.telemetry_settings
    return instance


def adopt_ctx(shared: Any, instance: Any, given: dict[str, Any] | None = None) -> None:
    """Make ``instance.ctx`` the shared ctx again, keeping what the child wrote to the
    ctx object it had (its own from ``__init__``, or one it assigned to ``self.ctx``)."""
    own = getattr(instance, "ctx", None)
    if own is shared:
        return
    if own is not None:
        for field in CTX_FIELDS:
            value = getattr(own, field, None)
            if given is None or value is not given[field]:
                setattr(shared, field, value)
        data = getattr(own, "custom_data", None)
        if isinstance(data, dict) and data is not shared.custom_data:
            shared.custom_data.update(data)
    instance.ctx = shared  # one ctx for all: what a child sets, Ray reads


def check_phase_signature(fn: Any, kwargs: dict[str, Any]) -> None:
    try:
        inspect.signature(fn).bind("phase", None, {}, **kwargs)
    except TypeError as exc:
        raise CallbackConfigError(
            f"field 'callback_class': function {getattr(fn, '__qualname__', fn)} must accept "
            f"(phase, llm_config, data) plus callback_kwargs {sorted(kwargs)}: {exc}"
        ) from None
    except ValueError:
        pass  # builtins without a signature: trust them


def check_kwargs(target: Any, kwargs: dict[str, Any], **fixed: Any) -> None:
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


class _PickleError(TypeError):
    """Stands for a pickling failure in a span and the outcome metric."""


def _prefix(label: str, message: str) -> str:
    return message if message.startswith(label) else f"{label}: {message}"


def check_places(children: list[Any], indices: list[int]) -> None:
    """Let each child of ours refuse what runs before it (``check_callbacks_before``);
    ``indices``: each child's position in the ``callbacks`` list, for the message."""
    for i, (index, child) in enumerate(zip(indices, children, strict=True)):
        if isinstance(child.instance, RayServeLLMCallback):
            try:
                child.instance.check_callbacks_before([c.instance for c in children[:i]])
            except CallbackConfigError as exc:
                raise CallbackConfigError(f"callbacks[{index}] ({child.name}): {exc}") from None
