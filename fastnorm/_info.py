"""python -m fastnorm info: what resolved on this machine.

Versions, the backends that load (and why the others do not), the default and how it was
chosen, the thread count, the Cython build (SIMD clone the CPU runs, compiler, OpenMP),
Numba's threading layer (initialized by one small parallel call, so it names the real one),
how libgomp's spin-wait was set, and how many parallel calls found the cores held by another
thread pool (``fastnorm._threads``).
"""
import os
import platform
import sys

import numpy as np

from . import __version__, _dispatch, _threads


def add_arguments(parser):
    pass


def collect():
    """A dict of versions, backends and threads (also written into bench --json)."""
    info = {
        "fastnorm": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": _dispatch.get_num_threads(),
        "backends": _dispatch.available(),
        "default_backend": _dispatch.default_backend(),
        "FASTNORM_BACKEND": os.environ.get("FASTNORM_BACKEND", "(unset)"),
        "unavailable": _dispatch.failed(),
    }
    mods = _dispatch.modules()
    if "numba" in mods and not _dispatch.forked():
        _start_numba_threads()
    for name, mod in mods.items():
        if hasattr(mod, "info"):
            info[name] = mod.info()
    info["openmp_spin"] = _threads.STATE["policy"] or "no OpenMP runtime loaded yet"
    info["contended_calls"] = _dispatch.WATCH.contended   # run serially (fastnorm._threads)
    return info


def _start_numba_threads():
    """One parallel Numba call, so numba.threading_layer() names the layer in use."""
    kernel = _dispatch.entry("rows_moments", "numba")[1]
    x = np.zeros((4, 4))
    kernel(x, np.empty(4), np.empty(4))


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args):
    for key, value in collect().items():
        if isinstance(value, dict):
            for k, v in value.items():
                print(f"{key + '.' + k:24s} {v}")
        else:
            print(f"{key:24s} {value}")
