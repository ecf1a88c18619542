"""What a callback changed in the ``CallbackCtx``: snapshots, their diff, and secret-safe
summaries of the values for span events.

A snapshot holds, per ctx field and ``custom_data`` key, the value's identity, a ``repr``
fingerprint (which catches in-place edits; it is compared, never emitted) and the value.
Summaries never carry a secret: fields whose name hints at one, and ``runtime_env``, are shown
by length, and ``env_vars`` by name only.
"""

from __future__ import annotations

import typing
from typing import Any

from .adapters import CTX_FIELDS

_SECRET_HINTS = ("key", "token", "secret", "password", "passwd", "auth", "credential")

Entry = tuple[int, str, Any]  # (identity, fingerprint, value)
Snapshot = dict[str, Entry]

#: The value of a field or key that was not there (before it was added, after it was removed).
MISSING: Any = object()


class Change(typing.NamedTuple):
    """One changed field: its name, the old and new values summarised, the new value."""

    field: str
    old: str
    new: str
    value: Any  # the new value itself (MISSING when removed)


def snapshot(ctx: Any) -> Snapshot:
    """(identity, fingerprint, value) of every ctx field and custom_data key."""
    snap: Snapshot = {}
    for field in CTX_FIELDS:
        value = getattr(ctx, field)
        snap[field] = (id(value), _fingerprint(value), value)
    for key, value in ctx.custom_data.items():
        snap[f"custom_data[{key}]"] = (id(value), _fingerprint(value), value)
    return snap


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
        # Edited in place: the object now holds the new value; only the fingerprint is old.
        return _Fingerprint(old[1])
    return old[2]


class _Fingerprint:
    def __init__(self, text: str) -> None:
        self.text = text


def summary(field: str, value: Any) -> str:
    """A short, secret-safe description of a ctx value for a span event."""
    if value is MISSING:
        return "<absent>"
    if isinstance(value, _Fingerprint):
        text = value.text
        if text == "None":
            return text
        if any(h in field.lower() for h in _SECRET_HINTS) or field == "runtime_env":
            return f"<{len(text)} chars>"
        return text if len(text) <= 64 else text[:61] + "..."
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
