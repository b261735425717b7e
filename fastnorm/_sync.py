"""Synchronized batch norm's functional forms and collective: batch norm's body
(``fastnorm._norms``) with a :class:`Collective` between its phases. ``fastnorm.mpi``
re-exports them (with the array-level SyncBatchNorm and DistributedDataParallel), and
``fastnorm.nn.SyncBatchNorm`` calls them; mpi4py is imported only when a default
communicator is needed, so this module imports nothing optional.
"""
import numpy as np

from . import _checks, _dispatch, _norms
from .moments import Moments


def comm_or_world(comm):
    """``comm``, checked, or ``MPI.COMM_WORLD`` when None."""
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("synchronized batch norm needs mpi4py: "
                          "pip install 'fastnorm[mpi]'") from e
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
        self.comm = comm_or_world(comm)

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
