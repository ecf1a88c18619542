"""A DownloadPolicy subclass with a rule of its own: trust nodes that say they are warm.

Machines built from an image with the model baked in can announce it as a Ray custom
resource (``ray start --resources='{"model_cache_warm": 1}'``). On those nodes this policy
skips the weights download (``EXCLUDE_SAFETENSORS``: config and tokenizer files still come
from the mirror, so every node ends up with the same local path). Other nodes follow the
built-in rules (environment variable, local cache check, ``worker_node``).

The decision is made in :meth:`decide_for_node`, which runs on each node when Ray's download
task unpickles the callback, before Ray reads the policy there. It is counted in
``llm_callback_download_policy_decisions`` with ``rule="node_resource"``.

Use it as ``callback_config={"callback_class":
"examples.download_policy_subclass.WarmNodeDownloadPolicy"}``.
"""

from __future__ import annotations

from typing import Any

import ray

from llm_otel_callbacks.builtin import DownloadDecision, DownloadPolicy

WARM_RESOURCE = "model_cache_warm"
RULE = "node_resource"


class WarmNodeDownloadPolicy(DownloadPolicy):
    def decide_for_node(self, replica: DownloadDecision) -> DownloadDecision:
        decision = super().decide_for_node(replica)
        if decision.rule == "env":  # an operator's explicit choice wins
            return decision
        node_id = ray.get_runtime_context().get_node_id()
        nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
        node = next((n for n in nodes if n["NodeID"] == node_id), None)
        if node and node.get("Resources", {}).get(WARM_RESOURCE, 0) > 0:
            return DownloadDecision("EXCLUDE_SAFETENSORS", RULE, f"node has {WARM_RESOURCE}")
        return decision
