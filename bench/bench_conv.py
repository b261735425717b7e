"""fastnorm's tape conv2d and max pool against torch's CPU kernels, on the demo CNN's shapes.

    python bench/bench_conv.py [--rounds 30] [--threads 1] [--markdown FILE]

fastnorm.autograd.conv2d is im2col: a sliding_window_view of the padded input, one copy
into columns and one BLAS matmul (backward: two matmuls and a col2im of kh*kw strided adds).
torch 2.x calls its own CPU convolution (oneDNN where it applies). Cases: the two
convolutions and pools of ``python -m fastnorm demo --model cnn`` on a training batch (60)
and on the validation set (540), and one larger convolution (32x64x28x28, 3x3) for scale.
Modes: forward (no tape), forward+backward (input and weight gradients).

Each round times ``number`` calls of each implementation back to back, in alternating
order; the table gives median ms per call and the median of the per-round ratios
torch/fastnorm (< 1: torch faster), so a slow phase of a shared machine cancels out. Every
output and gradient is checked against torch's first.
"""
import argparse
import platform
import statistics
import time

import numpy as np

import fastnorm
from fastnorm import autograd as ag
from fastnorm.autograd import Tensor, no_grad

# name, op, input shape, weight shape (conv) or kernel size (pool), keyword arguments
CASES = [
    ("demo conv1, batch 60", "conv", (60, 1, 8, 8), (8, 1, 3, 3), dict(padding=1)),
    ("demo conv2, batch 60", "conv", (60, 8, 4, 4), (16, 8, 3, 3), dict(padding=1)),
    ("demo pool1, batch 60", "pool", (60, 8, 8, 8), 2, {}),
    ("demo pool2, batch 60", "pool", (60, 16, 4, 4), 2, {}),
    ("demo conv1, batch 540", "conv", (540, 1, 8, 8), (8, 1, 3, 3), dict(padding=1)),
    ("demo conv2, batch 540", "conv", (540, 8, 4, 4), (16, 8, 3, 3), dict(padding=1)),
    ("conv 32x64x28x28, 3x3", "conv", (32, 64, 28, 28), (64, 64, 3, 3), dict(padding=1)),
]


def implementations(op, xs, ws, kw, mode, torch):
    """{name: zero-argument callable} returning the output (and gradients) as ndarrays."""
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs).astype(np.float32)
    w = (rng.standard_normal(ws) * 0.2).astype(np.float32) if op == "conv" else ws
    tx, tw = torch.from_numpy(x), torch.from_numpy(w) if op == "conv" else w
    ours = (lambda a, b: ag.conv2d(a, b, **kw)) if op == "conv" else ag.max_pool2d
    theirs = (lambda a, b: F.conv2d(a, b, **kw)) if op == "conv" else F.max_pool2d
    if mode == "forward":
        def fastnorm_fwd():
            with no_grad():
                return [ours(Tensor(x), w if op == "pool" else Tensor(w)).data]

        def torch_fwd():
            with torch.no_grad():
                return [theirs(tx, tw).numpy()]
        return {"fastnorm": fastnorm_fwd, "torch": torch_fwd}
    g = rng.standard_normal(ours(Tensor(x), w).shape).astype(np.float32)
    tg = torch.from_numpy(g)

    def fastnorm_fb():
        a = Tensor(x, requires_grad=True)
        b = Tensor(w, requires_grad=True) if op == "conv" else w
        ours(a, b).backward(g)
        return [a.grad] + ([b.grad] if op == "conv" else [])

    def torch_fb():
        a = tx.detach().requires_grad_(True)
        b = tw.detach().requires_grad_(True) if op == "conv" else tw
        theirs(a, b).backward(tg)
        return [a.grad.numpy()] + ([b.grad.numpy()] if op == "conv" else [])
    return {"fastnorm": fastnorm_fb, "torch": torch_fb}


def check(impls, what):
    ours, theirs = impls["fastnorm"](), impls["torch"]()
    for a, b in zip(ours, theirs):
        err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
        if not err < 1e-4:
            raise SystemExit(f"fastnorm differs from torch on {what}: {err:.3g}")


def run(impls, rounds, number):
    """{name: [ms per call per round]} and the per-round ratios torch / fastnorm."""
    names = list(impls)
    samples = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            f = impls[n]
            f()                                  # untimed: its own cache state
            t0 = time.perf_counter()
            for _ in range(number):
                f()
            samples[n].append((time.perf_counter() - t0) / number * 1e3)
    ratios = [t / f for t, f in zip(samples["torch"], samples["fastnorm"])]
    return samples, ratios


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds (default 30)")
    p.add_argument("--threads", type=int, default=1, help="torch, BLAS and kernel threads")
    p.add_argument("--budget", type=float, default=0.05,
                   help="seconds per implementation per round (sets the calls per round)")
    p.add_argument("--markdown", help="also write the table to this file")
    args = p.parse_args(argv)
    try:
        import torch
        from threadpoolctl import threadpool_limits
    except ImportError as e:
        raise SystemExit(f"bench_conv needs torch and threadpoolctl ({e.name} is missing)")
    torch.set_num_threads(args.threads)
    fastnorm.set_num_threads(args.threads)
    lines = [f"fastnorm {fastnorm.__version__}, numpy {np.__version__}, torch "
             f"{torch.__version__}, python {platform.python_version()}, "
             f"{platform.machine()}; {args.threads} thread(s), float32, {args.rounds} rounds",
             "", "| case | mode | fastnorm ms | torch ms | torch/fastnorm |",
             "|---|---|---:|---:|---:|"]
    with threadpool_limits(limits=args.threads):
        for name, op, xs, ws, kw in CASES:
            for mode in ("forward", "forward+backward"):
                impls = implementations(op, xs, ws, kw, mode, torch)
                check(impls, f"{name} {mode}")
                t0 = time.perf_counter()
                impls["fastnorm"]()
                number = max(1, int(args.budget / max(time.perf_counter() - t0, 1e-6)))
                samples, ratios = run(impls, args.rounds, number)
                lines.append(f"| {name} | {mode} | {statistics.median(samples['fastnorm']):.3f} "
                             f"| {statistics.median(samples['torch']):.3f} "
                             f"| {statistics.median(ratios):.2f} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
