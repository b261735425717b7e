"""python -m fastnorm bench: every variant against NumPy, torch, onnxruntime and the memory floor.

One case table (``CASE_TABLE``) serves this command and the pytest-benchmark suite in
``bench/``. For each case × mode × dtype × thread count the command times, in rotated order
within the same run, every implementation:

- ``floor``: streaming loops doing exactly the mandatory memory passes of the mode on arrays of
  the same size, at the same thread count (``fastnorm._floor``);
- ``fastnorm`` (the default backend, fresh outputs), each other compiled backend, and the
  default backend with ``out=`` reuse for the forward modes (page faults made visible);
- ``numpy``: fastnorm's "numpy" backend, the vectorized NumPy twins of ``fastnorm.reference``;
- ``torch`` and ``onnxruntime`` when installed (never required).

Figures: median ms, GB/s from ARCHITECTURE.md §6's byte formula (training forward 3·S, eval 2·S,
backward 5·S, forward+backward 8·S, S = bytes of x), ``floor/ours`` = floor time / fastnorm time,
and speedups = peer time / fastnorm time. Every peer's output is checked against the NumPy
backend's once per case, so a wrong peer cannot look fast.

Top-level imports stay cheap: numba, torch, onnxruntime, tqdm and matplotlib are imported
inside the functions that need them.
"""
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

MODES = ("forward", "eval", "backward", "forward+backward")
PASSES = {"forward": 3, "eval": 2, "backward": 5, "forward+backward": 8}  # × S, ARCHITECTURE.md §6
VARIANTS = ("batch", "instance", "group", "layer", "rms")
PEERS = ("numpy", "torch", "onnxruntime")
DTYPES = ("float32", "float64")
_SHORT = {"batch": "BN", "instance": "IN", "group": "GN", "layer": "LN", "rms": "RMS"}
_GROUPS = 32

# The case table: (variant, layout, full shape, quick shape). Shapes are those of the array
# the user holds: NCHW (N, C, H, W) with the channel axis 1, NHWC (N, H, W, C) with axis -1,
# rows (R, M) normalized over M. Full shapes are the README's large cases; LN 8192×1024
# (32 MiB in float32) is where fresh outputs come from mmap and page faults show. Quick shapes
# (1.5-3 MiB in float32) fit in the 32 MiB L3 cache, so their floor runs at cache speed: quick mode
# is a smoke run, the README's table comes from the full mode.
CASE_TABLE = (
    ("batch", "NCHW", (32, 64, 56, 56), (8, 64, 28, 28)),
    ("batch", "NHWC", (32, 56, 56, 64), (8, 28, 28, 64)),
    ("instance", "NCHW", (32, 64, 56, 56), (8, 64, 28, 28)),
    ("instance", "NHWC", (32, 56, 56, 64), (8, 28, 28, 64)),
    ("group", "NCHW", (32, 64, 56, 56), (8, 64, 28, 28)),
    ("group", "NHWC", (32, 56, 56, 64), (8, 28, 28, 64)),
    ("layer", "rows", (4096, 768), (1024, 768)),
    ("rms", "rows", (4096, 768), (1024, 768)),
    ("layer", "rows", (8192, 1024), None),
)


@dataclass(frozen=True)
class Case:
    """One benchmark problem: a variant on an array of ``shape`` in ``layout``."""

    variant: str
    layout: str        # "NCHW" (channels-first, axis 1), "NHWC" (axis -1), "rows"
    shape: tuple

    @property
    def axis(self):
        return -1 if self.layout == "NHWC" else 1

    @property
    def channels(self):
        """C for batch/instance/group (size of the channel axis), M for layer/rms."""
        return self.shape[-1] if self.layout in ("NHWC", "rows") else self.shape[1]

    @property
    def groups(self):
        return math.gcd(self.channels, _GROUPS) if self.variant == "group" else 0

    @property
    def modes(self):
        """eval exists where the forward can use running statistics (batch, instance)."""
        return tuple(m for m in MODES if m != "eval" or self.variant in ("batch", "instance"))

    @property
    def label(self):
        name = _SHORT[self.variant] + (f"({self.groups})" if self.groups else "")
        lay = "" if self.layout == "rows" else " " + self.layout
        return f"{name}{lay} {'×'.join(map(str, self.shape))}"

    def nbytes(self, dtype):
        return math.prod(self.shape) * np.dtype(dtype).itemsize


def parse_shape(text):
    """'[variant:]AxBxC' -> (variant or None, (A, B, C)); raises ValueError naming --shape."""
    variant, _, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().replace("×", "x").split("x"))
    except ValueError:
        raise ValueError(f"--shape must look like 32x64x56x56 or layer:4096x768, got {text!r}") \
            from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"--shape needs at least 2 positive dimensions, got {text!r}")
    if variant and variant not in VARIANTS:
        raise ValueError(f"--shape variant must be one of {VARIANTS}, got {variant!r}")
    return variant or None, shape


def user_cases(variant, shape):
    """Cases for a user shape given channels-first (N, C, *spatial) or as rows (R, M)."""
    out = []
    for v in ([variant] if variant else VARIANTS):
        if v in ("layer", "rms"):
            out.append(Case(v, "rows", shape))
            continue
        if v != "batch" and len(shape) < 3:
            continue  # instance/group norm need spatial dimensions
        out.append(Case(v, "NCHW", shape))
        if len(shape) >= 3:
            out.append(Case(v, "NHWC", (shape[0],) + shape[2:] + (shape[1],)))
    return out


def cases(quick=False, variants=VARIANTS, shapes=(), defaults=True):
    """The case list: the table's shapes (full or quick) plus the user's ``shapes``."""
    out = []
    if defaults:
        for v, lay, full, small in CASE_TABLE:
            shape = small if quick else full
            if v in variants and shape is not None:
                out.append(Case(v, lay, shape))
    for text in shapes:
        out += [c for c in user_cases(*parse_shape(text)) if c.variant in variants]
    return list(dict.fromkeys(out))  # drop duplicates, keep order


# ---------------------------------------------------------------------------- problems

class Problem:
    """The arrays of one case in one dtype: x, dy, weight, bias, running mean/var."""

    def __init__(self, case, dtype, seed=0):
        rng = np.random.default_rng(seed)
        dt = np.dtype(dtype)
        self.case, self.dtype = case, dt
        self.x = (rng.standard_normal(case.shape, dtype=np.float64) * 2 + 3).astype(dt)
        self.dy = rng.standard_normal(case.shape, dtype=np.float64).astype(dt)
        C = case.channels
        self.w = (1 + 0.1 * rng.standard_normal(C)).astype(dt)
        self.b = (0.1 * rng.standard_normal(C)).astype(dt)
        self.rm = np.full(C, 3, dt)   # close to the data's statistics, so eval is sane
        self.rv = np.full(C, 4, dt)

    @property
    def nbytes(self):
        return self.x.nbytes


class Unavailable(Exception):
    """A peer that cannot run a case; the message says why (shown as n/a)."""


def _first(r):
    return r[0] if isinstance(r, (tuple, list)) else r


def fastnorm_fn(p, mode, backend, out=False):
    """fastnorm's call for ``mode`` on problem ``p`` -> (callable, result -> ndarray)."""
    import fastnorm as fn
    c, x, dy, w, b = p.case, p.x, p.dy, p.w, p.b
    ax, kw = c.axis, dict(backend=backend)
    rm, rv = p.rm.copy(), p.rv.copy()
    ns = (c.channels,)
    if c.variant == "batch":
        def fwd(train, **k):
            return fn.batch_norm(x, rm, rv, w, b, training=train, axis=ax, **kw, **k)

        def bwd(*s):
            return fn.batch_norm_backward(dy, x, *s, w, axis=ax, **kw)
    elif c.variant == "instance":
        def fwd(train, **k):
            if train:
                return fn.instance_norm(x, None, None, w, b, axis=ax, **kw, **k)
            return fn.instance_norm(x, rm, rv, w, b, use_input_stats=False, axis=ax, **kw, **k)

        def bwd(*s):
            return fn.instance_norm_backward(dy, x, *s, w, axis=ax, **kw)
    elif c.variant == "group":
        def fwd(train, **k):
            return fn.group_norm(x, c.groups, w, b, axis=ax, **kw, **k)

        def bwd(*s):
            return fn.group_norm_backward(dy, x, *s, w, num_groups=c.groups, axis=ax, **kw)
    elif c.variant == "layer":
        def fwd(train, **k):
            return fn.layer_norm(x, ns, w, b, **kw, **k)

        def bwd(*s):
            return fn.layer_norm_backward(dy, x, *s, w, normalized_shape=ns, **kw)
    else:
        def fwd(train, **k):
            return fn.rms_norm(x, ns, w, **kw, **k)

        def bwd(*s):
            return fn.rms_norm_backward(dy, x, *s, w, normalized_shape=ns, **kw)
    k = {"out": np.empty_like(x)} if out else {}
    if mode == "forward":
        call = lambda: fwd(True, **k)                                     # noqa: E731
    elif mode == "eval":
        call = lambda: fwd(False, **k)                                    # noqa: E731
    elif mode == "backward":
        stats = fwd(True, return_stats=True)[1:]
        call = lambda: bwd(*stats)                                        # noqa: E731
    else:
        call = lambda: bwd(*fwd(True, return_stats=True)[1:])             # noqa: E731
    return call, _first


def _torch_perm(case):
    """Axis order turning the held array into torch's logical (N, C, *spatial) view."""
    nd = len(case.shape)
    if case.layout != "NHWC":
        return None
    return (0, nd - 1) + tuple(range(1, nd - 1))


def torch_fn(p, mode, threads):
    """torch.nn.functional on the same memory (torch.from_numpy: no copy)."""
    try:
        import torch
    except ImportError:
        raise Unavailable("torch is not installed") from None
    F = torch.nn.functional
    torch.set_num_threads(threads)
    c = p.case
    perm = _torch_perm(c)
    inv = None if perm is None else tuple(np.argsort(perm))

    def t(a):  # channels-last memory becomes torch's channels_last strides
        v = torch.from_numpy(a)
        return v if perm is None else v.permute(perm)
    x, dy = t(p.x), t(p.dy)
    w, b = torch.from_numpy(p.w), torch.from_numpy(p.b)
    rm, rv = torch.from_numpy(p.rm.copy()), torch.from_numpy(p.rv.copy())
    ns = (c.channels,)

    def op(x, train, w, b):
        if c.variant == "batch":
            return F.batch_norm(x, rm, rv, w, b, training=train)
        if c.variant == "instance":
            if train:
                return F.instance_norm(x, weight=w, bias=b)
            return F.instance_norm(x, rm, rv, w, b, use_input_stats=False)
        if c.variant == "group":
            return F.group_norm(x, c.groups, w, b)
        if c.variant == "layer":
            return F.layer_norm(x, ns, w, b)
        return F.rms_norm(x, ns, w)

    def result(r):
        r = _first(r).detach()
        return (r if inv is None else r.permute(inv)).numpy()

    if mode in ("forward", "eval"):
        train = mode == "forward"
        return (lambda: op(x, train, w, b)), result
    xg, wg, bg = (a.detach().requires_grad_(True) for a in (x, w, b))  # same memory
    params = (xg, wg) if c.variant == "rms" else (xg, wg, bg)
    if mode == "backward":
        y = op(xg, True, wg, bg)
        return (lambda: torch.autograd.grad(y, params, dy, retain_graph=True)), result
    return (lambda: torch.autograd.grad(op(xg, True, wg, bg), params, dy)), result


def onnxruntime_fn(p, mode, threads):
    """An ONNX graph of one normalization node, run by onnxruntime's CPU provider."""
    c = p.case
    if mode in ("backward", "forward+backward"):
        raise Unavailable("inference runtime: no backward")
    if c.layout == "NHWC":
        raise Unavailable("ONNX normalization ops are channels-first only")
    if c.variant == "instance" and mode == "eval":
        raise Unavailable("ONNX InstanceNormalization has no running statistics")
    try:
        import onnxruntime as ort
        from onnx import helper, numpy_helper
    except ImportError as e:
        raise Unavailable(f"{e.name} is not installed") from None
    elem = helper.np_dtype_to_tensor_dtype(p.dtype)
    inits = {"w": p.w, "b": p.b, "rm": p.rm.copy(), "rv": p.rv.copy()}
    eps = float(np.finfo(p.dtype).eps) if c.variant == "rms" else 1e-5
    stash = elem  # statistics in the data's precision (ONNX's default stash_type is float32)
    if c.variant == "batch":
        train = mode == "forward"
        node = helper.make_node("BatchNormalization", ["x", "w", "b", "rm", "rv"],
                                ["y", "rm_out", "rv_out"] if train else ["y"],
                                epsilon=eps, momentum=0.9, training_mode=int(train))
    elif c.variant == "instance":
        node = helper.make_node("InstanceNormalization", ["x", "w", "b"], ["y"], epsilon=eps)
    elif c.variant == "group":
        node = helper.make_node("GroupNormalization", ["x", "w", "b"], ["y"], epsilon=eps,
                                num_groups=c.groups, stash_type=stash)
    elif c.variant == "layer":
        node = helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1,
                                epsilon=eps, stash_type=stash)
    else:
        node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], axis=-1, epsilon=eps,
                                stash_type=stash)
    graph = helper.make_graph(
        [node], "norm", [helper.make_tensor_value_info("x", elem, c.shape)],
        [helper.make_tensor_value_info("y", elem, c.shape)],
        [numpy_helper.from_array(a, n) for n, a in inits.items() if n in node.input])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # idle pool threads must not spin while the next peer in the rotation runs
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = None
    for ir in (model.ir_version, 10):  # a newer onnx may write an IR this runtime refuses
        model.ir_version = ir
        try:
            sess = ort.InferenceSession(model.SerializeToString(), so,
                                        providers=["CPUExecutionProvider"])
            break
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own error classes
            err = e
    if sess is None:
        msg = str(err).splitlines()[0].split("NOT_IMPLEMENTED : ")[-1]
        raise Unavailable(f"onnxruntime {ort.__version__}: {msg[:120]}")
    feed = {"x": p.x}
    return (lambda: sess.run(["y"], feed)), _first


# ------------------------------------------------------------------------- measurement

def measure(fns, rounds=15, budget=0.5, target=0.005, on_first=None, settle=0.002):
    """Median seconds per call of each zero-argument callable in ``fns`` {name: fn}.

    Each is called once to warm up (compilation, first touch), then timed a few times to
    estimate its cost (the fastest of up to 3 calls, within 0.05 s). A sample is ``number``
    calls (about ``target`` seconds); samples are taken in rounds, each round visiting the
    callables in an order rotated by one, so drift and background load hit all of them
    alike. A callable stops after ``budget`` seconds of samples (at least 3, at most
    ``rounds``). Between two callables the loop sleeps ``settle`` seconds, untimed, so that
    the spinning worker threads of one OpenMP runtime (torch's, numba's) do not eat into the
    next one's time. Returns ``{name: (median_seconds, calls_timed, samples)}`` (samples in
    seconds per call, ``samples[i]`` from round ``i``); the garbage
    collector is off while timing. ``on_first(name, result)`` receives each callable's
    first result (to check it).

    Every sample starts with one untimed call of the same callable, so the caches hold what
    that callable leaves there itself (its steady state), not what the callable timed before
    it left: on this machine a 24 MiB case fits in the 32 MiB L3, and without this priming
    the floor of one size varied 1.7× between two rows of one run, with the order.
    """
    names = list(fns)
    number, want, samples = {}, {}, {n: [] for n in names}
    for n in names:
        r = fns[n]()
        if on_first is not None:
            on_first(n, r)
        del r
        calib = []
        while len(calib) < 3 and sum(calib) < 0.05:
            t = time.perf_counter()
            fns[n]()
            calib.append(time.perf_counter() - t)
        est = max(min(calib), 1e-7)
        number[n] = max(1, int(target / est))
        want[n] = max(3, min(rounds, int(budget / ((number[n] + 1) * est))))
    gc_on = gc.isenabled()
    gc.disable()
    try:
        for r in range(max(want.values(), default=0)):
            k = r % len(names)
            for n in names[k:] + names[:k]:
                if len(samples[n]) >= want[n]:
                    continue
                f, m = fns[n], number[n]
                if settle:
                    time.sleep(settle)
                f()  # priming call, untimed
                t = time.perf_counter()
                for _ in range(m):
                    f()
                samples[n].append((time.perf_counter() - t) / m)
    finally:
        if gc_on:
            gc.enable()
    return {n: (statistics.median(samples[n]), len(samples[n]) * number[n], samples[n])
            for n in names}


def paired_ratio(a, b):
    """Median over rounds of a[i] / b[i]: two implementations' samples of one round were taken
    back to back, so a slow phase of the machine (seconds long here) cancels out of each
    ratio, where it would not out of the ratio of two medians."""
    n = min(len(a), len(b))
    return statistics.median(a[i] / b[i] for i in range(n)) if n else None


def _check(result, ref):
    """Max error of ``result`` against the reference output relative to its largest value."""
    r = np.asarray(result, dtype=np.float64)
    if ref is None or r.shape != ref.shape:
        return None
    return float(np.max(np.abs(r - ref)) / (np.max(np.abs(ref)) + 1.0))


_TOL = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-8}


def set_threads(n):
    """fastnorm's thread count (and torch's when it is imported)."""
    import fastnorm
    fastnorm.set_num_threads(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def implementations(p, mode, threads, backends, default, peers, reuse=True):
    """{name: maker} for one case; a maker returns (callable, result -> ndarray or None) or
    raises Unavailable. Names: "floor", "fastnorm[<backend>]", "out=" (the default backend
    writing into a reused output, forward modes), "numpy", "torch", "onnxruntime"."""
    from . import _floor
    makers = {"floor": lambda: (_floor.floor_fn(mode, p.x, p.dy, threads), None)}
    for be in backends:
        makers[f"fastnorm[{be}]"] = lambda be=be: fastnorm_fn(p, mode, be)
    if reuse and mode in ("forward", "eval"):
        makers["out="] = lambda: fastnorm_fn(p, mode, default, out=True)
    if "numpy" in peers:
        makers["numpy"] = lambda: fastnorm_fn(p, mode, "numpy")
    if "torch" in peers:
        makers["torch"] = lambda: torch_fn(p, mode, threads)
    if "onnxruntime" in peers:
        makers["onnxruntime"] = lambda: onnxruntime_fn(p, mode, threads)
    return makers


def run_case(p, mode, threads, backends, default, peers, rounds, budget, reuse=True,
             target=0.005):
    """One row: time every implementation of ``mode`` on problem ``p`` at ``threads``."""
    set_threads(threads)
    makers = implementations(p, mode, threads, backends, default, peers, reuse)
    fns, conv, impls = {}, {}, {}
    for name, make in makers.items():
        try:
            fns[name], conv[name] = make()
        except Unavailable as e:
            impls[name] = {"na": str(e)}
    # correctness: every first output against the NumPy backend's (else the default's)
    ref_name = "numpy" if "numpy" in fns else f"fastnorm[{default}]"
    fns = {ref_name: fns.pop(ref_name), **fns}   # the reference warms up first
    errors, ref = {}, []

    def check(name, result):
        if name == ref_name:
            ref.append(np.asarray(conv[name](result), dtype=np.float64))
        elif conv[name] is not None:
            errors[name] = _check(conv[name](result), ref[0])

    timed = measure(fns, rounds=rounds, budget=budget, target=target, on_first=check)
    ref.clear()
    S = p.nbytes
    for name, (sec, calls, samples) in timed.items():
        impls[name] = {"ms": sec * 1e3, "gbps": PASSES[mode] * S / sec / 1e9,
                       "floor_ratio": paired_ratio(timed["floor"][2], samples),
                       "calls": calls, "samples_ms": [round(t * 1e3, 5) for t in samples]}
        if errors.get(name) is not None:
            impls[name]["max_rel_err"] = errors[name]
            if errors[name] > _TOL[p.dtype]:
                impls[name]["mismatch"] = True
    c = p.case
    return {"case": c.label, "variant": c.variant, "layout": c.layout, "shape": list(c.shape),
            "mode": mode, "dtype": p.dtype.name, "threads": threads, "mib": S / 2 ** 20,
            "bytes": PASSES[mode] * S, "default": f"fastnorm[{default}]", "impls": impls}


# --------------------------------------------------------------------------- reporting

def _ms(impl):
    return impl.get("ms") if impl else None


def ratio_of(row, num, den):
    """``num`` time / ``den`` time in one row: the paired ratio of their samples (see
    ``paired_ratio``), or, for a report without samples, the ratio of the medians."""
    a, b = row["impls"].get(num), row["impls"].get(den)
    if not (_ms(a) and _ms(b)):
        return None
    if a.get("samples_ms") and b.get("samples_ms"):
        return paired_ratio(a["samples_ms"], b["samples_ms"])
    return a["ms"] / b["ms"]


def shortfalls(row):
    """The targets this row misses (float32 spec of issue 5), as short phrases."""
    im, ours = row["impls"], row["default"]
    if _ms(im.get(ours)) is None:
        return []
    out = []
    if row["mode"] in ("forward", "forward+backward"):
        peers = {n: ratio_of(row, n, ours) for n in PEERS if _ms(im.get(n)) is not None}
        if peers:
            best = min(peers, key=peers.get)
            if peers[best] < 1:
                out.append(f"{peers[best]:.2f}× {best} (slower)")
    floor = ratio_of(row, "floor", ours)
    if floor and row["mib"] >= 1 and floor < 0.8:
        reuse = ratio_of(row, "floor", "out=")
        extra = f" (out= {reuse:.2f})" if reuse else ""
        out.append(f"floor/ours {floor:.2f}{extra}")
    torch = ratio_of(row, "torch", ours)
    if (row["mode"] == "forward" and row["variant"] in ("batch", "instance")
            and row["layout"] == "NCHW" and torch and torch < 3):
        out.append(f"{torch:.1f}× torch < 3×")
    return out


def columns(results, wide=False):
    """The table's columns (name, cell function), only those some row fills. ``wide`` adds
    GB/s and floor/peer for every peer and backend (the JSON has them in any case)."""
    default = results[0]["default"]
    others = sorted({n for r in results for n in r["impls"] if n.startswith("fastnorm[")}
                    - {default})

    def ms(name):
        def cell(r):
            i = r["impls"].get(name)
            if not i:
                return ""
            if "na" in i:
                return "n/a"
            return f"{i['ms']:.3g}" + (" ✗" if i.get("mismatch") else "")
        return cell

    def ratio(num, den):
        def cell(r):
            q = ratio_of(r, num, den)
            return f"{q:.2f}" if q else ""
        return cell

    def gbps(name):
        def cell(r):
            i = r["impls"].get(name)
            return f"{i['gbps']:.1f}" if i and "gbps" in i else ""
        return cell

    cols = [("case", lambda r: r["case"]), ("mode", lambda r: r["mode"]),
            ("MiB", lambda r: f"{r['mib']:.3g}"), ("floor ms", ms("floor")),
            ("fastnorm ms", ms(default)), ("GB/s", gbps(default)),
            ("floor/ours", ratio("floor", default)),
            ("out= ms", ms("out=")), ("floor/out=", ratio("floor", "out="))]
    for n in others:
        short = n.replace("fastnorm[", "").rstrip("]")
        cols.append((f"{short} ms", ms(n)))
        if wide:
            cols += [(f"{short} GB/s", gbps(n)), (f"floor/{short}", ratio("floor", n))]
    for peer in PEERS:
        if any(_ms(r["impls"].get(peer)) for r in results):
            short = {"onnxruntime": "ort"}.get(peer, peer)
            cols.append((f"{short} ms", ms(peer)))
            if wide:
                cols += [(f"{short} GB/s", gbps(peer)), (f"floor/{short}", ratio("floor", peer))]
            cols.append((f"×{short}", ratio(peer, default)))
    cols.append(("short of target", lambda r: "; ".join(shortfalls(r))))
    return [(h, f) for h, f in cols if any(f(r) for r in results)]


def markdown_table(rows, wide=False):
    cols = columns(rows, wide)
    cells = [[h for h, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
    width = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, width)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    return "\n".join(lines)


def render_markdown(report, wide=False):
    """The whole report as markdown: header (command, machine, versions) then one table per
    dtype × thread count, then the peers that could not run and why."""
    m = report["meta"]
    results = report["results"]
    lines = [f"Command: `{report['command']}`  ",
             f"Machine: {m['cpu']} ({m['cores']} cores; {m['simd']}), {m['platform']}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "  ",
             f"fastnorm = the default backend, `{m['default_backend']}`, fresh outputs; "
             f"{m['date']}, {report['elapsed_s']:.0f} s.",
             "",
             "Columns: median ms per call; GB/s from the byte formula (training forward 3·S, "
             "eval 2·S, backward 5·S, forward+backward 8·S; S = bytes of x); floor = "
             "streaming loops doing just those passes, same run, same threads; "
             "floor/ours = floor ms / fastnorm ms (1 = at the memory limit); out= = fastnorm "
             "writing into a reused output; ×peer = peer ms / fastnorm ms (> 1: fastnorm "
             "faster); numpy = fastnorm's NumPy backend; ✗ = output differs from numpy's; "
             "short of target = issue 5's targets this row misses. Ratios are medians of "
             "per-round ratios (every implementation is timed once per round, back to back), "
             "so they can differ a little from the ratio of the two ms columns; every sample "
             "follows an untimed call of the same implementation (its own cache state)."]
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        for th in dict.fromkeys(r["threads"] for r in results):
            rows = [r for r in results if r["dtype"] == dtype and r["threads"] == th]
            if rows:
                lines += ["", f"#### {dtype}, {th} thread{'s' if th > 1 else ''}", "",
                          markdown_table(rows, wide)]
    na = {}
    for r in results:
        for n, i in r["impls"].items():
            if "na" in i:
                na.setdefault(f"{n}: {i['na']}", None)
    if na or m["missing"]:
        lines += ["", "Not run: " + "; ".join(list(m["missing"]) + list(na)) + "."]
    return "\n".join(lines) + "\n"


def plot(report, path):
    """Grouped horizontal bars of GB/s per case and mode, one panel per dtype × threads."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = report["results"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    threads = list(dict.fromkeys(r["threads"] for r in results))
    default = results[0]["default"]
    names = ["floor", default, "out="] + [p for p in PEERS]
    names = [n for n in names if any(_ms(r["impls"].get(n)) for r in results)]
    labels = {default: "fastnorm", "out=": "fastnorm out="}
    n_rows = max(sum(1 for r in results if r["dtype"] == d and r["threads"] == t)
                 for d in dtypes for t in threads)
    fig, axes = plt.subplots(len(dtypes), len(threads), squeeze=False, sharex=True,
                             figsize=(6.5 * len(threads), 1.2 + 0.42 * n_rows * len(dtypes)))
    h = 0.8 / len(names)
    for i, d in enumerate(dtypes):
        for j, t in enumerate(threads):
            ax = axes[i][j]
            rows = [r for r in results if r["dtype"] == d and r["threads"] == t]
            for k, n in enumerate(names):
                val = [r["impls"].get(n, {}).get("gbps", 0) for r in rows]
                ax.barh(np.arange(len(rows)) + k * h, val, h, label=labels.get(n, n),
                        color="0.7" if n == "floor" else None)
            ax.set_yticks(np.arange(len(rows)) + 0.4 - h / 2)
            ax.set_yticklabels([f"{r['case']} {r['mode']}" for r in rows], fontsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{d}, {t} thread{'s' if t > 1 else ''}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
            if i == len(dtypes) - 1:
                ax.set_xlabel("GB/s (byte formula of ARCHITECTURE.md §6; higher is better)")
    handles, names_ = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"python -m fastnorm bench — {report['meta']['cpu']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(handles, names_, loc="upper center", ncol=len(names), fontsize=8,
               bbox_to_anchor=(0.5, 0.965), frameon=False)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metadata(peers):
    """Versions, CPU model and flags, backends; ``missing`` lists peers that cannot run."""
    from . import _dispatch, _info
    info = _info.collect()
    versions = {"fastnorm": info["fastnorm"], "python": info["python"], "numpy": info["numpy"]}
    import numba
    versions["numba"] = numba.__version__
    missing = []
    for peer, mods in (("torch", ["torch"]), ("onnxruntime", ["onnxruntime", "onnx"])):
        if peer not in peers:
            continue
        for mod in mods:
            try:
                versions[mod] = __import__(mod).__version__
            except ImportError:
                missing.append(f"{peer}: {mod} is not installed (optional)")
    flags = _cpu_flags()
    simd = [f for f in ("avx512f", "avx512bw", "avx512vl", "avx2", "fma") if f in flags]
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": info["cpu"], "cores": info["cores"], "platform": platform.platform(),
            "simd": " ".join(simd) or "no AVX", "cpu_flags": sorted(flags),
            "versions": versions, "backends": info["backends"],
            "default_backend": _dispatch.default_backend(), "info": info,
            "missing": missing}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# ---------------------------------------------------------------------------------- CLI

def _csv(kind, allowed=None, conv=str):
    def parse(text):
        try:
            items = [conv(s.strip()) for s in text.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--{kind} must be a comma-separated list, got {text!r}") from None
        bad = [i for i in items if allowed is not None and i not in allowed]
        if bad or not items:
            raise ValueError(f"--{kind} items must be among {allowed}, got {text!r}")
        return items
    return parse


def _command(args):
    """The command line as typed, or (when called from Python) an equivalent one."""
    main = sys.argv[0] if sys.argv else ""
    if os.path.basename(os.path.dirname(os.path.abspath(main))) == "fastnorm":
        return "python -m fastnorm " + " ".join(map(shlex.quote, sys.argv[1:]))
    words = ["python -m fastnorm bench"]
    for a in args._parser._actions:
        value = getattr(args, a.dest, None)
        if not a.option_strings or value == a.default or a.dest == "help":
            continue
        if isinstance(value, bool):
            words.append(a.option_strings[0])
        else:
            for v in value if isinstance(value, list) else [value]:
                words += [a.option_strings[0], shlex.quote(str(v))]
    return " ".join(words)


def add_arguments(parser):
    parser.description = __doc__.split("\n\n")[0]
    parser.set_defaults(_parser=parser)
    cores = os.cpu_count() or 1
    parser.add_argument("--quick", action="store_true",
                        help="smaller shapes and fewer rounds (under a minute)")
    parser.add_argument("--threads", default=",".join(map(str, sorted({1, cores}))),
                        help="comma-separated thread counts (default: %(default)s)")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated dtypes (default: float32,float64; "
                             "quick: float32)")
    parser.add_argument("--mode", default=",".join(MODES),
                        help="comma-separated modes (default: all: %(default)s)")
    parser.add_argument("--variant", default=",".join(VARIANTS),
                        help="comma-separated variants (default: all: %(default)s)")
    parser.add_argument("--shape", action="append", default=[], metavar="[VARIANT:]AxBx…",
                        help="extra shape, channels-first (N,C,…) or rows (R,M); repeatable")
    parser.add_argument("--no-default-shapes", action="store_true",
                        help="run only the --shape cases")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="comma-separated peers (default: %(default)s; missing ones "
                             "are reported, never required)")
    parser.add_argument("--backends", default=None,
                        help="fastnorm backends to time (default: every compiled one)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="max samples per implementation and case (default 15, quick 5)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of samples per implementation and case "
                             "(default 0.5, quick 0.05)")
    parser.add_argument("--no-out", action="store_true", help="skip the out= reuse column")
    parser.add_argument("--wide", action="store_true",
                        help="GB/s and floor/peer columns for every peer too")
    parser.add_argument("--json", metavar="PATH", help="write results and metadata as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as markdown")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG chart (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _options(args):
    """Parsed, validated options (ValueError naming the option on bad input)."""
    from . import _dispatch
    threads = _csv("threads", conv=int)(args.threads)
    if min(threads) < 1:
        raise ValueError(f"--threads must be positive integers, got {args.threads!r}")
    available = [b for b in _dispatch.available() if b != "numpy"] or ["numpy"]
    backends = _csv("backends", available)(args.backends) if args.backends else available
    default = _dispatch.default_backend()
    if default not in backends:
        backends = [default] + backends
    return dict(
        threads=threads,
        dtypes=_csv("dtype", DTYPES)(args.dtype or ("float32" if args.quick else
                                                    ",".join(DTYPES))),
        modes=_csv("mode", MODES)(args.mode), peers=_csv("peers", PEERS)(args.peers),
        backends=backends, default=default,
        cases=cases(args.quick, _csv("variant", VARIANTS)(args.variant), args.shape,
                    not args.no_default_shapes),
        rounds=args.rounds or (5 if args.quick else 15),
        target=0.003 if args.quick else 0.005,
        budget=args.budget if args.budget is not None else (0.05 if args.quick else 0.5))


def _progress(total, enabled):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        print("(no progress bar: pip install tqdm, or fastnorm[bench])", file=sys.stderr)
        return None
    # disable=None: no bar when stderr is not a terminal (CI logs)
    return tqdm(total=total, unit="case", file=sys.stderr, dynamic_ncols=True, disable=None)


def benchmark(opts, progress=False):
    """Run every (case, dtype, threads, mode) of ``opts``; returns the report dict."""
    t0 = time.perf_counter()
    meta = metadata(opts["peers"])
    peers = [p for p in opts["peers"]
             if not any(m.startswith(p + ":") for m in meta["missing"])]
    work = [(c, d, t, m) for d in opts["dtypes"] for c in opts["cases"]
            for t in opts["threads"] for m in opts["modes"] if m in c.modes]
    bar = _progress(len(work), progress)
    results, problem = [], None
    try:
        for case, dtype, threads, mode in work:
            if problem is None or (problem.case, problem.dtype.name) != (case, dtype):
                problem = None  # free the previous arrays first
                problem = Problem(case, dtype)
            if bar is not None:
                bar.set_description(f"{case.label} {dtype} {threads}t {mode}")
            results.append(run_case(problem, mode, threads, opts["backends"], opts["default"],
                                    peers, opts["rounds"], opts["budget"],
                                    reuse=opts.get("reuse", True),
                                    target=opts.get("target", 0.005)))
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    order = {d: i for i, d in enumerate(opts["dtypes"])}
    results.sort(key=lambda r: (order[r["dtype"]], r["threads"]))  # stable: case order kept
    return {"command": opts.get("command", ""), "meta": meta, "threads": opts["threads"],
            "dtypes": opts["dtypes"], "results": results,
            "elapsed_s": time.perf_counter() - t0}


def run(args):
    try:
        opts = _options(args)
    except ValueError as e:
        raise SystemExit(f"python -m fastnorm bench: error: {e}") from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("--plot needs matplotlib: pip install matplotlib "
                             "(or fastnorm[bench])") from None
    if not opts["cases"]:
        raise SystemExit("python -m fastnorm bench: error: no case left to run")
    opts["reuse"] = not args.no_out
    opts["command"] = _command(args)
    report = benchmark(opts, progress=not args.no_progress)
    text = render_markdown(report, args.wide)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if args.plot:
        plot(report, args.plot)
    return 0
