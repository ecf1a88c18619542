"""The vLLM internal points each phase is measured at, wrapped inside vLLM's own processes.

Pinned for vLLM 0.29 (tests/test_engine_phases.py). When a later vLLM renames a point, that
phase is simply not recorded: one debug line lists what is missing, nothing raises, and the
engine starts as before. A wrapper only times the call it wraps; whatever the call raises
passes through unchanged after the phase span ends with an error status.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import catalog

if TYPE_CHECKING:
    from ._process import PhaseRecorder

logger = logging.getLogger(__name__)

_WRAPPED = "__llm_otel_phase__"

# Worker methods (on the worker class vLLM runs, e.g. CPUWorker / Worker) -> phase.
WORKER_POINTS = (
    ("init_device", catalog.PHASE_WORKER_DEVICE_INIT),
    ("load_model", catalog.PHASE_WORKER_WEIGHTS_LOAD),
    ("determine_available_memory", catalog.PHASE_WORKER_KV_PROFILE),
    ("initialize_from_config", catalog.PHASE_WORKER_KV_ALLOCATE),
    ("compile_or_warm_up_model", catalog.PHASE_WORKER_WARMUP),
)
# Optional points inside a worker's phases: (module, class, method) -> phase.
WORKER_NESTED_POINTS = (
    ("vllm.compilation.backends", "VllmBackend", "__call__", catalog.PHASE_WORKER_TORCH_COMPILE),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "capture_model",
     catalog.PHASE_WORKER_CUDA_GRAPHS),
)


def install(recorder: PhaseRecorder, owners: dict[str, Any]) -> list[str]:
    """Wrap this process's points; returns the phases it could not hook (also logged once)."""
    missing: list[str] = []
    if recorder.role == catalog.ROLE_ENGINE_CORE:
        _install_engine_core(recorder, owners, missing)
    else:
        _install_worker(recorder, owners, missing)
    if missing:
        logger.debug(
            "llm_otel_callbacks: this vLLM lacks the points of engine phases %s; they are not "
            "recorded", ", ".join(missing),
        )
    return missing


def _install_engine_core(
    recorder: PhaseRecorder, owners: dict[str, Any], missing: list[str]
) -> None:
    core = owners.get("engine_core")
    executor_class = owners.get("executor_class")
    if executor_class is None or not _wrap(recorder, executor_class, "__init__",
                                           catalog.PHASE_ENGINE_WORKERS_START):
        missing.append(catalog.PHASE_ENGINE_WORKERS_START)
    core_class = type(core) if core is not None else None
    setup: dict[str, int | None] = {}

    def kv_done(_: Any) -> None:
        setup["token"] = recorder.begin(catalog.PHASE_ENGINE_CORE_SETUP)

    def ready(_: Any) -> None:
        recorder.end(setup.pop("token", None))  # the first of the two points ends it

    if core_class is None or not _wrap(recorder, core_class, "_initialize_kv_caches",
                                       catalog.PHASE_ENGINE_KV_CACHE, after=kv_done):
        missing.append(catalog.PHASE_ENGINE_KV_CACHE)
    # Ready: the input thread starts, connects and tells the replica (READY goes out right
    # after); the serving loop (run_busy_loop) follows. Either point ends the setup phase.
    hooked = [core_class is not None and _hook_entry(core_class, point, ready)
              for point in ("process_input_sockets", "run_busy_loop")]
    if not any(hooked):
        missing.append(catalog.PHASE_ENGINE_CORE_SETUP)


def _install_worker(recorder: PhaseRecorder, owners: dict[str, Any], missing: list[str]) -> None:
    # worker_init: from here (the plugin loaded) until device init begins; it includes
    # importing the worker class below, which vLLM would do next anyway.
    init = recorder.begin(catalog.PHASE_WORKER_INIT)
    worker_class = _worker_class(owners.get("vllm_config"))
    for method, phase in WORKER_POINTS:
        after = _weights_size if phase == catalog.PHASE_WORKER_WEIGHTS_LOAD else None
        before = None
        if phase == catalog.PHASE_WORKER_DEVICE_INIT:
            def before(_: Any) -> None:
                recorder.end(init)
        if worker_class is None or not _wrap(
            recorder, worker_class, method, phase, attrs=after, before=before
        ):
            missing.append(phase)
    if worker_class is None or catalog.PHASE_WORKER_DEVICE_INIT in missing:
        recorder.end(init)  # nothing will end it later
        missing.append(catalog.PHASE_WORKER_INIT)
    for module, cls_name, method, phase in WORKER_NESTED_POINTS:
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except Exception:
            cls = None
        if cls is None or not _wrap(recorder, cls, method, phase):
            missing.append(phase)


def _worker_class(vllm_config: Any) -> type | None:
    try:
        qualname = vllm_config.parallel_config.worker_cls
        if not isinstance(qualname, str):
            return None
        module, _, name = qualname.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls if isinstance(cls, type) else None
    except Exception:
        return None


def _weights_size(worker: Any) -> dict[str, Any]:
    """Bytes of the weights this worker holds (its shard)."""
    model = worker.model_runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {catalog.A_WEIGHTS_BYTES: int(total)}


def _wrap(
    recorder: PhaseRecorder, owner: type, method: str, phase: str,
    attrs: Callable[[Any], dict[str, Any]] | None = None,
    after: Callable[[Any], None] | None = None,
    before: Callable[[Any], None] | None = None,
) -> bool:
    """Time ``owner.method`` as ``phase``; False when the point does not exist."""
    original = getattr(owner, method, None)
    if original is None or not callable(original):
        return False
    if getattr(original, _WRAPPED, None) == phase:
        return True

    @functools.wraps(original)
    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        if before is not None:
            _quietly(before, self)
        token = recorder.begin(phase)
        try:
            result = original(self, *args, **kwargs)
        except BaseException as exc:
            recorder.end(token, exc)
            raise
        extra = None
        if attrs is not None:
            try:
                extra = attrs(self)
            except Exception:
                extra = None
        recorder.end(token, attrs=extra)
        if after is not None:
            _quietly(after, self)
        return result

    setattr(timed, _WRAPPED, phase)
    setattr(owner, method, timed)
    return True


def _hook_entry(owner: type, method: str, before: Callable[[Any], None]) -> bool:
    """Call ``before(self)`` when ``owner.method`` starts (a call that never returns)."""
    original = getattr(owner, method, None)
    if original is None or not callable(original):
        return False

    @functools.wraps(original)
    def entered(self: Any, *args: Any, **kwargs: Any) -> Any:
        _quietly(before, self)
        return original(self, *args, **kwargs)

    setattr(owner, method, entered)
    return True


def _quietly(fn: Callable[[Any], None], arg: Any) -> None:
    try:
        fn(arg)
    except Exception:
        logger.debug("engine phase bookkeeping failed", exc_info=True)
