"""The functional API: the public face of the norms. Signatures, docstrings and the call
into the bodies (``fastnorm._norms``); nothing else.

Names, argument order and defaults follow ``torch.nn.functional``; ``axis`` (the channel
axis), ``out``, ``return_stats`` and ``backend`` are keyword-only additions. An argument
whose type defines ``__fastnorm_function__`` takes the call instead (``fastnorm.Tensor``
records it on the autodiff tape), as NumPy's ``__array_function__`` lets a type take over a
NumPy function: this module imports no such type.
"""
import numpy as np

from . import _dispatch, _norms

__all__ = ["batch_norm", "batch_norm_backward", "instance_norm", "instance_norm_backward",
           "group_norm", "group_norm_backward", "layer_norm", "layer_norm_backward",
           "rms_norm", "rms_norm_backward"]


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

    y = _norms.batch_eval_fast(input, running_mean, running_var, weight, bias, training, eps,
                               axis, out, return_stats, backend)
    if y is not None:
        return y
    h = _dispatch.handler(input, weight, bias, running_mean, running_var, out, num_batches_tracked)
    if h is not None:
        return h(batch_norm, dict(
            input=input, running_mean=running_mean, running_var=running_var, weight=weight,
            bias=bias, training=training, momentum=momentum, eps=eps, axis=axis, out=out,
            return_stats=return_stats, num_batches_tracked=num_batches_tracked,
            backend=backend))
    return _norms.batch_norm(input, running_mean, running_var, weight, bias, training,
                             momentum, eps, axis=axis, out=out, return_stats=return_stats,
                             num_batches_tracked=num_batches_tracked, backend=backend)


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

    h = _dispatch.handler(grad_out, input, mean, rstd, weight)
    if h is not None:
        return h(batch_norm_backward, dict(
            grad_out=grad_out, input=input, mean=mean, rstd=rstd, weight=weight,
            training=training, axis=axis, has_bias=has_bias, backend=backend))
    return _norms.batch_norm_backward(grad_out, input, mean, rstd, weight, training, axis=axis,
                                      has_bias=has_bias, backend=backend)


# ------------------------------------------------------------------ instance / group norm

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

    h = _dispatch.handler(input, weight, bias, running_mean, running_var, out, num_batches_tracked)
    if h is not None:
        return h(instance_norm, dict(
            input=input, running_mean=running_mean, running_var=running_var, weight=weight,
            bias=bias, use_input_stats=use_input_stats, momentum=momentum, eps=eps, axis=axis,
            out=out, return_stats=return_stats, num_batches_tracked=num_batches_tracked,
            backend=backend))
    return _norms.instance_norm(input, running_mean, running_var, weight, bias,
                                use_input_stats, momentum, eps, axis=axis, out=out,
                                return_stats=return_stats,
                                num_batches_tracked=num_batches_tracked, backend=backend)


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

    h = _dispatch.handler(grad_out, input, mean, rstd, weight)
    if h is not None:
        return h(instance_norm_backward, dict(
            grad_out=grad_out, input=input, mean=mean, rstd=rstd, weight=weight,
            use_input_stats=use_input_stats, axis=axis, has_bias=has_bias, backend=backend))
    return _norms.nc_backward(grad_out, input, mean, rstd, weight, axis, has_bias, backend,
                              None, use_input_stats)


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

    h = _dispatch.handler(input, weight, bias, out)
    if h is not None:
        return h(group_norm, dict(input=input, num_groups=num_groups, weight=weight, bias=bias,
                                  eps=eps, axis=axis, out=out, return_stats=return_stats,
                                  backend=backend))
    return _norms.group_norm(input, num_groups, weight, bias, eps, axis=axis, out=out,
                             return_stats=return_stats, backend=backend)


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

    h = _dispatch.handler(grad_out, input, mean, rstd, weight)
    if h is not None:
        return h(group_norm_backward, dict(
            grad_out=grad_out, input=input, mean=mean, rstd=rstd, weight=weight,
            num_groups=num_groups, axis=axis, has_bias=has_bias, backend=backend))
    return _norms.nc_backward(grad_out, input, mean, rstd, weight, axis, has_bias, backend,
                              num_groups)


# --------------------------------------------------------------------- layer / RMS norm

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

    y = _norms.rows_fast(input, normalized_shape, weight, bias, eps, False, out, return_stats,
                         backend)
    if y is not None:
        return y
    h = _dispatch.handler(input, weight, bias, out)
    if h is not None:
        return h(layer_norm, dict(input=input, normalized_shape=normalized_shape, weight=weight,
                                  bias=bias, eps=eps, out=out, return_stats=return_stats,
                                  backend=backend))
    return _norms.rows_forward(input, normalized_shape, weight, bias, eps, False, out,
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

    h = _dispatch.handler(grad_out, input, mean, rstd, weight)
    if h is not None:
        return h(layer_norm_backward, dict(
            grad_out=grad_out, input=input, mean=mean, rstd=rstd, weight=weight,
            normalized_shape=normalized_shape, has_bias=has_bias, backend=backend))
    return _norms.rows_backward(grad_out, input, mean, rstd, weight, normalized_shape, False,
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

    if eps is None and type(input) is np.ndarray and input.dtype in _norms.FAST:
        eps = float(np.finfo(input.dtype).eps)
    y = _norms.rows_fast(input, normalized_shape, weight, None, eps, True, out, return_stats,
                         backend)
    if y is not None:
        return y
    h = _dispatch.handler(input, weight, out)
    if h is not None:
        return h(rms_norm, dict(input=input, normalized_shape=normalized_shape, weight=weight,
                                eps=eps, out=out, return_stats=return_stats, backend=backend))
    return _norms.rows_forward(input, normalized_shape, weight, None, eps, True, out,
                               return_stats, backend)


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

    h = _dispatch.handler(grad_out, input, rstd, weight)
    if h is not None:
        return h(rms_norm_backward, dict(grad_out=grad_out, input=input, rstd=rstd,
                                         weight=weight, normalized_shape=normalized_shape,
                                         backend=backend))
    gx, gw, _ = _norms.rows_backward(grad_out, input, None, rstd, weight, normalized_shape, True,
                                     False, backend)
    return gx, gw
