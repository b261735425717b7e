"""Options of the pytest-benchmark suite (run it explicitly: ``pytest bench/test_bench.py``)
and a GB/s summary at the end (byte formula of ARCHITECTURE.md §6)."""
import os

import pytest

RESULTS = []  # (group, implementation, median ms, GB/s), filled by test_bench.py


def pytest_addoption(parser):
    g = parser.getgroup("fastnorm bench")
    g.addoption("--full-shapes", action="store_true",
                help="the full (README) shapes instead of the quick ones")
    g.addoption("--bench-threads", default=",".join(map(str, sorted({1, os.cpu_count() or 1}))),
                help="comma-separated thread counts (default: 1 and all cores)")
    g.addoption("--bench-dtype", default="float32", help="comma-separated dtypes")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    w = max(len(g) for g, *_ in RESULTS)
    terminalreporter.section("GB/s (training fwd 3·S, eval 2·S, bwd 5·S, fwd+bwd 8·S)")
    for group, impl, ms, gbps in sorted(RESULTS):
        terminalreporter.write_line(f"{group:{w}s}  {impl:18s} {ms:9.3f} ms {gbps:7.1f} GB/s")


@pytest.fixture
def record_gbps():
    return lambda *row: RESULTS.append(row)
