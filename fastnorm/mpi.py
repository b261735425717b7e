"""Synchronized batch normalization over MPI: one batch split across ranks, normalized as if
it were one batch on one process.

It is batch norm's body (``fastnorm._norms``) with a :class:`Collective` between its phases,
as torch's SyncBatchNorm splits ``batch_norm_stats`` / ``batch_norm_gather_stats`` /
``batch_norm_elemt``. Forward (training): every rank computes its per-channel
``(count, mean, M2)`` with the fast kernels; the triples are all-gathered and merged in rank
order in the fixed tree of :meth:`Moments.merge_all`, so every rank holds the same bits of
the global statistics. Backward: the per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``
are summed over the ranks, and each rank applies ``dx = c1*dy + c2*(x - mean) + c3`` to its
own slice with the global count. Sums are all-reduced as an all-gather followed by a sum in
rank order (2·C + 1 numbers per rank): the result is the same on every rank and does not
depend on the MPI library's reduction algorithm.

:func:`sync_batch_norm` and :func:`sync_batch_norm_backward` are the functional forms
(``fastnorm.Tensor`` arguments go on the tape); ``fastnorm.nn.SyncBatchNorm`` is the layer;
:class:`SyncBatchNorm` here is the array-level object with explicit ``forward``/``backward``.

Needs the ``[mpi]`` extra: ``pip install "fastnorm[mpi]"`` (mpi4py and the MPICH wheel,
which also brings ``mpiexec``). Run with ``mpiexec -n 4 python train.py``.
"""
import numbers

import numpy as np

try:
    from mpi4py import MPI
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastnorm.mpi needs mpi4py: pip install 'fastnorm[mpi]'") from e

from . import _checks, nn
from ._sync import Collective, comm_or_world, sync_batch_norm, sync_batch_norm_backward

__all__ = ["MPI", "SyncBatchNorm", "DistributedDataParallel", "Collective", "sync_batch_norm",
           "sync_batch_norm_backward"]


class SyncBatchNorm:
    """Batch normalization whose statistics span every rank of an MPI communicator.

    Arguments and running-statistics semantics follow ``torch.nn.SyncBatchNorm``: the batch
    variance (biased) normalizes, the unbiased variance over the GLOBAL count goes into
    ``running_var``, ``momentum=None`` is a cumulative average. ``forward`` and ``backward``
    are collective: every rank of ``comm`` calls them in the same order; a rank with no
    samples passes an array with 0 along the batch axis. Batch sizes may differ by rank.

    Parameters
    ----------
    num_features : int
        C, the size of the channel axis.
    eps : float
    momentum : float or None
    affine : bool
        Learnable ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool
        Keep ``running_mean``/``running_var``/``num_batches_tracked``. Without them the batch
        statistics are used in eval mode too (as torch).
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    axis : int, keyword-only
        Channel axis of the inputs: 1 (NC, NCL, NCHW, ...) or -1 (channels-last).
    dtype : keyword-only
        dtype of the parameters and running statistics (float32 as torch).
    backend : str, keyword-only
        Kernel backend for the local work.

    Attributes
    ----------
    weight, bias : ndarray (C,) or None
    running_mean, running_var : ndarray (C,) or None
    num_batches_tracked : 0-d int64 ndarray or None
    grad_weight, grad_bias : ndarray (C,) or None
        Set by :meth:`backward`: the gradients of the loss over the WHOLE batch (all ranks),
        identical on every rank. Do not all-reduce them again.
    training : bool

    Examples
    --------
    Run under ``mpiexec -n 2 python example.py`` (on one process it is plain batch norm):

    >>> import numpy as np
    >>> from fastnorm.mpi import SyncBatchNorm, MPI
    >>> comm = MPI.COMM_WORLD
    >>> rng = np.random.default_rng(comm.Get_rank())
    >>> x = rng.normal(2, 3, (4 + comm.Get_rank(), 3, 8, 8)).astype(np.float32)
    >>> bn = SyncBatchNorm(3, comm=comm)
    >>> y = bn.forward(x)                        # statistics over every rank's batch
    >>> gx = bn.backward(np.ones_like(y))        # bn.grad_weight, bn.grad_bias are set
    >>> y.shape, gx.dtype, bn.grad_bias.shape
    ((4, 3, 8, 8), dtype('float32'), (3,))
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, comm=None, *, axis=1, dtype=np.float32,
                 backend=None):
        C = self.num_features = _checks.integer(num_features, "num_features", 1)
        self.eps = _checks.eps(eps)
        _checks.momentum(momentum, np.zeros((), np.int64))
        self.momentum = momentum
        if not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.comm = comm_or_world(comm)
        self.axis = int(axis)
        self.backend = backend
        self.weight = np.ones(C, dtype) if affine else None
        self.bias = np.zeros(C, dtype) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(C, dtype)
            self.running_var = np.ones(C, dtype)
            self.num_batches_tracked = np.zeros((), np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = self.grad_bias = None
        self.training = True
        self._saved = None

    # ------------------------------------------------------------------ mode and state
    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def state_dict(self):
        """torch's keys: weight, bias, running_mean, running_var, num_batches_tracked."""
        names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        return {k: getattr(self, k).copy() for k in names if getattr(self, k) is not None}

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):
        """Normalize ``x`` (this rank's slice of the batch); collective in training mode.

        Returns y with x's shape and dtype.
        """
        if hasattr(x, "shape") and hasattr(x, "ndim") and x.ndim >= 2:
            ax = _checks.axis(self.axis, x.ndim)
            if x.shape[ax] != self.num_features:
                raise ValueError(f"input must have {self.num_features} channels on axis "
                                 f"{self.axis}, got shape {x.shape}")
        batch_stats = self.training or self.running_mean is None
        update = self.training and self.running_mean is not None
        w, b = (self._as_input(p, x) for p in (self.weight, self.bias))
        y, mean, rstd = sync_batch_norm(
            x, self.running_mean if not batch_stats or update else None,
            self.running_var if not batch_stats or update else None, w, b,
            batch_stats, self.momentum, self.eps, comm=self.comm, axis=self.axis,
            return_stats=True, num_batches_tracked=self.num_batches_tracked if update else None,
            backend=self.backend)
        self._saved = (x, w, mean, rstd, batch_stats)
        return y

    @staticmethod
    def _as_input(p, x):
        """A parameter in the input's dtype (float32 for half input): this object owns its
        parameters, so it casts them where the functional form would refuse a mix."""
        dt = getattr(x, "dtype", None)
        if p is None or dt is None or np.dtype(dt).kind != "f":
            return p
        return p.astype(np.float32 if np.dtype(dt) == np.float16 else dt, copy=False)

    def backward(self, grad_out):
        """Gradient w.r.t. this rank's input; sets ``grad_weight``/``grad_bias`` (over every
        rank). Collective.

        Returns grad_x with the input's shape and dtype.
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        x, w, mean, rstd, batch_stats = self._saved
        gx, gw, gb = sync_batch_norm_backward(grad_out, x, mean, rstd, w,
                                              batch_stats, comm=self.comm, axis=self.axis,
                                              has_bias=self.affine, backend=self.backend)
        if self.affine:      # this rank's shares -> the whole batch's, in rank order
            C = self.num_features
            send = np.concatenate([gw, gb]).astype(np.float64)
            recv = np.empty((self.comm.Get_size(), 2 * C))
            self.comm.Allgather(send, recv)
            tot = recv.sum(axis=0)
            self.grad_weight = tot[:C].astype(self.weight.dtype)
            self.grad_bias = tot[C:].astype(self.bias.dtype)
        return gx


class DistributedDataParallel(nn.Module):
    """Data-parallel training over MPI ranks, torch's ``DistributedDataParallel`` in shape:
    each rank runs the wrapped model on its slice of the batch; after ``loss.backward()``,
    :meth:`sync_gradients` replaces every parameter's gradient by its average over the
    ranks, summed in rank order (so every rank holds the same bits and steps its optimizer
    identically).

    At construction the model's batch norms become :class:`fastnorm.nn.SyncBatchNorm` over
    ``comm`` (``sync_batchnorm=False`` keeps them per-rank) and rank 0's parameters and
    buffers are broadcast, so every rank starts from the same state. With equal batch slices
    and a mean loss, a step equals one process's step on the whole batch. Unlike torch, the
    averaging is an explicit call (the tape has no backward hooks). Collective: every rank
    calls forward, backward and :meth:`sync_gradients` in the same order.

    Parameters
    ----------
    module : fastnorm.nn.Module
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``.
    sync_batchnorm : bool, keyword-only, default True

    Examples
    --------
    Under ``mpiexec -n 2 python train.py`` (on one process it changes nothing):

    >>> import numpy as np
    >>> from fastnorm import nn, optim, autograd as ag
    >>> from fastnorm.mpi import DistributedDataParallel, MPI
    >>> comm = MPI.COMM_WORLD
    >>> net = DistributedDataParallel(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), comm)
    >>> opt = optim.SGD(net.parameters(), lr=0.1)
    >>> x = np.random.default_rng(comm.Get_rank()).normal(size=(8, 4)).astype(np.float32)
    >>> loss = (net(x) * net(x)).mean()
    >>> loss.backward()
    >>> net.sync_gradients()
    >>> opt.step()
    """

    def __init__(self, module, comm=None, *, sync_batchnorm=True):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a fastnorm.nn.Module, got {type(module).__name__}")
        self.comm = comm_or_world(comm)
        self.module = nn.convert_sync_batchnorm(module, self.comm) if sync_batchnorm else module
        for _, p in self.module.named_parameters():
            self.comm.Bcast(p.data, root=0)
        for _, b in self.module.named_buffers():
            if b is not None:
                self.comm.Bcast(b, root=0)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def sync_gradients(self):
        """Average every trainable parameter's ``.grad`` over the ranks (a parameter without
        a gradient on some rank counts as zero there)."""
        params = [p for _, p in self.module.named_parameters() if p.requires_grad]
        if not params:
            return
        send = np.concatenate([np.zeros(p.data.size) if p.grad is None
                               else np.ravel(p.grad).astype(np.float64) for p in params])
        recv = np.empty((self.comm.Get_size(), send.size))
        self.comm.Allgather(send, recv)
        mean = recv.sum(axis=0) / self.comm.Get_size()      # rank order, the same bits
        off = 0
        for p in params:
            n = p.data.size
            p.grad = mean[off:off + n].reshape(p.data.shape).astype(p.data.dtype)
            off += n
