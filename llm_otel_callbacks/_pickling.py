"""Which attribute of an object stops it from being pickled, as Ray pickles it.

Ray sends the LLMConfig, with the callback on it, into one task per node; a lock or a socket
on a callback fails there with only ``cannot pickle '_thread.lock' object``. This names the
attribute, so the message can say which child and which field to fix.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def dumps(obj: Any) -> bytes:
    from ray import cloudpickle  # what Ray itself serializes task arguments with

    return cloudpickle.dumps(obj)  # type: ignore[no-any-return,no-untyped-call]


def pickle_error(obj: Any) -> BaseException | None:
    try:
        dumps(obj)
    except Exception as exc:
        return exc
    return None


def _state(obj: Any) -> dict[str, Any] | None:
    try:
        state = obj.__getstate__()
    except Exception:
        state = getattr(obj, "__dict__", None)
    return state if isinstance(state, dict) else None


def unpicklable_attributes(obj: Any, skip: Iterable[Any] = ()) -> list[tuple[str, str]]:
    """(attribute, "<type>: <error>") for each attribute of ``obj``'s pickled state that
    does not pickle. Values in ``skip`` (by identity: the shared ctx, the LLMConfig, the
    composite itself) are not checked here. An object without a dict state is checked
    whole, under the name ``(object)``."""
    skipped = {id(v) for v in skip}
    state = _state(obj)
    if state is None:
        error = pickle_error(obj)
        return [] if error is None else [("(object)", _describe(obj, error))]
    found: list[tuple[str, str]] = []
    for key, value in state.items():
        if id(value) in skipped:
            continue
        error = pickle_error(value)
        if error is not None:
            found.append((str(key), _describe(value, error)))
    return found


def _describe(value: Any, error: BaseException) -> str:
    kind = type(value)
    return f"a {kind.__module__}.{kind.__qualname__} ({type(error).__name__}: {error})"
