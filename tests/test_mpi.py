"""SyncBatchNorm: in-process on MPI.COMM_SELF, and across 2 ranks under mpiexec."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "mpi_sync_bn.py")


def _mpiexec():
    """The mpiexec next to this interpreter (the mpich wheel's), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


def _two_ranks(script, verdict, timeout):
    """Run tests/<script> under ``mpiexec -n 2``; fail unless rank 0 prints ``verdict``."""
    pytest.importorskip("mpi4py", reason="the [mpi] extra (mpi4py, mpich) is not installed")
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    # the children import the same fastnorm as this process (installed, or the source tree)
    where = os.path.dirname(os.path.dirname(os.path.abspath(fastnorm.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [where] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable,
                           os.path.join(ROOT, "tests", script)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert verdict in proc.stdout, out[-4000:]
    assert proc.returncode == 0, out[-4000:]


def test_two_ranks_equal_single_process_batch_norm():
    _two_ranks(os.path.basename(SCRIPT), "SYNC_BN_VERDICT PASS", 120)


def test_data_parallel_two_ranks_equal_one_process_training():
    """tests/mpi_ddp.py under mpiexec -n 2: DistributedDataParallel of the demo's CNN (batch
    norm converted to SyncBatchNorm) against one process on the whole batch, SGD and Adam."""
    _two_ranks("mpi_ddp.py", "DDP_VERDICT PASS", 300)


def test_data_parallel_checks_and_single_rank(mpi):
    from fastnorm import nn
    with pytest.raises(TypeError, match="module"):
        mpi.DistributedDataParallel("net", mpi.MPI.COMM_SELF)
    with pytest.raises(TypeError, match="comm"):
        mpi.DistributedDataParallel(nn.Linear(2, 2), comm="world")
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ddp = mpi.DistributedDataParallel(net, mpi.MPI.COMM_SELF)
    assert type(ddp.module[1]) is nn.SyncBatchNorm and ddp.module[0] is net[0]
    assert [k[len("module."):] for k in ddp.state_dict()] == list(net.state_dict())
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    (ddp(x) * ddp(x)).sum().backward()
    before = {k: p.grad.copy() for k, p in ddp.module.named_parameters()}
    ddp.sync_gradients()                      # one rank: the average is the gradient itself
    for k, p in ddp.module.named_parameters():
        np.testing.assert_array_equal(p.grad, before[k])
        assert p.grad.dtype == p.data.dtype


@pytest.fixture
def mpi():
    pytest.importorskip("mpi4py", reason="the [mpi] extra (mpi4py, mpich) is not installed")
    import fastnorm.mpi
    return fastnorm.mpi


@pytest.mark.parametrize("axis,shape", [(1, (6, 3, 5, 4)), (-1, (6, 5, 3)), (1, (7, 3))])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_one_rank_is_batch_norm_bit_for_bit(mpi, axis, shape, dtype):
    rng = np.random.default_rng(0)
    x = (rng.normal(3, 2, shape)).astype(dtype)
    g = rng.normal(size=shape).astype(dtype)
    C = shape[axis]
    bn = mpi.SyncBatchNorm(C, momentum=0.2, comm=mpi.MPI.COMM_SELF, axis=axis, dtype=dtype)
    bn.weight[...] = rng.uniform(0.5, 2, C)
    bn.bias[...] = rng.normal(size=C)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y = bn.forward(x)
    gx = bn.backward(g)
    ye, mean, rstd = fastnorm.batch_norm(x, rm, rv, bn.weight, bn.bias, training=True,
                                         momentum=0.2, axis=axis, return_stats=True)
    gxe, gwe, gbe = fastnorm.batch_norm_backward(g, x, mean, rstd, bn.weight, axis=axis)
    # one rank: the same kernels on the same view, so the same bits
    np.testing.assert_array_equal(y, ye)
    np.testing.assert_array_equal(bn.running_mean, rm)
    np.testing.assert_array_equal(bn.running_var, rv)
    tol = 1e-13 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(gx, gxe, rtol=tol, atol=tol)
    np.testing.assert_allclose(bn.grad_weight, gwe, rtol=tol, atol=tol)
    np.testing.assert_allclose(bn.grad_bias, gbe, rtol=tol, atol=tol)
    # eval: running statistics, constants in the backward
    bn.eval()
    ye = fastnorm.batch_norm(x, rm, rv, bn.weight, bn.bias, axis=axis)
    np.testing.assert_allclose(bn.forward(x), ye, rtol=tol, atol=tol)
    assert int(bn.num_batches_tracked) == 1
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                    "num_batches_tracked"}


def test_bad_input(mpi):
    comm = mpi.MPI.COMM_SELF
    with pytest.raises(ValueError, match="num_features"):
        mpi.SyncBatchNorm(0, comm=comm)
    with pytest.raises(TypeError, match="comm"):
        mpi.SyncBatchNorm(3, comm="world")
    with pytest.raises(ValueError, match="eps"):
        mpi.SyncBatchNorm(3, eps=0, comm=comm)
    with pytest.raises(TypeError, match="dtype"):
        mpi.SyncBatchNorm(3, comm=comm, dtype=np.int32)
    bn = mpi.SyncBatchNorm(3, comm=comm)
    with pytest.raises(RuntimeError, match="forward"):
        bn.backward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="input"):
        bn.forward(np.ones((4, 5)))
    with pytest.raises(ValueError, match="more than 1 value"):
        bn.forward(np.ones((1, 3)))
    with pytest.raises(TypeError, match="input"):
        bn.forward("x")
    bn.forward(np.random.default_rng(0).normal(size=(4, 3)))
    with pytest.raises(ValueError, match="grad_out"):
        bn.backward(np.ones((5, 3)))


# ------------------------------------------------- nn.SyncBatchNorm, the layer on the tape

def _bn_pair(nn, mpi, C, axis):
    """A BatchNorm2d and a SyncBatchNorm (COMM_SELF) with the same random state."""
    rng = np.random.default_rng(3)
    bn = nn.BatchNorm2d(C, momentum=0.3, axis=axis, dtype=np.float64)
    sbn = nn.SyncBatchNorm(C, momentum=0.3, process_group=mpi.MPI.COMM_SELF, axis=axis,
                           dtype=np.float64)
    state = {"weight": rng.uniform(0.5, 2, C), "bias": rng.normal(size=C),
             "running_mean": rng.normal(size=C), "running_var": rng.uniform(0.5, 2, C),
             "num_batches_tracked": np.array(4, np.int64)}
    bn.load_state_dict(state)
    sbn.load_state_dict(state)
    return bn, sbn


@pytest.mark.parametrize("axis", [1, -1])
def test_sync_layer_on_one_rank_is_batch_norm_on_the_tape(mpi, axis):
    from fastnorm import Tensor, nn
    C = 3
    bn, sbn = _bn_pair(nn, mpi, C, axis)
    shape = (4, C, 5, 6) if axis == 1 else (4, 5, 6, C)
    x = np.random.default_rng(4).normal(7, 2, shape)
    g = np.random.default_rng(5).normal(size=shape)
    for m in (bn, sbn):
        t = Tensor(x, requires_grad=True)
        (m(t) * Tensor(g)).sum().backward()
        m.grad_x = t.grad
    np.testing.assert_array_equal(sbn.grad_x, bn.grad_x)
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(getattr(sbn, name).grad, getattr(bn, name).grad)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(sbn.state_dict()[k], v, err_msg=k)
    assert set(sbn.state_dict()) == {"weight", "bias", "running_mean", "running_var",
                                     "num_batches_tracked"}
    bn.eval(), sbn.eval()
    np.testing.assert_array_equal(sbn(x).data, bn(x).data)


def test_convert_sync_batchnorm_shares_state_and_keeps_keys(mpi):
    from fastnorm import nn
    inner = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
    net = nn.Sequential(inner, nn.BatchNorm1d(3, affine=False, momentum=None), nn.Linear(3, 2))
    net.eval()
    keys = list(net.state_dict())
    bn1 = inner[1]
    out = nn.convert_sync_batchnorm(net, process_group=mpi.MPI.COMM_SELF)
    assert out is net
    assert type(net[0][1]) is nn.SyncBatchNorm and type(net[1]) is nn.SyncBatchNorm
    assert type(net[0][0]) is nn.Linear and type(net[2]) is nn.Linear
    assert net[0][1].weight is bn1.weight and net[0][1].running_mean is bn1.running_mean
    assert net[1].momentum is None and net[1].weight is None and not net[1].training
    assert list(net.state_dict()) == keys
    single = nn.convert_sync_batchnorm(nn.BatchNorm2d(5), mpi.MPI.COMM_SELF)
    assert type(single) is nn.SyncBatchNorm and single.process_group is mpi.MPI.COMM_SELF
    assert nn.SyncBatchNorm.convert_sync_batchnorm(single) is single


def test_sync_layer_checks_its_input(mpi):
    from fastnorm import nn
    sbn = nn.SyncBatchNorm(3, process_group=mpi.MPI.COMM_SELF)
    with pytest.raises(ValueError, match="at least 2D"):
        sbn(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="num_features"):
        sbn(np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match="more than 1 value"):
        sbn(np.ones((1, 3), np.float32))
