"""Property-based fuzzing of every public function: the short profile of bench/fuzz.py.

Cases are drawn by hypothesis (derandomized, no example database: the same cases every run)
and run in a worker process, so a segfault is caught and reported with the case that caused
it. The harness itself is checked first: a crash, a hang, a wrong answer and an error that
names no argument must each be reported, or the profile could pass by seeing nothing.
``python bench/fuzz.py --cases 100000`` is the long run.
"""
import importlib.util
import json
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

import fastnorm as fn  # noqa: E402

from conftest import tol  # noqa: E402

_path = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "fuzz.py")
_spec = importlib.util.spec_from_file_location("fastnorm_bench_fuzz", _path)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

PROFILE_CASES = 400


@pytest.fixture(scope="module")
def pool():
    p = fuzz.Pool(workers=1, timeout=60.0)
    yield p
    p.close()


def _valid_case(**changes):
    """A layer norm case the contract accepts (the harness checks start from it)."""
    case = dict(fuzz.DEFAULTS, op="layer_norm", backend=fn.available_backends()[0], seed=7,
                threads=1, shape=[3, 8], dtype="float32", layout="C", layout_axis=1,
                kind="normal", offset=0.0, scale=1.0, specials=[], weight="same", bias="same")
    case.update(changes)
    return case


def test_tolerances_are_the_suites():
    for dt in (np.float16, np.float32, np.float64):
        for scale in (0.0, 1.0, 37.5):
            assert fuzz.tol(dt, scale) == tol(dt, scale)


def test_valid_case_passes(pool):
    v = pool.run(_valid_case())
    assert v["verdict"] == "ok", v


def test_crash_is_reported_and_worker_replaced(pool):
    before = pool.restarts
    v = pool.run(_valid_case(inject="segv"))
    assert v["verdict"] == "crash" and "SIGSEGV" in v["detail"], v
    assert pool.restarts == before + 1
    assert pool.run(_valid_case())["verdict"] == "ok"   # the new worker answers


def test_hang_is_reported(pool):
    pool.timeout = 2.0
    try:
        v = pool.run(_valid_case(inject="hang"))
    finally:
        pool.timeout = 60.0
    assert v["verdict"] == "hang", v
    assert pool.run(_valid_case())["verdict"] == "ok"


def test_wrong_result_is_reported(pool):
    v = pool.run(_valid_case(inject="wrong"))
    assert v["verdict"] == "wrong-result" and "y:" in v["detail"], v


def test_unnamed_and_needless_errors_are_reported(pool):
    assert pool.run(_valid_case(inject="unnamed"))["verdict"] == "rejected-valid"
    bad = _valid_case(inject="unnamed", weight="bad_shape")
    assert pool.run(bad)["verdict"] == "unnamed-error"
    # and without the injection, the same bad weight is an error naming it: ok
    assert pool.run(dict(bad, inject=None))["verdict"] == "ok"


def test_oracle_mismatch_helper():
    e = np.array([1.0, np.nan, np.inf, -2.0])
    assert fuzz.mismatch(e.astype(np.float32), e, np.float32) is None
    assert fuzz.mismatch(np.array([1.0, 0.0, np.inf, -2.0]), e, np.float64)   # NaN lost
    assert fuzz.mismatch(np.array([1.0, np.nan, -np.inf, -2.0]), e, np.float64)  # Inf sign
    assert fuzz.mismatch(np.array([1.0 + 1e-4, np.nan, np.inf, -2.0]), e, np.float32)
    # float16: an oracle value beyond float16's range is Inf in a float16 output
    assert fuzz.mismatch(np.array([np.inf], np.float16), np.array([7e4]), np.float16) is None


def test_fuzz_profile(pool):
    """PROFILE_CASES cases over every backend: each returns the oracle's answer or raises
    ValueError/TypeError naming an argument the case made invalid; no crash, no hang."""
    @settings(max_examples=PROFILE_CASES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(fuzz.strategy(fn.available_backends()))
    def draw(case):
        pool.submit(case)

    start = len(pool.results)
    draw()
    pool.drain()
    results = pool.results[start:]
    assert len(results) == PROFILE_CASES
    _, groups = fuzz.summarize(results)
    lines = []
    for sig, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        case, v = min(items, key=lambda cv: np.prod(cv[0]["shape"]))
        lines.append(f"[{len(items)}x] {sig}\n    {v.get('detail', '')[:300]}\n"
                     f"    python bench/fuzz.py --replay '{json.dumps(case)}'")
    if groups:
        n = sum(len(g) for g in groups.values())
        pytest.fail(f"{n} of {len(results)} cases are findings, in {len(groups)} "
                    "signatures:\n" + "\n".join(lines), pytrace=False)
