"""float64 NumPy twins: the test oracle and the fallback backend.

Two layers, both written for clarity rather than speed:

1. **Oracles** (``batch_norm``, ``layer_norm_backward``, ...): each norm written straight
   from its definition with ``x.mean(axes)``/``x.var(axes)`` on the user's array. They share
   no code with ``api.py`` or ``_geometry.py``, so a bug in the fast adapters cannot hide
   behind them.
2. **Kernel twins** (``rows_fwd``, ``channels_moments``, ...): the same names, argument order
   and outputs as ``fastnorm._numba`` and ``fastnorm_cy``. They are registered as the
   ``"numpy"`` backend and serve any input the compiled backends decline.

Kernel contract (every backend): arrays are C-contiguous; ``T`` is the data dtype, that of
x, y, dy and dx: float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``); ``S`` is
the dtype of per-row statistics and of the fused kernels' weight/bias: T for float32 and
float64 data, float32 for half-precision data; per-row/per-channel moments, backward sums
and coefficients are float64 for every T; outputs are written into the arrays passed in,
nothing is returned.

Half precision (T float16 or bfloat16): every load of the data is converted to float32 in
registers, statistics are accumulated in float32 or better (float64 where the loop is
memory-bound and it is free) and each output is rounded once to T, to nearest even; no
array is ever converted whole. The weight/bias of a fused kernel (S arrays) may also be
given in T itself: they are converted to float32 (C or M values, never the data). bfloat16
needs ml_dtypes; without it nothing about bfloat16 exists and nothing else changes.

Numerics every backend keeps: a constant row or channel has exactly that constant as its
mean (float64 means are corrected by the mean deviation from them, or shifted by the first
value, where the rounded sum of n float64 copies would miss it), so its output is exactly
beta; values near the dtype's largest (float32 to ~3e38, where float32
accumulators overflow) give finite statistics (the sums are redone on the data scaled by a
power of two when they overflow). float64 M2 beyond float64's range overflows, in the
twins as in the kernels.

    rows (x is (R, M), statistics per row)
      rows_fwd(x, weight|None, bias|None, eps, rms, y, mean, rstd)     mean, rstd: (R,) S
      rows_fwd_grouped(x, weight|None, bias|None, eps, y, mean, rstd)
          x, y: (R, K, S), statistics per row over (K, S); weight/bias (G, K): row r, segment
          k is scaled by weight[r % G, k] (instance norm (N*C, 1, S), group norm (N*G, C/G, S))
      rows_bwd(dy, x, mean, rstd, weight|None, rms, dx, dw_part|None, db_part|None)
          mean, rstd: (R,) S (as rows_fwd returned them)
          dw_part, db_part: (B, M) f64, B row blocks (block b = rows [b*R//B, (b+1)*R//B))
      rows_moments(x, mean, m2)                      (R,) f64: mean and sum((x - mean)**2)
      rows_scale_shift(x, mean, alpha, beta, y)      y = (x - mean[r]) * alpha[r] + beta[r]
      rows_dot(dy, x, mean, sum_dy, sum_dyxc)        sums of dy and dy * (x - mean[r])
      rows_bwd_apply(dy, x, mean, c1, c2, c3, dx)    dx = c1[r]*dy + c2[r]*(x - mean[r]) + c3[r]
      rows_bwd_grouped(dy, x, mean, rstd, weight|None, dx, sum_dy, sum_dyxh)
          the backward of rows_fwd_grouped: dy, x, dx (R, K, S); mean, rstd (R,) f64; weight
          (G, K) f64 as there; sum_dy, sum_dyxh (R, K) f64: sums over each segment of dy
          and dy * xhat (the weight/bias gradients before the sum over samples)
    channels (x is (P, Q, C), statistics per (p, c) over q; every per-channel array is (P, C))
      channels_moments(x, mean, m2)
      channels_scale_shift(x, mean, alpha, beta, y)
      channels_dot(dy, x, mean, sum_dy, sum_dyxc)
      channels_bwd_apply(dy, x, mean, c1, c2, c3, dx)
      channels_fwd_grouped(x, weight|None, bias|None, eps, y, mean, rstd)
          x, y: (P, Q, C); statistics per (p, g) over q and the C/G channels of group g,
          G = mean.shape[1]; weight/bias (C,); mean, rstd: (P, G) S (instance norm G = C,
          group norm channels-last)
    fused (a backend may provide it; fastnorm._dispatch composes it where absent)
      channels_eval(x, mean, var, weight|None, bias|None, eps, y)
          eval-mode batch norm: x, y (..., C); mean, var, weight, bias (C,) S;
          y = (x - mean) * (rstd * weight) + bias, rstd = 1 / sqrt(var + eps) in float64
"""
import math

import numpy as np

# ----------------------------------------------------------------------------------------
# Oracles. x, dy: any float array; everything is computed in float64 and returned in float64.
# ----------------------------------------------------------------------------------------


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _normalize(x, axes, eps, rms=False):
    """x -> (xhat, mean, rstd) with statistics over ``axes`` (kept as size-1 dims)."""
    if rms:
        rstd = 1.0 / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
        return x * rstd, np.zeros_like(rstd), rstd
    mean = x.mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    return (x - mean) * rstd, mean, rstd


def _backward(dy, xhat, rstd, axes, g_scale, rms=False):
    """dx of y = xhat * w + b, with statistics over ``axes``; g = dy * w (w broadcast).

    term 1: g;  term 2: - mean(g)  (absent for RMS: no mean was subtracted);
    term 3: - xhat * mean(g * xhat)
    """
    g = dy * g_scale
    dx = g - xhat * (g * xhat).mean(axis=axes, keepdims=True)
    if not rms:
        dx = dx - g.mean(axis=axes, keepdims=True)
    return dx * rstd


def _channel_axes(ndim, axis):
    axis = axis % ndim
    return axis, tuple(i for i in range(ndim) if i != axis)


def _bshape(ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return shape


def _update_running(running_mean, running_var, mean, var_unbiased, momentum, num_batches_tracked):
    if num_batches_tracked is not None:
        num_batches_tracked += 1
    if momentum is None:
        momentum = 1.0 / float(num_batches_tracked)
    running_mean *= 1 - momentum
    running_mean += momentum * mean
    running_var *= 1 - momentum
    running_var += momentum * var_unbiased


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, axis=1, num_batches_tracked=None):
    """BN oracle: returns (y, mean, rstd) in float64; updates running stats in place."""
    x = _f64(x)
    axis, red = _channel_axes(x.ndim, axis)
    bs = _bshape(x.ndim, axis)
    if training:
        mean = x.mean(axis=red)
        var = x.var(axis=red)
        count = x.size // x.shape[axis]
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var * count / (count - 1),
                            momentum, num_batches_tracked)
    else:
        mean, var = _f64(running_mean), _f64(running_var)
    rstd = 1.0 / np.sqrt(var + eps)
    y = (x - mean.reshape(bs)) * rstd.reshape(bs)
    if weight is not None:
        y = y * _f64(weight).reshape(bs)
    if bias is not None:
        y = y + _f64(bias).reshape(bs)
    return y, mean, rstd


def batch_norm_backward(dy, x, mean, rstd, weight=None, training=True, axis=1):
    """(grad_x, grad_weight, grad_bias) of BN; eval mode treats mean/rstd as constants."""
    dy, x = _f64(dy), _f64(x)
    axis, red = _channel_axes(x.ndim, axis)
    bs = _bshape(x.ndim, axis)
    mean, rstd = _f64(mean).reshape(bs), _f64(rstd).reshape(bs)
    w = np.ones(x.shape[axis]).reshape(bs) if weight is None else _f64(weight).reshape(bs)
    xhat = (x - mean) * rstd
    if training:
        dx = _backward(dy, xhat, rstd, red, w)
    else:
        dx = dy * w * rstd
    return dx, (dy * xhat).sum(axis=red), dy.sum(axis=red)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """LN oracle: (y, mean, rstd); mean/rstd have the leading shape."""
    x = _f64(x)
    k = len(tuple(normalized_shape))
    axes = tuple(range(x.ndim - k, x.ndim))
    xhat, mean, rstd = _normalize(x, axes, eps)
    y = xhat
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    lead = x.shape[:x.ndim - k]
    return y, mean.reshape(lead), rstd.reshape(lead)


def layer_norm_backward(dy, x, mean, rstd, weight=None, normalized_shape=None, rms=False):
    dy, x = _f64(dy), _f64(x)
    k = x.ndim - np.ndim(rstd)
    axes = tuple(range(x.ndim - k, x.ndim))
    lead = tuple(range(x.ndim - k))
    shp = x.shape[:x.ndim - k] + (1,) * k
    mean, rstd = _f64(mean).reshape(shp), _f64(rstd).reshape(shp)
    xhat = (x - mean) * rstd
    w = np.ones(x.shape[x.ndim - k:]) if weight is None else _f64(weight)
    dx = _backward(dy, xhat, rstd, axes, w, rms=rms)
    return dx, (dy * xhat).sum(axis=lead), dy.sum(axis=lead)


def rms_norm(x, normalized_shape, weight=None, eps=None):
    """RMSNorm oracle: (y, rstd); eps=None means finfo(x.dtype).eps, as torch."""
    if eps is None:
        eps = float(np.finfo(np.asarray(x).dtype).eps)
    x = _f64(x)
    k = len(tuple(normalized_shape))
    axes = tuple(range(x.ndim - k, x.ndim))
    xhat, _, rstd = _normalize(x, axes, eps, rms=True)
    y = xhat if weight is None else xhat * _f64(weight)
    return y, rstd.reshape(x.shape[:x.ndim - k])


def rms_norm_backward(dy, x, rstd, weight=None):
    dx, dw, _ = layer_norm_backward(dy, x, np.zeros(np.shape(rstd)), rstd, weight, rms=True)
    return dx, dw


def _grouped(x, num_groups, axis):
    """Move channels to axis 1 and split them: (N, G, C/G, *spatial)."""
    x = np.moveaxis(x, axis, 1)
    n, c = x.shape[:2]
    return x.reshape((n, num_groups, c // num_groups) + x.shape[2:])


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, axis=1):
    """GN oracle: (y, mean, rstd) with mean/rstd of shape (N, G)."""
    x = _f64(x)
    axis = axis % x.ndim
    xg = _grouped(x, num_groups, axis)
    axes = tuple(range(2, xg.ndim))
    xhat, mean, rstd = _normalize(xg, axes, eps)
    c = x.shape[axis]
    y = np.moveaxis(xhat.reshape((x.shape[0], c) + xg.shape[3:]), 1, axis)
    bs = _bshape(x.ndim, axis)
    if weight is not None:
        y = y * _f64(weight).reshape(bs)
    if bias is not None:
        y = y + _f64(bias).reshape(bs)
    return y, mean.reshape(x.shape[0], num_groups), rstd.reshape(x.shape[0], num_groups)


def group_norm_backward(dy, x, mean, rstd, weight=None, num_groups=1, axis=1):
    dy, x = _f64(dy), _f64(x)
    axis = axis % x.ndim
    c = x.shape[axis]
    xg, dyg = _grouped(x, num_groups, axis), _grouped(dy, num_groups, axis)
    extra = (1,) * (xg.ndim - 2)
    mean = _f64(mean).reshape(mean.shape + extra)
    rstd = _f64(rstd).reshape(rstd.shape + extra)
    xhat = (xg - mean) * rstd
    w = np.ones(c) if weight is None else _f64(weight)
    wg = w.reshape((1, num_groups, c // num_groups) + (1,) * (xg.ndim - 3))
    dxg = _backward(dyg, xhat, rstd, tuple(range(2, xg.ndim)), wg)
    dx = np.moveaxis(dxg.reshape((x.shape[0], c) + xg.shape[3:]), 1, axis)
    red = (0,) + tuple(range(3, xg.ndim))
    dw = (dyg * xhat).sum(axis=red).reshape(c)
    db = dyg.sum(axis=red).reshape(c)
    return dx, dw, db


def instance_norm(x, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, axis=1,
                  num_batches_tracked=None):
    """IN oracle: (y, mean, rstd) with mean/rstd of shape (N, C) (or (C,) from running stats)."""
    x = _f64(x)
    axis = axis % x.ndim
    bs = _bshape(x.ndim, axis)
    red = tuple(i for i in range(1, x.ndim) if i != axis)
    nc_shape = [1] * x.ndim
    nc_shape[0] = x.shape[0]
    nc_shape[axis] = x.shape[axis]
    if use_input_stats:
        mean = x.mean(axis=red)
        var = x.var(axis=red)
        if running_mean is not None:
            count = int(np.prod([x.shape[i] for i in red]))
            _update_running(running_mean, running_var, mean.mean(axis=0),
                            (var * count / (count - 1)).mean(axis=0), momentum,
                            num_batches_tracked)
        rstd = 1.0 / np.sqrt(var + eps)
        y = (x - mean.reshape(nc_shape)) * rstd.reshape(nc_shape)
    else:
        mean, var = _f64(running_mean), _f64(running_var)
        rstd = 1.0 / np.sqrt(var + eps)
        y = (x - mean.reshape(bs)) * rstd.reshape(bs)
    if weight is not None:
        y = y * _f64(weight).reshape(bs)
    if bias is not None:
        y = y + _f64(bias).reshape(bs)
    return y, mean, rstd


def instance_norm_backward(dy, x, mean, rstd, weight=None, use_input_stats=True, axis=1):
    dy, x = _f64(dy), _f64(x)
    axis = axis % x.ndim
    bs = _bshape(x.ndim, axis)
    w = np.ones(x.shape[axis]).reshape(bs) if weight is None else _f64(weight).reshape(bs)
    red = tuple(i for i in range(1, x.ndim) if i != axis)
    if use_input_stats:
        nc_shape = [1] * x.ndim
        nc_shape[0] = x.shape[0]
        nc_shape[axis] = x.shape[axis]
        mean, rstd = _f64(mean).reshape(nc_shape), _f64(rstd).reshape(nc_shape)
        xhat = (x - mean) * rstd
        dx = _backward(dy, xhat, rstd, red, w)
    else:
        mean, rstd = _f64(mean).reshape(bs), _f64(rstd).reshape(bs)
        xhat = (x - mean) * rstd
        dx = dy * w * rstd
    red_all = (0,) + red
    return dx, (dy * xhat).sum(axis=red_all), dy.sum(axis=red_all)


# ----------------------------------------------------------------------------------------
# Kernel twins: the "numpy" backend. Same names, arguments and outputs as fastnorm._numba.
# ----------------------------------------------------------------------------------------


def _moments(x64, axes):
    """Mean and M2 of float64 ``x64`` over ``axes`` (kept as size-1 dims), as the kernels
    compute them: two-pass, the mean corrected by the mean deviation from it (so that a
    constant slice's mean is exactly that constant: a rounded sum of float64 copies is not);
    where a sum overflowed on finite data (values near float64's largest), again on the
    slice scaled by a power of two (exact), then scaled back."""
    add = np.add.reduce    # x.mean() is add.reduce / n behind ~3 us of Python per call
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        m = add(x64, axis=axes, keepdims=True)
        n = x64.size // m.size if m.size else 0
        m = m / n
        xc = x64 - m
        mean = m + add(xc, axis=axes, keepdims=True) / n
        m2 = add(xc * xc, axis=axes, keepdims=True)
        if math.isfinite(add(mean + m2, axis=None)):
            return mean, m2                    # every statistic finite: the common case
        mean = np.where(np.isfinite(m), mean, m)
        redo = ~(np.isfinite(mean) & np.isfinite(m2))
        if redo.any():
            amax = np.abs(x64).max(axis=axes, keepdims=True)
            redo &= np.isfinite(amax)          # inf/NaN data keeps NumPy's answer
            sc = np.ldexp(1.0, -np.frexp(np.where(redo, amax, 1.0))[1])
            xs = x64 * sc
            ms = xs.mean(axis=axes, keepdims=True)
            ds = xs - ms
            mean = np.where(redo, ms / sc, mean)
            m2 = np.where(redo, (ds * ds).sum(axis=axes, keepdims=True) / sc / sc, m2)
    return mean, m2


def _sumsq(x64, axes):
    """Sum of squares over ``axes`` (kept), scaled by a power of two where it overflowed on
    finite data (RMS norm's statistic)."""
    with np.errstate(over="ignore"):
        ss = (x64 * x64).sum(axis=axes, keepdims=True)
        redo = ~np.isfinite(ss)
        if redo.any():
            amax = np.abs(x64).max(axis=axes, keepdims=True)
            redo &= np.isfinite(amax)
            sc = np.ldexp(1.0, -np.frexp(np.where(redo, amax, 1.0))[1])
            xs = x64 * sc
            ss = np.where(redo, (xs * xs).sum(axis=axes, keepdims=True) / sc / sc, ss)
    return ss


def _write_affine(xhat, weight, bias, y):
    """y[...] = xhat * weight + bias, weight/bias (per last axis) optional."""
    if weight is not None:
        xhat = xhat * weight
    if bias is not None:
        xhat = xhat + bias
    y[...] = xhat


def rows_fwd(x, weight, bias, eps, rms, y, mean, rstd):
    # x, y: (R, M)   weight, bias: (M,) or None   mean, rstd: (R,)
    x64 = x.astype(np.float64)
    M = x.shape[1]
    if rms:
        mu, var = np.zeros((x.shape[0], 1)), _sumsq(x64, (1,)) / M
    else:
        mu, m2 = _moments(x64, (1,))
        var = m2 / M
    r = 1.0 / np.sqrt(var + eps)
    _write_affine((x64 - mu) * r, weight, bias, y)
    mean[...] = mu[:, 0]
    rstd[...] = r[:, 0]


def rows_fwd_grouped(x, weight, bias, eps, y, mean, rstd):
    # x, y: (R, K, S)   weight, bias: (G, K) or None   mean, rstd: (R,)
    R, K, S = x.shape
    x64 = x.astype(np.float64)
    mu, m2 = _moments(x64, (1, 2))
    r = 1.0 / np.sqrt(m2 / (K * S) + eps)
    out = (x64 - mu) * r
    mu, r = mu[:, 0, 0], r[:, 0, 0]
    rows = np.arange(R) % (1 if weight is None and bias is None else
                           (weight if weight is not None else bias).shape[0])
    if weight is not None:
        out *= weight[rows][:, :, None]
    if bias is not None:
        out += bias[rows][:, :, None]
    y[...] = out
    mean[...] = mu
    rstd[...] = r


def rows_bwd(dy, x, mean, rstd, weight, rms, dx, dw_part, db_part):
    # dy, x, dx: (R, M)   mean, rstd: (R,)   dw_part, db_part: (B, M) float64 or None
    dy64 = dy.astype(np.float64)
    xhat = (x.astype(np.float64) - mean.astype(np.float64)[:, None]) * rstd[:, None]
    g = dy64 if weight is None else dy64 * weight
    t = g - xhat * (g * xhat).mean(axis=1, keepdims=True)  # term 1 and term 3
    if not rms:
        t -= g.mean(axis=1, keepdims=True)                  # term 2
    dx[...] = t * rstd[:, None]
    parts = [p for p in (dw_part, db_part) if p is not None]
    R, B = x.shape[0], (parts[0].shape[0] if parts else 0)
    for b in range(B):
        lo, hi = b * R // B, (b + 1) * R // B
        if dw_part is not None:
            dw_part[b] = (dy64[lo:hi] * xhat[lo:hi]).sum(axis=0)
        if db_part is not None:
            db_part[b] = dy64[lo:hi].sum(axis=0)


def rows_moments(x, mean, m2):
    # x: (R, M) -> mean, m2: (R,) float64, m2 = sum of squared deviations
    mu, q = _moments(x.astype(np.float64), (1,))
    mean[...] = mu[:, 0]
    m2[...] = q[:, 0]


def rows_scale_shift(x, mean, alpha, beta, y):
    y[...] = (x.astype(np.float64) - mean[:, None]) * alpha[:, None] + beta[:, None]


def rows_dot(dy, x, mean, sum_dy, sum_dyxc):
    dy64 = dy.astype(np.float64)
    sum_dy[...] = dy64.sum(axis=1)
    sum_dyxc[...] = (dy64 * (x.astype(np.float64) - mean[:, None])).sum(axis=1)


def rows_bwd_apply(dy, x, mean, c1, c2, c3, dx):
    xc = x.astype(np.float64) - mean[:, None]
    dx[...] = c1[:, None] * dy + c2[:, None] * xc + c3[:, None]


def rows_bwd_grouped(dy, x, mean, rstd, weight, dx, sum_dy, sum_dyxh):
    # dy, x, dx: (R, K, S)   mean, rstd: (R,)   weight: (G, K) or None   sums: (R, K)
    R, K, S = x.shape
    dy64 = dy.astype(np.float64)
    xhat = (x.astype(np.float64) - mean[:, None, None]) * rstd[:, None, None]
    w = np.ones((R, K)) if weight is None else weight[np.arange(R) % weight.shape[0]]
    g = dy64 * w[:, :, None]
    mean_g = g.mean(axis=(1, 2), keepdims=True)
    mean_gx = (g * xhat).mean(axis=(1, 2), keepdims=True)
    t = g - mean_g - xhat * mean_gx
    dx[...] = t * rstd[:, None, None]
    sum_dy[...] = dy64.sum(axis=2)
    sum_dyxh[...] = (dy64 * xhat).sum(axis=2)


def channels_moments(x, mean, m2):
    # x: (P, Q, C) -> mean, m2: (P, C) float64
    mu, q = _moments(x.astype(np.float64), (1,))
    mean[...] = mu[:, 0]
    m2[...] = q[:, 0]


def channels_scale_shift(x, mean, alpha, beta, y):
    y[...] = (x.astype(np.float64) - mean[:, None, :]) * alpha[:, None, :] + beta[:, None, :]


def channels_dot(dy, x, mean, sum_dy, sum_dyxc):
    dy64 = dy.astype(np.float64)
    sum_dy[...] = dy64.sum(axis=1)
    sum_dyxc[...] = (dy64 * (x.astype(np.float64) - mean[:, None, :])).sum(axis=1)


def channels_bwd_apply(dy, x, mean, c1, c2, c3, dx):
    xc = x.astype(np.float64) - mean[:, None, :]
    dx[...] = c1[:, None, :] * dy + c2[:, None, :] * xc + c3[:, None, :]


def channels_eval(x, mean, var, weight, bias, eps, y):
    a = 1.0 / np.sqrt(np.asarray(var, np.float64) + eps)
    if weight is not None:
        a = a * weight
    t = (x.astype(np.float64) - mean) * a
    y[...] = t if bias is None else t + bias


def channels_fwd_grouped(x, weight, bias, eps, y, mean, rstd):
    # x, y: (P, Q, C)   weight, bias: (C,) or None   mean, rstd: (P, G)
    P, Q, C = x.shape
    G = mean.shape[1]
    xg = x.astype(np.float64).reshape(P, Q, G, C // G)
    mu, m2 = _moments(xg, (1, 3))
    r = 1.0 / np.sqrt(m2 / (Q * (C // G)) + eps)
    _write_affine(((xg - mu) * r).reshape(P, Q, C), weight, bias, y)
    mean[...] = mu[:, 0, :, 0]
    rstd[...] = r[:, 0, :, 0]


# ----------------------------------------------------------------------------------------
# Phase kernels: the small per-unit steps between the data kernels (statistics -> per-channel
# coefficients -> apply; backward: reductions -> coefficients -> apply). A statistics "unit" is
# a row of (Pg, G): batch norm (1, C), instance norm (N, C), group norm (N, G). The apply
# kernels want per-(P', C) values, P' the outer extent of the view (batch norm rows: A, batch
# norm channels: 1, instance/group norm: N); channel c belongs to group c // cg, and unit row
# pg serves view row p' (pg = p' when Pg > 1, else 0). O(C) work: the CPU backends share these
# NumPy versions; a device backend (CUDA) registers its own with these signatures.
# ----------------------------------------------------------------------------------------


def merge_equal(mean, m2, count, out_mean, out_m2):
    # IN mean, m2 (P1, K, P2) float64, K groups of ``count`` elements each
    # OUT out_mean, out_m2 (P1, P2): Chan's merge over K (exact form for equal counts)
    add = np.add.reduce  # = .sum(axis), without its Python wrapper
    K = mean.shape[1]
    mu = add(mean, axis=1, keepdims=True) / K
    # one correction by the mean deviation: K equal means (a constant channel) give exactly
    # that mean, where their rounded sum / K may miss it by an ulp
    mu = mu + add(mean - mu, axis=1, keepdims=True) / K
    d = mean - mu
    out_m2[...] = add(m2, axis=1) + count * add(d * d, axis=1)
    out_mean[...] = mu[:, 0]


def finalize(mean, m2, count, eps, clamp, weight, bias, cg, mean_s, alpha_s, beta_s,
             mean_out, rstd_out):
    # IN unit statistics mean, m2 (Pg, G) (variance m2 / count, clamped at 0 if ``clamp``)
    #    weight, bias (C,) or None
    # OUT mean_s, alpha_s, beta_s (P', C) float64: y = (x - mean_s) * alpha_s + beta_s
    #     mean_out, rstd_out (Pg, G) in the output dtype
    var = m2 / count
    if clamp:
        var = np.maximum(var, 0.0)
    rstd = 1.0 / np.sqrt(var + eps)
    mean_c, rstd_c = (mean, rstd) if cg == 1 else (np.repeat(mean, cg, 1), np.repeat(rstd, cg, 1))
    mean_s[...] = mean_c
    alpha_s[...] = rstd_c if weight is None else rstd_c * weight
    beta_s[...] = 0.0 if bias is None else bias
    mean_out[...] = mean
    rstd_out[...] = rstd


def running_update(mean, m2, denom, keep, take, running_mean, running_var):
    # IN batch statistics mean, m2 (P, C) (variance m2 / denom), averaged over P
    # OUT running_mean, running_var (C,) in place: keep * running + take * batch
    P = mean.shape[0]
    add = np.add.reduce
    running_mean[...] = keep * running_mean + take * (add(mean, axis=0) / P)
    running_var[...] = keep * running_var + take * (add(m2 / denom, axis=0) / P)


def spread(v, cg, out):
    # IN v (Pg, G)   OUT out (P', C) float64: out[p, c] = v[p or 0, c // cg]
    out[...] = v if cg == 1 else np.repeat(v, cg, axis=1)


def column_sums(part, out):
    # IN part (B, M) float64   OUT out (M,): the sums over b
    out[...] = np.add.reduce(part, axis=0)


def group_sums(sdy, sdx, weight, cg, sg, sgx):
    # IN unit sums of dy and dy * (x - mean) (Pg, C), weight (C,) or None
    # OUT sg, sgx (Pg, G): sums of g = weight * dy and g * (x - mean) over each group
    wdy, wdx = (sdy, sdx) if weight is None else (weight * sdy, weight * sdx)
    Pg, G = sg.shape
    sg[...] = wdy if cg == 1 else wdy.reshape(Pg, G, cg).sum(axis=2)
    sgx[...] = wdx if cg == 1 else wdx.reshape(Pg, G, cg).sum(axis=2)


def backward_coefs(weight, rstd, sg, sgx, n, training, cg, c1, c2, c3):
    # IN rstd, sg, sgx (Pg, G); n elements per unit; weight (C,) or None
    # OUT c1, c2, c3 (P', C): dx = c1*dy + c2*(x - mean) + c3
    #     = rstd * (w*dy - sum(g)/n - xhat * sum(g*xhat)/n); eval mode (running statistics
    #     are constants): dx = w * rstd * dy
    rep = (lambda v: v) if cg == 1 else (lambda v: np.repeat(v, cg, axis=1))
    rstd_c = rep(rstd)
    c1[...] = rstd_c if weight is None else weight * rstd_c
    if training:
        c2[...] = rep(-(rstd ** 3) * sgx / n)
        c3[...] = rep(-rstd * sg / n)
    else:
        c2[...] = 0.0
        c3[...] = 0.0


def weight_grads(sdy, sdx, rstd, cg, gw, gb):
    # IN unit sums sdy, sdx (Pg, C), rstd (Pg, G)
    # OUT gw = sum_pg sdx * rstd, gb = sum_pg sdy (C,), each may be None
    if gw is not None:
        rstd_c = rstd if cg == 1 else np.repeat(rstd, cg, axis=1)
        gw[...] = np.add.reduce(sdx * rstd_c, axis=0)
    if gb is not None:
        gb[...] = np.add.reduce(sdy, axis=0)


# ----------------------------------------------------------------------------------------
# The table's keys (fastnorm._dispatch): one name per kernel, spelled the same in Python,
# Cython (``_<name>_t``), C (``fn_<name>...``) and CUDA (``_<name>_k``).
# ----------------------------------------------------------------------------------------

ROWS_FWD = "rows_fwd"
ROWS_FWD_GROUPED = "rows_fwd_grouped"
ROWS_BWD = "rows_bwd"
ROWS_BWD_GROUPED = "rows_bwd_grouped"
CHANNELS_FWD_GROUPED = "channels_fwd_grouped"
CHANNELS_EVAL = "channels_eval"          # fused eval batch norm
MOMENTS = {"rows": "rows_moments", "channels": "channels_moments"}
SCALE_SHIFT = {"rows": "rows_scale_shift", "channels": "channels_scale_shift"}
DOT = {"rows": "rows_dot", "channels": "channels_dot"}
BWD_APPLY = {"rows": "rows_bwd_apply", "channels": "channels_bwd_apply"}
MERGE_EQUAL = "merge_equal"
FINALIZE = "finalize"
RUNNING_UPDATE = "running_update"
SPREAD = "spread"
COLUMN_SUMS = "column_sums"
GROUP_SUMS = "group_sums"
BACKWARD_COEFS = "backward_coefs"
WEIGHT_GRADS = "weight_grads"

# data kernels: every backend provides each
KERNELS = (ROWS_FWD, ROWS_FWD_GROUPED, ROWS_BWD, MOMENTS["rows"], SCALE_SHIFT["rows"],
           DOT["rows"], BWD_APPLY["rows"], ROWS_BWD_GROUPED, MOMENTS["channels"],
           SCALE_SHIFT["channels"], DOT["channels"], BWD_APPLY["channels"],
           CHANNELS_FWD_GROUPED)
# phase kernels: the CPU backends share the twins above; a device backend provides its own
PHASES = (MERGE_EQUAL, FINALIZE, RUNNING_UPDATE, SPREAD, COLUMN_SUMS, GROUP_SUMS,
          BACKWARD_COEFS, WEIGHT_GRADS)
# fused kernels: a backend may provide them; fastnorm._dispatch composes the others
FUSED = (CHANNELS_EVAL,)
