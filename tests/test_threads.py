"""Threads that cooperate with other pools (fastnorm._threads): libgomp's spin count set only
while libgomp loads, the user's policy kept, and the watch that runs parallel kernels serially
while the cores are held (driven by a fake clock here: no timing in tests)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastnorm as fn
from fastnorm import _dispatch, _threads
from conftest import COMPILED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    full.update(env, PYTHONPATH=os.pathsep.join([ROOT] + sys.path))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()


LOAD = """
    import os, numpy as np, fastnorm as fn
    from fastnorm import _threads
    gomp = lambda: any("libgomp" in l for l in open("/proc/self/maps"))
    before = gomp()
    fn.layer_norm(np.ones((2, 3)), 3, backend={backend!r})
    print(before, gomp(), "GOMP_SPINCOUNT" in os.environ, os.environ.get("GOMP_SPINCOUNT"))
    print(_threads.STATE["policy"])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("backend", COMPILED)
def test_spin_count_is_set_only_while_libgomp_loads(backend):
    (flags, policy) = _run(LOAD.format(backend=backend))
    before, after, left, _ = flags.split()
    if after == "False":
        pytest.skip(f"the {backend} backend runs without libgomp here")
    assert before == "False"                 # libgomp came with the backend...
    assert left == "False"                   # ...and the variable is gone again
    assert policy == f"GOMP_SPINCOUNT={_threads.SPINCOUNT} (set while libgomp loaded)"


@pytest.mark.parametrize("var,value", [("GOMP_SPINCOUNT", "123"), ("OMP_WAIT_POLICY", "active")])
def test_the_users_policy_wins(var, value):
    backend = COMPILED[0] if COMPILED else "numpy"
    (flags, policy) = _run(LOAD.format(backend=backend), **{var: value})
    _, _, left, val = flags.split()
    if var == "GOMP_SPINCOUNT":
        assert (left, val) == ("True", value)        # the user's value, untouched
    else:
        assert left == "False"                       # nothing added beside theirs
    if COMPILED:
        assert policy == f"user: {{'{var}': '{value}'}}"


def test_info_reports_the_policy_and_contended_calls():
    from fastnorm import _info
    fn.layer_norm(np.ones((2, 3)), 3)
    info = _info.collect()
    assert isinstance(info["openmp_spin"], str) and info["openmp_spin"]
    assert info["contended_calls"] == _dispatch.WATCH.contended


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_watch_backs_off_on_a_slow_call_and_recovers():
    clock = Clock()
    w = _threads.Watch(clock)
    key, n = ("rows_fwd", "cython"), 1 << 16
    w.observe(key, n, 1e-4)                  # first call: sets the best rate
    assert not w.busy()
    w.observe(key, n, 2.9e-4)                # slower, but within SLOW: not contended
    assert not w.busy() and w.contended == 0
    w.observe(key, n, 5e-4)                  # 5x the best: contended
    assert w.busy() and w.contended == 1
    clock.t += w.BACKOFF * 0.99
    assert w.busy()
    clock.t += w.BACKOFF * 0.02
    assert not w.busy()
    w.observe(key, n, 5e-4)                  # the probe is slow again: twice as long
    clock.t += 1.5 * w.BACKOFF
    assert w.busy()
    clock.t += w.BACKOFF
    w.observe(key, n, 1e-4)                  # a fast probe resets the backoff
    assert w.backoff == w.BACKOFF
    for _ in range(20):
        w.observe(key, n, 1.0)
    assert w.backoff == w.MAX_BACKOFF


def test_watch_compares_within_a_size_class():
    w = _threads.Watch(Clock())
    key = ("channels_moments", "numba")
    w.observe(key, 1 << 15, 1e-5)            # small, in cache: fast per element
    w.observe(key, 1 << 24, (1 << 24) * 1e-9)   # large: 3x slower per element, other class
    assert not w.busy()


@pytest.mark.parametrize("backend", COMPILED)
def test_serial_while_busy_gives_the_same_bits(backend, monkeypatch):
    x = np.random.default_rng(0).normal(3, 2, (64, 32, 12, 12)).astype(np.float32)
    fn.set_num_threads(2)
    want = fn.batch_norm(x, None, None, training=True, backend=backend)
    clock = Clock()
    watch = _threads.Watch(clock)
    monkeypatch.setattr(_dispatch, "WATCH", watch)
    watch.serial_until = clock.t + 10
    k = _dispatch.kernel("channels_moments", backend, x.size)
    assert k is _dispatch.entry("channels_moments", backend)[0]      # the serial entry
    got = fn.batch_norm(x, None, None, training=True, backend=backend)
    assert got.tobytes() == want.tobytes()
    watch.serial_until = 0.0
    k = _dispatch.kernel("channels_moments", backend, x.size)
    assert k is not _dispatch.entry("channels_moments", backend)[0]  # timed parallel
