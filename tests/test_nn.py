"""Layers, state dicts, optimizers, weight/cosine normalization and BN folding.

The float64 reference oracles and written-out update formulas are the oracles; torch
(behind importorskip) checks outputs, running statistics, key names and update rules too.
"""
import numpy as np
import pytest

from fastnorm import nn, reference
from fastnorm.autograd import Tensor
from fastnorm.optim import SGD, Adam

from test_autograd import check_grads


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------- defaults and state keys

def test_batch_norm_defaults_and_keys():
    bn = nn.BatchNorm2d(3)
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.training) == \
        (1e-5, 0.1, True, True, True)
    np.testing.assert_array_equal(bn.weight.data, np.ones(3, np.float32))
    np.testing.assert_array_equal(bn.bias.data, np.zeros(3, np.float32))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(3, np.float32))
    np.testing.assert_array_equal(bn.running_var, np.ones(3, np.float32))
    assert bn.num_batches_tracked.dtype == np.int64 and bn.num_batches_tracked.shape == ()
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                     "num_batches_tracked"]
    assert list(nn.BatchNorm1d(3, affine=False, track_running_stats=False).state_dict()) == []
    assert list(nn.BatchNorm1d(3, bias=False).state_dict())[:2] == ["weight", "running_mean"]
    inorm = nn.InstanceNorm2d(3)
    assert (inorm.affine, inorm.track_running_stats) == (False, False)
    assert list(inorm.state_dict()) == []
    assert list(nn.LayerNorm((2, 3)).state_dict()) == ["weight", "bias"]
    assert nn.LayerNorm((2, 3)).weight.shape == (2, 3)
    assert list(nn.LayerNorm(4, bias=False).state_dict()) == ["weight"]
    assert list(nn.LayerNorm(4, elementwise_affine=False).state_dict()) == []
    assert list(nn.GroupNorm(2, 4).state_dict()) == ["weight", "bias"]
    assert list(nn.RMSNorm(4).state_dict()) == ["weight"] and nn.RMSNorm(4).eps is None
    assert nn.BatchNorm1d(2, dtype=np.float64).weight.dtype == np.float64


def test_train_eval_propagate_and_return_self():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.BatchNorm1d(2)))
    assert net.eval() is net
    assert all(not m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    assert [n for n, _ in net.named_modules()] == ["", "0", "1", "1.0"]


def test_constructor_and_input_errors():
    with pytest.raises(ValueError, match="num_features"):
        nn.BatchNorm1d(0)
    with pytest.raises(ValueError, match="eps"):
        nn.LayerNorm(3, eps=0)
    with pytest.raises(TypeError, match="momentum"):
        nn.BatchNorm1d(3, momentum="x")
    with pytest.raises(ValueError, match="divisible"):
        nn.GroupNorm(3, 4)
    with pytest.raises(TypeError, match="dtype"):
        nn.Linear(2, 2, dtype=np.int32)
    with pytest.raises(ValueError, match="expected 4D input"):
        nn.BatchNorm2d(3)(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="num_features"):
        nn.InstanceNorm1d(3, affine=True)(np.zeros((2, 4, 5), np.float32))
    with pytest.raises(TypeError, match="input"):
        nn.Linear(2, 2)([1.0, 2.0])
    with pytest.raises(TypeError, match="Parameter"):
        nn.Linear(2, 2).weight = np.ones((2, 2))
    with pytest.raises(ValueError, match="Expected more than 1 value"):
        nn.BatchNorm1d(3)(np.ones((1, 3), np.float32))


# ----------------------------------------------------------------- outputs vs the reference

def _steps(layer, xs):
    return [layer(x) for x in xs]


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("cls,shape,axis", [(nn.BatchNorm1d, (8, 3), 1),
                                            (nn.BatchNorm1d, (8, 3, 5), 1),
                                            (nn.BatchNorm2d, (4, 3, 2, 5), 1),
                                            (nn.BatchNorm2d, (4, 2, 5, 3), -1),
                                            (nn.BatchNorm3d, (2, 3, 2, 2, 3), 1)])
def test_batch_norm_layer_matches_reference(cls, shape, axis, momentum):
    rng = _rng(1)
    bn = cls(3, momentum=momentum, dtype=np.float64, axis=axis)
    bn.weight.data[:] = rng.uniform(0.5, 1.5, 3)
    bn.bias.data[:] = rng.normal(size=3)
    rm, rv, nbt = np.zeros(3), np.ones(3), np.zeros((), np.int64)
    for step in range(3):
        x = rng.normal(2.0, 3.0, shape)
        y = bn(x)
        y_ref, _, _ = reference.batch_norm(x, rm, rv, bn.weight.data, bn.bias.data, True,
                                           momentum, 1e-5, axis, num_batches_tracked=nbt)
        np.testing.assert_allclose(y.data, y_ref, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 3
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12)
    bn.eval()
    x = rng.normal(size=shape)
    y_ref, _, _ = reference.batch_norm(x, rm, rv, bn.weight.data, bn.bias.data, False,
                                       axis=axis)
    np.testing.assert_allclose(bn(x).data, y_ref, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 3                  # eval does not count


def test_batch_norm_without_running_stats_uses_batch_stats_in_eval():
    x = _rng().normal(size=(6, 2))
    bn = nn.BatchNorm1d(2, track_running_stats=False, dtype=np.float64).eval()
    np.testing.assert_allclose(bn(x).data, reference.batch_norm(x, None, None, np.ones(2),
                                                                np.zeros(2), True)[0],
                               rtol=1e-12)


def test_instance_norm_layer_matches_reference_including_unbatched():
    rng = _rng(2)
    m = nn.InstanceNorm1d(3, affine=True, track_running_stats=True, dtype=np.float64)
    rm, rv = np.zeros(3), np.ones(3)
    x = rng.normal(1.0, 2.0, (4, 3, 7))
    y_ref = reference.instance_norm(x, rm, rv, np.ones(3), np.zeros(3), True, 0.1)[0]
    np.testing.assert_allclose(m(x).data, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(m.running_var, rv, rtol=1e-12)
    assert int(m.num_batches_tracked) == 0                   # torch never counts it here
    m.eval()
    u = rng.normal(size=(3, 7))                              # unbatched (C, L)
    y_ref = reference.instance_norm(u[None], rm, rv, np.ones(3), np.zeros(3), False)[0][0]
    np.testing.assert_allclose(m(u).data, y_ref, rtol=1e-12, atol=1e-12)
    cl = nn.InstanceNorm2d(3, axis=-1, dtype=np.float64)     # channels-last
    x = rng.normal(size=(2, 4, 5, 3))
    np.testing.assert_allclose(cl(x).data, reference.instance_norm(x, axis=-1)[0],
                               rtol=1e-12, atol=1e-12)


def test_layer_group_rms_layers_match_reference():
    rng = _rng(3)
    x = rng.normal(3.0, 2.0, (4, 6, 5))
    ln = nn.LayerNorm((6, 5), dtype=np.float64)
    ln.weight.data[:] = rng.normal(size=(6, 5))
    np.testing.assert_allclose(ln(x).data, reference.layer_norm(x, (6, 5), ln.weight.data,
                                                                ln.bias.data)[0], rtol=1e-12,
                               atol=1e-12)
    gn = nn.GroupNorm(3, 6, dtype=np.float64)
    np.testing.assert_allclose(gn(x).data, reference.group_norm(x, 3)[0], rtol=1e-12,
                               atol=1e-12)
    rms = nn.RMSNorm(5, dtype=np.float64)
    np.testing.assert_allclose(rms(x).data, reference.rms_norm(x, (5,), np.ones(5))[0],
                               rtol=1e-12)


def test_layers_record_on_the_tape():
    rng = _rng(4)
    for layer, shape in ((nn.BatchNorm1d(3, dtype=np.float64), (6, 3)),
                         (nn.LayerNorm(3, dtype=np.float64), (6, 3)),
                         (nn.GroupNorm(1, 3, dtype=np.float64), (6, 3, 2)),
                         (nn.InstanceNorm1d(3, affine=True, dtype=np.float64), (6, 3, 4)),
                         (nn.RMSNorm(3, dtype=np.float64), (6, 3))):
        x = Tensor(rng.normal(size=shape), requires_grad=True)
        (layer(x) * rng.normal(size=shape)).sum().backward()
        assert x.grad is not None and layer.weight.grad is not None, type(layer).__name__


# ----------------------------------------------------------------------- state dict & files

def _trained_net(dtype=np.float32):
    rng = _rng(5)
    net = nn.Sequential(nn.Linear(4, 6, dtype=dtype, rng=0), nn.BatchNorm1d(6, dtype=dtype),
                        nn.ReLU(), nn.Linear(6, 3, dtype=dtype, rng=1),
                        nn.LayerNorm(3, dtype=dtype))
    for _ in range(3):
        net(rng.normal(size=(8, 4)).astype(dtype))
    net[1].weight.data[:] = rng.normal(size=6)
    return net.eval()


def test_state_dict_round_trip_and_strict_errors():
    a, b = _trained_net(), nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                                         nn.Linear(6, 3), nn.LayerNorm(3)).eval()
    sd = a.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                        "1.running_var", "1.num_batches_tracked", "3.weight", "3.bias",
                        "4.weight", "4.bias"]
    assert b.load_state_dict(sd) == ([], [])
    x = _rng().normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(a(x).data, b(x).data)
    assert int(b[1].num_batches_tracked) == 3
    sd["0.weight"][:] = 99                               # a copy, not a view
    assert not np.any(a[0].weight.data == 99)

    with pytest.raises(ValueError, match="missing keys \\['1.running_var'\\]"):
        b.load_state_dict({k: v for k, v in sd.items() if k != "1.running_var"})
    with pytest.raises(ValueError, match="unexpected keys \\['extra'\\]"):
        b.load_state_dict({**sd, "extra": np.zeros(1)})
    bad = dict(sd)
    bad["3.weight"] = np.zeros((3, 5), np.float32)
    before = b[0].weight.data.copy()
    bad["0.weight"] = np.full((6, 4), 7, np.float32)
    with pytest.raises(ValueError, match="size mismatch for 3.weight"):
        b.load_state_dict(bad)
    np.testing.assert_array_equal(b[0].weight.data, before)   # nothing copied on error
    missing, unexpected = b.load_state_dict({"0.bias": sd["0.bias"], "zz": 1}, strict=False)
    assert "0.weight" in missing and unexpected == ["zz"]
    with pytest.raises(TypeError, match="state_dict"):
        b.load_state_dict([1, 2])


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_load_is_bit_exact(tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    a = _trained_net(np.float64)
    a[1].running_var[:] = np.nextafter(a[1].running_var, 10)   # last-bit values survive
    path = tmp_path / ("model" + suffix)
    a.save(path)
    b = nn.Sequential(nn.Linear(4, 6, dtype=np.float64), nn.BatchNorm1d(6, dtype=np.float64),
                      nn.ReLU(), nn.Linear(6, 3, dtype=np.float64),
                      nn.LayerNorm(3, dtype=np.float64))
    assert b.load(path) is b
    for (k, va), (k2, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and va.dtype == vb.dtype and va.tobytes() == vb.tobytes(), k


def test_save_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match="path"):
        nn.Linear(2, 2).save(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="path"):
        nn.Linear(2, 2).load(tmp_path / "m.bin")


# ---------------------------------------------------------------------- torch as an oracle

def _torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return torch


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("kind", ["bn1d", "bn2d", "bn2d_channels_last", "bn3d", "in1d",
                                  "in2d_tracked", "ln", "gn", "rms"])
def test_layers_match_torch_modules(kind, momentum):
    torch = _torch()
    T = torch.nn
    rng = _rng(6)
    C = 4
    ours, theirs, shape, perm = {
        "bn1d": (nn.BatchNorm1d(C, momentum=momentum), T.BatchNorm1d(C, momentum=momentum),
                 (8, C, 3), None),
        "bn2d": (nn.BatchNorm2d(C, momentum=momentum), T.BatchNorm2d(C, momentum=momentum),
                 (4, C, 3, 5), None),
        "bn2d_channels_last": (nn.BatchNorm2d(C, momentum=momentum, axis=-1),
                               T.BatchNorm2d(C, momentum=momentum), (4, 3, 5, C),
                               (0, 3, 1, 2)),
        "bn3d": (nn.BatchNorm3d(C, momentum=momentum), T.BatchNorm3d(C, momentum=momentum),
                 (2, C, 2, 3, 2), None),
        "in1d": (nn.InstanceNorm1d(C, momentum=momentum, affine=True),
                 T.InstanceNorm1d(C, momentum=momentum, affine=True), (3, C, 6), None),
        "in2d_tracked": (nn.InstanceNorm2d(C, momentum=momentum, track_running_stats=True),
                         T.InstanceNorm2d(C, momentum=momentum, track_running_stats=True),
                         (3, C, 4, 3), None),
        "ln": (nn.LayerNorm((C, 3)), T.LayerNorm((C, 3)), (5, C, 3), None),
        "gn": (nn.GroupNorm(2, C), T.GroupNorm(2, C), (3, C, 5), None),
        "rms": (nn.RMSNorm(3), T.RMSNorm(3), (5, C, 3), None),
    }[kind]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, tuple(p.shape)).astype(np.float32)))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})

    def to_torch(x):
        t = torch.from_numpy(x)
        return t.permute(*perm).contiguous() if perm else t

    for mode in ("train", "train", "eval"):
        getattr(ours, mode)()
        getattr(theirs, mode)()
        x = rng.normal(1.0, 2.0, shape).astype(np.float32)
        xt = Tensor(x, requires_grad=True)
        tx = to_torch(x).requires_grad_(True)
        y, ty = ours(xt), theirs(tx)
        ty_ours_layout = ty.permute(0, 2, 3, 1) if perm else ty
        np.testing.assert_allclose(y.data, ty_ours_layout.detach().numpy(), rtol=1e-5,
                                   atol=2e-5)
        dy = rng.normal(size=shape).astype(np.float32)
        y.backward(dy)
        ty.backward(to_torch(dy))
        gx = xt.grad if not perm else xt.grad.transpose(0, 3, 1, 2)
        np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-4, atol=1e-4)
        tp = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            np.testing.assert_allclose(p.grad, tp[name].grad.numpy(), rtol=1e-4, atol=1e-4,
                                       err_msg=name)
            p.grad = None
            tp[name].grad = None
        tsd = theirs.state_dict()
        for k, v in ours.state_dict().items():
            np.testing.assert_allclose(v, tsd[k].numpy(), rtol=1e-6, atol=1e-7, err_msg=k)


def test_torch_exported_state_dict_gives_torch_eval_outputs():
    torch = _torch()
    tnet = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.SGD(tnet.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):                              # running stats and weights move
        opt.zero_grad()
        tnet(torch.randn(16, 5, generator=g)).square().mean().backward()
        opt.step()
    tnet.eval()
    exported = {k: v.detach().numpy().copy() for k, v in tnet.state_dict().items()}
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4),
                        nn.LayerNorm(4)).eval()
    net.load_state_dict(exported)
    x = torch.randn(7, 5, generator=g)
    np.testing.assert_allclose(net(x.numpy()).data, tnet(x).detach().numpy(), rtol=1e-5,
                               atol=1e-6)


# ----------------------------------------------------------------------- Linear, Sequential

def test_linear_init_and_forward():
    lin = nn.Linear(16, 5, rng=3)
    assert lin.weight.dtype == np.float32 and lin.weight.shape == (5, 16)
    assert np.abs(lin.weight.data).max() <= 0.25 and np.abs(lin.bias.data).max() <= 0.25
    assert np.abs(lin.weight.data).max() > 0.2                 # spread over U(-1/4, 1/4)
    x = _rng().normal(size=(3, 16)).astype(np.float32)
    np.testing.assert_allclose(lin(x).data, x @ lin.weight.data.T + lin.bias.data, rtol=1e-6)
    assert nn.Linear(3, 2, bias=False).bias is None
    assert [p.shape for p in nn.Sequential(lin, nn.ReLU(), nn.Linear(5, 2)).parameters()] \
        == [(5, 16), (5,), (2, 5), (2,)]


# --------------------------------------------------------------------------- optimizers

def _quadratic_grads(params, k):
    for i, p in enumerate(params):
        p.grad = np.sin(np.arange(p.size) + k + i).reshape(p.shape) * (1 + p.data)


def _run_ours(opt_cls, kwargs, steps=6):
    rng = _rng(7)
    params = [Tensor(rng.normal(size=(3, 2)), requires_grad=True),
              Tensor(rng.normal(size=4), requires_grad=True)]
    opt = opt_cls(params, **kwargs)
    for k in range(steps):
        _quadratic_grads(params, k)
        opt.step()
    return [p.data for p in params]


def _sgd_formula(kwargs, steps=6):
    lr, mom = kwargs.get("lr", 1e-3), kwargs.get("momentum", 0)
    damp, wd = kwargs.get("dampening", 0), kwargs.get("weight_decay", 0)
    nesterov = kwargs.get("nesterov", False)
    rng = _rng(7)
    params = [Tensor(rng.normal(size=(3, 2)), requires_grad=True),
              Tensor(rng.normal(size=4), requires_grad=True)]
    bufs = [None, None]
    for k in range(steps):
        _quadratic_grads(params, k)
        for i, p in enumerate(params):
            d = p.grad + wd * p.data
            if mom:
                bufs[i] = d.copy() if bufs[i] is None else mom * bufs[i] + (1 - damp) * d
                d = d + mom * bufs[i] if nesterov else bufs[i]
            p.data = p.data - lr * d
    return [p.data for p in params]


def _adam_formula(kwargs, steps=6):
    lr, (b1, b2) = kwargs.get("lr", 1e-3), kwargs.get("betas", (0.9, 0.999))
    eps, wd, ams = kwargs.get("eps", 1e-8), kwargs.get("weight_decay", 0), \
        kwargs.get("amsgrad", False)
    rng = _rng(7)
    params = [Tensor(rng.normal(size=(3, 2)), requires_grad=True),
              Tensor(rng.normal(size=4), requires_grad=True)]
    m = [np.zeros(p.shape) for p in params]
    v = [np.zeros(p.shape) for p in params]
    vmax = [np.zeros(p.shape) for p in params]
    for t in range(1, steps + 1):
        _quadratic_grads(params, t - 1)
        for i, p in enumerate(params):
            g = p.grad + wd * p.data
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            vmax[i] = np.maximum(vmax[i], v[i])
            vhat = (vmax[i] if ams else v[i]) / (1 - b2 ** t)
            p.data = p.data - lr * (m[i] / (1 - b1 ** t)) / (np.sqrt(vhat) + eps)
    return [p.data for p in params]


SGD_CASES = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9,
             dampening=0.3, weight_decay=0.01), dict(lr=0.02, momentum=0.8, nesterov=True,
             weight_decay=0.1)]
ADAM_CASES = [dict(), dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6),
              dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, amsgrad=True)]


@pytest.mark.parametrize("kwargs", SGD_CASES)
def test_sgd_matches_the_written_out_rule(kwargs):
    for a, b in zip(_run_ours(SGD, kwargs), _sgd_formula(kwargs)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kwargs", ADAM_CASES)
def test_adam_matches_the_written_out_rule(kwargs):
    for a, b in zip(_run_ours(Adam, kwargs), _adam_formula(kwargs)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls,kwargs", [(SGD, k) for k in SGD_CASES]
                         + [(Adam, k) for k in ADAM_CASES])
def test_optimizers_match_torch(cls, kwargs):
    torch = _torch()
    rng = _rng(7)
    init = [rng.normal(size=(3, 2)), rng.normal(size=4)]
    tparams = [torch.tensor(a, requires_grad=True) for a in init]
    topt = getattr(torch.optim, cls.__name__)(tparams, **kwargs)
    for k in range(6):
        for i, p in enumerate(tparams):
            p.grad = torch.from_numpy(np.sin(np.arange(p.numel()) + k + i).reshape(p.shape)
                                      * (1 + p.detach().numpy()))
        topt.step()
    for a, b in zip(_run_ours(cls, kwargs), tparams):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_optimizer_errors_and_zero_grad():
    p = Tensor(np.ones(2), requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        SGD([p], lr=-1)
    with pytest.raises(ValueError, match="params"):
        Adam([])
    with pytest.raises(TypeError, match="params"):
        SGD([np.ones(2)])
    with pytest.raises(TypeError, match="params"):
        SGD([Tensor(np.ones(2, np.int64))])
    with pytest.raises(ValueError, match="leaf"):
        SGD([p * 2])
    with pytest.raises(ValueError, match="more than once"):
        SGD([p, p])
    with pytest.raises(ValueError, match="betas"):
        Adam([p], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="nesterov"):
        SGD([p], nesterov=True)
    p.grad = np.ones(2)
    opt = SGD([p], lr=0.5)
    opt.step()
    np.testing.assert_array_equal(p.data, [0.5, 0.5])
    opt.zero_grad(set_to_none=False)
    np.testing.assert_array_equal(p.grad, [0, 0])
    opt.zero_grad()
    assert p.grad is None
    opt.step()                                   # no grad: parameter unchanged
    np.testing.assert_array_equal(p.data, [0.5, 0.5])


def test_training_reduces_the_loss():
    rng = _rng(8)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    net = nn.Sequential(nn.Linear(5, 16, rng=0), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.Linear(16, 2, rng=1))
    opt = SGD(net.parameters(), lr=0.2, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.CrossEntropyLoss()(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# ----------------------------------------------------- weight and cosine normalization

def test_weight_norm_reparameterization_and_gradients():
    rng = _rng(9)
    lin = nn.weight_norm(nn.Linear(4, 3, dtype=np.float64, rng=0))
    assert list(lin.state_dict()) == ["bias", "weight_g", "weight_v"]
    assert lin.weight_g.shape == (3, 1) and lin.weight_v.shape == (3, 4)
    w0 = lin.weight_v.data.copy()
    np.testing.assert_allclose(lin.weight.data, w0, rtol=1e-14)      # starts equal to w
    lin.weight_g.data[:] = rng.uniform(0.5, 2, (3, 1))
    x = rng.normal(size=(5, 4))
    v = lin.weight_v.data
    want = x @ (lin.weight_g.data * v / np.linalg.norm(v, axis=1, keepdims=True)).T \
        + lin.bias.data
    np.testing.assert_allclose(lin(x).data, want, rtol=1e-13)

    def f(g, v, xin):            # the module's own forward (its pre-hook builds w)
        lin._parameters["weight_g"], lin._parameters["weight_v"] = g, v
        return lin(xin)
    params = dict(lin._parameters)
    check_grads(f, lin.weight_g.data, lin.weight_v.data, x)
    lin._parameters.update(params)
    # the module's own path: gradients reach g and v (not a stale weight)
    lin.zero_grad()
    xt = Tensor(x)
    (lin(xt) * rng.normal(size=(5, 3))).sum().backward()
    assert lin.weight_g.grad.shape == (3, 1) and lin.weight_v.grad.shape == (3, 4)
    # direction gradient is orthogonal to v (scale invariance of v / ||v||)
    np.testing.assert_allclose((lin.weight_v.grad * lin.weight_v.data).sum(1), 0, atol=1e-12)
    nn.remove_weight_norm(lin)
    assert list(lin.state_dict()) == ["bias", "weight"]
    np.testing.assert_allclose(lin(x).data, want, rtol=1e-13)


def test_weight_norm_dim_none_gradients_and_errors():
    rng = _rng(10)
    lin = nn.weight_norm(nn.Linear(3, 2, dtype=np.float64, rng=0), dim=None)
    assert lin.weight_g.shape == ()
    np.testing.assert_allclose(lin.weight_g.data, np.linalg.norm(lin.weight_v.data))

    def f(g, v, xin):
        lin._parameters["weight_g"], lin._parameters["weight_v"] = g, v
        return lin(xin)
    check_grads(f, rng.uniform(0.5, 2.0, ()), rng.normal(size=(2, 3)), rng.normal(size=(4, 3)))
    with pytest.raises(ValueError, match="dim"):
        nn.weight_norm(nn.Linear(2, 2), dim=2)
    with pytest.raises(ValueError, match="parameter"):
        nn.weight_norm(nn.ReLU())


def test_weight_norm_matches_torch():
    torch = _torch()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tlin = torch.nn.utils.weight_norm(torch.nn.Linear(4, 3).double())
    lin = nn.weight_norm(nn.Linear(4, 3, dtype=np.float64))
    lin.load_state_dict({k: v.detach().numpy() for k, v in tlin.state_dict().items()})
    x = _rng().normal(size=(5, 4))
    y = lin(Tensor(x))
    ty = tlin(torch.from_numpy(x))
    np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-13)
    y.sum().backward()
    ty.sum().backward()
    np.testing.assert_allclose(lin.weight_g.grad, tlin.weight_g.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(lin.weight_v.grad, tlin.weight_v.grad.numpy(), rtol=1e-10,
                               atol=1e-14)


def test_cosine_linear_values_and_gradients():
    rng = _rng(11)
    layer = nn.CosineLinear(4, 3, dtype=np.float64, rng=0)
    x = rng.normal(size=(5, 4))
    w = layer.weight.data
    cos = (x @ w.T) / np.linalg.norm(x, axis=1, keepdims=True) / np.linalg.norm(w, axis=1)
    np.testing.assert_allclose(layer(x).data, cos, rtol=1e-7)       # eps=1e-8 under sqrt
    np.testing.assert_allclose(layer(x * 1000.0).data, layer(x).data, rtol=1e-7)
    assert np.all(np.abs(layer(x).data) <= 1)

    def f(xin, win):
        layer._parameters["weight"] = win
        return layer(xin)
    check_grads(f, x, w)


# --------------------------------------------------------------------------- BN folding

def _eval_bn(cls, C, rng, **kw):
    bn = cls(C, **kw)
    for _ in range(2):                           # real running statistics
        shape = (16, C) if cls is nn.BatchNorm1d else (4, C, 5, 5)
        bn(rng.normal(1.5, 2.0, shape).astype(np.float32))
    bn.weight.data[:] = rng.uniform(0.5, 2.0, C)
    bn.bias.data[:] = rng.normal(size=C)
    return bn.eval()


def test_fold_into_linear():
    rng = _rng(12)
    lin, bn = nn.Linear(6, 4, rng=0), _eval_bn(nn.BatchNorm1d, 4, rng)
    fused = nn.fuse_linear_bn(lin, bn)
    x = rng.normal(size=(9, 6)).astype(np.float32)
    np.testing.assert_allclose(fused(x).data, bn(lin(x)).data, rtol=0, atol=1e-5)
    lin_nb = nn.Linear(6, 4, bias=False, rng=1)
    np.testing.assert_allclose(nn.fuse_linear_bn(lin_nb, bn)(x).data, bn(lin_nb(x)).data,
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="eval"):
        nn.fold_batch_norm(lin.weight, lin.bias, bn.train())
    with pytest.raises(ValueError, match="running"):
        nn.fold_batch_norm(lin.weight, lin.bias,
                           nn.BatchNorm1d(4, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="output channels"):
        nn.fold_batch_norm(np.ones((3, 6)), None, bn.eval())


def _conv2d(x, w, b):
    """Plain NCHW cross-correlation, stride 1, no padding (the test's own oracle)."""
    kh, kw = w.shape[2:]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


def test_fold_into_conv_weights():
    rng = _rng(13)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    bn = _eval_bn(nn.BatchNorm2d, 5, rng)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    w2, b2 = nn.fold_batch_norm(w, b, bn)
    assert w2.shape == w.shape and w2.dtype == np.float32
    np.testing.assert_allclose(_conv2d(x, w2, b2), bn(_conv2d(x, w, b)).data, rtol=0,
                               atol=1e-5)
