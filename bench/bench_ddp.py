"""Data-parallel training steps per second on 1 and 2 MPI ranks.

    python bench/bench_ddp.py [--steps 40] [--batch 512]

Runs itself under ``mpiexec -n R`` for R = 1 and 2: each rank trains the demo's CNN
(``fastnorm.demo.build_cnn``, batch norm converted to SyncBatchNorm) wrapped in
``fastnorm.mpi.DistributedDataParallel`` on its slice of a fixed global batch of
digits-shaped images, one thread per rank (fastnorm, BLAS), so R ranks use R cores. Prints
steps per second (median of three timed repeats after a warm-up) and the speedup of 2 ranks
over 1. Needs the ``[mpi]`` and ``[demo]`` extras.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time


def worker(steps, batch):
    import numpy as np
    import fastnorm as fn
    from fastnorm import optim
    from fastnorm.autograd import cross_entropy
    from fastnorm.demo import build_cnn
    from fastnorm.mpi import MPI, DistributedDataParallel
    fn.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    sl = slice(rank * batch // size, (rank + 1) * batch // size)
    net = DistributedDataParallel(build_cnn(64, True, seed=0), comm)
    opt = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    def step():
        opt.zero_grad()
        cross_entropy(net(x[sl]), y[sl]).backward()
        net.sync_gradients()
        opt.step()
    for _ in range(3):
        step()
    rates = []
    for _ in range(3):
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        comm.Barrier()
        rates.append(steps / (time.perf_counter() - t))
    if rank == 0:
        print(f"RATE {size} {sorted(rates)[1]:.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.steps, a.batch)
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        raise SystemExit("mpiexec not found: pip install '.[mpi]'")
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    rates = {}
    for n in (1, 2):
        out = subprocess.run([mpiexec, "-n", str(n), sys.executable, __file__, "--worker",
                              "--steps", str(a.steps), "--batch", str(a.batch)],
                             capture_output=True, text=True, env=env, check=True).stdout
        rates[n] = float(next(ln for ln in out.splitlines() if ln.startswith("RATE")).split()[2])
    print(f"demo CNN, global batch {a.batch}, float32, one thread per rank")
    print("| ranks | steps/s | speedup |\n|---:|---:|---:|")
    for n, r in rates.items():
        print(f"| {n} | {r:.1f} | {r / rates[1]:.2f} |")


if __name__ == "__main__":
    main()
