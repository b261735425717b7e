"""Memory under repetition: RSS stays flat over 10^5 calls of every op and 10^4 training steps.

Every public function (forward and backward, fresh outputs and ``out=``, training with
running statistics and the cumulative-average count) is called ``--calls`` times on every
backend, and a small fastnorm.nn model (Linear -> BatchNorm1d -> ReLU -> Linear -> LayerNorm
-> Linear, cross-entropy, Adam) takes ``--steps`` steps on the tape. The resident set size
is read (psutil) after a warm-up of ``--warmup`` of the calls and then at ten points; a
row passes when no later reading is more than ``--limit`` (5%) above the reading after
warm-up. A control row leaks 256 bytes per call on purpose: over 10^5 calls that is 26 MB,
well above 5% of the ~160 MB process, and it is reported as detected (or not, at a
smaller count).

    python bench/bench_memory.py                 # 10^5 calls per op, 10^4 steps
    python bench/bench_memory.py --calls 3000 --steps 300 --warmup 0.2   # CI's short run
"""
import argparse
import gc
import sys
import time

import numpy as np
import psutil

import fastnorm as fn
from fastnorm import nn, optim


def _ops(rng, backend):
    """(name, callable) for every op variant: small shapes, so 10^5 calls take seconds."""
    x4 = rng.normal(3, 2, (8, 6, 5, 5)).astype(np.float32)      # N, C, H, W
    xcl = np.ascontiguousarray(x4.transpose(0, 2, 3, 1))         # channels-last
    xr = rng.normal(3, 2, (16, 64)).astype(np.float32)           # rows
    w6, b6 = np.ones(6, np.float32), np.zeros(6, np.float32)
    w64, b64 = np.ones(64, np.float32), np.zeros(64, np.float32)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    nbt = np.zeros((), np.int64)
    out4, outcl, outr = np.empty_like(x4), np.empty_like(xcl), np.empty_like(xr)
    g4, gr = np.ones_like(x4), np.ones_like(xr)
    _, bm, br = fn.batch_norm(x4, None, None, w6, b6, True, return_stats=True)
    _, lm, lr = fn.layer_norm(xr, 64, w64, b64, return_stats=True)
    _, rr = fn.rms_norm(xr, 64, w64, return_stats=True)
    _, gm, gr_ = fn.group_norm(x4, 3, w6, b6, return_stats=True)
    _, im, ir = fn.instance_norm(x4, weight=w6, bias=b6, return_stats=True)
    b = dict(backend=backend)
    return [
        ("batch_norm train", lambda: fn.batch_norm(x4, rm, rv, w6, b6, True, **b)),
        ("batch_norm train out=", lambda: fn.batch_norm(x4, rm, rv, w6, b6, True, out=out4,
                                                        **b)),
        ("batch_norm cumulative", lambda: fn.batch_norm(x4, rm, rv, w6, b6, True, None,
                                                        num_batches_tracked=nbt, **b)),
        ("batch_norm eval, channels-last", lambda: fn.batch_norm(xcl, rm, rv, w6, b6, False,
                                                                 axis=-1, **b)),
        ("batch_norm eval out=", lambda: fn.batch_norm(xcl, rm, rv, w6, b6, False, axis=-1,
                                                       out=outcl, **b)),
        ("batch_norm_backward", lambda: fn.batch_norm_backward(g4, x4, bm, br, w6, **b)),
        ("layer_norm", lambda: fn.layer_norm(xr, 64, w64, b64, **b)),
        ("layer_norm out=", lambda: fn.layer_norm(xr, 64, w64, b64, out=outr, **b)),
        ("layer_norm stats", lambda: fn.layer_norm(xr, 64, w64, b64, return_stats=True, **b)),
        ("layer_norm_backward", lambda: fn.layer_norm_backward(gr, xr, lm, lr, w64, **b)),
        ("rms_norm", lambda: fn.rms_norm(xr, 64, w64, **b)),
        ("rms_norm out=", lambda: fn.rms_norm(xr, 64, w64, out=outr, **b)),
        ("rms_norm_backward", lambda: fn.rms_norm_backward(gr, xr, rr, w64, **b)),
        ("group_norm", lambda: fn.group_norm(x4, 3, w6, b6, **b)),
        ("group_norm out=, channels-last", lambda: fn.group_norm(xcl, 3, w6, b6, axis=-1,
                                                                 out=outcl, **b)),
        ("group_norm_backward", lambda: fn.group_norm_backward(g4, x4, gm, gr_, w6,
                                                               num_groups=3, **b)),
        ("instance_norm", lambda: fn.instance_norm(x4, rm, rv, w6, b6, **b)),
        ("instance_norm out=", lambda: fn.instance_norm(x4, weight=w6, bias=b6, out=out4,
                                                        **b)),
        ("instance_norm_backward", lambda: fn.instance_norm_backward(g4, x4, im, ir, w6,
                                                                     **b)),
    ]


def rss():
    return psutil.Process().memory_info().rss


def measure(step, n, warmup):
    """Run ``step`` n times; RSS (bytes) after the warm-up and at 10 later points."""
    k0 = max(1, int(n * warmup))
    for _ in range(k0):
        step()
    gc.collect()
    base, readings = rss(), []
    t0 = time.perf_counter()
    marks = {k0 + (n - k0) * j // 10 for j in range(1, 11)}
    for i in range(k0, n):
        step()
        if i + 1 in marks:
            readings.append(rss())
    return base, readings, time.perf_counter() - t0


def model_step(rng):
    """One training step of a small model on the tape, as a closure."""
    net = nn.Sequential(nn.Linear(32, 64, rng=rng), nn.BatchNorm1d(64), nn.ReLU(),
                        nn.Linear(64, 64, rng=rng), nn.LayerNorm(64), nn.ReLU(),
                        nn.Linear(64, 10, rng=rng))
    opt = optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    x = rng.standard_normal((32, 32)).astype(np.float32)
    y = rng.integers(0, 10, 32)

    def step():
        opt.zero_grad()
        loss = loss_fn(net(fn.Tensor(x)), y)
        loss.backward()
        opt.step()
        return loss
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100_000, help="calls of each op")
    ap.add_argument("--steps", type=int, default=10_000, help="training steps")
    ap.add_argument("--warmup", type=float, default=0.1, help="share of calls before the base")
    ap.add_argument("--limit", type=float, default=0.05, help="allowed growth after warm-up")
    ap.add_argument("--backends", default=None, help="comma-separated (default: all)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    backends = args.backends.split(",") if args.backends else fn.available_backends()
    print(f"fastnorm {fn.__version__}, numpy {np.__version__}, backends {backends}, "
          f"{fn.get_num_threads()} threads; RSS at start {rss() / 2**20:.1f} MiB")
    print(f"{'case':44s} {'calls':>7s} {'us/call':>8s} {'RSS base MiB':>12s} "
          f"{'end MiB':>8s} {'max growth':>10s}  verdict")
    failed = []
    rows = [(f"{name} [{be}]", f, args.calls) for be in backends for name, f in
            _ops(rng, be)]
    rows.append(("tape training step (Linear-BN-LN-Adam)", model_step(rng), args.steps))
    for name, f, n in rows:
        base, readings, secs = measure(f, n, args.warmup)
        growth = max(readings) / base - 1.0
        ok = growth <= args.limit
        if not ok:
            failed.append(name)
        calls = n - max(1, int(n * args.warmup))
        print(f"{name:44s} {n:7d} {secs / calls * 1e6:8.1f} {base / 2**20:12.1f} "
              f"{readings[-1] / 2**20:8.1f} {growth * 100:9.2f}%  {'ok' if ok else 'GREW'}",
              flush=True)
    # control: a deliberate leak of 256 bytes per call, to show what this count detects
    kept = []
    base, readings, _ = measure(lambda: kept.append(np.empty(256, np.uint8)), args.calls,
                                args.warmup)
    growth = max(readings) / base - 1.0
    print(f"{'control: leaks 256 B per call':44s} {args.calls:7d} {'':8s} "
          f"{base / 2**20:12.1f} {readings[-1] / 2**20:8.1f} {growth * 100:9.2f}%  "
          f"{'detected' if growth > args.limit else 'below the limit at this count'}")
    kept.clear()
    print(f"RSS at end {rss() / 2**20:.1f} MiB; "
          + (f"{len(failed)} rows grew more than {args.limit:.0%}: {failed}" if failed else
             f"every row flat within {args.limit:.0%} after warm-up"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
