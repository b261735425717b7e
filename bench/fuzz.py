"""Property-based fuzzing of fastnorm's public functions, every case run in a worker process.

A case is a JSON-able description drawn by hypothesis: the function (each forward and each
``*_backward``), backend, thread count, shape (empty and 1-sized dims included), dtype
(float16/32/64, byte-swapped, and ints, bools and complex that must be rejected), memory
layout (C, F, channels-last, strided, reversed, unaligned, broadcast, read-only, a list),
values (large means, constant channels, near the dtype's max, min-normal and subnormal,
NaN/Inf), axis, eps, momentum, ``training``, weight/bias/running statistics (dtype and shape),
``num_batches_tracked``, ``out=`` (fresh, the input itself, overlapping, interleaved,
wrong) and ``return_stats``. The worker builds the arrays from the case's seed, calls
fastnorm and ``fastnorm.reference``'s oracle, and answers one verdict:

- ``ok``: the result equals the oracle's (per-dtype tolerance of tests/conftest.py ``tol``,
  NaN and Inf in the same places, the input left untouched unless it is ``out``), or a
  ``ValueError``/``TypeError`` naming an argument the case made invalid;
- a finding: ``wrong-result``, ``accepted-invalid`` (an argument outside the documented
  contract got through), ``rejected-valid``, ``unnamed-error`` (the message names none of
  the bad arguments), ``wrong-exception`` (another type), ``crash`` (the worker died: the
  case is reported and the worker restarted) or ``hang``.

"Invalid" follows the documented contract and torch's rules where torch has one (momentum
in [0, 1], finite eps, bool ``training``, int64 ``num_batches_tracked``, parameters of the
input's dtype but float32 ones for float16 input); a case can also mark an argument
"either" (running statistics of another float dtype, momentum that is not used): then both
a correct result and a named error pass. float64 values near the dtype's max are not drawn
(the float64 oracle squares them); tests/test_reliability.py checks those against a
long-double oracle.

Usage::

    python bench/fuzz.py --cases 100000            # the long run; prints the findings
    python bench/fuzz.py --replay '{"op": ...}'    # one case in this process (traceback)
    python bench/fuzz.py --cases 2000 --asan-ext build/asan/fastnorm_cy/_kernels....so \\
        --preload "$(gcc -print-file-name=libasan.so)"   # Cython built with ASan (README)
"""
import argparse
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

FORWARD = ("batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm")
BACKWARD = tuple(f + "_backward" for f in FORWARD)
OPS = FORWARD + BACKWARD
ROWS = ("layer_norm", "rms_norm")


def tol(dtype, scale=1.0):
    """Absolute tolerance for a result of magnitude ``scale`` in ``dtype``: the table of
    tests/conftest.py ``tol`` (tests/test_fuzz.py checks the two agree)."""
    base = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 4e-3}[np.dtype(dtype).type]
    return base * max(1.0, float(scale))


# =========================================================================== the cases
# Drawn by hypothesis; everything random beyond the case itself comes from case["seed"].

def strategy(backends, big=0.03):
    """hypothesis strategy of cases over ``backends``; ``big``: share of cases with more
    elements than the parallel threshold (fastnorm._dispatch.PARALLEL_MIN)."""
    from hypothesis import strategies as st

    def pick(*options):  # sampled_from shrinks towards the first: the plain choice first
        return st.sampled_from(options)

    dims = st.one_of(st.integers(1, 7), pick(0, 1, 2, 3, 16, 33))
    shapes = {n: st.lists(dims, min_size=n, max_size=n) for n in range(6)}
    axes = {n: st.one_of(pick(1, -1), st.integers(-n - 1, n), pick(1.0, "1"))
            for n in range(6)}
    specials = {k: st.lists(st.tuples(pick("nan", "inf", "-inf"), st.floats(0, 1)),
                            min_size=k, max_size=k) for k in range(3)}
    running = ("batch_norm", "instance_norm")
    # field -> (strategy, the functions it applies to; None: every function). Only the
    # fields of the function are drawn: the others keep the defaults of DEFAULTS.
    fields = [
        ("seed", st.integers(0, 2**32 - 1), None),
        ("threads", pick(1, 2), None),
        ("dtype", pick(*["float32"] * 3, *["float64"] * 3, "float16", ">f4", "<f8", "int32",
                       "int8", "bool", "complex64"), None),
        ("layout", pick(*["C"] * 5, "F", "channels_last", "strided", "reversed",
                        "unaligned", "broadcast", "readonly", "list"), None),
        ("layout_axis", st.integers(-3, 2), None),
        ("kind", pick(*["normal"] * 6, "constant", "constant_channel", "huge", "huge_offset",
                      "tiny", "subnormal"), None),
        ("offset", pick(0.0, 3.0, -2.5, 1e4, 1e8), None),
        ("scale", pick(1.0, 1e-3, 1e3), None),
        ("n_specials", pick(0, 0, 0, 0, 1, 2), None),
        ("eps", pick(1e-5, 1e-5, 1e-12, 1e-3, 0.5, 1, "f32", 1e30, 0.0, -1e-5, "nan", "inf",
                     "1e-5", None), FORWARD),
        ("momentum", pick(0.1, 0.1, 0.0, 1.0, 0.5, None, 2.0, -1.0, "nan", True), running),
        ("training", pick(True, True, False, "np_true", "yes", 1, None),
         running + tuple(f + "_backward" for f in running)),
        ("weight", pick("same", "same", None, "float64", "float32", "float16", "int32",
                        "bad_shape"), None),
        ("bias", pick("same", None, "same", "float64", "bad_shape"), FORWARD),
        ("running", pick("same", None, "float64", "float32", "readonly", "only_mean",
                         "bad_shape"), running),
        ("nbt", pick(None, None, "int64", "int8", "python_int", "float64"), running),
        ("num_groups", pick("divisor", "divisor", "one", "all", 0, -1, "nondivisor", 2.0),
         ("group_norm", "group_norm_backward")),
        ("normalized_shape", pick("tuple", "int", "list", "np_int", "all", "str", "float",
                                  "mismatch", "too_long"),
         ROWS + tuple(f + "_backward" for f in ROWS)),
        ("out", pick(*[None] * 4, "fresh_C", "fresh_F", "fresh_CL", "self", "overlap",
                     "interleaved", "halves", "wrong_dtype", "wrong_shape", "readonly"),
         FORWARD),
        ("return_stats", st.booleans(), FORWARD),
        ("stats", pick("oracle", "oracle", "random", "none_mean", "none_rstd",
                       "bad_shape_mean", "bad_shape_rstd", "int_rstd"), BACKWARD),
        ("grad_dtype", pick("same", "same", "same", "float64", "float32", "int32",
                            "bad_shape"), BACKWARD),
        ("grad_layout", pick("C", "F", "channels_last", "strided"), BACKWARD),
        ("grad_nan", pick(False, False, False, True), BACKWARD),
        ("has_bias", st.booleans(), BACKWARD),
        ("ns_keyword", st.booleans(), BACKWARD),
        ("bad_backend", st.integers(0, 99).map(lambda i: i == 0), None),
    ]
    ops, bes = st.sampled_from(OPS), st.sampled_from(backends)
    bigs = pick([64, 8, 65], [48, 768], [16, 40, 9, 7], [3, 12000])
    ndims, share = st.integers(0, 5), st.integers(0, 999)

    @st.composite
    def case(draw):
        c = dict(DEFAULTS, op=draw(ops), backend=draw(bes))
        if draw(share) < big * 1000:
            c["shape"] = list(draw(bigs))
        else:
            c["shape"] = draw(shapes[draw(ndims)])
            while math.prod(c["shape"]) > 6000:
                c["shape"] = [max(1, d // 2) for d in c["shape"]]
        for name, s, applies in fields:
            if applies is None or c["op"] in applies:
                c[name] = draw(s)
        if c["op"] not in ROWS + tuple(f + "_backward" for f in ROWS):
            c["axis"] = draw(axes[min(len(c["shape"]), 5)])
        c["specials"] = draw(specials[c.pop("n_specials")])
        if math.prod(c["shape"]) >= 1 << 15:
            c["threads"] = 2
        return c

    return case()


# what a case holds for the fields its function does not draw
DEFAULTS = dict(axis=1, eps=1e-5, momentum=0.1, training=True, bias=None, running=None,
                nbt=None, num_groups="divisor", normalized_shape="tuple", out=None,
                return_stats=False, stats="oracle", grad_dtype="same", grad_layout="C",
                grad_nan=False, has_bias=True, ns_keyword=False, bad_backend=False)


# ====================================================================== building a case

class Spec:
    """What the contract says of one case: arguments that must be rejected (``bad``) and
    ones that may be (``either``), each with the names a message may use for it."""

    def __init__(self):
        self.bad, self.either, self.why = {}, {}, {}

    def reject(self, arg, *names, why=""):
        self.bad[arg] = set(names or (arg,))
        self.why.setdefault(arg, why)

    def allow(self, arg, *names, why=""):
        self.either[arg] = set(names or (arg,))

    def reasons(self):
        return sorted(f"{a}: {self.why[a]}" if self.why.get(a) else a for a in self.bad)

    def names(self):
        return set().union(*self.bad.values(), *self.either.values())


FINFO_KIND = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def _values(case, shape, dt, rng, axis):
    """float64 values of the case's kind, representable in dtype ``dt``."""
    kind, n = case["kind"], math.prod(shape)
    if dt.kind in "biu":
        return rng.integers(-3, 4, shape).astype(np.float64)
    if dt.kind == "c":
        return rng.standard_normal(shape)
    fi = np.finfo(dt)
    if kind in ("huge", "huge_offset"):
        # float64: 1e150, where the float64 oracle still squares; float32/16: their max
        top = 1e150 if dt.itemsize == 8 else 0.9 * float(fi.max)
        if kind == "huge":
            x = rng.uniform(-1, 1, shape) * top
        else:
            x = top * (0.5 + 0.4 * rng.uniform(-1, 1, shape))
    elif kind == "tiny":
        x = float(fi.tiny) * rng.uniform(1, 100, shape) * rng.choice([-1.0, 1.0], shape)
    elif kind == "subnormal":
        x = float(fi.smallest_subnormal) * rng.integers(-1000, 1001, shape)
    else:
        offset = case["offset"] if dt.itemsize > 2 else min(case["offset"], 1e3)
        scale = case["scale"] if dt.itemsize > 2 else min(case["scale"], 10.0)
        if kind == "constant":
            x = np.full(shape, offset + scale * rng.standard_normal())
        elif kind == "constant_channel" and len(shape) >= 2 and axis is not None:
            per = offset + scale * rng.standard_normal(shape[axis])
            bshape = [1] * len(shape)
            bshape[axis] = shape[axis]
            x = np.broadcast_to(per.reshape(bshape), shape).copy()
        else:
            x = offset + scale * rng.standard_normal(shape)
    x = np.array(x, np.float64).reshape(shape)
    flat = x.reshape(-1)
    for what, where in (case["specials"] if n else []):
        flat[min(int(where * n), n - 1)] = float(what)
    return x


def _dtype(name):
    return np.dtype(name)


def _native(dt):
    return dt.newbyteorder("=") if dt.kind == "f" else dt


def _lay_out(a, layout, axis, rng):
    """``a`` (a C-contiguous array) re-laid in memory as ``layout``; same values."""
    nd = a.ndim
    if nd == 0:
        return a    # (asfortranarray and ascontiguousarray make a 0-d array 1-d)
    ax = axis % nd
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "channels_last" and nd >= 2:
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, ax, -1)), -1, ax)
    if layout == "strided" and nd >= 1:
        big = np.empty(a.shape[:ax] + (2 * a.shape[ax],) + a.shape[ax + 1:], a.dtype)
        view = big[(slice(None),) * ax + (slice(None, None, 2),)]
        view[...] = a
        return view
    if layout == "reversed" and nd >= 1:
        idx = (slice(None),) * ax + (slice(None, None, -1),)
        return np.ascontiguousarray(a[idx])[idx]
    if layout == "unaligned" and a.dtype.itemsize > 1:
        buf = np.empty(a.nbytes + 1, np.uint8)[1:].view(a.dtype).reshape(a.shape)
        buf[...] = a
        return buf
    return a


class Built:
    """One case made concrete: the call, the oracle's outputs and the spec."""

    def __init__(self):
        self.spec = Spec()
        self.call = None
        self.expect = {}          # output name -> (float64 array, dtype of the comparison)
        self.mutable = {}         # name -> (array the call updates in place, expected)
        self.untouched = []       # (array, copy): must not change
        self.out = None
        self.out_is_input = False
        self.y_dtype = None


def _param(kind, shape, xdt, rng, spec, name, loc):
    """weight/bias/running statistics of ``kind`` ("same", a dtype name, "bad_shape", None)."""
    if kind is None:
        return None
    T = np.dtype(np.float64) if xdt is None else xdt
    if kind == "same":
        dt = T
    elif kind == "bad_shape":
        spec.reject(name, why="wrong shape")
        return rng.normal(loc, 0.5, tuple(shape) + (2,)).astype(T)
    else:
        dt = np.dtype(kind)
    a = rng.normal(loc, 0.5, shape).astype(dt)
    if dt.kind != "f":
        spec.reject(name, why=f"dtype {dt}")
    elif xdt is not None and dt != T and not (T == np.float16 and dt == np.float32):
        # torch: "mixed dtype (CPU): all inputs must share same datatype"; float16 input
        # takes float32 parameters (mixed precision)
        spec.reject(name, why=f"mixed dtype {dt} with {T} input")
    return a


def _eps_value(e, spec, default_ok=False):
    if e == "f32":
        return np.float32(1e-5)
    if e in ("nan", "inf"):
        spec.reject("eps", why=e)
        return float(e)
    if e is None:
        if not default_ok:
            spec.reject("eps")
        return None
    if isinstance(e, str) or not e > 0:
        spec.reject("eps", why=repr(e))
    return e


def _bool_arg(v, spec, name):
    if v == "np_true":
        return np.True_, True
    if isinstance(v, bool):
        return v, v
    if v == 1:
        spec.allow(name)  # torch: must be bool, not int; a truthy int may pass
        return 1, True
    spec.reject(name, why=f"not a bool: {v!r}")
    return v, bool(v)


def _momentum(case, spec, used, nbt_ok):
    m = case["momentum"]
    value = {"nan": float("nan")}.get(m, m)
    valid = (m is None and nbt_ok) or (
        isinstance(value, float) and not isinstance(value, bool) and 0.0 <= value <= 1.0)
    if not valid:
        if m is None:
            (spec.reject if used else spec.allow)("momentum", "momentum",
                                                  "num_batches_tracked")
        else:
            (spec.reject if used else spec.allow)("momentum", why=repr(m))
    return value


def _nbt(case, spec, used):
    kind = case["nbt"]
    if kind is None:
        return None, True
    v = int(case["seed"] % 5)
    if kind == "int64":
        return np.array(v, np.int64), True
    (spec.reject if used else spec.allow)("num_batches_tracked", why=kind)
    if kind == "python_int":
        return v, False
    return np.array(v, kind), False


def _out(case, x, layout_axis, rng, b):
    """The out= array for a forward case (x may be replaced to share a buffer with it)."""
    mode = case["out"]
    if mode is None or x is None or not isinstance(x, np.ndarray):
        return x, None
    shape = x.shape
    T = _native(x.dtype) if x.dtype.kind == "f" else x.dtype
    if mode in ("fresh_C", "fresh_F", "fresh_CL", "readonly"):
        out = np.empty(shape, T, order="F" if mode == "fresh_F" else "C")
        if mode == "fresh_CL":
            out = _lay_out(out, "channels_last", layout_axis, rng)
        if mode == "readonly":
            out.flags.writeable = False
            b.spec.reject("out")
        return x, out
    if mode == "wrong_dtype":
        b.spec.reject("out")
        return x, np.empty(shape, np.float64 if T != np.float64 else np.float32)
    if mode == "wrong_shape":
        b.spec.reject("out")
        return x, np.empty(shape + (2,), T)
    if mode == "self":
        if not x.flags.writeable or x.dtype != T:
            b.spec.reject("out")  # read-only (or byte-swapped: out must be native)
        b.out_is_input = True
        return x, x
    n = x.size
    if mode == "overlap":
        base = np.empty(n + 1, x.dtype)
        xi, out = base[:n].reshape(shape), base[1:].reshape(shape)
    elif mode == "interleaved":
        base = np.empty(2 * n, x.dtype)
        xi, out = base[0::2].reshape(shape), base[1::2].reshape(shape)
    else:  # halves of each last-axis row
        if x.ndim == 0:
            return x, None
        base = np.empty(shape[:-1] + (2 * shape[-1],), x.dtype)
        xi, out = base[..., :shape[-1]], base[..., shape[-1]:]
    xi[...] = x
    if not x.flags.writeable:
        xi.flags.writeable = False
    if np.shares_memory(xi, out):
        b.spec.reject("out")
    if x.dtype != T:
        b.spec.reject("out")
    return xi, out


def _input(case, rng, axis_hint):
    """(x as passed to fastnorm, its float64 values or None, its native dtype or None)."""
    dt = _dtype(case["dtype"])
    shape = tuple(case["shape"])
    vals = _values(case, shape, dt, rng, axis_hint)
    x = vals.astype(dt)
    layout = case["layout"]
    lax = case["layout_axis"]
    if layout == "broadcast" and len(shape) >= 1:
        x = np.broadcast_to(x[:1], shape)   # zero stride on the batch axis, read-only
        vals = np.broadcast_to(vals[:1], shape)
    elif layout == "list" and all(shape):   # (a list of an empty dim loses the dims after it)
        if dt.kind != "f":
            x = x.tolist()
            return x, None, None
        x = x.astype(np.float64).tolist()
        return x, np.asarray(x, np.float64), np.dtype(np.float64)
    else:
        x = _lay_out(x, layout, lax, rng)
        if layout == "readonly":
            x.flags.writeable = False
    xdt = _native(dt) if dt.kind == "f" else None
    return x, (np.asarray(x, np.float64) if xdt is not None else None), xdt


def _compute(xdt):
    return np.dtype(np.float32) if xdt == np.float16 else xdt


def build(case):
    """The concrete call and what it must give (see the module docstring)."""
    import fastnorm as fn

    b = Built()
    spec = b.spec
    rng = np.random.default_rng(case["seed"])
    op = case["op"]
    base = op.removesuffix("_backward")
    backward = op != base
    shape = tuple(case["shape"])
    backend = "fortran" if case["bad_backend"] else case["backend"]
    if case["bad_backend"]:
        spec.reject("backend")
    g = Geometry(case, spec, base, shape)
    x, x64, xdt = _input(case, rng, g.ax)
    if xdt is None:
        spec.reject("input")
    T = None if xdt is None else _compute(xdt)
    w = _param(case["weight"], g.pshape, xdt, rng, spec, "weight", 1.0)
    bias = None
    if base != "rms_norm" and not backward:
        bias = _param(case["bias"], g.pshape, xdt, rng, spec, "bias", 0.0)
    if backward:
        return _build_backward(case, b, fn, base, x, x64, xdt, T, g, w, backend)

    eps = _eps_value(case["eps"], spec, default_ok=base == "rms_norm")
    x, out = _out(case, x, case["layout_axis"], rng, b)
    if isinstance(x, np.ndarray) and x64 is not None:
        x64 = np.asarray(x, np.float64)
    b.out, b.y_dtype = out, xdt
    kw = dict(out=out, return_stats=case["return_stats"], backend=backend)
    if isinstance(x, np.ndarray) and not b.out_is_input:
        b.untouched.append((x, x.copy()))
    if base == "layer_norm":
        b.call = lambda: fn.layer_norm(x, g.ns, w, bias, eps, **kw)
    elif base == "rms_norm":
        b.call = lambda: fn.rms_norm(x, g.ns, w, eps, **kw)
    elif base == "group_norm":
        b.call = lambda: fn.group_norm(x, g.G, w, bias, eps, axis=g.axis, **kw)
    else:
        return _build_channels_forward(case, b, fn, base, x, x64, xdt, T, g, w, bias, eps,
                                       kw, rng)
    if x64 is None or spec.bad:
        return b
    shift = _shift(case, base, g, xdt, x64)
    w64, b64 = _f64(w), _f64(bias)
    with np.errstate(all="ignore"):
        if base == "layer_norm":
            y, m, r = ref_call("layer_norm", x64 - shift, g.pshape, w64, b64, eps)
            stats = {"mean": m + shift, "rstd": r}
        elif base == "rms_norm":
            e = eps if eps is not None else float(np.finfo(xdt).eps)
            y, r = ref_call("rms_norm", x64, g.pshape, w64, e)
            stats, m = {"rstd": r}, None
        else:
            y, m, r = ref_call("group_norm", x64 - shift, g.G, w64, b64, eps, axis=g.ax)
            stats = {"mean": m + shift, "rstd": r}
    exact = case["kind"] == "constant" or m is None
    cond = 0.0 if exact else _cond(m + shift, r, w64)
    b.expect["y"] = (y, xdt, cond)
    if case["return_stats"]:
        lead = g.lead if base in ROWS else m.shape
        for key, v in stats.items():
            b.expect[key] = (np.reshape(v, lead), T, cond * _nanmax(r) if key == "rstd" else 0)
    return b


def ref_call(name, *args, **kw):
    from fastnorm import reference as ref
    return getattr(ref, name)(*args, **kw)


def _f64(a):
    return None if a is None or a.dtype.kind != "f" else a.astype(np.float64)


def _nanmax(a):
    a = np.abs(np.asarray(a, np.float64))
    a = a[np.isfinite(a)]
    return float(a.max()) if a.size else 0.0


def _cond(mean, rstd, w):
    """max |mean| * rstd * |w|: how much the output moves per unit of relative rounding of
    the mean. Every float64 algorithm (the oracle's too) rounds the mean, so y and rstd are
    compared within tol + 1e-14 * cond (~45 ulp of it), on top of the per-dtype tol."""
    with np.errstate(all="ignore"):
        c = _nanmax(np.abs(np.asarray(mean, np.float64)) * np.asarray(rstd, np.float64))
    return c * (_nanmax(w) if w is not None and w.size else 1.0)


def _shift(case, base, g, xdt, x64):
    """A value every statistics group of an exactly constant input holds, subtracted before
    the oracle and added back to its mean: the oracle then sees exact zeros and gives
    exactly beta (NumPy's float64 mean of n copies of c is not c). 0 otherwise."""
    kind = case["kind"]
    if base == "rms_norm" or not x64.size:
        return 0.0
    if kind == "constant":
        finite = x64[np.isfinite(x64)]
        return float(finite.reshape(-1)[0]) if finite.size else 0.0
    if kind == "constant_channel" and base in ("batch_norm", "instance_norm") and g.ax:
        first = np.moveaxis(x64, g.ax, 0).reshape(x64.shape[g.ax], -1)
        per = np.array([next((v for v in row if np.isfinite(v)), 0.0) for row in first])
        return per
    return 0.0


class Geometry:
    """The case's channel axis, C, groups, normalized shape; rejects what is invalid."""

    def __init__(self, case, spec, base, shape):
        nd = len(shape)
        self.axis, self.ax = case["axis"], None   # ax: the valid channel axis in 0..nd-1
        self.N = shape[0] if nd else 1
        if base not in ROWS:
            if nd < 2:
                spec.reject("input")
            elif isinstance(self.axis, int) and -nd <= self.axis < nd:
                self.ax = self.axis % nd
                if base != "batch_norm" and self.ax == 0:
                    spec.reject("axis", why="the batch axis 0")
                    self.ax = None
            else:
                spec.reject("axis")
            self.C = shape[self.ax] if self.ax is not None else (shape[1] if nd >= 2 else 1)
            self.pshape = (self.C,)
            self.S = math.prod(s for i, s in enumerate(shape) if i not in (0, self.ax))
        if base == "group_norm":
            self._groups(case, spec)
        if base in ROWS:
            self._rows(case, spec, shape)

    def _groups(self, case, spec):
        C, kind = self.C, case["num_groups"]
        divisors = [d for d in range(1, max(C, 1) + 1) if C % d == 0]
        G = {"divisor": divisors[case["seed"] % len(divisors)], "one": 1,
             "all": max(C, 1)}.get(kind, kind)
        if kind == "nondivisor":   # (every count divides 0 channels: then 0 groups)
            G = next(d for d in range(2, C + 3) if C % d) if C else 0
        if not (isinstance(G, int) and G >= 1 and C % G == 0):
            spec.reject("num_groups")
        self.G = G

    def _rows(self, case, spec, shape):
        nd = len(shape)
        k = 1 + case["seed"] % max(1, nd)
        kind = case["normalized_shape"]
        true = tuple(shape[nd - k:])
        if nd == 0:
            spec.reject("input", "input", "normalized_shape")
            true = (1,)
        ns = true
        if kind == "int":
            true = true[-1:]
            ns = int(true[0])
        elif kind == "np_int" and len(true) == 1:
            ns = np.int64(true[0])
        elif kind == "list":
            ns = list(true)
        elif kind == "all" and nd:
            true = ns = tuple(shape)
        elif kind == "str":
            ns = "".join(map(str, true))
            spec.reject("normalized_shape", why="a str")
        elif kind == "float":
            ns = tuple(float(s) for s in true)
            spec.reject("normalized_shape", why="floats")
        elif kind == "mismatch":
            ns = true[:-1] + (true[-1] + 1,)
            spec.reject("normalized_shape")
        elif kind == "too_long":
            ns = (2,) + tuple(shape)
            spec.reject("normalized_shape")
        self.ns, self.pshape = ns, true
        self.lead = tuple(shape[:nd - len(true)]) if nd else ()


def _running(case, spec, C, xdt, rng, update):
    kind = case["running"]
    if kind is None:
        return None, None
    T = np.dtype(np.float64) if xdt is None else xdt
    dt = T if kind in ("same", "readonly", "only_mean", "bad_shape") else np.dtype(kind)
    if dt != T and not (T == np.float16 and dt == np.float32):
        spec.allow("running_mean", "running_mean", "running_var")
    rm = rng.normal(0, 1, C).astype(dt)
    rv = rng.uniform(0.5, 2.0, C).astype(dt)
    if kind == "readonly":
        rm.flags.writeable = rv.flags.writeable = False
        (spec.reject if update else spec.allow)("running_mean", "running_mean",
                                                "running_var")
    if kind == "only_mean":
        spec.reject("running_mean", "running_mean", "running_var")
        return rm, None
    if kind == "bad_shape":
        spec.reject("running_var")
        return rm, rng.uniform(0.5, 2.0, C + 1).astype(dt)
    return rm, rv


def _build_channels_forward(case, b, fn, base, x, x64, xdt, T, g, w, bias, eps, kw, rng):
    spec = b.spec
    size = math.prod(case["shape"])
    C, N = g.C, g.N
    flag, truth = _bool_arg(case["training"], spec,
                            "training" if base == "batch_norm" else "use_input_stats")
    update = truth and case["running"] is not None
    if base == "batch_norm":
        if truth and size and size // max(C, 1) == 1:
            spec.reject("input")   # torch: "Expected more than 1 value per channel"
    elif truth and g.ax is not None and g.S == 1 and size:
        spec.reject("input")       # "Expected more than 1 spatial element"
    rm, rv = _running(case, spec, C, xdt, rng, update)
    if not truth and rm is None:
        spec.reject("running_mean", "running_mean", "running_var")
    used = update and rv is not None
    nbt, nbt_ok = _nbt(case, spec, used)
    mom = _momentum(case, spec, used, nbt is not None and nbt_ok)
    f = fn.batch_norm if base == "batch_norm" else fn.instance_norm
    b.call = lambda: f(x, rm, rv, w, bias, flag, mom, eps, axis=g.axis,
                       num_batches_tracked=nbt, **kw)
    if x64 is None or spec.bad:
        return b
    shift = _shift(case, base, g, xdt, x64)
    bshape = [1] * x64.ndim
    bshape[g.ax] = -1
    sh_c = np.broadcast_to(np.asarray(shift, np.float64), (C,))       # per channel
    xs = x64 - (sh_c.reshape(bshape) if np.ndim(shift) else shift)
    rm2 = None if rm is None else rm.astype(np.float64) - sh_c
    rv2 = None if rv is None else rv.astype(np.float64)
    nbt2 = nbt.astype(np.int64) if isinstance(nbt, np.ndarray) else None
    with np.errstate(all="ignore"):
        if base == "batch_norm" and C == 0:
            y, m, r = np.empty(x64.shape), np.empty(0), np.empty(0)
        elif base == "batch_norm":
            y, m, r = ref_call("batch_norm", xs, rm2, rv2, _f64(w), _f64(bias), truth, mom,
                               eps, axis=g.ax, num_batches_tracked=nbt2)
        else:
            y, m, r = ref_call("instance_norm", xs, rm2, rv2, _f64(w), _f64(bias), truth, mom,
                               eps, axis=g.ax, num_batches_tracked=nbt2)
            if not truth:
                m, r = np.broadcast_to(m, (N, C)), np.broadcast_to(r, (N, C))
    m = m + sh_c
    if rm2 is not None:
        rm2 += sh_c
    exact = case["kind"] in ("constant", "constant_channel") or not truth
    cond = 0.0 if exact else _cond(m, r, _f64(w))
    b.expect["y"] = (y, xdt, cond)
    if kw["return_stats"]:
        b.expect["mean"] = (m, T, 0.0)
        b.expect["rstd"] = (r, T, cond * _nanmax(r))
    if rm is not None and rv is not None:
        if update and size:
            # computed from the data: compared at the coarser of the buffer's dtype and
            # the data's compute dtype (float32 data, float64 buffers: float32's tol)
            coarse = max(rm.dtype, T, key=lambda d: tol(d))
            b.mutable["running_mean"] = (rm, rm2, coarse)
            b.mutable["running_var"] = (rv, rv2, coarse)
            if isinstance(nbt, np.ndarray):
                b.mutable["num_batches_tracked"] = (nbt, nbt2, None)
        else:  # eval, or an empty batch: left alone (README: empty arrays)
            b.mutable["running_mean"] = (rm, rm.astype(np.float64), rm.dtype)
            b.mutable["running_var"] = (rv, rv.astype(np.float64), rv.dtype)
            if isinstance(nbt, np.ndarray) and not update:
                b.mutable["num_batches_tracked"] = (nbt, nbt.copy(), None)
    return b


def _grad(case, shape, xdt, rng, spec, layout_axis):
    kind = case["grad_dtype"]
    if kind == "bad_shape":
        spec.reject("grad_out")
        return rng.standard_normal(tuple(shape) + (2,)).astype(xdt or np.float64), None
    dt = (xdt or np.dtype(np.float64)) if kind == "same" else np.dtype(kind)
    if dt.kind != "f":
        spec.reject("grad_out")
    elif xdt is not None and dt != xdt:
        spec.allow("grad_out")   # cast to the input's compute dtype
    v = rng.standard_normal(shape)
    if case["grad_nan"] and v.size:
        v.reshape(-1)[case["seed"] % v.size] = np.nan
    dy = _lay_out(v.astype(dt), case["grad_layout"], layout_axis, rng)
    return dy, np.asarray(dy, np.float64)


def _stats_for(case, spec, shape, m, r, T, rng, names=("mean", "rstd")):
    """mean/rstd handed to a backward, in the compute dtype as return_stats gives them: the
    oracle's forward statistics, or others near them (the backward must use the ones it
    is given); or an invalid one."""
    s = case["stats"]
    m = np.broadcast_to(np.asarray(m, np.float64), shape)
    r = np.broadcast_to(np.asarray(r, np.float64), shape)
    if s == "random":
        with np.errstate(all="ignore"):
            m = m + rng.normal(0, 1, shape) / np.where(np.isfinite(r) & (r > 0), r, 1.0)
        r = r * rng.uniform(0.5, 2.0, shape)
    dt = T if T is not None else np.float64
    out = {"mean": m.astype(dt), "rstd": r.astype(dt)}
    for name in names:
        if s == f"none_{name}":
            out[name] = None
            spec.reject(name, *names)
        elif s == f"bad_shape_{name}":
            # a leading 17 (no drawn input has 17 samples): a backward that infers the
            # normalized shape from rstd's rank cannot take it for another valid split
            out[name] = np.ones((17,) + tuple(shape), dt)
            spec.reject(name, *names, "normalized_shape")
        elif s == f"int_{name}":
            out[name] = np.ones(shape, np.int32)
            spec.reject(name)
    return out


def _build_backward(case, b, fn, base, x, x64, xdt, T, g, w, backend):
    spec = b.spec
    rng = np.random.default_rng(case["seed"] + 1)
    if isinstance(x, list):
        x = np.asarray(x)  # backward takes arrays; a list is a forward-only spelling
    shape = tuple(case["shape"])
    dy, dy64 = _grad(case, shape, xdt, rng, spec, case["layout_axis"])
    has_bias, w64 = case["has_bias"], _f64(w)
    ok = x64 is not None and dy64 is not None
    flag, truth = True, True
    if base == "batch_norm":
        flag, truth = _bool_arg(case["training"], spec, "training")
    elif base == "instance_norm":
        flag, truth = _bool_arg(case["training"], spec, "use_input_stats")
    rows = base in ROWS
    kw = {}
    if rows:
        if case["ns_keyword"]:
            kw["normalized_shape"] = g.ns
        else:  # not passed: cannot be wrong
            spec.bad.pop("normalized_shape", None)
    # the statistics: the oracle forward's where it is defined, else any
    sshape = {"batch_norm": (g.C,) if not rows else None, "instance_norm": (g.N, g.C)
              if not rows else None, "group_norm": None}.get(base)
    m = r = None
    with np.errstate(all="ignore"):
        data_ok = ok and not spec.bad and x64.size and truth
        if base == "batch_norm" and data_ok:
            _, m, r = ref_call("batch_norm", x64, None, None, training=True, axis=g.ax)
        elif base == "instance_norm" and data_ok:
            _, m, r = ref_call("instance_norm", x64, axis=g.ax)
        elif base == "group_norm" and data_ok:
            _, m, r = ref_call("group_norm", x64, g.G, axis=g.ax)
        elif base == "layer_norm" and data_ok:
            _, m, r = ref_call("layer_norm", x64, g.pshape)
        elif base == "rms_norm" and data_ok:
            _, r = ref_call("rms_norm", x64, g.pshape, None, 1e-5)
            m = np.zeros(r.shape)
    if base == "group_norm":
        Gs = g.G if isinstance(g.G, int) and g.G > 0 else 1
        sshape = (g.N, Gs)
    elif rows:
        sshape = g.lead
    if base == "instance_norm" and not truth:
        # running statistics: one value per channel, the same for every sample
        m, r = rng.normal(size=g.C), rng.uniform(0.5, 2, g.C)
    if m is None:
        m, r = rng.normal(size=sshape), rng.uniform(0.5, 2, sshape)
    names = ("rstd",) if base == "rms_norm" else ("mean", "rstd")
    st = _stats_for(case, spec, sshape, m, r, T, rng, names)
    if base == "instance_norm" and not truth and case["stats"] == "random":
        st = _stats_for(dict(case, stats="oracle"), spec, sshape, m, r, T, rng, names)
    sm, sr = st["mean"], st["rstd"]
    if base == "batch_norm":
        b.call = lambda: fn.batch_norm_backward(dy, x, sm, sr, w, flag, axis=g.axis,
                                                has_bias=has_bias, backend=backend)
    elif base == "instance_norm":
        b.call = lambda: fn.instance_norm_backward(dy, x, sm, sr, w, flag, axis=g.axis,
                                                   has_bias=has_bias, backend=backend)
    elif base == "group_norm":
        b.call = lambda: fn.group_norm_backward(dy, x, sm, sr, w, num_groups=g.G,
                                                axis=g.axis, has_bias=has_bias,
                                                backend=backend)
    elif base == "layer_norm":
        b.call = lambda: fn.layer_norm_backward(dy, x, sm, sr, w, has_bias=has_bias,
                                                backend=backend, **kw)
    else:
        b.call = lambda: fn.rms_norm_backward(dy, x, sr, w, backend=backend, **kw)
    for a in (x, dy):
        if isinstance(a, np.ndarray):
            b.untouched.append((a, a.copy()))
    b.y_dtype = xdt
    if not ok or spec.bad:
        return b
    with np.errstate(all="ignore"):
        if base == "batch_norm":
            want = ref_call("batch_norm_backward", dy64, x64, sm, sr, w64, truth, axis=g.ax)
        elif base == "instance_norm":
            # eval: the oracle takes the per-channel running statistics (C,)
            per_c = (lambda a: a) if truth else (lambda a: np.asarray(a, np.float64)[0] if
                                                 g.N else np.zeros(g.C))
            want = ref_call("instance_norm_backward", dy64, x64, per_c(sm), per_c(sr), w64,
                            truth, axis=g.ax)
        elif base == "group_norm":
            want = ref_call("group_norm_backward", dy64, x64, sm, sr, w64, g.G, axis=g.ax)
        else:
            want = ref_call("layer_norm_backward", dy64, x64,
                            np.zeros(sshape) if base == "rms_norm" else sm, sr, w64,
                            rms=base == "rms_norm")
    # parameter gradients come back in the weight's dtype: held to the coarser of it and T
    P = T
    if isinstance(w, np.ndarray) and T is not None and w.dtype.itemsize < np.dtype(T).itemsize:
        P = w.dtype
    b.expect["grad_x"] = (want[0], xdt, 0.0)
    b.expect["grad_weight"] = (want[1] if w is not None else None, P, 0.0)
    if base != "rms_norm":
        b.expect["grad_bias"] = (want[2] if has_bias else None, P, 0.0)
    return b


# ====================================================================== checking a case

def mismatch(actual, expected, dtype, cond=0.0):
    """None when ``actual`` is the oracle's ``expected`` (float64) in ``dtype``, else why.

    Allowed error: ``tol(dtype, max|expected|) + 1e-14 * cond`` (see ``_cond``)."""
    if expected is None:
        return None if actual is None else f"expected None, got {type(actual).__name__}"
    if not isinstance(actual, np.ndarray):
        return f"expected an array, got {type(actual).__name__}"
    e = np.asarray(expected, np.float64)
    if actual.shape != e.shape:
        return f"shape {actual.shape} != {e.shape}"
    a = actual.astype(np.float64)
    with np.errstate(all="ignore"):
        ec = e.astype(dtype).astype(np.float64)     # overflows as the output dtype does
    bad = np.isnan(a) != np.isnan(ec)
    fa, fe = np.isfinite(a), np.isfinite(ec)
    bad |= fa != fe
    bad |= ~fa & ~fe & ~np.isnan(a) & (a != ec)     # an Inf of the other sign
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        return (f"{int(bad.sum())} of {a.size} NaN/Inf differ, first at {i}: got {a[i]!r}, "
                f"want {e[i]!r}")
    both = fa & fe
    if both.any():
        scale = float(np.abs(e[both]).max())
        err = float(np.abs(a[both] - e[both]).max())
        allowed = tol(dtype, scale) + 1e-14 * cond
        if not err <= allowed:
            return f"max abs error {err:.3g} > {allowed:.3g} (scale {scale:.3g})"
    return None


def _names_any(msg, names):
    return any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names)


def run_case(case):
    """One case in this process -> verdict dict {"verdict": "ok" | a finding kind, ...}."""
    import fastnorm as fn
    fn.set_num_threads(case["threads"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = build(case)
        inject = case.get("inject")
        if inject == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if inject == "hang":
            time.sleep(3600)
        if inject == "oob":   # read 32 bytes of a 16-byte heap block: ASan must report it
            import ctypes
            libc = ctypes.CDLL(None)
            libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
            ctypes.string_at(libc.malloc(16), 32)
        try:
            if inject == "unnamed":
                raise ValueError("something is wrong")
            with np.errstate(all="ignore"):
                result = b.call()
        except (ValueError, TypeError) as e:
            msg = f"{type(e).__name__}: {e}"
            names = b.spec.names()
            if not names:
                return dict(verdict="rejected-valid", detail=msg)
            if not _names_any(str(e), names):
                return dict(verdict="unnamed-error", detail=f"{msg} (expected one of "
                            f"{sorted(names)})")
            return dict(verdict="ok", detail="rejected")
        except Exception as e:
            return dict(verdict="wrong-exception",
                        detail=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    if b.spec.bad:
        return dict(verdict="accepted-invalid", detail="accepted " +
                    "; ".join(b.spec.reasons()), args=sorted(b.spec.bad))
    if inject == "wrong":
        result = (result[0] + 1.0,) + tuple(result[1:]) if isinstance(result, tuple) \
            else result + 1.0
    problems = _check(case, b, result)
    if problems:
        return dict(verdict="wrong-result", detail="; ".join(problems)[:600],
                    outputs=sorted({p.split(":")[0] for p in problems}))
    return dict(verdict="ok", detail="result")


def _check(case, b, result):
    problems = []
    op = case["op"]
    keys = list(b.expect)
    if op in BACKWARD:
        got = dict(zip(keys, result)) if isinstance(result, tuple) and len(result) == \
            len(keys) else None
        if got is None:
            return [f"return: expected a {len(keys)}-tuple, got {type(result).__name__}"]
    else:
        if case["return_stats"]:
            if not (isinstance(result, tuple) and len(result) == len(keys)):
                return [f"return: expected {len(keys)} arrays"]
            got = dict(zip(keys, result))
        else:
            got = {"y": result}
        y = got["y"]
        if not isinstance(y, np.ndarray):
            return [f"y: not an array but {type(y).__name__}"]
        if b.out is not None and y is not b.out:
            problems.append("y: out= given but another array returned")
        if y.dtype != b.y_dtype:
            problems.append(f"y: dtype {y.dtype} != {b.y_dtype}")
    for key, (want, dt, cond) in b.expect.items():
        why = mismatch(got[key], want, dt if dt is not None else np.float64, cond)
        if why:
            problems.append(f"{key}: {why}")
    gx = got.get("grad_x")
    if isinstance(gx, np.ndarray) and gx.dtype != b.y_dtype:
        problems.append(f"grad_x: dtype {gx.dtype} != {b.y_dtype}")
    for key, (arr, want, dt) in b.mutable.items():
        if dt is None:
            if int(arr) != int(want):
                problems.append(f"{key}: {int(arr)} != {int(want)}")
        else:
            why = mismatch(arr, want, dt)
            if why:
                problems.append(f"{key}: {why}")
    for arr, copy in b.untouched:
        if not np.array_equal(arr, copy, equal_nan=arr.dtype.kind in "fc"):
            problems.append("input: modified by the call")
    return problems


# ============================================================================ the worker

def worker():
    """Reads cases (JSON lines) from stdin, answers verdicts on the fd in FUZZ_FD."""
    proto = os.fdopen(int(os.environ["FASTNORM_FUZZ_FD"]), "w", buffering=1)
    os.dup2(2, 1)   # stray prints (numba, warnings) go to the log, not the protocol
    ext = os.environ.get("FASTNORM_FUZZ_EXT")
    if ext:
        _load_extension(ext)
    import fastnorm as fn
    backends = fn.available_backends()
    info = {"ready": True, "pid": os.getpid(), "backends": backends}
    if "cython" in backends:
        import fastnorm_cy._kernels as k
        info["cython_extension"] = k.__file__
    _warm(fn, backends)
    proto.write(json.dumps(info) + "\n")
    for line in sys.stdin:
        case = json.loads(line)
        try:
            v = run_case(case)
        except Exception:   # a bug of the harness itself: say so, do not count it as ok
            v = dict(verdict="harness-error", detail=traceback.format_exc()[-1500:])
        proto.write(json.dumps(v) + "\n")


def _load_extension(path):
    """Load fastnorm_cy._kernels from ``path`` (e.g. an ASan build) before fastnorm does."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("fastnorm_cy._kernels", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastnorm_cy._kernels"] = mod
    spec.loader.exec_module(mod)


def _warm(fn, backends):
    """One call of every op per backend, so Numba's loading/JIT is not a case's timeout."""
    x = np.random.default_rng(0).standard_normal((4, 6, 5))
    for be in backends:
        for T in (np.float32, np.float64):
            xt = x.astype(T)
            for n in (1, 2):
                fn.set_num_threads(n)
                big = np.zeros((64, 8, 65), T)
                fn.batch_norm(big, None, None, training=True, backend=be)
                fn.layer_norm(big, 65, backend=be)
            y, m, r = fn.batch_norm(xt, None, None, training=True, return_stats=True,
                                    backend=be)
            fn.batch_norm_backward(xt, xt, m, r, backend=be)
            fn.batch_norm(xt, m, r, axis=-1 if False else 1, backend=be)
            y, m, r = fn.layer_norm(xt, 5, return_stats=True, backend=be)
            fn.layer_norm_backward(xt, xt, m, r, backend=be)
            fn.rms_norm_backward(xt, xt, r, backend=be)
            y, m, r = fn.group_norm(xt, 2, return_stats=True, backend=be)
            fn.group_norm_backward(xt, xt, m, r, num_groups=2, backend=be)
            y, m, r = fn.instance_norm(xt, return_stats=True, backend=be)
            fn.instance_norm_backward(xt, xt, m, r, backend=be)
            fn.instance_norm(np.moveaxis(xt, 1, -1), axis=-1, backend=be)


class Pool:
    """Worker processes fed cases; a worker that dies or hangs is reported and replaced.

    ``env``: extra environment of the workers only (LD_PRELOAD of libasan, ASAN_OPTIONS):
    the parent stays an ordinary process.
    """

    def __init__(self, workers=1, timeout=60.0, env=None, log_dir=None):
        self.n, self.timeout, self.env = workers, timeout, dict(env or {})
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="fastnorm-fuzz-")
        self.procs = [None] * workers
        self.busy = [None] * workers     # (case, start time) in flight
        self.results = []                # (case, verdict)
        self.info = None
        self.restarts = 0
        self._logs = {}

    def _start(self, i):
        r, w = os.pipe()
        env = dict(os.environ, FASTNORM_FUZZ_FD=str(w), **self.env)
        log = open(os.path.join(self.log_dir, f"worker{i}-{self.restarts}.log"), "w+")
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log,
                             pass_fds=(w,), env=env, text=True)
        os.close(w)
        p.proto = os.fdopen(r, "r")
        p.log = log
        line = self._readline(p, 600.0)
        if not line:
            raise RuntimeError(f"fuzz worker did not start:\n{self._tail(p)}")
        self.info = json.loads(line)
        self.procs[i] = p

    def _readline(self, p, timeout):
        ready, _, _ = select.select([p.proto], [], [], timeout)
        return p.proto.readline() if ready else None

    def _tail(self, p, n=4000):
        p.log.flush()
        p.log.seek(0)
        return p.log.read()[-n:]

    def submit(self, case):
        """Send ``case`` to an idle worker (waiting for one to finish if all are busy)."""
        while True:
            for i in range(self.n):
                if self.procs[i] is None:
                    self._start(i)
                if self.busy[i] is None:
                    self.procs[i].stdin.write(json.dumps(case) + "\n")
                    self.procs[i].stdin.flush()
                    self.busy[i] = (case, time.monotonic())
                    return
            self._collect(block=True)

    def _collect(self, block):
        live = [i for i in range(self.n) if self.busy[i] is not None]
        if not live:
            return
        fds = {self.procs[i].proto: i for i in live}
        deadline = min(self.busy[i][1] for i in live) + self.timeout
        wait = max(0.0, deadline - time.monotonic()) if block else 0.0
        ready, _, _ = select.select(list(fds), [], [], wait)
        for f in ready:
            self._finish(fds[f], f.readline())
        now = time.monotonic()
        for i in live:
            if self.busy[i] is not None and now - self.busy[i][1] > self.timeout:
                self._finish(i, None, hang=True)

    def _finish(self, i, line, hang=False):
        case, _ = self.busy[i]
        self.busy[i] = None
        p = self.procs[i]
        if line:
            self.results.append((case, json.loads(line)))
            return
        # died (or hung): report the case with the worker's last words, start another
        if hang:
            p.kill()
        rc = p.wait()
        tail = self._tail(p)
        if hang:
            v = dict(verdict="hang", detail=f"no answer in {self.timeout:.0f} s")
        else:
            how = f"signal {-rc} ({signal.Signals(-rc).name})" if rc < 0 else f"exit {rc}"
            v = dict(verdict="crash", detail=f"worker died: {how}", log=tail)
        full = self._tail(p, 10**7)
        if "ERROR: AddressSanitizer" in full:
            at = full.index("ERROR: AddressSanitizer")
            v["asan"] = full[max(0, at - 40):at + 6000]
        self.results.append((case, v))
        p.log.close()
        self.procs[i] = None
        self.restarts += 1

    def run(self, case):
        """Submit one case and wait for its verdict (one worker)."""
        self.submit(case)
        self.drain()
        return self.results[-1][1]

    def drain(self):
        while any(b is not None for b in self.busy):
            self._collect(block=True)

    def asan_reports(self):
        """ASan reports in the logs of workers still alive (halt_on_error=0 keeps them)."""
        out = []
        for p in self.procs:
            if p is not None and "ERROR: AddressSanitizer" in self._tail(p, 10**7):
                out.append(self._tail(p))
        return out

    def close(self):
        for p in self.procs:
            if p is not None:
                p.stdin.close()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                p.log.close()
        self.procs = [None] * self.n


# =========================================================================== reporting

def signature(case, v):
    """Findings of one cause share a signature: kind, function, what went wrong."""
    kind = v["verdict"]
    if kind == "accepted-invalid":
        return f"{kind:16s} {case['op']:22s} {'; '.join(v['args'])}"
    detail = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", v.get("detail", ""))
    detail = re.sub(r"\(#(, #)*,?\)|\[[^\]]*\]", "(...)", detail)
    if kind == "wrong-result":
        detail = ",".join(v.get("outputs", [])) + f" dtype={case['dtype']}"
        if case["kind"] != "normal" or case["specials"]:
            detail += f" values={case['kind']}" + ("+specials" if case["specials"] else "")
        detail += f" backend={case['backend']}"
    elif kind in ("crash", "hang"):
        detail = f"{detail} backend={case['backend']}"
    return f"{kind:16s} {case['op']:22s} {detail[:150]}"


def summarize(results, top=40):
    counts = Counter(v["verdict"] for _, v in results)
    groups = defaultdict(list)
    for case, v in results:
        if v["verdict"] != "ok":
            groups[signature(case, v)].append((case, v))
    return counts, groups


def report(results, elapsed, pool, file=sys.stdout):
    counts, groups = summarize(results)
    n = len(results)
    print(f"{n} cases in {elapsed:.0f} s ({n / max(elapsed, 1e-9):.0f}/s), worker restarts "
          f"{pool.restarts}; verdicts: " + ", ".join(f"{k} {c}" for k, c in
                                                     counts.most_common()), file=file)
    findings = sum(len(g) for g in groups.values())
    print(f"{findings} findings in {len(groups)} signatures", file=file)
    by_arg = Counter(a for _, v in results if v["verdict"] == "accepted-invalid"
                     for a in v["args"])
    if by_arg:
        print("accepted-invalid, by argument (a case may count for several): " +
              ", ".join(f"{a} {c}" for a, c in by_arg.most_common()), file=file)
    for sig, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        case, v = min(items, key=lambda cv: math.prod(cv[0]["shape"]) or 0)
        print(f"\n[{len(items)}x] {sig}\n    {v.get('detail', '')[:400]}\n    replay: "
              f"python bench/fuzz.py --replay '{json.dumps(case)}'", file=file)
        if "asan" in v:
            print("    ASan: " + v["asan"][:1500].replace("\n", "\n    "), file=file)
    return groups


def generate(backends, n, seed, on_case, big=0.03):
    """Draw ``n`` cases with hypothesis (fixed seed, no database, no shrinking)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    @hseed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(strategy(backends, big))
    def draw(case):
        on_case(case)

    draw()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--big", type=float, default=0.03,
                    help="share of cases above the parallel threshold")
    ap.add_argument("--backends", default=None, help="comma-separated (default: all)")
    ap.add_argument("--asan-ext", default=None,
                    help="fastnorm_cy._kernels built with FASTNORM_SANITIZE=address")
    ap.add_argument("--preload", default=None, help="LD_PRELOAD of the workers (libasan)")
    ap.add_argument("--asan-selftest", action="store_true",
                    help="first check that a heap overflow in a worker is reported")
    ap.add_argument("--json", default=None, help="write the verdict counts and findings")
    ap.add_argument("--replay", default=None, help="one case (JSON) in this process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker()
    if args.replay:
        case = json.loads(args.replay)
        b = build(case)
        print("spec: bad", sorted(b.spec.bad), "either", sorted(b.spec.either))
        try:
            v = run_case(case)
        finally:
            pass
        print(json.dumps(v, indent=1))
        if v["verdict"] in ("wrong-exception", "rejected-valid", "unnamed-error"):
            try:
                b.call()
            except Exception:
                traceback.print_exc()
        return 0 if v["verdict"] == "ok" else 1
    env = {}
    if args.asan_ext:
        env["FASTNORM_FUZZ_EXT"] = os.path.abspath(args.asan_ext)
        env.setdefault("ASAN_OPTIONS", os.environ.get(
            "ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1:abort_on_error=0"))
    if args.preload:
        env["LD_PRELOAD"] = args.preload
    pool = Pool(args.workers, args.timeout, env)
    pool._start(0)
    info = pool.info
    backends = args.backends.split(",") if args.backends else info["backends"]
    print(f"fastnorm fuzz: {args.cases} cases, seed {args.seed}, backends {backends}, "
          f"{args.workers} worker(s); cython extension: {info.get('cython_extension')}"
          + (f"; LD_PRELOAD={args.preload}" if args.preload else ""), flush=True)
    if args.asan_selftest:
        v = pool.run(dict(DEFAULTS, op="layer_norm", backend=backends[0], seed=0, threads=1,
                          shape=[2, 3], dtype="float64", layout="C", layout_axis=0,
                          kind="normal", offset=0.0, scale=1.0, specials=[], weight=None,
                          inject="oob"))
        ok = v["verdict"] == "crash" and "heap-buffer-overflow" in v.get("asan", "")
        print(f"ASan self-test (a 16-byte heap block read as 32 bytes): "
              f"{'reported' if ok else 'NOT REPORTED: ' + json.dumps(v)[:500]}", flush=True)
        pool.results.clear()
        pool.restarts = 0   # the self-test's own restart
        if not ok:
            return 2
    t0 = time.monotonic()
    last = [t0]

    def on_case(case):
        pool.submit(case)
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            bad = sum(v["verdict"] != "ok" for _, v in pool.results)
            print(f"  {len(pool.results)} cases, {bad} findings, "
                  f"{last[0] - t0:.0f} s", flush=True)

    try:
        generate(backends, args.cases, args.seed, on_case, args.big)
        pool.drain()
    finally:
        reports = pool.asan_reports()
        pool.close()
    elapsed = time.monotonic() - t0
    groups = report(pool.results, elapsed, pool)
    for r in reports:
        print("ASan report in a live worker's log:\n" + r[:3000])
    if args.json:
        counts, _ = summarize(pool.results)
        with open(args.json, "w") as f:
            json.dump({"cases": len(pool.results), "seconds": round(elapsed, 1),
                       "seed": args.seed, "backends": backends, "verdicts": dict(counts),
                       "asan_ext": args.asan_ext, "restarts": pool.restarts,
                       "findings": {s: {"count": len(g), "example": g[0][0],
                                        "detail": g[0][1].get("detail", "")[:500]}
                                    for s, g in groups.items()}}, f, indent=1)
    return 1 if groups or reports else 0   # a finding fails the run (CI's short one too)


if __name__ == "__main__":
    sys.exit(main())
