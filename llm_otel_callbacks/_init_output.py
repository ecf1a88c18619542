"""The seed-only ctx slot, and what an ``initialize()`` / ``custom_initialization`` child
returns and how it replaces Ray's node initialization."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

SEED_CTX_KEY = "seed_ctx"


def seed_ctx(ctx: Any) -> dict[str, Any]:
    """The seed-only ctx fields (travel with the ctx into Ray's download tasks)."""
    return ctx.custom_data.setdefault(SEED_CTX_KEY, {})  # type: ignore[no-any-return]


@dataclasses.dataclass
class InitializeNodeOutput:
    """What an ``initialize(llm_config)`` child returns (any object with these attributes,
    or a mapping with these keys, works too)."""

    placement_group: Any = None
    runtime_env: dict[str, Any] | None = None
    extra_init_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


_OUTPUT_FIELDS = ("placement_group", "runtime_env", "extra_init_kwargs")


def apply_init_output(ctx: Any, output: Any, where: str) -> None:
    """Apply an ``initialize()`` / ``custom_initialization`` result: Ray's node init is
    skipped and its engine uses the returned placement group and runtime env."""
    if output is None:
        raise ValueError(f"{where} returned None; return an InitializeNodeOutput (or a mapping)")
    if isinstance(output, Mapping):
        unknown = sorted(str(k) for k in output if k not in _OUTPUT_FIELDS)
        if unknown:
            raise ValueError(
                f"{where} returned unknown key(s) {unknown}; allowed: {', '.join(_OUTPUT_FIELDS)}"
            )
        values = {k: output.get(k) for k in _OUTPUT_FIELDS}
    else:
        missing = [k for k in ("placement_group", "runtime_env") if not hasattr(output, k)]
        if missing:
            raise ValueError(
                f"{where} returned a {type(output).__name__} without {', '.join(missing)}"
            )
        values = {k: getattr(output, k, None) for k in _OUTPUT_FIELDS}
    ctx.run_init_node = False
    if values["placement_group"] is not None:
        ctx.placement_group = values["placement_group"]
    if values["runtime_env"] is not None:
        ctx.runtime_env = values["runtime_env"]
    extra = values["extra_init_kwargs"]
    if extra:
        if not isinstance(extra, Mapping):
            raise ValueError(f"{where}: extra_init_kwargs must be a mapping")
        seed_ctx(ctx).setdefault("extra_init_kwargs", {}).update(extra)
