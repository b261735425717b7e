"""Variant -> canonical view. No data moves unless the input fits no view (then one copy).

A ``Layout`` records the order in which x's axes lie in memory (``perm``: x.transpose(perm)
is C-contiguous). Outputs are allocated in the same order, so y, dy and dx share x's layout
and every array of a call is viewed the same way:

    batch norm      channel axis innermost -> channels (1, A, C)   else rows (A*C, B)
    instance norm   channels-first -> rows (N*C, S)                 channels-last -> (N, S, C)
    group norm      channels-first -> rows (N*G, C/G*S) for stats,  (N*C, S) to apply
                    channels-last  -> channels (N, S, C), columns merged into groups
    layer/RMS norm  rows (prod(leading), prod(normalized_shape))
"""
import math

import numpy as np


class Layout:
    """x's memory order: ``perm`` with x.transpose(perm) C-contiguous."""

    def __init__(self, shape, perm):
        self.shape = tuple(shape)
        self.perm = tuple(perm)
        self.inv = tuple(sorted(range(len(perm)), key=self.perm.__getitem__))

    def view(self, a, shape):
        """``a`` (x's shape and layout) seen as the canonical ``shape``, never a copy."""
        v = a.transpose(self.perm)
        if not v.flags.c_contiguous:  # pragma: no cover - guarded by same_layout()
            raise AssertionError("array is not in the planned layout")
        return v.reshape(shape)

    def empty(self, dtype):
        return np.empty([self.shape[i] for i in self.perm], dtype).transpose(self.inv)

    def holds(self, a):
        """True when ``a`` lies in memory in this layout (so it can be viewed directly)."""
        return a.transpose(self.perm).flags.c_contiguous

    def pos(self, axis):
        return self.perm.index(axis)


def candidates(ndim, axis):
    """The memory orders a view can use: natural, channel axis last, channel axis second."""
    ident = tuple(range(ndim))
    last = tuple(i for i in ident if i != axis) + (axis,)
    first = (0, axis) + tuple(i for i in ident[1:] if i != axis) if axis else ident
    return ident, last, first


def layout(x, axis=None, batch_outer=False):
    """(x_in_layout, Layout): x itself when it lies in a usable order, else one copy.

    Usable: C-contiguous, or contiguous with the channel ``axis`` moved innermost
    (channels-last memory) or moved next to the batch axis (channels-first memory).
    ``batch_outer`` (instance/group norm) also requires axis 0 outermost and the channel axis
    next to it or innermost.
    """
    ndim = x.ndim
    perms = candidates(ndim, 0 if axis is None else axis)
    if axis is None:
        perms = perms[:1]
    for perm in perms:
        if x.transpose(perm).flags.c_contiguous and (
                not batch_outer or (perm[0] == 0 and perm.index(axis) in (1, ndim - 1))):
            return x, Layout(x.shape, perm)
    # one explicit copy: into natural order if that serves, else channels-first
    perm = perms[0]
    if batch_outer and axis not in (1, ndim - 1):
        perm = perms[2]
    xc = np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm))
    return xc, Layout(x.shape, perm)


def batch_geometry(lay, axis):
    """Batch norm: ('channels', (1, A, C)) or ('rows', (A*C, B), A) for channel ``axis``."""
    k = lay.pos(axis)
    mshape = [lay.shape[i] for i in lay.perm]
    A, C, B = math.prod(mshape[:k]), mshape[k], math.prod(mshape[k + 1:])
    if B == 1:
        return "channels", (1, A, C), A
    return "rows", (A * C, B), A


def instance_geometry(lay, axis):
    """Instance/group norm: ('rows', N, C, S) or ('channels', N, C, S)."""
    N, C = lay.shape[0], lay.shape[axis]
    S = math.prod(s for i, s in enumerate(lay.shape) if i not in (0, axis))
    kind = "rows" if lay.pos(axis) == 1 else "channels"
    return kind, N, C, S
