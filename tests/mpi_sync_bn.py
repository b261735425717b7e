"""Run under ``mpiexec -n 2 python tests/mpi_sync_bn.py`` (tests/test_mpi.py does).

Every rank builds the same global batch from a shared seed, takes its own (uneven, possibly
empty) slice, runs SyncBatchNorm, and checks its slice of y and grad_x, the global
grad_weight/grad_bias and the running statistics against single-process batch norm on the
concatenated batch (fastnorm.batch_norm and the float64 oracle in fastnorm.reference), and
the backward against central differences of the all-rank loss. Rank 0 prints one line
``SYNC_BN_VERDICT PASS <checks>`` or ``SYNC_BN_VERDICT FAIL`` followed by the failures.
"""
import sys
import traceback
import zlib

import numpy as np

import fastnorm
from fastnorm import reference as ref
from fastnorm.mpi import MPI, SyncBatchNorm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
failures, checks = [], [0]


def check(what, actual, expected, tol):
    """max |actual - expected| <= tol * max(1, max|expected|)."""
    checks[0] += 1
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        failures.append(f"rank {rank} {what}: shape {actual.shape} != {expected.shape}")
        return
    if actual.size == 0:
        return
    err = float(np.max(np.abs(actual - expected)))
    bound = tol * max(1.0, float(np.max(np.abs(expected))))
    if not err <= bound:
        failures.append(f"rank {rank} {what}: max abs error {err:.3g} > {bound:.3g}")


def rank_slices(sizes):
    off = np.concatenate([[0], np.cumsum(sizes)])
    return slice(int(off[rank]), int(off[rank + 1]))


def total_loss(bn, x, g):
    """sum over every rank of sum(g * y)."""
    return comm.allreduce(float(np.sum(g * bn.forward(x))), op=MPI.SUM)


def run_case(name, sizes, tail, axis, dtype, momentum, affine, tol):
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # same data on every rank
    C = tail[0] if axis == 1 else tail[-1]
    N = sum(sizes)
    sl = rank_slices(sizes)
    steps = []
    for _ in range(2):  # two training steps: the running statistics accumulate
        X = (rng.normal(0, 1, (N,) + tail) * rng.uniform(0.5, 3.0, C).reshape(
            [C if i == (axis % (len(tail) + 1)) else 1 for i in range(len(tail) + 1)])
             + 5.0).astype(dtype)
        G = rng.normal(size=X.shape).astype(dtype)
        steps.append((X, G))
    w = rng.uniform(0.5, 2.0, C).astype(np.float64) if affine else None
    b = rng.normal(size=C).astype(np.float64) if affine else None

    bn = SyncBatchNorm(C, eps=1e-5, momentum=momentum, affine=affine, comm=comm, axis=axis,
                       dtype=np.float64)
    if affine:
        bn.weight[...], bn.bias[...] = w, b
    rm, rv = np.zeros(C), np.ones(C)
    rm_o, rv_o = np.zeros(C), np.ones(C)
    nbt, nbt_o = np.zeros((), np.int64), np.zeros((), np.int64)
    for step, (X, G) in enumerate(steps):
        tag = f"{name} step {step}"
        y = bn.forward(X[sl])
        gx = bn.backward(G[sl])
        wx, bx = (None, None) if w is None else (w.astype(dtype), b.astype(dtype))
        ye, mean, rstd = fastnorm.batch_norm(X, rm, rv, wx, bx, training=True,
                                             momentum=momentum, axis=axis, return_stats=True,
                                             num_batches_tracked=nbt)
        gxe, gwe, gbe = fastnorm.batch_norm_backward(G, X, mean, rstd, wx, axis=axis)
        yo, _, _ = ref.batch_norm(X, rm_o, rv_o, w, b, True, momentum, 1e-5, axis, nbt_o)
        gxo, gwo, gbo = ref.batch_norm_backward(G, X, mean, rstd, w, True, axis)
        assert y.dtype == X.dtype and gx.dtype == X.dtype and y.shape == X[sl].shape
        check(f"{tag} y vs fastnorm.batch_norm", y, ye[sl], tol)
        check(f"{tag} y vs oracle", y, yo[sl], tol)
        check(f"{tag} grad_x vs fastnorm", gx, gxe[sl], tol)
        check(f"{tag} grad_x vs oracle", gx, gxo[sl], tol)
        if affine:
            check(f"{tag} grad_weight", bn.grad_weight, gwo, tol)
            check(f"{tag} grad_bias", bn.grad_bias, gbo, tol)
        check(f"{tag} running_mean", bn.running_mean, rm_o, tol)
        check(f"{tag} running_var", bn.running_var, rv_o, tol)
        check(f"{tag} running_var vs fastnorm", bn.running_var, rv, tol)
        checks[0] += 1
        if int(bn.num_batches_tracked) != step + 1:
            failures.append(f"rank {rank} {tag}: num_batches_tracked {bn.num_batches_tracked}")
    # every rank holds the same statistics and parameter gradients, bit for bit
    mine = np.concatenate([bn.running_mean, bn.running_var] +
                          ([bn.grad_weight, bn.grad_bias] if affine else []))
    checks[0] += 1
    if not all(np.array_equal(mine, o) for o in comm.allgather(mine)):
        failures.append(f"rank {rank} {name}: ranks disagree on running stats / grads")
    # eval mode: running statistics, local only; backward treats them as constants
    X, G = steps[-1]
    bn.eval()
    y = bn.forward(X[sl])
    gx = bn.backward(G[sl])
    yo, m_o, r_o = ref.batch_norm(X, rm_o.copy(), rv_o.copy(), w, b, False, momentum, 1e-5,
                                  axis)
    gxo, gwo, gbo = ref.batch_norm_backward(G, X, m_o, r_o, w, False, axis)
    check(f"{name} eval y", y, yo[sl], tol)
    check(f"{name} eval grad_x", gx, gxo[sl], tol)
    if affine:
        check(f"{name} eval grad_weight", bn.grad_weight, gwo, tol)


def central_differences(sizes, tail, axis):
    """d/dh of the all-rank loss along random directions in x and in weight/bias (float64)."""
    rng = np.random.default_rng(11)
    C = tail[0] if axis == 1 else tail[-1]
    X = rng.normal(1.0, 2.0, (sum(sizes),) + tail)
    G, V = rng.normal(size=X.shape), rng.normal(size=X.shape)
    vw, vb = rng.normal(size=C), rng.normal(size=C)
    sl = rank_slices(sizes)
    bn = SyncBatchNorm(C, track_running_stats=False, comm=comm, axis=axis, dtype=np.float64)
    bn.weight[...] = rng.uniform(0.5, 2.0, C)
    bn.bias[...] = rng.normal(size=C)
    bn.forward(X[sl])
    gx = bn.backward(G[sl])
    gw, gb = bn.grad_weight.copy(), bn.grad_bias.copy()
    h = 1e-6
    analytic = comm.allreduce(float(np.sum(gx * V[sl])), op=MPI.SUM)
    numeric = (total_loss(bn, X[sl] + h * V[sl], G[sl])
               - total_loss(bn, X[sl] - h * V[sl], G[sl])) / (2 * h)
    check("central differences, input", analytic, numeric, 1e-7)
    w0, b0 = bn.weight.copy(), bn.bias.copy()
    bn.weight[...], bn.bias[...] = w0 + h * vw, b0 + h * vb
    lp = total_loss(bn, X[sl], G[sl])
    bn.weight[...], bn.bias[...] = w0 - h * vw, b0 - h * vb
    lm = total_loss(bn, X[sl], G[sl])
    check("central differences, weight and bias", gw @ vw + gb @ vb, (lp - lm) / (2 * h), 1e-7)


def tape_case(name, sizes, tail, axis, steps=3):
    """fastnorm.nn.SyncBatchNorm on the tape against nn.BatchNorm on the whole batch: this
    rank's slice of y and of the input gradient, the parameter gradients summed over the
    ranks (each rank's share, as torch's), and the running statistics, step by step."""
    from fastnorm import Tensor, nn
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    C = tail[0] if axis == 1 else tail[-1]
    N = sum(sizes)
    sl = rank_slices(sizes)
    sync = nn.SyncBatchNorm(C, momentum=0.2, process_group=comm, axis=axis, dtype=np.float64)
    one = nn.BatchNorm1d(C, momentum=0.2, axis=axis, dtype=np.float64)
    one._check_input_dim = lambda x: None          # any rank, as SyncBatchNorm
    for m in (sync, one):
        m.weight.data[...] = np.linspace(0.5, 2.0, C)
        m.bias.data[...] = np.linspace(-1.0, 1.0, C)
    for step in range(steps):
        X = rng.normal(3.0, 2.0, (N,) + tail)
        G = rng.normal(size=X.shape)
        for m in (sync, one):
            m.zero_grad()
        t = Tensor(X[sl], requires_grad=True)
        y = sync(t)
        (y * Tensor(G[sl])).sum().backward()
        T = Tensor(X, requires_grad=True)
        ye = one(T)
        (ye * Tensor(G)).sum().backward()
        tag = f"tape {name} step {step}"
        check(f"{tag} y", y.data, ye.data[sl], 1e-12)
        check(f"{tag} grad_x", t.grad, T.grad[sl], 1e-12)
        for p in ("weight", "bias"):
            total = comm.allreduce(getattr(sync, p).grad, op=MPI.SUM)
            check(f"{tag} grad {p} summed over ranks", total, getattr(one, p).grad, 1e-12)
        for b in ("running_mean", "running_var"):
            check(f"{tag} {b}", getattr(sync, b), getattr(one, b), 1e-12)


def main():
    if size != 2:
        raise SystemExit("run with mpiexec -n 2")
    run_case("nchw uneven", [5, 3], (3, 4, 5), 1, np.float64, 0.1, True, 1e-12)
    run_case("nchw empty rank 1", [4, 0], (3, 4, 5), 1, np.float64, 0.1, True, 1e-12)
    run_case("nc empty rank 0", [0, 6], (4,), 1, np.float64, None, True, 1e-12)
    run_case("channels-last", [2, 7], (5, 6, 4), -1, np.float64, 0.3, True, 1e-12)
    run_case("no affine", [3, 3], (2, 9), 1, np.float64, 0.1, False, 1e-12)
    run_case("float32 uneven", [6, 2], (3, 8), 1, np.float32, 0.1, True, 2e-5)
    central_differences([3, 5], (2, 6), 1)
    central_differences([0, 7], (3, 4), -1)
    tape_case("tape nchw", [3, 5], (3, 4, 2), 1)
    tape_case("tape channels-last, empty rank 0", [0, 6], (2, 4), -1)


if __name__ == "__main__":
    code = 0
    try:
        main()
    except Exception:
        failures.append(f"rank {rank} raised:\n" + traceback.format_exc())
    every = comm.gather((checks[0], failures), root=0)
    if rank == 0:
        n = sum(c for c, _ in every)
        bad = [f for _, fs in every for f in fs]
        if bad:
            print("SYNC_BN_VERDICT FAIL")
            print("\n".join(bad))
            code = 1
        else:
            print(f"SYNC_BN_VERDICT PASS {n} checks on {size} ranks")
    code = comm.bcast(code, root=0)
    sys.stdout.flush()
    sys.exit(code)
