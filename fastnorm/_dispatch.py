"""The one dispatch table {(kernel, backend): (serial, parallel)}, filled lazily.

A backend is a module exposing ``KERNELS = {name: (serial, parallel)}`` with the names and
signatures of ``fastnorm.reference`` (its docstring is the contract; the names are the
constants there). It may also expose ``PHASES`` (the per-unit phase kernels: a CPU backend
that does not gets the NumPy twins, which a device backend must replace) and ``ARRAYS`` (the
array adapter that allocates, lays out and moves its arrays; the host adapter of
``fastnorm._arrays`` by default). Registering those is all a backend does: the norm bodies
(``fastnorm._norms``) are written once against this table. Nothing is imported until a
kernel is first asked for, so ``import fastnorm`` stays free of numba and of compiled code.

Choice of backend, first match wins: the ``backend=`` argument of a call, the innermost
``use_backend(...)`` block (a context variable: per thread and per asyncio task), the
``FASTNORM_BACKEND`` environment variable, else the fastest available backend.

"Fastest" is a fixed preference order, ``BACKENDS``, backed by measurement rather than
measured at import (a timing at import would cost the start-up budget and vary with load).
On the 2-core EPYC box (bench/bench_latency.py, python -m fastnorm bench): Cython starts in
~0.15 s with no JIT (Numba: ~1 s from its cache, 5-10 s to compile), is faster on one-row
calls (bench_latency, 2026-12-04: LN (1, 768) 2.2 vs 2.9 us; eval BN (1, 1024) 2.7 vs
4.2 us) and as fast as Numba or faster on the large cases (explicit vectors, non-temporal
stores; see README, Backends). NumPy is last: always there.
"""
import contextlib
import contextvars
import importlib
import os
import threading
import warnings

from . import _arrays, _checks, _threads, reference

BACKENDS = ("cython", "numba", "numpy")          # preference order, fastest first
_MODULES = {"numba": "fastnorm._numba", "cython": "fastnorm_cy", "cuda": "fastnorm._cuda"}
ALL = BACKENDS + ("cuda",)

# Below this many elements a parallel launch costs more than it saves. Measured with
# bench/bench_switch.py, 2 threads vs serial, this machine (2026-11-22): at 16 K elements
# parallel is 0.5-1.0x (a launch costs 2-4 us), at 32 K the rows kernels gain 1.1-1.6x on both
# backends and Cython's channels_moments breaks even (Numba's: 0.74x), from 64 K every kernel
# gains 1.2-1.8x.
PARALLEL_MIN = 1 << 15

_TABLE = {}
_NATIVE = {}          # (kernel, backend) -> the entries api's one-call paths take (below)
_ARRAYS = {}          # backend -> its array adapter
_MODS = {}
_FAILED = {}
_LOADED = set()       # backends whose kernels are in _TABLE
_DEVICE = set()       # loaded backends whose arrays are not host ndarrays
_default = [None]     # first loadable backend of BACKENDS, once found
_lock = threading.Lock()
_current = contextvars.ContextVar("fastnorm_backend", default=None)
MAX_THREADS = os.cpu_count() or 1
_num_threads = [MAX_THREADS]
_forked = [False]
WATCH = _threads.Watch()   # parallel kernels step back while other pools hold the cores

# os.environ.get costs 0.2-0.5 us (key encoding, a KeyError when unset): a quarter of a
# one-row call. Read CPython's backing dict, which os.environ[...] = / del / putenv-through-
# os.environ keep current; fall back to the public call elsewhere.
try:
    _ENV, _ENV_KEY = os.environ._data, os.environ.encodekey("FASTNORM_BACKEND")
    _decode = os.environ.decodevalue
except AttributeError:  # pragma: no cover - not CPython
    _ENV = None


def _env_backend():
    if _ENV is None:  # pragma: no cover
        return os.environ.get("FASTNORM_BACKEND")
    v = _ENV.get(_ENV_KEY)
    return None if v is None else _decode(v)


def _after_fork_in_child():
    # OpenMP runtimes (numba's omp layer, GNU libgomp) do not survive fork(): a child must
    # stay on serial kernels (ARCHITECTURE.md §3). tests/test_cython.py forks after parallel calls.
    _forked[0] = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _composed_channels_eval(scale_shift, finalize=reference.finalize, arrays=_arrays.HOST):
    """channels_eval from a backend's channels_scale_shift and finalize kernels."""
    def channels_eval(x, mean, var, weight, bias, eps, y):
        # IN x (..., C) C-contiguous, mean/var/weight/bias (C,) (weight/bias may be None)
        # OUT y (x's shape) = (x - mean) * (rstd * weight) + bias, rstd = 1/sqrt(var + eps)
        C = x.shape[x.ndim - 1]
        Q = x.size // C if C else 0
        coefs = [arrays.empty((1, C)) for _ in range(5)]
        finalize(arrays.vector(mean, "mean", (C,)).reshape(1, C),
                 arrays.vector(var, "var", (C,)).reshape(1, C), 1.0, eps, False, weight, bias,
                 1, *coefs)
        scale_shift(x.reshape(1, Q, C), *coefs[:3], y.reshape(1, Q, C))
    return channels_eval


# Fused kernels (reference.FUSED): a backend may provide them (fastnorm_cy and
# fastnorm._numba do); otherwise they are composed from its contract kernels. channels_eval
# makes a one-row eval BatchNorm one call: no NumPy temporaries for rstd/alpha/beta.
FUSED = {reference.CHANNELS_EVAL: (reference.SCALE_SHIFT["channels"], _composed_channels_eval)}


class BackendUnavailable(ValueError, ImportError):
    """A backend that does not load here: a bad ``backend=`` value (ValueError) whose cause
    is usually a missing package or device (ImportError)."""


def _load(backend):
    """Import a backend's module and register its kernels; returns False if unavailable."""
    if backend in _LOADED:
        return True
    if backend in _FAILED:
        return False
    with _lock:
        if backend in _LOADED:
            return True
        if backend == "numpy":
            mod = reference
            kernels = {name: (getattr(reference, name),) * 2
                       for name in reference.KERNELS + reference.FUSED}
        elif backend in _MODULES:
            try:
                with _threads.configured():    # libgomp's spin-wait (see fastnorm._threads)
                    mod = importlib.import_module(_MODULES[backend])
                    if not _forked[0] and hasattr(mod, "start_threads"):
                        mod.start_threads()   # a runtime that loads lazily: now, inside
                kernels = mod.KERNELS
            except ImportError as e:  # not built / not installed
                _FAILED[backend] = str(e)
                return False
            why = getattr(mod, "unavailable", lambda: None)()
            if why:                   # installed, but e.g. no device to run on
                _FAILED[backend] = why
                return False
            _MODS[backend] = mod
        else:
            raise ValueError(f"backend must be one of {ALL}, got {backend!r}")
        if mod is reference:
            register(backend, kernels)
        else:
            register(backend, kernels, getattr(mod, "PHASES", None), getattr(mod, "ARRAYS", None),
                     getattr(mod, "NATIVE", None))
    return True


def register(backend, kernels, phases=None, arrays=None, native=None):
    """Put a backend's kernels into the table: ``kernels`` (every name of
    ``reference.KERNELS``, optionally fused ones of ``FUSED``) and ``phases`` (the names of
    ``reference.PHASES``; default: the NumPy twins, which serve host arrays only), each
    ``{name: (serial, parallel)}``; ``arrays`` is the backend's array adapter (default: the
    host's). ``native`` (optional, same form) holds entries for api's one-call paths
    (:func:`fast_kernel`), which call them with 2-D C-contiguous aligned float32/float64
    arrays only: a backend whose ``kernels`` adapt other inputs (Numba's half-precision bit
    views) registers its bare kernels there, saving the adapter's call (0.1 us of 2.5)."""
    missing = [n for n in reference.KERNELS if n not in kernels]
    if missing:
        raise ValueError(f"backend {backend!r} lacks the kernels {missing}")
    twins = {name: (getattr(reference, name),) * 2 for name in reference.PHASES}
    for name, fns in {**twins, **(phases or {}), **kernels}.items():
        _TABLE[(name, backend)] = _NATIVE[(name, backend)] = fns
    _ARRAYS[backend] = arrays = arrays or _arrays.HOST
    for name, (base, compose) in FUSED.items():
        if name not in kernels:
            fin = _TABLE[(reference.FINALIZE, backend)][0]
            _TABLE[(name, backend)] = _NATIVE[(name, backend)] = tuple(
                compose(k, fin, arrays) for k in kernels[base])
    for name, fns in (native or {}).items():
        _NATIVE[(name, backend)] = fns
    if arrays is not _arrays.HOST:           # device arrays never take the one-call paths
        _DEVICE.add(backend)
        for key in [k for k in _NATIVE if k[1] == backend]:
            del _NATIVE[key]
    _LOADED.add(backend)


def available():
    """Names of the CPU backends that load here, fastest first."""
    return [b for b in BACKENDS if _load(b)]


def default_backend():
    """FASTNORM_BACKEND if set and available (else a warning), else the first of BACKENDS
    that loads."""
    env = _env_backend()
    if env:
        if env in _LOADED:
            return env
        if env not in ALL:
            warnings.warn(f"FASTNORM_BACKEND={env!r} is not one of {BACKENDS}; "
                          "using the default", RuntimeWarning)
        elif _load(env):
            return env
        else:
            warnings.warn(f"FASTNORM_BACKEND={env!r} is not available "
                          f"({_FAILED.get(env)}); using the default", RuntimeWarning)
    if _default[0] is None:
        _default[0] = next(b for b in BACKENDS if _load(b))  # numpy always loads
    return _default[0]


def resolve(backend=None):
    """The backend a call runs on (see the module docstring); ValueError if unavailable."""
    if backend is None:
        backend = _current.get() or default_backend()
    if backend in _LOADED or _load(backend):
        return backend
    raise BackendUnavailable(f"backend {backend!r} is not available: {_FAILED[backend]}")


def select(backend, *arrays):
    """(backend, its array adapter) for a call on ``arrays``: device arrays (anything with
    ``__cuda_array_interface__``) go to "cuda", everything else as :func:`resolve` says."""
    if any(hasattr(a, "__cuda_array_interface__") for a in arrays):
        backend = "cuda"
    name = resolve(backend)
    return name, _ARRAYS[name]


def handler(*args):
    """The ``__fastnorm_function__(func, arguments)`` of the first argument whose type
    defines one, else None (``arguments``: the call's arguments by name). A type takes over
    fastnorm's functions this way, as NumPy's ``__array_function__`` (NEP 18) lets it take
    over NumPy's: ``fastnorm.Tensor`` records the call on the tape; no fastnorm module
    imports such a type."""
    for a in args:
        h = getattr(type(a), "__fastnorm_function__", None)
        if h is not None:
            return h
    return None


def failed():
    """{backend: why it did not load} for the backends tried so far."""
    return dict(_FAILED)


def modules():
    """{backend: its module} for the compiled backends loaded so far."""
    return dict(_MODS)


def forked():
    """True in a child forked from this process (parallel kernels are off there)."""
    return _forked[0]


def table_entries():
    """The table's keys, ``(kernel, backend)``, of the backends loaded so far."""
    return sorted(_TABLE)


def twin(name):
    """The NumPy twin of kernel ``name``: the function every backend's entry is held to
    (``reference.<name>``)."""
    return getattr(reference, name)


def entry(name, backend):
    """The table's entry for kernel ``name`` on a loaded ``backend``: (serial, parallel)."""
    return _TABLE[(name, backend)]


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
    """Set the number of threads the parallel kernels of every backend use.

    Parameters
    ----------
    n : int >= 1
        Default and upper limit: ``os.cpu_count()`` (more threads than cores only slow
        memory-bound kernels; a thread count in the thousands exhausted the stack of the
        OpenMP runtime). Inputs below ``PARALLEL_MIN`` elements always run on
        the calling thread. Results are the same bits for every ``n`` (the work is split by
        shape, never by thread count). Numba caps ``n`` at ``NUMBA_NUM_THREADS``.

    Examples
    --------
    >>> import fastnorm as fn
    >>> n = fn.get_num_threads()
    >>> fn.set_num_threads(1)
    >>> fn.get_num_threads()
    1
    >>> fn.set_num_threads(n)
    """
    _num_threads[0] = _checks.integer(n, "n", 1, MAX_THREADS)


def get_num_threads():
    """The thread count set by :func:`set_num_threads` (default ``os.cpu_count()``)."""
    return _num_threads[0]


# Backends whose kernels check every argument (type, dtype, shape, contiguity, alignment)
# and raise TypeError/ValueError before touching memory.
CHECKING = frozenset({"cython"})


def fast_kernel(name, backend, work):
    """resolve(backend) + kernel(name, ...) in one call, for the one-call fast paths:
    (kernel, whether it checks its arguments itself); (None, False) when the call belongs
    to a device backend (the general path routes it)."""
    if backend is None:
        backend = _current.get() or default_backend()
    fns = _NATIVE.get((name, backend))        # host backends only (a 2 us call: no detours)
    if fns is None:
        if backend == "cuda" or backend in _DEVICE:
            return None, False
        resolve(backend)  # loads it, or raises ValueError
        fns = _NATIVE[(name, backend)]
    serial, parallel = fns
    if work < PARALLEL_MIN or _num_threads[0] == 1 or _forked[0]:
        return serial, backend in CHECKING
    return kernel(name, backend, work, _NATIVE), backend in CHECKING


def kernel(name, backend, work, table=_TABLE):
    """The function to call for kernel ``name`` on ``backend`` for ``work`` elements."""
    serial, parallel = table[(name, backend)]
    n = _num_threads[0]
    if work < PARALLEL_MIN or n == 1 or _forked[0] or serial is parallel:
        return serial
    if backend in _DEVICE:
        return parallel
    if WATCH.busy():          # another pool's threads hold the cores (fastnorm._threads)
        return serial
    mod = _MODS.get(backend)  # compiled CPU backends keep their own (per-thread) count
    if mod is not None and mod.get_num_threads() != n:
        mod.set_num_threads(n)
    return WATCH.timed(parallel, (name, backend), work)
