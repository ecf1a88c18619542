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

Samples alternate between the two (``--samples`` each). The add-on's cost is the difference of
the medians, in ms, beside the replica startup it is part of (``--startup-s``: a measured
replica start, e.g. the deploy-to-ready time ``request_overhead.py serve`` prints; 60 s for the
tiny CPU model here). Goal: <= 50 ms, or <= 0.1 % of startup.

Run: ``python benchmarks/startup_overhead.py [--samples 5] [--startup-s 60]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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
print(json.dumps({"seconds": time.perf_counter() - t0}))
'''


def _sample(mode: str, endpoint: str) -> float:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, endpoint], capture_output=True,
                         text=True, check=True, timeout=600, cwd=REPO)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--startup-s", type=float, default=60.0,
                        help="a measured replica startup, for the share")
    args = parser.parse_args()
    from benchmarks.request_overhead import _Receiver

    receiver = _Receiver()
    times: dict[str, list[float]] = {"plain": [], "ours": []}
    try:
        time.sleep(2)
        for i in range(args.samples):
            for mode in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):
                times[mode].append(_sample(mode, receiver.endpoint))
    finally:
        received = receiver.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    extra_ms = (med["ours"] - med["plain"]) * 1e3
    result = {"samples": times, "median_s": med, "extra_ms": extra_ms,
              "share_of_startup": extra_ms / 1e3 / args.startup_s,
              "startup_s": args.startup_s, "spans_received": received}
    print(json.dumps(result, indent=2))
    print(f"add-on: +{extra_ms:.1f} ms (median {med['ours'] * 1e3:.1f} vs plain "
          f"{med['plain'] * 1e3:.1f} ms; {args.samples} samples each) = "
          f"{100 * result['share_of_startup']:.3f} % of a {args.startup_s:.0f} s startup "
          f"(goal <= 50 ms or <= 0.1 %)")


if __name__ == "__main__":
    main()
