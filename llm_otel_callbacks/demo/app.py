"""``python -m llm_otel_callbacks demo``: the whole story on one machine, no GPU, no collector.

It starts a local Ray inside a folder of its own, makes a tiny random-weight model, deploys a
real Ray Serve LLM app on the CPU with a :class:`~llm_otel_callbacks.Composite` of ``Timing``,
``DownloadPolicy`` and a small user callback (``examples/user_callback.py``), sends a few chat
requests, and shows the replica's startup waterfall read back from the spans it wrote. Then it
says where the spans and metrics are and how to import the dashboards, and cleans up: Serve and
Ray stopped, Ray's session folder removed, no process left behind.

Spans go to ``<folder>/spans.jsonl`` (OTLP/JSON lines); with ``OTEL_EXPORTER_OTLP_ENDPOINT``
set they also go to that collector. ``--prometheus`` starts Debian's ``prometheus`` scraping
the demo so the dashboards can be tried at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import catalog
from .._ray import CallbackConfig
from . import report
from .console import Console, Step
from .local_ray import LocalRay, pythonpath, start_local_ray
from .ports import free_port
from .prometheus import PrometheusServer
from .serve_app import CPU_ENGINE_ENV, MODEL_ID, tiny_llm_config
from .waterfall import StartupTrace, read_spans, startup_traces

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_NAME = "llm_demo"
SERVER_CLS = "llm_otel_callbacks.serve.ObservedLLMServer"
USER_CALLBACK = "user_callback.DiskSpaceCheck"
QUIET_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_QUIET_LOGGERS = ("ray", "ray.serve")
PROMPTS = (
    "Say hello to the people reading this terminal.",
    "What does a replica do before its engine starts?",
    "Name three startup phases.",
    "Why trace a startup?",
)


@dataclass
class DemoOptions:
    folder: Path = Path(".demo")
    requests: int = 3
    prometheus: bool = False
    prometheus_scrape_s: float = 2.0
    hold_s: float | None = None
    num_cpus: int = 4
    deploy_timeout_s: float = 600.0
    observed_server: bool | None = None
    """Use ObservedLLMServer (engine_start phase, GenAI request metrics); None: if available."""
    extra_callbacks: list[Any] = field(default_factory=list)
    """More Composite children (entries as in ``callback_kwargs["callbacks"]``)."""


@dataclass
class DemoContext:
    """What a running demo exposes to ``on_ready`` (the tests use it)."""

    options: DemoOptions
    ray: LocalRay
    http_url: str
    """Serve's HTTP address (on 127.0.0.1)."""
    spans_path: Path
    """The OTLP/JSON lines file the spans go to."""
    model_dir: Path
    llm_config: Any
    started_at: float
    """Wall-clock time the deployment started."""
    observed_server: bool
    """True when the replica runs ObservedLLMServer."""
    prometheus: PrometheusServer | None = None
    startup: StartupTrace | None = None


class DemoError(RuntimeError):
    """A step failed; the message says what to do."""


# --- the demo ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", type=Path, default=Path(".demo"),
                        help="folder for the model, spans, Ray's session and Prometheus "
                             "(default: .demo)")
    parser.add_argument("--requests", type=int, default=3, help="chat requests to send (3)")
    parser.add_argument("--prometheus", action="store_true",
                        help="start Debian's prometheus scraping the demo (needs the package "
                             "'prometheus'), then wait for Enter before cleaning up")
    parser.add_argument("--hold", type=float, default=None, metavar="SECONDS",
                        help="keep everything running this long before cleaning up")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs Ray may use (4)")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                        help="give up on the deployment after this long (600)")
    server = parser.add_mutually_exclusive_group()
    server.add_argument("--observed-server", dest="observed_server", action="store_true",
                        default=None, help="use ObservedLLMServer (default when available)")
    server.add_argument("--plain-server", dest="observed_server", action="store_false",
                        help="use Ray's own LLMServer")


def run(args: argparse.Namespace) -> int:
    options = DemoOptions(
        folder=args.dir,
        requests=max(0, args.requests),
        prometheus=args.prometheus,
        hold_s=args.hold,
        num_cpus=args.num_cpus,
        deploy_timeout_s=args.timeout,
        observed_server=args.observed_server,
    )
    return run_demo(options)


def run_demo(
    options: DemoOptions,
    out: TextIO | None = None,
    on_ready: Callable[[DemoContext], None] | None = None,
) -> int:
    """Run the demo; ``on_ready(ctx)`` runs while the deployment is still up. Returns the
    exit status (0: everything shown; 1: a step failed, with the reason printed)."""
    console = Console(out or sys.stdout, steps=7)
    folder = options.folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    console.say("llm_otel_callbacks demo: a real Ray Serve LLM deployment on this CPU, observed.")
    console.say(f"Everything it writes goes to {folder}.")
    saved_env = {k: os.environ.get(k) for k in (*CPU_ENGINE_ENV, *QUIET_ENV)}
    for key, value in {**CPU_ENGINE_ENV, **QUIET_ENV}.items():
        os.environ.setdefault(key, value)
    # Ray and Serve log every step at INFO; the demo tells its own story.
    quiet = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    ray_run: LocalRay | None = None
    prometheus: PrometheusServer | None = None
    failed = False
    try:
        examples = _examples_dir()
        with console.step("Creating a tiny model (random weights, local tokenizer)") as step:
            from .tiny_model import make_tiny_model

            model_dir = make_tiny_model(folder / "model")
            step.result = f"{model_dir}"
        with console.step("Loading Ray Serve LLM and vLLM (CPU)"):
            observed = _use_observed_server(options.observed_server)
            llm_config, spans_path = _llm_config(folder, model_dir, examples, observed,
                                                 options.extra_callbacks)
        with console.step(f"Starting a local Ray ({options.num_cpus} CPUs)") as step:
            ray_run = start_local_ray(
                folder,
                num_cpus=options.num_cpus,
                env={"PYTHONPATH": pythonpath(examples, REPO_ROOT)},
                runtime_env={"env_vars": _worker_env(examples)},
                clean=True,  # the session and the token go; the model and spans stay
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
            step.result = f"metrics on port {ray_run.metrics_port}"
        http_port = free_port()
        with console.step("Deploying the Serve LLM app (replica start, node init, engine)") as step:
            started_at = time.time()
            _deploy(llm_config, http_port, options.deploy_timeout_s, step)
            step.result = "RUNNING"
        ctx = DemoContext(options, ray_run, f"http://127.0.0.1:{http_port}", spans_path,
                          model_dir, llm_config, started_at, observed)
        with console.step(f"Sending {options.requests} chat request(s)") as step:
            step.result = _send_requests(ctx, options.requests)
        with console.step("Reading the startup trace back from the spans file") as step:
            ctx.startup = _wait_for_startup(spans_path, _expected_phases(observed))
            step.result = f"{len(ctx.startup.spans)} spans in trace {ctx.startup.root.trace_id}"
        report.show_waterfall(console, ctx.startup)
        report.show_spans(console, spans_path)
        report.show_metrics(console, ray_run.metrics_url, options.requests, observed)
        report.show_dashboards(console, dashboard_files())
        if options.prometheus:
            prometheus = report.start_prometheus_for(console, folder, ray_run,
                                                     options.prometheus_scrape_s)
            ctx.prometheus = prometheus
        if on_ready is not None:
            on_ready(ctx)
        _hold(console, options, prometheus)
    except KeyboardInterrupt:
        failed = True
        console.say("\nInterrupted: cleaning up.")
    except DemoError as exc:
        failed = True
        console.say(f"\nThe demo stopped: {exc}")
    except Exception:
        failed = True  # keeps Ray's logs for the traceback that follows
        raise
    finally:
        if prometheus is not None:
            prometheus.stop()
        if ray_run is not None:
            _cleanup(console, ray_run, folder, keep_logs=failed)
        for key, old in saved_env.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    return 1 if failed else 0


# --- steps --------------------------------------------------------------------------------------


def _examples_dir() -> Path:
    for candidate in (REPO_ROOT / "examples", Path.cwd() / "examples"):
        if (candidate / "user_callback.py").is_file():
            return candidate.resolve()
    raise DemoError("examples/user_callback.py not found: run the demo from a clone of the "
                    "repository")


def _worker_env(examples: Path) -> dict[str, str]:
    """Env vars every Ray worker of the demo gets (the replica and the download tasks)."""
    env = {"PYTHONPATH": pythonpath(examples, REPO_ROOT), **CPU_ENGINE_ENV, **QUIET_ENV}
    # A configured collector reaches the replica too (OTEL_* is read there).
    env.update({k: v for k, v in os.environ.items() if k.startswith("OTEL_")})
    return env


def _use_observed_server(wanted: bool | None) -> bool:
    if wanted is False:
        return False
    try:
        from ..serve import ObservedLLMServer  # noqa: F401
    except ImportError as exc:
        if wanted:
            raise DemoError(f"ObservedLLMServer is not available: {exc}") from None
        return False
    return True


def _check_engine_importable() -> None:
    try:
        import vllm  # noqa: F401
        from ray.serve.llm import LLMConfig  # noqa: F401
    except ImportError as exc:
        raise DemoError(
            f"Ray Serve LLM cannot import ({exc}). Install the CPU stack first: ./demo.sh does "
            "it, or pip install -e '.[cpu]' (then uninstall torchvision torchaudio torchcodec "
            "if pip pulled them in)"
        ) from None


def _llm_config(folder: Path, model_dir: Path, examples: Path, observed: bool,
                extra_callbacks: list[Any]) -> tuple[Any, Path]:
    _check_engine_importable()

    spans_path = folder / "spans.jsonl"
    if spans_path.exists():
        spans_path.unlink()  # one run per file: the waterfall reads it back
    callbacks: list[Any] = [
        {"callback_class": "llm_otel_callbacks.builtin.Timing",
         "callback_kwargs": {"warn_after_s": 300}},
        {"callback_class": "llm_otel_callbacks.builtin.DownloadPolicy",
         "callback_kwargs": {"skip_weights_if_cached": True}},
        {"callback_class": USER_CALLBACK, "callback_kwargs": {"min_free_gb": 1},
         "raise_error_on_callback": False},
        *extra_callbacks,
    ]
    telemetry = {"traces_file": str(spans_path), "schedule_delay_ms": 200,
                 "service_name": "llm-otel-demo"}
    extra: dict[str, Any] = {}
    if observed:
        extra["server_cls"] = SERVER_CLS
    config = tiny_llm_config(
        model_dir,
        CallbackConfig(
            callback_class="llm_otel_callbacks.Composite",
            callback_kwargs={"callbacks": callbacks, "telemetry": telemetry},
            raise_error_on_callback=True,
        ),
        _worker_env(examples),
        model_id=MODEL_ID,
        **extra,
    )
    return config, spans_path


def _deploy(llm_config: Any, http_port: int, timeout_s: float, step: Step) -> None:
    from ray import serve
    from ray.serve.llm import build_openai_app

    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    app = build_openai_app({"llm_configs": [llm_config]})
    # serve.run returns once the app runs: run it aside and show the replicas' states here.
    errors: list[BaseException] = []

    def deploy() -> None:
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=deploy, name="demo-deploy", daemon=True)
    worker.start()
    deadline = time.monotonic() + timeout_s
    while worker.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            status = serve.status().applications.get(APP_NAME)
            if status is not None:
                step.note = _deployment_note(status)
        worker.join(1.0)
    if worker.is_alive():
        raise DemoError(f"the deployment was not RUNNING after {timeout_s:.0f}s")
    if errors:
        status = serve.status().applications.get(APP_NAME)
        message = status.message.strip() if status is not None else str(errors[0])
        raise DemoError(f"the deployment failed: {message[:2000]}")


def _deployment_note(status: Any) -> str:
    parts = []
    for name, dep in sorted(status.deployments.items()):
        states = ", ".join(f"{str(k).split('.')[-1].lower()} {v}"
                           for k, v in sorted(dep.replica_states.items(), key=str))
        parts.append(f"{name}: {states or str(dep.status).split('.')[-1].lower()}")
    return "(" + "; ".join(parts) + ")" if parts else ""


def _send_requests(ctx: DemoContext, count: int) -> str:
    url = f"{ctx.http_url}/v1/chat/completions"
    latencies = []
    tokens = 0
    for i in range(count):
        stream = i == count - 1 and count > 1  # the last one streams (time to first token)
        body = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": 16,
            "temperature": 0,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        t0 = time.monotonic()
        request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                raw = resp.read().decode("utf-8")
        except OSError as exc:
            raise DemoError(f"chat request {i + 1} failed: {exc}") from None
        latencies.append(time.monotonic() - t0)
        tokens += _completion_tokens(raw, stream)
    ms = ", ".join(f"{s * 1000:.0f} ms" for s in latencies)
    return f"{count} answered ({ms}; {tokens} tokens of noise: the weights are random)"


def _completion_tokens(raw: str, stream: bool) -> int:
    if not stream:
        return int(json.loads(raw).get("usage", {}).get("completion_tokens", 0))
    total = 0
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            usage = json.loads(line[6:]).get("usage") or {}
            total = int(usage.get("completion_tokens", total))
    return total


def _expected_phases(observed: bool) -> set[str]:
    """Timing's phases that are spans (the total is the startup span itself)."""
    phases = set(catalog.TIMING_PHASES) - {catalog.PHASE_TOTAL}
    if not observed:  # only a server wrapper calls the engine-start hooks
        phases.discard(catalog.PHASE_ENGINE_START)
    return phases


def _wait_for_startup(spans_path: Path, phases: set[str], timeout_s: float = 30.0) -> StartupTrace:
    """The latest startup trace once its root span and ``phases`` are in the file (processes
    export in batches, every 200 ms here)."""
    deadline = time.monotonic() + timeout_s
    found: list[StartupTrace] = []
    while time.monotonic() < deadline:
        found = startup_traces(read_spans(spans_path))
        if found and phases <= found[-1].phase_names():
            return found[-1]
        time.sleep(0.5)
    if found:
        missing = ", ".join(sorted(phases - found[-1].phase_names()))
        raise DemoError(f"the startup trace in {spans_path} lacks phase(s) {missing}")
    raise DemoError(f"no startup trace in {spans_path} after {timeout_s:.0f}s")


def dashboard_files() -> list[Path]:
    return sorted((REPO_ROOT / "dashboards").glob("*.json"))


def _hold(console: Console, options: DemoOptions, prometheus: PrometheusServer | None) -> None:
    if options.hold_s:
        console.say(f"\nKeeping everything up for {options.hold_s:g}s (--hold) ...")
        time.sleep(options.hold_s)
    elif prometheus is not None and sys.stdin is not None and sys.stdin.isatty():
        with contextlib.suppress(EOFError):
            input("\nEverything is up. Press Enter to stop the demo and clean up. ")


def _cleanup(console: Console, ray_run: LocalRay, folder: Path, keep_logs: bool) -> None:
    logs = folder / "ray-logs" if keep_logs else None
    with console.step("Cleaning up (Serve, Ray, Ray's session folder)") as step:
        with contextlib.suppress(Exception):
            from ray import serve

            serve.shutdown()  # type: ignore[no-untyped-call]
        killed = ray_run.shutdown(keep_logs_in=logs, grace_s=20.0)
        left = ray_run.leftovers()
        step.result = "nothing left running" if not left else f"still running: {left}"
        if killed:
            step.result += f" (stopped {len(killed)} straggler(s))"
    if logs is not None:
        console.say(f"Ray's logs were kept in {logs}.")
    console.say(f"Kept: the model and spans in {folder} (delete the folder when done).")
