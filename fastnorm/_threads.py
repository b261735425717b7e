"""Threads that cooperate with the process's other thread pools.

Two parts: how long the compiled backends' OpenMP threads spin before they sleep
(:func:`configured`), and parallel kernels that step back to one thread while another pool's
threads hold the cores (:class:`Watch`).

**Spin-wait.**
GNU OpenMP (libgomp, which both the Cython extension and Numba's omp threading layer use)
keeps its idle threads spinning for ``GOMP_SPINCOUNT`` iterations after a parallel region:
300 000 by default, about 1-5 ms here. Between NumPy matrix products that spin takes the
cores OpenBLAS's threads need, and theirs take ours: on the 2-core development machine a
training-mode batch norm alternated with a 1024x512 @ 512x256 matmul cost 3-6x the two run
apart (``bench/bench_interleave.py``). Measured choices, 2 threads:

- ``GOMP_SPINCOUNT=0`` (``OMP_WAIT_POLICY=passive``): no fight (1.06-1.09x), but every
  parallel region wakes sleeping threads: LN (48, 768) 9.4 -> 60 us, BN (64, 32, 12, 12)
  124 -> 250 us back to back.
- 1 000: no fight; BN (64, 32, 12, 12) back to back 142 us (its phases' parallel regions,
  a few microseconds of Python apart, start to find the threads asleep).
- 10 000 (chosen): no fight (1.04-1.13x), back-to-back calls as fast as the default.
- 50 000: the fight is back (2.1-3.0x).

So when a compiled backend first loads, :func:`configured` sets ``GOMP_SPINCOUNT=10000`` for
the instant in which libgomp loads and reads it, then removes it again: a library that loads
its own OpenMP runtime later (torch's bundled libgomp) sees the environment the user gave
the process. Nothing is set when the user set ``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY``
(theirs wins) or when libgomp is already loaded (it read its settings then; :data:`STATE`
says which, and ``python -m fastnorm info`` prints it).
"""
import contextlib
import os
import sys
import time

SPINCOUNT = "10000"
_USER_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")

# how libgomp's spin count was settled: None until a compiled backend loads
STATE = {"policy": None}


def _libgomp_loaded():
    """True, False, or None where the process's libraries cannot be listed (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return None


@contextlib.contextmanager
def configured():
    """Around the import of a compiled backend: libgomp, if it loads inside, reads
    ``GOMP_SPINCOUNT=SPINCOUNT`` unless the user chose a policy. :data:`STATE` is settled
    by the first backend that brings libgomp (or finds it loaded, or finds the user's)."""
    if STATE["policy"] is not None:
        yield
        return
    user = {k: os.environ[k] for k in _USER_VARS if k in os.environ}
    loaded = _libgomp_loaded()
    if user or loaded or loaded is None:
        STATE["policy"] = (f"user: {user}" if user else
                           "libgomp was already loaded: its own settings" if loaded else
                           "not set (cannot tell whether libgomp is loaded)")
        yield
        return
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    try:
        yield
    finally:
        del os.environ["GOMP_SPINCOUNT"]
        if _libgomp_loaded():
            STATE["policy"] = f"GOMP_SPINCOUNT={SPINCOUNT} (set while libgomp loaded)"


class Watch:
    """Runs parallel kernels serially while the cores are busy with another pool's threads.

    OpenBLAS's idle threads (NumPy's BLAS) spin for up to ~0.1 s after each matrix product
    without yielding; a parallel region started then waits on a thread that has no core,
    and a training-mode batch norm (64, 32, 12, 12) at 2 threads took 1.75 ms instead of
    0.12 (``bench/bench_interleave.py``). On one thread the call runs on the calling thread's
    own core and is not slowed. So each parallel call is timed (two clock reads); a call
    ``SLOW`` times slower per element than the fastest seen for that kernel and size
    (within a factor of 2) marks the cores contended, and kernels run serially for
    ``backoff`` seconds: ``BACKOFF`` at first, doubled while each probe after it is slow
    again (up to ``MAX_BACKOFF``), reset by a fast one. Results do not change: the
    kernels give the same bits at any thread count. ``enabled = False`` turns it off (the
    test suite does, so that its thread-count tests always run the parallel kernels).
    """
    SLOW = 3.0
    BACKOFF = 0.02
    MAX_BACKOFF = 1.0

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.best = {}                 # (kernel key, size class) -> fastest s per element
        self.serial_until = 0.0
        self.backoff = self.BACKOFF
        self.contended = 0             # calls found slow (python -m fastnorm info)
        self.enabled = True

    def busy(self):
        """True while parallel kernels should run serially."""
        return self.enabled and self.serial_until > self.clock()

    def timed(self, fn, key, work):
        """``fn`` (a parallel kernel for ``work`` elements), timed into this watch."""
        if not self.enabled:
            return fn

        def call(*args):
            t0 = self.clock()
            out = fn(*args)
            self.observe(key, work, self.clock() - t0)
            return out
        return call

    def observe(self, key, work, seconds):
        """Account one parallel call of kernel ``key`` on ``work`` elements."""
        k = (key, work.bit_length())
        rate = seconds / work
        best = self.best.get(k)
        if best is None or rate < best:
            self.best[k] = rate
        if best is not None and rate > self.SLOW * best:
            self.contended += 1
            self.serial_until = self.clock() + self.backoff
            self.backoff = min(2 * self.backoff, self.MAX_BACKOFF)
        else:
            self.backoff = self.BACKOFF
