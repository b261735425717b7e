"""The autodiff tape: ``Tensor``, ``no_grad`` and the differentiable operations.

A ``Tensor`` wraps a NumPy array. Every operation on Tensors that need a gradient records
one node: its parents and a closure mapping the output gradient to the parents' gradients
(micrograd's design). ``Tensor.backward()`` walks the nodes in reverse topological order
and accumulates into the ``.grad`` of the leaves (Tensors created by the user with
``requires_grad=True``), as torch does; intermediate results keep no ``.grad``.

The norms are fastnorm's own functions (``fastnorm.batch_norm``, ...): called with a Tensor
argument they hand the call to ``Tensor.__fastnorm_function__``, which runs the array path
with ``return_stats=True`` and records the analytic ``<op>_backward``. This module imports
none of them. Running statistics stay plain ndarrays updated in place.

Element-wise operations broadcast with NumPy's rules; the gradient of a broadcast operand
is summed back to its shape. Reductions and shapes follow torch's names
(``sum(dim, keepdim)``, ``max(dim)``, ``transpose(dim0, dim1)``, ``permute``).

The operations of convolutional networks follow ``torch.nn.functional`` on NCHW input:
``conv2d``, ``max_pool2d``, ``avg_pool2d``, ``adaptive_avg_pool2d``, ``dropout``, with
``cat``, ``flatten``, indexing (``Tensor.__getitem__``), ``gelu`` and ``silu``; each has an
analytic backward.
"""
import builtins
import collections
import contextlib
import contextvars
import math
import numbers
import sys

import numpy as np

_grad_enabled = contextvars.ContextVar("fastnorm_grad_enabled", default=True)


@contextlib.contextmanager
def no_grad():
    """Context manager: operations inside it record nothing on the tape.

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> from fastnorm.autograd import no_grad
    >>> w = fn.Tensor(np.ones(3), requires_grad=True)
    >>> with no_grad():
    ...     y = w * 2
    >>> y.requires_grad
    False
    """
    token = _grad_enabled.set(False)
    try:
        yield
    finally:
        _grad_enabled.reset(token)


def is_grad_enabled():
    """True outside :func:`no_grad` blocks."""
    return _grad_enabled.get()


class Tensor:
    """An ndarray with a gradient and a place on the tape.

    Parameters
    ----------
    data : array_like
        Copied only when it is not already an ndarray. Integer data is allowed (class
        labels) but cannot require a gradient.
    requires_grad : bool
        Leaves with ``requires_grad=True`` receive ``.grad`` from :meth:`backward`.

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = fn.Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    >>> y = (x * x).sum()
    >>> y.backward()
    >>> x.grad
    array([2., 4., 6.])
    """

    # ndarray (op) Tensor defers to Tensor's reflected operator instead of broadcasting
    # the Tensor as an object array.
    __array_ufunc__ = None

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        data = np.asarray(data)
        if data.dtype.kind not in "fiub":
            raise TypeError(f"data must be a numeric array, got dtype {data.dtype}")
        if requires_grad and data.dtype.kind != "f":
            raise TypeError("requires_grad=True needs floating-point data, "
                            f"got dtype {data.dtype}")
        self.data = data
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self._parents = ()
        self._backward = None   # grad_out -> tuple of parent gradients (None: no gradient)

    # -- properties ------------------------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    ndim = property(lambda self: self.data.ndim)
    dtype = property(lambda self: self.data.dtype)
    size = property(lambda self: self.data.size)
    is_leaf = property(lambda self: self._backward is None)
    T = property(lambda self: permute(self, *range(self.ndim - 1, -1, -1)))

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        body = np.array2string(self.data, prefix="Tensor(")
        return f"Tensor({body}{', requires_grad=True' if self.requires_grad else ''})"

    def numpy(self):
        """The underlying array (no copy)."""
        return self.data

    def item(self):
        """The value of a one-element Tensor as a Python number."""
        return self.data.item()

    def detach(self):
        """A new leaf sharing the data, off the tape."""
        return Tensor(self.data)

    # -- backward --------------------------------------------------------------------------
    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` (the gradient of some scalar with respect to ``self``) may be omitted only
        when ``self`` has one element.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a Tensor that does not require grad "
                               "(no leaf with requires_grad=True led to it)")
        if grad is None:
            if self.data.size != 1:
                raise ValueError("grad must be given for a Tensor with more than one "
                                 f"element, got shape {self.shape}")
            grad = np.ones_like(self.data)
        else:
            grad = np.asarray(grad.data if isinstance(grad, Tensor) else grad)
            if grad.shape != self.shape:
                raise ValueError(f"grad must have shape {self.shape}, got {grad.shape}")
        order = _topological(self)
        grads = {id(self): grad}
        for node in reversed(order):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None:
                g = np.asarray(g, dtype=node.data.dtype)
                node.grad = g.copy() if node.grad is None else node.grad + g
                continue
            for parent, pg in zip(node._parents, node._backward(g)):
                if pg is None or not isinstance(parent, Tensor) or not parent.requires_grad:
                    continue
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg

    # -- operators -------------------------------------------------------------------------
    def __add__(self, other): return add(self, other)
    def __radd__(self, other): return add(other, self)
    def __sub__(self, other): return sub(self, other)
    def __rsub__(self, other): return sub(other, self)
    def __mul__(self, other): return mul(self, other)
    def __rmul__(self, other): return mul(other, self)
    def __truediv__(self, other): return div(self, other)
    def __rtruediv__(self, other): return div(other, self)
    def __pow__(self, other): return pow(self, other)
    def __rpow__(self, other): return pow(other, self)
    def __matmul__(self, other): return matmul(self, other)
    def __rmatmul__(self, other): return matmul(other, self)
    def __neg__(self): return neg(self)

    def sum(self, dim=None, keepdim=False): return sum(self, dim, keepdim)
    def mean(self, dim=None, keepdim=False): return mean(self, dim, keepdim)
    def reshape(self, *shape): return reshape(self, *shape)
    def transpose(self, dim0, dim1): return transpose(self, dim0, dim1)
    def permute(self, *dims): return permute(self, *dims)
    def relu(self): return relu(self)
    def sigmoid(self): return sigmoid(self)
    def tanh(self): return tanh(self)
    def exp(self): return exp(self)
    def log(self): return log(self)
    def sqrt(self): return sqrt(self)
    def log_softmax(self, dim=-1): return log_softmax(self, dim)
    def __getitem__(self, key): return getitem(self, key)
    def max(self, dim=None, keepdim=False): return max(self, dim, keepdim)
    def flatten(self, start_dim=0, end_dim=-1): return flatten(self, start_dim, end_dim)


def _topological(root):
    """Nodes reachable from root, parents before children (iterative: deep graphs are fine)."""
    order, seen, stack = [], {id(root)}, [(root, iter(root._parents))]
    while stack:
        node, parents = stack[-1]
        for p in parents:
            if isinstance(p, Tensor) and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                stack.append((p, iter(p._parents)))
                break
        else:
            stack.pop()
            order.append(node)
    return order


def _data(a):
    return a.data if isinstance(a, Tensor) else a


def _array(a):
    """Operand of an arithmetic op: Tensor data, or a number / array as an ndarray."""
    if isinstance(a, Tensor):
        return a.data
    if isinstance(a, (numbers.Number, np.ndarray, np.generic, list, tuple)):
        return a if isinstance(a, numbers.Number) else np.asarray(a)
    raise TypeError(f"operand must be a Tensor, ndarray or number, got {type(a).__name__}")


def _needs(*parents):
    return _grad_enabled.get() and any(isinstance(p, Tensor) and p.requires_grad
                                       for p in parents)


def _node(data, parents, backward):
    """Wrap an op's result; record it when a parent needs a gradient."""
    out = Tensor(data)
    if _needs(*parents):
        out.requires_grad = True
        out._parents = tuple(parents)
        out._backward = backward
    return out


def _unbroadcast(g, shape):
    """Sum a broadcast gradient back to ``shape``."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, s in enumerate(shape)
                                      if s == 1 and g.shape[i + lead] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _shape(a):
    return np.shape(_data(a))


# ------------------------------------------------------------------------- element-wise

def add(a, b):
    """``a + b`` with broadcasting."""
    x, y = _array(a), _array(b)
    sa, sb = _shape(a), _shape(b)
    return _node(x + y, (a, b), lambda g: (_unbroadcast(g, sa), _unbroadcast(g, sb)))


def sub(a, b):
    """``a - b`` with broadcasting."""
    x, y = _array(a), _array(b)
    sa, sb = _shape(a), _shape(b)
    return _node(x - y, (a, b), lambda g: (_unbroadcast(g, sa), _unbroadcast(-g, sb)))


def mul(a, b):
    """``a * b`` with broadcasting."""
    x, y = _array(a), _array(b)
    return _node(x * y, (a, b), lambda g: (_unbroadcast(g * y, np.shape(x)),
                                           _unbroadcast(g * x, np.shape(y))))


def div(a, b):
    """``a / b`` with broadcasting."""
    x, y = _array(a), _array(b)
    return _node(x / y, (a, b), lambda g: (_unbroadcast(g / y, np.shape(x)),
                                           _unbroadcast(-g * x / (y * y), np.shape(y))))


def neg(a):
    """``-a``."""
    return _node(-_array(a), (a,), lambda g: (-g,))


def pow(a, b):  # noqa: A001 (torch's name)
    """``a ** b``; the exponent may be a number or a Tensor (gradient ``a**b * log(a)``)."""
    x, p = _array(a), _array(b)
    y = x ** p

    def backward(g):
        ga = _unbroadcast(g * p * x ** (p - 1), np.shape(x))
        gb = None
        if isinstance(b, Tensor) and b.requires_grad:
            with np.errstate(divide="ignore", invalid="ignore"):
                gb = _unbroadcast(g * y * np.log(x), np.shape(p))
        return ga, gb
    return _node(y, (a, b), backward)


def exp(a):
    """``e ** a``."""
    y = np.exp(_array(a))
    return _node(y, (a,), lambda g: (g * y,))


def log(a):
    """Natural logarithm."""
    x = _array(a)
    return _node(np.log(x), (a,), lambda g: (g / x,))


def sqrt(a):
    """Square root."""
    y = np.sqrt(_array(a))
    return _node(y, (a,), lambda g: (g / (2 * y),))


def relu(a):
    """``max(a, 0)`` (gradient 0 at 0, as torch)."""
    x = _array(a)
    return _node(np.maximum(x, 0), (a,), lambda g: (g * (x > 0),))


def sigmoid(a):
    """Logistic function, computed without overflow for large ``|a|``."""
    y = _logistic(_array(a))
    return _node(y, (a,), lambda g: (g * y * (1 - y),))


def tanh(a):
    """Hyperbolic tangent."""
    y = np.tanh(_array(a))
    return _node(y, (a,), lambda g: (g * (1 - y * y),))


# ------------------------------------------------------------------------ linear algebra

def matmul(a, b):
    """``a @ b`` with NumPy's rules (1-D operands promoted, batch dims broadcast)."""
    x, y = _array(a), _array(b)
    if np.ndim(x) == 0 or np.ndim(y) == 0:
        raise ValueError("matmul operands must have at least one dimension")
    out = x @ y

    def backward(g):
        if x.ndim == 1 and y.ndim == 1:                # dot product: g is 0-d
            return g * y, g * x
        x2 = x[None, :] if x.ndim == 1 else x          # (..., n, k)
        y2 = y[:, None] if y.ndim == 1 else y          # (..., k, m)
        g2 = g
        if x.ndim == 1:
            g2 = np.expand_dims(g2, -2)
        if y.ndim == 1:
            g2 = np.expand_dims(g2, -1)                # (..., n, m)
        gx = _unbroadcast(g2 @ np.swapaxes(y2, -1, -2), x2.shape).reshape(x.shape)
        gy = _unbroadcast(np.swapaxes(x2, -1, -2) @ g2, y2.shape).reshape(y.shape)
        return gx, gy
    return _node(out, (a, b), backward)


def linear(input, weight, bias=None):
    """``input @ weight.T + bias`` (torch's layout: weight is (out_features, in_features)).

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, linear
    >>> x = Tensor(np.ones((2, 3)))
    >>> linear(x, Tensor(np.ones((4, 3))), Tensor(np.zeros(4))).shape
    (2, 4)
    """
    x, w, b = _array(input), _array(weight), None if bias is None else _array(bias)
    if np.ndim(w) != 2 or np.shape(x)[-1:] != np.shape(w)[1:]:
        raise ValueError(f"weight must have shape (out_features, {np.shape(x)[-1]}), "
                         f"got {np.shape(w)}")
    if b is not None and np.shape(b) != np.shape(w)[:1]:
        raise ValueError(f"bias must have shape ({np.shape(w)[0]},), got {np.shape(b)}")
    y = x @ w.T
    if b is not None:
        y = y + b

    def backward(g):
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        return (g @ w, g2.T @ x2, None if b is None else g2.sum(axis=0))
    return _node(y, (input, weight, bias), backward)


# ---------------------------------------------------------------------- reductions, shape

def _dims(dim, ndim):
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, numbers.Integral) else tuple(dim)
    try:
        return tuple(sorted(int(d) % ndim if -ndim <= d < ndim else _bad_dim(d, ndim)
                            for d in dims))
    except TypeError:
        raise TypeError(f"dim must be an int, a tuple of ints or None, got {dim!r}") from None


def _bad_dim(d, ndim):
    raise ValueError(f"dim must be in [{-ndim}, {ndim}), got {d}")


def sum(a, dim=None, keepdim=False):  # noqa: A001 (torch's name)
    """Sum over ``dim`` (int, tuple or None for all)."""
    x = _array(a)
    dims = _dims(dim, np.ndim(x))
    y = np.sum(x, axis=dims, keepdims=keepdim)

    def backward(g):
        if not keepdim:
            g = np.expand_dims(g, dims)
        return (np.broadcast_to(g, np.shape(x)).copy(),)
    return _node(np.asarray(y), (a,), backward)


def mean(a, dim=None, keepdim=False):
    """Mean over ``dim`` (int, tuple or None for all)."""
    x = _array(a)
    dims = _dims(dim, np.ndim(x))
    n = int(np.prod([np.shape(x)[d] for d in dims]))
    y = np.mean(x, axis=dims, keepdims=keepdim)

    def backward(g):
        if not keepdim:
            g = np.expand_dims(g, dims)
        return (np.broadcast_to(g / n, np.shape(x)).copy(),)
    return _node(np.asarray(y), (a,), backward)


def reshape(a, *shape):
    """Same data in a new shape (``-1`` allowed once)."""
    if len(shape) == 1 and not isinstance(shape[0], numbers.Integral):
        shape = tuple(shape[0])
    x = _array(a)
    return _node(np.reshape(x, shape), (a,), lambda g: (g.reshape(np.shape(x)),))


def permute(a, *dims):
    """Reorder the dimensions (torch's ``permute``; ``T`` reverses them)."""
    if len(dims) == 1 and not isinstance(dims[0], numbers.Integral):
        dims = tuple(dims[0])
    x = _array(a)
    if sorted(d % builtins.max(np.ndim(x), 1) for d in dims) != list(range(np.ndim(x))):
        raise ValueError(f"dims must be a permutation of range({np.ndim(x)}), got {dims}")
    inv = np.argsort([d % np.ndim(x) for d in dims])
    return _node(np.transpose(x, dims), (a,), lambda g: (np.transpose(g, inv),))


def transpose(a, dim0, dim1):
    """Swap two dimensions (torch's ``transpose``)."""
    n = np.ndim(_array(a))
    dims = list(range(n))
    d0, d1 = _dims(dim0, n)[0], _dims(dim1, n)[0]
    dims[d0], dims[d1] = dims[d1], dims[d0]
    return permute(a, *dims)


# ---------------------------------------------------------------------------- losses

def log_softmax(a, dim=-1):
    """``a - logsumexp(a, dim)``, shifted by the maximum (no overflow)."""
    x = _array(a)
    m = np.max(x, axis=dim, keepdims=True)
    z = x - m
    y = z - np.log(np.exp(z).sum(axis=dim, keepdims=True))
    return _node(y, (a,), lambda g: (g - np.exp(y) * g.sum(axis=dim, keepdims=True),))


def _reduce(loss, reduction):
    if reduction == "mean":
        return mean(loss)
    if reduction == "sum":
        return sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def cross_entropy(input, target, reduction="mean"):
    """Cross-entropy of logits ``input`` (N, C) against class indices ``target`` (N,).

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, cross_entropy
    >>> logits = Tensor(np.zeros((2, 4)), requires_grad=True)
    >>> round(cross_entropy(logits, np.array([0, 3])).item(), 6)  # log(4)
    1.386294
    """
    x, t = _array(input), np.asarray(_data(target))
    if np.ndim(x) != 2:
        raise ValueError(f"input must be (N, C) logits, got shape {np.shape(x)}")
    if t.shape != x.shape[:1] or t.dtype.kind not in "iu":
        raise ValueError(f"target must be ({x.shape[0]},) integer class indices, "
                         f"got shape {t.shape} and dtype {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= x.shape[1]):
        raise ValueError(f"target must hold class indices in [0, {x.shape[1]})")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    rows = np.arange(x.shape[0])
    logp = log_softmax(input, dim=1)
    lp = _array(logp)
    picked = -lp[rows, t]

    def backward(g):            # d(-logp[n, t_n]) / d logp
        gl = np.zeros_like(lp)
        gl[rows, t] = -g
        return (gl,)
    return _reduce(_node(picked, (logp,), backward), reduction)


def mse_loss(input, target, reduction="mean"):
    """Mean squared error ``(input - target) ** 2``, reduced as torch."""
    if _shape(input) != _shape(target):
        raise ValueError(f"target must have the input's shape {_shape(input)}, "
                         f"got {_shape(target)}")
    d = sub(input, target)
    return _reduce(mul(d, d), reduction)


# ------------------------------------------------------------------ activations (GELU, SiLU)

def _logistic(x):
    """1 / (1 + e**-x) without overflow, in x's float dtype (float16 or better)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(np.result_type(x, np.float16))


def gelu(input, approximate="none"):
    """Gaussian error linear unit ``x * Phi(x)``, torch's ``F.gelu``.

    ``approximate="tanh"`` is the tanh form ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715
    x**3)))``; ``"none"`` uses the exact normal CDF (libm's erf, compiled by Numba).

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, gelu
    >>> gelu(Tensor(np.array([-1.0, 0.0, 2.0]))).data.round(4)
    array([-0.1587,  0.    ,  1.9545])
    """
    x = np.asarray(_array(input))
    if approximate == "none":
        from ._numba.elementwise import erf
        cdf = 0.5 * (1.0 + erf(x * (1 / math.sqrt(2))).astype(x.dtype, copy=False))

        def erf_slope():   # Phi(x) + x phi(x)
            return cdf + x * (np.exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi)))
        return _node(x * cdf, (input,), lambda g: (g * erf_slope(),))
    if approximate == "tanh":
        k, c = math.sqrt(2 / math.pi), 0.044715
        t = np.tanh(k * (x + c * x * x * x))

        def tanh_slope():
            return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * c * x * x)
        return _node(0.5 * x * (1 + t), (input,), lambda g: (g * tanh_slope(),))
    raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")


def silu(input):
    """``x * sigmoid(x)`` (swish), torch's ``F.silu``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, silu
    >>> silu(Tensor(np.array([-1.0, 0.0, 2.0]))).data.round(4)
    array([-0.2689,  0.    ,  1.7616])
    """
    x = _array(input)
    s = _logistic(x)
    return _node(x * s, (input,), lambda g: (g * (s * (1 + x * (1 - s))),))


# ------------------------------------------------------------- indexing, joining, max

def _index(key):
    """A __getitem__ key with Tensors replaced by their arrays."""
    if isinstance(key, tuple):
        return tuple(_data(k) for k in key)
    return _data(key)


def getitem(a, key):
    """``a[key]`` with NumPy's indexing rules (basic and advanced) on the tape.

    The gradient scatters back into a zero array of a's shape; an integer index array that
    picks an element twice adds both gradients (``numpy.add.at``).

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor
    >>> x = Tensor(np.arange(4.0), requires_grad=True)
    >>> x[np.array([0, 0, 3])].sum().backward()
    >>> x.grad
    array([2., 0., 0., 1.])
    """
    x = _array(a)
    key = _index(key)
    y = x[key]
    parts = key if isinstance(key, tuple) else (key,)
    # an integer index array may pick an element twice; slices, ints and masks cannot
    repeats = any(not isinstance(k, (slice, numbers.Integral, type(None), type(Ellipsis)))
                  and np.asarray(k).dtype.kind != "b" for k in parts)

    def backward(g):
        gx = np.zeros(x.shape, np.result_type(x.dtype, g.dtype))
        if repeats:
            np.add.at(gx, key, g)
        else:
            gx[key] = g
        return (gx,)
    return _node(np.asarray(y), (a,), backward)


def cat(tensors, dim=0):
    """Join Tensors (or arrays) along an existing dimension, torch's ``cat``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, cat
    >>> cat([Tensor(np.ones((2, 3))), Tensor(np.zeros((1, 3)))]).shape
    (3, 3)
    """
    if isinstance(tensors, (Tensor, np.ndarray)) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"tensors must be a sequence of Tensors, got {type(tensors).__name__}")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors must not be empty")
    arrays = [np.asarray(_array(t)) for t in tensors]
    if any(a.ndim == 0 or a.ndim != arrays[0].ndim for a in arrays):
        raise ValueError("tensors must all have the same number of dimensions (at least 1), "
                         f"got shapes {[a.shape for a in arrays]}")
    d = _dims(dim, arrays[0].ndim)[0]
    for i, a in enumerate(arrays):
        if a.shape[:d] + a.shape[d + 1:] != arrays[0].shape[:d] + arrays[0].shape[d + 1:]:
            raise ValueError(f"tensors[{i}] has shape {a.shape}; sizes must match "
                             f"{arrays[0].shape} except in dimension {d}")
    ends = np.cumsum([a.shape[d] for a in arrays])[:-1]
    return _node(np.concatenate(arrays, axis=d), tuple(tensors),
                 lambda g: tuple(np.split(g, ends, axis=d)))


MaxResult = collections.namedtuple("MaxResult", ["values", "indices"])
MaxResult.__doc__ = "``max(input, dim)``'s result: values (on the tape) and int64 indices."


def max(input, dim=None, keepdim=False):  # noqa: A001 (torch's name)
    """Largest element, torch's semantics.

    ``max(x)`` is a 0-d Tensor whose gradient is shared evenly among the elements that tie
    for the maximum; ``max(x, dim)`` returns ``(values, indices)`` (a named tuple) where the
    index is the first maximum along ``dim`` and the gradient flows to that element alone.
    NaN is the maximum wherever it occurs, as in torch.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, max
    >>> values, indices = max(Tensor(np.array([[1.0, 5.0], [7.0, 2.0]])), dim=1)
    >>> values.data, indices.data
    (array([5., 7.]), array([1, 0]))
    """
    x = _array(input)
    if dim is None:
        if np.size(x) == 0:
            raise ValueError("max() of an empty Tensor has no value: give dim")
        y = np.max(x)

        def backward(g):
            hit = (x == y) | (np.isnan(x) & np.isnan(y))
            return (g * hit / np.count_nonzero(hit),)
        return _node(np.asarray(y), (input,), backward)
    if not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int or None, got {dim!r}")
    d = _dims(dim, np.ndim(x))[0]
    if np.shape(x)[d] == 0:
        raise ValueError(f"max() over dimension {d} of size 0")
    idx = np.expand_dims(np.argmax(x, axis=d), d)     # argmax: first maximum, NaN wins
    values = np.take_along_axis(x, idx, axis=d)

    def backward(g):
        gx = np.zeros(np.shape(x), np.result_type(x, g))
        np.put_along_axis(gx, idx, g if keepdim else np.expand_dims(g, d), axis=d)
        return (gx,)
    indices = idx.astype(np.int64)
    if not keepdim:
        values, indices = values.squeeze(d), indices.squeeze(d)
    return MaxResult(_node(values, (input,), backward), Tensor(indices))


def flatten(input, start_dim=0, end_dim=-1):
    """Merge dimensions ``start_dim..end_dim`` into one, torch's ``flatten``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, flatten
    >>> flatten(Tensor(np.zeros((2, 3, 4, 5))), 1).shape
    (2, 60)
    """
    shape = _shape(input)
    if not shape:
        return reshape(input, 1)
    s, e = _dims(start_dim, len(shape))[0], _dims(end_dim, len(shape))[0]
    if s > e:
        raise ValueError(f"flatten() has invalid args: start_dim {start_dim} cannot come "
                         f"after end_dim {end_dim}")
    return reshape(input, shape[:s] + (int(np.prod(shape[s:e + 1])),) + shape[e + 1:])


# ---------------------------------------------------------------------------- dropout

_dropout_rng = np.random.default_rng()


def manual_seed(seed):
    """Seed the generator that :func:`dropout` uses when it is given no ``rng``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, dropout, manual_seed
    >>> manual_seed(0); a = dropout(Tensor(np.ones(8))).data
    >>> manual_seed(0); b = dropout(Tensor(np.ones(8))).data
    >>> bool((a == b).all())
    True
    """
    global _dropout_rng
    _dropout_rng = np.random.default_rng(seed)


def dropout(input, p=0.5, training=True, *, rng=None):
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    Parameters
    ----------
    input : Tensor or ndarray
    p : float in [0, 1]
    training : bool
        False returns ``input`` unchanged (as torch's ``F.dropout``).
    rng : numpy.random.Generator, optional
        Source of the mask; default the module's generator (see :func:`manual_seed`).

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, dropout
    >>> y = dropout(Tensor(np.ones(6)), 0.5, rng=np.random.default_rng(0)).data
    >>> sorted(set(y.tolist()))
    [0.0, 2.0]
    """
    if not isinstance(p, numbers.Real) or not 0 <= p <= 1:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p!r}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None, "
                        f"got {type(rng).__name__}")
    x = _array(input)
    if not training or p == 0:
        return input if isinstance(input, Tensor) else Tensor(x)
    keep = (_dropout_rng if rng is None else rng).random(np.shape(x)) >= p
    mask = (keep * (0.0 if p == 1 else 1 / (1 - p))).astype(np.result_type(x, np.float16))
    return _node(x * mask, (input,), lambda g: (g * mask,))


# --------------------------------------------------------- convolution and pooling (2-D)
#
# One im2col helper: _windows(x) is a (N, C, OH, OW, kh, kw) strided view of the padded
# input (sliding_window_view; no copy beyond the padding), _col2im its adjoint (the sum of
# each window's gradient back onto the input, kh*kw strided adds). Convolution copies the
# windows once into columns and makes one BLAS matmul (batched over groups); pooling
# reduces over the windows' last two axes.

def _pair(value, name, low):
    """torch's int-or-pair argument as two ints >= low."""
    v = (value, value) if isinstance(value, numbers.Integral) else value
    if not (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(e, numbers.Integral) and e >= low for e in v)):
        raise ValueError(f"{name} must be an int >= {low} or a pair of them, got {value!r}")
    return int(v[0]), int(v[1])


def _image(x, what):
    """x as (N, C, H, W): 3-D (C, H, W) input is a batch of one, as in torch."""
    if np.ndim(x) not in (3, 4):
        raise ValueError(f"{what} expects 3-D (C, H, W) or 4-D (N, C, H, W) input, "
                         f"got shape {np.shape(x)}")
    return np.ndim(x) == 3


def _unbatched(f):
    """Run the 4-D op ``f`` on a 3-D input as a batch of one (on the tape)."""
    def wrapper(input, *args, **kwargs):
        if _image(_array(input), f.__name__):
            out = f(reshape(input, (1,) + _shape(input)), *args, **kwargs)
            if isinstance(out, tuple):
                return (reshape(out[0], out[0].shape[1:]), out[1][0])
            return reshape(out, out.shape[1:])
        return f(input, *args, **kwargs)
    wrapper.__name__, wrapper.__qualname__ = f.__name__, f.__qualname__
    wrapper.__doc__, wrapper.__wrapped__ = f.__doc__, f
    return wrapper


def _spatial(ndim, axes, rows, cols):
    """Index tuple putting the slices rows, cols on the two spatial axes."""
    idx = [slice(None)] * ndim
    idx[axes[0]], idx[axes[1]] = rows, cols
    return tuple(idx)


def _windows(x, kernel, stride, dilation, pads, fill=0, axes=(2, 3)):
    """View of x padded by pads ((top, bottom), (left, right)) on its spatial ``axes``,
    one window per output position, the window's (kh, kw) last: NCHW x gives
    (N, C, OH, OW, kh, kw), NHWC x (axes 1, 2) gives (N, OH, OW, C, kh, kw)."""
    (pt, pb), (pl, pr) = pads
    H, W = x.shape[axes[0]], x.shape[axes[1]]
    if pt or pb or pl or pr:
        shape = list(x.shape)
        shape[axes[0]] += pt + pb
        shape[axes[1]] += pl + pr
        xp = np.full(shape, fill, x.dtype)
        xp[_spatial(x.ndim, axes, slice(pt, pt + H), slice(pl, pl + W))] = x
    else:
        xp = x
    extent = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
    v = np.lib.stride_tricks.sliding_window_view(xp, extent, axis=axes)
    return v[_spatial(x.ndim, axes, slice(None, None, stride[0]), slice(None, None, stride[1]))
             + (slice(None, None, dilation[0]), slice(None, None, dilation[1]))]


def _col2im(gwin, shape, stride, dilation, pads, axes=(2, 3)):
    """Adjoint of _windows: gwin (a window per output position, (kh, kw) last) summed back
    onto an array of ``shape``."""
    (pt, pb), (pl, pr) = pads
    (sh, sw), (dh, dw) = stride, dilation
    OH, OW = gwin.shape[axes[0]], gwin.shape[axes[1]]
    kh, kw = gwin.shape[-2:]
    padded = list(shape)
    padded[axes[0]] += pt + pb
    padded[axes[1]] += pl + pr
    gp = np.zeros(padded, gwin.dtype)
    for i in range(kh):
        for j in range(kw):
            gp[_spatial(len(shape), axes, slice(i * dh, i * dh + sh * (OH - 1) + 1, sh),
                        slice(j * dw, j * dw + sw * (OW - 1) + 1, sw))] += gwin[..., i, j]
    return gp[_spatial(len(shape), axes, slice(pt, pt + shape[axes[0]]),
                       slice(pl, pl + shape[axes[1]]))]


def _out_size(size, k, s, pad, d):
    return (size + pad - d * (k - 1) - 1) // s + 1


def _conv_pads(padding, kernel, dilation, stride):
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'valid', 'same', an int or a pair, "
                             f"got {padding!r}")
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in total)    # torch puts the odd one last
    ph, pw = _pair(padding, "padding", 0)
    return (ph, ph), (pw, pw)


@_unbatched
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D cross-correlation, torch's ``F.conv2d`` (NCHW, weight (O, C/groups, kh, kw)).

    Parameters
    ----------
    input : Tensor or ndarray, (N, C, H, W) or (C, H, W)
    weight : Tensor or ndarray, (O, C // groups, kh, kw)
    bias : Tensor, ndarray or None, (O,)
    stride, dilation : int or pair, >= 1
    padding : int or pair (zeros), or 'valid' / 'same' (stride 1 only)
    groups : int dividing C and O

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, conv2d
    >>> x = Tensor(np.ones((2, 3, 5, 5)))
    >>> conv2d(x, Tensor(np.ones((4, 3, 3, 3))), padding=1).shape
    (2, 4, 5, 5)
    """
    x, w = _array(input), _array(weight)
    b = None if bias is None else _array(bias)
    if np.ndim(w) != 4:
        raise ValueError(f"weight must be 4-D (out_channels, in_channels/groups, kH, kW), "
                         f"got shape {np.shape(w)}")
    if not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    N, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    G = int(groups)
    if C % G or O % G or Cg != C // G:
        raise ValueError(f"weight of shape {w.shape} and groups={G} need an input with "
                         f"{Cg * G} channels (and out_channels divisible by groups), "
                         f"got input of shape {x.shape}")
    if b is not None and np.shape(b) != (O,):
        raise ValueError(f"bias must have shape ({O},), got {np.shape(b)}")
    stride, dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
    pads = _conv_pads(padding, (kh, kw), dilation, stride)
    OH, OW = (_out_size(n, k, s, p[0] + p[1], d) for n, k, s, p, d
              in zip((H, W), (kh, kw), stride, pads, dilation))
    if OH < 1 or OW < 1 or kh < 1 or kw < 1:
        raise ValueError(f"input of shape {x.shape} (padded by {pads}) is smaller than the "
                         f"dilated kernel {(kh, kw)} (dilation {dilation})")
    K, L, Og = Cg * kh * kw, N * OH * OW, O // G
    # Columns (G, N*OH*OW, kh*kw*C/G) cut from the input laid out channels-last: a window's
    # row (kw positions x C channels) is then one contiguous run. Measured against columns
    # cut from NCHW (runs of OW): 2.6x faster at C=8 on 4x4 images, but 2x slower at C=1,
    # where NHWC is NCHW and the copy goes in output-row order instead (a transposed view
    # of (K, L) columns, which matmul takes as it is).
    xt = x.transpose(0, 2, 3, 1)
    if not any(pads[0] + pads[1]):
        xt = np.ascontiguousarray(xt)            # free for channels-last input
    win = _windows(xt, (kh, kw), stride, dilation, pads, axes=(1, 2))  # (N, OH, OW, C, kh, kw)
    win = win.reshape(N, OH, OW, G, Cg, kh, kw)
    if C == 1 and OW > kw:                       # the one copy of the windows
        cols = win.transpose(3, 5, 6, 4, 0, 1, 2).reshape(G, K, L).transpose(0, 2, 1)
    else:
        cols = win.transpose(3, 0, 1, 2, 5, 6, 4).reshape(G, L, K)
    w3 = w.reshape(G, Og, Cg, kh, kw).transpose(0, 1, 3, 4, 2).reshape(G, Og, K)
    y = np.matmul(cols, w3.transpose(0, 2, 1))   # (G, L, O/G): one BLAS call per group
    y = y.reshape(G, N, OH, OW, Og).transpose(1, 0, 4, 2, 3).reshape(N, O, OH, OW)
    if b is not None:
        y += b.reshape(O, 1, 1)

    def backward(g):                             # g (N, O, OH, OW)
        g3 = g.reshape(N, G, Og, OH, OW).transpose(1, 0, 3, 4, 2).reshape(G, L, Og)
        gw = gb = gx = None
        if isinstance(weight, Tensor) and weight.requires_grad:
            gw = (np.matmul(g3.transpose(0, 2, 1), cols).reshape(G, Og, kh, kw, Cg)
                  .transpose(0, 1, 4, 2, 3).reshape(w.shape))
        if b is not None:
            gb = g.sum(axis=(0, 2, 3))
        if isinstance(input, Tensor) and input.requires_grad:
            # one (L, C/G) block per kernel tap, so that col2im adds contiguous runs
            # (1.8x faster than slicing taps out of (L, K) columns at C=8, 4x4 images)
            taps = w3.reshape(G, Og, kh * kw, Cg).transpose(0, 2, 1, 3)    # (G, kh*kw, O/G, C/G)
            gcols = np.matmul(g3[:, None], taps)                             # (G, kh*kw, L, C/G)
            gwin = (gcols.reshape(G, kh, kw, N, OH, OW, Cg).transpose(3, 4, 5, 0, 6, 1, 2)
                    .reshape(N, OH, OW, C, kh, kw))
            gx = _col2im(gwin, xt.shape, stride, dilation, pads, axes=(1, 2))
            gx = gx.transpose(0, 3, 1, 2)
        return gx, gw, gb
    return _node(y, (input, weight, bias), backward)


def _pool_geometry(shape, kernel_size, stride, padding, dilation, ceil_mode):
    """kernel, stride, dilation, pads (ceil mode's overhang added bottom/right), (OH, OW).

    Output sizes are torch's: ``floor`` or ``ceil`` of ``(H + 2p - d(k-1) - 1) / s + 1``,
    in ceil mode without a last window that starts in the right padding.
    """
    kernel = _pair(kernel_size, "kernel_size", 1)
    stride = kernel if stride is None or stride == () else _pair(stride, "stride", 1)
    pad, dil = _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)
    for p, k, d in zip(pad, kernel, dil):
        if p > ((k - 1) * d + 1) // 2:
            raise ValueError(f"padding should be at most half of the (dilated) kernel size, "
                             f"got padding={padding!r}, kernel_size={kernel_size!r}")
    out, pads = [], []
    for n, k, s, p, d in zip(shape[2:], kernel, stride, pad, dil):
        o = (n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (o - 1) * s >= n + p:
            o -= 1
        if o < 1:
            raise ValueError(f"input of shape {shape} is too small for kernel_size "
                             f"{kernel_size!r} with padding {padding!r}: output size {o}")
        out.append(o)
        pads.append((p, p + builtins.max(0, (o - 1) * s + d * (k - 1) + 1 - (n + 2 * p))))
    return kernel, stride, dil, tuple(pads), tuple(out)


@_unbatched
def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Maximum over windows, torch's ``F.max_pool2d`` (padding is -inf).

    The gradient goes to the first maximal element of each window (NaN counts as the
    maximum). ``return_indices=True`` also returns the flat ``h * W + w`` positions in the
    input of each maximum (int64 Tensor), as torch.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, max_pool2d
    >>> max_pool2d(Tensor(np.arange(16.0).reshape(1, 1, 4, 4)), 2).data
    array([[[[ 5.,  7.],
             [13., 15.]]]])
    """
    x = _array(input)
    kernel, stride, dil, pads, (OH, OW) = _pool_geometry(x.shape, kernel_size, stride,
                                                         padding, dilation, ceil_mode)
    lowest = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
    win = _windows(x, kernel, stride, dil, pads, fill=lowest)[:, :, :OH, :OW]
    flat = win.reshape(win.shape[:4] + (-1,))                       # (N, C, OH, OW, kh*kw)
    arg = flat.argmax(axis=-1)[..., None]
    y = np.take_along_axis(flat, arg, axis=-1)[..., 0]

    def backward(g):
        gflat = np.zeros(flat.shape, g.dtype)
        np.put_along_axis(gflat, arg, g[..., None], axis=-1)
        return (_col2im(gflat.reshape(win.shape), x.shape, stride, dil, pads),)
    out = _node(y, (input,), backward)
    if not return_indices:
        return out
    i, j = np.divmod(arg[..., 0], kernel[1])
    h = np.arange(OH)[:, None] * stride[0] - pads[0][0] + i * dil[0]
    w = np.arange(OW)[None, :] * stride[1] - pads[1][0] + j * dil[1]
    return out, Tensor((h * x.shape[3] + w).astype(np.int64))


@_unbatched
def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """Mean over windows, torch's ``F.avg_pool2d``.

    The divisor is torch's: the window clipped to the padded input (``count_include_pad``)
    or to the input itself, never counting ceil mode's overhang; ``divisor_override``
    replaces it.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, avg_pool2d
    >>> avg_pool2d(Tensor(np.arange(16.0).reshape(1, 1, 4, 4)), 2).data
    array([[[[ 2.5,  4.5],
             [10.5, 12.5]]]])
    """
    x = _array(input)
    kernel, stride, dil, pads, (OH, OW) = _pool_geometry(x.shape, kernel_size, stride,
                                                         padding, 1, ceil_mode)
    if divisor_override is not None:
        if not isinstance(divisor_override, numbers.Integral) or divisor_override < 1:
            raise ValueError(f"divisor_override must be a positive integer, "
                             f"got {divisor_override!r}")
        div = np.asarray(divisor_override, x.dtype)
    else:
        counts = []
        for n, k, s, (lo, hi), o in zip(x.shape[2:], kernel, stride, pads, (OH, OW)):
            t = np.arange(n + lo + hi)          # coordinate in the padded frame
            inside = (t < n + 2 * lo) if count_include_pad else (t >= lo) & (t < lo + n)
            counts.append(np.lib.stride_tricks.sliding_window_view(inside, k)[::s][:o]
                          .sum(axis=1))
        div = (counts[0][:, None] * counts[1][None, :]).astype(x.dtype)
    win = _windows(x, kernel, stride, dil, pads)[:, :, :OH, :OW]
    y = win.sum(axis=(4, 5)) / div

    def backward(g):
        gwin = np.broadcast_to((g / div)[..., None, None], win.shape)
        return (_col2im(gwin, x.shape, stride, dil, pads),)
    return _node(y, (input,), backward)


def _adaptive_matrix(n_in, n_out, dtype):
    """(n_out, n_in) averaging matrix of torch's bins [floor(i n/o), ceil((i+1) n/o))."""
    P = np.zeros((n_out, n_in), dtype)
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        P[i, lo:hi] = 1 / (hi - lo)
    return P


@_unbatched
def adaptive_avg_pool2d(input, output_size):
    """Average over torch's adaptive bins to an ``output_size`` (int or pair; None keeps
    that input size), torch's ``F.adaptive_avg_pool2d``.

    Computed as ``Ph @ x @ Pw.T`` with the two small averaging matrices.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm.autograd import Tensor, adaptive_avg_pool2d
    >>> adaptive_avg_pool2d(Tensor(np.arange(16.0).reshape(1, 1, 4, 4)), 1).data
    array([[[[7.5]]]])
    """
    x = _array(input)
    size = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * 2
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or a pair, got {output_size!r}")
    OH, OW = (n if o is None else o for n, o in zip(x.shape[2:], size))
    _pair((OH, OW), "output_size", 1)
    dt = np.result_type(x.dtype, np.float16)
    ph, pw = _adaptive_matrix(x.shape[2], OH, dt), _adaptive_matrix(x.shape[3], OW, dt)
    y = ph @ x @ pw.T
    return _node(y, (input,), lambda g: (ph.T @ g @ pw,))


# ------------------------------------------------------------------------------ norms
# fastnorm's functions hand a call with a Tensor argument to Tensor.__fastnorm_function__
# (defined below): the forward runs on the arrays with return_stats=True and is recorded
# with a closure calling the op's analytic backward, ``<op>_backward`` of the same module,
# with the forward's arguments of the same names. A ``*_backward`` called on Tensors runs
# on their arrays (no double backward).

_PARENTS = ("input", "weight", "bias")      # the differentiable arguments, in grad order
# forward arguments that the backward takes under the same name
_SHARED = ("training", "use_input_stats", "num_groups", "normalized_shape", "axis", "comm",
           "backend")


def _record(func, arguments):
    """Run ``func`` (a norm forward) on the arrays of ``arguments`` and record it."""
    args = {k: _data(v) for k, v in arguments.items()}
    parents = [arguments[k] for k in _PARENTS if k in arguments]
    if _needs(*parents):
        out = args.get("out")
        if out is not None and np.may_share_memory(out, args["input"]):
            raise ValueError("out must not overwrite the input while recording: "
                             "the backward pass needs the input")
    want_stats = args.pop("return_stats", False)
    y, *stats = func(**args, return_stats=True)
    fixed = {k: args[k] for k in _SHARED if k in args}
    if "bias" in args:
        fixed["has_bias"] = args["bias"] is not None
    x, w = args["input"], args.get("weight")
    module, name = sys.modules[func.__module__], func.__name__ + "_backward"

    def backward(g):   # stats: (mean, rstd), or (rstd,) for RMS norm
        return getattr(module, name)(g, x, *stats, w, **fixed)
    t = _node(y, tuple(parents), backward)
    return (t, *stats) if want_stats else t


def _norm_function(func, arguments):
    """Tensor.__fastnorm_function__: forwards go on the tape, backwards run on the arrays."""
    if func.__name__.endswith("_backward"):
        return func(**{k: _data(v) for k, v in arguments.items()})
    return _record(func, arguments)


Tensor.__fastnorm_function__ = staticmethod(_norm_function)
