"""pytest-benchmark suite over the case table of ``python -m fastnorm bench``.

Not collected by a plain ``pytest`` (testpaths = tests). Run it explicitly::

    pytest bench/test_bench.py                       # quick shapes, float32, 1 and all threads
    pytest bench/test_bench.py --full-shapes --bench-threads 1 -k "BN and forward"

Each benchmark records its bytes and GB/s in ``extra_info`` (byte formula of ARCHITECTURE.md §6);
the terminal summary lists GB/s. Every implementation's first output is checked against the
default fastnorm backend's, so a wrong or skipped computation cannot pass as fast.
"""
import functools

import numpy as np
import pytest

import fastnorm
from fastnorm import _dispatch
from cases import PASSES, PEERS, Problem, Unavailable, cases, implementations, set_threads

BACKENDS = [b for b in fastnorm.available_backends() if b != "numpy"]
DEFAULT = _dispatch.default_backend()
IMPLS = ["floor"] + [f"fastnorm[{b}]" for b in BACKENDS] + ["out="] + list(PEERS)
TOL = {"float32": 1e-3, "float64": 1e-8}


def _applies(case, mode, impl):
    if impl == "out=":
        return mode in ("forward", "eval")
    if impl == "onnxruntime":  # inference only, channels-first only
        return mode in ("forward", "eval") and case.layout != "NHWC"
    return True


def pytest_generate_tests(metafunc):
    if "case_mode_impl" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    todo = [(c, m, i) for c in cases(quick=not cfg.getoption("--full-shapes"))
            for m in c.modes for i in IMPLS if _applies(c, m, i)]
    ids = [f"{c.label}-{m}-{i}".replace("×", "x") for c, m, i in todo]
    metafunc.parametrize("case_mode_impl", todo, ids=ids)
    metafunc.parametrize("dtype", cfg.getoption("--bench-dtype").split(","))
    threads = [int(t) for t in cfg.getoption("--bench-threads").split(",")]
    metafunc.parametrize("threads", threads, ids=lambda t: f"{t}t")


@functools.lru_cache(maxsize=1)
def _problem(case, dtype):
    return Problem(case, dtype)


@functools.lru_cache(maxsize=1)
def _expected(case, mode, dtype):
    """The default backend's output, float64 (at most one cached: arrays are large)."""
    p = _problem(case, dtype)
    fn, conv = implementations(p, mode, 1, [DEFAULT], DEFAULT, ())[f"fastnorm[{DEFAULT}]"]()
    return np.asarray(conv(fn()), dtype=np.float64)


def test_norm(benchmark, record_gbps, case_mode_impl, dtype, threads):
    case, mode, impl = case_mode_impl
    p = _problem(case, dtype)
    set_threads(threads)
    try:   # an optional peer that is not installed, or an op its runtime lacks
        fn, conv = implementations(p, mode, threads, BACKENDS, DEFAULT, PEERS)[impl]()
    except Unavailable as e:
        pytest.skip(f"{impl}: {e}")
    if conv is not None:  # the floor computes nothing to check
        want = _expected(case, mode, dtype)
        got = np.asarray(conv(fn()), dtype=np.float64)
        err = np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1)
        assert err < TOL[dtype], f"{impl} {case.label} {mode} {dtype}: rel. error {err:.2e}"
    nbytes = PASSES[mode] * p.nbytes
    group = f"{case.label} {mode} {dtype} {threads}t"
    benchmark.group = group
    benchmark.extra_info.update(bytes=nbytes, impl=impl)
    benchmark(fn)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["GB/s"] = nbytes / median / 1e9
        record_gbps(group, impl, median * 1e3, nbytes / median / 1e9)
