"""python -m fastnorm demo: the batch-norm paper's MNIST experiment on scikit-learn's digits.

Ioffe & Szegedy (2015), section 4.1, train the same small fully connected network with and
without batch normalization and compare validation accuracy against training step; section
4.2.2 adds higher learning rates (BN-x5, BN-x30) and a sigmoid network with and without BN.
This demo runs those six variants on the 8x8 digits that scikit-learn ships (1797 images,
10 classes), with fastnorm's own layers, tape and SGD:

    a  ReLU, no BN             base lr          d  sigmoid + BN        base lr
    b  ReLU + BN               base lr          e  sigmoid, no BN      base lr
    c  ReLU + BN, 5x and 30x the base lr

``--model cnn`` trains a small convolutional network instead, the architecture batch
norm was made for (two blocks ``Conv2d -> [BatchNorm2d] -> ReLU -> MaxPool2d``, then a
hidden layer of sigmoid units ``Linear -> [BatchNorm1d] -> Sigmoid`` and a linear output),
without BN, with BN, and with BN at 5x and 30x the learning rate; it also draws the paper's
Figure 1(b, c): the 15th, 50th and 85th percentiles over the validation images of one
sigmoid unit's input against training step, without and with BN.

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

# --model cnn: label, batch norm, learning-rate multiplier
CNN_RUNS = (
    ("a: CNN, no BN", False, 1),
    ("b: CNN + BN", True, 1),
    ("c: CNN + BN, 5x lr", True, 5),
    ("c: CNN + BN, 30x lr", True, 30),
)
CNN_CHANNELS = (8, 16)   # two conv blocks on 8x8 images: 8x8 -> 4x4 -> 2x2
PERCENTILES = (15, 50, 85)


def add_arguments(parser):
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                        help="the paper's MLP (six runs, default) or a small CNN (four runs "
                             "and the paper's Figure 1(b, c))")
    parser.add_argument("--steps", type=int, default=3000, help="SGD steps per run")
    parser.add_argument("--batch-size", type=int, default=60,
                        help="examples per mini-batch (the paper's 60)")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="base learning rate of plain SGD (runs c use 5x and 30x)")
    parser.add_argument("--hidden", type=int, default=100,
                        help="units in each of the MLP's 3 hidden layers (the paper's 100), "
                             "or in the CNN's sigmoid layer")
    parser.add_argument("--eval-every", type=int, default=10,
                        help="steps between validation evaluations")
    parser.add_argument("--seed", type=int, default=0, help="weights, split and batches")
    parser.add_argument("--unit", type=int, default=0,
                        help="--model cnn: the sigmoid unit whose input Figure 1(b, c) follows")
    parser.add_argument("--out", help="PNG file for the curves (default demo_bn.png, "
                                      "--model cnn: demo_cnn.png)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check(args):
    for name in ("steps", "batch_size", "hidden", "eval_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer")
    if not args.lr > 0:
        raise SystemExit("--lr must be positive")
    if not 0 <= getattr(args, "unit", 0) < args.hidden:
        raise SystemExit(f"--unit must be in [0, --hidden) = [0, {args.hidden})")


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


def build_cnn(hidden, bn, seed, n_out=10):
    """Two ``Conv2d(3x3, padding 1) -> [BatchNorm2d] -> ReLU -> MaxPool2d(2)`` blocks on
    (N, 1, 8, 8) images, then ``Flatten -> Linear -> [BatchNorm1d] -> Sigmoid -> Linear``.

    With BN the layers before a batch norm have no bias (BN's shift replaces it, as in the
    paper). Each layer draws its weights from its own stream of ``seed``, so the variants
    with and without BN start from the same weights.
    """
    from . import nn
    c1, c2 = CNN_CHANNELS

    def rng(i):
        return np.random.default_rng((seed, i))
    maybe = (lambda layer: [layer]) if bn else (lambda layer: [])
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=not bn, rng=rng(0)), *maybe(nn.BatchNorm2d(c1)),
        nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1, bias=not bn, rng=rng(1)), *maybe(nn.BatchNorm2d(c2)),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c2 * 2 * 2, hidden, bias=not bn, rng=rng(2)), *maybe(nn.BatchNorm1d(hidden)),
        nn.Sigmoid(), nn.Linear(hidden, n_out, rng=rng(3)))


def evaluate(net, x, y, unit=None):
    """Top-1 accuracy in eval mode (BN uses its running statistics), and with ``unit`` the
    15/50/85th percentiles over ``x`` of that unit's input to the first Sigmoid layer."""
    from . import nn
    from .autograd import no_grad
    net.eval()
    pre = None
    with no_grad():
        h = x
        for m in net:
            if unit is not None and pre is None and isinstance(m, nn.Sigmoid):
                pre = np.percentile(h.data[:, unit], PERCENTILES)
            h = m(h)
    net.train()
    return float((h.data.argmax(axis=1) == y).mean()), pre


def accuracy(net, x, y):
    """Top-1 accuracy in eval mode (BN uses its running statistics)."""
    return evaluate(net, x, y)[0]


def fit(net, data, lr, args, progress=None, unit=None):
    """Plain SGD on the batches of ``args.seed + 1`` (the same in every run).

    Returns (steps evaluated, validation accuracies, seconds, percentiles): percentiles is
    (len(steps), 3) for ``unit`` (see :func:`evaluate`), None without it.
    """
    from . import nn
    from .optim import SGD
    x_tr, y_tr, x_va, y_va = data
    opt = SGD(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    batches = np.random.default_rng(args.seed + 1)
    order, pos = batches.permutation(len(x_tr)), 0
    acc, pre = evaluate(net, x_va, y_va, unit)
    steps, accs, pres = [0], [acc], [pre]
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
            acc, pre = evaluate(net, x_va, y_va, unit)
            steps.append(step)
            accs.append(acc)
            pres.append(pre)
        if progress is not None:
            progress.update(1)
    secs = time.perf_counter() - t0
    return np.array(steps), np.array(accs), secs, None if unit is None else np.array(pres)


def train_run(data, activation, bn, lr, args, progress=None):
    """One MLP variant: returns (steps evaluated, validation accuracies, seconds)."""
    net = build_mlp(data[0].shape[1], args.hidden, 10, activation, bn, args.seed)
    return fit(net, data, lr, args, progress)[:3]


def train_cnn_run(data, bn, lr, args, progress=None):
    """One CNN variant on (N, 64) digits: (steps, accuracies, seconds, percentiles)."""
    x_tr, y_tr, x_va, y_va = data
    images = (x_tr.reshape(-1, 1, 8, 8), y_tr, x_va.reshape(-1, 1, 8, 8), y_va)
    net = build_cnn(args.hidden, bn, args.seed)
    return fit(net, images, lr, args, progress, unit=args.unit)


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


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _accuracy_axes(ax, results, title, styles):
    for (label, st, acc, *_), style in zip(results, styles):
        ax.plot(st, acc, style, label=label, lw=1.6)
    ax.axhline(results[0][2][-1], color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)


def plot(results, path, title):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    _accuracy_axes(ax, results, title, ["k-", "C0-", "C1--", "C3-.", "C2-", "C2:"])
    ax.legend(loc="center right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cnn(results, unit, path, title):
    """The paper's Figure 1: (a) accuracy curves; (b, c) percentiles of one sigmoid unit's
    input without BN (run a) and with BN (run b), on a shared y axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw=dict(wspace=0.28))
    _accuracy_axes(axes[0], results, "(a) " + title, ["k-", "C0-", "C1--", "C3-."])
    axes[0].legend(loc="lower right", fontsize=9)
    for ax, (label, st, _, _, pct), tag in zip(axes[1:], results[:2], "bc"):
        for k, (q, style) in enumerate(zip(PERCENTILES, ["C0--", "k-", "C3--"])):
            ax.plot(st, pct[:, k], style, lw=1.4, label=f"{q}th percentile")
        ax.set_title(f"({tag}) {label}: input of sigmoid unit {unit}", fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[1].set_ylabel("input to the sigmoid (validation images)")
    lo = min(r[4].min() for r in results[:2])
    hi = max(r[4].max() for r in results[:2])
    for ax in axes[1:]:
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    axes[1].legend(loc="best", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def format_percentiles(results, n_cols=8):
    """Runs a and b: the sigmoid input's 15/50/85th percentiles at a few steps, as text."""
    steps = results[0][1]
    cols = np.unique(np.linspace(0, len(steps) - 1, min(n_cols, len(steps))).astype(int))
    w = max(len(r[0]) for r in results[:2]) + 8
    lines = ["sigmoid input percentiles 15/50/85 against step",
             "step".ljust(w) + "".join(f"{int(steps[c]):>8d}" for c in cols)]
    for label, _, _, _, pct in results[:2]:
        for k, q in enumerate(PERCENTILES):
            lines.append(f"{label} p{q}".ljust(w) + "".join(f"{pct[c, k]:8.2f}" for c in cols))
    return "\n".join(lines)


def run(args):
    """Train the variants of ``args.model``, print the tables, write the PNG."""
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
    cnn = args.model == "cnn"
    runs = CNN_RUNS if cnn else RUNS
    out = args.out or ("demo_cnn.png" if cnn else "demo_bn.png")
    t0 = time.perf_counter()
    results = []
    # One thread: the matrices are at most 540 x 100, where a second BLAS or kernel thread
    # costs more than it saves, and on a busy machine its spin-waits made steps up to
    # 15x slower (measured: 4.35 ms vs 0.28 ms per step without BN).
    threads = _dispatch.get_num_threads()
    _dispatch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1), \
                tqdm(total=args.steps * len(runs), disable=args.no_progress, unit="step",
                     desc=f"demo {args.model}") as bar:
            for label, *variant, mult in runs:
                bar.set_postfix_str(label)
                if cnn:
                    results.append((label, *train_cnn_run(data, variant[0], args.lr * mult,
                                                          args, bar)))
                else:
                    results.append((label, *train_run(data, *variant, args.lr * mult, args,
                                                      bar)))
    finally:
        _dispatch.set_num_threads(threads)
    net = (f"CNN conv{CNN_CHANNELS[0]}-pool-conv{CNN_CHANNELS[1]}-pool-{args.hidden} sigmoid"
           f"-10" if cnn else f"MLP 64-{args.hidden}x3-10")
    print(f"digits: {len(data[0])} train / {len(data[2])} validation images, {net}, SGD lr "
          f"{args.lr:g}, batch {args.batch_size}, {args.steps} steps, seed {args.seed}")
    print(format_tables([r[:4] for r in results]))
    if cnn:
        print()
        print(format_percentiles(results))
        title = f"digits, CNN, SGD lr {args.lr:g} (c: x5, x30), batch {args.batch_size}"
        plot_cnn(results, args.unit, out, title)
    else:
        title = (f"scikit-learn digits, MLP 3x{args.hidden}, SGD lr {args.lr:g} "
                 f"(c: x5, x30), batch {args.batch_size}")
        plot(results, out, title)
    print(f"\nplot written to {out}; total {time.perf_counter() - t0:.1f} s")
    return 0
