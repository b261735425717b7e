"""torch 2.13 CPU as an extra oracle: forward, backward, running statistics, error messages.

Inputs are fed to torch as contiguous float64 copies (ARCHITECTURE.md §6: torch's BN/IN backward is
wrong for a channels-last grad_out with a contiguous input).
"""
import numpy as np
import pytest

import fastnorm as fn

from conftest import BACKENDS

torch = pytest.importorskip("torch")
F = torch.nn.functional


def t(a, grad=False):
    return torch.tensor(np.ascontiguousarray(a, dtype=np.float64), requires_grad=grad)


def grads(y, dy, *leaves):
    y.backward(t(dy))
    return [None if leaf is None else leaf.grad.numpy() for leaf in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm(backend, training):
    rng = np.random.default_rng(0)
    x, dy = rng.normal(2, 3, (6, 4, 5, 3)), rng.standard_normal((6, 4, 5, 3))
    w, b = rng.normal(size=4), rng.normal(size=4)
    rm, rv = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    rm_t, rv_t = t(rm), t(rv)
    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    yt = F.batch_norm(xt, rm_t, rv_t, wt, bt, training, 0.3, 1e-4)
    gxt, gwt, gbt = grads(yt, dy, xt, wt, bt)
    y, m, r = fn.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-4, return_stats=True,
                            backend=backend)
    gx, gw, gb = fn.batch_norm_backward(dy, x, m, r, w, training, backend=backend)
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(rm, rm_t.numpy(), atol=1e-12)
    np.testing.assert_allclose(rv, rv_t.numpy(), atol=1e-12)
    for a, e in ((gx, gxt), (gw, gwt), (gb, gbt)):
        np.testing.assert_allclose(a, e, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_channels_last_matches_torch_nchw(backend):
    rng = np.random.default_rng(1)
    x, dy = rng.normal(1, 2, (4, 3, 5, 5)), rng.standard_normal((4, 3, 5, 5))
    xt = t(x, True)
    yt = F.batch_norm(xt, None, None, training=True)
    (gxt,) = grads(yt, dy, xt)
    xcl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    y, m, r = fn.batch_norm(xcl, None, None, training=True, axis=-1, return_stats=True,
                            backend=backend)
    gx = fn.batch_norm_backward(np.moveaxis(dy, 1, -1), xcl, m, r, axis=-1,
                                backend=backend)[0]
    np.testing.assert_allclose(np.moveaxis(y, -1, 1), yt.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(np.moveaxis(gx, -1, 1), gxt, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_and_rms_norm(backend):
    rng = np.random.default_rng(2)
    x, dy = rng.normal(1, 2, (3, 4, 6)), rng.standard_normal((3, 4, 6))
    w, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    yt = F.layer_norm(xt, (4, 6), wt, bt, 1e-5)
    gxt, gwt, gbt = grads(yt, dy, xt, wt, bt)
    y, m, r = fn.layer_norm(x, (4, 6), w, b, return_stats=True, backend=backend)
    gx, gw, gb = fn.layer_norm_backward(dy, x, m, r, w, backend=backend)
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-10)
    for a, e in ((gx, gxt), (gw, gwt), (gb, gbt)):
        np.testing.assert_allclose(a, e, atol=1e-9)
    w6 = rng.normal(size=6)
    xt, wt = t(x, True), t(w6, True)
    yt = F.rms_norm(xt, (6,), wt)          # eps=None: finfo(float64).eps
    gxt, gwt = grads(yt, dy, xt, wt)
    y, r = fn.rms_norm(x, (6,), w6, return_stats=True, backend=backend)
    gx, gw = fn.rms_norm_backward(dy, x, r, w6, backend=backend)
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(gx, gxt, atol=1e-9)
    np.testing.assert_allclose(gw, gwt, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm(backend):
    rng = np.random.default_rng(3)
    x, dy = rng.normal(1, 2, (3, 6, 4, 5)), rng.standard_normal((3, 6, 4, 5))
    w, b = rng.normal(size=6), rng.normal(size=6)
    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    yt = F.group_norm(xt, 3, wt, bt, 1e-5)
    gxt, gwt, gbt = grads(yt, dy, xt, wt, bt)
    y, m, r = fn.group_norm(x, 3, w, b, return_stats=True, backend=backend)
    gx, gw, gb = fn.group_norm_backward(dy, x, m, r, w, num_groups=3, backend=backend)
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-10)
    for a, e in ((gx, gxt), (gw, gwt), (gb, gbt)):
        np.testing.assert_allclose(a, e, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_instance_norm_with_running_stats(backend):
    rng = np.random.default_rng(4)
    x, dy = rng.normal(1, 2, (3, 4, 7)), rng.standard_normal((3, 4, 7))
    w, b = rng.normal(size=4), rng.normal(size=4)
    rm, rv = rng.normal(size=4), rng.uniform(0.5, 2, 4)
    rm_t, rv_t = t(rm), t(rv)
    xt, wt, bt = t(x, True), t(w, True), t(b, True)
    yt = F.instance_norm(xt, rm_t, rv_t, wt, bt, True, 0.2, 1e-5)
    gxt, gwt, gbt = grads(yt, dy, xt, wt, bt)
    y, m, r = fn.instance_norm(x, rm, rv, w, b, True, 0.2, 1e-5, return_stats=True,
                               backend=backend)
    gx, gw, gb = fn.instance_norm_backward(dy, x, m, r, w, backend=backend)
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(rm, rm_t.numpy(), atol=1e-12)
    np.testing.assert_allclose(rv, rv_t.numpy(), atol=1e-12)
    for a, e in ((gx, gxt), (gw, gwt), (gb, gbt)):
        np.testing.assert_allclose(a, e, atol=1e-9)
    # use_input_stats=False: the running statistics normalize
    ye = fn.instance_norm(x, rm, rv, w, b, False, backend=backend)
    yet = F.instance_norm(t(x), t(rm), t(rv), t(w), t(b), False)
    np.testing.assert_allclose(ye, yet.numpy(), atol=1e-10)


def test_error_messages_match_torch():
    x = np.ones((1, 3))
    with pytest.raises(ValueError) as ours:
        fn.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError) as theirs:
        F.batch_norm(t(x), None, None, training=True)
    prefix = "Expected more than 1 value per channel when training"
    assert str(ours.value).startswith(prefix) and str(theirs.value).startswith(prefix)
    x = np.ones((2, 6, 4))
    with pytest.raises(ValueError, match="divisible by num_groups"):
        fn.group_norm(x, 4)
    with pytest.raises(RuntimeError, match="divisible by num_groups"):
        F.group_norm(t(x), 4)
