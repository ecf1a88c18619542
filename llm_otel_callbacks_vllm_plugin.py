"""vLLM's ``vllm.general_plugins`` entry point of llm-otel-callbacks: kept tiny on purpose.

vLLM calls :func:`register` once in every process that loads its plugins (the replica's
front end, the V1 engine-core process, each worker). It is inert unless a replica of ours
asked for it by setting :data:`ENV_CONFIG` before building the engine: with the variable absent
it returns at once, having imported nothing but ``os`` (no threads, no files, no exporter, no
log lines). This module lives outside the ``llm_otel_callbacks`` package because importing
the package runs its ``__init__`` (pydantic, OpenTelemetry, Ray: seconds), which a plain vLLM
process must not pay.
"""

from __future__ import annotations

import os
import sys

#: Set by ObservedLLMServer in the replica while it builds the engine; inherited by vLLM's
#: engine-core and worker processes. JSON: model, report address, telemetry settings.
ENV_CONFIG = "LLM_OTEL_CALLBACKS_ENGINE_PHASES"


def register() -> None:
    """vLLM's plugin hook: record this process's engine-start phases when a replica asked."""
    if not os.environ.get(ENV_CONFIG):
        return
    try:
        from llm_otel_callbacks.vllm_plugin._process import activate

        # Who called vLLM's load_general_plugins tells the role (engine core or worker).
        activate(sys._getframe(2))
    except Exception:  # never fail an engine start over telemetry
        import logging

        logging.getLogger("llm_otel_callbacks.vllm_plugin").debug(
            "engine phases not recorded in pid %s", os.getpid(), exc_info=True
        )
