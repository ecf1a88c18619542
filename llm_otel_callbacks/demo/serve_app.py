"""A tiny Ray Serve LLM app on the CPU: the one ``LLMConfig`` builder, vLLM CPU environment
and ready-wait of the demo, the tests and the benchmarks.

vLLM's CPU engine needs a small KV cache and no thread pinning on a shared machine
(:data:`CPU_ENGINE_ENV`), and a model this small wants short sequences, eager mode and float32
(:data:`ENGINE_KWARGS`). :func:`deployed` starts a local Ray (:mod:`.local_ray`), Serve on
127.0.0.1, deploys, and waits until the app answers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .local_ray import LocalRay, start_local_ray
from .ports import free_port

CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
ENGINE_KWARGS: dict[str, Any] = {
    "max_model_len": 256,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 256,
    "enforce_eager": True,
    "dtype": "float32",
}
MODEL_ID = "tiny"


def tiny_llm_config(
    model_dir: Path,
    callback_config: Any,
    env: Mapping[str, str],
    model_id: str = MODEL_ID,
    deployment_config: Mapping[str, Any] | None = None,
    engine_kwargs: Mapping[str, Any] | None = None,
    **extra: Any,
) -> Any:
    """Ray's ``LLMConfig`` for the tiny model: one CPU replica (``deployment_config`` is merged
    over that), one ingress replica, ``env`` in the replica's runtime_env; ``extra`` goes to
    ``LLMConfig`` (e.g. ``server_cls``); ``engine_kwargs`` are merged over the tiny model's."""
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": str(model_dir)},
        placement_group_config={"bundles": [{"CPU": 1}]},
        engine_kwargs={**ENGINE_KWARGS, **(engine_kwargs or {})},
        deployment_config={"num_replicas": 1, **(deployment_config or {})},
        experimental_configs={"num_ingress_replicas": 1},
        runtime_env={"env_vars": dict(env)},
        callback_config=callback_config,
        **extra,
    )


def wait_ready(base: str, timeout: float, chat_model: str | None = None) -> None:
    """Wait until the OpenAI app at ``base`` lists its models; with ``chat_model``, until a
    two-token chat request to it answers 200 as well (the engine itself is up)."""
    import httpx

    deadline = time.monotonic() + timeout
    last: Any = None
    body = {"model": chat_model, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, "temperature": 0}
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(base + "/v1/models", timeout=5)
            last = resp.status_code
            if resp.status_code == 200 and resp.json().get("data"):
                if chat_model is None:
                    return
                resp = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
                last = resp.status_code
                if resp.status_code == 200:
                    return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    raise TimeoutError(f"deployment not ready after {timeout}s: {last!r}")


@dataclass
class App:
    """A deployed tiny app: its Ray, its URL, its config."""

    ray: LocalRay
    base_url: str
    llm_config: Any
    ready_s: float = 0.0  # from serve.run to ready

    def chat(self, content: str = "hello", max_tokens: int = 6, model: str = MODEL_ID) -> Any:
        import httpx

        resp = httpx.post(
            self.base_url + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": content}],
                  "max_tokens": max_tokens, "temperature": 0},
            timeout=120,
        )
        resp.raise_for_status()
        return resp.json()


@contextlib.contextmanager
def deployed(
    folder: Path,
    model_dir: Path,
    callback_config: Any,
    *,
    env: Mapping[str, str] | None = None,
    num_cpus: int = 4,
    ready_timeout_s: float = 420,
    app_name: str = "default",
    chat_ready: bool = False,
    start_ray: Any = start_local_ray,
    **llm_extra: Any,
) -> Iterator[App]:
    """Start Ray in ``folder / "ray"``, ``serve.run(build_openai_app(...))``, wait until it
    answers (``chat_ready``: until a chat request does), yield the :class:`App`; Serve and Ray
    are stopped on exit. ``env`` (with :data:`CPU_ENGINE_ENV`) reaches Ray's processes and the
    replica; ``start_ray`` is a :func:`~.local_ray.start_local_ray` alike (the tests' adds the
    repo root to the workers' path)."""
    from ray import serve
    from ray.serve.llm import build_openai_app

    full_env = {**CPU_ENGINE_ENV, **(env or {})}
    run = start_ray(folder / "ray", num_cpus=num_cpus, env=full_env)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = tiny_llm_config(model_dir, callback_config, full_env, **llm_extra)
        started = time.perf_counter()
        serve.run(build_openai_app({"llm_configs": [config]}), blocking=False, name=app_name,
                  route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        model = llm_extra.get("model_id", MODEL_ID) if chat_ready else None
        wait_ready(base, ready_timeout_s, chat_model=model)
        yield App(run, base, config, time.perf_counter() - started)
    finally:
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            run.shutdown()
