"""A CustomPlacementGroup subclass that falls back instead of failing.

Ask for a better layout (say ``STRICT_SPREAD`` over several nodes) and, when the cluster cannot
provide it within ``ready_timeout_s``, keep the replica's own placement group rather than fail
the replica. The built-in's diagnostic (which bundles cannot be placed, next to the nodes'
available resources) is logged as a warning, and the group that could not be placed is
removed, so it reserves nothing.

Use it as ``callback_config={"callback_class":
"examples.placement_group_subclass.FallbackPlacementGroup", "callback_kwargs": {"bundles":
[{"CPU": 1}, {"CPU": 1}], "strategy": "STRICT_SPREAD", "ready_timeout_s": 30}}``.
"""

from __future__ import annotations

import logging

from llm_otel_callbacks.builtin import CustomPlacementGroup, PlacementGroupTimeoutError

logger = logging.getLogger(__name__)


class FallbackPlacementGroup(CustomPlacementGroup):
    async def on_before_node_init(self) -> None:
        try:
            await super().on_before_node_init()
        except PlacementGroupTimeoutError as exc:
            # The built-in already removed the group it created; ctx still holds the
            # replica's own group, which the engine then uses.
            self.ctx.custom_data["placement_group_fallback"] = True
            logger.warning("falling back to the replica's own placement group:\n%s", exc)
