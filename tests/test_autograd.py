"""The tape: every op and composite expressions against central differences in float64,
the norms against the reference oracles, torch autograd as an optional extra oracle."""
import numpy as np
import pytest

import fastnorm as fn
from fastnorm import api, reference
from fastnorm import autograd as ag
from fastnorm.autograd import Tensor, no_grad


def _rng(seed=0):
    return np.random.default_rng(seed)


def check_grads(f, *arrays, seed=0, h=1e-6, tol=1e-6):
    """Tape gradients of ``sum(u * f(*xs))`` against central differences, per input.

    For every input i and a random direction d: ``<grad_i, d>`` must equal
    ``(F(x_i + h d) - F(x_i - h d)) / 2h`` (HIPS autograd's check_vjp, per argument), and the
    full gradient is compared too for inputs of at most 40 elements.
    """
    rng = _rng(seed)
    xs = [np.array(a, dtype=np.float64) for a in arrays]
    ts = [Tensor(x.copy(), requires_grad=True) for x in xs]
    out = f(*ts)
    u = rng.normal(size=out.shape)
    out.backward(u)

    def F(vals):
        with no_grad():
            return float(np.sum(u * f(*[Tensor(v) for v in vals]).data))

    for i, (x, t) in enumerate(zip(xs, ts)):
        assert t.grad is not None and t.grad.shape == x.shape, f"input {i}: no/odd grad"
        d = rng.normal(size=x.shape)
        plus = [v if j != i else v + h * d for j, v in enumerate(xs)]
        minus = [v if j != i else v - h * d for j, v in enumerate(xs)]
        num = (F(plus) - F(minus)) / (2 * h)
        ana = float(np.sum(t.grad * d))
        assert abs(num - ana) <= tol * max(1.0, abs(num)), \
            f"input {i}: directional derivative tape {ana} vs central difference {num}"
        if x.size <= 40:
            full = np.empty_like(x)
            for k in range(x.size):
                e = np.zeros(x.size)
                e[k] = h
                e = e.reshape(x.shape)
                full.flat[k] = (F([v if j != i else v + e for j, v in enumerate(xs)])
                                - F([v if j != i else v - e for j, v in enumerate(xs)])) / (2 * h)
            np.testing.assert_allclose(t.grad, full, rtol=1e-5, atol=1e-7,
                                       err_msg=f"input {i}: full gradient")


# ------------------------------------------------------------------------------ Tensor basics

def test_tensor_basics_and_errors():
    t = Tensor([1.0, 2.0], requires_grad=True)
    assert t.shape == (2,) and t.dtype == np.float64 and t.is_leaf and t.grad is None
    assert "requires_grad=True" in repr(t)
    with pytest.raises(TypeError, match="requires_grad"):
        Tensor(np.arange(3), requires_grad=True)
    with pytest.raises(TypeError, match="data"):
        Tensor(np.array(["a"]))
    y = t * 3
    assert not y.is_leaf and y.requires_grad
    with pytest.raises(ValueError, match="grad"):
        y.backward()                           # non-scalar without grad
    with pytest.raises(ValueError, match="grad"):
        y.backward(np.ones(3))
    with pytest.raises(RuntimeError):
        Tensor([1.0]).backward()
    with pytest.raises(TypeError, match="operand"):
        t + "x"


def test_leaf_grads_accumulate_and_intermediates_keep_none():
    x = Tensor([1.0, -2.0], requires_grad=True)
    y = x * x
    y.sum().backward()
    y2 = x * x
    y2.sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * (2 * x.data))
    assert y.grad is None


def test_reused_node_and_diamond():
    # z = a*b; out = z*z + z + a  -> d/da = 2 z b + b + 1
    a = Tensor(np.array([1.5, -0.5]), requires_grad=True)
    b = Tensor(np.array([2.0, 3.0]), requires_grad=True)
    z = a * b
    (z * z + z + a).sum().backward()
    zd = a.data * b.data
    np.testing.assert_allclose(a.grad, 2 * zd * b.data + b.data + 1)
    np.testing.assert_allclose(b.grad, 2 * zd * a.data + a.data)


def test_no_grad_and_constants():
    w = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = w * 2 + 1
        assert not ag.is_grad_enabled()
    assert ag.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    c = Tensor(np.ones(3))                     # a constant Tensor
    out = (w * c + np.arange(3.0)).sum()       # ndarray on the left of a Tensor too
    out.backward()
    np.testing.assert_array_equal(w.grad, np.ones(3))
    assert c.grad is None


def test_ndarray_on_the_left_defers_to_tensor():
    w = Tensor(np.ones(2), requires_grad=True)
    for expr in (lambda: np.ones(2) + w, lambda: np.ones(2) - w, lambda: np.ones(2) * w,
                 lambda: np.ones(2) / w, lambda: np.ones((3, 2)) @ w):
        assert isinstance(expr(), Tensor)


def test_deep_chain_does_not_recurse():
    x = Tensor(np.array(1.0), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0 + 0.0
    y.backward()
    assert x.grad == 1.0


def test_float32_stays_float32():
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    w = Tensor(np.ones((4, 3), np.float32), requires_grad=True)
    y = ag.linear(x, w).sigmoid().sum() * 0.5
    assert y.dtype == np.float32
    y.backward()
    assert x.grad.dtype == np.float32 and w.grad.dtype == np.float32


# ------------------------------------------------------------------------ ops vs differences

R = _rng(1)
A23, B23, B3, B13 = R.normal(size=(2, 3)), R.normal(size=(2, 3)), R.normal(size=3), \
    R.normal(size=(1, 3))
POS23 = R.uniform(0.5, 2.0, (2, 3))

OPS = {
    "add": (lambda a, b: a + b, [A23, B23]),
    "add_broadcast": (lambda a, b: a + b, [A23, B3]),
    "radd_scalar": (lambda a: 2.0 + a, [A23]),
    "sub_broadcast": (lambda a, b: a - b, [B13, A23]),
    "rsub": (lambda a: 1.0 - a, [A23]),
    "mul_broadcast": (lambda a, b: a * b, [A23, B13]),
    "div": (lambda a, b: a / b, [A23, POS23]),
    "div_broadcast": (lambda a, b: a / b, [A23, R.uniform(1, 2, (2, 1))]),
    "rdiv": (lambda b: 3.0 / b, [POS23]),
    "neg": (lambda a: -a, [A23]),
    "pow_scalar": (lambda a: a ** 3, [A23]),
    "pow_fractional": (lambda a: a ** 0.5, [POS23]),
    "pow_tensor": (lambda a, b: a ** b, [POS23, B23]),
    "rpow": (lambda b: 2.0 ** b, [B23]),
    "exp": (lambda a: a.exp(), [A23]),
    "log": (lambda a: a.log(), [POS23]),
    "sqrt": (lambda a: a.sqrt(), [POS23]),
    "relu": (lambda a: a.relu(), [A23 + 0.05 * np.sign(A23)]),
    "sigmoid": (lambda a: a.sigmoid(), [3 * A23]),
    "tanh": (lambda a: a.tanh(), [A23]),
    "sum_all": (lambda a: a.sum(), [A23]),
    "sum_dim": (lambda a: a.sum(1), [R.normal(size=(2, 3, 4))]),
    "sum_dims_keep": (lambda a: a.sum((0, 2), keepdim=True), [R.normal(size=(2, 3, 4))]),
    "mean_all": (lambda a: a.mean(), [A23]),
    "mean_neg_dim": (lambda a: a.mean(-1), [R.normal(size=(2, 3, 4))]),
    "reshape": (lambda a: a.reshape(3, 2) * np.arange(6.0).reshape(3, 2), [A23]),
    "reshape_tuple": (lambda a: a.reshape((6, -1)), [A23]),
    "transpose": (lambda a: a.transpose(0, 2) * np.arange(24.0).reshape(4, 3, 2),
                  [R.normal(size=(2, 3, 4))]),
    "permute": (lambda a: a.permute(1, 2, 0), [R.normal(size=(2, 3, 4))]),
    "T": (lambda a: a.T, [A23]),
    "matmul_2d": (lambda a, b: a @ b, [A23, R.normal(size=(3, 4))]),
    "matmul_batched_broadcast": (lambda a, b: a @ b,
                                 [R.normal(size=(2, 1, 3, 4)), R.normal(size=(5, 4, 2))]),
    "matmul_vec_right": (lambda a, b: a @ b, [A23, B3]),
    "matmul_vec_left": (lambda a, b: a @ b, [B3, R.normal(size=(2, 3, 4))]),
    "matmul_dot": (lambda a, b: a @ b, [B3, R.normal(size=3)]),
    "linear": (lambda x, w, b: ag.linear(x, w, b),
               [R.normal(size=(2, 5, 3)), R.normal(size=(4, 3)), R.normal(size=4)]),
    "linear_nobias": (lambda x, w: ag.linear(x, w), [A23, R.normal(size=(4, 3))]),
    "log_softmax": (lambda a: a.log_softmax(), [R.normal(size=(3, 5))]),
    "log_softmax_dim0": (lambda a: ag.log_softmax(a, 0), [R.normal(size=(3, 5))]),
    "cross_entropy": (lambda a: ag.cross_entropy(a, np.array([0, 4, 2])),
                      [R.normal(size=(3, 5))]),
    "cross_entropy_sum": (lambda a: ag.cross_entropy(a, np.array([1, 1, 3]), "sum"),
                          [R.normal(size=(3, 5))]),
    "cross_entropy_none": (lambda a: ag.cross_entropy(a, np.array([1, 0, 3]), "none"),
                           [R.normal(size=(3, 5))]),
    "mse": (lambda a, b: ag.mse_loss(a, b), [A23, B23]),
    "mse_sum": (lambda a, b: ag.mse_loss(a, b, reduction="sum"), [A23, B23]),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_gradient_matches_central_differences(name):
    f, arrays = OPS[name]
    check_grads(f, *arrays)


COMPOSITES = {
    # micrograd-style expressions mixing every kind of node
    "poly": (lambda a, b: (a * b + b ** 3 - a / (b * b + 1.0)).relu() * 2 + a.tanh(),
             [A23, B23]),
    "softplus_chain": (lambda a: ((a.exp() + 1.0).log() * a.sigmoid()).mean(0), [A23]),
    "mlp": (lambda x, w1, b1, w2: ag.cross_entropy(
        ag.linear(ag.linear(x, w1, b1).tanh(), w2), np.array([0, 2, 1, 1])),
        [R.normal(size=(4, 3)), R.normal(size=(5, 3)), R.normal(size=5),
         R.normal(size=(3, 5))]),
    "normalize_rows": (lambda a: a / ((a * a).sum(-1, keepdim=True) + 1e-3) ** 0.5, [A23]),
    "attention": (lambda q, k: ((q @ k.T) * 0.5).log_softmax() @ k,
                  [R.normal(size=(3, 4)), R.normal(size=(5, 4))]),
    "bn_then_ln": (lambda x, w: fn.layer_norm(
        fn.batch_norm(x, None, None, w, None, True) * x, (3,)).sigmoid(),
        [R.normal(size=(6, 3)), R.uniform(0.5, 1.5, 3)]),
}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composite_gradient_matches_central_differences(name):
    f, arrays = COMPOSITES[name]
    check_grads(f, *arrays)


def test_op_argument_errors():
    x = Tensor(A23, requires_grad=True)
    with pytest.raises(ValueError, match="weight"):
        ag.linear(x, Tensor(np.ones((4, 2))))
    with pytest.raises(ValueError, match="bias"):
        ag.linear(x, Tensor(np.ones((4, 3))), Tensor(np.ones(3)))
    with pytest.raises(ValueError, match="target"):
        ag.cross_entropy(x, np.array([0, 3]))
    with pytest.raises(ValueError, match="target"):
        ag.cross_entropy(x, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="reduction"):
        ag.cross_entropy(x, np.array([0, 1]), "avg")
    with pytest.raises(ValueError, match="target"):
        ag.mse_loss(x, np.ones(3))
    with pytest.raises(ValueError, match="dim"):
        x.sum(2)
    with pytest.raises(ValueError, match="dims"):
        x.permute(0, 0)


def test_cross_entropy_value_against_formula():
    x = R.normal(size=(4, 6))
    t = np.array([5, 0, 3, 3])
    lse = np.log(np.exp(x).sum(1))
    np.testing.assert_allclose(ag.cross_entropy(Tensor(x), t).item(),
                               np.mean(lse - x[np.arange(4), t]), rtol=1e-14)
    big = Tensor(np.array([[1000.0, 0.0]]))       # no overflow
    assert np.isfinite(ag.cross_entropy(big, np.array([1])).item())
    assert ag.sigmoid(Tensor(np.array([-1000.0, 1000.0]))).data.tolist() == [0.0, 1.0]


# ------------------------------------------------------------------------------- the norms

NORMS = {
    "batch_train": (lambda x, w, b: fn.batch_norm(x, None, None, w, b, True),
                    (5, 3, 4), 3),
    "batch_train_channels_last": (lambda x, w, b: fn.batch_norm(x, None, None, w, b, True,
                                                                axis=-1), (4, 5, 3), 3),
    "batch_eval": (lambda x, w, b: fn.batch_norm(x, np.full(3, 0.3), np.full(3, 2.0), w, b,
                                                 False), (5, 3, 2), 3),
    "layer": (lambda x, w, b: fn.layer_norm(x, (3, 4), w.reshape(3, 4), b.reshape(3, 4)),
              (2, 3, 4), 12),
    "group": (lambda x, w, b: fn.group_norm(x, 2, w, b), (3, 4, 5), 4),
    "group_channels_last": (lambda x, w, b: fn.group_norm(x, 2, w, b, axis=-1), (3, 5, 4), 4),
    "instance": (lambda x, w, b: fn.instance_norm(x, None, None, w, b), (2, 3, 6), 3),
    "instance_eval": (lambda x, w, b: fn.instance_norm(x, np.zeros(3), np.ones(3), w, b,
                                                       use_input_stats=False), (2, 3, 6), 3),
    "rms": (lambda x, w, b: fn.rms_norm(x, (4,), w) + b, (3, 4), 4),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_gradients_match_central_differences(name):
    f, shape, C = NORMS[name]
    rng = _rng(2)
    x = rng.normal(1.0, 2.0, shape)
    check_grads(f, x, rng.uniform(0.5, 1.5, C), rng.normal(size=C))


def test_norms_use_the_analytic_backward_kernels(monkeypatch):
    calls = []
    for name in ("batch_norm_backward", "layer_norm_backward", "group_norm_backward",
                 "instance_norm_backward", "rms_norm_backward"):
        orig = getattr(api, name)

        def spy(*a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(*a, **k)
        monkeypatch.setattr(api, name, spy)
    x = Tensor(_rng().normal(size=(4, 4, 3)), requires_grad=True)
    out = (fn.batch_norm(x, None, None, training=True) + fn.layer_norm(x, 3)
           + fn.group_norm(x, 2) + fn.instance_norm(x) + fn.rms_norm(x, 3))
    out.sum().backward()
    assert sorted(calls) == sorted(["batch_norm_backward", "layer_norm_backward",
                                    "group_norm_backward", "instance_norm_backward",
                                    "rms_norm_backward"])


def test_batch_norm_tape_matches_reference_and_updates_running_stats():
    rng = _rng(3)
    x = rng.normal(3.0, 2.0, (8, 4, 5))
    w, b = rng.uniform(0.5, 1.5, 4), rng.normal(size=4)
    rm, rv = np.zeros(4), np.ones(4)
    rm_ref, rv_ref = np.zeros(4), np.ones(4)
    xt, wt, bt = (Tensor(a, requires_grad=True) for a in (x, w, b))
    y, mean, rstd = fn.batch_norm(xt, rm, rv, wt, bt, True, return_stats=True)
    y_ref, mean_ref, rstd_ref = reference.batch_norm(x, rm_ref, rv_ref, w, b, True)
    assert isinstance(y, Tensor) and isinstance(mean, np.ndarray)
    np.testing.assert_allclose(y.data, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-12)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-12)
    dy = rng.normal(size=x.shape)
    y.backward(dy)
    gx, gw, gb = reference.batch_norm_backward(dy, x, mean_ref, rstd_ref, w, True)
    np.testing.assert_allclose(xt.grad, gx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(wt.grad, gw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bt.grad, gb, rtol=1e-10, atol=1e-12)


def test_batch_norm_momentum_none_counts_on_the_tape():
    x = Tensor(_rng().normal(size=(6, 2)), requires_grad=True)
    rm, rv, nbt = np.zeros(2), np.ones(2), np.zeros((), np.int64)
    for _ in range(3):
        fn.batch_norm(x, rm, rv, None, None, True, None, num_batches_tracked=nbt)
    assert int(nbt) == 3
    # cumulative average of three identical batches: the batch statistics themselves
    np.testing.assert_allclose(rm, x.data.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rv, x.data.var(0, ddof=1), rtol=1e-12)


def test_norm_out_must_not_overwrite_a_recorded_input():
    x = Tensor(_rng().normal(size=(4, 3)), requires_grad=True)
    with pytest.raises(ValueError, match="out"):
        fn.layer_norm(x, 3, out=x.data)
    buf = np.empty((4, 3))
    y = fn.layer_norm(x, 3, out=buf)
    np.testing.assert_array_equal(y.data, buf)


def test_backward_functions_accept_tensors():
    x = _rng().normal(size=(4, 3))
    y, m, r = fn.layer_norm(x, 3, return_stats=True)
    got = fn.layer_norm_backward(Tensor(np.ones_like(y)), Tensor(x), m, r)
    want = fn.layer_norm_backward(np.ones_like(y), x, m, r)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    y, r = fn.rms_norm(x, 3, return_stats=True)
    np.testing.assert_array_equal(fn.rms_norm_backward(Tensor(y), Tensor(x), r)[0],
                                  fn.rms_norm_backward(y, x, r)[0])
    for name, kw in (("batch_norm", {}), ("instance_norm", {}), ("group_norm", {})):
        x3 = _rng().normal(size=(4, 2, 5))
        args = (x3, None, None) if name != "group_norm" else (x3, 2)
        fwd = getattr(fn, name)(*args, return_stats=True, **({"training": True}
                                                             if name == "batch_norm" else {}))
        bw = getattr(fn, name + "_backward")
        extra = {"num_groups": 2} if name == "group_norm" else {}
        a = bw(Tensor(np.ones_like(fwd[0])), Tensor(x3), fwd[1], fwd[2], **extra)
        b = bw(np.ones_like(fwd[0]), x3, fwd[1], fwd[2], **extra)
        np.testing.assert_array_equal(a[0], b[0])


# ---------------------------------------------------------------------- torch as an oracle

def test_mlp_with_batch_norm_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    from fastnorm import nn
    rng = _rng(4)
    x = rng.normal(size=(16, 8))
    target = rng.integers(0, 5, 16)
    net = nn.Sequential(nn.Linear(8, 12, dtype=np.float64, rng=1), nn.BatchNorm1d(12,
                        dtype=np.float64), nn.ReLU(), nn.Linear(12, 6, dtype=np.float64, rng=2),
                        nn.BatchNorm1d(6, dtype=np.float64), nn.Sigmoid(),
                        nn.Linear(6, 5, dtype=np.float64, rng=3))
    for m in (net[1], net[4]):                   # non-trivial affine parameters
        m.weight.data[:] = rng.uniform(0.5, 1.5, m.num_features)
        m.bias.data[:] = rng.normal(size=m.num_features)
    tnet = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.BatchNorm1d(12),
                               torch.nn.ReLU(), torch.nn.Linear(12, 6),
                               torch.nn.BatchNorm1d(6), torch.nn.Sigmoid(),
                               torch.nn.Linear(6, 5)).double()
    tnet.load_state_dict({k: torch.from_numpy(v) for k, v in net.state_dict().items()})
    xt = Tensor(x, requires_grad=True)
    loss = nn.CrossEntropyLoss()(net(xt), target)
    loss.backward()
    xtt = torch.tensor(x, requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(tnet(xtt), torch.from_numpy(target))
    tloss.backward()
    assert abs(loss.item() - tloss.item()) < 1e-12
    np.testing.assert_allclose(xt.grad, xtt.grad.numpy(), rtol=1e-9, atol=1e-12)
    tgrads = dict(tnet.named_parameters())
    for name, p in net.named_parameters():
        np.testing.assert_allclose(p.grad, tgrads[name].grad.numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    tbuf = dict(tnet.named_buffers())
    for name, b in net.named_buffers():
        np.testing.assert_allclose(b, tbuf[name].numpy(), rtol=1e-12, err_msg=name)
