"""Where the observed request path spends its CPU in the replica: py-spy on the real replica.

Deploys the same-engine server of ``request_overhead.py serve`` (one replica, one engine, the
path chosen per request), loads the ``observed`` and ``plain`` paths in turn over HTTP while
``py-spy`` samples the replica process, and attributes each sample taken inside this package's
frames to what runs under the innermost of them: the engine (the wrapped ``chat`` generator,
the same work on both paths), or the observer's own cost (span, GenAI metrics, JSON, ...).

    python benchmarks/profile_request_path.py [--seconds 18] [--rounds 2] [--rate 250] \\
        [--out DIR]

Needs ``py-spy`` (installed with Ray) and the right to read the replica's memory (root, or
``ptrace_scope`` 0). Figures are CPU time per request estimated from samples: coarse (one
sample stands for 1/rate s), so read them as a breakdown, not a measurement of the total;
``request_overhead.py serve`` measures the total.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import request_overhead as ro  # noqa: E402

REPLICA = "ray::ServeReplica:bench:SameEngineServer"
#: What runs under the innermost frame of ours, by file: the engine, or a cost of ours.
CATEGORIES = (
    ("engine (same on both paths)", ("ray/llm/_internal/serve/engines/",)),
    ("OTel SDK metrics (OTLP)", ("metrics/_internal/",)),
    ("Ray metrics", ("ray/util/metrics.py",)),
    ("OTel spans and attributes", ("trace/__init__.py", "attributes/__init__.py")),
    ("OTLP span export", ("trace_exporter/", "requests/")),
    ("JSON (usage chunk)", ("json/",)),
)
_FILE = re.compile(r"\(([^:()]+):\d+\)")


def _file(frame: str) -> str:
    found = _FILE.search(frame)
    return found.group(1) if found else frame


def attribute(folded: Path) -> Counter[str]:
    """Samples under this package's frames, by category (``ours`` = our own lines)."""
    out: Counter[str] = Counter()
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        ours = [i for i, f in enumerate(frames) if "llm_otel_callbacks/" in _file(f)]
        if not ours:
            continue
        if "SpanQueueProcessor._run" in frames[ours[0]] and ".wait (" in frames[-1]:
            continue  # the export worker waiting for spans (py-spy may count it as active)
        last = ours[-1]
        if last + 1 == len(frames):
            out["ours (observer code)"] += int(count)
            continue
        below = _file(frames[last + 1])
        category = next((name for name, keys in CATEGORIES if any(k in below for k in keys)),
                        "other: " + below)
        out[category] += int(count)
    return out


async def _load(url: str, pid: int, seconds: float, rounds: int, rate: int, out: Path
                ) -> dict[str, dict[str, Any]]:
    import httpx
    import psutil

    results: dict[str, dict[str, Any]] = {}
    replica = psutil.Process(pid)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=8)) as client:
        for path in ("observed", "plain"):  # warm-up
            await ro._block(client, url, path, 4, 8, 16)
        for rnd in range(rounds):
            for path in ("observed", "plain"):
                folded = out / f"{path}_{rnd}.txt"
                spy = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid),
                     "-r", str(rate), "-d", str(int(seconds + 2)), "-f", "raw",
                     "-o", str(folded), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await asyncio.sleep(0.5)
                before = replica.cpu_times()
                block = await ro._block(client, url, path, 4, seconds, 16)
                after = replica.cpu_times()
                await asyncio.get_running_loop().run_in_executor(None, spy.wait)
                entry = results.setdefault(path, {"requests": 0, "cpu_s": 0.0,
                                                  "samples": Counter()})
                entry["requests"] += block["done"]
                entry["cpu_s"] += (after.user + after.system) - (before.user + before.system)
                entry["samples"].update(attribute(folded))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=18)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the folded stacks (py-spy raw format) in this folder")
    args = parser.parse_args()

    import psutil

    from llm_otel_callbacks.demo.serve_app import CPU_ENGINE_ENV

    env = dict(CPU_ENGINE_ENV)
    receiver = ro._Receiver()
    try:
        with tempfile.TemporaryDirectory(prefix="profile-") as tmp, \
                ro.same_engine_app(Path(tmp), receiver.endpoint, env) as (root, _ready_s):
            pid = next(p.pid for p in psutil.process_iter(["cmdline"])
                       if " ".join(p.info["cmdline"] or []).startswith(REPLICA))
            folded = args.out or Path(tmp)
            folded.mkdir(parents=True, exist_ok=True)
            results = asyncio.run(_load(root + "/v1/chat/completions", pid, args.seconds,
                                        args.rounds, args.rate, folded))
    finally:
        receiver.stop()

    per_sample_us = 1e6 / args.rate
    for path, entry in results.items():
        n = max(1, entry["requests"])
        print(f"{path}: {entry['requests']} requests, replica CPU "
              f"{entry['cpu_s'] / n * 1e6:.0f} µs per request (psutil)")
        if path != "observed":
            continue
        samples: Counter[str] = entry["samples"]
        cost = sum(v for k, v in samples.items() if not k.startswith("engine"))
        print(f"  observer's own cost ~{cost * per_sample_us / n:.0f} µs per request "
              f"(samples under our frames, engine excluded):")
        for name, count in samples.most_common():
            share = count * per_sample_us / n
            print(f"    {name:32s} {count:5d} samples  ~{share:6.0f} µs/request")


if __name__ == "__main__":
    main()
