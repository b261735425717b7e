"""Optimizers with torch.optim's arguments, defaults and update rules (in place, off the tape)."""
import math
import numbers

import numpy as np

from .autograd import Tensor

__all__ = ["Optimizer", "SGD", "Adam"]


def _nonneg(value, name):
    if not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


class Optimizer:
    """Holds the parameters (leaf Tensors) and their per-parameter state.

    As in torch, a parameter frozen with ``requires_grad=False`` is accepted and left alone:
    backward gives it no ``.grad``, and ``step()`` updates only parameters that have one.
    """

    def __init__(self, params):
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors, got a single Tensor")
        params = list(params)
        if not params:
            raise ValueError("params is empty: the optimizer got no parameters")
        for i, p in enumerate(params):
            if not isinstance(p, Tensor) or p.dtype.kind != "f":
                raise TypeError(f"params[{i}] must be a floating-point Tensor, got "
                                f"{type(p).__name__}"
                                + (f" of dtype {p.dtype}" if isinstance(p, Tensor) else ""))
            if not p.is_leaf:
                raise ValueError(f"params[{i}] is not a leaf Tensor (the result of an "
                                 "operation): an optimizer updates leaves only")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("params contains a parameter more than once")
        self.params = params
        self.state = [{} for _ in params]

    def zero_grad(self, set_to_none=True):
        """Clear every ``.grad`` (to None, or to zeros with ``set_to_none=False``)."""
        for p in self.params:
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    def step(self):
        raise NotImplementedError

    def _grads(self):
        """(param, state, g) for every parameter with a ``.grad``: g is the gradient, negated
        with ``maximize`` and plus ``weight_decay * p`` (L2), as both torch rules start."""
        for p, st in zip(self.params, self.state):
            if p.grad is None:
                continue
            g = -p.grad if self.maximize else p.grad
            if self.weight_decay:
                g = g + self.weight_decay * p.data
            yield p, st, g


class SGD(Optimizer):
    """Stochastic gradient descent, torch's rule.

    ``g = grad + weight_decay * p``; with momentum ``buf = momentum * buf + (1 - dampening)
    * g`` (``buf = g`` on the first step) and ``g = buf`` (Nesterov: ``g + momentum *
    buf``); then ``p -= lr * g``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import Tensor
    >>> from fastnorm.optim import SGD
    >>> p = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    >>> opt = SGD([p], lr=0.1, momentum=0.9)
    >>> (p * p).sum().backward(); opt.step()
    >>> p.data
    array([0.8, 1.6])
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False):
        super().__init__(params)
        self.lr = _nonneg(lr, "lr")
        self.momentum = _nonneg(momentum, "momentum")
        self.dampening = float(dampening)
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        self.nesterov, self.maximize = bool(nesterov), bool(maximize)

    def step(self):
        """One update of every parameter that has a ``.grad``."""
        for p, st, g in self._grads():
            if self.momentum:
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = np.array(g, dtype=p.dtype)
                else:
                    buf *= self.momentum
                    buf += (1 - self.dampening) * g
                g = g + self.momentum * buf if self.nesterov else buf
            p.data -= (self.lr * g).astype(p.dtype, copy=False)


class Adam(Optimizer):
    """Adam (Kingma & Ba), torch's rule and defaults.

    ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g**2``, ``p -= lr/(1-b1**t) * m /
    (sqrt(v)/sqrt(1-b2**t) + eps)``; ``weight_decay`` adds ``wd * p`` to g (L2, not AdamW);
    ``amsgrad`` uses the running maximum of v.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import Tensor
    >>> from fastnorm.optim import Adam
    >>> p = Tensor(np.array([1.0, -1.0]), requires_grad=True)
    >>> opt = Adam([p], lr=0.1)
    >>> (p * p).sum().backward(); opt.step()
    >>> p.data.round(6)  # the first Adam step moves each coordinate by about lr
    array([ 0.9, -0.9])
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, maximize=False):
        super().__init__(params)
        self.lr = _nonneg(lr, "lr")
        b1, b2 = betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        self.betas = (float(b1), float(b2))
        self.eps = _nonneg(eps, "eps")
        self.weight_decay = _nonneg(weight_decay, "weight_decay")
        self.amsgrad, self.maximize = bool(amsgrad), bool(maximize)

    def step(self):
        """One update of every parameter that has a ``.grad``."""
        b1, b2 = self.betas
        for p, st, g in self._grads():
            if not st:
                st.update(step=0, exp_avg=np.zeros_like(p.data),
                          exp_avg_sq=np.zeros_like(p.data))
                if self.amsgrad:
                    st["max_exp_avg_sq"] = np.zeros_like(p.data)
            st["step"] += 1
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m += (1 - b1) * (g - m)            # torch's lerp form of b1*m + (1-b1)*g
            v *= b2
            v += (1 - b2) * g * g
            if self.amsgrad:
                np.maximum(st["max_exp_avg_sq"], v, out=st["max_exp_avg_sq"])
                v = st["max_exp_avg_sq"]
            bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
            denom = np.sqrt(v) / math.sqrt(bc2) + self.eps
            p.data -= ((self.lr / bc1) * m / denom).astype(p.dtype, copy=False)
