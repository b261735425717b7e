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

from . import _checks, _dispatch, _norms
from .moments import Moments

__all__ = ["SyncBatchNorm", "Collective", "sync_batch_norm", "sync_batch_norm_backward"]


def _comm(comm):
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py.MPI.Comm, got {type(comm).__name__}")
    return comm


class Collective:
    """The exchanges of synchronized batch norm over ``comm``, between the body's phases.

    ``moments(mean, m2, count)``: this rank's statistics units (1, C) of ``count`` elements
    each -> the merge over every rank. ``sums(sdy, sdx, count)``: this rank's per-channel
    backward sums (1, C) -> their totals over every rank, and the global count. Collective:
    every rank calls them in the same order.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.mpi import Collective, MPI
    >>> mean, m2, n = Collective(MPI.COMM_SELF).moments(np.ones((1, 2)), np.zeros((1, 2)), 4)
    >>> mean, n
    (array([[1., 1.]]), 4)
    """

    def __init__(self, comm=None):
        self.comm = _comm(comm)

    def _gather(self, count, *rows):
        send = np.concatenate([np.array([float(count)])] + [np.ravel(r) for r in rows])
        recv = np.empty((self.comm.Get_size(), send.size))
        self.comm.Allgather(send, recv)
        return recv

    def moments(self, mean, m2, count):
        C = mean.size
        recv = self._gather(count, mean, m2)
        parts = [Moments(np.int64(r[0]), r[1:C + 1], r[C + 1:]) if r[0] else
                 Moments.empty((C,)) for r in recv]
        g = Moments.merge_all(parts)
        return g.mean.reshape(1, C), g.m2.reshape(1, C), int(g.count)

    def sums(self, sdy, sdx, count):
        C = sdy.size
        tot = self._gather(count, sdy, sdx).sum(axis=0)   # rank order: same bits everywhere
        return tot[1:C + 1].reshape(1, C), tot[C + 1:].reshape(1, C), int(tot[0])


def sync_batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                    momentum=0.1, eps=1e-5, *, comm=None, axis=1, out=None, return_stats=False,
                    num_batches_tracked=None, backend=None):
    """:func:`fastnorm.batch_norm` with the batch statistics of every rank of ``comm``
    (training only; eval normalizes with the running statistics, locally).

    Arguments as :func:`fastnorm.batch_norm`; ``comm`` is an mpi4py communicator (default
    ``MPI.COMM_WORLD``). Collective when ``training``: every rank calls it, a rank without
    samples with an empty batch. ``running_var`` receives the unbiased variance over the
    global count.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.mpi import sync_batch_norm, MPI
    >>> x = np.random.default_rng(0).normal(2, 3, (8, 3))
    >>> y = sync_batch_norm(x, None, None, training=True, comm=MPI.COMM_SELF)
    >>> bool(abs(y.mean(axis=0)).max() < 1e-12)
    True
    """
    h = _dispatch.handler(input, weight, bias, running_mean, running_var, out, num_batches_tracked)
    if h is not None:
        return h(sync_batch_norm, dict(
            input=input, running_mean=running_mean, running_var=running_var, weight=weight,
            bias=bias, training=training, momentum=momentum, eps=eps, comm=comm, axis=axis,
            out=out, return_stats=return_stats, num_batches_tracked=num_batches_tracked,
            backend=backend))
    collective = Collective(comm) if _checks.flag(training, "training") else None
    return _norms.batch_norm(input, running_mean, running_var, weight, bias, training,
                             momentum, eps, axis=axis, out=out, return_stats=return_stats,
                             num_batches_tracked=num_batches_tracked, backend=backend,
                             collective=collective)


def sync_batch_norm_backward(grad_out, input, mean, rstd, weight=None, training=True, *,
                             comm=None, axis=1, has_bias=True, backend=None):
    """Gradients of :func:`sync_batch_norm`: ``(grad_x, grad_weight, grad_bias)``.

    grad_x is this rank's slice of the gradient of the loss summed over every rank;
    grad_weight and grad_bias are this rank's share, as torch's SyncBatchNorm returns them
    (a data-parallel wrapper sums or averages them over the ranks with every other
    parameter's gradient). Collective when ``training``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.mpi import sync_batch_norm, sync_batch_norm_backward, MPI
    >>> x = np.random.default_rng(0).normal(size=(8, 3))
    >>> y, m, r = sync_batch_norm(x, None, None, training=True, comm=MPI.COMM_SELF,
    ...                           return_stats=True)
    >>> gx, gw, gb = sync_batch_norm_backward(np.ones_like(y), x, m, r, comm=MPI.COMM_SELF)
    >>> float(abs(gx).max()) < 1e-12, gb
    (True, array([8., 8., 8.]))
    """
    h = _dispatch.handler(grad_out, input, mean, rstd, weight)
    if h is not None:
        return h(sync_batch_norm_backward, dict(
            grad_out=grad_out, input=input, mean=mean, rstd=rstd, weight=weight,
            training=training, comm=comm, axis=axis, has_bias=has_bias, backend=backend))
    collective = Collective(comm) if _checks.flag(training, "training") else None
    return _norms.batch_norm_backward(grad_out, input, mean, rstd, weight, training, axis=axis,
                                      has_bias=has_bias, backend=backend, collective=collective)


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
        self.comm = _comm(comm)
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
        y, mean, rstd = sync_batch_norm(
            x, self.running_mean if not batch_stats or update else None,
            self.running_var if not batch_stats or update else None, self.weight, self.bias,
            batch_stats, self.momentum, self.eps, comm=self.comm, axis=self.axis,
            return_stats=True, num_batches_tracked=self.num_batches_tracked if update else None,
            backend=self.backend)
        self._saved = (x, mean, rstd, batch_stats)
        return y

    def backward(self, grad_out):
        """Gradient w.r.t. this rank's input; sets ``grad_weight``/``grad_bias`` (over every
        rank). Collective.

        Returns grad_x with the input's shape and dtype.
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        x, mean, rstd, batch_stats = self._saved
        gx, gw, gb = sync_batch_norm_backward(grad_out, x, mean, rstd, self.weight,
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
