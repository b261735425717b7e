"""Compute cost of each Cython kernel on each instruction-set body this CPU runs, and of the
Numba kernel, on data that stays in cache (so the arithmetic is timed, not memory).

    python bench/bench_simd.py [--rounds 21] [--kernels rows_moments,channels_dot]

The Cython extension holds one body per instruction set (AVX-512, AVX2+FMA, baseline; see
fastnorm_cy/_simd.h); ``fastnorm_cy.simd_select`` switches between them. Each round times 5
calls of every implementation back to back, one thread; the table gives the median us per
call and the median of the per-round ratios to Numba. Inputs: 2x64x56x56 float32 (800 KB
per array), viewed as each kernel's geometry.
"""
import argparse
import os
import statistics
import time

import numpy as np

import fastnorm as fn
from fastnorm import _dispatch

try:
    import fastnorm_cy as cy
except ImportError as e:
    raise SystemExit(f"bench_simd.py times the Cython kernels: {e}") from None


def cases():
    """{kernel: callable(kernel function)} on cache-resident float32 data."""
    rng = np.random.default_rng(0)
    P, Q, C = 2, 56 * 56, 64
    x3 = (3 + rng.standard_normal((1, P * Q, C))).astype(np.float32)
    y3 = np.empty_like(x3)
    per_c = [np.full((1, C), v) for v in (3.0, 1.0, 0.5)]
    R, M = P * C, Q
    x, y = x3.reshape(R, M), y3.reshape(R, M)
    per_r = [np.full(R, v) for v in (3.0, 1.0, 0.5)]
    xl = np.ascontiguousarray(x3.ravel()[:512 * 768].reshape(512, 768))
    yl, wl = np.empty_like(xl), np.ones(768, np.float32)
    ml, rl = np.empty(512, np.float32), np.ones(512, np.float32)
    s, t = np.empty(R), np.empty(R)
    sc, tc = np.empty((1, C)), np.empty((1, C))
    return {
        "rows_moments": lambda k: k(x, s, t),
        "rows_scale_shift": lambda k: k(x, *per_r, y),
        "rows_dot": lambda k: k(x, x, per_r[0], s, t),
        "rows_bwd_apply": lambda k: k(x, x, *per_r, per_r[2], y),
        "rows_fwd_grouped": lambda k: k(x.reshape(P, C, M), None, None, 1e-5,
                                        y.reshape(P, C, M), np.empty(P, np.float32),
                                        np.empty(P, np.float32)),
        "rows_fwd": lambda k: k(xl, wl, wl, 1e-5, False, yl, ml, rl),
        "rows_bwd": lambda k: k(xl, xl, ml, rl, wl, False, yl, None, None),
        "channels_moments": lambda k: k(x3, sc, tc),
        "channels_scale_shift": lambda k: k(x3, *per_c, y3),
        "channels_dot": lambda k: k(x3, x3, per_c[0], sc, tc),
        "channels_bwd_apply": lambda k: k(x3, x3, *per_c, per_c[2], y3),
        "channels_fwd_grouped": lambda k: k(x3.reshape(P, Q, C), None, None, 1e-5,
                                            y3.reshape(P, Q, C), np.empty((P, 32), np.float32),
                                            np.empty((P, 32), np.float32)),
    }


def bodies():
    """The instruction-set bodies this CPU runs, best first (["best"] without them)."""
    names = {"v4": "x86-64-v4", "v3": "x86-64-v3", "v1": "default"}
    out = [lv for lv, name in names.items() if cy.simd_select(lv).startswith(name)]
    _restore()
    return out or ["best"]


def _restore():
    """Back to the body chosen at import (FASTNORM_SIMD, else the best)."""
    cy.simd_select(os.environ.get("FASTNORM_SIMD") or None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--kernels", default=None, help="comma-separated (default: all)")
    args = ap.parse_args(argv)
    table = cases()
    names = args.kernels.split(",") if args.kernels else list(table)
    unknown = set(names) - set(table)
    if unknown:
        raise SystemExit(f"--kernels: unknown {sorted(unknown)}; known: {sorted(table)}")
    fn.set_num_threads(1)
    backends = [b for b in ("numba",) if b in fn.available_backends()]
    levels = bodies()
    print(f"# {cy.info()['compiler']}; one thread; us per call (ratio to numba)")
    print("| kernel | " + " | ".join(f"cython {lv}" for lv in levels)
          + "".join(f" | {b}" for b in backends) + " |")
    print("|---|" + "---:|" * (len(levels) + len(backends)))
    try:
        for name in names:
            impls = {f"cython {lv}": (lv, _dispatch.kernel(name, "cython", 1)) for lv in levels}
            for b in backends:
                impls[b] = (None, _dispatch.kernel(name, b, 1))
            ts = {k: [] for k in impls}
            for _ in range(args.rounds):
                for label, (lv, k) in impls.items():
                    if lv is not None:
                        cy.simd_select(None if lv == "best" else lv)
                    table[name](k)  # untimed: warm-up, and the caches in this call's state
                    t0 = time.perf_counter()
                    for _ in range(5):
                        table[name](k)
                    ts[label].append((time.perf_counter() - t0) / 5)
            base = ts.get("numba")
            cells = []
            for label, v in ts.items():
                cell = f"{statistics.median(v) * 1e6:.1f}"
                if base is not None and label != "numba":
                    cell += f" ({statistics.median(a / b for a, b in zip(v, base)):.2f})"
                cells.append(cell)
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    finally:
        _restore()


if __name__ == "__main__":
    main()
