"""What the composite needs to know about the points of a Ray 2.60 startup: the replica's
node, what Ray's download produced, and which children need ObservedLLMServer's points."""

from __future__ import annotations

from typing import Any

from .adapters import ENGINE_HOOKS, REQUEST_HOOKS
from .base import RayServeLLMCallback


def node_id() -> str | None:
    try:
        import ray

        if not ray.is_initialized():
            return None
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return None


def download_result(llm_config: Any, ctx: Any) -> Any:
    """The model path Ray's download tasks returned (Ray stores it as the engine config's
    ``hf_model_id``); None when node initialization did not run."""
    if not ctx.run_init_node or llm_config is None:
        return None
    try:
        return llm_config.get_engine_config().hf_model_id
    except Exception:
        return None


def server_hooks(callback: Any, *, phase_functions: bool = True) -> list[str]:
    """'child: hooks' for every child with engine-start or request hooks, which only run
    under ObservedLLMServer (builtins that only add telemetry there are left out; phase
    functions, called for every phase, when ``phase_functions`` is False)."""
    out = []
    for child in getattr(callback, "children", []):
        instance = child.instance
        if getattr(instance, "server_hooks_optional", False):
            continue
        if child.kind == "function" and not phase_functions:
            continue
        hooks = [h for h in ENGINE_HOOKS if child.steps(h, callback.ctx, False)]
        hooks += [h for h in REQUEST_HOOKS if callable(getattr(instance, h, None))
                  and not _base_hook(instance, h)]
        if hooks:
            out.append(f"{child.name}: {', '.join(hooks)}")
    return out


def _base_hook(instance: Any, hook: str) -> bool:
    impl = getattr(type(instance), hook, None)
    return impl is not None and impl is getattr(RayServeLLMCallback, hook, None)
