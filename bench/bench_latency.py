"""Per-call latency of the two one-row inference cases of issue 3, through the public API.

    python bench/bench_latency.py [--rounds 30] [--number 2000]

Cases: one LayerNorm call on a (1, 768) float32 array, ``fn.layer_norm(x, (768,))``, and one
eval-mode BatchNorm call on (1, 1024), ``fn.batch_norm(x, running_mean, running_var)``.
Implementations: fastnorm on each backend, the plain NumPy expression, and torch 2.x when
installed (``F.layer_norm`` / ``F.batch_norm`` on tensors made once). Each round times
``--number`` calls of every implementation, in rotated order; the table gives the median and
the best round in microseconds per call. The target is a median of at most 2 us.
"""
import argparse
import platform
import statistics
import time

import numpy as np

import fastnorm as fn
from fastnorm import reference


def implementations(x_ln, x_bn, rm, rv):
    """{(case, name): zero-argument callable}; every output checked against NumPy first."""
    impls = {}
    for backend in fn.available_backends():
        impls[("LN (1, 768)", f"fastnorm[{backend}]")] = (
            lambda b=backend: fn.layer_norm(x_ln, (768,), backend=b))
        impls[("BN eval (1, 1024)", f"fastnorm[{backend}]")] = (
            lambda b=backend: fn.batch_norm(x_bn, rm, rv, backend=b))

    def np_ln():
        mu = x_ln.mean(-1, keepdims=True)
        return (x_ln - mu) / np.sqrt(x_ln.var(-1, keepdims=True) + 1e-5)

    impls[("LN (1, 768)", "numpy")] = np_ln
    impls[("BN eval (1, 1024)", "numpy")] = lambda: (x_bn - rm) / np.sqrt(rv + 1e-5)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return impls
    t_ln, t_bn = torch.from_numpy(x_ln), torch.from_numpy(x_bn)
    t_rm, t_rv = torch.from_numpy(rm), torch.from_numpy(rv)
    torch_name = f"torch {torch.__version__.split('+')[0]}"
    impls[("LN (1, 768)", torch_name)] = lambda: F.layer_norm(t_ln, (768,))
    impls[("BN eval (1, 1024)", torch_name)] = lambda: F.batch_norm(t_bn, t_rm, t_rv)
    return impls


def check(impls, x_ln, x_bn, rm, rv):
    want = {"LN (1, 768)": reference.layer_norm(x_ln, (768,))[0],
            "BN eval (1, 1024)": reference.batch_norm(x_bn, rm, rv)[0]}
    for (case, name), f in impls.items():
        got = np.asarray(f(), dtype=np.float64)
        err = np.abs(got - want[case]).max()
        if not err < 1e-4:
            raise SystemExit(f"{name} on {case} is wrong: max abs error {err:.3g}")


def run(impls, rounds, number):
    samples = {k: [] for k in impls}
    keys = list(impls)
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            f = impls[k]
            t0 = time.perf_counter()
            for _ in range(number):
                f()
            samples[k].append((time.perf_counter() - t0) / number * 1e6)
    return samples


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds (default 30)")
    p.add_argument("--number", type=int, default=2000, help="calls per round (default 2000)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x_ln = rng.standard_normal((1, 768)).astype(np.float32)
    x_bn = rng.standard_normal((1, 1024)).astype(np.float32)
    rm = rng.standard_normal(1024).astype(np.float32)
    rv = rng.uniform(0.5, 2, 1024).astype(np.float32)
    impls = implementations(x_ln, x_bn, rm, rv)
    check(impls, x_ln, x_bn, rm, rv)
    samples = run(impls, args.rounds, args.number)
    print(f"# fastnorm {fn.__version__}, numpy {np.__version__}, python "
          f"{platform.python_version()}, {args.rounds} rounds x {args.number} calls")
    print("| case | implementation | median us/call | best round us/call |")
    print("|---|---|---:|---:|")
    for (case, name), s in samples.items():
        print(f"| {case} | {name} | {statistics.median(s):.2f} | {min(s):.2f} |")


if __name__ == "__main__":
    main()
