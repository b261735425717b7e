"""Where the parallel kernels start to pay: serial vs parallel (all cores) time per call.

    python bench/bench_switch.py [--backend numba|cython]

Prints, for growing sizes, the median time of the serial and the parallel kernel of a
forward (layer norm rows, batch norm channels-first rows, channels-last batch norm). The
smallest size at which the parallel kernel wins everywhere is fastnorm._dispatch.PARALLEL_MIN.
"""
import argparse
import os
import time

import numpy as np

from fastnorm import _dispatch


def median_time(f, reps):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backend", default="numba")
    args = p.parse_args()
    _dispatch.resolve(args.backend)
    n_threads = os.cpu_count()
    mod = _dispatch._MODS[args.backend]
    mod.set_num_threads(n_threads)
    print(f"backend={args.backend} threads={n_threads}  (times in microseconds, median)")
    print(f"{'elements':>9} {'kernel':>22} {'serial':>9} {'parallel':>9} {'ratio':>6}")
    for log2 in range(10, 21):
        n = 1 << log2
        cases = {
            "rows_fwd (n/256,256)": ("rows_fwd", lambda x, y: (x.reshape(-1, 256), None, None,
                                     1e-5, False, y.reshape(-1, 256),
                                     np.empty(n // 256, x.dtype), np.empty(n // 256, x.dtype))),
            "rows_scale_shift (.,64)": ("rows_scale_shift", lambda x, y: (
                x.reshape(-1, 64), np.zeros(n // 64), np.ones(n // 64), np.zeros(n // 64),
                y.reshape(-1, 64))),
            "channels_moments": ("channels_moments", lambda x, y: (
                x.reshape(1, -1, 64), np.empty((1, 64)), np.empty((1, 64)))),
        }
        for label, (name, make) in cases.items():
            x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
            a = make(x, np.empty_like(x))
            serial, parallel = _dispatch._TABLE[(name, args.backend)]
            reps = max(20, min(2000, (1 << 22) // n))
            ts = median_time(lambda: serial(*a), reps) * 1e6
            tp = median_time(lambda: parallel(*a), reps) * 1e6
            print(f"{n:>9} {label:>22} {ts:>9.1f} {tp:>9.1f} {ts / tp:>6.2f}")


if __name__ == "__main__":
    main()
