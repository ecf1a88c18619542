"""CustomPlacementGroup: choose the placement group Ray's node initialization and the engine use.

What ``ctx.placement_group`` drives in Ray 2.60 (read from its source):

* ``initialize_node`` runs one download task per distinct node of the group's bundles;
* ``VLLMEngine._prepare_engine_config``, on accelerators that need it (GPU, TPU ...), runs a
  task inside the group to read the hardware;
* ``VLLMEngine._start_async_llm_engine`` hands the group to vLLM
  (``parallel_config.placement_group``): with vLLM's Ray executor the engine workers are placed
  in its bundles.

The replica actor itself stays in the replica's own group (Serve made it; bundle 0 holds the
replica), which keeps its reservation: a custom group reserves resources *in addition*.

Lifetime: a group this callback created is removed when the replica's startup fails (or its
wait times out), or when :meth:`CustomPlacementGroup.release` is called. Otherwise Ray removes
it with its creator: a Serve replica is a detached actor, and a group created by a detached
actor is removed when that actor dies, however it dies. (Created from a driver or a
non-detached actor, a group lives until the job ends.) Nothing is removed from inside an
exiting process: Ray calls can block there. A group found by name is never removed, nor is
the replica's own group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Annotated, Any, ClassVar, Literal

import ray
from opentelemetry import trace
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from ray.util.placement_group import (
    PlacementGroup,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from .. import Number, RayServeLLMCallback, catalog
from .._ray import resources_per_node
from ._common import exiting, short_id, upper_name, watch_exit

logger = logging.getLogger(__name__)

Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
_HELD = "placement_group.held"  # process_cache key: (group, created_by_us)


class PlacementGroupOptions(BaseModel):
    """``callback_kwargs`` of :class:`CustomPlacementGroup`."""

    model_config = ConfigDict(defer_build=True, extra="forbid")

    bundles: list[dict[str, Number]] | None = Field(default=None, min_length=1)
    """Resource dicts, e.g. ``[{"CPU": 1, "GPU": 1}, {"GPU": 1}]``."""
    strategy: Annotated[Strategy, BeforeValidator(upper_name)] = "PACK"
    """PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (any case)."""
    name: str | None = Field(default=None, min_length=1)
    """Reuse the placement group of this name (in the replica's namespace); created from
    ``bundles`` and ``strategy`` if it does not exist yet."""
    ready_timeout_s: Number = Field(default=60.0, gt=0, le=7 * 24 * 3600, allow_inf_nan=False)
    """How long to wait for the group to be placed before failing with a diagnostic."""

    @field_validator("bundles")
    @classmethod
    def _check_bundles(cls, bundles: list[dict[str, float]] | None) -> Any:
        for i, bundle in enumerate(bundles or []):
            if not bundle:
                raise ValueError(f"bundle {i} is empty; give resources like {{'CPU': 1}}")
            for key, value in bundle.items():
                if not key or not math.isfinite(value) or value < 0:
                    # NaN passes a "< 0" test; Ray would reject it only at hook time.
                    raise ValueError(
                        f"bundle {i}: resource {key!r} must be named, finite and >= 0"
                    )
            if all(v == 0 for v in bundle.values()):
                raise ValueError(f"bundle {i} asks for nothing (all values are 0)")
        return bundles

    @model_validator(mode="after")
    def _bundles_or_name(self) -> PlacementGroupOptions:
        if not self.bundles and not self.name:
            raise ValueError("give 'bundles' (with 'strategy') or the 'name' of a placement group")
        return self


class PlacementGroupTimeoutError(TimeoutError):
    """The placement group was not ready within ``ready_timeout_s``; the message says why."""


class CustomPlacementGroup(RayServeLLMCallback):
    """Puts a placement group of your choice on ``ctx.placement_group``, once it is ready.

    Override points:

    * :meth:`acquire` -- find or create the group (returns it and whether we created it);
    * :meth:`diagnose` -- the message of the timeout error;
    * :meth:`release` -- remove the group if this callback created it (call it from your own
      shutdown code when the engine is gone; a failed startup calls it already).
    """

    kwargs_model: ClassVar[type[BaseModel] | None] = PlacementGroupOptions

    # --- override points ----------------------------------------------------------------------

    def acquire(self) -> tuple[PlacementGroup, bool]:
        """The group to use and whether this callback created it (and so may remove it)."""
        opts: PlacementGroupOptions = self.options
        if opts.name:
            existing = _named_group(opts.name)
            if existing is not None:
                return existing, False
            if not opts.bundles:
                raise ValueError(
                    f"CustomPlacementGroup: no placement group named '{opts.name}' exists and "
                    "no 'bundles' were given to create it"
                )
            try:
                return placement_group(opts.bundles, strategy=opts.strategy, name=opts.name), True
            except Exception:
                # Another replica created it between our lookup and our create: use theirs.
                existing = _named_group(opts.name)
                if existing is None:
                    raise
                return existing, False
        assert opts.bundles  # the options validator guarantees bundles or name
        return placement_group(opts.bundles, strategy=opts.strategy), True

    def diagnose(self, pg: PlacementGroup, waited_s: float, removed: bool) -> str:
        """Why the group is not placed: each bundle against the nodes' resources."""
        opts: PlacementGroupOptions = self.options
        bundles, strategy = _group_shape(pg, opts)
        label = f"'{opts.name}'" if opts.name else pg.id.hex()[:16]
        head = (
            f"CustomPlacementGroup: placement group {label} ({strategy}, {len(bundles)} "
            f"bundle(s)) was not ready after {waited_s:.1f}s (ready_timeout_s="
            f"{opts.ready_timeout_s:g}); "
            + ("it was removed, so it reserves nothing." if removed
               else "it was not created here and is left as it is.")
        )
        return "\n".join([head, *explain_unplaceable(bundles, strategy)])

    def release(self) -> None:
        """Remove the group this callback created in this process (never a reused one)."""
        held = self.process_cache.pop(_HELD, None)
        if held is None:
            return
        pg, created = held
        if created:
            _remove_group(pg)

    # --- hooks --------------------------------------------------------------------------------

    async def on_before_node_init(self) -> None:
        opts: PlacementGroupOptions = self.options
        held = self.process_cache.get(_HELD)
        if held is None:
            watch_exit()
            held = self.acquire()
            self.process_cache[_HELD] = held
        pg, created = held
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.wrap_future(pg.ready().future()), opts.ready_timeout_s)
        except asyncio.TimeoutError:
            waited = time.monotonic() - started
            self._record_wait(pg, waited, catalog.OUTCOME_TIMEOUT)
            message = self.diagnose(pg, waited, removed=created)
            self.release()
            raise PlacementGroupTimeoutError(message) from None
        waited = time.monotonic() - started
        self._record_wait(pg, waited, catalog.OUTCOME_OK)
        previous = self.ctx.placement_group
        self.ctx.placement_group = pg
        self._annotate(pg, created, previous, waited)
        _, strategy = _group_shape(pg, opts)
        logger.info(
            "CustomPlacementGroup: model '%s': placement group %s (%s, %s) ready after %.2fs; "
            "the replica's own group %s stays reserved",
            self.model_id, pg.id.hex()[:16], "created" if created else "reused", strategy,
            waited, _short_pg(previous),
        )

    def startup_ended(self, error: BaseException | str | None) -> None:
        """A failed startup gives back a group this callback created."""
        super().startup_ended(error)
        if error is not None:
            self.release()

    # --- helpers ------------------------------------------------------------------------------

    def _record_wait(self, pg: PlacementGroup, waited: float, outcome: str) -> None:
        _, strategy = _group_shape(pg, self.options)
        self.metric(catalog.PLACEMENT_GROUP_WAIT).record(
            (self.model_id, strategy, outcome), waited
        )

    def _annotate(
        self, pg: PlacementGroup, created: bool, previous: Any, waited: float
    ) -> None:
        span = trace.get_current_span()
        if not span.is_recording():
            return
        bundles, strategy = _group_shape(pg, self.options)
        span.set_attribute(catalog.A_PG_ID, pg.id.hex())
        span.set_attribute(catalog.A_PG_STRATEGY, strategy)
        span.set_attribute(catalog.A_PG_BUNDLES, json.dumps(bundles, sort_keys=True))
        span.set_attribute(catalog.A_PG_CREATED, created)
        span.set_attribute(catalog.A_PG_WAIT, waited)
        if self.options.name:
            span.set_attribute(catalog.A_PG_NAME, self.options.name)
        if previous is not None and hasattr(previous, "id"):
            span.set_attribute(catalog.A_PG_REPLACED, previous.id.hex())


# --- removal ------------------------------------------------------------------------------------


def _remove_group(pg: PlacementGroup) -> None:
    if exiting():
        # Ray calls can block forever in an exiting worker; Ray's own fate-sharing removes
        # the group with its creator (see the module docstring).
        return
    try:
        if ray.is_initialized():
            remove_placement_group(pg)
    except Exception as exc:  # already gone, or Ray shutting down
        logger.debug("CustomPlacementGroup: remove %s: %s", pg.id.hex()[:16], exc)


def _short_pg(pg: Any) -> str:
    pg_id = getattr(pg, "id", None)
    return pg_id.hex()[:16] if pg_id is not None else "-"


def _named_group(name: str) -> PlacementGroup | None:
    try:
        pg = get_placement_group(name)
    except ValueError:  # Ray's "Failed to look up placement group"
        return None
    state = placement_group_table(pg).get("state")
    return None if state == "REMOVED" else pg


def _group_shape(pg: PlacementGroup, opts: Any) -> tuple[list[dict[str, float]], str]:
    """Bundles and strategy of ``pg`` (from Ray's table, falling back on the options)."""
    try:
        table = placement_group_table(pg)
        bundles = [dict(b) for _, b in sorted(table.get("bundles", {}).items())]
        strategy = str(table.get("strategy") or opts.strategy)
        if bundles:
            return bundles, strategy
    except Exception as exc:
        logger.debug("placement group table unavailable: %s", exc)
    return [dict(b) for b in (opts.bundles or [])], str(opts.strategy)


# --- the timeout diagnostic ----------------------------------------------------------------------


def _user_resources(resources: dict[str, float]) -> dict[str, float]:
    """Drop Ray's per-group and per-node bookkeeping resources."""
    return {
        k: v for k, v in resources.items()
        if "_group_" not in k and not k.startswith(("node:", "bundle_group"))
    }


def _cluster_view() -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(available, total) resources per live node id."""
    api: Any = ray  # Ray's functions are untyped
    per_node = resources_per_node()
    if per_node is not None:
        avail, total = per_node
    else:  # a developer API: fall back on cluster-wide sums
        avail = {"cluster": dict(api.available_resources())}
        total = {"cluster": dict(api.cluster_resources())}
    return (
        {n: _user_resources(r) for n, r in avail.items()},
        {n: _user_resources(r) for n, r in total.items()},
    )


def _fits(bundle: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v > 0)


def _fmt(resources: dict[str, float], keys: list[str] | None = None) -> str:
    keys = keys if keys is not None else sorted(resources)
    return "{" + ", ".join(f"{k}: {resources.get(k, 0.0):g}" for k in keys) + "}"


def explain_unplaceable(bundles: list[dict[str, float]], strategy: str) -> list[str]:
    """Lines naming each bundle that no node can hold (in total, or now), and strategy limits,
    next to what the nodes have available."""
    avail, total = _cluster_view()
    keys = sorted({k for b in bundles for k in b} | {"CPU"})
    lines = ["Bundles that cannot be placed:"]
    for i, bundle in enumerate(bundles):
        if not any(_fits(bundle, r) for r in total.values()):
            largest = {k: max((r.get(k, 0.0) for r in total.values()), default=0.0) for k in bundle}
            lines.append(
                f"  bundle {i} {_fmt(bundle)}: no node has that much in total (largest node: "
                f"{_fmt(largest)}); infeasible until a bigger node joins"
            )
        elif not any(_fits(bundle, r) for r in avail.values()):
            lines.append(
                f"  bundle {i} {_fmt(bundle)}: fits a node in total, but every such node is "
                "busy now (waits for resources to free up)"
            )
    nodes = len(total)
    if strategy == "STRICT_SPREAD" and len(bundles) > nodes:
        lines.append(
            f"  STRICT_SPREAD needs {len(bundles)} distinct nodes; the cluster has {nodes}"
        )
    if strategy == "STRICT_PACK":
        summed: dict[str, float] = {}
        for bundle in bundles:
            for k, v in bundle.items():
                summed[k] = summed.get(k, 0.0) + v
        if not any(_fits(summed, r) for r in avail.values()):
            lines.append(f"  STRICT_PACK needs one node with {_fmt(summed)} available; none has")
    if len(lines) == 1:
        lines.append(
            "  each bundle fits some node on its own, but not all together with the "
            f"{strategy} strategy"
        )
    lines.append("Available now, per node:")
    for node, resources in sorted(avail.items()):
        lines.append(
            f"  node {short_id(node)}: {_fmt(resources, keys)} of {_fmt(total.get(node, {}), keys)}"
        )
    return lines
