"""Cost of a Composite of 10 no-op children against a Composite of one, in one run.

Each child hook call gets its own span, metrics, ctx snapshot and change check, so the cost
should grow linearly: goal <= 10.5x one child. Same provider and metrics on both sides.

Run: ``python benchmarks/composite_overhead.py [--iterations N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

from hook_overhead import setup_provider

from llm_otel_callbacks import Composite
from llm_otel_callbacks.telemetry import reset_telemetry

CHILD = "llm_otel_callbacks.testing.NoopCallback"


def composite(n: int) -> Composite:
    return Composite(
        llm_config=None,
        ctx_kwargs={},
        callbacks=[{"callback_class": CHILD, "name": f"c{i}"} for i in range(n)],
        telemetry={"metrics_backend": "prometheus"},
    )


def _per_call(cb: Composite, iterations: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(iterations):
        cb.run_callback_sync("on_before_node_init")
    return (time.perf_counter() - start) / iterations


def measure(iterations: int, rounds: int) -> dict[str, Any]:
    reset_telemetry()
    provider = setup_provider()
    one, ten = composite(1), composite(10)
    one.run_callback_sync("on_before_node_init")
    ten.run_callback_sync("on_before_node_init")
    t1, t10 = [], []
    for _ in range(rounds):
        t1.append(_per_call(one, iterations))
        t10.append(_per_call(ten, iterations // 4 or 1))
    provider.shutdown()
    b1, b10 = min(t1), min(t10)
    return {
        "one_child_us": round(b1 * 1e6, 2),
        "ten_children_us": round(b10 * 1e6, 2),
        "ratio": round(b10 / b1, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = measure(args.iterations, args.rounds)
    print(json.dumps(result, indent=2))
    print(f"composite of 10 no-op children = {result['ratio']}x one child (goal <= 10.5)")


if __name__ == "__main__":
    main()
