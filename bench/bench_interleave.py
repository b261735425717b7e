"""fastnorm calls interleaved with other thread pools' work, against the same calls run apart.

    python bench/bench_interleave.py [--threads 1,2] [--rounds 7] [--pairs 40]
                                     [--others blas,torch] [--no-steps]

A pipeline calls fastnorm between NumPy matrix products (OpenBLAS's threads) or torch ops
(torch's OpenMP threads). Each case times ``--pairs`` pairs (one fastnorm call, then one
call of the other library) and the same calls run apart (``--pairs`` fastnorm calls, then
``--pairs`` calls of the other, each loop after 0.2 s of running its calls untimed); the
table gives the median over rounds of ms per pair, both ways, and their ratio. A fastnorm
that never fights the other pool reads about 1.0-1.25 (the cache refill after each matmul);
fighting spin-waiting threads read 2-6.

The training steps (skip them with ``--no-steps``): one SGD step of the demo's networks (an
MLP, and a small CNN built from im2col + matmul) on synthetic digits-sized batches, at each
fastnorm thread count. The other libraries keep their default threads throughout.
"""
import argparse
import os
import platform
import statistics
import time

import numpy as np

import fastnorm as fn

SHAPE = (64, 32, 12, 12)     # N, C, H, W: 1.2 MiB of float32, the training batch
ROWS = (512, 768)            # layer / RMS norm rows: 1.5 MiB
MATMUL = ((1024, 512), (512, 256))


def ops(rng):
    """{name: zero-argument callable}: every variant's forward (training) and backward,
    channels-first and channels-last, on float32 data of the sizes above."""
    x = rng.standard_normal(SHAPE).astype(np.float32)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))            # (N, H, W, C)
    r = rng.standard_normal(ROWS).astype(np.float32)
    C = SHAPE[1]
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    wr = np.ones(ROWS[1], np.float32)
    out = {}
    for lay, a, axis in (("NCHW", x, 1), ("NHWC", xl, -1)):
        g = np.ones_like(a)
        _, m, s = fn.batch_norm(a, None, None, w, b, True, axis=axis, return_stats=True)
        out[f"batch_norm {lay}"] = (
            lambda a=a, axis=axis: fn.batch_norm(a, None, None, w, b, True, axis=axis))
        out[f"batch_norm_backward {lay}"] = (
            lambda a=a, g=g, m=m, s=s, axis=axis: fn.batch_norm_backward(g, a, m, s, w,
                                                                         axis=axis))
        _, m, s = fn.instance_norm(a, weight=w, bias=b, axis=axis, return_stats=True)
        out[f"instance_norm {lay}"] = (
            lambda a=a, axis=axis: fn.instance_norm(a, weight=w, bias=b, axis=axis))
        out[f"instance_norm_backward {lay}"] = (
            lambda a=a, g=g, m=m, s=s, axis=axis: fn.instance_norm_backward(g, a, m, s, w,
                                                                            axis=axis))
        _, m, s = fn.group_norm(a, 8, w, b, axis=axis, return_stats=True)
        out[f"group_norm {lay}"] = lambda a=a, axis=axis: fn.group_norm(a, 8, w, b, axis=axis)
        out[f"group_norm_backward {lay}"] = (
            lambda a=a, g=g, m=m, s=s, axis=axis: fn.group_norm_backward(
                g, a, m, s, w, num_groups=8, axis=axis))
    gr = np.ones_like(r)
    _, m, s = fn.layer_norm(r, ROWS[1:], wr, wr, return_stats=True)
    out["layer_norm"] = lambda: fn.layer_norm(r, ROWS[1:], wr, wr)
    out["layer_norm_backward"] = lambda: fn.layer_norm_backward(gr, r, m, s, wr)
    _, s = fn.rms_norm(r, ROWS[1:], wr, return_stats=True)
    out["rms_norm"] = lambda: fn.rms_norm(r, ROWS[1:], wr)
    out["rms_norm_backward"] = lambda: fn.rms_norm_backward(gr, r, s, wr)
    return out


def others(rng, names):
    """{name: zero-argument callable} of the other libraries' work, those installed."""
    a = rng.standard_normal(MATMUL[0]).astype(np.float32)
    b = rng.standard_normal(MATMUL[1]).astype(np.float32)
    out = {}
    if "blas" in names:
        out["numpy matmul"] = lambda: a @ b
    if "torch" in names:
        try:
            import torch
        except ImportError:
            print("# torch is not installed: no torch rows")
        else:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            out[f"torch {torch.__version__.split('+')[0]} mm"] = lambda: torch.mm(ta, tb)
    return out


def _loop(fns, pairs, warm):
    """ms per round of ``fns`` over ``pairs`` rounds, after ``warm`` seconds of running
    them untimed."""
    end = time.perf_counter() + warm
    while time.perf_counter() < end:
        for h in fns:
            h()
    t0 = time.perf_counter()
    for _ in range(pairs):
        for h in fns:
            h()
    return (time.perf_counter() - t0) / pairs * 1e3


def pair_times(f, g, pairs, rounds, warm=0.2):
    """(ms per pair interleaved, ms per pair apart): medians over ``rounds``. Each loop is
    timed after ``warm`` seconds of running its calls untimed: OpenBLAS's idle threads spin
    for up to ~0.1 s after its last call (fastnorm calls right after matmuls are not yet
    "apart"), and a loop after a sleep measures the cores waking up."""
    inter, apart = [], []
    for _ in range(rounds):
        inter.append(_loop((f, g), pairs, warm))
        apart.append(_loop((f,), pairs, warm) + _loop((g,), pairs, warm))
    return statistics.median(inter), statistics.median(apart)


def training_steps(rng, rounds, steps=20):
    """{network: ms per SGD step (median over rounds)} of the demo's MLP and CNN."""
    from fastnorm import demo, nn
    from fastnorm.optim import SGD
    x = rng.uniform(0, 1, (64, 64)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    nets = {"MLP 64-100x3-10 + BN": (demo.build_mlp(64, 100, 10, "relu", True, 0), x),
            "CNN im2col + BN": (demo.build_cnn(100, True, 0), x.reshape(64, 1, 8, 8))}
    loss_fn = nn.CrossEntropyLoss()
    out = {}
    for name, (net, xb) in nets.items():
        opt = SGD(net.parameters(), lr=0.01)

        def step():
            opt.zero_grad()
            loss_fn(net(xb), y).backward()
            opt.step()
        step()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - t0) / steps * 1e3)
        out[name] = statistics.median(times)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="fastnorm thread counts (default 1,2)")
    p.add_argument("--rounds", type=int, default=7, help="rounds per case (default 7)")
    p.add_argument("--pairs", type=int, default=40, help="pairs per round (default 40)")
    p.add_argument("--others", default="blas,torch",
                   help="the other libraries' work: blas (numpy matmul), torch (torch.mm)")
    p.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    p.add_argument("--no-steps", action="store_true", help="skip the training steps")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    rng = np.random.default_rng(0)
    our = ops(rng)
    if args.ops:
        our = {k: v for k, v in our.items() if k.split()[0] in args.ops.split(",")}
    other = others(rng, args.others.split(","))
    policy = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
                                         "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
              if k in os.environ}
    print(f"# fastnorm {fn.__version__} ({fn.available_backends()[0]}), numpy {np.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} cores, environment "
          f"{policy or 'default'}; {args.rounds} rounds x {args.pairs} pairs, medians")
    print("| fastnorm op | other | fastnorm threads | ms/pair interleaved | ms/pair apart "
          "| interleaved / apart |")
    print("|---|---|---:|---:|---:|---:|")
    n0 = fn.get_num_threads()
    try:
        for t in threads:
            fn.set_num_threads(t)
            for oname, g in other.items():
                for name, f in our.items():
                    inter, apart = pair_times(f, g, args.pairs, args.rounds)
                    print(f"| {name} | {oname} | {t} | {inter:.3f} | {apart:.3f} "
                          f"| {inter / apart:.2f} |", flush=True)
        if not args.no_steps:
            print("\n| network | fastnorm threads | ms per SGD step (batch 64) |")
            print("|---|---:|---:|")
            for t in threads:
                fn.set_num_threads(t)
                for name, ms in training_steps(rng, args.rounds).items():
                    print(f"| {name} | {t} | {ms:.2f} |", flush=True)
    finally:
        fn.set_num_threads(n0)


if __name__ == "__main__":
    main()
