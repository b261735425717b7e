"""One body over op x backend x dtype x layout x shape: the API against the float64 oracles.

Each case runs forward (output, statistics, running statistics), backward (grad_x,
grad_weight, grad_bias) and out= against ``fastnorm.reference``. The backward oracle gets the
statistics the API returned (float32 for float32 input), so it checks the backward kernels
themselves; the statistics are checked against the oracle's separately. Failure messages name the
op, backend, dtype, shape, axis and memory layout.
"""
import itertools
import zlib

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import reference as ref

from conftest import BACKENDS, assert_close, hostile

DTYPES = [np.float64, np.float32, np.float16]
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]


class Op:
    """Adapter: call the API and the oracle the same way for one variant."""

    def __init__(self, name, shapes, axes=(1, -1), running=False):
        self.name, self.shapes, self.axes, self.running = name, shapes, axes, running

    def channels(self, shape, axis):
        return shape[axis]


def _params(rng, shape, dtype=np.float64):
    return rng.normal(1.0, 0.5, shape).astype(dtype), rng.normal(0.0, 0.5, shape).astype(dtype)


# (name, shapes, axes): shapes include sizes 1, 3, 7 and 1023 and one that takes the
# parallel path (more than fastnorm._dispatch.PARALLEL_MIN elements).
CASES = {
    "batch_norm": ([(3, 7), (7, 3, 1023), (1, 3, 7), (3, 1, 7, 3), (16, 8, 1023)], (1, -1)),
    "instance_norm": ([(3, 7, 1023), (1, 3, 7), (2, 1, 3, 3), (4, 16, 1023)], (1, -1)),
    "group_norm": ([(3, 6, 7), (2, 9, 1023), (1, 3, 1), (4, 16, 1023)], (1, -1)),
    "layer_norm": ([(1, 1023), (7, 3), (3, 7, 1023), (64, 1023)], (1, 2)),  # axes: k dims
    "rms_norm": ([(1, 1023), (7, 3), (3, 7, 1023), (64, 1023)], (1, 2)),
}


def _cases():
    for name, (shapes, axes) in CASES.items():
        for shape, axis in itertools.product(shapes, axes):
            yield name, shape, axis


def run_op(name, x, axis, w, b, backend, rng, out=None):
    """Forward + backward through the API and the oracle; returns a dict of pairs."""
    C = x.shape[axis] if name not in ("layer_norm", "rms_norm") else None
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    pairs = {}
    if name == "batch_norm":
        rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, C)
        rm2, rv2 = rm.copy(), rv.copy()
        y, m, r = fn.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis=axis, out=out,
                                return_stats=True, backend=backend)
        yo, mo, ro = ref.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5, axis=axis)
        g = fn.batch_norm_backward(dy, x, m, r, w, axis=axis, backend=backend)
        go = ref.batch_norm_backward(dy, x, m, r, w, axis=axis)
        pairs.update(running_mean=(rm, rm2), running_var=(rv, rv2))
        # eval mode forward and backward with the updated running statistics
        ye, me, re_ = fn.batch_norm(x, rm, rv, w, b, False, axis=axis, return_stats=True,
                                    backend=backend)
        yeo, meo, reo = ref.batch_norm(x, rm, rv, w, b, False, axis=axis)
        ge = fn.batch_norm_backward(dy, x, me, re_, w, False, axis=axis, backend=backend)
        geo = ref.batch_norm_backward(dy, x, me, re_, w, False, axis=axis)
        pairs.update(eval_y=(ye, yeo), eval_grad_x=(ge[0], geo[0]),
                     eval_grad_weight=(ge[1], geo[1]))
    elif name == "instance_norm":
        rm, rv = rng.normal(size=C), rng.uniform(0.5, 2.0, C)
        rm2, rv2 = rm.copy(), rv.copy()
        y, m, r = fn.instance_norm(x, rm, rv, w, b, True, 0.1, 1e-5, axis=axis, out=out,
                                   return_stats=True, backend=backend)
        yo, mo, ro = ref.instance_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5, axis=axis)
        g = fn.instance_norm_backward(dy, x, m, r, w, axis=axis, backend=backend)
        go = ref.instance_norm_backward(dy, x, m, r, w, axis=axis)
        pairs.update(running_mean=(rm, rm2), running_var=(rv, rv2))
        ye = fn.instance_norm(x, rm, rv, w, b, False, axis=axis, backend=backend)
        pairs.update(eval_y=(ye, ref.instance_norm(x, rm, rv, w, b, False, axis=axis)[0]))
    elif name == "group_norm":
        G = 3 if C % 3 == 0 else 1
        y, m, r = fn.group_norm(x, G, w, b, 1e-5, axis=axis, out=out, return_stats=True,
                                backend=backend)
        yo, mo, ro = ref.group_norm(x, G, w, b, 1e-5, axis=axis)
        g = fn.group_norm_backward(dy, x, m, r, w, num_groups=G, axis=axis, backend=backend)
        go = ref.group_norm_backward(dy, x, m, r, w, G, axis=axis)
    elif name == "layer_norm":
        ns = x.shape[x.ndim - axis:]
        y, m, r = fn.layer_norm(x, ns, w, b, 1e-5, out=out, return_stats=True,
                                backend=backend)
        yo, mo, ro = ref.layer_norm(x, ns, w, b, 1e-5)
        g = fn.layer_norm_backward(dy, x, m, r, w, backend=backend)
        go = ref.layer_norm_backward(dy, x, m, r, w)
    elif name == "rms_norm":
        ns = x.shape[x.ndim - axis:]
        y, r = fn.rms_norm(x, ns, w, 1e-6, out=out, return_stats=True, backend=backend)
        yo, ro = ref.rms_norm(x, ns, w, 1e-6)
        m = mo = None
        g = fn.rms_norm_backward(dy, x, r, w, backend=backend) + (None,)
        gx, gwo = ref.rms_norm_backward(dy, x, r, w)
        go = (gx, gwo, None)
    pairs.update(y=(y, yo), rstd=(r, ro), grad_x=(g[0], go[0]), grad_weight=(g[1], go[1]))
    if m is not None:
        pairs["mean"] = (m, mo)
    if g[2] is not None:
        pairs["grad_bias"] = (g[2], go[2])
    return pairs, y


def _param_shape(name, shape, axis):
    if name in ("layer_norm", "rms_norm"):
        return shape[len(shape) - axis:]
    return (shape[axis],)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name,shape,axis", list(_cases()))
def test_matches_reference(name, shape, axis, layout, dtype, backend):
    rng = np.random.default_rng(zlib.crc32(repr((name, shape, axis, layout)).encode()))
    stat_axis = axis if name not in ("layer_norm", "rms_norm") else 1
    x = hostile(rng, shape, dtype, offset=3.0, layout=layout, axis=stat_axis)
    # parameters in the input's dtype (float32 for float16 input: mixed precision)
    w, b = _params(rng, _param_shape(name, shape, axis),
                   np.float32 if dtype == np.float16 else dtype)
    what = f"{name} backend={backend} dtype={np.dtype(dtype).name} shape={shape} " \
           f"axis={axis} layout={layout}"
    pairs, y = run_op(name, x, axis, w, b, backend, rng)
    assert y.dtype == x.dtype and y.shape == x.shape, what
    for key, (actual, expected) in pairs.items():
        assert_close(actual, expected, dtype, f"{what}: {key}")
    # out=: a separate array in another layout receives the same values
    out = np.empty(shape, dtype, order="F")
    pairs2, y2 = run_op(name, x, axis, w, b, backend, np.random.default_rng(0), out=out)
    assert y2 is out, what
    np.testing.assert_array_equal(out, pairs2["y"][0], err_msg=what)
    assert_close(out, pairs2["y"][1], dtype, f"{what}: out=")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_without_weight_or_bias(affine, dtype, backend):
    """Every op with weight and/or bias left out; grad_weight/grad_bias None where absent."""
    rng = np.random.default_rng(7)
    x = hostile(rng, (4, 6, 9), dtype, offset=-2.0)
    dy = rng.standard_normal(x.shape).astype(dtype)
    C = 6
    w = rng.normal(size=C).astype(dtype) if affine == "weight" else None
    b = rng.normal(size=C).astype(dtype) if affine == "bias" else None
    y, m, r = fn.batch_norm(x, None, None, w, b, True, return_stats=True, backend=backend)
    assert_close(y, ref.batch_norm(x, None, None, w, b, True)[0], dtype, f"bn {affine}")
    gx, gw, gb = fn.batch_norm_backward(dy, x, m, r, w, has_bias=b is not None, backend=backend)
    gxo, gwo, gbo = ref.batch_norm_backward(dy, x, m, r, w)
    assert_close(gx, gxo, dtype, "bn grad_x")
    assert (gw is None) == (w is None) and (gb is None) == (b is None)
    if b is not None:
        assert_close(gb, gbo, dtype, "bn grad_bias")
    wl = rng.normal(size=9).astype(dtype) if affine == "weight" else None
    bl = rng.normal(size=9).astype(dtype) if affine == "bias" else None
    y, m, r = fn.layer_norm(x, 9, wl, bl, return_stats=True, backend=backend)
    assert_close(y, ref.layer_norm(x, (9,), wl, bl)[0], dtype, f"ln {affine}")
    gx, gw, gb = fn.layer_norm_backward(dy, x, m, r, wl, has_bias=bl is not None,
                                        backend=backend)
    assert_close(gx, ref.layer_norm_backward(dy, x, m, r, wl)[0], dtype, "ln grad_x")
    assert (gw is None) == (wl is None) and (gb is None) == (bl is None)
    y, m, r = fn.group_norm(x, 2, w, b, return_stats=True, backend=backend)
    assert_close(y, ref.group_norm(x, 2, w, b)[0], dtype, f"gn {affine}")
    gx, gw, gb = fn.group_norm_backward(dy, x, m, r, w, num_groups=2, backend=backend)
    assert_close(gx, ref.group_norm_backward(dy, x, m, r, w, 2)[0], dtype, "gn grad_x")
    y, r = fn.rms_norm(x, 9, wl, return_stats=True, backend=backend)
    assert_close(y, ref.rms_norm(x, (9,), wl)[0], dtype, f"rms {affine}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_cumulative_average(backend):
    rng = np.random.default_rng(3)
    rm, rv, nbt = np.zeros(4), np.ones(4), np.array(0, np.int64)
    rm2, rv2, nbt2 = rm.copy(), rv.copy(), nbt.copy()
    for _ in range(3):
        x = rng.normal(2.0, 3.0, (8, 4, 5))
        fn.batch_norm(x, rm, rv, training=True, momentum=None, num_batches_tracked=nbt,
                      backend=backend)
        ref.batch_norm(x, rm2, rv2, training=True, momentum=None, num_batches_tracked=nbt2)
    assert int(nbt) == 3
    np.testing.assert_allclose(rm, rm2, rtol=1e-12)
    np.testing.assert_allclose(rv, rv2, rtol=1e-12)
    x = rng.normal(size=(8, 4, 5))
    with pytest.raises(ValueError, match="num_batches_tracked"):
        fn.batch_norm(x, rm, rv, training=True, momentum=None, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_out_is_input(backend):
    rng = np.random.default_rng(5)
    for layout in ("contiguous", "channels_last"):
        x = hostile(rng, (4, 3, 50), np.float32, offset=1e3, layout=layout)
        expected = ref.batch_norm(x, None, None, training=True)[0]
        y = fn.batch_norm(x, None, None, training=True, out=x, backend=backend)
        assert y is x
        assert_close(x, expected, np.float32, f"in-place bn {layout}")
        x = hostile(rng, (5, 70), np.float32, offset=1e3)
        expected = ref.layer_norm(x, (70,))[0]
        fn.layer_norm(x, 70, out=x, backend=backend)
        assert_close(x, expected, np.float32, "in-place ln")


@pytest.mark.parametrize("backend", BACKENDS)
def test_use_backend_context_and_env(backend, monkeypatch):
    x = np.random.default_rng(0).normal(size=(4, 8))
    with fn.use_backend(backend):
        y = fn.layer_norm(x, 8)
    np.testing.assert_allclose(y, ref.layer_norm(x, (8,))[0], atol=1e-12)
    monkeypatch.setenv("FASTNORM_BACKEND", backend)
    from fastnorm import _dispatch
    assert _dispatch.resolve() == backend
    with pytest.raises(ValueError, match="backend"):
        fn.layer_norm(x, 8, backend="fortran")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["instance_norm", "group_norm"])
def test_channels_last_fused_and_composed_paths(name, backend, monkeypatch):
    """Channels-last instance/group norm forward runs fused (one sample's slab per thread)
    or, for fewer than 4 samples of a slab over _norms.FUSED_SLAB, as statistics + apply
    parallel over blocks. Both against the oracle, each with the same bits at 1 and 2
    threads (the choice depends on the shape only)."""
    from fastnorm import _norms as api       # the norm bodies hold the switch
    rng = np.random.default_rng(11)
    x = (1e3 + rng.standard_normal((2, 300, 1000))).astype(np.float32)
    w, b = _params(rng, (1000,), np.float32)
    assert 300 * 1000 > api.FUSED_SLAB
    call = {"instance_norm": lambda: fn.instance_norm(x, weight=w, bias=b, axis=-1,
                                                      return_stats=True, backend=backend),
            "group_norm": lambda: fn.group_norm(x, 250, w, b, axis=-1, return_stats=True,
                                                backend=backend)}[name]
    G = 1000 if name == "instance_norm" else 250
    want = ref.group_norm(x, G, w, b, axis=-1)
    for slab in (api.FUSED_SLAB, 1 << 30):   # composed, then fused
        monkeypatch.setattr(api, "FUSED_SLAB", slab)
        runs, n0 = [], fn.get_num_threads()
        for n in (1, 2):
            fn.set_num_threads(n)
            runs.append(call())
        fn.set_num_threads(n0)
        for a, c in zip(*runs):
            np.testing.assert_array_equal(a, c, err_msg=f"{name} {backend} slab={slab}")
        for got, exp, what in zip(runs[0], want, ("y", "mean", "rstd")):
            assert_close(got, exp.reshape(got.shape), np.float32,
                         f"{name} {backend} slab={slab} {what}",
                         scale=1e3 if what == "mean" else None)
