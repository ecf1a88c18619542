"""What a callback changed in the ``CallbackCtx``: snapshots, their diff, and secret-safe
summaries of the values for span events.

A snapshot holds, per ctx field and ``custom_data`` key, the value's identity, a ``repr``
fingerprint (which catches in-place edits; it is compared, never emitted), the value, and for a
mutable container its summary at that moment (the "old" side of an in-place edit).
Summaries never carry a secret: ``custom_data`` values (anything a callback put there: a token,
a mirror URL with a password) are shown by type, size and keys only; typed fields keep their
values (a download policy, a placement group id), except fields whose name hints at a secret
and ``runtime_env``, shown by length, with ``env_vars`` by name only.
"""

from __future__ import annotations

import typing
from typing import Any

from .adapters import CTX_FIELDS

_SECRET_HINTS = ("key", "token", "secret", "password", "passwd", "auth", "credential")

#: (type name, size, dict keys) of a container when the snapshot was taken: cheap to take,
#: and turned into text only for a change that is reported.
Shape = tuple[str, int, "tuple[Any, ...] | None"]
Entry = tuple[int, str, Any, "Shape | None"]  # (identity, fingerprint, value, shape then)
Snapshot = dict[str, Entry]

#: The value of a field or key that was not there (before it was added, after it was removed).
MISSING: Any = object()


class Change(typing.NamedTuple):
    """One changed field: its name, the old and new values summarised, the new value."""

    field: str
    old: str
    new: str
    value: Any  # the new value itself (MISSING when removed)


_CONTAINERS = (dict, list, set, bytearray)


def snapshot(ctx: Any) -> Snapshot:
    """(identity, fingerprint, value, summary) of every ctx field and custom_data key."""
    snap: Snapshot = {}
    for field in CTX_FIELDS:
        snap[field] = _entry(field, getattr(ctx, field))
    for key, value in ctx.custom_data.items():
        field = f"custom_data[{key}]"
        snap[field] = _entry(field, value)
    return snap


def _entry(field: str, value: Any) -> Entry:
    # A container may be edited in place: its shape now is the only "old" side later.
    then: Shape | None = None
    if isinstance(value, _CONTAINERS):
        then = (type(value).__name__, len(value),
                tuple(value) if isinstance(value, dict) else None)
    return (id(value), _fingerprint(value), value, then)


def diff(before: Snapshot, after: Snapshot) -> list[Change]:
    """The fields that changed between two snapshots, by field name."""
    changes = []
    for field in sorted(set(before) | set(after)):
        old, new = before.get(field), after.get(field)
        if not _changed(old, new):
            continue
        new_value = MISSING if new is None else new[2]
        changes.append(Change(
            field, summary(field, _old_value(old, new)), summary(field, new_value), new_value
        ))
    return changes


def _fingerprint(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _changed(old: Entry | None, new: Entry | None) -> bool:
    if old is None or new is None:
        return old is not new
    return old[0] != new[0] or old[1] != new[1]


def _old_value(old: Entry | None, new: Entry | None) -> Any:
    if old is None:
        return MISSING
    if new is not None and old[0] == new[0]:
        # Edited in place: the object now holds the new value; its summary then is the old.
        return _Summary(_shape_text(old[3]) if old[3] is not None
                        else f"<{type(old[2]).__name__}>")
    return old[2]


class _Summary:
    def __init__(self, text: str) -> None:
        self.text = text


def summary(field: str, value: Any) -> str:
    """A short, secret-safe description of a ctx value for a span event."""
    if value is MISSING:
        return "<absent>"
    if isinstance(value, _Summary):
        return value.text
    if field.startswith("custom_data["):
        return _shape(value)
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    name = getattr(value, "name", None)
    if hasattr(value, "bundle_specs") and hasattr(value, "id"):
        return f"PlacementGroup(id={value.id.hex()[:16]}, bundles={len(value.bundle_specs)})"
    if isinstance(name, str) and type(value).__module__ != "builtins" and hasattr(value, "value"):
        return name  # an enum member
    if isinstance(value, dict):
        keys = ", ".join(sorted(str(k) for k in value)[:8])
        text = f"dict({len(value)} keys: {keys})"
        env_vars = value.get("env_vars") if field == "runtime_env" else None
        if isinstance(env_vars, dict):
            text += f" env_vars=[{', '.join(sorted(env_vars)[:8])}]"  # names, never values
        return text
    if isinstance(value, str):
        if len(value) <= 32 and not any(h in field.lower() for h in _SECRET_HINTS):
            return repr(value)
        return f"str(len={len(value)})"
    return f"<{type(value).__name__}>"


def _shape_text(shape: Shape) -> str:
    kind, size, keys = shape
    if keys is not None:
        return f"{kind}({size} keys: {', '.join(sorted(str(k)[:32] for k in keys)[:8])})"
    return f"{kind}(len={size})"


def _shape(value: Any) -> str:
    """Type, size and keys, never contents: what a callback keeps in custom_data is unknown."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        keys = ", ".join(sorted(str(k)[:32] for k in value)[:8])
        return f"dict({len(value)} keys: {keys})"
    if isinstance(value, (str, bytes, bytearray, list, tuple, set, frozenset)):
        return f"{type(value).__name__}(len={len(value)})"
    return f"<{type(value).__name__}>"
