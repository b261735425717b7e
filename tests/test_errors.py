"""Bad input: a clear ValueError/TypeError naming the argument, never a crash."""
import numpy as np
import pytest

import fastnorm as fn

from conftest import BACKENDS

X = np.random.default_rng(0).standard_normal((4, 6, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,exc,match", [
    # wrong rank
    (lambda b: fn.batch_norm(np.ones(5), None, None, training=True, backend=b), ValueError,
     "input must have at least 2 dimensions"),
    (lambda b: fn.group_norm(np.ones(5), 1, backend=b), ValueError, "at least 2"),
    (lambda b: fn.layer_norm(X, (6, 6), backend=b), ValueError, "normalized_shape"),
    (lambda b: fn.rms_norm(X, 4, backend=b), ValueError, "normalized_shape"),
    # mismatched weight / bias / running statistics
    (lambda b: fn.batch_norm(X, None, None, np.ones(5), training=True, backend=b), ValueError,
     r"weight must have shape \(6,\)"),
    (lambda b: fn.batch_norm(X, None, None, None, np.ones(7), training=True, backend=b),
     ValueError, "bias must have shape"),
    (lambda b: fn.batch_norm(X, np.zeros(5), np.ones(6), training=True, backend=b),
     ValueError, "running_mean must have shape"),
    (lambda b: fn.batch_norm(X, np.zeros(6), None, training=True, backend=b), ValueError,
     "given together"),
    (lambda b: fn.batch_norm(X, [0.0] * 6, [1.0] * 6, training=True, backend=b), TypeError,
     "running_mean must be a numpy.ndarray"),
    (lambda b: fn.layer_norm(X, 5, np.ones(6), backend=b), ValueError, "weight must have shape"),
    (lambda b: fn.instance_norm(X, np.zeros(3), np.ones(3), backend=b), ValueError,
     "running_mean"),
    (lambda b: fn.group_norm(X, 3, np.ones(4), backend=b), ValueError, "weight"),
    # groups
    (lambda b: fn.group_norm(X, 4, backend=b), ValueError, "divisible by num_groups"),
    (lambda b: fn.group_norm(X, 0, backend=b), ValueError, "num_groups"),
    # eps
    (lambda b: fn.layer_norm(X, 5, eps=0.0, backend=b), ValueError, "eps"),
    (lambda b: fn.batch_norm(X, None, None, training=True, eps=-1e-5, backend=b), ValueError,
     "eps"),
    (lambda b: fn.group_norm(X, 2, eps=float("nan"), backend=b), ValueError, "eps"),
    # dtypes
    (lambda b: fn.layer_norm(np.ones((2, 3), np.int64), 3, backend=b), TypeError,
     "input must be float16, float32 or float64"),
    (lambda b: fn.batch_norm(np.ones((2, 3), np.complex128), None, None, training=True,
                             backend=b), TypeError, "input must be float"),
    (lambda b: fn.layer_norm(X, 5, np.ones(5, np.int32), backend=b), TypeError, "weight"),
    (lambda b: fn.layer_norm("abc", 3, backend=b), TypeError, "input"),
    # out
    (lambda b: fn.layer_norm(X, 5, out=np.empty((4, 6)), backend=b), ValueError, "out must"),
    (lambda b: fn.layer_norm(X, 5, out=np.empty(X.shape, np.float32), backend=b), ValueError,
     "out must"),
    (lambda b: fn.layer_norm(X, 5, out=X[::-1], backend=b), ValueError, "overlaps"),
    # batch of one value per channel in training: torch's message
    (lambda b: fn.batch_norm(np.ones((1, 3)), None, None, training=True, backend=b),
     ValueError, r"Expected more than 1 value per channel when training, got input size"),
    (lambda b: fn.batch_norm(np.ones((1, 3, 1, 1)), None, None, training=True, backend=b),
     ValueError, "Expected more than 1 value per channel"),
    (lambda b: fn.instance_norm(np.ones((2, 3, 1)), backend=b), ValueError,
     "Expected more than 1 spatial element"),
    # eval mode needs running statistics
    (lambda b: fn.batch_norm(X, None, None, training=False, backend=b), ValueError,
     "running_mean and running_var are required"),
    # axis
    (lambda b: fn.batch_norm(X, None, None, training=True, axis=3, backend=b), ValueError,
     "axis"),
    (lambda b: fn.group_norm(X, 2, axis=0, backend=b), ValueError, "axis"),
    # backward argument shapes
    (lambda b: fn.batch_norm_backward(X, X, np.zeros(5), np.ones(6), backend=b), ValueError,
     "mean must have shape"),
    (lambda b: fn.batch_norm_backward(X[:2], X, np.zeros(6), np.ones(6), backend=b),
     ValueError, "grad_out must have the input's shape"),
    (lambda b: fn.layer_norm_backward(X, X, np.zeros((4, 6)), np.ones(4), backend=b),
     ValueError, r"mean must have shape \(4,\)"),
    (lambda b: fn.layer_norm_backward(X, X, np.zeros((4, 6)), np.ones((4, 5)), backend=b),
     ValueError, r"rstd must have shape \(4, 6\)"),
])
def test_bad_input(call, exc, match, backend):
    with pytest.raises(exc, match=match):
        call(backend)


def test_read_only_running_stats_rejected_in_training():
    rm, rv = np.zeros(6), np.ones(6)
    rm.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean is read-only"):
        fn.batch_norm(X, rm, rv, training=True)
    # but eval mode only reads them
    fn.batch_norm(X, rm, rv, training=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_inputs_and_weights_work(backend):
    x = X.astype(np.float32)
    w = np.ones(5, np.float32)
    x.flags.writeable = False
    w.flags.writeable = False
    y = fn.layer_norm(x, 5, w, w, backend=backend)
    assert y.flags.writeable and np.isfinite(y).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_byte_swapped_input(backend):
    x = X.astype(">f8")
    np.testing.assert_allclose(fn.layer_norm(x, 5, backend=backend),
                               fn.layer_norm(X, 5, backend=backend), atol=0)
