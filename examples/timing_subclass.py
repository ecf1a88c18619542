"""A Timing subclass with a phase of its own: how fast each node reads the model's files.

Slow startups are often slow storage. This adds a ``storage_probe`` phase, measured on every
node inside Ray's download task, right after the built-in ``download_task_start`` phase: the
time to read the model directory's small files (config, tokenizer). It shows up as a span
``startup_phase storage_probe`` and in ``llm_callback_startup_phase_duration_seconds``
(``phase="storage_probe"``, ``node=<node id>``), next to the built-in phases.

Use it as ``callback_config={"callback_class": "examples.timing_subclass.StorageProbeTiming"}``
(``examples`` must be importable on the workers, e.g. through ``runtime_env`` PYTHONPATH).
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from llm_otel_callbacks.builtin import Timing

PHASE = "storage_probe"
_SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


class StorageProbeTiming(Timing):
    def on_before_download_model_files_distributed(self) -> None:
        super().on_before_download_model_files_distributed()  # keep the built-in phase
        model_dir = Path(str(self.llm_config.get_engine_config().actual_hf_model_id))
        if not model_dir.is_dir():  # a hub id or a mirror: nothing local to read yet
            return
        start = time.time_ns()
        for name in _SMALL_FILES:
            path = model_dir / name
            if path.is_file():
                path.read_bytes()
        node = ray.get_runtime_context().get_node_id()
        self.record_phase(PHASE, start, time.time_ns(), node=node)
