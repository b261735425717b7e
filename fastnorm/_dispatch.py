"""The one dispatch table {(kernel, backend): (serial, parallel)}, filled lazily.

A backend is a module exposing ``KERNELS = {name: (serial, parallel)}`` with the signatures
documented in ``fastnorm.reference``. Nothing is imported until a kernel is first asked for,
so ``import fastnorm`` stays free of numba and of compiled code.

Choice of backend, first match wins: the ``backend=`` argument of a call, the innermost
``use_backend(...)`` block (a context variable: per thread and per asyncio task), the
``FASTNORM_BACKEND`` environment variable, else the fastest available (cython, numba, numpy).
"""
import contextlib
import contextvars
import importlib
import os
import threading
import warnings

from . import reference

BACKENDS = ("cython", "numba", "numpy")          # fastest first (see bench/ and README)
_MODULES = {"numba": "fastnorm._numba", "cython": "fastnorm_cy", "cuda": "fastnorm._cuda"}

# Below this many elements a parallel launch costs more than it saves (measured with
# bench/bench_switch.py: ~4 us per omp launch vs ~0.1 ns/element per extra core).
PARALLEL_MIN = 1 << 15

_TABLE = {}
_MODS = {}
_FAILED = {}
_lock = threading.Lock()
_current = contextvars.ContextVar("fastnorm_backend", default=None)
_num_threads = [os.cpu_count() or 1]
_forked = [False]


def _after_fork_in_child():
    # OpenMP runtimes (numba's omp layer, GNU libgomp) do not survive fork(): a child must
    # stay on serial kernels (DESIGN.md §4).
    _forked[0] = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _load(backend):
    """Import a backend's module and register its kernels; returns False if unavailable."""
    if backend in _FAILED:
        return False
    if any(k[1] == backend for k in _TABLE):
        return True
    with _lock:
        if backend == "numpy":
            kernels = {name: (getattr(reference, name),) * 2 for name in reference.KERNELS}
        elif backend in _MODULES:
            try:
                _MODS[backend] = importlib.import_module(_MODULES[backend])
                kernels = _MODS[backend].KERNELS
            except ImportError as e:  # not built / not installed
                _FAILED[backend] = str(e)
                return False
        else:
            raise ValueError(f"backend must be one of {BACKENDS + ('cuda',)}, got {backend!r}")
        for name, fns in kernels.items():
            _TABLE[(name, backend)] = fns
    return True


def available():
    """Names of the CPU backends that load here, fastest first."""
    return [b for b in BACKENDS if _load(b)]


def default_backend():
    env = os.environ.get("FASTNORM_BACKEND")
    if env:
        if not _load(env):
            warnings.warn(f"FASTNORM_BACKEND={env!r} is not available "
                          f"({_FAILED.get(env)}); using the default", RuntimeWarning)
        else:
            return env
    for b in BACKENDS:
        if _load(b):
            return b
    raise RuntimeError("no fastnorm backend could be loaded")  # numpy always loads


def resolve(backend=None):
    backend = backend or _current.get() or default_backend()
    if not _load(backend):
        raise ValueError(f"backend {backend!r} is not available: {_FAILED[backend]}")
    return backend


@contextlib.contextmanager
def use_backend(name):
    """Run the enclosed calls on backend ``name`` ("cython", "numba" or "numpy").

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> with fn.use_backend("numpy"):
    ...     y = fn.layer_norm(np.ones((2, 3)), (3,))
    """
    resolve(name)
    token = _current.set(name)
    try:
        yield name
    finally:
        _current.reset(token)


def set_num_threads(n):
    """Threads used by the parallel kernels of every backend (default: all cores)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _num_threads[0] = n


def get_num_threads():
    return _num_threads[0]


def kernel(name, backend, work):
    """The function to call for kernel ``name`` on ``backend`` for ``work`` elements."""
    serial, parallel = _TABLE[(name, backend)]
    n = _num_threads[0]
    if work < PARALLEL_MIN or n == 1 or _forked[0]:
        return serial
    mod = _MODS.get(backend)  # compiled backends keep their own (per-thread) count
    if mod is not None and mod.get_num_threads() != n:
        mod.set_num_threads(n)
    return parallel
