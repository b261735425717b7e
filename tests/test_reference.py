"""The float64 oracles against independent facts: moments of the output and finite differences."""
import numpy as np
import pytest

from fastnorm import reference as ref


def vjp_check(f, x, dy, grad_x, eps=1e-6, n_dirs=3, seed=0):
    """Central differences along random directions v: <dy, f(x+ev) - f(x-ev)>/2e == <grad_x, v>."""
    rng = np.random.default_rng(seed)
    for _ in range(n_dirs):
        v = rng.standard_normal(x.shape)
        num = np.sum(dy * (f(x + eps * v) - f(x - eps * v))) / (2 * eps)
        ana = np.sum(grad_x * v)
        assert abs(num - ana) <= 1e-6 * max(1.0, abs(ana)), (num, ana)


def param_check(f, p, dy, grad_p, eps=1e-6):
    vjp_check(f, p, dy, grad_p, eps)


RNG = np.random.default_rng(42)


@pytest.mark.parametrize("axis", [1, -1])
def test_batch_norm_moments_and_gradients(axis):
    x = RNG.normal(3.0, 2.0, (5, 4, 3, 2))
    C = x.shape[axis]
    w, b = RNG.normal(size=C), RNG.normal(size=C)
    y, mean, rstd = ref.batch_norm(x, None, None, None, None, True, axis=axis)
    red = tuple(i for i in range(4) if i != axis % 4)
    np.testing.assert_allclose(y.mean(axis=red), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=red), 1, atol=1e-4)  # eps = 1e-5 shrinks the var
    dy = RNG.normal(size=x.shape)
    gx, gw, gb = ref.batch_norm_backward(dy, x, mean, rstd, w, axis=axis)
    vjp_check(lambda z: ref.batch_norm(z, None, None, w, b, True, axis=axis)[0], x, dy, gx)
    param_check(lambda p: ref.batch_norm(x, None, None, p, b, True, axis=axis)[0], w, dy, gw)
    param_check(lambda p: ref.batch_norm(x, None, None, w, p, True, axis=axis)[0], b, dy, gb)
    # eval mode: running statistics are constants
    rm, rv = RNG.normal(size=C), RNG.uniform(0.5, 2, C)
    y, m, r = ref.batch_norm(x, rm, rv, w, b, False, axis=axis)
    gx, _, _ = ref.batch_norm_backward(dy, x, m, r, w, training=False, axis=axis)
    vjp_check(lambda z: ref.batch_norm(z, rm, rv, w, b, False, axis=axis)[0], x, dy, gx)


def test_batch_norm_running_stats_formula():
    x = RNG.normal(size=(6, 3, 4))
    rm, rv = np.full(3, 0.5), np.full(3, 2.0)
    ref.batch_norm(x, rm, rv, training=True, momentum=0.25)
    flat = np.moveaxis(x, 1, 0).reshape(3, -1)
    np.testing.assert_allclose(rm, 0.75 * 0.5 + 0.25 * flat.mean(1), rtol=1e-14)
    np.testing.assert_allclose(rv, 0.75 * 2.0 + 0.25 * flat.var(1, ddof=1), rtol=1e-14)
    # momentum=None: cumulative average over batches
    rm, rv, nbt = np.zeros(3), np.ones(3), np.array(0, np.int64)
    batches = [RNG.normal(size=(4, 3, 5)) for _ in range(3)]
    for xb in batches:
        ref.batch_norm(xb, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    means = [np.moveaxis(b, 1, 0).reshape(3, -1).mean(1) for b in batches]
    assert int(nbt) == 3
    np.testing.assert_allclose(rm, np.mean(means, axis=0), rtol=1e-13)


def test_layer_and_rms_norm():
    x = RNG.normal(2.0, 3.0, (4, 5, 6))
    w, b = RNG.normal(size=(5, 6)), RNG.normal(size=(5, 6))
    y, mean, rstd = ref.layer_norm(x, (5, 6))
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(1, 2)), 1, atol=1e-4)
    dy = RNG.normal(size=x.shape)
    gx, gw, gb = ref.layer_norm_backward(dy, x, mean, rstd, w)
    vjp_check(lambda z: ref.layer_norm(z, (5, 6), w, b)[0], x, dy, gx)
    param_check(lambda p: ref.layer_norm(x, (5, 6), p, b)[0], w, dy, gw)
    param_check(lambda p: ref.layer_norm(x, (5, 6), w, p)[0], b, dy, gb)
    y, rstd = ref.rms_norm(x, (6,), eps=1e-6)
    np.testing.assert_allclose((y * y).mean(axis=-1), 1, atol=1e-5)
    w6 = RNG.normal(size=6)
    y, rstd = ref.rms_norm(x, (6,), w6, eps=1e-6)
    gx, gw = ref.rms_norm_backward(dy, x, rstd, w6)
    vjp_check(lambda z: ref.rms_norm(z, (6,), w6, eps=1e-6)[0], x, dy, gx)
    param_check(lambda p: ref.rms_norm(x, (6,), p, eps=1e-6)[0], w6, dy, gw)


@pytest.mark.parametrize("axis", [1, -1])
def test_group_and_instance_norm(axis):
    x = RNG.normal(-1.0, 2.0, (3, 6, 4, 5)) if axis == 1 else RNG.normal(-1, 2, (3, 4, 5, 6))
    C = 6
    w, b = RNG.normal(size=C), RNG.normal(size=C)
    y, mean, rstd = ref.group_norm(x, 3, axis=axis)
    xg = np.moveaxis(y, axis, 1).reshape(3, 3, -1)
    np.testing.assert_allclose(xg.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(xg.var(-1), 1, atol=1e-4)
    dy = RNG.normal(size=x.shape)
    y, mean, rstd = ref.group_norm(x, 3, w, b, axis=axis)
    gx, gw, gb = ref.group_norm_backward(dy, x, mean, rstd, w, 3, axis=axis)
    vjp_check(lambda z: ref.group_norm(z, 3, w, b, axis=axis)[0], x, dy, gx)
    param_check(lambda p: ref.group_norm(x, 3, p, b, axis=axis)[0], w, dy, gw)
    param_check(lambda p: ref.group_norm(x, 3, w, p, axis=axis)[0], b, dy, gb)
    y, mean, rstd = ref.instance_norm(x, weight=w, bias=b, axis=axis)
    gx, gw, gb = ref.instance_norm_backward(dy, x, mean, rstd, w, axis=axis)
    vjp_check(lambda z: ref.instance_norm(z, weight=w, bias=b, axis=axis)[0], x, dy, gx)
    param_check(lambda p: ref.instance_norm(x, weight=p, bias=b, axis=axis)[0], w, dy, gw)
    # instance norm == group norm with one channel per group
    np.testing.assert_allclose(y, ref.group_norm(x, C, w, b, axis=axis)[0], atol=1e-12)


def test_kernel_twins_against_oracles():
    """The numpy backend's kernel twins agree with the straight-from-definition oracles."""
    x = RNG.normal(5.0, 2.0, (7, 11))
    y, mean, rstd = np.empty_like(x), np.empty(7), np.empty(7)
    ref.rows_fwd(x, None, None, 1e-5, False, y, mean, rstd)
    yo, mo, ro = ref.layer_norm(x, (11,))
    np.testing.assert_allclose(y, yo, atol=1e-13)
    m, m2 = np.empty(7), np.empty(7)
    ref.rows_moments(x, m, m2)
    np.testing.assert_allclose(m2 / 11, x.var(axis=1), rtol=1e-13)
    x3 = RNG.normal(size=(2, 9, 4))
    m, m2 = np.empty((2, 4)), np.empty((2, 4))
    ref.channels_moments(x3, m, m2)
    np.testing.assert_allclose(m, x3.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(m2 / 9, x3.var(axis=1), rtol=1e-13)
    # channels-last group norm (2 groups of 2 channels) and instance norm (G = C)
    w, b = RNG.normal(size=4), RNG.normal(size=4)
    for G in (2, 4):
        y3, m, r = np.empty_like(x3), np.empty((2, G)), np.empty((2, G))
        ref.channels_fwd_grouped(x3, w, b, 1e-5, y3, m, r)
        yo, mo, ro = ref.group_norm(x3, G, w, b, axis=-1)
        np.testing.assert_allclose(y3, yo, atol=1e-13)
        np.testing.assert_allclose(m, mo.reshape(2, G), atol=1e-13)
        np.testing.assert_allclose(r, ro.reshape(2, G), rtol=1e-13)
    # rows_bwd_grouped against the group norm backward oracle: (N=2, C=4, S=5), G=2 groups
    xg, dyg = RNG.normal(3.0, 2.0, (2, 4, 5)), RNG.normal(size=(2, 4, 5))
    _, mo, ro = ref.group_norm(xg, 2, w, b)
    gx, gw, gb = ref.group_norm_backward(dyg, xg, mo, ro, w, num_groups=2)
    dx, sdy, sdxh = np.empty((4, 2, 5)), np.empty((4, 2)), np.empty((4, 2))
    ref.rows_bwd_grouped(dyg.reshape(4, 2, 5), xg.reshape(4, 2, 5), mo.ravel(), ro.ravel(),
                         w.reshape(2, 2), dx, sdy, sdxh)
    np.testing.assert_allclose(dx.reshape(gx.shape), gx, atol=1e-12)
    np.testing.assert_allclose(sdxh.reshape(2, 4).sum(axis=0), gw, atol=1e-12)
    np.testing.assert_allclose(sdy.reshape(2, 4).sum(axis=0), gb, atol=1e-12)
