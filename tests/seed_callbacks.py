"""The seed designs' callbacks, written as the seed documents (../shared/seeds) show them, plus
a recorder: each hook appends one JSON line to ``$SEED_EVENTS`` (a file the test reads), since
hooks run in the replica and in Ray's download tasks (other processes). Tests name these by
dotted path, so Ray workers import them from the repo root."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from typing import Any

import ray
import requests  # seed 000's ProductionCallback posts to a monitoring URL with requests
from ray.llm._internal.common.callbacks.base import CallbackBase

from llm_otel_callbacks import InitializeNodeOutput, RayServeLLMCallback
from tests.builtin_probes import rays_download_argument


def record(event: str, **fields: Any) -> None:
    """Append one event (with pid and node) to the file named by $SEED_EVENTS."""
    path = os.environ.get("SEED_EVENTS")
    if not path:
        return
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    line = json.dumps({"event": event, "pid": os.getpid(), "node": node, **fields},
                      default=str)
    with open(path, "a") as fh:
        fh.write(line + "\n")


# --- seed 000 / 001: three hooks on a CallbackCtx ---------------------------------------------


class ProductionCallback:
    """Custom initialization for production. (seed 000, verbatim but for the import.)"""

    def __init__(self, monitoring_url: str):
        self.monitoring_url = monitoring_url
        self.start_time = None

    def on_before_init(self, ctx):
        """Setup monitoring."""
        self.start_time = time.time()
        # Log to monitoring
        requests.post(self.monitoring_url, json={
            "event": "init_start",
            "model": ctx.llm_config.model_id
        })

    def on_before_download(self, ctx):
        """Optimize download for our infrastructure."""
        # Force download on all nodes for faster startup
        ctx.local_node_download_model = "MODEL_AND_TOKENIZER"
        ctx.worker_node_download_model = "MODEL_AND_TOKENIZER"

    def on_after_init(self, ctx):
        """Report completion."""
        elapsed = time.time() - self.start_time
        requests.post(self.monitoring_url, json={
            "event": "init_complete",
            "duration": elapsed
        })


class TokenizerOnlyDownload:
    """Seed 001's ``MyCallback`` shape, with a policy that differs from Ray's default."""

    def on_before_download(self, ctx):
        ctx.worker_node_download_model = "TOKENIZER_ONLY"


class SkipDownload:
    """Seed 000: ``on_before_download`` returning False skips the download."""

    def on_before_download(self, ctx):
        return False


# --- seed 003: the eight-hook NodeInitializationCallback ---------------------------------------


class EightHooks:
    """Every hook of seed 003's protocol; each records what the ctx held."""

    def on_pre_initialization(self, ctx):
        record("on_pre_initialization")

    def on_pre_download(self, ctx):
        record("on_pre_download", policy=str(ctx.worker_node_download_model))
        ctx.worker_node_download_model = "EXCLUDE_SAFETENSORS"

    def on_post_download(self, ctx):
        record("on_post_download", download_result=ctx.download_result)

    def on_pre_placement_group(self, ctx):
        record("on_pre_placement_group")

    def on_post_placement_group(self, ctx):
        record("on_post_placement_group", has_pg=ctx.placement_group is not None)

    def on_pre_engine_init(self, ctx):
        ctx.extra_init_kwargs["max_num_seqs"] = 3
        record("on_pre_engine_init")

    def on_post_engine_init(self, ctx):
        record("on_post_engine_init")

    def on_post_initialization(self, ctx):
        record("on_post_initialization")


class Metrics:
    """Seed 003, example 2 (stateful), with the print also recorded."""

    def __init__(self):
        self.start = None

    def on_pre_initialization(self, ctx):
        self.start = time.time()

    def on_post_initialization(self, ctx):
        print(f"Took {time.time() - self.start}s")
        record("metrics_took", seconds=time.time() - self.start)


class LocalNodePolicy:
    """Seed 000's ``local_node_download_model``: the replica's own node's policy."""

    def on_before_init(self, ctx):
        ctx.local_node_download_model = "TOKENIZER_ONLY"
        ctx.worker_node_download_model = "EXCLUDE_SAFETENSORS"


class OwnPlacementGroup:
    """Seed 003: ``on_pre_placement_group`` returning False with a placement group of its own."""

    def on_pre_placement_group(self, ctx):
        from ray.util.placement_group import placement_group

        ctx.placement_group = placement_group([{"CPU": 0.01}])
        return False


class FalseWithoutPlacementGroup:
    def on_pre_placement_group(self, ctx):
        return False


# --- seed 002: phase functions ------------------------------------------------------------------


def tracking_callback(phase, config, data):
    """Seed 002's test_callback_invoked, recording each phase."""
    record("phase", phase=phase, fn="sync")


async def async_tracking_callback(phase, config, data):
    await asyncio.sleep(0)
    record("phase", phase=phase, fn="async", download_result=data.get("download_result"))


def custom_download(phase, config, data):
    """Seed 002's custom_download, with a policy that differs from Ray's default."""
    if phase == "pre_download":
        return {
            "local_node_download_model": "TOKENIZER_ONLY",
            "worker_node_download_model": "TOKENIZER_ONLY",
        }


class MetricsCollector:
    """Seed 002's stateful callback (a class with ``__call__``)."""

    def __init__(self):
        self.timings = {}
        self.start = None

    def __call__(self, phase, config, data):
        import time
        if phase == "pre_initialization":
            self.start = time.time()
        elif phase.startswith("post_"):
            self.timings[phase] = time.time() - self.start
            record("collector", timings=sorted(self.timings))


def custom_init(phase, config, data):
    """Seed 002's complete replacement (placement group and runtime env of its own)."""
    if phase == "pre_initialization":
        return {"skip_default": True}

    if phase == "custom_initialization":
        from ray.util.placement_group import placement_group

        my_pg = placement_group([{"CPU": 0.01}], name="seed-custom-init")
        my_env = {"env_vars": {"CUSTOM_INIT": "1"}}
        return {
            "placement_group": my_pg,
            "runtime_env": my_env,
        }


# --- the original full replacement: initialize() -----------------------------------------------


class MyInit:
    """The original PR's ``CustomInitialization``: replaces node initialization."""

    async def initialize(self, llm_config):
        from ray.util.placement_group import placement_group

        pg = placement_group([{"CPU": 0.01}], name="seed-initialize")
        env = {"env_vars": {"FROM_INITIALIZE": "1"}}
        return InitializeNodeOutput(pg, env, {"max_num_seqs": 2})


# --- Ray's own callback API, as Ray users write it ----------------------------------------------


class LockedRayCallback(RayServeLLMCallback):
    """Holds a lock and drops it in its own ``__getstate__`` (the common idiom)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        import threading

        self.lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("lock")
        return state

    async def on_before_node_init(self) -> None:
        with self.lock:
            self.ctx.custom_data["locked"] = True

    def on_before_download_model_files_distributed(self) -> None:
        record("locked_download", custom=self.ctx.custom_data.get("locked"))


class PolicyProbe(RayServeLLMCallback):
    """Reports the policy Ray's download task really received (place it last)."""

    def on_before_download_model_files_distributed(self) -> None:
        record("ray_download_argument", download_model=rays_download_argument())


class InitSeesCtx(CallbackBase):
    """A Ray callback (on Ray's internal base) that reads and writes the ctx in __init__."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ctx.custom_data["init_saw"] = {
            "placement_group": self.ctx.placement_group is not None,
            "policy": getattr(self.ctx.worker_node_download_model, "name", None),
        }
        self.ctx.runtime_env = {"env_vars": {"SET_IN_INIT": "1"}}


class OwnDispatch(CallbackBase):
    """Overrides Ray's dispatch and error handling, as Ray allows."""

    async def run_callback(self, method_name: str) -> None:
        self.ctx.custom_data.setdefault("dispatched", []).append(method_name)
        await super().run_callback(method_name)

    async def on_before_node_init(self) -> None:
        raise ValueError("handled by my own _handle_callback_error")

    def _handle_callback_error(self, method_name: str, e: Exception) -> None:
        self.ctx.custom_data["handled"] = f"{method_name}: {e}"


class ReplacesCtx(CallbackBase):
    """Assigns a new ctx in a hook (Ray then reads the new object)."""

    async def on_before_node_init(self) -> None:
        self.ctx = dataclasses.replace(self.ctx, runtime_env={"env_vars": {"REPLACED": "1"}})


class Reenables(CallbackBase):
    """Sets run_init_node back to True after another child vetoed."""

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = True


class VetoByField(CallbackBase):
    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False


class SkipInit:
    """Seed 000: ``on_before_init`` returning False skips Ray's node initialization."""

    def on_before_init(self, ctx):
        return False


class EngineProbe(RayServeLLMCallback):
    """Records, once the engine is up, what Ray's engine was given (place it last)."""

    server_hooks_optional = True

    def on_after_engine_start(self) -> None:
        pg = self.ctx.placement_group
        record(
            "engine_up",
            pg_name=ray.util.placement_group_table(pg)["name"] if pg is not None else None,
            runtime_env=self.ctx.runtime_env,
            run_init_node=self.ctx.run_init_node,
            max_num_seqs=self.llm_config.engine_kwargs.get("max_num_seqs"),
        )


# --- seed 004: request callbacks --------------------------------------------------------------


class ContextAwareCallbacks:
    """Seed 004's "Callback Context" example, recording where the seed prints."""

    async def on_llm_start(self, prompt, **kwargs):
        provider = kwargs.get("provider")
        model = kwargs.get("model")
        request_id = kwargs.get("request_id")
        trace_id = kwargs.get("trace_id")
        record("llm_start", provider=provider, model=model, request_id=request_id,
               trace_id=trace_id, user_id=kwargs.get("user_id"))

    async def on_llm_end(self, response, **kwargs):
        tokens = kwargs.get("token_count")
        cost = kwargs.get("cost")
        duration_ms = kwargs.get("duration_ms")
        record("llm_end", tokens=tokens, cost=cost, duration_ms=duration_ms,
               text=f"Completed in {duration_ms}ms, {tokens} tokens, ${cost:.4f}",
               prompt_tokens=kwargs.get("prompt_tokens"),
               completion_tokens=kwargs.get("completion_tokens"),
               user_id=kwargs.get("user_id"), request_id=kwargs.get("request_id"))
