"""The functional API: validate arguments, build the canonical view, dispatch, return arrays.

Names, argument order and defaults follow ``torch.nn.functional``; ``axis`` (the channel
axis), ``out``, ``return_stats`` and ``backend`` are keyword-only additions. Every function
also accepts ``fastnorm.Tensor`` arguments and then records itself on the autodiff tape.
"""
import math
import numbers

import numpy as np

from . import _dispatch
from . import _geometry as geo

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_F64 = np.float64
_FAST = (np.dtype(np.float32), np.dtype(np.float64))   # dtypes the fast paths take
FUSED_SLAB = 1 << 18  # elements of one sample's channels-last slab, see _fuse


# ---------------------------------------------------------------------------- validation

def _other(backend, *args):
    """The module that takes this call instead of the NumPy path, or None.

    fastnorm.autograd when an argument is a ``fastnorm.Tensor`` (the call is recorded on
    the tape); fastnorm._cuda for device arrays (``__cuda_array_interface__``) or when the
    "cuda" backend is selected. Both expose every public function with this signature.
    """
    from . import autograd
    if any(isinstance(a, autograd.Tensor) for a in args):
        return autograd
    if (any(hasattr(a, "__cuda_array_interface__") for a in args)
            or (backend or _dispatch._current.get()) == "cuda"):
        from . import _cuda
        return _cuda
    return None


def _input(x, name="input", min_ndim=1):
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple, numbers.Number)):
            x = np.asarray(x)
        else:
            raise TypeError(f"{name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        if x.dtype.kind == "f" and x.dtype.newbyteorder("=") in _FLOATS:
            x = x.astype(x.dtype.newbyteorder("="))  # byte-swapped: one native copy
        else:
            raise TypeError(f"{name} must be float16, float32 or float64, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {x.shape}")
    if not x.flags.aligned:
        x = x.copy()  # compiled kernels take aligned data only
    return x


def _compute_dtype(x):
    """float16 is computed in float32 (statistics too) and cast back on output."""
    return np.dtype(np.float32) if x.dtype == np.float16 else x.dtype


def _axis(axis, ndim):
    if not isinstance(axis, numbers.Integral) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an integer in [{-ndim}, {ndim}), got {axis!r}")
    return int(axis) % ndim


def _eps(eps):
    if not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    return float(eps)


def _param(a, name, shape, dtype):
    """weight/bias/mean/rstd: None, or a float array of exactly ``shape`` -> contiguous dtype."""
    if a is None:
        return None
    if (type(a) is np.ndarray and a.dtype == dtype and a.shape == shape
            and a.flags.c_contiguous and a.flags.aligned):
        return a  # the common case, without np.require's overhead
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    return np.require(a, dtype, ["C", "A"])


def _running(a, name, C, training):
    if a is None:
        return None
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray (it is updated in place), "
                        f"got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {a.dtype}")
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},), got {a.shape}")
    if training and not a.flags.writeable:
        raise ValueError(f"{name} is read-only but training updates it in place")
    return a


def _running_pair(running_mean, running_var, C, update):
    rm = _running(running_mean, "running_mean", C, update)
    rv = _running(running_var, "running_var", C, update)
    if (rm is None) != (rv is None):
        raise ValueError("running_mean and running_var must be given together")
    return rm, rv


def _momentum(momentum, num_batches_tracked):
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked=")
    elif not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a number or None, got {type(momentum).__name__}")
    if num_batches_tracked is not None and not (
            isinstance(num_batches_tracked, np.ndarray) and num_batches_tracked.ndim == 0
            and num_batches_tracked.dtype.kind in "iu"):
        raise TypeError("num_batches_tracked must be a 0-d integer numpy array "
                        "(it is incremented in place)")


def _groups(num_groups, C, shape):
    """num_groups checked against the C channels of an input of ``shape`` (torch's message)."""
    if not isinstance(num_groups, numbers.Integral) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if C % num_groups:
        raise ValueError("Expected number of channels in input to be divisible by "
                         f"num_groups, but got input of shape {shape} and "
                         f"num_groups={num_groups}")
    return int(num_groups)


def _update_running(rm, rv, mean, var_unbiased, momentum, num_batches_tracked):
    """torch's rule: new = (1 - momentum) * old + momentum * batch, in place."""
    if num_batches_tracked is not None:
        num_batches_tracked += 1
    if momentum is None:
        momentum = 1.0 / float(num_batches_tracked)
    rm[...] = (1.0 - momentum) * rm + momentum * mean
    rv[...] = (1.0 - momentum) * rv + momentum * var_unbiased


def _like(a, x, lay, name):
    """grad_out checked against x and brought into x's layout and compute dtype."""
    a = _input(a, name)
    if a.shape != x.shape:
        raise ValueError(f"{name} must have the input's shape {x.shape}, got {a.shape}")
    a = a.astype(_compute_dtype(x), copy=False)
    if not lay.holds(a):
        a = np.ascontiguousarray(a.transpose(lay.perm)).transpose(lay.inv)
    return a


def _output(out, x, lay):
    """(y to compute into, in layout and compute dtype; array to return)."""
    T = _compute_dtype(x)
    if out is None:
        y = lay.empty(T)
        return y, (y if T == x.dtype else None)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must have shape {x.shape} and dtype {x.dtype}, "
                         f"got {out.shape} and {out.dtype}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if np.may_share_memory(out, x) and not (
            out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
            and out.strides == x.strides):
        raise ValueError("out overlaps the input without being the input itself; "
                         "pass out=input for in-place, or a separate array")
    if out.dtype == T and out.flags.aligned and lay.holds(out):
        return out, out
    return lay.empty(T), out


def _finish(y, final):
    if final is None:                      # float16: computed in float32
        return y.astype(np.float16)
    if final is not y:
        final[...] = y
    return final


# ------------------------------------------------------------ one-call fast paths
# A one-row inference call spends ~10 us (LN) / ~20 us (eval BN) in the general path's
# validation and layout planning and ~0.3 us in the kernel. The fast paths below take the
# common case only -- C-contiguous aligned float32/64 ndarrays, plain weights of the same
# dtype, no out=/return_stats, a float eps > 0, a CPU backend -- and return None for
# anything else, which then goes through the general path (and its error messages). The
# weights are checked here, or, on a backend whose kernels check every argument themselves
# (Cython: ~1 us less per call), by the kernel: what it rejects goes to the general path.
# They call the same kernels, so the results are the same bits (tests/test_cython.py).

def _plain(a, n, dtype):
    """True for None or a C-contiguous aligned ndarray of shape (n,) and ``dtype``."""
    return a is None or (type(a) is np.ndarray and a.shape == (n,) and a.dtype == dtype
                         and a.flags.c_contiguous and a.flags.aligned)


def _rows_fast(x, normalized_shape, weight, bias, eps, rms, out, return_stats, backend):
    """layer_norm / rms_norm over the last axis in one kernel call, or None."""
    if (type(x) is not np.ndarray or out is not None or return_stats or type(eps) is not float
            or not eps > 0 or x.dtype not in _FAST or not x.size or not x.flags.c_contiguous
            or not x.flags.aligned):
        return None
    M = x.shape[-1]
    if not ((normalized_shape == M) if type(normalized_shape) is int
            else (type(normalized_shape) is tuple and normalized_shape == (M,))):
        return None
    k, checks = _dispatch.fast_kernel("rows_fwd", backend, x.size)
    if k is None or not (checks or _plain(weight, M, x.dtype) and _plain(bias, M, x.dtype)):
        return None
    R = x.size // M
    y = np.empty_like(x)
    mean, rstd = np.empty(R, x.dtype), np.empty(R, x.dtype)
    x2, y2 = (x, y) if x.ndim == 2 else (x.reshape(R, M), y.reshape(R, M))
    try:
        k(x2, weight, bias, eps, rms, y2, mean, rstd)
    except (TypeError, ValueError):  # an argument the kernel declines: the general path
        return None
    return y


def _batch_eval_fast(x, rm, rv, weight, bias, training, eps, axis, out, return_stats,
                     backend):
    """Eval-mode batch_norm with channels on the last axis in one kernel call, or None."""
    if (training or type(x) is not np.ndarray or out is not None or return_stats
            or type(eps) is not float or not eps > 0 or x.dtype not in _FAST or not x.size
            or x.ndim < 2 or not (axis == -1 or axis == x.ndim - 1)
            or not x.flags.c_contiguous or not x.flags.aligned):
        return None
    C = x.shape[-1]
    if rm is None or rv is None:
        return None
    k, checks = _dispatch.fast_kernel("channels_eval", backend, x.size)
    if k is None or not (checks or _plain(rm, C, x.dtype) and _plain(rv, C, x.dtype)
                         and _plain(weight, C, x.dtype) and _plain(bias, C, x.dtype)):
        return None
    y = np.empty_like(x)
    try:
        k(x, rm, rv, weight, bias, eps, y)
    except (TypeError, ValueError):  # an argument the kernel declines: the general path
        return None
    return y


def _run(name, backend, *args):
    _dispatch.kernel(name, backend, args[0].size)(*args)


# --------------------------------------------------------- moments and apply on a view

def _moments(kind, xv, backend):
    """float64 (mean, m2) per row (R,) or per (p, c) (P, C)."""
    shape = xv.shape[:1] if kind == "rows" else (xv.shape[0], xv.shape[2])
    mean, m2 = np.empty(shape), np.empty(shape)
    _run(kind + "_moments", backend, xv, mean, m2)
    return mean, m2


def _scale_shift(kind, xv, yv, mean, alpha, beta, backend):
    _run(kind + "_scale_shift", backend, xv, mean, alpha, beta, yv)


def _dot(kind, dyv, xv, mean, backend):
    sdy, sdx = np.empty(mean.shape), np.empty(mean.shape)
    _run(kind + "_dot", backend, dyv, xv, mean, sdy, sdx)
    return sdy, sdx


def _bwd_apply(kind, dyv, xv, mean, c1, c2, c3, dxv, backend):
    _run(kind + "_bwd_apply", backend, dyv, xv, mean, c1, c2, c3, dxv)


def _spread(v, per, kind):
    """Per-channel (C,) or per-(n, c) values -> a kernel's per-row (R,) or (P, C) float64.

    ``per`` is the (outer, C) grid of the view: rows are (outer*C, ...) so ravel it.
    """
    f = np.empty(per)
    f[...] = v
    return f.ravel() if kind == "rows" else f


def _stats_out(T, *arrays):
    return tuple(np.asarray(a, dtype=T) for a in arrays)


def _backward_coefs(w, rstd, sum_g, sum_gxc, n):
    """dx = c1*dy + c2*(x - mean) + c3 from g-sums over a group of n elements.

    dx = rstd * (w*dy - sum(g)/n - xhat * sum(g*xhat)/n), g = w*dy, xhat = (x-mean)*rstd.
    """
    c1 = w * rstd
    c2 = -(rstd ** 3) * sum_gxc / n
    c3 = -rstd * sum_g / n
    return c1, c2, c3


# ---------------------------------------------------------------------------- batch norm

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, return_stats=False,
               num_batches_tracked=None, backend=None):
    """Batch normalization over every axis but the channel ``axis``.

    Parameters
    ----------
    input : ndarray, float16/32/64, at least 2-D; channels on ``axis`` (1: NC, NCL, NCHW;
        -1: channels-last). Computed where it lies in memory (no transposed copy).
    running_mean, running_var : ndarray (C,) or None
        Used to normalize when ``training=False``; updated in place when ``training=True``:
        ``new = (1 - momentum) * old + momentum * batch`` with the **unbiased** batch
        variance (the biased one normalizes), as torch.
    weight, bias : array (C,) or None
    training : bool
    momentum : float or None
        None: cumulative average, ``1 / num_batches_tracked`` (pass that 0-d int64 array;
        it is incremented in place before the update, as torch's module does).
    eps : float > 0
    axis, out, return_stats, backend : keyword-only
        ``out`` receives y (may be ``input`` itself); ``return_stats=True`` returns
        ``(y, mean, rstd)`` for :func:`batch_norm_backward` (in eval mode the running
        statistics); ``backend`` picks "cython", "numba" or "numpy".

    Returns
    -------
    y : ndarray, input's shape and dtype (or ``(y, mean, rstd)``).

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.random.default_rng(0).normal(3, 2, (8, 4, 5, 5)).astype(np.float32)
    >>> rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    >>> y = fn.batch_norm(x, rm, rv, training=True)
    >>> bool(abs(y.mean()) < 1e-5), rm.round(1)
    (True, array([0.3, 0.3, 0.3, 0.3], dtype=float32))
    """
    y = _batch_eval_fast(input, running_mean, running_var, weight, bias, training, eps, axis,
                         out, return_stats, backend)
    if y is not None:
        return y
    alt = _other(backend, input, weight, bias, running_mean, running_var)
    if alt is not None:
        return alt.batch_norm(input, running_mean, running_var, weight, bias, training,
                              momentum, eps, axis=axis, out=out, return_stats=return_stats,
                              num_batches_tracked=num_batches_tracked, backend=backend)
    x = _input(input, "input", 2)
    ax = _axis(axis, x.ndim)
    C, T = x.shape[ax], _compute_dtype(x)
    w = _param(weight, "weight", (C,), _F64)
    b = _param(bias, "bias", (C,), _F64)
    rm, rv = _running_pair(running_mean, running_var, C, training)
    eps = _eps(eps)
    count = x.size // C if C else 0
    if training:
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {x.shape}")
        if rm is not None:
            _momentum(momentum, num_batches_tracked)
    elif rm is None:
        raise ValueError("running_mean and running_var are required when training=False")
    backend = _dispatch.resolve(backend)

    xw, lay = geo.layout(x.astype(T, copy=False), ax)
    kind, shape, A = geo.batch_geometry(lay, ax)
    y, final = _output(out, x, lay)
    xv, yv = lay.view(xw, shape), lay.view(y, shape)
    if training:
        if count:
            mean, m2 = _moments(kind, xv, backend)
            if kind == "rows":  # (A*C,) rows of B = count/A: merge over A
                mean, m2 = geo.merge_equal(mean.reshape(A, C), m2.reshape(A, C), count // A, 0)
            else:
                mean, m2 = mean[0], m2[0]
            var = np.maximum(m2 / count, 0.0)
            if rm is not None:
                _update_running(rm, rv, mean, m2 / (count - 1), momentum, num_batches_tracked)
        else:
            mean = var = np.full(C, np.nan)
    else:
        mean, var = rm.astype(_F64), rv.astype(_F64)
    rstd = 1.0 / np.sqrt(var + eps)
    alpha = rstd if w is None else rstd * w
    beta = np.zeros(C) if b is None else b
    if count:
        per = (A, C) if kind == "rows" else (1, C)
        _scale_shift(kind, xv, yv, *[_spread(v, per, kind) for v in (mean, alpha, beta)],
                     backend)
    y = _finish(y, final)
    return (y,) + _stats_out(T, mean, rstd) if return_stats else y


def batch_norm_backward(grad_out, input, mean, rstd, weight=None, training=True, *, axis=1,
                        has_bias=True, backend=None):
    """Gradients of :func:`batch_norm`: ``(grad_x, grad_weight, grad_bias)``.

    ``mean`` and ``rstd`` are what ``batch_norm(..., return_stats=True)`` returned (in eval
    mode, ``training=False``, the running statistics, treated as constants). grad_weight is
    None without a weight; grad_bias is None when ``has_bias=False``.

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.random.default_rng(0).normal(size=(16, 3))
    >>> w = np.ones(3)
    >>> y, mean, rstd = fn.batch_norm(x, None, None, w, training=True, return_stats=True)
    >>> gx, gw, gb = fn.batch_norm_backward(np.ones_like(y), x, mean, rstd, w)
    >>> bool(abs(gx).max() < 1e-12), gb
    (True, array([16., 16., 16.]))
    """
    alt = _other(backend, grad_out, input)
    if alt is not None:
        return alt.batch_norm_backward(grad_out, input, mean, rstd, weight, training,
                                       axis=axis, has_bias=has_bias, backend=backend)
    x = _input(input, "input", 2)
    ax = _axis(axis, x.ndim)
    C, T = x.shape[ax], _compute_dtype(x)
    mean = _param(mean, "mean", (C,), _F64)
    rstd = _param(rstd, "rstd", (C,), _F64)
    w = _param(weight, "weight", (C,), _F64)
    backend = _dispatch.resolve(backend)
    xw, lay = geo.layout(x.astype(T, copy=False), ax)
    dy = _like(grad_out, xw, lay, "grad_out")
    kind, shape, A = geo.batch_geometry(lay, ax)
    count = x.size // C if C else 0
    dx = lay.empty(T)
    xv, dyv, dxv = lay.view(xw, shape), lay.view(dy, shape), lay.view(dx, shape)
    per = (A, C) if kind == "rows" else (1, C)
    mean_s = _spread(mean, per, kind)
    if count:
        sdy, sdx = _dot(kind, dyv, xv, mean_s, backend)
        sdy, sdx = sdy.reshape(per).sum(axis=0), sdx.reshape(per).sum(axis=0)
    else:
        sdy, sdx = np.zeros(C), np.zeros(C)
    wv = np.ones(C) if w is None else w
    if training:
        c1, c2, c3 = _backward_coefs(wv, rstd, wv * sdy, wv * sdx, max(count, 1))
    else:
        c1, c2, c3 = wv * rstd, np.zeros(C), np.zeros(C)
    if count:
        _bwd_apply(kind, dyv, xv, mean_s, *[_spread(c, per, kind) for c in (c1, c2, c3)],
                   dxv, backend)
    gw = None if w is None else (sdx * rstd).astype(T)
    gb = sdy.astype(T) if has_bias else None
    return dx.astype(x.dtype, copy=False), gw, gb


# ------------------------------------------------------------------ instance / group norm

def _nc_view(x, ax):
    """Instance/group geometry: (x in layout, Layout, kind, N, C, S, (stat view shape))."""
    T = _compute_dtype(x)
    xw, lay = geo.layout(x.astype(T, copy=False), ax, batch_outer=True)
    kind, N, C, S = geo.instance_geometry(lay, ax)
    shape = (N * C, S) if kind == "rows" else (N, S, C)
    return xw, lay, kind, N, C, S, shape


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  return_stats=False, num_batches_tracked=None, backend=None):
    """Instance normalization: each (sample, channel) over its spatial positions.

    Parameters follow ``torch.nn.functional.instance_norm``. With ``use_input_stats`` and
    running statistics given, these are updated in place with the batch average of the
    per-instance mean and **unbiased** variance (torch's rule); ``use_input_stats=False``
    normalizes with the running statistics. ``axis`` is the channel axis (1 or -1).
    ``return_stats=True`` returns ``(y, mean, rstd)`` with mean/rstd of shape (N, C).

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.random.default_rng(0).normal(5, 3, (2, 3, 8, 8))
    >>> y = fn.instance_norm(x)
    >>> np.allclose(y.mean(axis=(2, 3)), 0), np.allclose(y.var(axis=(2, 3)), 1, atol=1e-4)
    (True, True)
    """
    alt = _other(backend, input, weight, bias, running_mean, running_var)
    if alt is not None:
        return alt.instance_norm(input, running_mean, running_var, weight, bias,
                                 use_input_stats, momentum, eps, axis=axis, out=out,
                                 return_stats=return_stats,
                                 num_batches_tracked=num_batches_tracked, backend=backend)
    x = _input(input, "input", 2)
    ax = _axis(axis, x.ndim)
    if ax == 0:
        raise ValueError("axis must be the channel axis, not the batch axis 0")
    C, T = x.shape[ax], _compute_dtype(x)
    w = _param(weight, "weight", (C,), _F64)
    b = _param(bias, "bias", (C,), _F64)
    update = use_input_stats and running_mean is not None
    rm, rv = _running_pair(running_mean, running_var, C, update)
    eps = _eps(eps)
    if not use_input_stats and rm is None:
        raise ValueError("running_mean and running_var are required when "
                         "use_input_stats=False")
    if update:
        _momentum(momentum, num_batches_tracked)
    backend = _dispatch.resolve(backend)
    xw, lay, kind, N, C, S, shape = _nc_view(x, ax)
    if use_input_stats and S == 1 and x.size:
        raise ValueError("Expected more than 1 spatial element when training, "
                         f"got input size {x.shape}")
    y, final = _output(out, x, lay)
    xv, yv = lay.view(xw, shape), lay.view(y, shape)
    if use_input_stats and x.size and not update and _fuse(kind, N, S, C):
        # without running statistics: one fused kernel, x read from memory once
        mean, rstd = _grouped_forward(kind, xw, y, lay, N, C, S, w, b, eps, C, backend)
        y = _finish(y, final)
        return (y, mean, rstd) if return_stats else y
    if use_input_stats:
        if x.size:
            mean, m2 = _moments(kind, xv, backend)
            mean, m2 = mean.reshape(N, C), m2.reshape(N, C)
        else:
            mean = m2 = np.full((N, C), np.nan)
        var = np.maximum(m2 / S, 0.0)
        if update and x.size:
            _update_running(rm, rv, mean.mean(axis=0), (m2 / (S - 1)).mean(axis=0),
                            momentum, num_batches_tracked)
    else:
        mean = np.broadcast_to(rm.astype(_F64), (N, C))
        var = np.broadcast_to(rv.astype(_F64), (N, C))
    rstd = 1.0 / np.sqrt(var + eps)
    alpha = rstd if w is None else rstd * w
    beta = np.zeros(C) if b is None else b
    if x.size:
        _scale_shift(kind, xv, yv, *[_spread(v, (N, C), kind) for v in (mean, alpha, beta)],
                     backend)
    y = _finish(y, final)
    return (y,) + _stats_out(T, mean, rstd) if return_stats else y


def _fuse(kind, N, S, C):
    """Whether instance/group norm forward runs as one fused kernel (a function of the shape
    only, so every thread count gives the same bits). channels-first: always (rows of one
    (sample, group), parallel over N*G rows). channels-last: the kernel takes one sample's
    (S, C) slab per thread, so with fewer than 4 samples of more than 1 MiB (float32) the
    statistics/apply pair, parallel over blocks of rows, keeps more threads busy."""
    return kind == "rows" or N >= 4 or S * C <= FUSED_SLAB


def _grouped_forward(kind, xw, y, lay, N, C, S, w, b, eps, G, backend):
    """Fused instance/group norm forward -> (mean, rstd) (N, G) in the compute dtype.

    channels-first: rows_fwd_grouped on the (N*G, C/G, S) view, weight/bias seen as (G, K);
    channels-last: channels_fwd_grouped on the (N, S, C) view, one sample's slab at a time.
    """
    T = xw.dtype
    mean, rstd = np.empty((N, G), T), np.empty((N, G), T)
    wt = None if w is None else np.asarray(w, T)
    bt = None if b is None else np.asarray(b, T)
    if kind == "rows":
        shape, K = (N * G, C // G, S), C // G
        wt = None if wt is None else wt.reshape(G, K)
        bt = None if bt is None else bt.reshape(G, K)
        _run("rows_fwd_grouped", backend, lay.view(xw, shape), wt, bt, eps,
             lay.view(y, shape), mean.reshape(N * G), rstd.reshape(N * G))
    else:
        shape = (N, S, C)
        _run("channels_fwd_grouped", backend, lay.view(xw, shape), wt, bt, eps,
             lay.view(y, shape), mean, rstd)
    return mean, rstd


def _nc_backward(grad_out, input, mean, rstd, weight, axis, has_bias, backend, groups,
                 training=True):
    """Shared backward of instance norm (groups=None) and group norm (groups=G).

    mean/rstd are per (n, c) for instance norm, per (n, g) for group norm.
    """
    x = _input(input, "input", 2)
    ax = _axis(axis, x.ndim)
    T = _compute_dtype(x)
    backend = _dispatch.resolve(backend)
    xw, lay, kind, N, C, S, shape = _nc_view(x, ax)
    G = C if groups is None else groups
    mean = _param(mean, "mean", (N, G), _F64)
    rstd = _param(rstd, "rstd", (N, G), _F64)
    w = _param(weight, "weight", (C,), _F64)
    dy = _like(grad_out, xw, lay, "grad_out")
    dx = lay.empty(T)
    xv, dyv, dxv = lay.view(xw, shape), lay.view(dy, shape), lay.view(dx, shape)
    cg = C // G
    if x.size and kind == "rows" and training:
        # channels-first: one fused kernel, each (sample, group) row read from memory once
        shape3 = (N * G, cg, S)
        sdy, sdxh = np.empty((N * G, cg)), np.empty((N * G, cg))
        _run("rows_bwd_grouped", backend, lay.view(dy, shape3), lay.view(xw, shape3),
             mean.reshape(N * G), rstd.reshape(N * G), None if w is None else w.reshape(G, cg),
             lay.view(dx, shape3), sdy, sdxh)
        gw = None if w is None else sdxh.reshape(N, C).sum(axis=0).astype(T)
        gb = sdy.reshape(N, C).sum(axis=0).astype(T) if has_bias else None
        return dx.astype(x.dtype, copy=False), gw, gb
    mean_c, rstd_c = np.repeat(mean, cg, axis=1), np.repeat(rstd, cg, axis=1)  # (N, C)
    wv = np.ones(C) if w is None else w
    if x.size:
        mean_s = _spread(mean_c, (N, C), kind)
        sdy, sdx = _dot(kind, dyv, xv, mean_s, backend)
        sdy, sdx = sdy.reshape(N, C), sdx.reshape(N, C)
        # sums of g = w*dy and g*(x - mean) over each group, broadcast back to (N, C)
        sg = np.repeat((wv * sdy).reshape(N, G, cg).sum(axis=2), cg, axis=1)
        sgx = np.repeat((wv * sdx).reshape(N, G, cg).sum(axis=2), cg, axis=1)
        if training:
            c1, c2, c3 = _backward_coefs(wv, rstd_c, sg, sgx, cg * S)
        else:  # running statistics are constants: dx = w * rstd * dy
            c1, c2, c3 = wv * rstd_c, np.zeros((N, C)), np.zeros((N, C))
        _bwd_apply(kind, dyv, xv, mean_s, *[_spread(c, (N, C), kind) for c in (c1, c2, c3)],
                   dxv, backend)
    else:
        sdy = sdx = np.zeros((N, C))
    gw = None if w is None else (sdx * rstd_c).sum(axis=0).astype(T)
    gb = sdy.sum(axis=0).astype(T) if has_bias else None
    return dx.astype(x.dtype, copy=False), gw, gb


def instance_norm_backward(grad_out, input, mean, rstd, weight=None, use_input_stats=True, *,
                           axis=1, has_bias=True, backend=None):
    """Gradients of :func:`instance_norm`: ``(grad_x, grad_weight, grad_bias)``.

    ``mean``/``rstd`` (N, C) as returned with ``return_stats=True``; with
    ``use_input_stats=False`` they are constants (running statistics).

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 10))
    >>> y, m, r = fn.instance_norm(x, return_stats=True)
    >>> gx, gw, gb = fn.instance_norm_backward(np.ones_like(y), x, m, r)
    >>> float(abs(gx).max()) < 1e-12
    True
    """
    alt = _other(backend, grad_out, input)
    if alt is not None:
        return alt.instance_norm_backward(grad_out, input, mean, rstd, weight, use_input_stats,
                                          axis=axis, has_bias=has_bias, backend=backend)
    return _nc_backward(grad_out, input, mean, rstd, weight, axis, has_bias, backend, None,
                        training=use_input_stats)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               return_stats=False, backend=None):
    """Group normalization: channels split into ``num_groups`` groups, each (sample, group)
    normalized over its channels and spatial positions; affine per channel.

    ``axis`` is the channel axis (1 or -1, channels-last computed in place).
    ``return_stats=True`` returns ``(y, mean, rstd)`` with mean/rstd of shape (N, G).

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.random.default_rng(0).normal(2, 4, (2, 8, 5, 5)).astype(np.float32)
    >>> y, mean, rstd = fn.group_norm(x, 4, return_stats=True)
    >>> mean.shape, bool(abs(y.reshape(2, 4, -1).mean(-1)).max() < 1e-5)
    ((2, 4), True)
    """
    alt = _other(backend, input, weight, bias)
    if alt is not None:
        return alt.group_norm(input, num_groups, weight, bias, eps, axis=axis, out=out,
                              return_stats=return_stats, backend=backend)
    x = _input(input, "input", 2)
    ax = _axis(axis, x.ndim)
    if ax == 0:
        raise ValueError("axis must be the channel axis, not the batch axis 0")
    C, T = x.shape[ax], _compute_dtype(x)
    G = _groups(num_groups, C, x.shape)
    w = _param(weight, "weight", (C,), _F64)
    b = _param(bias, "bias", (C,), _F64)
    eps = _eps(eps)
    backend = _dispatch.resolve(backend)
    xw, lay, kind, N, C, S, shape = _nc_view(x, ax)
    y, final = _output(out, x, lay)
    if x.size and _fuse(kind, N, S, C):  # one fused kernel: x read from memory once
        mean, rstd = _grouped_forward(kind, xw, y, lay, N, C, S, w, b, eps, G, backend)
        y = _finish(y, final)
        return (y, mean, rstd) if return_stats else y
    cg = C // G
    if x.size:              # per (n, c) columns, then merged into groups of C/G columns
        mean, m2 = _moments("channels", lay.view(xw, shape), backend)
        mean, m2 = geo.merge_equal(mean.reshape(N, G, cg), m2.reshape(N, G, cg), S, 2)
    else:
        mean = m2 = np.full((N, G), np.nan)
    rstd = 1.0 / np.sqrt(np.maximum(m2 / (cg * S), 0.0) + eps)
    mean_c, rstd_c = np.repeat(mean, cg, axis=1), np.repeat(rstd, cg, axis=1)  # (N, C)
    alpha = rstd_c if w is None else rstd_c * w
    beta = np.zeros(C) if b is None else b
    if x.size:
        _scale_shift(kind, lay.view(xw, shape), lay.view(y, shape),
                     *[_spread(v, (N, C), kind) for v in (mean_c, alpha, beta)], backend)
    y = _finish(y, final)
    return (y,) + _stats_out(T, mean, rstd) if return_stats else y


def group_norm_backward(grad_out, input, mean, rstd, weight=None, *, num_groups, axis=1,
                        has_bias=True, backend=None):
    """Gradients of :func:`group_norm`: ``(grad_x, grad_weight, grad_bias)``.

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.random.default_rng(0).normal(size=(2, 4, 6))
    >>> y, m, r = fn.group_norm(x, 2, return_stats=True)
    >>> gx, gw, gb = fn.group_norm_backward(np.ones_like(y), x, m, r, num_groups=2)
    >>> gx.shape, gw, gb.shape
    ((2, 4, 6), None, (4,))
    """
    alt = _other(backend, grad_out, input)
    if alt is not None:
        return alt.group_norm_backward(grad_out, input, mean, rstd, weight,
                                       num_groups=num_groups, axis=axis, has_bias=has_bias,
                                       backend=backend)
    x = _input(input, "input", 2)
    G = _groups(num_groups, x.shape[_axis(axis, x.ndim)], x.shape)
    return _nc_backward(grad_out, x, mean, rstd, weight, axis, has_bias, backend, G)


# --------------------------------------------------------------------- layer / RMS norm

def _as_shape(normalized_shape):
    """normalized_shape (an int or a sequence of ints) as a tuple of ints."""
    if isinstance(normalized_shape, numbers.Integral):
        normalized_shape = (normalized_shape,)
    try:
        return tuple(int(s) for s in normalized_shape)
    except TypeError:
        raise TypeError("normalized_shape must be an int or a tuple of ints, "
                        f"got {normalized_shape!r}") from None


def _rows_shape(x, normalized_shape):
    ns = _as_shape(normalized_shape)
    k = len(ns)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k:] != ns:
        raise ValueError(f"Given normalized_shape={list(ns)}, expected input with shape "
                         f"[*, {', '.join(map(str, ns))}], but got input of size {x.shape}")
    lead = x.shape[:x.ndim - k]
    return ns, lead, math.prod(lead), math.prod(ns)


def _row_blocks(R):
    """Row blocks of the weight-gradient partials: a function of R only (determinism)."""
    return max(1, min(64, R // 16))


def _rows_forward(input, normalized_shape, weight, bias, eps, rms, out, return_stats, backend):
    x = _input(input, "input", 1)
    ns, lead, R, M = _rows_shape(x, normalized_shape)
    T = _compute_dtype(x)
    w = _param(weight, "weight", ns, T)
    b = _param(bias, "bias", ns, T)
    eps = _eps(eps)
    backend = _dispatch.resolve(backend)
    xw, lay = geo.layout(x.astype(T, copy=False))
    y, final = _output(out, x, lay)
    mean, rstd = np.empty(R, T), np.empty(R, T)
    if x.size:
        _run("rows_fwd", backend, lay.view(xw, (R, M)),
             None if w is None else w.reshape(M), None if b is None else b.reshape(M),
             eps, rms, lay.view(y, (R, M)), mean, rstd)
    else:
        mean[:], rstd[:] = (0 if rms else np.nan), np.nan
    y = _finish(y, final)
    if not return_stats:
        return y
    return (y, rstd.reshape(lead)) if rms else (y, mean.reshape(lead), rstd.reshape(lead))


def _rows_backward(grad_out, input, mean, rstd, weight, normalized_shape, rms, has_bias,
                   backend):
    x = _input(input, "input", 1)
    T = _compute_dtype(x)
    if normalized_shape is None:
        normalized_shape = x.shape[np.ndim(rstd):]
    ns, lead, R, M = _rows_shape(x, normalized_shape)
    mean = np.zeros(R, T) if rms else _param(mean, "mean", lead, T).reshape(R)
    rstd = _param(rstd, "rstd", lead, T).reshape(R)
    w = _param(weight, "weight", ns, T)
    backend = _dispatch.resolve(backend)
    xw, lay = geo.layout(x.astype(T, copy=False))
    dy = _like(grad_out, xw, lay, "grad_out")
    dx = lay.empty(T)
    B = _row_blocks(R)
    dw_part = None if w is None else np.empty((B, M))
    db_part = np.empty((B, M)) if has_bias else None
    if x.size:
        _run("rows_bwd", backend, lay.view(dy, (R, M)), lay.view(xw, (R, M)), mean, rstd,
             None if w is None else w.reshape(M), rms, lay.view(dx, (R, M)), dw_part, db_part)
    elif dw_part is not None or db_part is not None:
        for p in (dw_part, db_part):
            if p is not None:
                p[:] = 0.0
    gw = None if w is None else dw_part.sum(axis=0).astype(T).reshape(ns)
    gb = db_part.sum(axis=0).astype(T).reshape(ns) if has_bias else None
    return dx.astype(x.dtype, copy=False), gw, gb


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               return_stats=False, backend=None):
    """Layer normalization over the trailing ``normalized_shape`` dimensions.

    ``return_stats=True`` returns ``(y, mean, rstd)``, mean/rstd of the leading shape.
    Each row is read from memory once: statistics and the normalize pass share the cache.

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.random.default_rng(0).normal(1e4, 1, (4, 768)).astype(np.float32)
    >>> y = fn.layer_norm(x, (768,))
    >>> y.dtype, bool(abs(y.mean(-1)).max() < 1e-5)
    (dtype('float32'), True)
    """
    y = _rows_fast(input, normalized_shape, weight, bias, eps, False, out, return_stats, backend)
    if y is not None:
        return y
    alt = _other(backend, input, weight, bias)
    if alt is not None:
        return alt.layer_norm(input, normalized_shape, weight, bias, eps, out=out,
                              return_stats=return_stats, backend=backend)
    return _rows_forward(input, normalized_shape, weight, bias, eps, False, out,
                         return_stats, backend)


def layer_norm_backward(grad_out, input, mean, rstd, weight=None, *, normalized_shape=None,
                        has_bias=True, backend=None):
    """Gradients of :func:`layer_norm`: ``(grad_x, grad_weight, grad_bias)``.

    ``normalized_shape`` defaults to the input's trailing dims beyond ``mean``'s rank.

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.random.default_rng(0).normal(size=(3, 5))
    >>> y, m, r = fn.layer_norm(x, 5, return_stats=True)
    >>> gx, gw, gb = fn.layer_norm_backward(np.ones_like(y), x, m, r)
    >>> float(abs(gx).max()) < 1e-12, gb
    (True, array([3., 3., 3., 3., 3.]))
    """
    alt = _other(backend, grad_out, input)
    if alt is not None:
        return alt.layer_norm_backward(grad_out, input, mean, rstd, weight,
                                       normalized_shape=normalized_shape, has_bias=has_bias,
                                       backend=backend)
    return _rows_backward(grad_out, input, mean, rstd, weight, normalized_shape, False,
                          has_bias, backend)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, out=None, return_stats=False,
             backend=None):
    """RMS normalization: ``x / sqrt(mean(x**2) + eps) * weight`` over the trailing dims.

    ``eps=None`` uses ``numpy.finfo(input.dtype).eps``, as torch. ``return_stats=True``
    returns ``(y, rstd)``.

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> y = fn.rms_norm(np.array([[3.0, 4.0]]), (2,))
    >>> np.round(y, 6)
    array([[0.848528, 1.131371]])
    """
    if eps is None and type(input) is np.ndarray and input.dtype in _FAST:
        eps = float(np.finfo(input.dtype).eps)
    y = _rows_fast(input, normalized_shape, weight, None, eps, True, out, return_stats, backend)
    if y is not None:
        return y
    alt = _other(backend, input, weight)
    if alt is not None:
        return alt.rms_norm(input, normalized_shape, weight, eps, out=out,
                            return_stats=return_stats, backend=backend)
    if eps is None:
        eps = float(np.finfo(_input(input).dtype).eps)
    return _rows_forward(input, normalized_shape, weight, None, eps, True, out, return_stats,
                         backend)


def rms_norm_backward(grad_out, input, rstd, weight=None, *, normalized_shape=None,
                      backend=None):
    """Gradients of :func:`rms_norm`: ``(grad_x, grad_weight)``.

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.random.default_rng(0).normal(size=(3, 4))
    >>> y, r = fn.rms_norm(x, 4, np.ones(4), return_stats=True)
    >>> gx, gw = fn.rms_norm_backward(np.ones_like(y), x, r, np.ones(4))
    >>> gx.shape, gw.shape
    ((3, 4), (4,))
    """
    alt = _other(backend, grad_out, input)
    if alt is not None:
        return alt.rms_norm_backward(grad_out, input, rstd, weight,
                                     normalized_shape=normalized_shape, backend=backend)
    gx, gw, _ = _rows_backward(grad_out, input, None, rstd, weight, normalized_shape, True,
                               False, backend)
    return gx, gw
