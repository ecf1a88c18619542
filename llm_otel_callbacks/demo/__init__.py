"""The demo and its toolkit, kept out of the runtime path (a replica never imports this).

``python -m llm_otel_callbacks demo`` runs :mod:`.app`. The same toolkit serves the tests and
the benchmarks: a local Ray that stays in one folder (:mod:`.local_ray`), the tiny CPU model
(:mod:`.tiny_model`), Debian's Prometheus as a subprocess (:mod:`.prometheus`), free ports
(:mod:`.ports`), the tiny CPU Serve LLM app (:mod:`.serve_app`), the startup waterfall read
back from a spans file (:mod:`.waterfall`), the demo's report (:mod:`.report`) and terminal
output (:mod:`.console`).
"""

from __future__ import annotations

from .app import (
    DemoContext,
    DemoError,
    DemoOptions,
    add_arguments,
    dashboard_files,
    run,
    run_demo,
)
from .serve_app import MODEL_ID

__all__ = [
    "MODEL_ID",
    "DemoContext",
    "DemoError",
    "DemoOptions",
    "add_arguments",
    "dashboard_files",
    "run",
    "run_demo",
]
