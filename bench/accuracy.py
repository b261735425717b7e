"""Accuracy table for the README: float32 x = 1e4 + N(0, 1), max abs error of y and grad_x
against the float64 reference, for fastnorm's backends and (when installed) torch 2.13.

    python bench/accuracy.py            # prints a markdown table
"""
import sys

import numpy as np

import fastnorm as fn

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..",
                                              "tests"))
from test_accuracy import VARIANTS, forward_backward, shape_of  # noqa: E402


def torch_forward_backward(variant, x, dy, w, b):
    import torch
    F = torch.nn.functional
    cl = variant.endswith("_cl")
    xt = torch.tensor(np.moveaxis(x, -1, 1) if cl else x, requires_grad=True)
    wt = torch.tensor(w)
    bt = None if b is None else torch.tensor(b)
    op = variant.removesuffix("_cl")
    if cl:
        xt = xt.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    if op == "batch_norm":
        y = F.batch_norm(xt, None, None, wt, bt, True)
    elif op == "instance_norm":
        y = F.instance_norm(xt, weight=wt, bias=bt)
    elif op == "group_norm":
        y = F.group_norm(xt, 4, wt, bt)
    elif op == "layer_norm":
        y = F.layer_norm(xt, x.shape[-1:], wt, bt)
    else:
        y = F.rms_norm(xt, x.shape[-1:], wt, 1e-5)
    dyt = torch.tensor(np.moveaxis(dy, -1, 1) if cl else dy).contiguous()
    y.backward(dyt)   # contiguous grad_out (a torch quirk: ARCHITECTURE.md §6)
    yo, go = y.detach().numpy(), xt.grad.numpy()
    return (np.moveaxis(yo, 1, -1), np.moveaxis(go, 1, -1)) if cl else (yo, go)


def main():
    rng = np.random.default_rng(1)
    backends = fn.available_backends()
    peers = list(backends)
    try:
        import torch  # noqa: F401
        peers.append("torch")
    except ImportError:
        pass
    print("| variant | " + " | ".join(f"{p} y / grad_x" for p in peers) + " |")
    print("|---|" + "---|" * len(peers))
    for variant in VARIANTS:
        shape, C = shape_of(variant)
        x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        w = rng.normal(1, 0.2, C).astype(np.float32)
        b = None if variant.startswith("rms") else rng.normal(0, 0.2, C).astype(np.float32)
        yo, go = forward_backward(variant, x, dy, w, b, oracle=True)
        cells = []
        for p in peers:
            y, g = (torch_forward_backward(variant, x, dy, w, b) if p == "torch"
                    else forward_backward(variant, x, dy, w, b, p))
            cells.append(f"{np.abs(y - yo).max():.1e} / {np.abs(g - go).max():.1e}")
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
