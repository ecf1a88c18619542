"""Each path's marginal own CPU per request on the replica's loop, from ``replica_thread_cpu.py``
output: a least-squares fit that separates per-request from per-block work.

A block's step CPU per request moves with how many requests the block served (on this 2-core
machine the engine's busy threads share the cores), so the plain averages mix per-request work
with work per unit of time. Each block's total step CPU is fitted as ``requests x c_path + K``
(blocks last the same ``--seconds``, so a per-time term is one constant ``K`` per block); the
difference ``c_path - c_plain`` is the path's marginal CPU per request, with a 95 % bootstrap CI
over blocks.

Run: ``python benchmarks/fit_step_cpu.py output.txt [more.txt ...]``.
"""

from __future__ import annotations

import re
import sys

import numpy as np

_ROW = re.compile(r"(\w+) round (\d+): request path's own steps on the loop (\d+) µs per request "
                  r"\((\d+) requests\)")


def fit(path: str, resamples: int = 2000) -> dict[str, tuple[float, float, float]]:
    """Per compared path: (marginal µs per request vs plain, CI low, CI high)."""
    with open(path, encoding="utf-8") as lines:
        rows = [(m[1], int(m[3]), int(m[4])) for m in map(_ROW.match, lines) if m]
    paths = sorted({p for p, _, _ in rows})
    x = np.array([[n if p == q else 0 for q in paths] + [1.0] for p, _, n in rows], float)
    y = np.array([us * n for _, us, n in rows], float)
    beta = np.linalg.lstsq(x, y, rcond=None)[0]
    rng = np.random.default_rng(0)
    boot = np.array([np.linalg.lstsq(x[i], y[i], rcond=None)[0]
                     for i in (rng.integers(0, len(y), len(y)) for _ in range(resamples))])
    ref = paths.index("plain")
    out = {}
    for i, p in enumerate(paths):
        if i != ref:
            diff = boot[:, i] - boot[:, ref]
            out[p] = (float(beta[i] - beta[ref]), float(np.percentile(diff, 2.5)),
                      float(np.percentile(diff, 97.5)))
    return out


def main() -> None:
    for path in sys.argv[1:]:
        for name, (est, low, high) in fit(path).items():
            print(f"{path}: {name} vs plain: {est:+.0f} µs per request (CI {low:+.0f} to "
                  f"{high:+.0f})")


if __name__ == "__main__":
    main()
