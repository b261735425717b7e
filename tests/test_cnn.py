"""Convolutional networks on the tape: conv2d, pooling, dropout, indexing, cat, max, GELU,
SiLU; their layers; Module and optimizer behaviour; one CNN trained in torch and here.

Oracles: central differences in float64 on a random direction (``check_grads``) for every
backward, written-out formulas where torch has no deterministic twin (dropout), and torch
(behind importorskip) for forward values and gradients in float32 and float64.
"""
import doctest

import numpy as np
import pytest

import fastnorm
from fastnorm import autograd as ag
from fastnorm import nn
from fastnorm.autograd import Tensor, no_grad
from fastnorm.optim import SGD, Adam

from conftest import assert_close, hostile
from test_autograd import check_grads


def _rng(seed=0):
    return np.random.default_rng(seed)


def _torch():
    return pytest.importorskip("torch")


def _image(shape, layout="contiguous", offset=0.0, seed=0, dtype=np.float64):
    return hostile(_rng(seed), shape, dtype, offset, layout, axis=1)


# conv2d configurations: (input shape, weight shape, keyword arguments)
CONVS = {
    "plain": ((2, 3, 7, 6), (4, 3, 3, 3), dict()),
    "pad_stride": ((2, 3, 9, 8), (5, 3, 3, 2), dict(stride=(2, 1), padding=(1, 2))),
    "dilation": ((1, 2, 9, 10), (3, 2, 3, 3), dict(dilation=(2, 3), padding=2)),
    "groups": ((2, 4, 6, 5), (6, 2, 2, 3), dict(groups=2, stride=2, padding=1)),
    "depthwise": ((2, 3, 5, 5), (3, 1, 3, 3), dict(groups=3, padding="same")),
    "same_even_kernel": ((1, 2, 6, 7), (2, 2, 2, 4), dict(padding="same", dilation=(1, 2))),
    "one_by_one": ((3, 5, 4, 3), (2, 5, 1, 1), dict()),
    "valid_odd": ((1, 1, 5, 11), (2, 1, 5, 3), dict(padding="valid", stride=3)),
    "one_channel": ((2, 1, 6, 9), (3, 1, 3, 2), dict(padding=1, stride=(1, 2))),  # (K, L) copy
}

# pooling configurations: (name, our function, torch's name, positional arguments)
POOLS = {
    "max_2": ("max_pool2d", (2,)),
    "max_3s2p1": ("max_pool2d", (3, 2, 1)),
    "max_dilated_ceil": ("max_pool2d", ((3, 2), (2, 1), (1, 1), (1, 2), True)),
    "max_ceil_overhang": ("max_pool2d", (2, 2, 0, 1, True)),
    "avg_2": ("avg_pool2d", (2,)),
    "avg_3s2p1": ("avg_pool2d", (3, 2, 1)),
    "avg_3s2p1_excl": ("avg_pool2d", (3, 2, 1, False, False)),
    "avg_ceil_incl": ("avg_pool2d", ((3, 2), (2, 3), (1, 1), True, True)),
    "avg_ceil_excl": ("avg_pool2d", ((3, 2), (2, 3), (1, 1), True, False)),
    "avg_divisor": ("avg_pool2d", (2, 1, 1, False, True, 3)),
}
POOL_SHAPE = (2, 3, 7, 9)              # odd sizes: ceil mode has windows past the edge


# ----------------------------------------------------------------- central differences

@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv2d_gradients_match_central_differences(name, layout):
    xs, ws, kw = CONVS[name]
    x = _image(xs, layout, offset=3.0)
    w = _rng(1).normal(size=ws)
    b = _rng(2).normal(size=ws[0])
    check_grads(lambda x, w, b: ag.conv2d(x, w, b, **kw), x, w, b, tol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", sorted(POOLS))
def test_pool_gradients_match_central_differences(name, layout):
    fname, args = POOLS[name]
    x = _image(POOL_SHAPE, layout, offset=100.0)   # random: no ties within h
    check_grads(lambda x: getattr(ag, fname)(x, *args), x)


@pytest.mark.parametrize("size", [1, (3, 4), (None, 2), (5, None), (7, 9)])
def test_adaptive_avg_pool_gradient_matches_central_differences(size):
    check_grads(lambda x: ag.adaptive_avg_pool2d(x, size), _image(POOL_SHAPE, "strided"))


R = _rng(5)
X4 = R.normal(size=(2, 3, 4, 5))
ELEMENTWISE = {
    "gelu": (lambda a: ag.gelu(a), [3 * X4]),
    "gelu_tanh": (lambda a: ag.gelu(a, approximate="tanh"), [3 * X4]),
    "silu": (lambda a: ag.silu(a), [3 * X4]),
    "getitem_basic": (lambda a: a[1, :, 1:4:2, ::-2], [X4]),
    "getitem_ellipsis_none": (lambda a: a[..., None, 2], [X4]),
    "getitem_repeated_ints": (lambda a: a[:, [0, 2, 0], 1], [X4]),
    "getitem_two_arrays": (lambda a: a[np.array([1, 1, 0]), :, np.array([3, 3, 0])], [X4]),
    "getitem_mask": (lambda a: a[a.data > 0.3], [X4]),
    "getitem_tensor_index": (lambda a: a[Tensor(np.array([1, 0, 1]))], [X4]),
    "cat_dim1": (lambda a, b: ag.cat([a, b, a], dim=1), [X4, R.normal(size=(2, 1, 4, 5))]),
    "cat_neg_dim": (lambda a, b: ag.cat((a, b), -1), [X4, R.normal(size=(2, 3, 4, 2))]),
    "max_all": (lambda a: ag.max(a), [X4]),
    "max_dim": (lambda a: ag.max(a, 2).values, [X4]),
    "max_dim_keepdim": (lambda a: a.max(-1, keepdim=True)[0] * a, [X4]),
    "flatten": (lambda a: a.flatten(1) * np.arange(60.0), [X4]),
    "flatten_middle": (lambda a: ag.flatten(a, 1, 2), [X4]),
    "dropout": (lambda a: ag.dropout(a, 0.3, rng=np.random.default_rng(7)), [X4]),
    "cnn_block": (lambda x, w: ag.max_pool2d(ag.conv2d(x, w, padding=1).relu(), 2)
                  .flatten(1).max(1)[0], [X4, R.normal(size=(2, 3, 3, 3))]),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_op_gradient_matches_central_differences(name):
    f, arrays = ELEMENTWISE[name]
    check_grads(f, *arrays)


# ----------------------------------------------------------------------- against torch

def _vs_torch(ours, theirs, arrays, dtype, seed=0):
    """Forward and every input gradient of ours(*Tensors) and theirs(*torch tensors)."""
    torch = _torch()
    xs = [np.asarray(a, dtype) for a in arrays]
    ts = [Tensor(x.copy(), requires_grad=True) for x in xs]
    qs = [torch.tensor(x, requires_grad=True) for x in xs]
    y, ty = ours(*ts), theirs(*qs)
    assert y.dtype == dtype, f"output dtype {y.dtype}, input {dtype}"
    assert_close(y.data, ty.detach().numpy(), dtype, "forward")
    u = _rng(seed + 1).normal(size=y.shape).astype(dtype)
    y.backward(u)
    ty.backward(torch.tensor(u))
    for i, (t, q) in enumerate(zip(ts, qs)):
        assert t.grad.dtype == dtype
        assert_close(t.grad, q.grad.numpy(), dtype, f"grad of input {i}")


@pytest.mark.filterwarnings("ignore:Using padding='same'")   # torch's note on a copy
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv2d_matches_torch(name, dtype):
    F = _torch().nn.functional
    xs, ws, kw = CONVS[name]
    args = [_image(xs, offset=2.0), _rng(1).normal(size=ws), _rng(2).normal(size=ws[0])]
    _vs_torch(lambda x, w, b: ag.conv2d(x, w, b, **kw),
              lambda x, w, b: F.conv2d(x, w, b, **kw), args, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(POOLS))
def test_pool_matches_torch(name, dtype):
    F = _torch().nn.functional
    fname, args = POOLS[name]
    x = _image(POOL_SHAPE, "channels_last", offset=1e3)
    _vs_torch(lambda x: getattr(ag, fname)(x, *args),
              lambda x: getattr(F, fname)(x, *args), [x], dtype)


def test_max_pool_ties_nan_and_indices_match_torch():
    torch = _torch()
    F = torch.nn.functional
    x = np.round(_rng(3).normal(size=POOL_SHAPE))            # many ties
    x[0, 0] = 5.0                                             # a constant channel
    x[1, 2, 3, 4] = np.nan
    for args in [(2,), (3, 2, 1), ((3, 2), (2, 1), (1, 1), (1, 2), True)]:
        y, idx = ag.max_pool2d(Tensor(x, requires_grad=True), *args, return_indices=True)
        ty, tidx = F.max_pool2d(torch.tensor(x, requires_grad=True), *args,
                                return_indices=True)
        np.testing.assert_array_equal(y.data, ty.detach().numpy())
        np.testing.assert_array_equal(idx.data, tidx.numpy())
        assert idx.dtype == np.int64
        _vs_torch(lambda t: ag.max_pool2d(t, *args), lambda t: F.max_pool2d(t, *args),
                  [np.nan_to_num(x, nan=0.0)], np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, (3, 4), (None, 2), (5, None), (7, 9), (2, 13)])
def test_adaptive_avg_pool_matches_torch(size, dtype):
    F = _torch().nn.functional
    _vs_torch(lambda x: ag.adaptive_avg_pool2d(x, size),
              lambda x: F.adaptive_avg_pool2d(x, size),
              [_image(POOL_SHAPE, offset=50.0)], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_indexing_cat_max_match_torch(dtype):
    torch = _torch()
    F = torch.nn.functional
    x = 4 * _rng(4).normal(size=(3, 4, 5, 2))
    x[0, 0] = 0.0                                           # gelu/silu at 0, ties for max
    cases = [
        (lambda a: ag.gelu(a), lambda a: F.gelu(a)),
        (lambda a: ag.gelu(a, "tanh"), lambda a: F.gelu(a, approximate="tanh")),
        (lambda a: ag.silu(a), lambda a: F.silu(a)),
        (lambda a: a[1:, [2, 2, 0], ::2], lambda a: a[1:, [2, 2, 0], ::2]),
        (lambda a: a[:, 1, ..., None], lambda a: a[:, 1, ..., None]),
        (lambda a: ag.cat([a, a[:, :1] * 2], 1), lambda a: torch.cat([a, a[:, :1] * 2], 1)),
        (lambda a: ag.max(a), lambda a: torch.max(a)),
        (lambda a: ag.max(a[0]), lambda a: torch.max(a[0])),    # 40 tied zeros
        (lambda a: ag.max(a, 1).values, lambda a: torch.max(a, 1).values),
        (lambda a: ag.max(a[0], 0, True)[0], lambda a: torch.max(a[0], 0, True)[0]),
        (lambda a: ag.flatten(a, 1, 2), lambda a: torch.flatten(a, 1, 2)),
    ]
    for ours, theirs in cases:
        _vs_torch(ours, theirs, [x], dtype)
    vals, idx = ag.max(Tensor(x[0]), 0)
    tvals, tidx = torch.max(torch.tensor(x[0]), 0)
    np.testing.assert_array_equal(idx.data, tidx.numpy())   # the first maximum, as torch


def test_float32_stays_float32_through_a_cnn():
    x = Tensor(_image((2, 3, 8, 8), dtype=np.float32), requires_grad=True)
    w = Tensor(_rng(1).normal(size=(4, 3, 3, 3)).astype(np.float32), requires_grad=True)
    h = ag.conv2d(x, w, padding=1)
    for f in (ag.gelu, ag.silu, lambda t: ag.max_pool2d(t, 2), lambda t: ag.avg_pool2d(t, 2),
              lambda t: ag.adaptive_avg_pool2d(t, 1), lambda t: ag.dropout(t, 0.2)):
        h = f(h)
        assert h.dtype == np.float32, f
    h.sum().backward()
    assert x.grad.dtype == w.grad.dtype == np.float32


def test_unbatched_input_is_a_batch_of_one():
    x = _rng(6).normal(size=(3, 7, 6))
    w = _rng(7).normal(size=(2, 3, 3, 3))
    for f in (lambda t: ag.conv2d(t, w, padding=1, stride=2), lambda t: ag.max_pool2d(t, 2),
              lambda t: ag.avg_pool2d(t, 3, 1, 1), lambda t: ag.adaptive_avg_pool2d(t, 2)):
        np.testing.assert_array_equal(f(Tensor(x)).data, f(Tensor(x[None])).data[0])
    y, idx = ag.max_pool2d(Tensor(x), 2, return_indices=True)
    y4, idx4 = ag.max_pool2d(Tensor(x[None]), 2, return_indices=True)
    np.testing.assert_array_equal(idx.data, idx4.data[0])
    check_grads(lambda t: ag.conv2d(t, w, padding=1), x)


# -------------------------------------------------------------------------- dropout

def test_dropout_mask_scale_gradient_and_seeding():
    x = Tensor(_rng(8).normal(size=(200, 50)), requires_grad=True)
    y = ag.dropout(x, 0.3, rng=np.random.default_rng(1))
    keep = np.random.default_rng(1).random(x.shape) >= 0.3      # the documented mask
    np.testing.assert_allclose(y.data, np.where(keep, x.data / 0.7, 0.0), rtol=1e-15)
    assert abs((~keep).mean() - 0.3) < 0.02
    y.backward(np.ones(x.shape))
    np.testing.assert_allclose(x.grad, keep / 0.7, rtol=1e-15)
    ag.manual_seed(3)
    a = ag.dropout(x, 0.5).data
    ag.manual_seed(3)
    np.testing.assert_array_equal(a, ag.dropout(x, 0.5).data)
    assert ag.dropout(x, 0.5, training=False) is x
    assert ag.dropout(x, 0.0) is x
    np.testing.assert_array_equal(ag.dropout(x, 1.0).data, 0.0)
    d1, d2 = nn.Dropout(0.4, rng=11), nn.Dropout(0.4, rng=11)
    np.testing.assert_array_equal(d1(x).data, d2(x).data)
    assert not np.array_equal(d1(x).data, d1(x).data)           # a fresh mask per call
    np.testing.assert_array_equal(d1.eval()(x).data, x.data)


# ------------------------------------------------------------------------------ errors

def test_bad_arguments_name_the_argument():
    x = Tensor(np.ones((2, 4, 6, 6)))
    w = np.ones((3, 4, 3, 3))
    bad = [
        (ValueError, "weight", lambda: ag.conv2d(x, np.ones((3, 4, 3)))),
        (ValueError, "groups", lambda: ag.conv2d(x, w, groups=2)),
        (ValueError, "groups", lambda: ag.conv2d(x, np.ones((3, 2, 3, 3)), groups=0)),
        (ValueError, "bias", lambda: ag.conv2d(x, w, np.ones(4))),
        (ValueError, "stride", lambda: ag.conv2d(x, w, stride=0)),
        (ValueError, "padding", lambda: ag.conv2d(x, w, padding=-1)),
        (ValueError, "padding", lambda: ag.conv2d(x, w, padding="full")),
        (ValueError, "strided", lambda: ag.conv2d(x, w, stride=2, padding="same")),
        (ValueError, "dilation", lambda: ag.conv2d(x, w, dilation=(1, 0))),
        (ValueError, "smaller", lambda: ag.conv2d(x, np.ones((3, 4, 7, 3)))),
        (ValueError, "4-D", lambda: ag.conv2d(Tensor(np.ones((4, 6))), w)),
        (ValueError, "kernel_size", lambda: ag.max_pool2d(x, 0)),
        (ValueError, "padding", lambda: ag.max_pool2d(x, 2, padding=2)),
        (ValueError, "padding", lambda: ag.avg_pool2d(x, 3, padding=2)),
        (ValueError, "too small", lambda: ag.avg_pool2d(x, 7)),
        (ValueError, "divisor_override", lambda: ag.avg_pool2d(x, 2, divisor_override=0)),
        (ValueError, "output_size", lambda: ag.adaptive_avg_pool2d(x, 0)),
        (ValueError, "output_size", lambda: ag.adaptive_avg_pool2d(x, (1, 2, 3))),
        (ValueError, "probability", lambda: ag.dropout(x, 1.5)),
        (TypeError, "rng", lambda: ag.dropout(x, 0.5, rng=3)),
        (ValueError, "approximate", lambda: ag.gelu(x, "erf")),
        (ValueError, "sizes must match", lambda: ag.cat([x, Tensor(np.ones((2, 3, 6, 5)))], 1)),
        (ValueError, "dimensions", lambda: ag.cat([x, Tensor(np.ones(3))])),
        (ValueError, "empty", lambda: ag.cat([])),
        (TypeError, "sequence", lambda: ag.cat(x)),
        (ValueError, "dim", lambda: ag.cat([x, x], 4)),
        (TypeError, "dim", lambda: ag.max(x, (0, 1))),
        (ValueError, "dim", lambda: ag.max(x, 4)),
        (ValueError, "start_dim", lambda: ag.flatten(x, 2, 1)),
        (ValueError, "padding_mode", lambda: nn.Conv2d(4, 3, 3, padding_mode="reflect")),
        (ValueError, "groups", lambda: nn.Conv2d(4, 3, 3, groups=2)),
        (ValueError, "in_channels", lambda: nn.Conv2d(0, 3, 3)),
        (ValueError, "kernel_size", lambda: nn.Conv2d(4, 3, (3, 0))),
        (ValueError, "strided", lambda: nn.Conv2d(4, 3, 3, stride=2, padding="same")),
        (ValueError, "probability", lambda: nn.Dropout(-0.1)),
        (ValueError, "inplace", lambda: nn.Dropout(0.1, inplace=True)),
        (ValueError, "approximate", lambda: nn.GELU("erf")),
        (TypeError, "start_dim", lambda: nn.Flatten(1.5)),
    ]
    for exc, match, call in bad:
        with pytest.raises(exc, match=match):
            call()


# ------------------------------------------------------------------------------ layers

def test_layers_match_torch_names_reprs_keys_and_outputs():
    torch = _torch()
    tn = torch.nn
    pairs = [
        (nn.Conv2d(3, 6, 3, padding=1, rng=0), tn.Conv2d(3, 6, 3, padding=1)),
        (nn.Conv2d(4, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2, False),
         tn.Conv2d(4, 6, (3, 2), (2, 1), (1, 0), (1, 2), 2, False)),
        (nn.Conv2d(4, 4, 3, padding="same"), tn.Conv2d(4, 4, 3, padding="same")),
        (nn.MaxPool2d(2), tn.MaxPool2d(2)),
        (nn.MaxPool2d(3, 2, 1, ceil_mode=True), tn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        (nn.AvgPool2d(3, 2, 1), tn.AvgPool2d(3, 2, 1)),
        (nn.AvgPool2d(2, count_include_pad=False), tn.AvgPool2d(2, count_include_pad=False)),
        (nn.AdaptiveAvgPool2d((2, 3)), tn.AdaptiveAvgPool2d((2, 3))),
        (nn.Flatten(), tn.Flatten()),
        (nn.Flatten(0, 2), tn.Flatten(0, 2)),
        (nn.GELU(), tn.GELU()),
        (nn.GELU("tanh"), tn.GELU("tanh")),
        (nn.SiLU(), tn.SiLU()),
        (nn.Dropout(0.2).eval(), tn.Dropout(0.2).eval()),
    ]
    x = _image((2, 4, 9, 8), offset=1.0)
    for ours, theirs in pairs:
        theirs.double()
        ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
        assert list(ours.state_dict()) == list(theirs.state_dict())
        assert repr(ours) == repr(theirs)
        xin = x[:, :3] if getattr(ours, "in_channels", 4) == 3 else x
        y = ours(xin.astype(ours.weight.dtype) if hasattr(ours, "weight") else xin)
        ty = theirs(torch.tensor(xin))
        np.testing.assert_allclose(y.data, ty.detach().numpy(), rtol=1e-6, atol=1e-6,
                                   err_msg=repr(ours))


def test_conv2d_init_follows_torch():
    conv = nn.Conv2d(6, 8, (3, 2), groups=2, rng=0)
    bound = 1 / np.sqrt(3 * 3 * 2)                            # fan_in = 6/2 * 3 * 2
    assert conv.weight.shape == (8, 3, 3, 2) and conv.weight.dtype == np.float32
    for p in (conv.weight.data, conv.bias.data):
        assert np.abs(p).max() <= bound and np.abs(p).max() > 0.8 * bound
    np.testing.assert_array_equal(nn.Conv2d(6, 8, 3, rng=4).weight.data,
                                  nn.Conv2d(6, 8, 3, rng=4).weight.data)
    assert nn.Conv2d(2, 2, 1, dtype=np.float64).weight.dtype == np.float64


def test_module_list_and_dict():
    torch = _torch()
    blocks = nn.ModuleList([nn.Linear(3, 3), nn.ReLU()])
    blocks.append(nn.Linear(3, 2))
    blocks += [nn.Sigmoid()]
    blocks.insert(1, nn.Tanh())
    assert [type(m).__name__ for m in blocks] == ["Linear", "Tanh", "ReLU", "Linear",
                                                  "Sigmoid"]
    assert len(blocks) == 5 and isinstance(blocks[-2], nn.Linear)
    assert isinstance(blocks[1:3], nn.ModuleList) and len(blocks[1:3]) == 2
    tblocks = torch.nn.ModuleList([torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.ReLU(),
                                   torch.nn.Linear(3, 2), torch.nn.Sigmoid()])
    assert list(blocks.state_dict()) == list(tblocks.state_dict())
    del blocks[1]
    del tblocks[1]
    assert list(blocks.state_dict()) == list(tblocks.state_dict()) == \
        ["0.weight", "0.bias", "2.weight", "2.bias"]
    blocks[0] = nn.Linear(3, 3, bias=False)
    assert list(blocks.state_dict())[0:2] == ["0.weight", "2.weight"]
    with pytest.raises(IndexError):
        blocks[7]
    with pytest.raises(TypeError, match="Module"):
        blocks.append(np.ones(3))

    heads = nn.ModuleDict({"cls": nn.Linear(4, 3)})
    heads["box"] = nn.Linear(4, 2)
    heads.update([("act", nn.ReLU())])
    theads = torch.nn.ModuleDict({"cls": torch.nn.Linear(4, 3), "box": torch.nn.Linear(4, 2),
                                  "act": torch.nn.ReLU()})
    assert list(heads) == list(theads) and "box" in heads and len(heads) == 3
    assert list(heads.state_dict()) == list(theads.state_dict())
    assert [k for k, _ in heads.items()] == heads.keys() == ["cls", "box", "act"]
    assert isinstance(heads.pop("act"), nn.ReLU) and "act" not in heads
    with pytest.raises(ValueError, match="key"):
        heads["a.b"] = nn.ReLU()

    class Net(nn.Module):                 # containers register their modules for a parent
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
            self.heads = nn.ModuleDict({"out": nn.Linear(2, 1)})

        def forward(self, x):
            for b in self.blocks:
                x = b(x).relu()
            return self.heads["out"](x)
    net = Net()
    assert list(net.state_dict()) == ["blocks.0.weight", "blocks.0.bias", "blocks.1.weight",
                                      "blocks.1.bias", "heads.out.weight", "heads.out.bias"]
    net(np.ones((3, 2), np.float32)).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


# The convolutions before a batch norm have no bias: BN removes it, so its true gradient is
# 0 and Adam would steer it by rounding noise (sign(1e-17) / sqrt(1e-34)), which no two
# implementations share.
def _cnn(dtype=np.float64):
    """conv -> BN -> ReLU -> max pool, conv -> BN -> ReLU -> avg pool, flatten, linear."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False, dtype=dtype, rng=0),
        nn.BatchNorm2d(4, dtype=dtype), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, bias=False, dtype=dtype, rng=1),
        nn.BatchNorm2d(6, dtype=dtype), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 10, dtype=dtype, rng=2))


def _torch_cnn(torch):
    tn = torch.nn
    return tn.Sequential(tn.Conv2d(1, 4, 3, padding=1, bias=False), tn.BatchNorm2d(4),
                         tn.ReLU(), tn.MaxPool2d(2), tn.Conv2d(4, 6, 3, padding=1, bias=False),
                         tn.BatchNorm2d(6), tn.ReLU(), tn.AvgPool2d(2), tn.Flatten(),
                         tn.Linear(6 * 2 * 2, 10)).double()


def test_module_traversal_apply_requires_grad_and_dtype():
    net = _cnn()
    seen = []
    assert net.apply(lambda m: seen.append(type(m).__name__)) is net
    assert seen[0] == "Conv2d" and seen[-1] == "Sequential" and len(seen) == 11
    assert [n for n, _ in net.named_children()] == [str(i) for i in range(10)]
    assert len(net.buffers()) == 6 and net.buffers()[0] is net[1].running_mean
    assert [n for n, _ in net.named_buffers()][:3] == ["1.running_mean", "1.running_var",
                                                       "1.num_batches_tracked"]
    assert net.requires_grad_(False) is net
    assert not any(p.requires_grad for p in net.parameters())
    net[4].requires_grad_()
    assert [p.requires_grad for p in net.parameters()] == [False] * 3 + [True] + [False] * 4

    weight = net[0].weight
    weight.grad = np.ones(weight.shape)
    for conv, dt in ((net.half, np.float16), (net.float, np.float32),
                     (net.double, np.float64), (lambda: net.to("float32"), np.float32)):
        assert conv() is net
        assert all(p.dtype == dt for p in net.parameters())
        assert net[1].running_mean.dtype == net[1].running_var.dtype == dt
        assert net[1].num_batches_tracked.dtype == np.int64       # stays an integer count
        assert net[0].weight is weight and weight.grad.dtype == dt  # the same Parameter
    y = net(_image((3, 1, 8, 8), dtype=np.float32))
    assert y.dtype == np.float32 and net[1].num_batches_tracked == 1
    with pytest.raises(TypeError, match="dtype"):
        net.to(np.int32)
    with pytest.raises(TypeError, match="dtype"):
        net.to(None)


def test_module_dtype_conversion_matches_torch_state():
    torch = _torch()
    tnet = _torch_cnn(torch).half()
    net = _cnn().half()
    for (k, v), (tk, tv) in zip(net.state_dict().items(), tnet.state_dict().items()):
        assert k == tk and v.dtype == np.dtype(str(tv.dtype).replace("torch.", "")), k


# --------------------------------------------------------------- frozen parameters

@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
def test_frozen_parameters_are_skipped_as_in_torch(opt_name):
    torch = _torch()
    tnet = _torch_cnn(torch)
    net = _cnn()
    net.load_state_dict({k: v.numpy() for k, v in tnet.state_dict().items()})
    for m in (net[0], net[1]):
        m.requires_grad_(False)
    for m in (tnet[0], tnet[1]):
        m.requires_grad_(False)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01) if opt_name == "SGD" else dict(lr=0.01)
    opt = {"SGD": SGD, "Adam": Adam}[opt_name](net.parameters(), **kw)
    topt = getattr(torch.optim, opt_name)(tnet.parameters(), **kw)
    frozen = [net[0].weight.data.copy(), net[1].bias.data.copy()]
    x, y = _image((8, 1, 8, 8)), _rng(3).integers(0, 10, 8)
    for _ in range(3):
        opt.zero_grad()
        topt.zero_grad()
        nn.CrossEntropyLoss()(net(x), y).backward()
        torch.nn.functional.cross_entropy(tnet(torch.tensor(x)), torch.tensor(y)).backward()
        opt.step()
        topt.step()
    assert net[0].weight.grad is None and net[1].bias.grad is None
    np.testing.assert_array_equal(net[0].weight.data, frozen[0])
    np.testing.assert_array_equal(net[1].bias.data, frozen[1])
    tsd = tnet.state_dict()
    for k, v in net.state_dict().items():
        np.testing.assert_allclose(v, tsd[k].numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


# ------------------------------------------------------------ training equivalence

# Tolerance of the step-by-step comparison, float64. Both sides do the same float64
# arithmetic in different orders (BLAS blocking, torch's conv kernels, our BN kernels).
# Measured over the 20 steps: losses within 4.2e-16 relative, parameters and running
# statistics within 2.8e-15 absolute (SGD: 9e-16, Adam: 2.8e-15). The bounds leave 30x for
# other BLAS builds. Tried: the average pool's input gradient 1% too large moved SGD's
# parameters by 1e-2 and Adam's (nearly scale-invariant) by 7e-9, both far outside.
EQUIV_RTOL, EQUIV_ATOL = 1e-12, 1e-13


@pytest.mark.parametrize("opt_name,kwargs", [
    ("SGD", dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("Adam", dict(lr=2e-2)),
])
def test_small_cnn_trains_like_torch_step_by_step(opt_name, kwargs):
    torch = _torch()
    torch.manual_seed(0)
    tnet = _torch_cnn(torch)
    net = _cnn()
    net.load_state_dict({k: v.numpy() for k, v in tnet.state_dict().items()})
    opt = {"SGD": SGD, "Adam": Adam}[opt_name](net.parameters(), **kwargs)
    topt = getattr(torch.optim, opt_name)(tnet.parameters(), **kwargs)
    rng = _rng(11)
    protos = rng.normal(0.5, 1.0, (10, 1, 8, 8))               # a learnable toy task
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for step in range(20):
        y = rng.integers(0, 10, 16)
        x = protos[y] + 0.5 * rng.normal(size=(16, 1, 8, 8))   # one batch, fed to both
        opt.zero_grad()
        topt.zero_grad()
        loss = loss_fn(net(x), y)
        tloss = torch.nn.functional.cross_entropy(tnet(torch.tensor(x)), torch.tensor(y))
        loss.backward()
        tloss.backward()
        opt.step()
        topt.step()
        np.testing.assert_allclose(loss.item(), tloss.item(), rtol=EQUIV_RTOL,
                                   err_msg=f"loss at step {step}")
        losses.append(loss.item())
        tsd = tnet.state_dict()
        for k, v in net.state_dict().items():
            np.testing.assert_allclose(v, tsd[k].numpy(), rtol=EQUIV_RTOL, atol=EQUIV_ATOL,
                                       err_msg=f"{k} after step {step}")
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])     # it trained
    net.eval()
    tnet.eval()
    x = rng.normal(0.5, 1.0, (5, 1, 8, 8))
    with no_grad():
        np.testing.assert_allclose(net(x).data, tnet(torch.tensor(x)).detach().numpy(),
                                   rtol=EQUIV_RTOL, atol=EQUIV_ATOL)


# -------------------------------------------------------------------------- docstrings

def test_docstring_examples_run():
    for mod in (fastnorm.autograd, fastnorm.nn, fastnorm.optim):
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, (mod.__name__, result)
