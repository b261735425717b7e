"""float16 and bfloat16 through the public functions: computed natively (no conversion copy
of the data), outputs in the input's dtype, statistics in float32, parameter gradients in
the parameters' dtype; against the float64 oracle on the same half-precision input."""
import tracemalloc

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import reference as ref
from conftest import BACKENDS

try:   # bfloat16 needs ml_dtypes (the [half] extra); float16 runs without it
    import ml_dtypes
except ImportError:
    ml_dtypes = None
HALVES = {"float16": (np.dtype(np.float16), 1e2),
          "bfloat16": (ml_dtypes and np.dtype(ml_dtypes.bfloat16), 1e4)}
HALF_PARAMS = [pytest.param(h, marks=pytest.mark.skipif(HALVES[h][0] is None,
                                                        reason="bfloat16 needs ml_dtypes"))
               for h in HALVES]
CASES = [("batch_norm", (4, 6, 5, 7), 1), ("batch_norm", (4, 5, 7, 6), -1),
         ("instance_norm", (4, 6, 35), 1), ("instance_norm", (4, 35, 6), -1),
         ("group_norm", (4, 6, 35), 1), ("group_norm", (4, 35, 6), -1),
         ("layer_norm", (6, 64), -1), ("rms_norm", (6, 64), -1)]


def _ulps(actual, expected, dtype):
    """|actual - expected| in units of the last place of ``dtype`` at |expected|."""
    e = np.asarray(expected, np.float64)
    ulp = np.spacing(np.abs(e).astype(dtype)).astype(np.float64)
    return np.abs(np.asarray(actual, np.float64) - e) / ulp


def _call(name, x, w, b, axis, backend):
    C = x.shape[axis]
    if name == "batch_norm":
        y, m, r = fn.batch_norm(x, None, None, w, b, True, axis=axis, return_stats=True,
                                backend=backend)
        gx, gw, gb = fn.batch_norm_backward(G(x), x, m, r, w, axis=axis, backend=backend)
        want = ref.batch_norm(x, None, None, w, b, True, axis=axis)
        wg = ref.batch_norm_backward(G(x), x, *want[1:], w, axis=axis)
    elif name == "instance_norm":
        y, m, r = fn.instance_norm(x, weight=w, bias=b, axis=axis, return_stats=True,
                                   backend=backend)
        gx, gw, gb = fn.instance_norm_backward(G(x), x, m, r, w, axis=axis, backend=backend)
        want = ref.instance_norm(x, weight=w, bias=b, axis=axis)
        wg = ref.instance_norm_backward(G(x), x, *want[1:], w, axis=axis)
    elif name == "group_norm":
        y, m, r = fn.group_norm(x, 3, w, b, axis=axis, return_stats=True, backend=backend)
        gx, gw, gb = fn.group_norm_backward(G(x), x, m, r, w, num_groups=3, axis=axis,
                                            backend=backend)
        want = ref.group_norm(x, 3, w, b, axis=axis)
        wg = ref.group_norm_backward(G(x), x, *want[1:], w, 3, axis=axis)
    elif name == "layer_norm":
        y, m, r = fn.layer_norm(x, C, w, b, return_stats=True, backend=backend)
        gx, gw, gb = fn.layer_norm_backward(G(x), x, m, r, w, backend=backend)
        want = ref.layer_norm(x, (C,), w, b)
        wg = ref.layer_norm_backward(G(x), x, *want[1:], w)
    else:
        y, r = fn.rms_norm(x, C, w, return_stats=True, backend=backend)
        m = r
        gx, gw = fn.rms_norm_backward(G(x), x, r, w, backend=backend)
        gb = None
        want = ref.rms_norm(x, (C,), w)
        wg = ref.rms_norm_backward(G(x), x, want[1], w) + (None,)
    return (y, m, r, gx, gw, gb), (want[0],) + tuple(wg)


def G(x):
    return np.cos(np.arange(x.size, dtype=np.float64)).reshape(x.shape).astype(x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", HALF_PARAMS)
@pytest.mark.parametrize("name,shape,axis", CASES, ids=[f"{n}-{a}" for n, _, a in CASES])
def test_half_end_to_end(name, shape, axis, half, backend):
    dtype, offset = HALVES[half]
    rng = np.random.default_rng(3)
    x = (offset + rng.standard_normal(shape)).astype(dtype)
    C = shape[axis]
    w, b = rng.normal(1, 0.2, C).astype(np.float32), rng.normal(0, 0.2, C).astype(np.float32)
    (y, m, r, gx, gw, gb), (ey, egx, egw, egb) = _call(name, x, w, b, axis, backend)
    what = f"{name} axis={axis} {half} {backend}"
    assert y.dtype == dtype and gx.dtype == dtype, what
    assert m.dtype == r.dtype == np.float32, what
    assert gw.dtype == np.float32 and (gb is None or gb.dtype == np.float32), what
    assert _ulps(y, ey, dtype).max() <= 1.0, f"{what}: y {_ulps(y, ey, dtype).max()} ulp"
    # grad_x: the sums run in float32 or better over the half data; one rounding at the end
    err = np.abs(gx.astype(np.float64) - egx).max()
    assert err <= 2 * np.spacing(np.abs(egx).max().astype(dtype)).astype(np.float64), what
    np.testing.assert_allclose(gw, egw, rtol=2e-3, atol=2e-3 * np.abs(egw).max(), err_msg=what)


@pytest.mark.parametrize("half", HALF_PARAMS)
def test_no_conversion_copy_of_the_data(half):
    """A float32 copy of the input would allocate twice its bytes: the call allocates its
    half-precision output and per-row statistics only."""
    dtype, offset = HALVES[half]
    x = (offset + np.random.default_rng(0).standard_normal((1024, 512))).astype(dtype)
    for call in (lambda: fn.layer_norm(x, 512), lambda: fn.batch_norm(x, None, None,
                                                                      training=True),
                 lambda: fn.group_norm(x.reshape(64, 16, 512), 4)):
        call()                                       # compile / load outside the trace
        tracemalloc.start()
        y = call()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert y.dtype == dtype
        assert peak < 1.5 * x.nbytes, f"{half}: peak {peak} bytes for a {x.nbytes}-byte input"
