"""Dataset statistics of a ~2 GB float32 array: fastnorm.dask on a local cluster vs NumPy.

The dask side generates the array chunk by chunk on the workers and persists it there (the
driver never holds it), then times ``fastnorm.dask.moments(x, axis=0)`` (per-feature count,
mean and M2 through dask's tree reduction). For reference it also times dask's own
``x.mean(0)`` + ``x.var(0)`` on the same persisted chunks. The NumPy side pulls the same data
into the driver and times ``x.mean(0, dtype=float64)`` + ``x.var(0, dtype=float64)`` in one
process, and ``fastnorm.moments`` in one process. GB/s = bytes of x / median time.

    python bench/bench_dask.py               # 2 GiB, 256 features, 64 MiB chunks
    python bench/bench_dask.py --gib 0.25    # a quick run
"""
import argparse
import os
import statistics
import time

import numpy as np

import dask
import dask.array as da
import distributed

import fastnorm
from fastnorm._info import _cpu_model
import fastnorm.dask as fdask
from fastnorm.moments import moments


def timed(fn, repeat):
    """(median seconds, last result) over ``repeat`` runs."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0, help="size of the float32 array (GiB)")
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--chunk-mib", type=float, default=64.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-threads", type=int, default=1,
                   help="fastnorm kernel threads inside each worker process")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()

    F = a.features
    rows = int(a.gib * 2**30) // (4 * F)
    crows = max(1, int(a.chunk_mib * 2**20) // (4 * F))
    nbytes = rows * F * 4
    gb = nbytes / 1e9
    print(f"# fastnorm {fastnorm.__version__}, numpy {np.__version__}, dask {dask.__version__},"
          f" distributed {distributed.__version__}")
    print(f"# CPU: {_cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()}")
    print(f"# x: ({rows}, {F}) float32 = {nbytes / 2**30:.2f} GiB, chunks ({crows}, {F}) = "
          f"{crows * F * 4 / 2**20:.0f} MiB, {-(-rows // crows)} chunks; statistics over axis 0;"
          f" median of {a.repeat}")
    print(f"# cluster: LocalCluster({a.workers} worker processes x 1 dask thread, "
          f"{a.worker_threads} fastnorm thread(s) each, 127.0.0.1)")
    results = []

    cluster = distributed.LocalCluster(n_workers=a.workers, threads_per_worker=1,
                                       processes=True, host="127.0.0.1",
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        client.run(fastnorm.set_num_threads, a.worker_threads)
        rng = da.random.default_rng(0)
        x = (rng.standard_normal((rows, F), chunks=(crows, F), dtype=np.float32)
             * np.float32(2.0) + np.float32(5.0))
        x = x.persist()
        distributed.wait(x)
        fdask.moments(x[:crows], 0)                       # warm the workers (numba load)
        t, m_dask = timed(lambda: fdask.moments(x, 0), a.repeat)
        results.append(("fastnorm.dask.moments, LocalCluster", t))
        t, _ = timed(lambda: dask.compute(x.mean(0, dtype=np.float64),
                                          x.var(0, dtype=np.float64)), a.repeat)
        results.append(("dask x.mean(0) + x.var(0), LocalCluster", t))
        xn = x.compute()                                  # the same data, for the NumPy side
    finally:
        client.close()
        cluster.close()

    t, (mean_np, var_np) = timed(lambda: (xn.mean(0, dtype=np.float64),
                                          xn.var(0, dtype=np.float64)), a.repeat)
    results.append(("NumPy x.mean(0) + x.var(0), one process", t))
    for threads in sorted({1, os.cpu_count() or 1}):
        fastnorm.set_num_threads(threads)
        moments(xn[:crows], 0)
        t, m_np = timed(lambda: moments(xn, 0), a.repeat)
        results.append((f"fastnorm.moments, one process, {threads} thread(s)", t))

    print()
    print("| statistics of the whole array | median s | GB/s |")
    print("|---|---:|---:|")
    for name, t in results:
        print(f"| {name} | {t:.3f} | {gb / t:.2f} |")
    rel_mean = np.max(np.abs(m_dask.mean - mean_np) / np.abs(mean_np))
    rel_var = np.max(np.abs(m_dask.var() - var_np) / var_np)
    rel_fn = np.max(np.abs(m_dask.m2 - m_np.m2) / m_np.m2)
    print(f"\n# fastnorm.dask vs NumPy: max relative difference mean {rel_mean:.2e}, "
          f"var {rel_var:.2e}; vs in-memory fastnorm.moments, M2 {rel_fn:.2e}")


if __name__ == "__main__":
    main()
