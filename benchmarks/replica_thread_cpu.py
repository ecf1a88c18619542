"""Where the replica's CPU goes, per thread, on the observed and the plain request paths.

A diagnostic beside ``request_overhead.py serve``: it deploys the same one-replica, one-engine
app (``same_engine_server.py``), loads the ``observed`` and ``plain`` paths in turn over HTTP
(``--rounds`` blocks of ``--seconds`` each, 4 closed-loop clients, half streamed), and reads
every thread's CPU time of the replica process (psutil) around each block. It prints CPU per
request by thread (native thread id) and, at the end, ``py-spy dump``'s thread names.

The replica runs with ``BENCH_STEP_CPU=1`` (see ``same_engine_server.py``): after each block
the run also prints each path's own CPU per request on the event loop, the thread CPU of the
synchronous steps of its engine calls (observer, vLLM's serving layer, engine client), read from
the replica. That is the observer's direct cost in the replica, apart from everything that runs
around the request.

A thread whose work is per unit of time (a polling loop) shows more CPU per request on a block
that served fewer requests: compare the requests per block as well as the CPU.

At the end it prints each observed path's extra replica CPU per request item by item, each item
read directly rather than from the difference of two noisy totals: the observer's own loop CPU
(the outer minus the inner meter of the same requests, less the plain path's metering layer),
the engine's extra tail steps (the usage chunk), the package's own threads (span export, metric
pipe) per observed request, and the extra garbage collection. Then it runs the replica's
observers in a tight loop on the replica's own event loop (``SameEngineServer.micro``), with
the metering layer alone as identical code on both sides: the slow-down the load puts on code.

Run: ``python benchmarks/replica_thread_cpu.py [--seconds 15] [--rounds 2] [--paths observed plain]
[--env OTEL_TRACES_SAMPLER=always_off]``.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import request_overhead as ro  # noqa: E402

REPLICA = "ray::ServeReplica:bench:SameEngineServer"


def _step_cpu() -> dict[str, Any]:
    """Per path: (requests, thread CPU ns of their engine calls' steps), and the replica's
    garbage collections ("gc": count and CPU ns per generation), from the replica."""
    result: dict[str, Any] = ro.replica_handle().step_cpu.remote().result(timeout_s=60)
    return result


def _cpu_by_thread(proc: Any) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


async def _load(url: str, pid: int, seconds: float, rounds: int, paths: list[str]) -> None:
    import httpx
    import psutil

    proc = psutil.Process(pid)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=8)) as client:
        for path in paths:  # warm-up
            await ro._block(client, url, path, 4, 6, 16)
        steps: dict[str, list[int]] = {path: [0, 0] for path in paths}
        gc_total: dict[str, int] = dict.fromkeys(paths, 0)  # GC CPU ns during its blocks
        split: dict[str, list[tuple[int, int, int, int]]] = {p: [] for p in paths}
        threads_s = 0.0  # the package's own threads' CPU seconds over all blocks
        for rnd in range(rounds):
            for path in (paths if rnd % 2 == 0 else paths[::-1]):
                steps_before = await asyncio.to_thread(_step_cpu)
                before = _cpu_by_thread(proc)
                block = await ro._block(client, url, path, 4, seconds, 16)
                after = _cpu_by_thread(proc)
                steps_after = await asyncio.to_thread(_step_cpu)
                calls = steps_after[path][0] - steps_before[path][0]
                step_ns = steps_after[path][1] - steps_before[path][1]
                steps[path][0] += calls
                steps[path][1] += step_ns
                gcs = [a - b for a, b in zip(steps_after["gc"]["count"],
                                             steps_before["gc"]["count"], strict=True)]
                gc_ns = [a - b for a, b in zip(steps_after["gc"]["cpu_ns"],
                                               steps_before["gc"]["cpu_ns"], strict=True)]
                gc_total[path] += sum(gc_ns)
                inner = [a - b for a, b in zip(steps_after["inner"][path],
                                               steps_before["inner"][path], strict=True)]
                split[path].append((calls, step_ns, inner[1], inner[2]))
                threads = {name: s - steps_before["threads"].get(name, 0.0)
                           for name, s in steps_after["threads"].items()}  # CPU seconds
                own = sum(threads.values())
                threads_s += own
                per_call = max(1, calls) * 1e3
                print(f"{path} round {rnd}: package threads (µs per request) "
                      + ", ".join(f"{n}: {s * 1e9 / per_call:.1f}" for n, s in threads.items()),
                      flush=True)
                print(f"{path} round {rnd}: outer minus inner meter "
                      f"{(step_ns - inner[1]) / per_call:.1f} µs per request, engine's tail "
                      f"steps {inner[2] / per_call:.1f} µs, package threads "
                      f"{own * 1e9 / per_call:.1f} µs", flush=True)
                print(f"{path} round {rnd}: request path's own steps on the loop "
                      f"{step_ns / max(1, calls) / 1e3:.0f} µs per request ({calls} requests); "
                      f"GC: {gcs} collections (gen 0/1/2), "
                      f"{'/'.join(f'{ns / 1e6:.1f}' for ns in gc_ns)} ms, "
                      f"{sum(gc_ns) / max(1, calls) / 1e3:.0f} µs per request", flush=True)
                n = max(1, block["done"])
                per = sorted(((after[t] - before.get(t, 0.0)) / n * 1e6, t) for t in after)
                top = ", ".join(f"{tid}: {us:.0f}" for us, tid in reversed(per[-8:]))
                print(f"{path} round {rnd}: {n} requests, {sum(u for u, _ in per):.0f} µs of "
                      f"replica CPU per request; by thread (µs per request) {top}", flush=True)
        ref = paths[-1]
        ref_us = steps[ref][1] / max(1, steps[ref][0]) / 1e3
        for path in paths:
            us = steps[path][1] / max(1, steps[path][0]) / 1e3
            print(f"{path}: {us:.1f} µs per request of the request path's own steps on the loop "
                  f"({steps[path][0]} requests), {us - ref_us:+.1f} µs vs {ref}; GC "
                  f"{gc_total[path] / max(1, steps[path][0]) / 1e3:.0f} µs per request",
                  flush=True)
        _print_split(split, gc_total, threads_s, ref)
    micro = await asyncio.to_thread(
        lambda: ro.replica_handle().micro.remote().result(timeout_s=600))
    for path, row in micro.items():
        print(f"in-replica tight loop, {path}: {row['loop_us']:.1f} µs of loop CPU per request, "
              f"package threads {row['threads_us']:.1f} µs", flush=True)


def _per_request(blocks: list[tuple[int, int, int, int]], col: int) -> float:
    """Pooled µs per request of one column over blocks (1: outer, 2: inner, 3: tail; 4: outer
    minus inner)."""
    calls = sum(b[0] for b in blocks)
    total = sum(b[1] - b[2] for b in blocks) if col == 4 else sum(b[col] for b in blocks)
    return total / max(1, calls) / 1e3


def _print_split(split: dict[str, list[tuple[int, int, int, int]]], gc_total: dict[str, int],
                 threads_s: float, ref: str) -> None:
    """The observed paths' extra replica CPU per request, item by item, from the same requests:
    the observer's own loop CPU (outer minus inner meter, less the plain path's metering
    layer), the engine's extra tail steps, the package's threads and the extra GC."""
    import numpy as np

    rng = np.random.default_rng(0)
    observed = [p for p in split if p != ref]
    observed_calls = sum(b[0] for p in observed for b in split[p])
    threads_us = threads_s * 1e6 / max(1, observed_calls)
    gc_ref = gc_total[ref] / max(1, sum(b[0] for b in split[ref])) / 1e3
    def resampled(blocks: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        return [blocks[i] for i in rng.integers(0, len(blocks), len(blocks))]

    for path in observed:
        items = {}
        for name, col in (("own loop CPU", 4), ("engine tail", 3)):
            est = _per_request(split[path], col) - _per_request(split[ref], col)
            boot = [_per_request(resampled(split[path]), col)
                    - _per_request(resampled(split[ref]), col) for _ in range(2000)]
            items[name] = est
            print(f"{path}: {name} {est:+.1f} µs per request vs {ref} (CI "
                  f"{np.percentile(boot, 2.5):+.1f} to {np.percentile(boot, 97.5):+.1f})",
                  flush=True)
        gc_extra = gc_total[path] / max(1, sum(b[0] for b in split[path])) / 1e3 - gc_ref
        total = items["own loop CPU"] + items["engine tail"] + threads_us + gc_extra
        print(f"{path}: extra replica CPU per request, item by item: own loop "
              f"{items['own loop CPU']:+.1f} + engine tail {items['engine tail']:+.1f} + package "
              f"threads {threads_us:+.1f} + GC {gc_extra:+.1f} = {total:+.1f} µs", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paths", nargs="+", default=["observed", "plain"],
                        help="request paths to load; the last is the reference")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra replica environment, e.g. OTEL_TRACES_SAMPLER=always_off")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)

    import psutil

    from llm_otel_callbacks.demo.serve_app import CPU_ENGINE_ENV

    receiver = ro._Receiver()
    try:
        with tempfile.TemporaryDirectory(prefix="threads-") as tmp, \
                ro.same_engine_app(Path(tmp), receiver.endpoint,
                                   {**CPU_ENGINE_ENV, **env, "BENCH_STEP_CPU": "1"}) as (
                    root, _ready_s):
            pid = next(p.pid for p in psutil.process_iter(["cmdline"])
                       if " ".join(p.info["cmdline"] or []).startswith(REPLICA))
            asyncio.run(_load(root + "/v1/chat/completions", pid, args.seconds, args.rounds,
                              args.paths))
            dump = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "-p",
                                   str(pid)], capture_output=True, text=True, check=False)
            print("threads:\n" + "\n".join(line for line in dump.stdout.splitlines()
                                           if line.startswith("Thread ")))
    finally:
        receiver.stop()


if __name__ == "__main__":
    main()
