"""The CUDA backend under the numba-CUDA simulator: run by tests/test_cuda.py in a subprocess.

``NUMBA_ENABLE_CUDASIM=1`` must be set before numba.cuda is first imported, so these tests
live outside the main pytest process (the file name keeps pytest from collecting it there).
Run alone with: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim_check.py``; on a
machine with an NVIDIA GPU, ``FASTNORM_CUDA_DEVICE=1`` runs the same tests on the device.
The simulator runs each thread as a Python thread (~0.05 s per 8-thread block): shapes are
tiny, but chosen so every path is taken: rows longer than one simulated warp (cross-warp
merge), several rows per block (grid-stride), ragged chunks in the two-stage channel sums.
"""
import os

import numpy as np
import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
if not SIMULATOR and os.environ.get("FASTNORM_CUDA_DEVICE") != "1":  # pragma: no cover
    pytest.skip("run with NUMBA_ENABLE_CUDASIM=1, or FASTNORM_CUDA_DEVICE=1 on a GPU "
                "(tests/test_cuda.py does)", allow_module_level=True)

from numba import cuda  # noqa: E402

import fastnorm as fn  # noqa: E402
from fastnorm import _cuda, _dispatch, reference as ref  # noqa: E402
from conftest import assert_close  # noqa: E402
from kernel_cases import check_entry  # noqa: E402

DTYPES = (np.float32, np.float64)
rng = np.random.default_rng(1234)


def _host(a):
    assert isinstance(a, _cuda._DevArray), f"expected a device array, got {type(a).__name__}"
    return a.copy_to_host()


def _data(shape, dtype, offset=1e3):
    return (offset + rng.standard_normal(shape)).astype(dtype)


def _dev_like(x, memory):
    """x on the device laid out as ``memory``: contiguous, channels_last or strided."""
    if memory == "contiguous":
        return cuda.to_device(np.ascontiguousarray(x))
    if memory == "channels_last":  # logical shape kept, channel axis 1 innermost in memory
        d = cuda.to_device(np.ascontiguousarray(np.moveaxis(x, 1, -1)))
        perm = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))
        return _cuda._permute(d, perm)
    if memory == "strided":        # every other element of a wider array: fits no view
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., ::2] = x
        return cuda.to_device(big)[..., ::2]
    raise ValueError(memory)


@pytest.fixture(autouse=True)
def _cuda_backend(request):
    """Simulator arrays lack __cuda_array_interface__, so select the backend explicitly
    (except in the test of routing by that interface)."""
    if "routes" in request.node.name:
        yield
        return
    with fn.use_backend("cuda"):
        yield


# ------------------------------------------------------------------- kernel twins

def _kernel_cases(dtype):
    R, M = 3, 37              # M > 16: 8 threads, 2 simulated warps; 3 rows on 2 blocks
    P, Q, C = 2, 7, 3         # Q = 7 in 3 ragged chunks
    x, dy = _data((R, M), dtype), _data((R, M), dtype, 0.0)
    xc, dyc = _data((P, Q, C), dtype), _data((P, Q, C), dtype, 0.0)
    w, b = _data(M, dtype, 1.0), _data(M, dtype, 0.0)
    mean, r = x.astype(np.float64).mean(1), rng.uniform(0.5, 2, R)
    meanc, pc = xc.astype(np.float64).mean(1), [rng.standard_normal((P, C)) for _ in range(3)]
    pr = [rng.standard_normal(R) for _ in range(3)]
    T, F = dtype, np.float64
    for wb in ((w, b), (None, b), (w, None), (None, None)):
        for rms in (False, True):
            yield "rows_fwd", (x, *wb, 1e-5, rms), ((R, M), T, (R,), T, (R,), T)
    for wt, parts in ((w, "both"), (None, "db"), (w, "dw"), (None, "none")):
        shapes = ((R, M), T)
        shapes += ((2, M), F) if parts in ("both", "dw") else (None, None)
        shapes += ((2, M), F) if parts in ("both", "db") else (None, None)
        for rms in (False, True):
            yield "rows_bwd", (dy, x, mean.astype(T), r.astype(T), wt, rms), shapes
    xg = _data((4, 2, 5), dtype)  # (R, K, S): 4 rows of 2 segments, weights (G=2, K=2)
    wg, bg = _data((2, 2), dtype, 1.0), _data((2, 2), dtype, 0.0)
    for wb in ((wg, bg), (None, bg), (wg, None), (None, None)):
        yield "rows_fwd_grouped", (xg, *wb, 1e-5), ((4, 2, 5), T, (4,), T, (4,), T)
    yield "rows_moments", (x,), ((R,), F, (R,), F)
    yield "rows_scale_shift", (x, mean, *pr[1:]), ((R, M), T)
    yield "rows_dot", (dy, x, mean), ((R,), F, (R,), F)
    yield "rows_bwd_apply", (dy, x, mean, *pr), ((R, M), T)
    dyg = _data((4, 2, 5), dtype, 0.0)  # the backward of rows_fwd_grouped on xg
    mg = xg.astype(np.float64).mean(axis=(1, 2))
    rg = 1.0 / np.sqrt(xg.astype(np.float64).var(axis=(1, 2)) + 1e-5)
    for wt in (rng.standard_normal((2, 2)), None):
        yield "rows_bwd_grouped", (dyg, xg, mg, rg, wt), ((4, 2, 5), T, (4, 2), F, (4, 2), F)
    yield "channels_moments", (xc,), ((P, C), F, (P, C), F)
    yield "channels_scale_shift", (xc, meanc, *pc[1:]), ((P, Q, C), T)
    yield "channels_dot", (dyc, xc, meanc), ((P, C), F, (P, C), F)
    yield "channels_bwd_apply", (dyc, xc, meanc, *pc), ((P, Q, C), T)
    xq = _data((2, 7, 6), dtype)  # (P, Q, C): 3 groups of 2 channels, and instance norm
    wq, bq = _data(6, dtype, 1.0), _data(6, dtype, 0.0)
    for G, wb in ((3, (wq, bq)), (3, (None, bq)), (6, (wq, None)), (1, (None, None))):
        yield "channels_fwd_grouped", (xq, *wb, 1e-5), ((2, 7, 6), T, (2, G), T, (2, G), T)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_kernels_match_reference_twins(dtype):
    """Every KERNELS entry on device arrays against its float64 twin in fastnorm.reference."""
    seen = set()
    for name, inputs, out_spec in _kernel_cases(dtype):
        seen.add(name)
        outs = [None if s is None else np.zeros(s, t)
                for s, t in zip(out_spec[::2], out_spec[1::2])]
        getattr(ref, name)(*inputs, *outs)
        dins = [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in inputs]
        douts = [None if o is None else cuda.to_device(np.full_like(o, np.nan)) for o in outs]
        _cuda.KERNELS[name][0](*dins, *douts)
        for i, (o, d) in enumerate(zip(outs, douts)):
            if o is not None:
                assert_close(d.copy_to_host(), o, dtype, f"{name} output {i} {np.dtype(dtype)}")
    assert seen == set(ref.KERNELS) == set(_cuda.KERNELS)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ref.KERNELS + ref.PHASES + tuple(_dispatch.FUSED))
def test_table_entry_matches_its_twin(name, dtype):
    """The table-wide cases of tests/kernel_cases.py (as tests/test_kernels.py runs them on
    the CPU backends) on the cuda backend's entries: data, phase and fused kernels."""
    _dispatch.resolve("cuda")
    fns = _dispatch.entry(name, "cuda")[:1]          # one entry: the GPU has no thread count
    n = check_entry(name, fns, _dispatch.twin(name), dtype, "tiny", variants=("offset",),
                    to_device=cuda.to_device, to_host=lambda d: d.copy_to_host(),
                    same_bits=False)
    assert n >= 1


def test_deterministic_and_constant_channel_exact():
    """Same input -> bitwise the same output; a constant channel gives exactly beta."""
    x = _data((2, 5, 3), np.float32)
    x[:, :, 1] = np.float32(1e4 + 0.1)
    bias = np.array([0.5, -2.0, 3.0], np.float32)
    d = cuda.to_device(x)
    y1 = _host(fn.batch_norm(d, None, None, None, bias, True, axis=-1))
    y2 = _host(fn.batch_norm(d, None, None, None, bias, True, axis=-1))
    assert np.array_equal(y1, y2)
    assert np.all(y1[:, :, 1] == np.float32(-2.0))


# --------------------------------------------------------- public functions vs oracles

def _wb(C, dtype=np.float64):
    return _data(C, dtype, 1.0), _data(C, dtype, 0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("axis,memory", [(1, "contiguous"), (-1, "contiguous"),
                                         (1, "channels_last"), (1, "strided")])
def test_batch_norm(axis, memory, dtype):
    x = _data((3, 2, 2, 3), dtype)                 # N=3, C on axis 1 (2) or -1 (3)
    C = x.shape[axis]
    w, b = _wb(C, dtype)
    dy = _data(x.shape, dtype, 0.0)
    what = f"batch_norm axis={axis} {memory} {np.dtype(dtype)}"
    rm_h, rv_h = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    rm, rv = cuda.to_device(rm_h), cuda.to_device(rv_h)
    erm, erv = rm_h.copy(), rv_h.copy()
    xd = _dev_like(x, memory)
    y, mean, rstd = fn.batch_norm(xd, rm, rv, cuda.to_device(w), b, True, 0.3, 1e-4, axis=axis,
                                  return_stats=True, backend="cuda")
    ey, emean, erstd = ref.batch_norm(x, erm, erv, w, b, True, 0.3, 1e-4, axis=axis)
    assert_close(_host(y), ey, dtype, what + " y")
    assert_close(_host(mean), emean, dtype, what + " mean")
    assert_close(_host(rstd), erstd, dtype, what + " rstd")
    assert_close(rm.copy_to_host(), erm, np.float64, what + " running_mean")
    assert_close(rv.copy_to_host(), erv, np.float64, what + " running_var")
    gx, gw, gb = fn.batch_norm_backward(_dev_like(dy, memory), xd, mean, rstd, w, axis=axis,
                                        backend="cuda")
    # the reference gets the same (dtype-rounded) statistics the kernels were given
    egx, egw, egb = ref.batch_norm_backward(dy, x, _host(mean), _host(rstd), w, axis=axis)
    for a, e, n in ((gx, egx, "grad_x"), (gw, egw, "grad_weight"), (gb, egb, "grad_bias")):
        assert_close(_host(a), e, dtype, f"{what} {n}")
    # eval mode: running statistics normalize and are constants in the backward
    y, mean, rstd = fn.batch_norm(xd, rm, rv, w, None, False, axis=axis, return_stats=True,
                                  backend="cuda")
    ey, emean, erstd = ref.batch_norm(x, erm, erv, w, None, False, axis=axis)
    assert_close(_host(y), ey, dtype, what + " eval y")
    gx, gw, gb = fn.batch_norm_backward(dy, x, mean.copy_to_host(), rstd.copy_to_host(), None,
                                        False, axis=axis, has_bias=False, backend="cuda")
    egx, _, _ = ref.batch_norm_backward(dy, x, _host(mean), _host(rstd), None, False, axis=axis)
    assert isinstance(gx, np.ndarray) and gw is None and gb is None   # host in -> host out
    assert_close(gx, egx, dtype, what + " eval grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("axis,memory", [(1, "contiguous"), (-1, "contiguous"),
                                         (1, "channels_last")])
def test_instance_norm(axis, memory, dtype):
    x = _data((2, 3, 5), dtype) if axis == 1 else _data((2, 5, 3), dtype)
    C = 3
    w, b = _wb(C, dtype)
    dy = _data(x.shape, dtype, 0.0)
    what = f"instance_norm axis={axis} {memory} {np.dtype(dtype)}"
    rm_h, rv_h = np.zeros(C), np.ones(C)
    erm, erv = rm_h.copy(), rv_h.copy()
    nbt, enbt = np.array(2, np.int64), np.array(2, np.int64)
    xd = _dev_like(x, memory)
    y, mean, rstd = fn.instance_norm(xd, rm_h, rv_h, w, b, True, None, axis=axis,
                                     return_stats=True, num_batches_tracked=nbt)
    ey, emean, erstd = ref.instance_norm(x, erm, erv, w, b, True, None, axis=axis,
                                         num_batches_tracked=enbt)
    assert_close(_host(y), ey, dtype, what + " y")
    assert_close(_host(mean), emean, dtype, what + " mean")
    assert_close(_host(rstd), erstd, dtype, what + " rstd")
    assert nbt == enbt == 3
    assert_close(rm_h, erm, np.float64, what + " running_mean (host, in place)")
    assert_close(rv_h, erv, np.float64, what + " running_var (host, in place)")
    gx, gw, gb = fn.instance_norm_backward(cuda.to_device(dy), xd, mean, rstd,
                                           cuda.to_device(w), axis=axis)
    egx, egw, egb = ref.instance_norm_backward(dy, x, _host(mean), _host(rstd), w, axis=axis)
    for a, e, n in ((gx, egx, "grad_x"), (gw, egw, "grad_weight"), (gb, egb, "grad_bias")):
        assert_close(_host(a), e, dtype, f"{what} {n}")
    y, mean, rstd = fn.instance_norm(xd, cuda.to_device(rm_h), cuda.to_device(rv_h), None, b,
                                     False, axis=axis, return_stats=True)
    ey, emean, erstd = ref.instance_norm(x, rm_h, rv_h, None, b, False, axis=axis)
    assert_close(_host(y), ey, dtype, what + " eval y")
    assert _host(mean).shape == (2, C)
    gx, _, _ = fn.instance_norm_backward(cuda.to_device(dy), xd, mean, rstd, None, False,
                                         axis=axis)
    egx, _, _ = ref.instance_norm_backward(dy, x, _host(mean)[0], _host(rstd)[0], None,
                                           False, axis=axis)
    assert_close(_host(gx), egx, dtype, what + " eval grad_x")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("axis", [1, -1])
def test_group_norm(axis, dtype):
    x = _data((2, 4, 3), dtype) if axis == 1 else _data((2, 3, 4), dtype)
    w, b = _wb(4, dtype)
    dy = _data(x.shape, dtype, 0.0)
    what = f"group_norm axis={axis} {np.dtype(dtype)}"
    xd = cuda.to_device(x)
    y, mean, rstd = fn.group_norm(xd, 2, w, b, axis=axis, return_stats=True)
    ey, emean, erstd = ref.group_norm(x, 2, w, b, axis=axis)
    assert_close(_host(y), ey, dtype, what + " y")
    assert_close(_host(mean), emean, dtype, what + " mean")
    assert_close(_host(rstd), erstd, dtype, what + " rstd")
    gx, gw, gb = fn.group_norm_backward(cuda.to_device(dy), xd, mean, rstd, w, num_groups=2,
                                        axis=axis)
    egx, egw, egb = ref.group_norm_backward(dy, x, _host(mean), _host(rstd), w, 2, axis=axis)
    for a, e, n in ((gx, egx, "grad_x"), (gw, egw, "grad_weight"), (gb, egb, "grad_bias")):
        assert_close(_host(a), e, dtype, f"{what} {n}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_layer_and_rms_norm(dtype):
    x = _data((3, 2, 10), dtype)                   # rows of 20: two simulated warps
    w, b = _data((2, 10), dtype, 1.0), _data((2, 10), dtype, 0.0)
    dy = _data(x.shape, dtype, 0.0)
    what = f"layer_norm {np.dtype(dtype)}"
    xd, dyd = cuda.to_device(x), cuda.to_device(dy)
    y, mean, rstd = fn.layer_norm(xd, (2, 10), w, cuda.to_device(b), return_stats=True)
    ey, emean, erstd = ref.layer_norm(x, (2, 10), w, b)
    assert_close(_host(y), ey, dtype, what + " y")
    assert_close(_host(mean), emean, dtype, what + " mean")
    assert_close(_host(rstd), erstd, dtype, what + " rstd")
    gx, gw, gb = fn.layer_norm_backward(dyd, xd, mean, rstd, w)
    egx, egw, egb = ref.layer_norm_backward(dy, x, _host(mean), _host(rstd), w)
    for a, e, n in ((gx, egx, "grad_x"), (gw, egw, "grad_weight"), (gb, egb, "grad_bias")):
        assert_close(_host(a), e, dtype, f"{what} {n}")
    xr = _data((3, 20), dtype, 0.5)
    y, rstd = fn.rms_norm(cuda.to_device(xr), 20, w.reshape(20), return_stats=True)
    ey, erstd = ref.rms_norm(xr, (20,), w.reshape(20))
    assert_close(_host(y), ey, dtype, "rms_norm y")
    assert_close(_host(rstd), erstd, dtype, "rms_norm rstd")
    gx, gw = fn.rms_norm_backward(cuda.to_device(dy.reshape(3, 20)), cuda.to_device(xr), rstd,
                                  w.reshape(20))
    egx, egw = ref.rms_norm_backward(dy.reshape(3, 20), xr, _host(rstd), w.reshape(20))
    assert_close(_host(gx), egx, dtype, "rms_norm grad_x")
    assert_close(_host(gw), egw, dtype, "rms_norm grad_weight")


# ------------------------------------------------------------------ routing and edges

class _Interface(_cuda._DevArray):
    """A simulator device array that also shows ``__cuda_array_interface__``, as CuPy's do
    (the simulator's own arrays don't, so api.py routes them only with backend="cuda")."""
    __cuda_array_interface__ = {"version": 3}


def test_cuda_array_interface_routes_without_backend_argument():
    x = _data((2, 24), np.float64)
    d = _Interface(x.copy()) if SIMULATOR else cuda.to_device(x)
    y = fn.layer_norm(d, 24)
    assert isinstance(y, _cuda._DevArray)
    assert_close(y.copy_to_host(), ref.layer_norm(x, (24,))[0], np.float64, "routed layer_norm")


def test_host_arrays_with_cuda_backend_and_out():
    x = _data((4, 3), np.float32)
    out = np.empty_like(x)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    erm, erv = np.zeros(3), np.ones(3)
    with fn.use_backend("cuda"):
        y = fn.batch_norm(x, rm, rv, training=True, out=out)
    assert y is out
    ey, _, _ = ref.batch_norm(x, erm, erv, training=True)
    assert_close(out, ey, np.float32, "host batch_norm out=")
    assert_close(rm, erm, np.float32, "host running_mean")
    dout = cuda.to_device(np.zeros_like(x))
    y = fn.layer_norm(cuda.to_device(x), 3, out=dout, backend="cuda")
    assert y is dout
    assert_close(dout.copy_to_host(), ref.layer_norm(x, (3,))[0], np.float32, "device out=")


def test_float16_and_empty_go_through_the_host():
    x = _data((2, 3, 4), np.float16, 0.0)
    y = fn.group_norm(cuda.to_device(x), 3, backend="cuda")
    assert isinstance(y, _cuda._DevArray) and y.dtype == np.float16
    assert_close(y.copy_to_host(), ref.group_norm(x, 3)[0], np.float16, "float16 group_norm")
    e = fn.layer_norm(cuda.to_device(np.zeros((0, 5))), 5, backend="cuda")
    assert e.shape == (0, 5)


def test_bad_arguments_raise_naming_them():
    x = cuda.to_device(_data((2, 3, 4), np.float64))
    with pytest.raises(ValueError, match="weight"):
        fn.batch_norm(x, None, None, cuda.to_device(np.ones(4)), training=True)
    with pytest.raises(TypeError, match="input"):
        fn.layer_norm(cuda.to_device(np.ones((2, 3), np.int32)), 3)
    with pytest.raises(ValueError, match="num_groups"):
        fn.group_norm(x, 2, backend="cuda")
    with pytest.raises(ValueError, match="running_mean"):
        fn.batch_norm(x, None, None, training=False, backend="cuda")
    with pytest.raises(ValueError, match="eps"):
        fn.instance_norm(x, eps=0.0, backend="cuda")
    with pytest.raises(ValueError, match="normalized_shape"):
        fn.layer_norm(x, (3,), backend="cuda")
    with pytest.raises(ValueError, match="grad_out"):
        fn.layer_norm_backward(cuda.to_device(np.ones((2, 3))), x, np.ones((2, 3)),
                               np.ones((2, 3)), backend="cuda")
