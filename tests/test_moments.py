"""fastnorm.moments: single pass vs the float64 definition; merges (Chan) as property tests."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnorm.moments import Moments, moments

from conftest import BACKENDS

EPS = np.finfo(np.float64).eps
# Relative accuracy of the statistics by data dtype. float64: ~eps. float32: the rows kernels
# sum deviations from a pilot mean in float32 lanes (corrected two-pass, fastnorm/_numba),
# so float32 data gives ~1e-7; 1e-5 is the project's float32 tolerance (conftest.tol).
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def ref_moments(x, axis):
    """The definition in float64: mean and sum of squared deviations."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=axis, keepdims=True)
    m2 = ((x - mean) ** 2).sum(axis=axis)
    return mean.squeeze(axis=axis), m2


def bits(a):
    return np.ascontiguousarray(np.asarray(a, np.float64)).view(np.uint64)


def layouts(x):
    """The same logical array laid out every way a kernel view or the copy path must serve."""
    yield "contiguous", x
    yield "fortran", np.asfortranarray(x)
    yield "strided", np.repeat(x, 2, axis=-1)[..., ::2]
    yield "reversed", np.ascontiguousarray(x[::-1])[::-1]
    perm = tuple(range(1, x.ndim)) + (0,)  # x's axis 0 innermost in memory
    yield "axis0-inner", np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))


AXES = [None, 0, 1, 2, 3, -1, (0, 2, 3), (0, 2), (1, 3), (0, 1, 3), (2, 3), ()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e8])
def test_single_pass_matches_definition(backend, dtype, offset):
    rng = np.random.default_rng(0)
    x = (offset + rng.normal(0, 2, (5, 4, 6, 7))).astype(dtype)
    for name, xl in layouts(x):
        for axis in AXES:
            m = moments(xl, axis, backend=backend)
            mean, m2 = ref_moments(x, axis)
            what = f"{backend} {np.dtype(dtype).name} offset={offset} {name} axis={axis}"
            assert m.mean.shape == mean.shape and m.m2.shape == m2.shape, what
            assert m.mean.dtype == np.float64 and m.m2.dtype == np.float64, what
            assert int(m.count) == x.size // max(mean.size, 1), what
            rtol = RTOL[np.dtype(dtype)]
            n = x.size // max(mean.size, 1)
            spread = np.abs(mean) + np.sqrt(m2 / n)
            assert np.all(np.abs(m.mean - mean) <= max(rtol, 32 * EPS) * spread), what
            # m2: rtol (by dtype), plus the conditioning term of a Chan merge of partial
            # moments (views that leave outer reduced axes, e.g. NCHW over (0, 2, 3)): each
            # partial mean is off by ~ulp(mean), giving ~eps * |mean| / std relative in m2.
            if axis == ():
                assert not m.m2.any(), what
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                cond = np.abs(mean) / np.sqrt(m2 / (x.size // mean.size))
                bound = np.where(m2 > 0, (rtol + 8 * EPS * cond) * m2, 0.0)  # 0: exact
            assert np.all(np.abs(m.m2 - m2) <= bound), what


@pytest.mark.parametrize("backend", BACKENDS)
def test_keepdims_integers_float16_and_edge_shapes(backend):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 1, 5))
    m = moments(x, (0, 2), keepdims=True, backend=backend)
    assert m.mean.shape == (1, 1, 1)
    np.testing.assert_allclose(m.mean.ravel(), x.mean(), rtol=1e-14)
    xi = rng.integers(0, 256, (20, 3), dtype=np.uint8)
    mi = moments(xi, 0, backend=backend)
    np.testing.assert_allclose(mi.var(), xi.astype(np.float64).var(axis=0), rtol=1e-13)
    xh = rng.normal(size=(50, 2)).astype(np.float16)
    mh = moments(xh, 0, backend=backend)  # computed as float32
    np.testing.assert_allclose(mh.mean, xh.astype(np.float64).mean(axis=0), rtol=1e-5)
    # a one-element reduction: m2 exactly 0; no reduced axis: mean is x itself
    one = moments(np.array([[7.0]]), backend=backend)
    assert float(one.mean) == 7.0 and float(one.m2) == 0.0 and int(one.count) == 1
    ident = moments(x, (), backend=backend)
    assert np.array_equal(ident.mean, x) and not ident.m2.any() and int(ident.count) == 1
    # empty: count 0 -> NaN mean, 0 M2, NaN var; no kept elements -> empty arrays
    e = moments(np.zeros((0, 3)), 0, backend=backend)
    assert int(e.count) == 0 and np.isnan(e.mean).all() and not e.m2.any()
    assert np.isnan(e.var()).all()
    k = moments(np.zeros((4, 0)), 0, backend=backend)
    assert int(k.count) == 4 and k.mean.shape == (0,)


def test_nan_propagates():
    x = np.ones((10, 2))
    x[3, 1] = np.nan
    m = moments(x, 0)
    assert not np.isnan(m.mean[0]) and np.isnan(m.mean[1]) and np.isnan(m.m2[1])


# ------------------------------------------------------------------------------- merges

@st.composite
def split_data(draw, max_n=60):
    """(x (n, C) float64, cut points) with |mean| / std <= 100; cuts may repeat (empty parts)."""
    n = draw(st.integers(0, max_n))
    C = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0, 1e3]))
    loc = scale * draw(st.floats(-100, 100))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    x = (loc + scale * np.random.default_rng(seed).normal(size=(n, C))).astype(dtype)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=8)))
    return x, cuts


def assert_merged_equal(merged, whole, what, rtol=1e-12):
    """rtol relative: m2 relative to itself, the mean relative to the data's spread."""
    assert np.array_equal(np.asarray(merged.count), np.asarray(whole.count)), what
    if int(whole.count) == 0:
        assert np.isnan(merged.mean).all() and not np.asarray(merged.m2).any(), what
        return
    spread = np.abs(whole.mean) + np.sqrt(whole.m2 / int(whole.count))
    assert np.all(np.abs(merged.mean - whole.mean) <= rtol * spread), what
    assert np.all(np.abs(merged.m2 - whole.m2) <= rtol * whole.m2), what


@settings(max_examples=150, deadline=None)
@given(split_data(), st.sampled_from(BACKENDS))
def test_any_split_merged_equals_single_pass(data, backend):
    x, cuts = data
    rtol = RTOL[x.dtype]  # 1e-12 for float64 data
    whole = moments(x, 0, backend=backend)
    parts = [moments(p, 0, backend=backend) for p in np.split(x, cuts)]
    assert_merged_equal(Moments.merge_all(parts), whole, f"tree {x.shape} {cuts}", rtol)
    left = parts[0]
    for p in parts[1:]:
        left = left.merge(p)
    assert_merged_equal(left, whole, f"left fold {x.shape} {cuts}", rtol)
    right = parts[-1]
    for p in parts[-2::-1]:
        right = p.merge(right)
    assert_merged_equal(right, whole, f"right fold {x.shape} {cuts}", rtol)


@settings(max_examples=150, deadline=None)
@given(split_data(), st.integers(0, 60))
def test_merge_is_symmetric_bit_for_bit(data, cut):
    x, _ = data
    cut = min(cut, x.shape[0])
    a, b = moments(x[:cut], 0), moments(x[cut:], 0)
    ab, ba = a.merge(b), b.merge(a)
    assert np.array_equal(ab.count, ba.count)
    assert np.array_equal(bits(ab.mean), bits(ba.mean))
    assert np.array_equal(bits(ab.m2), bits(ba.m2))


def test_symmetric_with_equal_counts_and_per_element_order():
    # equal counts: the tie-break is the mean, chosen per element
    a = Moments(np.int64(4), np.array([1.0, 5.0, 2.0]), np.array([1.0, 2.0, 3.0]))
    b = Moments(np.int64(4), np.array([3.0, -1.0, 2.0]), np.array([0.5, 9.0, 1.0]))
    for f in ("mean", "m2"):
        assert np.array_equal(bits(getattr(a.merge(b), f)), bits(getattr(b.merge(a), f)))
    np.testing.assert_allclose(a.merge(b).mean, [2.0, 2.0, 2.0])
    # m2 = s_a + s_b + delta^2 * n_a n_b / n
    np.testing.assert_allclose(a.merge(b).m2, [1.5 + 4 * 2, 11.0 + 36 * 2, 4.0])


def test_merge_all_is_the_fixed_balanced_tree():
    rng = np.random.default_rng(3)
    parts = [moments(rng.normal(1.0, 3.0, size=k)) for k in (3, 1, 4, 1, 5)]
    tree = Moments.merge_all(parts)
    # halves: [p0 p1] [p2 p3 p4] -> [p2] [p3 p4]
    expect = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3].merge(parts[4])))
    for f in ("mean", "m2"):
        assert np.array_equal(bits(getattr(tree, f)), bits(getattr(expect, f)))
    again = Moments.merge_all(list(parts))
    assert np.array_equal(bits(again.m2), bits(tree.m2))


def test_empty_parts_leave_the_other_exactly():
    x = np.random.default_rng(4).normal(size=(9, 2))
    m = moments(x, 0)
    e = moments(x[:0], 0)
    for r in (m.merge(e), e.merge(m), Moments.merge_all([e, m, e, e]),
              m.merge(Moments.empty((2,)))):
        assert int(r.count) == 9
        assert np.array_equal(bits(r.mean), bits(m.mean))
        assert np.array_equal(bits(r.m2), bits(m.m2))
    both = e.merge(e)
    assert int(both.count) == 0 and np.isnan(both.mean).all() and not both.m2.any()


def test_large_offset_merge_error_is_bounded_by_conditioning():
    # Chan's merge inherits each part's mean rounding error (~ulp(mean)); the relative m2
    # error is then of order eps * |mean| / std. A single pass stays at ~eps.
    rng = np.random.default_rng(5)
    x = 1e8 + rng.normal(size=(1000, 4))
    mean, m2 = ref_moments(x, 0)
    assert np.all(np.abs(moments(x, 0).m2 - m2) <= 1e-14 * m2)
    merged = Moments.merge_all([moments(p, 0) for p in np.array_split(x, 13)])
    cond = np.abs(mean) / np.sqrt(m2 / 1000)
    assert np.all(np.abs(merged.m2 - m2) <= 4 * EPS * cond * m2)


def test_var_std_and_unbiased():
    x = np.random.default_rng(6).normal(size=(30, 3))
    m = moments(x, 0)
    np.testing.assert_allclose(m.var(), x.var(axis=0), rtol=1e-14)
    np.testing.assert_allclose(m.var(ddof=1), x.var(axis=0, ddof=1), rtol=1e-14)
    np.testing.assert_allclose(m.unbiased_var(), x.var(axis=0, ddof=1), rtol=1e-14)
    np.testing.assert_allclose(m.std(), x.std(axis=0), rtol=1e-14)
    np.testing.assert_allclose(m.unbiased_std(), x.std(axis=0, ddof=1), rtol=1e-14)
    one = moments(np.ones((1, 3)), 0)
    assert np.isnan(one.var(ddof=1)).all() and not one.var().any()


def test_bad_input_names_the_argument():
    x = np.ones((3, 4))
    with pytest.raises(ValueError, match="axis"):
        moments(x, 2)
    with pytest.raises(ValueError, match="axis"):
        moments(x, (0, -2))
    with pytest.raises(TypeError, match="axis"):
        moments(x, "0")
    with pytest.raises(TypeError, match="x"):
        moments(np.array(["a"]))
    with pytest.raises(TypeError, match="x"):
        moments({"a": 1})
    with pytest.raises(TypeError, match="x"):
        moments(np.ones(3, np.complex128))
    m = moments(x)
    with pytest.raises(TypeError, match="other"):
        m.merge((1, 2.0, 0.0))
    with pytest.raises(ValueError, match="count"):
        m.merge(Moments(np.int64(-1), np.float64(0), np.float64(0)))
    with pytest.raises(TypeError, match="count"):
        m.merge(Moments(1.5, np.float64(0), np.float64(0)))
    with pytest.raises(ValueError, match="parts"):
        Moments.merge_all([])
    with pytest.raises(TypeError, match=r"parts\[1\]"):
        Moments.merge_all([m, None])
    with pytest.raises(ValueError, match="ddof"):
        m.var(ddof=-1)
    with pytest.raises(ValueError, match="backend"):
        moments(x, backend="nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_rows_split_into_blocks_and_thread_counts_agree(backend):
    import fastnorm
    # one long row (R=1, M=3*2**17) is cut into equal blocks merged back (parallel work)
    x = 3.0 + np.random.default_rng(7).normal(size=3 * 2**17)
    m = moments(x, backend=backend)
    mean, m2 = ref_moments(x, None)
    assert abs(float(m.mean) - mean) <= 1e-14 * 3 and abs(float(m.m2) - m2) <= 1e-12 * m2
    # the same bits on 1 and 2 threads (blocks depend on the shape only)
    y = np.random.default_rng(8).normal(size=(3, 2**16, 5))
    out = []
    for threads in (1, 2):
        fastnorm.set_num_threads(threads)
        out.append([moments(a, ax, backend=backend) for a, ax in ((x, None), (y, 1), (y, 0))])
    for a, b in zip(*out):
        assert np.array_equal(bits(a.mean), bits(b.mean))
        assert np.array_equal(bits(a.m2), bits(b.m2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_buffer(backend):
    # a float64 array at an odd address (as a buffer deserialized off the network can be)
    x = np.random.default_rng(9).normal(size=(40, 3))
    raw = np.zeros(x.nbytes + 1, np.uint8)[1:]
    u = raw.view(np.float64).reshape(x.shape)
    u[...] = x
    assert not u.flags.aligned
    m, want = moments(u, 0, backend=backend), moments(x, 0, backend=backend)
    assert np.array_equal(bits(m.mean), bits(want.mean))
    assert np.array_equal(bits(m.m2), bits(want.m2))
