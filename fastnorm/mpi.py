"""Synchronized batch normalization over MPI: one batch split across ranks, normalized as if
it were one batch on one process.

Forward (training): every rank computes its per-channel ``(count, mean, M2)`` with the fast
kernels (:func:`fastnorm.moments.moments`), the triples are all-gathered and merged in rank
order in the fixed tree of :meth:`Moments.merge_all`, so every rank holds the same bits of
the global statistics. Backward: the per-channel ``sum(dy)`` and ``sum(dy * (x - mean))``
(the ``rows_dot``/``channels_dot`` kernels) are summed over the ranks, and each rank applies
``dx = c1*dy + c2*(x - mean) + c3`` to its own slice with the global count.

The sums are all-reduced as an all-gather followed by a sum in rank order (2·C numbers per
rank): the result is then the same on every rank and does not depend on the MPI library's
reduction algorithm.

Needs the ``[mpi]`` extra: ``pip install "fastnorm[mpi]"`` (mpi4py and the MPICH wheel,
which also brings ``mpiexec``). Run with ``mpiexec -n 4 python train.py``.
"""
import numbers

import numpy as np

try:
    from mpi4py import MPI
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastnorm.mpi needs mpi4py: pip install 'fastnorm[mpi]'") from e

from . import _dispatch
from . import _geometry as geo
from . import api
from .moments import Moments, moments

__all__ = ["SyncBatchNorm"]

_F64 = np.float64


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
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        if momentum is not None and not isinstance(momentum, numbers.Real):
            raise TypeError(f"momentum must be a number or None, got {type(momentum).__name__}")
        if not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        self.num_features = C = int(num_features)
        self.eps = api._eps(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.comm = MPI.COMM_WORLD if comm is None else comm
        if not isinstance(self.comm, MPI.Comm):
            raise TypeError(f"comm must be an mpi4py.MPI.Comm, got {type(self.comm).__name__}")
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

    # ------------------------------------------------------------------------ forward
    def _global_moments(self, x, ax, backend):
        """Local (count, mean, M2) per channel -> merged over the ranks in rank order."""
        C = self.num_features
        red = tuple(i for i in range(x.ndim) if i != ax)
        local = moments(x, red, backend=backend)
        send = np.empty(2 * C + 1)
        send[0], send[1:C + 1], send[C + 1:] = local.count, local.mean, local.m2
        recv = np.empty((self.comm.Get_size(), 2 * C + 1))
        self.comm.Allgather(send, recv)
        parts = [Moments(np.int64(r[0]), r[1:C + 1], r[C + 1:]) for r in recv]
        return Moments.merge_all(parts)

    def forward(self, x):
        """Normalize ``x`` (this rank's slice of the batch); collective in training mode.

        Returns y with x's shape and dtype.
        """
        x = api._input(x, "input", 2)
        ax = api._axis(self.axis, x.ndim)
        C = self.num_features
        if x.shape[ax] != C:
            raise ValueError(f"input must have {C} channels on axis {self.axis}, "
                             f"got shape {x.shape}")
        backend = _dispatch.resolve(self.backend)
        batch_stats = self.training or self.running_mean is None
        if batch_stats:
            g = self._global_moments(x, ax, backend)
            n = int(g.count)
            if n <= 1:
                raise ValueError("Expected more than 1 value per channel when training, "
                                 f"got {n} over all ranks (input size {x.shape} here)")
            mean, var = g.mean, np.maximum(g.m2 / n, 0.0)
            if self.training and self.running_mean is not None:
                self.num_batches_tracked += 1
                mom = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                       else self.momentum)
                rm, rv = self.running_mean, self.running_var
                rm[...] = (1.0 - mom) * rm + mom * mean
                rv[...] = (1.0 - mom) * rv + mom * (g.m2 / (n - 1))
        else:
            n = 0
            mean, var = self.running_mean.astype(_F64), self.running_var.astype(_F64)
        # the local normalize pass: batch_norm's eval path with these statistics
        y = api.batch_norm(x, mean, var, self.weight, self.bias, training=False, eps=self.eps,
                           axis=ax, backend=backend)
        rstd = 1.0 / np.sqrt(var + self.eps)
        self._saved = (x, ax, mean, rstd, n, batch_stats)
        return y

    # ----------------------------------------------------------------------- backward
    def backward(self, grad_out):
        """Gradient w.r.t. this rank's input; sets ``grad_weight``/``grad_bias``. Collective.

        Returns grad_x with the input's shape and dtype.
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        x, ax, mean, rstd, n, batch_stats = self._saved
        C, T = self.num_features, api._compute_dtype(x)
        backend = _dispatch.resolve(self.backend)
        xw, lay = geo.layout(x.astype(T, copy=False), ax)
        dy = api._like(grad_out, xw, lay, "grad_out")
        kind, shape, A = geo.batch_geometry(lay, ax)
        dx = lay.empty(T)
        xv, dyv, dxv = lay.view(xw, shape), lay.view(dy, shape), lay.view(dx, shape)
        per = (A, C) if kind == "rows" else (1, C)
        mean_s = api._spread(mean, per, kind)
        send = np.zeros(2 * C)
        if x.size:                                    # local sum(dy), sum(dy * (x - mean))
            sdy, sdx = api._dot(kind, dyv, xv, mean_s, backend)
            send[:C], send[C:] = sdy.reshape(per).sum(axis=0), sdx.reshape(per).sum(axis=0)
        recv = np.empty((self.comm.Get_size(), 2 * C))
        self.comm.Allgather(send, recv)
        tot = recv.sum(axis=0)                        # rank order: same bits on every rank
        sdy, sdx = tot[:C], tot[C:]
        wv = np.ones(C) if self.weight is None else self.weight.astype(_F64)
        if batch_stats:
            c1, c2, c3 = api._backward_coefs(wv, rstd, wv * sdy, wv * sdx, n)
        else:                                         # running statistics are constants
            c1, c2, c3 = wv * rstd, np.zeros(C), np.zeros(C)
        if x.size:
            api._bwd_apply(kind, dyv, xv, mean_s, *[api._spread(c, per, kind)
                                                    for c in (c1, c2, c3)], dxv, backend)
        if self.affine:
            self.grad_weight = (sdx * rstd).astype(self.weight.dtype)
            self.grad_bias = sdy.astype(self.bias.dtype)
        return dx.astype(x.dtype, copy=False)
