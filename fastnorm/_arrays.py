"""The host array adapter: how the norm bodies allocate, lay out and return NumPy arrays.

A backend's array adapter is everything the bodies (``fastnorm._norms``) need to know about
where its arrays live; the CPU backends share this one, the CUDA backend has its own with
the same methods (``fastnorm._cuda.ARRAYS``). Arguments are checked by ``fastnorm._checks``
first; the adapter only converts what was accepted.

Half-precision input (float16, ml_dtypes.bfloat16) goes to the kernels as it is: they convert
in registers and write half outputs; its statistics (and the fused kernels' weights) are
float32, the ``stats_dtype``.
"""
import numbers

import numpy as np

from . import _checks
from . import _geometry as geo

F64 = np.dtype(np.float64)
F32 = np.dtype(np.float32)


class Host:
    """NumPy arrays in this process's memory."""

    def open(self, input, name="input", min_ndim=1):
        """Start a call on ``input``: (the checked input, the adapter for this call)."""
        return self.input(input, name, min_ndim), self

    def native(self, x):
        """Whether the bodies run on this adapter's arrays as they are (always, on the host)."""
        return True

    def input(self, x, name="input", min_ndim=1):
        """x as a native-order, aligned float ndarray of at least ``min_ndim`` dimensions."""
        if not isinstance(x, np.ndarray):
            if isinstance(x, (list, tuple, numbers.Number)):
                x = np.asarray(x)
            else:
                raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
        dt = _checks.dtype_of(x, name)
        _checks.ndim_at_least(x, name, min_ndim)
        if not dt.isnative:
            x = x.astype(dt.newbyteorder("="))  # byte-swapped: one native copy
        if not x.flags.aligned:
            x = x.copy()  # compiled kernels take aligned data only
        return x

    def stats_dtype(self, x):
        """dtype of the per-row statistics and fused weights: float32 for half data."""
        return F32 if x.dtype.itemsize == 2 else x.dtype

    def plan(self, x, axis=None, batch_outer=False):
        """(x in a layout the geometry can view; its Layout)."""
        return geo.layout(x, axis, batch_outer)

    def view(self, a, lay, shape):
        return lay.view(a, shape)

    def like(self, a, xw, lay, name):
        """grad_out checked against x and brought into x's layout and compute dtype."""
        a = self.input(a, name)
        _checks.same_shape(a, xw.shape, name)
        a = a.astype(xw.dtype, copy=False)
        if not lay.holds(a):
            a = np.ascontiguousarray(a.transpose(lay.perm)).transpose(lay.inv)
        return a

    def output(self, out, x, lay):
        """(y to compute into, in the layout; the array to return)."""
        T = x.dtype
        if out is None:
            y = lay.empty(T)
            return y, y
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
        _checks.out_array(out, x)
        _checks.not_overlapping(out, x)
        if out.dtype == T and out.flags.aligned and lay.holds(out):
            return out, out
        return lay.empty(T), out

    def finish(self, y, final, lay):
        """The array the call returns: y itself, or y copied into out=."""
        if final is not y:
            final[...] = y
        return final

    def empty_in(self, lay, dtype):
        """An array of x's shape laid out as ``lay`` (a gradient of x)."""
        return lay.empty(dtype)

    def empty(self, shape, dtype=F64):
        return np.empty(shape, dtype)

    def full(self, shape, value, dtype=F64):
        return np.full(shape, value, dtype)

    def zeros(self, shape, dtype=F64):
        return np.zeros(shape, dtype)

    def vector(self, a, name, shape, dtype=F64):
        """weight/bias/statistics: None, or a C-contiguous array of ``shape`` and ``dtype``."""
        if a is None:
            return None
        if (type(a) is np.ndarray and a.dtype == dtype and a.shape == shape
                and a.flags.c_contiguous and a.flags.aligned):
            return a  # the common case, without np.require's overhead
        return np.require(_checks.vector(a, name, shape), dtype, ["C", "A"])

    def param(self, a, name, shape, x, dtype=F64):
        """weight/bias of input ``x``, checked (shape, x's dtype) and converted."""
        return None if a is None else self.vector(_checks.parameter(a, name, shape, x), name,
                                                  shape, dtype)

    def statistics(self, a, name, shape, dtype=F64):
        return self.vector(_checks.statistics(a, name, shape), name, shape, dtype)

    def inout(self, a):
        """An array the kernels update in place, standing for the caller's ``a``."""
        return a

    def writeback(self, a, k):
        """Copy the kernels' update of ``k`` into the caller's ``a`` (nothing on the host)."""

    def result(self, T, *arrays):
        """Statistics and gradients as the caller gets them: host arrays of dtype ``T``."""
        return tuple(None if a is None else np.asarray(a, dtype=T) for a in arrays)


HOST = Host()
