"""What the add-on adds to a replica's startup, against a plain Ray ``CallbackBase``, in one run.

Each sample is a fresh interpreter that first imports Ray Serve LLM (``ray.serve.llm``, which
brings vLLM: a replica imports it anyway, with or without us), then times, on its own clock:

* ``plain``: a plain Ray ``CallbackBase`` subclass with no-op startup hooks, dispatched by
  Ray's ``run_callback`` (on_before_node_init, on_before_download_model_files_distributed,
  on_after_node_init);
* ``ours``: ``import llm_otel_callbacks`` (and its serve module), a ``RayServeLLMCallback``
  with the same no-op hooks configured as the README shows (an OTLP endpoint: a live receiver
  in its own process), provider setup on the first hook, the same hooks, the engine-start
  observation (``EngineStart``: its span and the before/after engine-start dispatch), and a
  flush of the spans.

How the package is installed matters more than anything it does at startup: importing it from
source compiles every module (about 50 ms here), importing it from bytecode does not. ``pip
install`` writes the bytecode (``.pyc``) of a package it installs, so ``--install pip`` (the
default) measures the package as users get it: installed with ``pip install --no-deps --target``
into a temporary folder that the children import it from. ``--install source`` measures the
checkout as it is, which on a machine with ``PYTHONDONTWRITEBYTECODE=1`` and an editable install
(this project's CI machine) means compiling on every start.

Samples alternate between the two (``--samples`` each). The add-on's cost is the difference of
the medians, in ms, beside the replica startup it is part of (``--startup-s``: a measured
replica start, e.g. the deploy-to-ready time ``request_overhead.py serve`` prints; 60 s for the
tiny CPU model here). Goal: <= 50 ms, or <= 0.1 % of startup.

Run: ``python benchmarks/startup_overhead.py [--samples 5] [--startup-s 60]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_CHILD = r'''
import asyncio, json, sys, time
import ray.serve.llm  # noqa: F401  (a replica has imported this, and vLLM, before our code runs)
HOOKS = ("on_before_node_init", "on_before_download_model_files_distributed",
         "on_after_node_init")
mode, endpoint = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if mode == "plain":
    from ray.llm._internal.common.callbacks.base import CallbackBase

    class Plain(CallbackBase):
        async def on_before_node_init(self): return None
        def on_before_download_model_files_distributed(self): return None
        async def on_after_node_init(self): return None

    async def main():
        cb = Plain(llm_config=None, raise_error_on_callback=True, ctx_kwargs={})
        for hook in HOOKS:
            await cb.run_callback(hook)
else:
    import llm_otel_callbacks
    from llm_otel_callbacks.serve._engine_start import EngineStart

    class Ours(llm_otel_callbacks.RayServeLLMCallback):
        async def on_before_node_init(self): return None
        def on_before_download_model_files_distributed(self): return None
        async def on_after_node_init(self): return None

    async def main():
        cb = Ours(llm_config=None, ctx_kwargs={}, telemetry={"endpoint": endpoint})
        tel = cb._observer.tel
        phase = EngineStart(cb, "bench", tel)
        phase.arm()
        for hook in HOOKS:
            await cb.run_callback(hook)
        await phase.begin()
        await phase.ready()
        tel.force_flush(10)
asyncio.run(main())
seconds = time.perf_counter() - t0
pkg = sys.modules.get("llm_otel_callbacks")
print(json.dumps({"seconds": seconds, "file": getattr(pkg, "__file__", None)}))
'''


def _sample(mode: str, endpoint: str, site: str | None) -> float:
    env = dict(os.environ)
    if site is not None:  # the pip-installed copy comes first on the path
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, endpoint], capture_output=True,
                         text=True, check=True, timeout=600, cwd=site or REPO, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if mode == "ours" and site is not None and not str(result["file"]).startswith(site):
        raise RuntimeError(f"imported {result['file']}, not the pip-installed copy in {site}")
    return float(result["seconds"])


def _pip_install(target: str) -> str:
    """The package as ``pip install`` leaves it (bytecode written), in ``target``."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", target, str(REPO)],
                   check=True, timeout=600, capture_output=True)
    cached = list(Path(target, "llm_otel_callbacks", "__pycache__").glob("*.pyc"))
    if not cached:
        raise RuntimeError("pip wrote no bytecode: the measurement would compile from source")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--startup-s", type=float, default=60.0,
                        help="a measured replica startup, for the share")
    parser.add_argument("--install", choices=("pip", "source"), default="pip",
                        help="pip: the package as pip installs it (with bytecode, default); "
                             "source: this checkout as it is")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm-otel-startup-") as tmp:
        site = _pip_install(tmp) if args.install == "pip" else None
        _measure(args, site)


def _measure(args: argparse.Namespace, site: str | None) -> None:
    from benchmarks.request_overhead import _Receiver

    receiver = _Receiver()
    times: dict[str, list[float]] = {"plain": [], "ours": []}
    try:
        time.sleep(2)
        for i in range(args.samples):
            for mode in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):
                times[mode].append(_sample(mode, receiver.endpoint, site))
    finally:
        received = receiver.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    extra_ms = (med["ours"] - med["plain"]) * 1e3
    result = {"samples": times, "median_s": med, "extra_ms": extra_ms,
              "share_of_startup": extra_ms / 1e3 / args.startup_s,
              "startup_s": args.startup_s, "spans_received": received,
              "install": args.install}
    print(json.dumps(result, indent=2))
    print(f"add-on: +{extra_ms:.1f} ms (median {med['ours'] * 1e3:.1f} vs plain "
          f"{med['plain'] * 1e3:.1f} ms; {args.samples} samples each, {args.install} install) = "
          f"{100 * result['share_of_startup']:.3f} % of a {args.startup_s:.0f} s startup "
          f"(goal <= 50 ms or <= 0.1 %)")


if __name__ == "__main__":
    main()
