"""Shared fixtures: a tiny local model, an OTLP receiver, and real Ray (local or
two nodes) whose files stay inside pytest's temp dirs.

Ray fixtures are module-scoped (starting Ray takes seconds) and need the driver
to themselves: starting one ends the other, so in a module that uses both, put
every ``ray_local`` test before the first ``ray_two_nodes`` test.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `import tests._support...` and `import llm_otel_callbacks` must work however
# pytest was started (rootdir insertion only adds tests/ itself).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from llm_otel_callbacks.demo.serve_app import CPU_ENGINE_ENV  # noqa: E402
from tests._support.otlp_receiver import OtlpHttpReceiver  # noqa: E402
from tests._support.ray_env import (  # noqa: E402
    LocalCluster,
    LocalRay,
    shutdown_active,
    start_cluster,
    start_local_ray,
)
from tests._support.tiny_model import make_tiny_model  # noqa: E402

# The tests wait for spans at a receiver: export them every second, not on the default 5 s
# schedule (set before any Ray starts, so raylets, workers and replicas inherit it; a test that
# needs another schedule sets it in its telemetry config).
os.environ.setdefault("OTEL_BSP_SCHEDULE_DELAY", "1000")

# Env for vLLM's CPU engine (see the shared notes); tests pass it to start_local_ray
# or an LLMConfig runtime_env when they boot a real engine.
VLLM_CPU_ENV = CPU_ENGINE_ENV


def _ensure_ray_down() -> None:
    # The driver holds one Ray at a time: end a run another module-scoped
    # fixture still holds (its later teardown is then a no-op), and any Ray a
    # failed test started by hand, so the next start cannot fail on it.
    import ray

    shutdown_active()
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + BPE tokenizer; LLM_OTEL_TINY_MODEL_DIR reuses one
    across runs."""
    cached = os.environ.get("LLM_OTEL_TINY_MODEL_DIR")
    dest = Path(cached) if cached else tmp_path_factory.mktemp("model") / "tiny-llama"
    return make_tiny_model(dest)


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpHttpReceiver]:
    """A running OTLP/HTTP receiver; export to ``otlp_receiver.endpoint``."""
    with OtlpHttpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRay]:
    """Single-node Ray (4 CPUs, metrics every 1 s); ``.metrics_url`` scrapes it."""
    _ensure_ray_down()
    run = start_local_ray(tmp_path_factory.mktemp("ray"), num_cpus=4)
    try:
        yield run
    finally:
        run.shutdown()


@pytest.fixture(scope="module")
def ray_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Two raylets of 2 CPUs each on this machine; ``.cluster``, ``.nodes``
    (node_id, metrics_port, metrics_url; head first) and ``.metrics_urls``."""
    _ensure_ray_down()
    run = start_cluster(tmp_path_factory.mktemp("ray2n"), nodes=[{"num_cpus": 2}, {"num_cpus": 2}])
    try:
        yield run
    finally:
        run.shutdown()
