"""The Composite's configuration: child specs, import resolution, offline validation.

The shape is the public contract (it is what people write in a Ray Serve YAML file)::

    callback_kwargs:
      callbacks:
        - llm_otel_callbacks.builtin.Timing          # a dotted path (or a class / function)
        - callback_class: my_company.callbacks.Audit # or a mapping
          callback_kwargs: {url: ...}
          raise_error_on_callback: false
          timeout_s: 30
          name: audit
      telemetry: {...}
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from ._validation import CallbackConfigError, Number, clip, describe

#: Longest timeout a child may set: a week. Larger values (and inf) overflow the thread
#: join and event-loop timers the dispatch uses, which would fail at hook time, not here.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
#: A child's name is a metric label, a span-name suffix and a ctx.custom_data key.
MAX_NAME_LENGTH = 128


_SECONDS: TypeAdapter[float] = TypeAdapter(
    Annotated[Number, Field(gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)]
)


def known_hooks() -> frozenset[str]:
    """Hook names a ``timeout_s`` mapping may name: Ray's (its base class's ``on_*``
    methods), the engine-start and request hooks ObservedLLMServer calls, and the node
    pre-download point of seed-style children."""
    from ._ray import CALLBACK_BASES
    from .adapters import ENGINE_HOOKS, NODE_PRE_DOWNLOAD, REQUEST_HOOKS

    ray_hooks = {n for base in CALLBACK_BASES for n in dir(base) if n.startswith("on_")}
    return frozenset(
        {*ray_hooks, *ENGINE_HOOKS, *REQUEST_HOOKS, NODE_PRE_DOWNLOAD,
         "on_before_download_model_files_distributed"}
    )


def _seconds(value: Any, where: str) -> float:
    try:
        return _SECONDS.validate_python(value)
    except ValidationError as exc:
        raise ValueError(f"{where}{exc.errors(include_url=False)[0]['msg']}") from None


def timeout_value(value: Any) -> float | dict[str, float] | None:
    """``timeout_s``: seconds for every hook, or a mapping hook -> seconds. Raises
    ValueError saying what is wrong (an unknown hook name is never ignored)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        hooks = known_hooks()
        unknown = sorted(clip(str(k)) for k in value if k not in hooks)
        if unknown:
            raise ValueError(
                f"unknown hook name(s) {unknown}; a mapping names hooks: {sorted(hooks)}"
            )
        return {str(k): _seconds(v, f"hook '{k}': ") for k, v in value.items()}
    return _seconds(value, "")


def parse_timeout(value: Any, where: str) -> float | dict[str, float] | None:
    """Validate a ``timeout_s`` (number or mapping per hook); the error names ``where``."""
    try:
        return timeout_value(value)
    except ValueError as exc:
        raise CallbackConfigError(f"{where}: field 'timeout_s': {exc}") from None


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


class ChildSpec(BaseModel):
    """One entry of ``callbacks``."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    callback_class: Any
    """Dotted path (``pkg.mod.Name`` or ``pkg.mod:Name``), a class, or a function."""
    callback_kwargs: dict[str, Any] = Field(default_factory=dict)
    raise_error_on_callback: bool | None = None
    """Default: the composite's own ``raise_error_on_callback``."""
    timeout_s: Any = None
    """Seconds for every hook, or a mapping hook -> seconds (only the hooks it names)."""
    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_LENGTH)
    """Default: the class (or function) name. Must be unique in the composite."""

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not value.isprintable()):
            raise ValueError("must be printable and not blank")
        return value

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> Any:
        return timeout_value(value)

    @field_validator("callback_class")
    @classmethod
    def _class_or_path(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("must be a dotted import path, a class or a function")
            return value.strip()
        if callable(value):
            return value
        raise ValueError(
            f"must be a dotted import path, a class or a function, got {type(value).__name__}"
        )


class CompositeOptions(BaseModel):
    """``callback_kwargs`` of :class:`~llm_otel_callbacks.Composite` (``telemetry`` aside)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    callbacks: list[Any] = Field(default_factory=list)


def import_object(path: str) -> Any:
    """Import ``pkg.mod.Name`` or ``pkg.mod:Name``; errors say what was missing.

    Every failure is an :class:`ImportError` (a relative or malformed path, or a module that
    raises while it is imported, would otherwise surface as TypeError, ValueError, ...).
    """
    if ":" in path:
        module_name, _, attr = path.partition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not _dotted(module_name) or not _dotted(attr):
        raise ImportError(
            f"'{clip(path)}' is not an absolute dotted path like 'package.module.Name'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"cannot import module '{clip(module_name)}': {clip(str(exc), 200)}"
        ) from None
    except Exception as exc:  # the module itself failed while being imported
        raise ImportError(
            f"importing module '{clip(module_name)}' failed: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportError(
            f"module '{clip(module_name)}' has no attribute '{clip(attr)}'"
        ) from None
    return obj


def parse_child_specs(entries: list[Any]) -> list[tuple[ChildSpec, Any]]:
    """Validate every entry, resolve every import; returns (spec, resolved object) pairs.

    Every problem names the entry by index (and name when known) and the field.
    """
    if not isinstance(entries, list):
        raise CallbackConfigError("Composite callback_kwargs: field 'callbacks': must be a list")
    out: list[tuple[ChildSpec, Any]] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        label = _entry_label(index, entry)
        raw = entry if isinstance(entry, Mapping) else {"callback_class": entry}
        try:
            spec = ChildSpec.model_validate(dict(raw))
        except ValidationError as exc:
            errors.append(describe(exc, label))
            continue
        target = spec.callback_class
        if isinstance(target, str):
            try:
                target = import_object(target)
            except ImportError as exc:
                errors.append(f"{label}: field 'callback_class': {exc}")
                continue
            if not callable(target):
                errors.append(
                    f"{label}: field 'callback_class': '{clip(spec.callback_class)}' is a "
                    f"{type(target).__name__}, not a class or a function"
                )
                continue
        name = str(spec.name or getattr(target, "__name__", type(target).__name__))
        if name in seen:
            errors.append(
                f"{label}: field 'name': '{name}' is already used by callbacks[{seen[name]}]; "
                "give one of them a distinct 'name'"
            )
            continue
        seen[name] = index
        out.append((spec.model_copy(update={"name": name}), target))
    if errors:
        raise CallbackConfigError("\n".join(errors))
    return out


def _entry_label(index: int, entry: Any) -> str:
    name: Any = None
    if isinstance(entry, Mapping):
        name = entry.get("name") or entry.get("callback_class")
    else:
        name = entry
    if name is not None and not isinstance(name, str):
        name = getattr(name, "__name__", None)
    return f"callbacks[{index}]" + (f" ({clip(name)})" if name else "")



# --- offline validation --------------------------------------------------------------------


def validate_callback_config(config: Mapping[str, Any] | Any, llm_config: Any = None) -> Any:
    """Check a ``callback_config`` without Ray running: resolve every import, validate every
    kwarg (by constructing the callback, as Ray would), and pickle round-trip it, as Ray does
    into the per-node download tasks. Returns the constructed callback.

    Raises :class:`CallbackConfigError` with pointed messages on any failure.
    """
    if hasattr(config, "callback_class") and not isinstance(config, Mapping):
        config = {
            "callback_class": config.callback_class,
            "callback_kwargs": config.callback_kwargs,
            "raise_error_on_callback": config.raise_error_on_callback,
        }
    if not isinstance(config, Mapping):
        raise CallbackConfigError(
            f"callback_config: expected a mapping, got {type(config).__name__}"
        )
    unknown = set(config) - {"callback_class", "callback_kwargs", "raise_error_on_callback"}
    if unknown:
        raise CallbackConfigError(
            f"callback_config: unknown field(s) {sorted(unknown)}; allowed: callback_class, "
            "callback_kwargs, raise_error_on_callback"
        )
    cls = config.get("callback_class")
    if cls is None:
        raise CallbackConfigError("callback_config: field 'callback_class' is required")
    if isinstance(cls, str):
        try:
            cls = import_object(cls)
        except ImportError as exc:
            raise CallbackConfigError(f"callback_config: field 'callback_class': {exc}") from None
    kwargs = config.get("callback_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise CallbackConfigError("callback_config: field 'callback_kwargs': must be a mapping")
    try:
        callback = cls(
            llm_config=llm_config,
            raise_error_on_callback=bool(config.get("raise_error_on_callback", True)),
            ctx_kwargs={},
            **dict(kwargs),
        )
    except CallbackConfigError:
        raise
    except Exception as exc:
        raise CallbackConfigError(
            f"callback_config: constructing {getattr(cls, '__qualname__', cls)} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    from ._pickling import pickle_error, unpicklable_attributes

    failed: dict[str, str] = getattr(callback, "failed_children", None) or {}
    if failed:
        # Tolerated at run time (raise_error_on_callback: false), but before a deploy this
        # is a child that would not run (or not on the nodes): report it.
        raise CallbackConfigError(
            "callback_config: " + "\n".join(f"{message}" for message in failed.values())
        )
    error = pickle_error(callback)
    if error is not None:
        where = "; ".join(
            f"attribute '{attr}' holds {what}" for attr, what in unpicklable_attributes(callback)
        ) or f"{type(error).__name__}: {error}"
        raise CallbackConfigError(
            f"callback_config: {type(callback).__qualname__} does not survive pickling, which "
            f"Ray does to send it to every node's download task: {where}. "
            "Create unpicklable handles (locks, clients, sockets) lazily, or drop them in "
            "__getstate__."
        ) from error
    from ray import cloudpickle

    try:
        cloudpickle.loads(cloudpickle.dumps(callback))  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise CallbackConfigError(
            f"callback_config: {type(callback).__qualname__} pickles but does not unpickle: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    return callback
