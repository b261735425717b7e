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
(``sum(dim, keepdim)``, ``transpose(dim0, dim1)``, ``permute``).
"""
import contextlib
import contextvars
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
    x = _array(a)
    e = np.exp(-np.abs(x))
    y = np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(np.result_type(x, np.float16))
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
    if sorted(d % max(np.ndim(x), 1) for d in dims) != list(range(np.ndim(x))):
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
