"""Layers: torch.nn's constructor arguments, defaults, state-dict keys and behaviour.

Parameters are :class:`Parameter` (a ``Tensor`` with ``requires_grad=True``); running
statistics are buffers, plain ndarrays updated in place by the functional API. Layers accept
Tensors (recorded on the tape) and plain ndarrays (returned as Tensors off the tape).

``state_dict()`` uses torch's key names (``0.weight``, ``1.running_mean``,
``1.num_batches_tracked``, ...), so a state dict exported from torch as NumPy arrays
(``{k: v.numpy() for k, v in m.state_dict().items()}``) loads with ``load_state_dict``.
"""
import math
import numbers
import os
import warnings
from collections import OrderedDict

import numpy as np

from . import _checks, api
from . import autograd as ag
from .autograd import Tensor, no_grad

__all__ = ["Parameter", "Module", "Sequential", "ModuleList", "ModuleDict", "Linear",
           "CosineLinear", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Dropout",
           "ReLU", "Sigmoid", "Tanh", "GELU", "SiLU", "Identity", "Flatten", "CrossEntropyLoss",
           "MSELoss",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm",
           "convert_sync_batchnorm", "InstanceNorm1d", "InstanceNorm2d",
           "InstanceNorm3d", "LayerNorm", "GroupNorm", "RMSNorm",
           "weight_norm", "remove_weight_norm", "fold_batch_norm", "fuse_linear_bn"]


def _dtype(dtype):
    dt = np.dtype(np.float32 if dtype is None else dtype)
    if dt not in (np.float16, np.float32, np.float64):
        raise TypeError(f"dtype must be float16, float32 or float64, got {dt}")
    return dt


class Parameter(Tensor):
    """A Tensor that a :class:`Module` registers as a parameter (``requires_grad=True``)."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad)

    def __repr__(self):
        return "Parameter(" + super().__repr__() + ")"


class Module:
    """Base class: registers parameters, buffers and sub-modules in assignment order.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
    >>> list(m.state_dict())
    ['0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var', \
'1.num_batches_tracked']
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_pre_hooks", [])
        object.__setattr__(self, "training", True)

    # -- registration -----------------------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError("call Module.__init__() before assigning attributes")
        for d in (self._parameters, self._buffers, self._modules):
            if name in d:
                if d is self._parameters and not (value is None or isinstance(value,
                                                                              Parameter)):
                    raise TypeError(f"cannot assign {type(value).__name__} to parameter "
                                    f"{name!r} (a Parameter or None is required)")
                if d is self._modules and not (value is None or isinstance(value, Module)):
                    raise TypeError(f"cannot assign {type(value).__name__} to module "
                                    f"{name!r}")
                d[name] = value
                return
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        for key in ("_parameters", "_buffers", "_modules"):
            d = self.__dict__.get(key)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        for d in (self._parameters, self._buffers, self._modules):
            if name in d:
                del d[name]
                return
        object.__delattr__(self, name)

    def register_parameter(self, name, param):
        """Add a parameter (or None, which state_dict() skips)."""
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"param must be a Parameter or None, got {type(param).__name__}")
        self.__dict__.pop(name, None)
        self._parameters[name] = param

    def register_buffer(self, name, array):
        """Add a buffer: an ndarray (or None) saved in state_dict() but not trained."""
        if array is not None and not isinstance(array, np.ndarray):
            raise TypeError(f"array must be a numpy.ndarray or None, got {type(array).__name__}")
        self.__dict__.pop(name, None)
        self._buffers[name] = array

    # -- traversal --------------------------------------------------------------------------
    def named_modules(self):
        """(qualified name, module) for this module ("") and every descendant."""
        for prefix, m in self._walk():
            yield prefix[:-1], m

    def _walk(self, prefix=""):
        yield prefix, self
        for name, m in self._modules.items():
            if m is not None:
                yield from m._walk(prefix + name + ".")

    def named_parameters(self):
        """(qualified name, Parameter), each parameter once."""
        seen = set()
        for prefix, m in self._walk():
            for name, p in m._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield prefix + name, p

    def parameters(self):
        """Every Parameter, each once (what an optimizer takes)."""
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for prefix, m in self._walk():
            for name, b in m._buffers.items():
                if b is not None:
                    yield prefix + name, b

    def buffers(self):
        """Every buffer (running statistics, counts), in state_dict() order."""
        return [b for _, b in self.named_buffers()]

    def named_children(self):
        """(name, module) of the direct sub-modules."""
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self):
        return [m for _, m in self.named_children()]

    def modules(self):
        return [m for _, m in self._walk()]

    def apply(self, fn):
        """Call ``fn(module)`` on every sub-module, then on self (torch's order); returns self.

        Examples
        --------
        >>> from fastnorm import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> names = []
        >>> _ = net.apply(lambda m: names.append(type(m).__name__))
        >>> names
        ['Linear', 'ReLU', 'Sequential']
        """
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    def requires_grad_(self, requires_grad=True):
        """Set ``requires_grad`` on every parameter (False freezes them); returns self.

        Frozen parameters get no ``.grad`` from backward, so the optimizers leave them alone.
        """
        for p in self.parameters():
            p.requires_grad = bool(requires_grad)
        return self

    # -- dtype ------------------------------------------------------------------------------
    def to(self, dtype):
        """Cast floating-point parameters (and their grads) and buffers to ``dtype``.

        Integer buffers (``num_batches_tracked``) keep their dtype, as in torch. Parameters
        stay the same objects (an optimizer built before still holds them; its state keeps
        the old dtype). Returns self.

        Examples
        --------
        >>> import numpy as np
        >>> from fastnorm import nn
        >>> bn = nn.BatchNorm2d(3).to(np.float64)
        >>> bn.weight.dtype, bn.running_var.dtype, bn.num_batches_tracked.dtype
        (dtype('float64'), dtype('float64'), dtype('int64'))
        """
        if dtype is None:
            raise TypeError("dtype must be float16, float32 or float64, got None")
        dt = _dtype(dtype)
        for m in self.modules():
            for p in m._parameters.values():
                if p is not None and p.dtype.kind == "f":
                    p.data = p.data.astype(dt, copy=False)
                    if p.grad is not None:
                        p.grad = p.grad.astype(dt, copy=False)
            for name, b in m._buffers.items():
                if b is not None and b.dtype.kind == "f":
                    m._buffers[name] = b.astype(dt, copy=False)
        return self

    def half(self):
        """``to(numpy.float16)``."""
        return self.to(np.float16)

    def float(self):  # noqa: A003 (torch's name)
        """``to(numpy.float32)``."""
        return self.to(np.float32)

    def double(self):
        """``to(numpy.float64)``."""
        return self.to(np.float64)

    # -- mode -------------------------------------------------------------------------------
    def train(self, mode=True):
        """Training mode (batch statistics, running stats updated); returns self."""
        if not isinstance(mode, bool):
            raise TypeError(f"mode must be a bool, got {type(mode).__name__}")
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        """Evaluation mode (running statistics used); returns self."""
        return self.train(False)

    def zero_grad(self):
        """Set every parameter's ``.grad`` to None."""
        for p in self.parameters():
            p.grad = None

    # -- call -------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        for hook in self._pre_hooks:
            hook(self)
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"  ({n}): " + repr(m).replace("\n", "\n  ")
                 for n, m in self._modules.items()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ("\n" + "\n".join(lines) + "\n)" if lines else ")")

    # -- state ------------------------------------------------------------------------------
    def state_dict(self):
        """OrderedDict {torch key: ndarray copy} of parameters and buffers.

        Order and names are torch's: per module its parameters, then its buffers, then
        its children (``"<child>.<name>"``); parameters and buffers that are None are left
        out.
        """
        sd = OrderedDict()
        for prefix, m in self._walk():
            for name, p in m._parameters.items():
                if p is not None:
                    sd[prefix + name] = p.data.copy()
            for name, b in m._buffers.items():
                if b is not None:
                    sd[prefix + name] = b.copy()
        return sd

    def _slots(self):
        """{key: (kind, module, name)} of everything state_dict() holds."""
        out = OrderedDict()
        for prefix, m in self._walk():
            for name, p in m._parameters.items():
                if p is not None:
                    out[prefix + name] = (p.data, m, name)
            for name, b in m._buffers.items():
                if b is not None:
                    out[prefix + name] = (b, m, name)
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the parameters and buffers, in place, keeping their dtypes.

        Parameters
        ----------
        state_dict : mapping {str: array_like}
            torch's key names. Values of another float dtype are cast (as torch does);
            shapes must match exactly.
        strict : bool
            Raise ``ValueError`` on missing or unexpected keys (default, as torch).

        Returns
        -------
        (missing_keys, unexpected_keys) : two lists (empty when ``strict``).

        Raises
        ------
        ValueError on missing/unexpected keys with ``strict``, and naming the key on a
        shape mismatch (nothing is copied then).

        Examples
        --------
        >>> from fastnorm import nn
        >>> a, b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
        >>> a.running_mean[:] = 5
        >>> b.load_state_dict(a.state_dict())
        ([], [])
        >>> b.running_mean
        array([5., 5., 5.], dtype=float32)
        """
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        slots = self._slots()
        missing = [k for k in slots if k not in state_dict]
        unexpected = [k for k in state_dict if k not in slots]
        if strict and (missing or unexpected):
            raise ValueError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                             f"missing keys {missing}, unexpected keys {unexpected}")
        staged = []
        for key, (dest, _, _) in slots.items():
            if key not in state_dict:
                continue
            src = np.asarray(state_dict[key])
            if src.shape != dest.shape:
                raise ValueError(f"size mismatch for {key}: copying an array of shape "
                                 f"{src.shape}, the shape in the current model is "
                                 f"{dest.shape}")
            if (src.dtype.kind == "f") != (dest.dtype.kind == "f"):
                raise TypeError(f"dtype mismatch for {key}: got {src.dtype}, "
                                f"expected {dest.dtype}")
            staged.append((dest, src))
        for dest, src in staged:
            dest[...] = src
        return missing, unexpected

    def save(self, path):
        """Write state_dict() to ``path``: ``.npz``, or ``.safetensors`` (optional extra).

        Both round-trip bit-exactly through :meth:`load`.
        """
        path = os.fspath(path)
        sd = self.state_dict()
        if path.endswith(".npz"):
            np.savez(path, **sd)
        elif path.endswith(".safetensors"):
            _safetensors().save_file(sd, path)      # state_dict() values are C-contiguous
        else:
            raise ValueError(f"path must end in .npz or .safetensors, got {path!r}")

    def load(self, path, strict=True):
        """Load a file written by :meth:`save` (strict key and shape checks); returns self."""
        path = os.fspath(path)
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                sd = {k: f[k] for k in f.files}
        elif path.endswith(".safetensors"):
            sd = _safetensors().load_file(path)
        else:
            raise ValueError(f"path must end in .npz or .safetensors, got {path!r}")
        self.load_state_dict(sd, strict=strict)
        return self


def _safetensors():
    try:
        import safetensors.numpy as st
    except ImportError:
        raise ImportError("saving to .safetensors needs the optional extra: "
                          "pip install 'fastnorm[safetensors]'") from None
    return st


def _as_tensor(x):
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray):
        return Tensor(x)
    raise TypeError(f"input must be a fastnorm.Tensor or numpy.ndarray, got {type(x).__name__}")


# ------------------------------------------------------------------------------ containers

class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ... as in torch.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    >>> net(np.ones((4, 3), np.float32)).shape
    (4, 2)
    """

    def __init__(self, *modules):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"modules[{i}] must be a Module, got {type(m).__name__}")
            self._modules[str(i)] = m

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


def _module(m, what):
    if not isinstance(m, Module):
        raise TypeError(f"{what} must be a Module, got {type(m).__name__}")
    return m


class ModuleList(Module):
    """A list of sub-modules, registered as "0", "1", ... (torch's keys); no forward.

    Examples
    --------
    >>> from fastnorm import nn
    >>> blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    >>> blocks.append(nn.ReLU())
    ModuleList(
      (0): Linear(in_features=4, out_features=4, bias=True)
      (1): Linear(in_features=4, out_features=4, bias=True)
      (2): ReLU()
    )
    >>> list(blocks.state_dict())
    ['0.weight', '0.bias', '1.weight', '1.bias']
    """

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _key(self, idx):
        if not isinstance(idx, numbers.Integral):
            raise TypeError(f"index must be an int or a slice, got {type(idx).__name__}")
        n = len(self._modules)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} is out of range for a ModuleList of {n}")
        return str(idx % n)

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(list(self._modules.values()))

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return ModuleList(list(self._modules.values())[idx])
        return self._modules[self._key(idx)]

    def __setitem__(self, idx, module):
        self._modules[self._key(idx)] = _module(module, "module")

    def __delitem__(self, idx):
        mods = list(self._modules.values())
        if isinstance(idx, slice):
            del mods[idx]
        else:
            del mods[int(self._key(idx))]
        self._modules.clear()                    # renumbered, as torch does
        self.extend(mods)

    def append(self, module):
        """Add ``module`` at the end; returns self."""
        self._modules[str(len(self._modules))] = _module(module, "module")
        return self

    def extend(self, modules):
        """Append every module of an iterable; returns self."""
        if isinstance(modules, Module) and not isinstance(modules, ModuleList):
            raise TypeError("extend() takes an iterable of Modules, got a single "
                            f"{type(modules).__name__}")
        for i, m in enumerate(list(modules)):
            _module(m, f"modules[{i}]")
            self.append(m)
        return self

    def insert(self, index, module):
        """Insert ``module`` before position ``index``."""
        mods = list(self._modules.values())
        mods.insert(index, _module(module, "module"))
        self._modules.clear()
        self.extend(mods)

    def __iadd__(self, modules):
        return self.extend(modules)


class ModuleDict(Module):
    """An ordered dict of sub-modules; keys are the state-dict prefixes (torch's).

    Examples
    --------
    >>> from fastnorm import nn
    >>> heads = nn.ModuleDict({"cls": nn.Linear(4, 3), "box": nn.Linear(4, 2)})
    >>> list(heads), list(heads.state_dict())[:2]
    (['cls', 'box'], ['cls.weight', 'cls.bias'])
    """

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key):
        return self._modules[key]

    def __setitem__(self, key, module):
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"key must be a non-empty str without '.', got {key!r}")
        self._modules[key] = _module(module, f"module {key!r}")

    def __delitem__(self, key):
        del self._modules[key]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(list(self._modules))

    def __contains__(self, key):
        return key in self._modules

    def keys(self):
        return list(self._modules.keys())

    def items(self):
        return list(self._modules.items())

    def values(self):
        return list(self._modules.values())

    def pop(self, key):
        """Remove ``key`` and return its module."""
        return self._modules.pop(key)

    def clear(self):
        self._modules.clear()

    def update(self, modules):
        """Add the (key, module) pairs of a mapping or an iterable of pairs."""
        pairs = modules.items() if hasattr(modules, "items") else modules
        for key, m in pairs:
            self[key] = m


# -------------------------------------------------------------------------- linear layers

class Linear(Module):
    """``y = x @ weight.T + bias``; torch's initialization U(-1/sqrt(in), 1/sqrt(in)).

    Parameters
    ----------
    in_features, out_features : int
    bias : bool
    dtype : float dtype, default float32
    rng : numpy Generator or seed, optional
        Source of the initial weights (torch uses its global generator).

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> lin = nn.Linear(3, 2, rng=0)
    >>> lin.weight.shape, lin(np.zeros((5, 3), np.float32)).shape
    ((2, 3), (5, 2))
    """

    def __init__(self, in_features, out_features, bias=True, dtype=None, *, rng=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        dt = _dtype(dtype)
        rng = np.random.default_rng(rng)
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        self.weight = Parameter(rng.uniform(-bound, bound, (out_features, in_features))
                                .astype(dt))
        if bias:
            self.bias = Parameter(rng.uniform(-bound, bound, out_features).astype(dt))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return ag.linear(_as_tensor(x), self.weight, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def _row_normalized(a, dim, eps):
    """a / sqrt(sum(a**2 over dim) + eps) on the tape."""
    return a / ((a * a).sum(dim, keepdim=True) + eps) ** 0.5


class CosineLinear(Module):
    """Cosine normalization (Luo et al., 2018): ``y = cos(w_j, x) = w_j·x / (|w_j| |x|)``.

    Each output is the cosine of the angle between the input row and a weight row, so it is
    bounded in [-1, 1] whatever the scale of x or w. No bias (the paper's form). ``eps`` is
    added under both square roots so a zero row gives 0, not NaN.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> layer = nn.CosineLinear(3, 2, rng=0)
    >>> y = layer(np.array([[1.0, 2.0, 3.0]], np.float32)).data
    >>> bool(np.all(np.abs(y) <= 1))
    True
    """

    def __init__(self, in_features, out_features, eps=1e-8, dtype=None, *, rng=None):
        super().__init__()
        lin = Linear(in_features, out_features, bias=False, dtype=dtype, rng=rng)
        self.in_features, self.out_features, self.eps = lin.in_features, lin.out_features, eps
        self.weight = lin.weight

    def forward(self, x):
        x = _as_tensor(x)
        return ag.linear(_row_normalized(x, -1, self.eps),
                         _row_normalized(self.weight, 1, self.eps))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ----------------------------------------------------------------- convolution and pooling

def _pair(value, name, low):
    """torch's int-or-pair argument as a tuple of two ints >= low."""
    v = (value, value) if isinstance(value, numbers.Integral) else value
    if not (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(e, numbers.Integral) and e >= low for e in v)):
        raise ValueError(f"{name} must be an int >= {low} or a pair of them, got {value!r}")
    return int(v[0]), int(v[1])


class Conv2d(Module):
    """2-D convolution, torch's ``Conv2d`` (arguments, defaults, init and state-dict keys).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, dilation : int or pair
    padding : int, pair, 'valid' or 'same' (stride 1)
    groups : int dividing in_channels and out_channels
    bias : bool
    padding_mode : 'zeros'
        The only mode implemented (torch also has 'reflect', 'replicate', 'circular').
    dtype : float dtype, default float32
    rng : numpy Generator or seed, optional (keyword-only)
        Source of the initial weights: torch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
        ``fan_in = in_channels / groups * kh * kw``, weight first, then bias.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> conv = nn.Conv2d(1, 8, 3, padding=1, rng=0)
    >>> conv
    Conv2d(1, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
    >>> conv(np.zeros((2, 1, 8, 8), np.float32)).shape, list(conv.state_dict())
    ((2, 8, 8, 8), ['weight', 'bias'])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", dtype=None, *,
                 rng=None):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("groups", groups)):
            if not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' (the only mode implemented), "
                             f"got {padding_mode!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride, self.dilation = _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"padding must be 'valid', 'same', an int or a pair, "
                                 f"got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding", 0)
        self.groups, self.padding_mode = int(groups), padding_mode
        dt = _dtype(dtype)
        rng = np.random.default_rng(rng)
        kh, kw = self.kernel_size
        bound = 1.0 / math.sqrt(in_channels // groups * kh * kw)
        self.weight = Parameter(rng.uniform(-bound, bound, (out_channels, in_channels // groups,
                                                            kh, kw)).astype(dt))
        if bias:
            self.bias = Parameter(rng.uniform(-bound, bound, out_channels).astype(dt))
        else:
            self.register_parameter("bias", None)

    def forward(self, x):
        return ag.conv2d(_as_tensor(x), self.weight, self.bias, self.stride, self.padding,
                         self.dilation, self.groups)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + (", bias=False" if self.bias is None else "")


class MaxPool2d(Module):
    """:func:`fastnorm.autograd.max_pool2d` as a layer, torch's ``MaxPool2d``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> nn.MaxPool2d(2)(np.zeros((1, 3, 8, 7))).shape
    (1, 3, 4, 3)
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding, self.dilation = padding, dilation
        self.return_indices, self.ceil_mode = bool(return_indices), bool(ceil_mode)

    def forward(self, x):
        return ag.max_pool2d(_as_tensor(x), self.kernel_size, self.stride, self.padding,
                             self.dilation, self.ceil_mode, self.return_indices)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(Module):
    """:func:`fastnorm.autograd.avg_pool2d` as a layer, torch's ``AvgPool2d``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> nn.AvgPool2d(3, stride=2, padding=1)(np.zeros((1, 3, 8, 8))).shape
    (1, 3, 4, 4)
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding, self.ceil_mode = padding, bool(ceil_mode)
        self.count_include_pad, self.divisor_override = bool(count_include_pad), divisor_override

    def forward(self, x):
        return ag.avg_pool2d(_as_tensor(x), self.kernel_size, self.stride, self.padding,
                             self.ceil_mode, self.count_include_pad, self.divisor_override)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """:func:`fastnorm.autograd.adaptive_avg_pool2d` as a layer (``1``: global pooling).

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> nn.AdaptiveAvgPool2d((2, None))(np.zeros((1, 3, 7, 5))).shape
    (1, 3, 2, 5)
    """

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        return ag.adaptive_avg_pool2d(_as_tensor(x), self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"


# ----------------------------------------------------------------- activations and losses

class ReLU(Module):
    def forward(self, x):
        return ag.relu(_as_tensor(x))


class Sigmoid(Module):
    def forward(self, x):
        return ag.sigmoid(_as_tensor(x))


class Tanh(Module):
    def forward(self, x):
        return ag.tanh(_as_tensor(x))


class Identity(Module):
    def forward(self, x):
        return _as_tensor(x)


class GELU(Module):
    """:func:`fastnorm.autograd.gelu` as a layer, torch's ``GELU(approximate='none')``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> nn.GELU("tanh")(np.array([1.0])).data.round(4)
    array([0.8412])
    """

    def __init__(self, approximate="none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return ag.gelu(_as_tensor(x), self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class SiLU(Module):
    """``x * sigmoid(x)``, torch's ``SiLU``."""

    def forward(self, x):
        return ag.silu(_as_tensor(x))


class Flatten(Module):
    """Merge dims ``start_dim..end_dim`` (torch's defaults 1 and -1: (N, ...) -> (N, -1)).

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> nn.Flatten()(np.zeros((2, 3, 4, 4))).shape, nn.Flatten(0, 1)(np.zeros((2, 3, 4))).shape
    ((2, 48), (6, 4))
    """

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        for name, v in (("start_dim", start_dim), ("end_dim", end_dim)):
            if not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {v!r}")
        self.start_dim, self.end_dim = int(start_dim), int(end_dim)

    def forward(self, x):
        return ag.flatten(_as_tensor(x), self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Dropout(Module):
    """Zero each element with probability ``p`` in training mode (scaled by 1/(1-p));
    the identity in eval mode. torch's ``Dropout(p=0.5)``.

    ``rng`` (keyword-only: a seed or numpy Generator) makes the masks reproducible; the
    layer keeps its own generator. ``inplace=True`` is not available on the tape.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> drop = nn.Dropout(0.25, rng=0)
    >>> float((drop(np.ones(10000)).data == 0).mean())
    0.2524
    >>> bool((drop.eval()(np.ones(3)).data == 1).all())
    True
    """

    def __init__(self, p=0.5, inplace=False, *, rng=None):
        super().__init__()
        if not isinstance(p, numbers.Real) or not 0 <= p <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p!r}")
        if inplace:
            raise ValueError("inplace=True is not supported: the tape keeps the input")
        self.p, self.inplace, self.rng = float(p), False, np.random.default_rng(rng)

    def forward(self, x):
        return ag.dropout(_as_tensor(x), self.p, self.training, rng=self.rng)

    def extra_repr(self):
        return f"p={self.p}, inplace={self.inplace}"


class _Loss(Module):
    """A loss function of fastnorm.autograd, ``loss(input, target, reduction)``, as a module."""
    loss = None

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, input, target):
        return type(self).loss(_as_tensor(input), target, self.reduction)


class CrossEntropyLoss(_Loss):
    """:func:`fastnorm.autograd.cross_entropy` as a module."""
    loss = staticmethod(ag.cross_entropy)


class MSELoss(_Loss):
    """:func:`fastnorm.autograd.mse_loss` as a module."""
    loss = staticmethod(ag.mse_loss)


# --------------------------------------------------------------------------- norm layers

def _check_features(num_features, name="num_features"):
    if not isinstance(num_features, numbers.Integral) or num_features < 1:
        raise ValueError(f"{name} must be a positive integer, got {num_features!r}")
    return int(num_features)


def _check_eps(eps):
    _checks.eps(eps)
    return eps


class _NormBase(Module):
    """BatchNorm/InstanceNorm state: weight 1, bias 0, running mean 0, var 1, count 0."""

    def __init__(self, num_features, eps, momentum, affine, track_running_stats, dtype,
                 bias, axis):
        super().__init__()
        self.num_features = _check_features(num_features)
        self.eps = _check_eps(eps)
        if momentum is not None and not isinstance(momentum, numbers.Real):
            raise TypeError(f"momentum must be a number or None, got {momentum!r}")
        if not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an integer, got {axis!r}")
        self.momentum, self.affine = momentum, bool(affine)
        self.track_running_stats, self.axis = bool(track_running_stats), int(axis)
        dt = _dtype(dtype)
        C = self.num_features
        if affine:
            self.weight = Parameter(np.ones(C, dt))
            if bias:
                self.bias = Parameter(np.zeros(C, dt))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(C, dt))
            self.register_buffer("running_var", np.ones(C, dt))
            self.register_buffer("num_batches_tracked", np.zeros((), np.int64))
        else:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight.data[...] = 1
            if self.bias is not None:
                self.bias.data[...] = 0

    def _check_input_dim(self, x):
        if x.ndim not in self._ndims:
            want = " or ".join(f"{d}D" for d in self._ndims)
            raise ValueError(f"expected {want} input (got {x.ndim}D input)")

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class _BatchNorm(_NormBase):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=None, *, bias=True, axis=1):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype,
                         bias, axis)

    def forward(self, x):
        x = _as_tensor(x)
        self._check_input_dim(x)
        ax = self.axis % x.ndim
        if x.shape[ax] != self.num_features:
            raise ValueError(f"expected input's size at dim={ax} to match num_features "
                             f"({self.num_features}), but got: {x.shape[ax]}.")
        use_batch = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        # torch: momentum=None is the cumulative average 1/num_batches_tracked, counted
        # (by the functional form, in place) on every training call.
        return self._function(
            x, self.running_mean if not self.training or update else None,
            self.running_var if not self.training or update else None,
            self.weight, self.bias, use_batch, self.momentum, self.eps, axis=self.axis,
            num_batches_tracked=self.num_batches_tracked if update else None)

    def _function(self, *args, **kwargs):
        return api.batch_norm(*args, **kwargs)


class BatchNorm1d(_BatchNorm):
    """Batch normalization over (N, C) or (N, C, L) input, torch's ``BatchNorm1d``.

    Parameters
    ----------
    num_features : int
        C.
    eps : float, default 1e-5
    momentum : float or None, default 0.1
        Running-stat update ``new = (1 - momentum) * old + momentum * batch`` (unbiased
        batch variance); None: cumulative average over ``num_batches_tracked`` batches.
    affine : bool, default True
        Learnable ``weight`` (starts at 1) and ``bias`` (starts at 0).
    track_running_stats : bool, default True
        Keep ``running_mean`` (0), ``running_var`` (1) and ``num_batches_tracked`` (0)
        buffers and use them in eval mode; without them batch statistics are always used.
    dtype : float dtype, default float32
    bias : bool, keyword-only, default True
    axis : int, keyword-only, default 1
        Channel axis: -1 for channels-last input, computed in place.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> bn = nn.BatchNorm1d(3)
    >>> y = bn(np.random.default_rng(0).normal(4, 2, (32, 3)).astype(np.float32))
    >>> int(bn.num_batches_tracked), bn.running_mean.round(1)
    (1, array([0.4, 0.4, 0.5], dtype=float32))
    """
    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalization over (N, C, H, W) input (``axis=-1``: (N, H, W, C)).

    Arguments as :class:`BatchNorm1d`.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> bn = nn.BatchNorm2d(4, axis=-1).eval()
    >>> bn(np.zeros((2, 5, 5, 4), np.float32)).shape
    (2, 5, 5, 4)
    """
    _ndims = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch normalization over (N, C, D, H, W) input. Arguments as :class:`BatchNorm1d`."""
    _ndims = (5,)


class SyncBatchNorm(_BatchNorm):
    """Batch normalization whose statistics span every rank of an MPI communicator,
    torch's ``SyncBatchNorm``: each rank passes its slice of the batch; the layer normalizes
    as if the whole batch were on one process (``fastnorm.mpi``). Input of any rank >= 2.

    Arguments as :class:`BatchNorm1d`, plus ``process_group``: an mpi4py communicator
    (default ``MPI.COMM_WORLD``; needs the ``[mpi]`` extra). Training calls are collective:
    every rank of the group calls forward and backward in the same order. The parameters'
    gradients are this rank's share, as torch's; a data-parallel step sums or averages them
    over the ranks. :func:`convert_sync_batchnorm` turns a model's batch norms into these.

    Examples
    --------
    Under ``mpiexec -n 2 python train.py`` the statistics cover both ranks' batches; on one
    process it is batch norm:

    >>> import numpy as np
    >>> from fastnorm import nn
    >>> from fastnorm.mpi import MPI                          # doctest: +SKIP
    >>> bn = nn.SyncBatchNorm(3, process_group=MPI.COMM_SELF)  # doctest: +SKIP
    >>> y = bn(np.random.default_rng(0).normal(4, 2, (8, 3, 5)).astype(np.float32))
    ... # doctest: +SKIP
    >>> y.shape, int(bn.num_batches_tracked)                  # doctest: +SKIP
    ((8, 3, 5), 1)

    (Skipped by the doctests, which run without the ``[mpi]`` extra; tests/test_mpi.py
    runs the layer.)
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, dtype=None, *, bias=True,
                 axis=1):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype,
                         bias=bias, axis=axis)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (got {x.ndim}D input)")

    def _function(self, *args, **kwargs):
        from . import _sync   # (imports mpi4py, an optional extra, only for COMM_WORLD)
        return _sync.sync_batch_norm(*args, comm=self.process_group, **kwargs)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """torch's spelling of :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


def convert_sync_batchnorm(module, process_group=None):
    """``module`` with every BatchNorm1d/2d/3d (itself or a descendant) replaced by a
    :class:`SyncBatchNorm` sharing its parameters and running statistics (torch's
    ``SyncBatchNorm.convert_sync_batchnorm``). Returns the converted module (``module``
    itself, its batch-norm children replaced, unless it is a batch norm).

    Examples
    --------
    >>> from fastnorm import nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU())
    >>> net = nn.convert_sync_batchnorm(net)
    >>> type(net[1]).__name__, list(net.state_dict())[2:4]
    ('SyncBatchNorm', ['1.weight', '1.bias'])
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, process_group, axis=module.axis)
        for name in ("weight", "bias"):
            out.register_parameter(name, module._parameters[name])
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            out.register_buffer(name, module._buffers[name])
        out.training = module.training
    for name, child in list(module._modules.items()):
        if child is not None:
            out._modules[name] = convert_sync_batchnorm(child, process_group)
    return out


class _InstanceNorm(_NormBase):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False,
                 track_running_stats=False, dtype=None, *, bias=True, axis=1):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, dtype,
                         bias, axis)

    def forward(self, x):
        x = _as_tensor(x)
        self._check_input_dim(x)
        unbatched = x.ndim == self._ndims[0]
        if unbatched:
            x = x.reshape((1,) + x.shape)
        ax = self.axis % x.ndim         # ``axis`` counts in the batched layout
        if x.shape[ax] != self.num_features:
            msg = (f"expected input's size at dim={ax - unbatched} to match num_features "
                   f"({self.num_features}), but got: {x.shape[ax]}.")
            if self.affine:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
        # torch: batch statistics unless eval mode with tracked stats; momentum None is 0
        # (frozen running stats) and num_batches_tracked is never counted.
        use_input = self.training or not self.track_running_stats
        y = api.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                              use_input, 0.0 if self.momentum is None else self.momentum,
                              self.eps, axis=ax)
        return y.reshape(y.shape[1:]) if unbatched else y


class InstanceNorm1d(_InstanceNorm):
    """Instance normalization over (N, C, L) or unbatched (C, L), torch's ``InstanceNorm1d``.

    Same arguments as :class:`BatchNorm1d`, with torch's defaults ``affine=False`` and
    ``track_running_stats=False``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> y = nn.InstanceNorm1d(2)(np.arange(12.0).reshape(1, 2, 6)).data
    >>> bool(np.allclose(y.mean(-1), 0))
    True
    """
    _ndims = (2, 3)


class InstanceNorm2d(_InstanceNorm):
    """Instance normalization over (N, C, H, W) or (C, H, W). See :class:`InstanceNorm1d`."""
    _ndims = (3, 4)


class InstanceNorm3d(_InstanceNorm):
    """Instance normalization over (N, C, D, H, W) or (C, D, H, W)."""
    _ndims = (4, 5)


def _norm_shape(normalized_shape):
    ns = _checks.normalized_shape(normalized_shape)
    if not ns or min(ns) < 1:
        raise ValueError(f"normalized_shape must be non-empty and positive, got {ns}")
    return ns


class LayerNorm(Module):
    """Layer normalization over the trailing ``normalized_shape``, torch's ``LayerNorm``.

    Parameters
    ----------
    normalized_shape : int or tuple
    eps : float, default 1e-5
    elementwise_affine : bool, default True
        ``weight`` (ones) and, with ``bias=True``, ``bias`` (zeros) of ``normalized_shape``.
    bias : bool, default True
    dtype : float dtype, default float32

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> ln = nn.LayerNorm(4)
    >>> y = ln(np.arange(8, dtype=np.float32).reshape(2, 4)).data
    >>> y.round(3)
    array([[-1.342, -0.447,  0.447,  1.342],
           [-1.342, -0.447,  0.447,  1.342]], dtype=float32)
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 dtype=None):
        super().__init__()
        self.normalized_shape = _norm_shape(normalized_shape)
        self.eps, self.elementwise_affine = _check_eps(eps), bool(elementwise_affine)
        dt = _dtype(dtype)
        if elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, dt))
            if bias:
                self.bias = Parameter(np.zeros(self.normalized_shape, dt))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        return api.layer_norm(_as_tensor(x), self.normalized_shape, self.weight, self.bias,
                              self.eps)

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class GroupNorm(Module):
    """Group normalization, torch's ``GroupNorm(num_groups, num_channels, eps, affine)``.

    ``axis`` (keyword-only, default 1) is the channel axis: -1 for channels-last.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> gn = nn.GroupNorm(2, 4)
    >>> gn(np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)).shape
    (3, 4, 5)
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=None, *,
                 bias=True, axis=1):
        super().__init__()
        num_groups = _check_features(num_groups, "num_groups")
        num_channels = _check_features(num_channels, "num_channels")
        if num_channels % num_groups:
            raise ValueError("num_channels must be divisible by num_groups")
        self.num_groups, self.num_channels = num_groups, num_channels
        self.eps, self.affine, self.axis = _check_eps(eps), bool(affine), int(axis)
        dt = _dtype(dtype)
        if affine:
            self.weight = Parameter(np.ones(num_channels, dt))
            if bias:
                self.bias = Parameter(np.zeros(num_channels, dt))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        return api.group_norm(_as_tensor(x), self.num_groups, self.weight, self.bias, self.eps,
                              axis=self.axis)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class RMSNorm(Module):
    """RMS normalization, torch's ``RMSNorm(normalized_shape, eps=None, elementwise_affine)``.

    ``eps=None`` uses ``numpy.finfo(input.dtype).eps``, as torch.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> nn.RMSNorm(2)(np.array([[3.0, 4.0]], np.float32)).data.round(4)
    array([[0.8485, 1.1314]], dtype=float32)
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, dtype=None):
        super().__init__()
        self.normalized_shape = _norm_shape(normalized_shape)
        self.eps = None if eps is None else _check_eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        if elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape, _dtype(dtype)))
        else:
            self.register_parameter("weight", None)

    def forward(self, x):
        return api.rms_norm(_as_tensor(x), self.normalized_shape, self.weight, self.eps)

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


# ------------------------------------------------------------------- weight normalization

def _norm_except_dim(v, dim):
    """||v|| over every axis but ``dim`` (all axes when dim is None), keepdims, on the tape."""
    if dim is None:
        return ((v * v).sum()) ** 0.5
    axes = tuple(i for i in range(v.ndim) if i != dim)
    return ((v * v).sum(axes, keepdim=True)) ** 0.5


def _weight_norm_hook(name, dim):
    def hook(module):
        g, v = getattr(module, name + "_g"), getattr(module, name + "_v")
        object.__setattr__(module, name, g * v / _norm_except_dim(v, dim))
    return hook


def weight_norm(module, name="weight", dim=0):
    """Weight normalization (Salimans & Kingma, 2016): ``w = g * v / ||v||``.

    Replaces the parameter ``name`` by ``name_g`` (the norms, shape 1 everywhere but
    ``dim``) and ``name_v`` (the direction), torch's ``torch.nn.utils.weight_norm`` keys.
    ``w`` is recomputed on the tape before each forward, so gradients reach g and v.
    ``dim=None`` uses one norm for the whole tensor.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> lin = nn.weight_norm(nn.Linear(3, 2, rng=0))
    >>> list(lin.state_dict()), lin.weight_g.shape
    (['bias', 'weight_g', 'weight_v'], (2, 1))
    """
    if not isinstance(module, Module):
        raise TypeError(f"module must be a Module, got {type(module).__name__}")
    w = module._parameters.get(name)
    if w is None:
        raise ValueError(f"module has no parameter {name!r}")
    if dim is not None:
        if not isinstance(dim, numbers.Integral) or not -w.ndim <= dim < w.ndim:
            raise ValueError(f"dim must be None or an axis of {name} ({w.ndim}-D), got {dim!r}")
        dim = int(dim) % w.ndim
    del module._parameters[name]
    with no_grad():
        g = _norm_except_dim(Tensor(w.data), dim).data
    module.register_parameter(name + "_g", Parameter(np.asarray(g, w.dtype)))
    module.register_parameter(name + "_v", Parameter(w.data.copy()))
    hook = _weight_norm_hook(name, dim)
    hook.weight_norm = name
    module._pre_hooks.append(hook)
    hook(module)
    return module


def remove_weight_norm(module, name="weight"):
    """Undo :func:`weight_norm`: bake ``g * v / ||v||`` back into one parameter."""
    hooks = [h for h in module._pre_hooks if getattr(h, "weight_norm", None) == name]
    if not hooks:
        raise ValueError(f"weight_norm of {name!r} not found in {type(module).__name__}")
    with no_grad():
        hooks[0](module)
    w = module.__dict__.pop(name).data
    module._pre_hooks.remove(hooks[0])
    del module._parameters[name + "_g"], module._parameters[name + "_v"]
    module.register_parameter(name, Parameter(w))
    return module


# ----------------------------------------------------------------------------- BN folding

def fold_batch_norm(weight, bias, bn):
    """Fold an eval-mode BatchNorm that follows a linear map into that map's weights.

    ``bn(W x + b) == W' x + b'`` with ``s = gamma / sqrt(running_var + eps)``,
    ``W' = W * s`` (per output channel, axis 0 of W) and ``b' = (b - running_mean) * s +
    beta``. W is ``(out, in)`` for a linear layer or ``(out, in, kh, kw)`` for a
    convolution; computed in float64 and returned in W's dtype.

    Parameters
    ----------
    weight : ndarray or Tensor (out, ...)
    bias : ndarray, Tensor or None (out,)
    bn : BatchNorm1d/2d/3d with running statistics, in eval mode

    Returns
    -------
    (weight, bias) : new ndarrays

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> bn = nn.BatchNorm2d(2).eval()
    >>> bn.running_var[:] = 4
    >>> w, b = nn.fold_batch_norm(np.ones((2, 1, 3, 3), np.float32), None, bn)
    >>> float(w[0, 0, 0, 0]), b
    (0.49999937415122986, array([0., 0.], dtype=float32))
    """
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"bn must be a BatchNorm layer, got {type(bn).__name__}")
    if bn.training:
        raise ValueError("bn must be in eval mode: folding uses the running statistics")
    if bn.running_mean is None:
        raise ValueError("bn must track running statistics (track_running_stats=True)")
    w = np.asarray(weight.data if isinstance(weight, Tensor) else weight)
    if w.ndim < 2 or w.shape[0] != bn.num_features:
        raise ValueError(f"weight must have {bn.num_features} output channels on axis 0, "
                         f"got shape {w.shape}")
    C = bn.num_features
    b = np.zeros(C) if bias is None else np.asarray(
        bias.data if isinstance(bias, Tensor) else bias, np.float64)
    if b.shape != (C,):
        raise ValueError(f"bias must have shape ({C},), got {b.shape}")
    gamma = np.ones(C) if bn.weight is None else bn.weight.data.astype(np.float64)
    beta = np.zeros(C) if bn.bias is None else bn.bias.data.astype(np.float64)
    s = gamma / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    w2 = w.astype(np.float64) * s.reshape((C,) + (1,) * (w.ndim - 1))
    b2 = (b - bn.running_mean.astype(np.float64)) * s + beta
    return w2.astype(w.dtype), b2.astype(w.dtype)


def fuse_linear_bn(linear, bn):
    """A new :class:`Linear` equal to ``bn(linear(x))`` for an eval-mode ``bn``.

    Examples
    --------
    >>> import numpy as np
    >>> from fastnorm import nn
    >>> lin, bn = nn.Linear(3, 2, rng=0), nn.BatchNorm1d(2).eval()
    >>> x = np.ones((4, 3), np.float32)
    >>> bool(np.allclose(nn.fuse_linear_bn(lin, bn)(x).data, bn(lin(x)).data, atol=1e-6))
    True
    """
    if not isinstance(linear, Linear):
        raise TypeError(f"linear must be a Linear, got {type(linear).__name__}")
    w, b = fold_batch_norm(linear.weight, linear.bias, bn)
    fused = Linear(linear.in_features, linear.out_features, True, w.dtype, rng=0)
    fused.weight.data[...] = w
    fused.bias.data[...] = b
    return fused
