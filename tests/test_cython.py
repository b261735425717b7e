"""The Cython backend: build, kernels against their NumPy twins, argument checks, dispatch,
start-up, fork safety and concurrent threads.

The API-level matrix (every op x backend x dtype x layout against the float64 oracles, and
the same bits at 1 and 2 threads) lives in test_api.py / test_accuracy.py and covers this
backend through ``fastnorm.available_backends()``; this file tests what is specific to it.
"""
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import _dispatch, reference

try:
    import fastnorm_cy as cy
except ImportError as e:  # not built
    cy, CY_ERROR = None, str(e)

# CI sets FASTNORM_REQUIRE_CYTHON=1 (or CI=true): a missing extension is then a failure.
REQUIRED = os.environ.get("FASTNORM_REQUIRE_CYTHON") == "1" or bool(os.environ.get("CI"))
# child processes run from the folder holding the fastnorm this process imported, so they
# import the same one (the installed package, not a source checkout without the extension)
SAME_FASTNORM = os.path.dirname(os.path.dirname(os.path.abspath(fn.__file__)))

needs_cy = pytest.mark.skipif(cy is None and not REQUIRED,
                              reason="fastnorm_cy is not built (pip install . builds it)")
BIG = _dispatch.PARALLEL_MIN  # elements: inputs at least this large take the parallel path


def _simd_levels():
    """The instruction-set bodies this CPU runs ("v4", "v3", "v1"), or ["best"] (one body:
    a build without multiversioning, or no extension)."""
    if cy is None:
        return ["best"]
    names = {"v4": "x86-64-v4", "v3": "x86-64-v3", "v1": "default"}
    out = [lv for lv, name in names.items() if cy.simd_select(lv).startswith(name)]
    cy.simd_select(os.environ.get("FASTNORM_SIMD") or None)
    return out or ["best"]


SIMD_LEVELS = _simd_levels()


@pytest.fixture(params=SIMD_LEVELS)
def simd(request):
    """Run the test on each instruction-set body (each has its own vector width, so its own
    summation order), then restore the one chosen at import."""
    cy.simd_select(None if request.param == "best" else request.param)
    yield request.param
    cy.simd_select(os.environ.get("FASTNORM_SIMD") or None)


def test_extension_is_built():
    if cy is None and not REQUIRED:
        pytest.skip("fastnorm_cy is not built and FASTNORM_REQUIRE_CYTHON is not set")
    assert cy is not None, f"the Cython extension is missing: {CY_ERROR}"
    assert "cython" in fn.available_backends()
    assert _dispatch.default_backend() == "cython" or os.environ.get("FASTNORM_BACKEND")


# ------------------------------------------------------------------------ kernels vs twins

def _rows_args(name, rng, R, M, dtype, offset):
    x = (offset + rng.standard_normal((R, M))).astype(dtype)
    dy = rng.standard_normal((R, M)).astype(dtype)
    w = rng.normal(1, 0.3, M).astype(dtype)
    b = rng.normal(0, 0.3, M).astype(dtype)
    x64 = x.astype(np.float64)
    m64 = x64.mean(axis=1)
    r64 = 1.0 / np.sqrt(x64.var(axis=1) + 1e-5)
    per = [rng.standard_normal(R) for _ in range(3)]
    if name == "rows_fwd":
        return [x, w, b, 1e-5, False, np.empty_like(x), np.empty(R, dtype),
                np.empty(R, dtype)], (5, 6, 7)
    if name == "rows_fwd_rms":
        return [x, w, None, 1e-6, True, np.empty_like(x), np.empty(R, dtype),
                np.empty(R, dtype)], (5, 6, 7)
    if name == "rows_bwd":
        B = max(1, min(64, R // 16))
        return [dy, x, m64.astype(dtype), r64.astype(dtype), w, False, np.empty_like(x),
                np.full((B, M), 7.0), np.full((B, M), 7.0)], (6, 7, 8)
    if name == "rows_bwd_rms":
        return [dy, x, np.zeros(R, dtype), r64.astype(dtype), None, True, np.empty_like(x),
                None, np.full((3, M), 7.0)], (6, 8)
    if name == "rows_moments":
        return [x, np.empty(R), np.empty(R)], (1, 2)
    if name == "rows_scale_shift":
        return [x, m64, per[0], per[1], np.empty_like(x)], (4,)
    if name == "rows_dot":
        return [dy, x, m64, np.empty(R), np.empty(R)], (3, 4)
    if name == "rows_bwd_apply":
        return [dy, x, m64, *per, np.empty_like(x)], (6,)
    if name == "rows_bwd_grouped":   # (R, K, S) segments, weights (G=3, K) by r % G
        K = 2 if M % 2 == 0 else 1
        shape = (R, K, M // K)
        wg = rng.normal(1, 0.3, (3, K))
        return [dy.reshape(shape), x.reshape(shape), m64, r64, wg, np.empty(shape, dtype),
                np.empty((R, K)), np.empty((R, K))], (5, 6, 7)
    raise ValueError(name)


def _channels_args(name, rng, P, Q, C, dtype, offset):
    x = (offset + rng.standard_normal((P, Q, C))).astype(dtype)
    dy = rng.standard_normal((P, Q, C)).astype(dtype)
    m64 = x.astype(np.float64).mean(axis=1)
    per = [rng.standard_normal((P, C)) for _ in range(3)]
    if name == "channels_moments":
        return [x, np.empty((P, C)), np.empty((P, C))], (1, 2)
    if name == "channels_scale_shift":
        return [x, m64, per[0], per[1], np.empty_like(x)], (4,)
    if name == "channels_dot":
        return [dy, x, m64, np.empty((P, C)), np.empty((P, C))], (3, 4)
    if name == "channels_bwd_apply":
        return [dy, x, m64, *per, np.empty_like(x)], (6,)
    if name == "channels_fwd_grouped":  # groups of 4 channels where C allows, else instance
        G = C // 4 if C % 4 == 0 else C
        w, b = (rng.standard_normal(C).astype(dtype) for _ in range(2))
        return [x, w, b, 1e-5, np.empty_like(x), np.empty((P, G), dtype),
                np.empty((P, G), dtype)], (4, 5, 6)
    raise ValueError(name)


ROWS = ["rows_fwd", "rows_fwd_rms", "rows_bwd", "rows_bwd_rms", "rows_moments",
        "rows_scale_shift", "rows_dot", "rows_bwd_apply", "rows_bwd_grouped"]
CHANNELS = ["channels_moments", "channels_scale_shift", "channels_dot", "channels_bwd_apply",
            "channels_fwd_grouped"]
# (R, M): one row, one column, a row longer than a 4096 block (Chan merges), many short rows
ROW_SHAPES = [(1, 768), (7, 1), (3, 9000), (40, 1000)]
# (P, Q, C): block boundaries (8192 // C rows per block), C=1, P > 1
CH_SHAPES = [(1, 1, 1024), (1, 5000, 3), (3, 700, 37), (2, 300, 1), (1, 2049, 8)]


def _run_both(name, args, outs):
    """Outputs of the reference twin, the serial and the parallel Cython kernel."""
    kname = name.replace("_rms", "")
    results = []
    for fun in (getattr(reference, kname), *cy.KERNELS[kname]):
        a = [v.copy() if isinstance(v, np.ndarray) else v for v in args]
        fun(*a)
        results.append([a[i] for i in outs])
    return results


def _check(name, results, dtype, what, offset=0.0, hint=1.0):
    """Serial == parallel bit for bit; both near the twin. ``hint``: the size of the terms
    that cancel in an output (rstd * |dy * w| for a backward), when above the result's."""
    ref, serial, parallel = results
    for k, (e, s, p) in enumerate(zip(ref, serial, parallel)):
        np.testing.assert_array_equal(s, p, err_msg=f"{what} output {k}: serial != parallel")
        e64, s64 = e.astype(np.float64), s.astype(np.float64)
        scale = max(1.0, hint, float(np.nanmax(np.abs(e64))) if e.size else 1.0)
        # float64: rounding amplified by the conditioning of x - mean, about 1 + |offset|
        tol = (2e-14 * (1 + abs(offset)) if dtype == np.float64 else 3e-6) * scale
        if e.dtype == np.float32:   # an output rounded to float32: half an ulp either way
            tol = max(tol, 1.2e-7 * scale)
        err = float(np.nanmax(np.abs(s64 - e64))) if e.size else 0.0
        assert np.array_equal(np.isnan(s64), np.isnan(e64)), f"{what} output {k}: NaN pattern"
        assert err <= tol, f"{what} output {k}: max abs error {err:.3g} > {tol:.3g}"


@needs_cy
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("name", ROWS + CHANNELS)
def test_kernel_matches_twin(name, offset, dtype, simd):
    rng = np.random.default_rng(int(offset) + len(name))
    shapes = ROW_SHAPES if name.startswith("rows") else CH_SHAPES
    for shape in shapes:
        make = _rows_args if name.startswith("rows") else _channels_args
        args, outs = make(name, rng, *shape, dtype, offset)
        what = f"{name} dtype={np.dtype(dtype).name} shape={shape} offset={offset}"
        hint = 1.0
        if name.startswith("rows_bwd") and name != "rows_bwd_apply":
            w = 1.0 if args[4] is None else np.abs(args[4]).max()
            hint = float(np.abs(args[3]).max() * np.abs(args[0]).max() * w)
        _check(name, _run_both(name, args, outs), dtype, what, offset, hint)


@needs_cy
def test_parallel_kernels_same_bits_as_serial_on_big_inputs(simd):
    # large enough that the parallel loops split the work between two threads
    rng = np.random.default_rng(1)
    cy.set_num_threads(2)
    for name in ROWS:
        args, outs = _rows_args(name, rng, 257, 3000, np.float32, 3.0)
        _check(name, _run_both(name, args, outs), np.float32, name)
    for name in CHANNELS:
        args, outs = _channels_args(name, rng, 2, 9000, 24, np.float32, 3.0)
        _check(name, _run_both(name, args, outs), np.float32, name)


@needs_cy
def test_nan_and_inf_propagate_like_the_twin(simd):
    x = np.random.default_rng(2).standard_normal((4, 50))
    x[1, 3], x[2, 7] = np.nan, np.inf
    for name in ("rows_fwd", "rows_moments"):
        args, outs = _rows_args(name, np.random.default_rng(0), 4, 50, np.float64, 0.0)
        args[0] = x
        with np.errstate(invalid="ignore"):
            ref, serial, _ = _run_both(name, args, outs)
        for e, s in zip(ref, serial):
            np.testing.assert_array_equal(np.isnan(e), np.isnan(s))
            np.testing.assert_array_equal(np.isfinite(e), np.isfinite(s))


@needs_cy
def test_constant_row_gives_exactly_beta(simd):
    # ARCHITECTURE.md §5: a constant row at 1e4+0.1 normalizes to exactly 0, so y is exactly bias
    x = np.full((2, 768), 1e4 + 0.1, np.float32)
    b = np.linspace(-1, 1, 768).astype(np.float32)
    y, m, r = np.empty_like(x), np.empty(2, np.float32), np.empty(2, np.float32)
    cy.KERNELS["rows_fwd"][0](x, np.ones(768, np.float32), b, 1e-5, False, y, m, r)
    np.testing.assert_array_equal(y, np.broadcast_to(b, y.shape))


@needs_cy
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1024), (3, 5, 7), (70000, 3), (4,)])
@pytest.mark.parametrize("affine", [False, True])
def test_channels_eval_matches_oracle_and_composed_kernels(shape, dtype, affine):
    # fused eval-mode kernel (fastnorm_cy only) vs the BN eval oracle, and vs the kernel
    # fastnorm._dispatch composes for the other backends: built on Cython's own
    # channels_scale_shift, the composition gives the same bits as the fused kernel
    rng = np.random.default_rng(11)
    C = shape[-1]
    x = (1e4 + rng.standard_normal(shape)).astype(dtype)
    rm = (1e4 + rng.standard_normal(C)).astype(dtype)
    rv = rng.uniform(0.5, 2, C).astype(dtype)
    w = rng.normal(1, 0.3, C).astype(dtype) if affine else None
    b = rng.normal(0, 0.3, C).astype(dtype) if affine else None
    outs = []
    for backend in fn.available_backends():
        _dispatch.resolve(backend)
        for k in _dispatch._TABLE[("channels_eval", backend)]:
            y = np.full_like(x, np.nan)
            k(x, rm, rv, w, b, 1e-5, y)
            outs.append((backend, y))
    composed = _dispatch._composed_channels_eval(cy.KERNELS["channels_scale_shift"][0])
    y = np.full_like(x, np.nan)
    composed(x, rm, rv, w, b, 1e-5, y)
    np.testing.assert_array_equal(outs[0][1], y, err_msg="fused vs composed")
    xc = np.moveaxis(x.reshape(-1, C), -1, 0)[None] if x.ndim > 1 else x.reshape(1, C, 1)
    expected = reference.batch_norm(xc, rm, rv, w, b, training=False)[0]
    expected = np.moveaxis(expected[0], 0, -1).reshape(shape)
    for backend, y in outs:
        np.testing.assert_allclose(y, expected, rtol=0, atol=1e-2 if dtype == np.float32
                                   else 1e-10, err_msg=backend)


@needs_cy
def test_channels_eval_checks_arguments():
    k = cy.KERNELS["channels_eval"][0]
    x, v = np.zeros((2, 4)), np.ones(4)
    k(x, v, v, None, None, 1e-5, np.empty_like(x))
    with pytest.raises(ValueError, match="y"):
        k(x, v, v, None, None, 1e-5, np.empty((4, 2)))
    with pytest.raises(ValueError, match="C-contiguous"):
        k(np.zeros((4, 2)).T, v, v, None, None, 1e-5, np.empty((2, 4)))
    with pytest.raises(ValueError, match="var"):
        k(x, v, np.ones(3), None, None, 1e-5, np.empty_like(x))
    with pytest.raises(TypeError, match="weight"):
        k(x, v, v, v.astype(np.float32), None, 1e-5, np.empty_like(x))


# ------------------------------------------------------------------------ argument checks

@needs_cy
def test_in_place_scale_shift():
    # y is x (out=input in the API): allowed, and the same result as out of place
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 50, 24)).astype(np.float32)
    coef = [rng.standard_normal((2, 24)) for _ in range(3)]
    y = np.empty_like(x)
    cy.KERNELS["channels_scale_shift"][0](x, *coef, y)
    cy.KERNELS["channels_scale_shift"][0](x, *coef, x)
    np.testing.assert_array_equal(x, y)


@needs_cy
def test_read_only_inputs_are_accepted():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    w, b = np.ones(16, np.float32), np.zeros(16, np.float32)
    for a in (x, w, b):
        a.flags.writeable = False
    y, m, r = np.empty_like(x), np.empty(8, np.float32), np.empty(8, np.float32)
    for k in cy.KERNELS["rows_fwd"]:
        k(x, w, b, 1e-5, False, y, m, r)
    expected = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expected, atol=2e-6)


@needs_cy
@pytest.mark.parametrize("kernel", [0, 1])
def test_bad_arguments_raise_naming_the_argument(kernel):
    fwd = cy.KERNELS["rows_fwd"][kernel]
    x = np.zeros((4, 6), np.float32)
    ok = dict(weight=None, bias=None, y=np.empty_like(x), mean=np.empty(4, np.float32),
              rstd=np.empty(4, np.float32))

    def call(**kw):
        a = dict(ok, **kw)
        fwd(kw.get("x", x), a["weight"], a["bias"], 1e-5, False, a["y"], a["mean"], a["rstd"])

    call()  # the baseline is valid
    with pytest.raises(ValueError, match="weight"):
        call(weight=np.ones(5, np.float32))
    with pytest.raises(TypeError, match="bias"):
        call(bias=np.ones(6, np.float64))
    with pytest.raises(TypeError, match="weight"):
        call(weight=[1.0] * 6)
    with pytest.raises(ValueError, match="y"):
        call(y=np.empty((4, 7), np.float32))
    with pytest.raises(ValueError, match="y"):
        call(y=np.empty((6, 4), np.float32).T)          # right shape, not C-contiguous
    ro = np.empty(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="mean is read-only"):
        call(mean=ro)
    with pytest.raises(TypeError, match="x"):
        call(x=np.zeros((4, 6), np.int32))
    with pytest.raises(ValueError, match="x"):
        call(x=np.zeros(24, np.float32))
    with pytest.raises(ValueError, match="x"):
        call(x=np.zeros((4, 6), ">f4"))                 # byte-swapped
    with pytest.raises(ValueError, match="dw_part"):
        cy.KERNELS["rows_bwd"][kernel](x, x, ok["mean"], ok["rstd"], None, False,
                                       np.empty_like(x), np.empty((2, 5)), None)
    x3 = np.zeros((1, 4, 6), np.float32)
    with pytest.raises(ValueError, match="overlaps x"):      # partial overlap, not in place
        big = np.zeros(30, np.float32)
        cy.KERNELS["channels_scale_shift"][kernel](big[:24].reshape(1, 4, 6), np.zeros((1, 6)),
                                                   np.ones((1, 6)), np.zeros((1, 6)),
                                                   big[6:].reshape(1, 4, 6))
    with pytest.raises(ValueError, match="dx must not share memory with dy"):
        cy.KERNELS["channels_bwd_apply"][kernel](x3, x3.copy(), *np.zeros((4, 1, 6)), x3)
    with pytest.raises(ValueError, match="sum_dyxc"):
        cy.KERNELS["channels_dot"][kernel](x[None], x[None], np.zeros((1, 6)),
                                           np.empty((1, 6)), np.empty((1, 5)))


# ------------------------------------------------------------------------ module contract

@needs_cy
def test_module_contract():
    assert set(cy.KERNELS) == set(reference.KERNELS) | set(_dispatch.FUSED)
    assert all(callable(s) and callable(p) and s is not p for s, p in cy.KERNELS.values())
    info = cy.info()
    assert info["simd_clone"].split()[0] in ("x86-64-v4", "x86-64-v3", "default", "portable")
    n = cy.get_num_threads()
    cy.set_num_threads(3)
    assert cy.get_num_threads() == 3 and cy.info()["threads"] == 3
    cy.set_num_threads(n)
    with pytest.raises(ValueError):
        cy.set_num_threads(0)


@needs_cy
def test_simd_select_switches_and_checks_its_argument():
    try:
        for lv in SIMD_LEVELS:
            name = cy.simd_select(None if lv == "best" else lv)
            assert cy.info()["simd_clone"] == name
        best = cy.simd_select(None)
        assert best == cy.info()["simd_clone"] and best.startswith(
            {"v4": "x86-64-v4", "v3": "x86-64-v3", "v1": "default", "best": ""}[SIMD_LEVELS[0]])
        with pytest.raises(ValueError, match="level"):
            cy.simd_select("sse9")
    finally:
        cy.simd_select(os.environ.get("FASTNORM_SIMD") or None)
    if "v3" in SIMD_LEVELS:   # FASTNORM_SIMD picks the body at import
        code = "import fastnorm_cy as cy; print(cy.info()['simd_clone'])"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=SAME_FASTNORM,
                             env={**os.environ, "FASTNORM_SIMD": "avx2"}).stdout
        assert out.startswith("x86-64-v3")


@needs_cy
def test_bench_simd_script_runs(capsys):
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_simd.py")
    spec = importlib.util.spec_from_file_location("bench_simd", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = cy.info()["simd_clone"]
    mod.main(["--rounds", "1", "--kernels", "rows_dot,channels_moments"])
    out = capsys.readouterr().out
    assert "| rows_dot |" in out and "| channels_moments |" in out
    assert cy.info()["simd_clone"] == before   # the body chosen at import is restored
    with pytest.raises(SystemExit, match="unknown"):
        mod.main(["--kernels", "rows_nothing"])


@needs_cy
def test_info_command_names_the_simd_clone_and_threading_layer():
    out = subprocess.run([sys.executable, "-m", "fastnorm", "info"], capture_output=True,
                         text=True, check=True, cwd=SAME_FASTNORM).stdout
    assert "cython.simd_clone" in out and cy.info()["simd_clone"] in out
    assert "threads" in out and "backends" in out
    assert "numba.threading_layer" in out


# ------------------------------------------------------------------------ dispatch

@needs_cy
def test_use_backend_nests_and_restores():
    x = np.random.default_rng(4).standard_normal((3, 8))
    with fn.use_backend("numba"):
        assert _dispatch.resolve() == "numba"
        with fn.use_backend("cython"):
            assert _dispatch.resolve() == "cython"
            y = fn.layer_norm(x, 8)
        assert _dispatch.resolve() == "numba"
    np.testing.assert_allclose(y, reference.layer_norm(x, (8,))[0], atol=1e-12)
    with pytest.raises(ValueError, match="backend"):
        with fn.use_backend("fortran"):
            pass


def test_environment_variable_and_bad_values(monkeypatch):
    monkeypatch.setenv("FASTNORM_BACKEND", "numpy")
    assert _dispatch.resolve() == "numpy"
    monkeypatch.setenv("FASTNORM_BACKEND", "fortran")
    with pytest.warns(RuntimeWarning, match="FASTNORM_BACKEND"):
        assert _dispatch.resolve() in _dispatch.BACKENDS
    monkeypatch.delenv("FASTNORM_BACKEND")
    assert _dispatch.resolve() == _dispatch.available()[0]


@needs_cy
def test_set_num_threads_reaches_the_cython_module():
    x = np.random.default_rng(5).standard_normal((64, 1024))   # > PARALLEL_MIN elements
    fn.set_num_threads(1)
    y1 = fn.layer_norm(x, 1024, backend="cython")
    fn.set_num_threads(2)
    y2 = fn.layer_norm(x, 1024, backend="cython")
    assert cy.get_num_threads() == 2
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("backend", fn.available_backends())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_row_calls_match_the_general_path(backend, dtype):
    # The latency-critical calls (LN on (1, 768), eval BN on (1, 1024)) against the same
    # calls phrased so that any one-call fast path in api.py is bypassed (a list for
    # normalized_shape; float64 running statistics and an out= array): the same bits.
    rng = np.random.default_rng(13)
    x = (3 + rng.standard_normal((1, 768))).astype(dtype)
    w, b = rng.normal(1, 0.2, 768).astype(dtype), rng.normal(0, 0.2, 768).astype(dtype)
    for args in ((), (w,), (w, b), (None, b)):
        fast = fn.layer_norm(x, (768,), *args, backend=backend)
        slow = fn.layer_norm(x, [768], *args, backend=backend)
        np.testing.assert_array_equal(fast, slow)
    xb = (3 + rng.standard_normal((1, 1024))).astype(dtype)
    rm = (3 + rng.standard_normal(1024)).astype(dtype)
    rv = rng.uniform(0.5, 2, 1024).astype(dtype)
    wb, bb = rng.normal(1, 0.2, 1024).astype(dtype), rng.normal(0, 0.2, 1024).astype(dtype)
    for args in ((), (wb,), (wb, bb), (None, bb)):
        fast = fn.batch_norm(xb, rm, rv, *args, backend=backend)
        slow = fn.batch_norm(xb, rm.astype(np.float64), rv.astype(np.float64), *args,
                             backend=backend, out=np.empty_like(xb))
        np.testing.assert_array_equal(fast, slow)
        ref = reference.batch_norm(xb, rm, rv, *args)[0]
        np.testing.assert_allclose(fast, ref, rtol=0, atol=3e-6 if dtype == np.float32
                                   else 1e-13)


# ------------------------------------------------------------------------ start-up

@needs_cy
def test_import_is_lazy_and_first_cython_calls_are_fast():
    code = textwrap.dedent("""
        import json, sys, time
        t0 = time.perf_counter()
        import fastnorm as fn
        imported = sorted(m for m in ("numba", "fastnorm_cy", "torch") if m in sys.modules)
        import numpy as np
        x = np.random.default_rng(0).standard_normal((4, 8, 6, 6)).astype(np.float32)
        dy = np.ones_like(x)
        with fn.use_backend("cython"):
            y, m, r = fn.batch_norm(x, None, None, training=True, return_stats=True)
            fn.batch_norm_backward(dy, x, m, r)
            y, m, r = fn.layer_norm(x, (6, 6), return_stats=True)
            fn.layer_norm_backward(dy, x, m, r)
            y, m, r = fn.group_norm(x, 2, return_stats=True)
            fn.group_norm_backward(dy, x, m, r, num_groups=2)
            y, m, r = fn.instance_norm(x, return_stats=True)
            fn.instance_norm_backward(dy, x, m, r)
            y, r = fn.rms_norm(x, (6,), return_stats=True)
            fn.rms_norm_backward(dy, x, r)
        t1 = time.perf_counter()
        print(json.dumps({"imported": imported, "seconds": t1 - t0,
                          "numba_after": "numba" in sys.modules}))
    """)
    import json
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=SAME_FASTNORM).stdout
    res = json.loads(out)
    assert res["imported"] == [], f"import fastnorm imported {res['imported']}"
    assert not res["numba_after"], "the Cython path imported numba"
    assert res["seconds"] <= 0.5, f"import + first Cython calls took {res['seconds']:.3f} s"


# ------------------------------------------------------------------------ fork safety

def _child_check():
    """In a child: one op on every CPU backend, with inputs big enough for the parallel
    path, against the float64 oracle. Returns the list of failures (empty = good)."""
    rng = np.random.default_rng(7)
    x = (2 + rng.standard_normal((64, 1024))).astype(np.float32)    # 64K elements >= BIG
    xb = rng.standard_normal((16, 8, 16, 16))
    bad = []
    for backend in fn.available_backends():
        y = fn.layer_norm(x, 1024, backend=backend)
        e = np.abs(y - reference.layer_norm(x, (1024,))[0]).max()
        yb = fn.batch_norm(xb, None, None, training=True, backend=backend)
        eb = np.abs(yb - reference.batch_norm(xb, None, None, training=True)[0]).max()
        if not (e < 1e-4 and eb < 1e-10):
            bad.append((backend, float(e), float(eb)))
    if cy is not None:  # the module's own parallel entry must also be safe in a child
        y, m, r = np.empty_like(x), np.empty(64, np.float32), np.empty(64, np.float32)
        cy.KERNELS["rows_fwd"][1](x, None, None, 1e-5, False, y, m, r)
        if np.abs(y - reference.layer_norm(x, (1024,))[0]).max() > 1e-4:
            bad.append(("fastnorm_cy parallel entry",))
    return bad


def _parallel_calls_in_parent():
    x = np.random.default_rng(8).standard_normal((64, 1024))
    fn.set_num_threads(2)
    for backend in fn.available_backends():
        fn.layer_norm(x, 1024, backend=backend)
        fn.batch_norm(x.reshape(64, 16, 64), None, None, training=True, backend=backend)


def _wait(pid, timeout=120):
    """Exit code of child ``pid``, or 'hung' (the child is then killed)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "hung"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_os_fork_child_after_parallel_calls():
    _parallel_calls_in_parent()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            code = 0 if not _child_check() else 2
        finally:
            os._exit(code)
    assert _wait(pid) == 0
    assert not _dispatch._forked[0]
    _parallel_calls_in_parent()   # the parent goes on, parallel
    assert _child_check() == []


def _pool_task(_):
    return _child_check()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(),
                    reason="no fork start method on this platform")
def test_multiprocessing_fork_after_parallel_calls():
    _parallel_calls_in_parent()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.map_async(_pool_task, range(2)).get(timeout=120)
    assert results == [[], []]
    _parallel_calls_in_parent()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_fork_guard_is_needed_for_numba_omp():
    # The guard is not decorative: a forked child that runs Numba's parallel kernel on the
    # omp layer is killed (ARCHITECTURE.md §3). Skip where numba uses another threading layer.
    numba_mod = pytest.importorskip("numba")
    if "numba" not in fn.available_backends():
        pytest.skip("numba backend unavailable")
    _parallel_calls_in_parent()
    if numba_mod.threading_layer() != "omp":
        pytest.skip(f"numba threading layer is {numba_mod.threading_layer()}, not omp")
    x = np.random.default_rng(9).standard_normal((64, 1024))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _dispatch._forked[0] = False        # disable the guard in this child only
            fn.layer_norm(x, 1024, backend="numba")
            code = 0
        finally:
            os._exit(code)
    status = _wait(pid, timeout=60)
    assert status != 0, "numba's omp layer survived fork: the guard may be relaxed"


# ------------------------------------------------------------------------ threads

def _ops(x4, w, b, backend):
    """Every op, forward and backward, on shared read-only weights; returns the arrays."""
    dy = np.cos(x4)
    out = []
    y, m, r = fn.batch_norm(x4, None, None, w, b, True, return_stats=True, backend=backend)
    out += [y, *fn.batch_norm_backward(dy, x4, m, r, w, backend=backend)]
    y, m, r = fn.group_norm(x4, 4, w, b, return_stats=True, backend=backend)
    out += [y, *fn.group_norm_backward(dy, x4, m, r, w, num_groups=4, backend=backend)]
    y, m, r = fn.instance_norm(x4, weight=w, bias=b, return_stats=True, backend=backend)
    out += [y, *fn.instance_norm_backward(dy, x4, m, r, w, backend=backend)]
    M = x4.shape[-1]
    wl, bl = w[:1].repeat(M), b[:1].repeat(M)
    wl.flags.writeable = bl.flags.writeable = False
    y, m, r = fn.layer_norm(x4, M, wl, bl, return_stats=True, backend=backend)
    out += [y, *fn.layer_norm_backward(dy, x4, m, r, wl, backend=backend)]
    y, r = fn.rms_norm(x4, M, wl, return_stats=True, backend=backend)
    out += [y, *fn.rms_norm_backward(dy, x4, r, wl, backend=backend)]
    out.append(fn.batch_norm(np.ascontiguousarray(np.moveaxis(x4, 1, -1)), None, None, w, b,
                             True, axis=-1, backend=backend))
    return out


@pytest.mark.parametrize("backend", fn.available_backends())
def test_eight_threads_get_the_serial_results(backend):
    rng = np.random.default_rng(10)
    w = rng.normal(1, 0.2, 16).astype(np.float32)
    b = rng.normal(0, 0.2, 16).astype(np.float32)
    w.flags.writeable = b.flags.writeable = False
    inputs = [(3 + rng.standard_normal(s)).astype(np.float32)
              for s in ((4, 16, 32, 32), (2, 16, 3, 5))]    # parallel path, serial path
    for x in inputs:
        x.flags.writeable = False
    fn.set_num_threads(2)
    expected = [_ops(x, w, b, backend) for x in inputs]
    barrier = threading.Barrier(8)
    results, errors = [None] * 8, []

    def worker(k):
        try:
            barrier.wait()
            results[k] = [_ops(x, w, b, backend) for _ in range(3) for x in inputs]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for k in range(8):
        for rep, got in enumerate(results[k]):
            for i, (g, e) in enumerate(zip(got, expected[rep % 2])):
                np.testing.assert_array_equal(g, e, err_msg=f"thread {k} call {rep} out {i}")


@needs_cy
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streaming_stores_write_the_same_bits(dtype, simd):
    """Outputs of FN_STREAM_MIN (8 MiB) or more are written with non-temporal stores, from
    the first 16-byte aligned element of each row: a big call (rows of odd width, outputs
    misaligned by one element) gives the bits of the same work done in small calls."""
    rng = np.random.default_rng(7)
    R, M = 2 ** 23 // (37 * np.dtype(dtype).itemsize) + 5, 37     # > 8 MiB, odd rows
    x = (3 + rng.standard_normal((R, M))).astype(dtype)
    dy = rng.standard_normal((R, M)).astype(dtype)
    per = [rng.standard_normal(R) for _ in range(4)]

    def out(shape):   # misaligned by one element: the peel loop runs on every row
        return np.empty(int(np.prod(shape)) + 1, dtype)[1:].reshape(shape)

    def both(kernel, big, small):
        """(outputs of one big call, outputs of calls on slices of at most 64 K elements)"""
        res = []
        for run in (big, small):
            outs = run()
            res.append(outs)
        for a, b in zip(*res):
            np.testing.assert_array_equal(a, b, err_msg=kernel)

    cut = [slice(i, i + 1024) for i in range(0, R, 1024)]
    k = cy.KERNELS["rows_scale_shift"][1]

    def rows_ss(sl_list):
        y = out((R, M))
        for s in sl_list:
            k(x[s], per[0][s], per[1][s], per[2][s], y[s])
        return [y]
    both("rows_scale_shift", lambda: rows_ss([slice(None)]), lambda: rows_ss(cut))
    k = cy.KERNELS["rows_bwd_apply"][1]

    def rows_ba(sl_list):
        dx = out((R, M))
        for s in sl_list:
            k(dy[s], x[s], per[0][s], per[1][s], per[2][s], per[3][s], dx[s])
        return [dx]
    both("rows_bwd_apply", lambda: rows_ba([slice(None)]), lambda: rows_ba(cut))
    xg = x[:R - R % 4].reshape(-1, 4, M)    # (R/4, K=4, S=37): groups of four rows, G = 2
    wg, bg = (rng.standard_normal((2, 4)).astype(dtype) for _ in range(2))
    k = cy.KERNELS["rows_fwd_grouped"][1]

    def rows_fg(sl_list):
        y, m, r = out(xg.shape), np.empty(len(xg), dtype), np.empty(len(xg), dtype)
        for s in sl_list:   # slices of an even number of rows keep r % G
            k(xg[s], wg, bg, 1e-5, y[s], m[s], r[s])
        return [y, m, r]
    both("rows_fwd_grouped", lambda: rows_fg([slice(None)]), lambda: rows_fg(cut))
    x3, dy3 = x.reshape(1, R, M), dy.reshape(1, R, M)
    pc = [rng.standard_normal((1, M)) for _ in range(4)]
    k = cy.KERNELS["channels_scale_shift"][1]

    def ch_ss(sl_list):
        y = out((1, R, M))
        for s in sl_list:
            k(x3[:, s], pc[0], pc[1], pc[2], y[:, s])
        return [y]
    both("channels_scale_shift", lambda: ch_ss([slice(None)]), lambda: ch_ss(cut))
    k = cy.KERNELS["channels_bwd_apply"][1]

    def ch_ba(sl_list):
        dx = out((1, R, M))
        for s in sl_list:
            k(dy3[:, s], x3[:, s], *pc, dx[:, s])
        return [dx]
    both("channels_bwd_apply", lambda: ch_ba([slice(None)]), lambda: ch_ba(cut))
    xq = x[:R - R % 64].reshape(64, -1, M)   # 64 samples, instance norm (G = C = 37)
    wq, bq = (rng.standard_normal(M).astype(dtype) for _ in range(2))
    k = cy.KERNELS["channels_fwd_grouped"][1]

    def ch_fg(sl_list):
        y, m, r = out(xq.shape), np.empty((64, M), dtype), np.empty((64, M), dtype)
        for s in sl_list:
            k(xq[s], wq, bq, 1e-5, y[s], m[s], r[s])
        return [y, m, r]
    both("channels_fwd_grouped", lambda: ch_fg([slice(None)]),
         lambda: ch_fg([slice(i, i + 1) for i in range(64)]))
