"""Run under ``mpiexec -n 2 python tests/mpi_ddp.py`` (tests/test_mpi.py does).

The demo's CNN (``fastnorm.demo.build_cnn``, batch norm after each convolution and before
the sigmoid) in float64, trained with SGD (momentum) and with Adam: wrapped in
``fastnorm.mpi.DistributedDataParallel`` on two ranks, each with half of every batch,
against the same model trained by this process alone on the whole batch. Every step's loss
(the mean over the ranks' halves) and, after every step, every parameter and running
statistic must agree to 1e-6 (they agree to ~1e-13). Rank 0 prints
``DDP_VERDICT PASS <checks>`` or ``DDP_VERDICT FAIL`` and the failures.
"""
import sys
import traceback

import numpy as np

from fastnorm import optim
from fastnorm.autograd import cross_entropy
from fastnorm.demo import build_cnn
from fastnorm.mpi import MPI, DistributedDataParallel

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
failures, checks = [], [0]
TOL = 1e-6


def check(what, actual, expected):
    checks[0] += 1
    err = float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))))
    if not err <= TOL:
        failures.append(f"rank {rank} {what}: max abs error {err:.3g} > {TOL}")


def run(opt_name, steps=6, batch=16):
    rng = np.random.default_rng(42)                       # the same data on every rank
    data = [(rng.normal(0, 1, (batch, 1, 8, 8)), rng.integers(0, 10, batch))
            for _ in range(steps)]
    one = build_cnn(16, True, seed=1).double()
    ddp = DistributedDataParallel(build_cnn(16, True, seed=1 + rank).double(), comm)  # rank 0's
    make = {"sgd": lambda p: optim.SGD(p, lr=0.1, momentum=0.9),
            "adam": lambda p: optim.Adam(p, lr=1e-2)}[opt_name]
    opt_one, opt_ddp = make(one.parameters()), make(ddp.parameters())
    half = batch // size
    sl = slice(rank * half, (rank + 1) * half)
    for step, (x, y) in enumerate(data):
        opt_one.zero_grad()
        loss_one = cross_entropy(one(x), y)
        loss_one.backward()
        opt_one.step()
        opt_ddp.zero_grad()
        loss = cross_entropy(ddp(x[sl]), y[sl])
        loss.backward()
        ddp.sync_gradients()
        opt_ddp.step()
        check(f"{opt_name} step {step} loss", comm.allreduce(loss.item()) / size,
              loss_one.item())
        mine, ref = ddp.module.state_dict(), one.state_dict()
        assert list(mine) == list(ref)
        for k in ref:
            check(f"{opt_name} step {step} {k}", mine[k], ref[k])


def main():
    if size != 2:
        raise SystemExit("run with mpiexec -n 2")
    run("sgd")
    run("adam")


if __name__ == "__main__":
    code = 0
    try:
        main()
    except Exception:
        failures.append(f"rank {rank} raised:\n" + traceback.format_exc())
    every = comm.gather((checks[0], failures), root=0)
    if rank == 0:
        bad = [f for _, fs in every for f in fs]
        if bad:
            print("DDP_VERDICT FAIL")
            print("\n".join(bad[:40]))
            code = 1
        else:
            print(f"DDP_VERDICT PASS {sum(c for c, _ in every)} checks on {size} ranks")
    code = comm.bcast(code, root=0)
    sys.stdout.flush()
    sys.exit(code)
