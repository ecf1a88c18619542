"""Deploy a real Ray Serve LLM app on the CPU (vLLM's CPU build, the tiny local model).

The package's toolkit (:mod:`llm_otel_callbacks.demo.serve_app`) with the tests' local Ray,
which puts the repo root on every worker's path (replicas import ``tests.*``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_otel_callbacks.demo import serve_app as _toolkit
from llm_otel_callbacks.demo.serve_app import ENGINE_KWARGS, App, tiny_llm_config, wait_ready
from tests._support.ray_env import start_local_ray

VLLM_CPU_ENV = _toolkit.CPU_ENGINE_ENV
llm_config = tiny_llm_config

__all__ = [
    "ENGINE_KWARGS", "VLLM_CPU_ENV", "App", "deployed", "llm_config", "tiny_llm_config",
    "wait_ready",
]


@contextlib.contextmanager
def deployed(tmp: Path, model_dir: Path, callback_config: dict[str, Any],
             **kwargs: Any) -> Iterator[App]:
    """Start Ray in ``tmp``, ``serve.run(build_openai_app(...))``, wait until it answers."""
    with _toolkit.deployed(tmp, model_dir, callback_config, start_ray=start_local_ray,
                           **kwargs) as app:
        yield app
