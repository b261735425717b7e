"""Argument checks: one function per rule, one message per rule, torch's wording where torch
has one. Every public entry point (the functional API, the layers, SyncBatchNorm, the CUDA
adapter) checks its arguments here, so a rule and its message exist once.

The checks read only ``shape``, ``ndim`` and ``dtype``, so they serve host ndarrays and device
arrays alike; converting an accepted argument is the array adapter's job (``_arrays.py``,
``_cuda.py``). Each returns the canonical value (an int axis, a float eps, a tuple shape).
"""
import math
import numbers

import numpy as np

FLOATS = frozenset(map(np.dtype, (np.float16, np.float32, np.float64)))


def flag(value, name):
    """A bool (Python or NumPy), as torch's bool arguments; "yes" or 1 are mistakes."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def integer(value, name, lo=None, hi=None):
    """An int (not a bool, not a float that happens to be whole) in [lo, hi]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {span}, got {value}")
    return value


def dtype_of(a, name):
    """A float dtype of array ``a``: float16/32/64 (any byte order) or ml_dtypes' bfloat16
    (recognized by name: importing ml_dtypes takes ~0.8 s, and a caller holding a bfloat16
    array has imported it)."""
    dt = np.dtype(a.dtype)
    if (dt.kind == "f" and dt.newbyteorder("=") in FLOATS) or dt.name == "bfloat16":
        return dt
    raise TypeError(f"{name} must be float16, float32 or float64 (or ml_dtypes.bfloat16), "
                    f"got dtype {dt}")


def ndim_at_least(a, name, min_ndim):
    if a.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension"
                         f"{'s' if min_ndim > 1 else ''}, got shape {tuple(a.shape)}")


def axis(value, ndim, name="axis"):
    """An axis in [-ndim, ndim) -> its non-negative index."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or not -ndim <= value < ndim:
        raise ValueError(f"{name} must be an integer in [{-ndim}, {ndim}), got {value!r}")
    return int(value) % ndim


def channel_axis(value, ndim):
    """The channel axis of instance/group norm: any axis but the batch axis 0."""
    ax = axis(value, ndim)
    if ax == 0:
        raise ValueError("axis must be the channel axis, not the batch axis 0")
    return ax


def reduction_axes(axis, ndim):
    """None, an int or a tuple of distinct ints in [-ndim, ndim) -> sorted tuple of axes."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, numbers.Integral):
        axis = (axis,)
    try:
        axes = tuple(axis)
    except TypeError:
        raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}") from None
    out = []
    for a in axes:
        if not isinstance(a, numbers.Integral):
            raise TypeError(f"axis entries must be integers, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"axis entries must be integers in [{-ndim}, {ndim}), got {axis!r}")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis has repeated entries: {axis!r}")
    return tuple(sorted(out))


def eps(value):
    """eps > 0 and finite (inf would normalize everything to 0)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not 0 < value < math.inf:
        raise ValueError(f"eps must be a positive finite number, got {value!r}")
    return float(value)


def momentum(value, num_batches_tracked):
    """momentum in [0, 1], or None (cumulative average, which needs the batch count)."""
    if value is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked=")
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"momentum must be a number or None, got {value!r}")
    elif not 0.0 <= value <= 1.0:          # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1], got {value!r}")
    if num_batches_tracked is not None and not (
            isinstance(num_batches_tracked, np.ndarray) and num_batches_tracked.ndim == 0
            and num_batches_tracked.dtype == np.int64):
        raise TypeError("num_batches_tracked must be a 0-d int64 numpy array (it is "
                        f"incremented in place), got {num_batches_tracked!r}")


def vector(a, name, shape):
    """weight/bias/mean/rstd: None, or a float array of exactly ``shape`` (not converted)."""
    if a is None:
        return None
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        a = np.asarray(a)
    if np.dtype(a.dtype).kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    return a


HALF_KINDS = frozenset(("float16", "bfloat16"))


def same_dtype(a, name, x):
    """A parameter of input ``x``'s dtype, or float32 for half-precision input (mixed
    precision, the one mix torch's CPU kernels take); anything else is torch's "mixed
    dtype" error, not a silent cast."""
    if a is None:
        return
    dt, xt = np.dtype(a.dtype), np.dtype(x.dtype)
    if dt == xt or (xt.name in HALF_KINDS and dt == np.float32):
        return
    raise TypeError(f"mixed dtype: {name} is {dt.name} but the input is {xt.name}; "
                    f"pass {name} as {xt.name}"
                    + (" (or float32)" if xt.name in HALF_KINDS else ""))


def parameter(a, name, shape, x):
    """weight/bias of input ``x``: None, or a float array of ``shape`` and x's dtype."""
    same_dtype(vector(a, name, shape), name, x)
    return a


def statistics(a, name, shape):
    """mean/rstd a backward needs: required (not None), float, of ``shape``."""
    if a is None:
        raise TypeError(f"{name} must be the array the forward returned with "
                        "return_stats=True, got None")
    return vector(a, name, shape)


def running(a, name, C, update):
    """A running statistic: None, or a float (C,) array, writeable when it is updated."""
    if a is None:
        return None
    if not hasattr(a, "__array_interface__") and not hasattr(a, "__cuda_array_interface__"):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), "
                        f"got {type(a).__name__}")
    if np.dtype(a.dtype).kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {a.dtype}")
    if tuple(a.shape) != (C,):
        raise ValueError(f"{name} must have shape ({C},), got {tuple(a.shape)}")
    if update and isinstance(a, np.ndarray) and not a.flags.writeable:
        raise ValueError(f"{name} is read-only but training updates it in place")
    return a


def running_pair(running_mean, running_var, C, update):
    rm = running(running_mean, "running_mean", C, update)
    rv = running(running_var, "running_var", C, update)
    if (rm is None) != (rv is None):
        raise ValueError("running_mean and running_var must be given together")
    return rm, rv


def batch_count(count, shape):
    """Training batch norm needs two values per channel (torch's rule and message)."""
    if count == 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input size {tuple(shape)}")


def spatial_count(S, shape):
    if S == 1:
        raise ValueError("Expected more than 1 spatial element when training, "
                         f"got input size {tuple(shape)}")


def groups(num_groups, C, shape):
    """num_groups checked against the C channels of an input of ``shape`` (torch's message)."""
    if isinstance(num_groups, (bool, np.bool_)) or not isinstance(num_groups, numbers.Integral) \
            or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if C % num_groups:
        raise ValueError("Expected number of channels in input to be divisible by "
                         f"num_groups, but got input of shape {tuple(shape)} and "
                         f"num_groups={num_groups}")
    return int(num_groups)


def normalized_shape(value):
    """An int or a sequence of ints -> a tuple (a string is not a sequence of sizes)."""
    if isinstance(value, (bool, np.bool_)):
        value = None
    elif isinstance(value, numbers.Integral):
        value = (value,)
    if isinstance(value, (str, bytes)) or value is None or not hasattr(value, "__iter__"):
        raise TypeError(f"normalized_shape must be an int or a tuple of ints, got {value!r}")
    out = tuple(value)
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_))
               for s in out):
        raise TypeError(f"normalized_shape must be an int or a tuple of ints, got {value!r}")
    return tuple(int(s) for s in out)


def rows_shape(shape, value):
    """(normalized_shape, leading shape, R, M) for an input of ``shape`` (torch's message)."""
    ns = normalized_shape(value)
    k, ndim = len(ns), len(shape)
    if k == 0 or ndim < k or tuple(shape[ndim - k:]) != ns:
        raise ValueError(f"Given normalized_shape={list(ns)}, expected input with shape "
                         f"[*, {', '.join(map(str, ns))}], but got input of size "
                         f"{tuple(shape)}")
    lead = tuple(shape[:ndim - k])
    return ns, lead, math.prod(lead), math.prod(ns)


def same_shape(a, shape, name):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have the input's shape {tuple(shape)}, "
                         f"got {tuple(a.shape)}")


def out_array(out, x):
    """out= must match x's shape and dtype and be writeable."""
    if tuple(out.shape) != tuple(x.shape) or np.dtype(out.dtype) != np.dtype(x.dtype):
        raise ValueError(f"out must have shape {tuple(x.shape)} and dtype {x.dtype}, "
                         f"got {tuple(out.shape)} and {out.dtype}")
    if isinstance(out, np.ndarray) and not out.flags.writeable:
        raise ValueError("out is read-only")


def not_overlapping(out, x):
    """out may be x itself (in place) or disjoint from it, never a shifted view of it."""
    if not np.may_share_memory(out, x):
        return
    same = (out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
            and out.strides == x.strides)
    if same:
        return
    try:   # interleaved views (x[::2] and x[1::2]) are near but share no element
        if not np.shares_memory(out, x, max_work=1 << 16):
            return
    except np.exceptions.TooHardError:
        pass
    raise ValueError("out overlaps the input without being the input itself; "
                     "pass out=input for in-place, or a separate array")
