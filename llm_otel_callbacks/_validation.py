"""Turn pydantic validation failures into one early, pointed error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ValidationError

M = TypeVar("M", bound=BaseModel)


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads True as 1: a limit or timeout of "true" is a mistake.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


#: A float field that refuses booleans (ints and floats are fine).
Number = Annotated[float, BeforeValidator(_not_bool)]
#: An int field that refuses booleans.
Count = Annotated[int, BeforeValidator(_not_bool)]


class CallbackConfigError(ValueError):
    """Raised at construction when a callback's kwargs or config are wrong.

    The message names where the problem is (entry, field) and what is allowed, and never
    echoes the value of a field that may hold a secret.
    """


def validate_kwargs(model: type[M], data: Mapping[str, Any] | None, where: str) -> M:
    """Validate ``data`` against ``model``; raise :class:`CallbackConfigError` naming ``where``."""
    try:
        return model.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise CallbackConfigError(describe(exc, where)) from None


def describe(exc: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid configuration"]
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(clip(str(p)) for p in err["loc"]) or "(root)"
        lines.append(f"  - field '{loc}': {err['msg']}")
    return "\n".join(lines)


def clip(text: str, limit: int = 80) -> str:
    """A name for an error message: printable, and short even when the input is huge (an
    unknown key of a megabyte must not become a megabyte log line)."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else f"{text[: limit - 3]}... ({len(text)} chars)"
