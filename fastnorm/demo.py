"""python -m fastnorm demo: the batch-norm paper's MNIST experiment on scikit-learn's digits.

Ioffe & Szegedy (2015), section 4.1, train the same small fully connected network with and
without batch normalization and compare validation accuracy against training step; section
4.2.2 adds higher learning rates (BN-x5, BN-x30) and a sigmoid network with and without BN.
This demo runs those six variants on the 8x8 digits that scikit-learn ships (1797 images,
10 classes), with fastnorm's own layers, tape and SGD:

    a  ReLU, no BN             base lr          d  sigmoid + BN        base lr
    b  ReLU + BN               base lr          e  sigmoid, no BN      base lr
    c  ReLU + BN, 5x and 30x the base lr

Every run starts from the same initial weights and sees the same mini-batches. It prints
validation accuracy against step, the number of steps each run needs to reach run (a)'s
final accuracy, and writes a PNG of the curves. Needs the ``[demo]`` extra (scikit-learn,
matplotlib, tqdm); they are imported inside :func:`run`, so ``python -m fastnorm`` stays
cheap to start.
"""
import time

import numpy as np

# label, activation, batch norm, learning-rate multiplier
RUNS = (
    ("a: ReLU, no BN", "relu", False, 1),
    ("b: ReLU + BN", "relu", True, 1),
    ("c: ReLU + BN, 5x lr", "relu", True, 5),
    ("c: ReLU + BN, 30x lr", "relu", True, 30),
    ("d: sigmoid + BN", "sigmoid", True, 1),
    ("e: sigmoid, no BN", "sigmoid", False, 1),
)


def add_arguments(parser):
    parser.add_argument("--steps", type=int, default=3000, help="SGD steps per run")
    parser.add_argument("--batch-size", type=int, default=60,
                        help="examples per mini-batch (the paper's 60)")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="base learning rate of plain SGD (runs c use 5x and 30x)")
    parser.add_argument("--hidden", type=int, default=100,
                        help="units in each of the 3 hidden layers (the paper's 100)")
    parser.add_argument("--eval-every", type=int, default=10,
                        help="steps between validation evaluations")
    parser.add_argument("--seed", type=int, default=0, help="weights, split and batches")
    parser.add_argument("--out", default="demo_bn.png", help="PNG file for the curves")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check(args):
    for name in ("steps", "batch_size", "hidden", "eval_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer")
    if not args.lr > 0:
        raise SystemExit("--lr must be positive")


def load_digits(seed):
    """(x_train, y_train, x_val, y_val): pixels scaled to [0, 1], a stratified 70/30 split."""
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split
    x, y = sk_load(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=0.3, random_state=seed,
                                              stratify=y)
    return x_tr, y_tr.astype(np.int64), x_va, y_va.astype(np.int64)


def build_mlp(n_in, hidden, n_out, activation, bn, seed):
    """3 hidden layers ``Linear -> [BatchNorm1d] -> activation`` and a linear output.

    BN sits between the affine map and the nonlinearity, as in the paper. The Linear
    layers draw their weights from ``seed`` alone, so every variant starts equal.
    """
    from . import nn
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
    rng = np.random.default_rng(seed)
    layers, width = [], n_in
    for _ in range(3):
        layers.append(nn.Linear(width, hidden, rng=rng))
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(act())
        width = hidden
    layers.append(nn.Linear(width, n_out, rng=rng))
    return nn.Sequential(*layers)


def accuracy(net, x, y):
    """Top-1 accuracy in eval mode (BN uses its running statistics)."""
    from .autograd import no_grad
    net.eval()
    with no_grad():
        pred = net(x).data.argmax(axis=1)
    net.train()
    return float((pred == y).mean())


def train_run(data, activation, bn, lr, args, progress=None):
    """One variant: returns (steps evaluated, validation accuracies, seconds)."""
    from . import nn
    from .optim import SGD
    x_tr, y_tr, x_va, y_va = data
    net = build_mlp(x_tr.shape[1], args.hidden, 10, activation, bn, args.seed)
    opt = SGD(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    batches = np.random.default_rng(args.seed + 1)   # the same batches in every run
    order, pos = batches.permutation(len(x_tr)), 0
    steps, accs = [0], [accuracy(net, x_va, y_va)]
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(order):
            order, pos = batches.permutation(len(x_tr)), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        opt.zero_grad()
        loss = loss_fn(net(x_tr[idx]), y_tr[idx])
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            steps.append(step)
            accs.append(accuracy(net, x_va, y_va))
        if progress is not None:
            progress.update(1)
    return np.array(steps), np.array(accs), time.perf_counter() - t0


def steps_to_reach(steps, accs, target):
    """First evaluated step with accuracy >= target, or None."""
    hit = np.nonzero(accs >= target)[0]
    return int(steps[hit[0]]) if hit.size else None


def format_tables(results, n_cols=8):
    """The accuracy-against-step table and the steps-to-reach table, as text."""
    steps = results[0][1]
    cols = np.unique(np.linspace(0, len(steps) - 1, min(n_cols, len(steps))).astype(int))
    w = max(len(r[0]) for r in results) + 2
    lines = ["validation accuracy against step", "step".ljust(w)
             + "".join(f"{int(steps[c]):>8d}" for c in cols)]
    for label, st, acc, _ in results:
        lines.append(label.ljust(w) + "".join(f"{acc[c]:8.3f}" for c in cols))
    target = results[0][2][-1]
    lines += ["", f"steps to reach run (a)'s final accuracy {target:.3f}",
              "run".ljust(w) + f"{'steps':>8}{'best acc':>10}{'final acc':>11}{'time s':>8}"]
    for label, st, acc, secs in results:
        hit = steps_to_reach(st, acc, target)
        lines.append(label.ljust(w) + f"{'never' if hit is None else hit:>8}"
                     f"{acc.max():10.3f}{acc[-1]:11.3f}{secs:8.1f}")
    return "\n".join(lines)


def plot(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = ["k-", "C0-", "C1--", "C3-.", "C2-", "C2:"]
    for (label, st, acc, _), style in zip(results, styles):
        ax.plot(st, acc, style, label=label, lw=1.6)
    ax.axhline(results[0][2][-1], color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args):
    """Train the six variants, print the tables, write the PNG."""
    _check(args)
    try:
        from threadpoolctl import threadpool_limits    # a scikit-learn dependency
        from tqdm.auto import tqdm
        data = load_digits(args.seed)
        import matplotlib  # noqa: F401  (fail before training, not after)
    except ImportError as e:
        raise SystemExit(f"the demo needs the [demo] extra ({e.name} is missing): "
                         "pip install 'fastnorm[demo]'") from None
    from . import _dispatch
    t0 = time.perf_counter()
    results = []
    # One thread: the matrices are at most 540 x 100, where a second BLAS or kernel thread
    # costs more than it saves, and on a busy machine its spin-waits made steps up to
    # 15x slower (measured: 4.35 ms vs 0.28 ms per step without BN).
    threads = _dispatch.get_num_threads()
    _dispatch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1), \
                tqdm(total=args.steps * len(RUNS), disable=args.no_progress, unit="step",
                     desc="demo") as bar:
            for label, activation, bn, mult in RUNS:
                bar.set_postfix_str(label)
                st, acc, secs = train_run(data, activation, bn, args.lr * mult, args, bar)
                results.append((label, st, acc, secs))
    finally:
        _dispatch.set_num_threads(threads)
    print(f"digits: {len(data[0])} train / {len(data[2])} validation images, MLP 64-"
          f"{args.hidden}x3-10, SGD lr {args.lr:g}, batch {args.batch_size}, "
          f"{args.steps} steps, seed {args.seed}")
    print(format_tables(results))
    title = (f"scikit-learn digits, MLP 3x{args.hidden}, SGD lr {args.lr:g} "
             f"(c: x5, x30), batch {args.batch_size}")
    plot(results, args.out, title)
    print(f"\nplot written to {args.out}; total {time.perf_counter() - t0:.1f} s")
    return 0
