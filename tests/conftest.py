"""Shared fixtures: the backends under test and the hostile-input generator."""
import os

import numpy as np
import pytest

import fastnorm
from fastnorm import _dispatch

BACKENDS = fastnorm.available_backends()   # cython (when built), numba, numpy
COMPILED = [b for b in BACKENDS if b != "numpy"]


def pytest_terminal_summary(terminalreporter):
    """With ``FASTNORM_SKIPPED_TO=path``, write the node ids of the tests and modules that
    skipped to ``path``, one per line: CI reruns those, and only those, once the optional
    peers are installed (``pytest @path``)."""
    path = os.environ.get("FASTNORM_SKIPPED_TO")
    if path:
        ids = sorted({r.nodeid for r in terminalreporter.stats.get("skipped", [])})
        with open(path, "w") as f:
            f.write("".join(i + "\n" for i in ids))


@pytest.fixture(autouse=True)
def _restore_threads(monkeypatch):
    # the watch that runs parallel kernels serially while the cores are held
    # (fastnorm._threads, tested in test_threads.py) is off: a test that compares thread
    # counts must run the parallel kernels, however busy the machine
    monkeypatch.setattr(_dispatch.WATCH, "enabled", False)
    n = fastnorm.get_num_threads()
    yield
    fastnorm.set_num_threads(n)


def tol(dtype, scale=1.0):
    """Absolute tolerance for a result of magnitude ``scale`` computed in ``dtype``."""
    base = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 4e-3}[np.dtype(dtype).type]
    return base * max(1.0, float(scale))


def assert_close(actual, expected, dtype, what, scale=None):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN pattern differs"
    finite = ~np.isnan(expected)       # (the NaN positions agree: compare the others)
    if scale is None:
        scale = np.max(np.abs(expected[finite])) if finite.any() else 1.0
    err = np.nanmax(np.abs(actual[finite] - expected[finite])) if finite.any() else 0.0
    assert err <= tol(dtype, scale), f"{what}: max abs error {err:.3g} > {tol(dtype, scale):.3g}"


def hostile(rng, shape, dtype, offset=0.0, layout="contiguous", axis=1):
    """x of ``shape`` and ``dtype`` laid out in memory as ``layout``.

    layouts: contiguous; channels_last (``axis`` innermost in memory, same logical shape);
    strided (every other element of a larger array along the last axis); transposed (F order).
    A large ``offset`` tests cancellation (ARCHITECTURE.md §5).
    """
    base = offset + rng.standard_normal(shape)
    if layout == "contiguous":
        x = base.astype(dtype)
    elif layout == "channels_last":
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(base, axis, -1)).astype(dtype), -1,
                        axis)
    elif layout == "strided":
        big = np.empty(shape[:-1] + (2 * shape[-1],), dtype)
        big[..., ::2] = base
        x = big[..., ::2]
    elif layout == "transposed":
        x = np.asfortranarray(base.astype(dtype))
    else:
        raise ValueError(layout)
    assert x.shape == tuple(shape)
    return x
