"""Dataset statistics on Dask arrays: moments through dask's own tree reduction, and a
``Standardizer`` that fits on a dask array and transforms lazily.

Each chunk's moments come from the fast kernels (:func:`fastnorm.moments.moments`); the
partial results travel as structured arrays ``(count, mean, m2)`` with the reduced axes kept
as size 1, and every combine/aggregate step merges the blocks it is handed with
:meth:`Moments.merge_all` (a fixed balanced tree over the blocks in index order). Dask's tree
is a function of the chunks and ``split_every`` only, so for the same chunks every scheduler
(threads, processes, a ``dask.distributed`` cluster) gives the same bits.

Needs the ``[dask]`` extra: ``pip install "fastnorm[dask]"``.
"""
import functools
import numbers

import numpy as np

try:
    import dask
    import dask.array as da
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastnorm.dask needs dask[array]: pip install 'fastnorm[dask]'") from e

from . import _checks, _dispatch
from .moments import Moments, moments as _np_moments

__all__ = ["moments", "Standardizer"]

PARTIAL = np.dtype([("count", np.int64), ("mean", np.float64), ("m2", np.float64)])


def _pack(m, shape):
    # IN Moments with mean/m2 of ``shape``   OUT structured (count, mean, m2) array
    out = np.empty(shape, PARTIAL)
    out["count"], out["mean"], out["m2"] = m.count, m.mean, m.m2
    return out


def _chunk(x, axis=None, keepdims=True, computing_meta=False, backend=None):
    # IN one chunk of x, reduced axes   OUT its moments, reduced axes kept as size 1
    shape = tuple(1 if i in axis else s for i, s in enumerate(x.shape))
    if computing_meta:
        return np.empty(shape, PARTIAL)
    # C order first: the kernel view (and so the bits) then depends on the chunk's shape only,
    # not on whether a scheduler hands over a strided view or a deserialized copy
    x = np.ascontiguousarray(x)
    return _pack(_np_moments(x, axis, keepdims=True, backend=backend), shape)


def _merge_blocks(p, axis, keepdims=True, computing_meta=False):
    # IN blocks' partials laid along the reduced axes   OUT one partial (fixed-tree merge)
    shape = tuple(1 if i in axis else s for i, s in enumerate(p.shape))
    if computing_meta or p.size == 0:
        out = np.empty(shape, PARTIAL)
    else:
        kept = [i for i in range(p.ndim) if i not in axis]
        q = p.transpose(list(axis) + kept).reshape((-1,) + tuple(p.shape[i] for i in kept))
        parts = [Moments(q[i]["count"], q[i]["mean"], q[i]["m2"]) for i in range(q.shape[0])]
        m = Moments.merge_all(parts)
        kshape = q.shape[1:]
        out = _pack(Moments(*(np.broadcast_to(f, kshape).reshape(shape) for f in m)), shape)
    if not keepdims:
        out = out.reshape(tuple(s for i, s in enumerate(shape) if i not in axis))
    return out


def moments(x, axis=None, *, split_every=None, compute=True, backend=None):
    """Moments of a dask array over ``axis`` through dask's tree reduction.

    Parameters
    ----------
    x : dask.array.Array (a NumPy array is wrapped as one chunk)
        float16/32/64 or integer data; statistics in float64 (see fastnorm.moments).
    axis : None, int or tuple of ints
        Axes to reduce (None: all).
    split_every : int or dict, optional
        Fan-in of dask's combine tree (dask's default when None). The bits depend on the
        chunks and on ``split_every``, never on the scheduler.
    compute : bool
        True: compute now and return NumPy :class:`~fastnorm.moments.Moments`. False: a
        Moments whose ``mean``/``m2`` are lazy dask arrays (``count`` is known statically).
    backend : str, optional
        Kernel backend used on the workers ("numba", "cython", "numpy").

    Returns
    -------
    Moments

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> import fastnorm.dask as fdask
    >>> x = da.random.default_rng(0).normal(5, 2, (10_000, 8), chunks=(1_000, 4))
    >>> m = fdask.moments(x, axis=0)
    >>> int(m.count), m.mean.shape, bool(np.allclose(m.var(), x.var(axis=0).compute()))
    (10000, (8,), True)
    """
    if not isinstance(x, da.Array):
        if isinstance(x, np.ndarray):
            x = da.from_array(x, chunks=x.shape or ())
        else:
            raise TypeError(f"x must be a dask.array.Array, got {type(x).__name__}")
    if not (x.dtype.kind in "iub" or (x.dtype.kind == "f" and x.dtype.itemsize <= 8)):
        raise TypeError(f"x must be a real numeric dask array, got dtype {x.dtype}")
    red = _checks.reduction_axes(axis, x.ndim)
    if backend is not None:
        _dispatch.resolve(backend)  # fail here, not on a worker
    if any(np.isnan(c) for cs in x.chunks for c in cs):
        raise ValueError("x has unknown chunk sizes; call x.compute_chunk_sizes() first")
    count = np.asarray(int(np.prod([x.shape[i] for i in red])), np.int64)
    if not red:
        # nothing reduced: each element is its own mean
        mean = x.astype(np.float64)
        m = Moments(count, mean, da.zeros_like(mean))
    else:
        kept = tuple(s for i, s in enumerate(x.shape) if i not in red)
        r = da.reduction(x, functools.partial(_chunk, backend=backend), _merge_blocks,
                         combine=_merge_blocks,
                         axis=red, keepdims=False, dtype=PARTIAL, split_every=split_every,
                         concatenate=True, meta=np.empty((0,) * len(kept), PARTIAL),
                         name="fastnorm-moments")
        m = Moments(count, r["mean"], r["m2"])
    if compute:
        mean, m2 = dask.compute(m.mean, m.m2)
        m = Moments(count, np.asarray(mean), np.asarray(m2))
    return m


def _standardize(block, mean, scale, dtype, block_info=None):
    # IN a block of x; mean/scale (x.ndim, size 1 on reduced axes) float64
    # OUT (x - mean) / scale in dtype, the parameters sliced to the block's kept range
    if block_info is not None:
        loc = block_info[0]["array-location"]
        idx = tuple(slice(None) if n == 1 else slice(a, b)
                    for n, (a, b) in zip(mean.shape, loc))
        mean, scale = mean[idx], scale[idx]
    return ((block.astype(np.float64) - mean) / scale).astype(dtype, copy=False)


class Standardizer:
    """Feature standardization fitted on a whole dataset: ``(x - mean) / std``.

    ``fit`` computes the moments over ``axis`` (the sample axes) with :func:`moments`; it
    reads the data once, chunk by chunk, so the dataset need not fit in memory.
    ``transform`` is lazy for dask arrays (one ``map_blocks`` task per chunk) and eager for
    NumPy arrays. Features with zero variance get scale 1 (they are only centred).

    Parameters
    ----------
    axis : int or tuple of ints
        Axes reduced by ``fit`` (default 0: statistics per feature over the samples).
    ddof : int
        Delta degrees of freedom of the standard deviation (0, as scikit-learn).
    split_every : int or dict, optional
        Passed to :func:`moments`.

    Attributes
    ----------
    mean_, var_, scale_ : ndarray, float64, the kept shape
    count_ : int, number of samples per feature seen by ``fit``
    moments_ : Moments

    Examples
    --------
    >>> import dask.array as da, numpy as np
    >>> from fastnorm.dask import Standardizer
    >>> x = da.random.default_rng(0).normal(3, 2, (20_000, 4), chunks=(5_000, 4))
    >>> z = Standardizer().fit(x).transform(x)          # lazy: nothing computed yet
    >>> zc = z.compute()
    >>> bool(abs(zc.mean(0)).max() < 1e-12), bool(abs(zc.std(0) - 1).max() < 1e-12)
    (True, True)
    """

    def __init__(self, axis=0, ddof=0, split_every=None):
        if not isinstance(ddof, numbers.Integral) or ddof < 0:
            raise ValueError(f"ddof must be a non-negative integer, got {ddof!r}")
        self.axis = axis
        self.ddof = int(ddof)
        self.split_every = split_every

    def fit(self, x):
        """Compute mean and scale over ``self.axis`` of ``x`` (dask or NumPy array)."""
        if isinstance(x, np.ndarray):
            m = _np_moments(x, self.axis)
        else:
            m = moments(x, self.axis, split_every=self.split_every)
        self._red = _checks.reduction_axes(self.axis, x.ndim)
        self._shape = tuple(x.shape)
        self.moments_ = m
        self.count_ = int(m.count)
        self.mean_ = m.mean
        self.var_ = m.var(self.ddof)
        std = np.sqrt(self.var_)
        self.scale_ = np.where(std > 0, std, 1.0)
        return self

    def _check(self, x, name="x"):
        if not hasattr(self, "mean_"):
            raise ValueError("this Standardizer is not fitted yet: call fit() first")
        kept_fit = tuple(s for i, s in enumerate(self._shape) if i not in self._red)
        if x.ndim != len(self._shape) or tuple(
                s for i, s in enumerate(x.shape) if i not in self._red) != kept_fit:
            raise ValueError(f"{name} must have the fitted feature shape {kept_fit} on the "
                             f"axes kept by fit, got shape {x.shape}")

    def _broadcast(self, v):
        return np.expand_dims(v, self._red)

    def transform(self, x):
        """``(x - mean_) / scale_``: lazy (map_blocks) for dask arrays, eager for NumPy.

        The output keeps float32/float64 (other dtypes give float64).
        """
        if not isinstance(x, (np.ndarray, da.Array)):
            raise TypeError(f"x must be a dask or numpy array, got {type(x).__name__}")
        self._check(x)
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        mean, scale = self._broadcast(self.mean_), self._broadcast(self.scale_)
        if isinstance(x, np.ndarray):
            return _standardize(x, mean, scale, dtype)
        return da.map_blocks(_standardize, x, mean, scale, dtype, dtype=dtype,
                             meta=np.empty((0,) * x.ndim, dtype), name="fastnorm-standardize")

    def fit_transform(self, x):
        """``fit(x).transform(x)``."""
        return self.fit(x).transform(x)

    def inverse_transform(self, z):
        """``z * scale_ + mean_`` (lazy for dask arrays)."""
        self._check(z, "z")
        dtype = z.dtype if z.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        mean, scale = self._broadcast(self.mean_), self._broadcast(self.scale_)
        return (z.astype(np.float64) * scale + mean).astype(dtype)
