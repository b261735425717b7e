"""Accuracy on hostile inputs (foundation issue item 7) and bit-identical results at 1 and 2
threads (item 6), for every variant and every compiled backend."""
import numpy as np
import pytest

import fastnorm as fn
from fastnorm import reference as ref

from conftest import BACKENDS, COMPILED

VARIANTS = ["batch_norm", "batch_norm_cl", "instance_norm", "instance_norm_cl", "group_norm",
            "group_norm_cl", "layer_norm", "rms_norm"]


def forward_backward(variant, x, dy, w, b, backend=None, oracle=False):
    """(y, grad_x) of ``variant`` through the API (or the float64 oracle)."""
    axis = -1 if variant.endswith("_cl") else 1
    op = variant.removesuffix("_cl")
    if op == "batch_norm":
        if oracle:
            y, m, r = ref.batch_norm(x, None, None, w, b, True, axis=axis)
            return y, ref.batch_norm_backward(dy, x, m, r, w, axis=axis)[0]
        y, m, r = fn.batch_norm(x, None, None, w, b, True, axis=axis, return_stats=True,
                                backend=backend)
        return y, fn.batch_norm_backward(dy, x, m, r, w, axis=axis, backend=backend)[0]
    if op == "instance_norm":
        if oracle:
            y, m, r = ref.instance_norm(x, None, None, w, b, axis=axis)
            return y, ref.instance_norm_backward(dy, x, m, r, w, axis=axis)[0]
        y, m, r = fn.instance_norm(x, None, None, w, b, axis=axis, return_stats=True,
                                   backend=backend)
        return y, fn.instance_norm_backward(dy, x, m, r, w, axis=axis, backend=backend)[0]
    if op == "group_norm":
        if oracle:
            y, m, r = ref.group_norm(x, 4, w, b, axis=axis)
            return y, ref.group_norm_backward(dy, x, m, r, w, 4, axis=axis)[0]
        y, m, r = fn.group_norm(x, 4, w, b, axis=axis, return_stats=True, backend=backend)
        return y, fn.group_norm_backward(dy, x, m, r, w, num_groups=4, axis=axis,
                                         backend=backend)[0]
    ns = x.shape[-1:]
    if op == "layer_norm":
        if oracle:
            y, m, r = ref.layer_norm(x, ns, w, b)
            return y, ref.layer_norm_backward(dy, x, m, r, w)[0]
        y, m, r = fn.layer_norm(x, ns, w, b, return_stats=True, backend=backend)
        return y, fn.layer_norm_backward(dy, x, m, r, w, backend=backend)[0]
    if oracle:
        y, r = ref.rms_norm(x, ns, w, 1e-5)
        return y, ref.rms_norm_backward(dy, x, r, w)[0]
    y, r = fn.rms_norm(x, ns, w, 1e-5, return_stats=True, backend=backend)
    return y, fn.rms_norm_backward(dy, x, r, w, backend=backend)[0]


def shape_of(variant):
    if variant.startswith("layer") or variant.startswith("rms"):
        return (64, 768), 768
    if variant.endswith("_cl"):
        return (4, 9, 11, 16), 16
    return (4, 16, 9, 11), 16


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_large_mean(variant, backend):
    """x = 1e4 + N(0, 1) in float32: y and grad_x within 1e-3 of the float64 reference."""
    rng = np.random.default_rng(1)
    shape, C = shape_of(variant)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.normal(1, 0.2, C).astype(np.float32)
    b = rng.normal(0, 0.2, C).astype(np.float32) if not variant.startswith("rms") else None
    y, gx = forward_backward(variant, x, dy, w, b, backend)
    yo, gxo = forward_backward(variant, x, dy, w, b, oracle=True)
    assert y.dtype == np.float32 and gx.dtype == np.float32
    err_y, err_g = np.abs(y - yo).max(), np.abs(gx - gxo).max()
    assert err_y <= 1e-3, f"{variant} {backend}: max |y - ref| = {err_y:.3g}"
    assert err_g <= 1e-3, f"{variant} {backend}: max |grad_x - ref| = {err_g:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.startswith("rms")])
def test_constant_channel_gives_beta(variant, backend):
    """Every value 1e4 + 0.1: the output is exactly beta, grad_x = w*rstd*(dy - mean(dy))."""
    rng = np.random.default_rng(2)
    shape, C = shape_of(variant)
    x = np.full(shape, 1e4 + 0.1, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.normal(1, 0.2, C).astype(np.float32)
    b = rng.normal(0, 0.2, C).astype(np.float32)
    y, gx = forward_backward(variant, x, dy, w, b, backend)
    axis = -1 if variant.endswith("_cl") or variant.startswith("layer") else 1
    bshape = [1] * x.ndim
    bshape[axis] = C
    np.testing.assert_array_equal(y, np.broadcast_to(b.reshape(bshape), shape))
    _, gxo = forward_backward(variant, x, dy, w, b, oracle=True)
    rel = np.abs(gx - gxo).max() / np.abs(gxo).max()
    assert rel <= 1e-3, f"{variant} {backend}: grad_x relative error {rel:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_float16_near_max(variant, backend):
    """float16 input near 6e4 (the float16 max is 65504): finite outputs and gradients."""
    rng = np.random.default_rng(3)
    shape, C = shape_of(variant)
    x = (6e4 + 100 * rng.standard_normal(shape)).astype(np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    y, gx = forward_backward(variant, x, dy, None, None, backend)
    assert y.dtype == np.float16 and gx.dtype == np.float16
    assert np.isfinite(y).all() and np.isfinite(gx).all(), variant
    yo, _ = forward_backward(variant, x, dy, None, None, oracle=True)
    assert np.abs(y - yo).max() <= 1e-2 * np.abs(yo).max() + 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_channel(backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 3, 10))
    x[1, 1, 5] = np.nan
    y = fn.batch_norm(x, None, None, training=True, backend=backend)
    assert np.isnan(y[:, 1]).all() and not np.isnan(y[:, [0, 2]]).any()
    y = fn.instance_norm(x, backend=backend)
    assert np.isnan(y[1, 1]).all() and np.isnan(y).sum() == 10
    y = fn.layer_norm(x, 10, backend=backend)
    assert np.isnan(y[1, 1]).all() and np.isnan(y).sum() == 10
    y = fn.group_norm(x, 3, backend=backend)
    assert np.isnan(y[1, 1]).all() and np.isnan(y).sum() == 10
    xc = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    y = fn.batch_norm(xc, None, None, training=True, axis=-1, backend=backend)
    assert np.isnan(y[..., 1]).all() and not np.isnan(y[..., [0, 2]]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    """Empty arrays follow NumPy: empty outputs, NaN statistics, running stats untouched."""
    rm, rv = np.zeros(3), np.ones(3)
    y, m, r = fn.batch_norm(np.empty((0, 3)), rm, rv, training=True, return_stats=True,
                            backend=backend)
    assert y.shape == (0, 3) and np.isnan(m).all()
    assert (rm == 0).all() and (rv == 1).all()
    y = fn.layer_norm(np.empty((0, 8), np.float32), 8, backend=backend)
    assert y.shape == (0, 8) and y.dtype == np.float32
    gx, gw, gb = fn.layer_norm_backward(np.empty((0, 8)), np.empty((0, 8)), np.empty(0),
                                        np.empty(0), np.ones(8), backend=backend)
    assert gx.shape == (0, 8) and (gw == 0).all() and (gb == 0).all()
    assert fn.group_norm(np.empty((0, 4, 5)), 2, backend=backend).shape == (0, 4, 5)
    assert fn.instance_norm(np.empty((2, 3, 0)), backend=backend).shape == (2, 3, 0)


# ------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("variant", VARIANTS)
def test_same_bits_at_one_and_two_threads(variant, backend):
    rng = np.random.default_rng(5)
    shape = {"layer_norm": (512, 768), "rms_norm": (512, 768)}.get(
        variant, (8, 32, 24, 24) if not variant.endswith("_cl") else (8, 24, 24, 32))
    C = shape[-1] if variant.endswith("_cl") or variant[:2] in ("la", "rm") else shape[1]
    x = (3 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.normal(1, 0.2, C).astype(np.float32)
    b = None if variant.startswith("rms") else rng.normal(0, 0.2, C).astype(np.float32)
    results = []
    for n in (1, 2):
        fn.set_num_threads(n)
        results.append(forward_backward(variant, x, dy, w, b, backend))
    for a, c, what in zip(results[0], results[1], ("y", "grad_x")):
        np.testing.assert_array_equal(a, c, err_msg=f"{variant} {backend} {what}")


@pytest.mark.parametrize("backend", COMPILED)
def test_weight_gradients_same_bits_at_one_and_two_threads(backend):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1024, 256)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = np.ones(256, np.float32)
    out = []
    for n in (1, 2):
        fn.set_num_threads(n)
        y, m, r = fn.layer_norm(x, 256, w, w, return_stats=True, backend=backend)
        ln = fn.layer_norm_backward(dy, x, m, r, w, backend=backend)
        xc = x.reshape(64, 16, 256)
        y, m, r = fn.batch_norm(xc, None, None, w[:16], w[:16], True, return_stats=True,
                                backend=backend)
        bn = fn.batch_norm_backward(dy.reshape(xc.shape), xc, m, r, w[:16], backend=backend)
        y, m, r = fn.batch_norm(x, None, None, w, w, True, axis=-1, return_stats=True,
                                backend=backend)
        bncl = fn.batch_norm_backward(dy, x, m, r, w, axis=-1, backend=backend)
        out.append(ln[1:] + bn[1:] + bncl[1:])
    for a, c in zip(*out):
        np.testing.assert_array_equal(a, c)
