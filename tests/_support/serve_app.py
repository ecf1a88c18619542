"""Deploy a real Ray Serve LLM app on the CPU (vLLM's CPU build, a tiny local model)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests._support.ray_env import LocalRay, free_port, start_local_ray

VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
ENGINE_KWARGS = {
    "max_model_len": 256,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 256,
    "enforce_eager": True,
    "dtype": "float32",
}


@dataclass
class App:
    ray: LocalRay
    base_url: str
    llm_config: Any

    def chat(self, content: str = "hello", max_tokens: int = 6, model: str = "tiny") -> Any:
        import httpx

        resp = httpx.post(
            self.base_url + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": content}],
                  "max_tokens": max_tokens, "temperature": 0},
            timeout=120,
        )
        resp.raise_for_status()
        return resp.json()


def llm_config(model_dir: Path, callback_config: dict[str, Any], env: dict[str, str],
               model_id: str = "tiny", **extra: Any) -> Any:
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": str(model_dir)},
        placement_group_config={"bundles": [{"CPU": 1}]},
        engine_kwargs=dict(ENGINE_KWARGS),
        deployment_config={"num_replicas": 1},
        experimental_configs={"num_ingress_replicas": 1},
        runtime_env={"env_vars": dict(env)},
        callback_config=callback_config,
        **extra,
    )


@contextlib.contextmanager
def deployed(
    tmp: Path,
    model_dir: Path,
    callback_config: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    num_cpus: int = 4,
    ready_timeout_s: float = 420,
    **llm_extra: Any,
) -> Iterator[App]:
    """Start Ray in ``tmp``, ``serve.run(build_openai_app(...))``, wait until it answers."""
    from ray import serve
    from ray.serve.llm import build_openai_app

    full_env = {**VLLM_CPU_ENV, **(env or {})}
    run = start_local_ray(tmp / "ray", num_cpus=num_cpus, env=full_env)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = llm_config(model_dir, callback_config, full_env, **llm_extra)
        serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, ready_timeout_s)
        yield App(run, base, config)
    finally:
        try:
            serve.shutdown()
        finally:
            run.shutdown()


def wait_ready(base: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(base + "/v1/models", timeout=5)
            if resp.status_code == 200 and resp.json().get("data"):
                return
            last = resp.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    raise TimeoutError(f"deployment not ready after {timeout}s: {last!r}")
