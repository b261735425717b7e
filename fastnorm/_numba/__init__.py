"""Numba backend: KERNELS maps each kernel name to its (serial, parallel) entries.

An entry calls the kernel's dispatcher with the arrays as given, except for half-precision
data (float16, ml_dtypes.bfloat16), which Numba cannot type: its data arrays go in as bit
views (float16 as uint16, bfloat16 as int16; no copy, _jit.py converts in registers) and a
fused kernel's half-precision weight/bias as float32 (C or M values, never the data).
"""
import numba
import numpy as np

from . import channels, rows
from .. import reference as _reference

# per kernel: positions of the data arrays (the first sets the dtype) and of the fused
# kernels' weight/bias (float32, or the data's half dtype converted here)
_ARGS = {
    "rows_fwd": ((0, 5), (1, 2)),
    "rows_fwd_grouped": ((0, 4), (1, 2)),
    "rows_bwd": ((1, 0, 6), (4,)),
    "rows_moments": ((0,), ()),
    "rows_scale_shift": ((0, 4), ()),
    "rows_dot": ((1, 0), ()),
    "rows_bwd_apply": ((1, 0, 6), ()),
    "rows_bwd_grouped": ((1, 0, 5), ()),
    "channels_moments": ((0,), ()),
    "channels_scale_shift": ((0, 4), ()),
    "channels_dot": ((1, 0), ()),
    "channels_bwd_apply": ((1, 0, 6), ()),
    "channels_fwd_grouped": ((0, 4), (1, 2)),
    "channels_eval": ((0, 6), (1, 2, 3, 4)),
}
_VIEW = {"float16": np.uint16, "bfloat16": np.int16}


def _entry(dispatcher, data, params):
    first = data[0]

    def entry(*args):
        x = args[first]
        if type(x) is not np.ndarray or x.itemsize != 2:
            return dispatcher(*args)                  # float32/float64: the kernel itself
        return dispatcher(*_half_args(args, data, params))
    entry.__name__ = entry.__qualname__ = dispatcher.__name__
    entry.__doc__ = dispatcher.__doc__
    entry.dispatcher = dispatcher
    return entry


def _half_args(args, data, params):
    dtype = args[data[0]].dtype
    view = _VIEW.get(dtype.name)
    if view is None:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got dtype {dtype}")
    args = list(args)
    for i in data:
        a = args[i]
        if not isinstance(a, np.ndarray) or a.dtype != dtype:
            raise TypeError(f"the data arrays must all be {dtype}, got "
                            f"{getattr(a, 'dtype', type(a).__name__)}")
        args[i] = a.view(view)
    for i in params:
        a = args[i]
        if isinstance(a, np.ndarray) and a.dtype == dtype:
            args[i] = a.astype(np.float32)
    return args


def _rows_of(kernel):
    """channels_eval on x, y (..., C): the kernel sees their (Q, C) views (no copy)."""
    def entry(x, mean, var, weight, bias, eps, y):
        if x.ndim != 2:
            if not (x.flags.c_contiguous and y.flags.c_contiguous and x.ndim):
                raise ValueError("x and y must be C-contiguous with at least 1 dimension")
            C = x.shape[-1]
            Q = x.size // C if C else 0
            x, y = x.reshape(Q, C), y.reshape(Q, C)
        return kernel(x, mean, var, weight, bias, eps, y)
    entry.__name__ = entry.__qualname__ = kernel.__name__
    entry.__doc__ = kernel.__doc__
    entry.dispatcher = kernel.dispatcher
    return entry


def _dispatchers(name):
    return getattr(rows if name.startswith("rows") else channels, name)


KERNELS = {name: tuple(_entry(d, *_ARGS[name]) for d in _dispatchers(name))
           for name in _reference.KERNELS + _reference.FUSED}
KERNELS[_reference.CHANNELS_EVAL] = tuple(_rows_of(k) for k in KERNELS[_reference.CHANNELS_EVAL])
# api's one-call paths pass 2-D float32/float64 arrays: the bare dispatchers
NATIVE = {name: _dispatchers(name) for name in (_reference.ROWS_FWD, _reference.CHANNELS_EVAL)}


def set_num_threads(n):
    # numba's thread count is per calling thread; the dispatcher calls this before each
    # parallel launch when it differs.
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def get_num_threads():
    return numba.get_num_threads()


def start_threads():
    # numba loads its threading layer (the omp one links libgomp) on first use; the
    # dispatcher calls this while it sets libgomp's spin count (fastnorm._threads)
    numba.get_num_threads()


def info():
    return {"numba": numba.__version__, "threading_layer": _threading_layer()}


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "not initialized (" + numba.config.THREADING_LAYER + ")"
