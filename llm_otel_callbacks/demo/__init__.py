"""The demo and its toolkit, kept out of the runtime path (a replica never imports this).

``python -m llm_otel_callbacks demo`` runs :mod:`.app`. The same toolkit serves the tests and
the benchmarks: a local Ray that stays in one folder (:mod:`.local_ray`), the tiny CPU model
(:mod:`.tiny_model`), Debian's Prometheus as a subprocess (:mod:`.prometheus`), free ports
(:mod:`.ports`), the startup waterfall read back from a spans file (:mod:`.waterfall`), and
the terminal output (:mod:`.console`).
"""

from __future__ import annotations

from .app import (
    MODEL_ID,
    DemoContext,
    DemoError,
    DemoOptions,
    add_arguments,
    dashboard_files,
    run,
    run_demo,
)

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
