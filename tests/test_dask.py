"""fastnorm.dask on a dask.distributed LocalCluster (2 worker processes on 127.0.0.1)."""
import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import dask  # noqa: E402

import fastnorm.dask as fdask  # noqa: E402
from fastnorm.moments import moments  # noqa: E402


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None)
    c = distributed.Client(cluster)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


def bits(a):
    return np.ascontiguousarray(np.asarray(a, np.float64)).view(np.uint64)


def assert_rel(actual, expected, what, rtol=1e-12):
    """rtol relative: m2 to itself; the mean to the data's spread (|mean| + std)."""
    assert np.array_equal(np.asarray(actual.count), np.asarray(expected.count)), what
    assert actual.mean.shape == expected.mean.shape, what
    n = int(expected.count)
    spread = np.abs(expected.mean) + np.sqrt(expected.m2 / n)
    assert np.all(np.abs(actual.mean - expected.mean) <= rtol * spread), what
    assert np.all(np.abs(actual.m2 - expected.m2) <= rtol * expected.m2), what


def dataset(seed=0):
    """(numpy x (N, F, S) float64 with per-feature offsets, chunkings to cut it with)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (240, 6, 10)) * rng.uniform(0.5, 3, (1, 6, 1)) \
        + rng.uniform(-20, 20, (1, 6, 1))
    chunkings = [(60, 6, 10), ((100, 0, 77, 63), (2, 4), (3, 7)), (17, 5, 10)]
    return x, chunkings


AXES = [0, (0, 2), None, (1, 2), 2]


def test_cluster_moments_equal_in_memory(client):
    x, chunkings = dataset()
    for chunks in chunkings:
        xd = da.from_array(x, chunks=chunks)
        for axis in AXES:
            got = fdask.moments(xd, axis)
            want = moments(x, axis)
            assert_rel(got, want, f"chunks={chunks} axis={axis}")
            # and the float64 definition
            mean = x.mean(axis=axis)
            np.testing.assert_allclose(got.mean, mean, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(got.var(), x.var(axis=axis), rtol=1e-12)


def test_float32_and_integer_data(client):
    rng = np.random.default_rng(1)
    x32 = (5 + rng.normal(size=(5000, 3))).astype(np.float32)
    got = fdask.moments(da.from_array(x32, chunks=(700, 3)), 0)
    # float64 statistics of the float32 values, to float32 accuracy (the kernels may sum
    # float32 deviations in float32 lanes: tests/test_moments.py RTOL)
    assert_rel(got, moments(x32.astype(np.float64), 0), "float32", rtol=1e-5)
    xi = rng.integers(0, 256, (3000, 4), dtype=np.uint8)
    got = fdask.moments(da.from_array(xi, chunks=(512, 2)), 0)
    np.testing.assert_allclose(got.var(), xi.astype(np.float64).var(axis=0), rtol=1e-12)


def test_bit_identical_across_schedulers(client):
    x, chunkings = dataset(2)
    for chunks in chunkings[1:]:
        xd = da.from_array(x, chunks=chunks)
        for axis in ((0, 2), None):
            lazy = fdask.moments(xd, axis, split_every=2, compute=False)
            runs = {"distributed": dask.compute(lazy.mean, lazy.m2)}
            for sched in ("threads", "sync"):
                runs[sched] = dask.compute(lazy.mean, lazy.m2, scheduler=sched)
            ref = runs["distributed"]
            for sched, (mean, m2) in runs.items():
                what = f"{sched} chunks={chunks} axis={axis}"
                assert np.array_equal(bits(mean), bits(ref[0])), what
                assert np.array_equal(bits(m2), bits(ref[1])), what


def test_within_tolerance_across_chunk_layouts_and_trees(client):
    x, chunkings = dataset(3)
    want = moments(x, (0, 2))
    for chunks in chunkings:
        for split_every in (None, 2, 3):
            got = fdask.moments(da.from_array(x, chunks=chunks), (0, 2), split_every=split_every)
            assert_rel(got, want, f"chunks={chunks} split_every={split_every}")


def test_standardizer_fits_on_the_cluster_and_transforms_lazily(client):
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(4000, 5)) * [1, 2, 3, 4, 0] + [10, -3, 0, 7, 2.5]).astype(np.float32)
    xd = da.from_array(x, chunks=(900, 2))
    s = fdask.Standardizer().fit(xd)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(s.mean_, x64.mean(0), rtol=1e-5)
    np.testing.assert_allclose(s.var_, x64.var(0), rtol=1e-5, atol=0)
    assert s.count_ == 4000 and s.scale_[4] == 1.0     # constant feature: centred only
    z = s.transform(xd)
    assert isinstance(z, da.Array) and z.dtype == np.float32
    layers = [k for k in z.__dask_graph__().layers if k.startswith("fastnorm-standardize")]
    assert len(layers) == 1, "transform must be one lazy map_blocks layer"
    zc = z.compute()
    std = x64.std(0)
    expect = (x64 - x64.mean(0)) / np.where(std > 0, std, 1)
    np.testing.assert_allclose(zc, expect.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert not zc[:, 4].any()
    # float64 data: 1e-12, through the numpy path too
    s64 = fdask.Standardizer().fit(da.from_array(x64, chunks=(1000, 5)))
    z64 = s64.transform(da.from_array(x64, chunks=(333, 3))).compute()
    np.testing.assert_allclose(z64, expect, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s64.transform(x64), z64)
    back = s64.inverse_transform(s64.transform(x64))
    np.testing.assert_allclose(back, x64, rtol=1e-13, atol=1e-12)


def test_standardizer_multi_axis_channels(client):
    # images (N, C, H, W): statistics per channel over N, H and W
    rng = np.random.default_rng(5)
    x = rng.normal(size=(64, 3, 8, 8)) * [[[[1]], [[2]], [[3]]]] + 100.0
    s = fdask.Standardizer(axis=(0, 2, 3)).fit(da.from_array(x, chunks=(16, 3, 8, 8)))
    z = s.transform(da.from_array(x, chunks=(10, 1, 4, 8))).compute()
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, rtol=1e-12)


def test_bad_input():
    with pytest.raises(TypeError, match="x"):
        fdask.moments([1.0, 2.0])
    with pytest.raises(TypeError, match="x"):
        fdask.moments(da.ones(3, dtype=complex))
    with pytest.raises(ValueError, match="axis"):
        fdask.moments(da.ones((3, 4)), 2)
    with pytest.raises(ValueError, match="backend"):
        fdask.moments(da.ones((3, 4)), 0, backend="nope")
    x = da.ones(10, chunks=5)
    with pytest.raises(ValueError, match="chunk sizes"):
        fdask.moments(x[x > 0])
    s = fdask.Standardizer()
    with pytest.raises(ValueError, match="fit"):
        s.transform(np.ones((3, 2)))
    s.fit(da.ones((6, 2), chunks=3))
    with pytest.raises(ValueError, match="x must have the fitted feature shape"):
        s.transform(np.ones((3, 4)))
    with pytest.raises(TypeError, match="x"):
        s.transform([[1.0, 2.0]])
    with pytest.raises(ValueError, match="ddof"):
        fdask.Standardizer(ddof=-1)
