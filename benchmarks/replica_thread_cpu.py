"""Where the replica's CPU goes, per thread, on the observed and the plain request paths.

A diagnostic beside ``request_overhead.py serve``: it deploys the same one-replica, one-engine
app (``same_engine_server.py``), loads the ``observed`` and ``plain`` paths in turn over HTTP
(``--rounds`` blocks of ``--seconds`` each, 4 closed-loop clients, half streamed), and reads
every thread's CPU time of the replica process (psutil) around each block. It prints CPU per
request by thread (native thread id) and, at the end, ``py-spy dump``'s thread names.

A thread whose work is per unit of time (a polling loop) shows more CPU per request on a block
that served fewer requests: compare the requests per block as well as the CPU.

Run: ``python benchmarks/replica_thread_cpu.py [--seconds 15] [--rounds 2]``.
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


def _cpu_by_thread(proc: Any) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in proc.threads()}


async def _load(url: str, pid: int, seconds: float, rounds: int) -> None:
    import httpx
    import psutil

    proc = psutil.Process(pid)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=8)) as client:
        for path in ("observed", "plain"):  # warm-up
            await ro._block(client, url, path, 4, 6, 16)
        for rnd in range(rounds):
            for path in ("observed", "plain"):
                before = _cpu_by_thread(proc)
                block = await ro._block(client, url, path, 4, seconds, 16)
                after = _cpu_by_thread(proc)
                n = max(1, block["done"])
                per = sorted(((after[t] - before.get(t, 0.0)) / n * 1e6, t) for t in after)
                top = ", ".join(f"{tid}: {us:.0f}" for us, tid in reversed(per[-8:]))
                print(f"{path} round {rnd}: {n} requests, {sum(u for u, _ in per):.0f} µs of "
                      f"replica CPU per request; by thread (µs per request) {top}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import psutil

    from llm_otel_callbacks.demo.serve_app import CPU_ENGINE_ENV

    receiver = ro._Receiver()
    try:
        with tempfile.TemporaryDirectory(prefix="threads-") as tmp, \
                ro.same_engine_app(Path(tmp), receiver.endpoint, dict(CPU_ENGINE_ENV)) as (
                    root, _ready_s):
            pid = next(p.pid for p in psutil.process_iter(["cmdline"])
                       if " ".join(p.info["cmdline"] or []).startswith(REPLICA))
            asyncio.run(_load(root + "/v1/chat/completions", pid, args.seconds, args.rounds))
            dump = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "-p",
                                   str(pid)], capture_output=True, text=True, check=False)
            print("threads:\n" + "\n".join(line for line in dump.stdout.splitlines()
                                           if line.startswith("Thread ")))
    finally:
        receiver.stop()


if __name__ == "__main__":
    main()
