"""Every entry of the dispatch table against its NumPy twin, generated from the table.

For each CPU backend that loads here, every ``(kernel, backend)`` entry whose function is not
the twin itself (the NumPy backend's data kernels and the CPU backends' phase kernels are)
runs the hostile cases of tests/kernel_cases.py, serial and parallel: each against the twin
within the dtype's tolerance, and the two with the same bits. A backend that registers its
kernels is tested by this file without a line of its own (tests/cuda_sim_check.py runs the
same cases on the CUDA backend under the simulator).
"""
import numpy as np
import pytest

import fastnorm
from fastnorm import _dispatch, reference
from kernel_cases import check_entry

CPU = fastnorm.available_backends()


def _entries():
    out = []
    for name, backend in _dispatch.table_entries():
        if backend not in CPU:
            continue
        fns = _dispatch.entry(name, backend)
        if not all(f is _dispatch.twin(name) for f in fns):
            out.append((name, backend))
    return out


ENTRIES = _entries()


def test_the_table_is_complete():
    names = set(reference.KERNELS) | set(reference.PHASES) | set(_dispatch.FUSED)
    for backend in CPU:
        have = {n for n, b in _dispatch.table_entries() if b == backend}
        assert have == names, f"{backend}: {sorted(names ^ have)}"
    # the compiled backends register every data kernel of their own
    for backend in set(CPU) - {"numpy"}:
        mine = {n for n, b in ENTRIES if b == backend}
        assert set(reference.KERNELS) <= mine, f"{backend} lacks {set(reference.KERNELS) - mine}"


@pytest.mark.parametrize("size", ["small", "big"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name,backend", ENTRIES, ids=[f"{n}-{b}" for n, b in ENTRIES])
def test_entry_matches_its_twin(name, backend, dtype, size):
    fns = _dispatch.entry(name, backend)
    n = check_entry(name, fns, _dispatch.twin(name), dtype, size)
    assert n >= 2, f"{name}: only {n} cases"
