"""The norm bodies, written once for every backend.

Each norm is a reshape onto one of two canonical views (``_geometry``) and a sequence of
phases, each a kernel looked up in the dispatch table (``_dispatch``), on arrays that the
backend's array adapter allocates (``_arrays.HOST`` or ``_cuda.ARRAYS``):

    forward   statistics  MOMENTS[kind] per (P', C), MERGE_EQUAL into units (Pg, G)
              [collective.moments: SyncBatchNorm merges the ranks' units here]
              RUNNING_UPDATE (the one rule: ``running_rule``)
              coefficients  FINALIZE -> per-(P', C) mean, alpha = rstd * w, beta = b
              apply  SCALE_SHIFT[kind]: y = (x - mean) * alpha + beta
    backward  reductions  DOT[kind]: sums of dy and dy * (x - mean) per (P', C),
              COLUMN_SUMS into units, WEIGHT_GRADS (this rank's share)
              [collective.sums: SyncBatchNorm adds the ranks' sums here]
              coefficients  GROUP_SUMS, BACKWARD_COEFS -> c1, c2, c3
              apply  BWD_APPLY[kind]: dx = c1 * dy + c2 * (x - mean) + c3

Where one kernel does a whole body with the data read once (layer/RMS norm: ROWS_FWD,
ROWS_BWD; instance/group norm: ROWS_FWD_GROUPED, CHANNELS_FWD_GROUPED, ROWS_BWD_GROUPED),
the body calls it instead; every backend has those too. A statistics unit is a row of
(Pg, G): batch norm (1, C), instance norm (N, C), group norm (N, G); see ``reference``'s
phase kernels for the index conventions. Arguments are checked by ``_checks``.

The one-call fast paths at the end serve the common small call (contiguous float32/64
ndarrays, plain weights) with one kernel and no temporaries.
"""
import numpy as np

from . import _checks, _dispatch
from . import _geometry as geo
from .reference import (BACKWARD_COEFS, BWD_APPLY, CHANNELS_EVAL, CHANNELS_FWD_GROUPED,
                        COLUMN_SUMS, DOT, FINALIZE, GROUP_SUMS, MERGE_EQUAL, MOMENTS, ROWS_BWD,
                        ROWS_BWD_GROUPED, ROWS_FWD, ROWS_FWD_GROUPED, RUNNING_UPDATE,
                        SCALE_SHIFT, SPREAD, WEIGHT_GRADS)

FAST = (np.dtype(np.float32), np.dtype(np.float64))   # dtypes the fast paths take
_INF = float("inf")
FUSED_SLAB = 1 << 18  # elements of one sample's channels-last slab, see fuse()


def run(backend, name, work):
    """The kernel ``name`` of ``backend`` for ``work`` elements (serial or parallel)."""
    return _dispatch.kernel(name, backend, work)


def flat(kind, a):
    """(P', C) per-unit values as a kernel wants them: rows (P'*C,), channels (P', C)."""
    return a.reshape(a.size) if kind == "rows" else a


def running_rule(momentum, num_batches_tracked, count):
    """torch's running-statistics rule as ``(keep, take, denom)``:
    ``new = keep * old + take * batch`` with the batch variance ``m2 / denom``.

    ``momentum=None`` is the cumulative average ``1 / num_batches_tracked``; the count is
    incremented in place first, as torch's module does; the variance is unbiased.
    """
    if num_batches_tracked is not None:
        num_batches_tracked += 1
    if momentum is None:
        momentum = 1.0 / float(num_batches_tracked)
    return 1.0 - momentum, momentum, count - 1


def row_blocks(R):
    """Row blocks of the weight-gradient partials: a function of R only (determinism)."""
    return max(1, min(64, R // 16))


def fuse(kind, N, S, C):
    """Whether instance/group norm forward runs as one fused kernel (a function of the shape
    only, so every thread count gives the same bits). channels-first: always (rows of one
    (sample, group), parallel over N*G rows). channels-last: the kernel takes one sample's
    (S, C) slab per thread, so with fewer than 4 samples of more than 1 MiB (float32) the
    statistics/apply pair, parallel over blocks of rows, keeps more threads busy."""
    return kind == "rows" or N >= 4 or S * C <= FUSED_SLAB


# ------------------------------------------------------------------------------ phases

def unit_moments(backend, xp, kind, xv, Pp, C, merge=None, per=0, cg=1):
    """float64 (mean, m2) per unit of the view ``xv``: per (P', C) from the kernel, then
    ``merge="samples"``: batch norm rows, the (A, C) rows of ``per`` elements -> (1, C);
    ``merge="groups"``: group norm channels-last, (N, C) columns of ``per`` -> (N, C/cg)."""
    mean, m2 = xp.empty((Pp, C)), xp.empty((Pp, C))
    run(backend, MOMENTS[kind], xv.size)(xv, flat(kind, mean), flat(kind, m2))
    if merge == "samples" and Pp > 1:
        P1, K, P2 = 1, Pp, C
    elif merge == "groups" and cg > 1:
        P1, K, P2 = Pp * (C // cg), cg, 1
    else:
        return mean, m2
    om, oq = xp.empty((P1, P2)), xp.empty((P1, P2))
    run(backend, MERGE_EQUAL, Pp * C)(mean.reshape(P1, K, P2), m2.reshape(P1, K, P2), per,
                                      om, oq)
    units = Pp if merge == "groups" else 1
    return om.reshape(units, -1), oq.reshape(units, -1)


def update_running(backend, xp, rm, rv, mean, m2, count, momentum, num_batches_tracked):
    """running statistics (C,) updated in place from batch units (P, C) (averaged over P)."""
    keep, take, denom = running_rule(momentum, num_batches_tracked, count)
    rmk, rvk = xp.inout(rm), xp.inout(rv)
    run(backend, RUNNING_UPDATE, rm.shape[0])(mean, m2, float(denom), float(keep), float(take),
                                              rmk, rvk)
    xp.writeback(rm, rmk)
    xp.writeback(rv, rvk)


def apply(backend, xp, kind, xv, yv, mean, m2, n, eps, clamp, w, b, cg, Pp, Po, T):
    """y = (x - mean) * (rstd * w) + b from unit statistics (Pg, G) with variance m2 / n;
    returns (mean, rstd) (Po, G) in T (Po: Pg, or Pp for statistics broadcast to samples)."""
    G = mean.shape[1]
    C = G * cg
    mean_s, alpha_s, beta_s = xp.empty((Pp, C)), xp.empty((Pp, C)), xp.empty((Pp, C))
    mean_o, rstd_o = xp.empty((Po, G), T), xp.empty((Po, G), T)
    run(backend, FINALIZE, Pp * C)(mean, m2, float(n), eps, clamp, w, b, cg, mean_s, alpha_s,
                                   beta_s, mean_o, rstd_o)
    if xv.size:
        run(backend, SCALE_SHIFT[kind], xv.size)(xv, flat(kind, mean_s), flat(kind, alpha_s),
                                                 flat(kind, beta_s), yv)
    return mean_o, rstd_o


def unit_backward(backend, xp, kind, dyv, xv, dxv, mean, rstd, w, cg, Pp, n, training,
                  has_bias, T, collective=None):
    """dx into ``dxv`` and this rank's (grad_weight, grad_bias) for unit statistics
    mean/rstd (Pg, G) over n elements each."""
    Pg, G = mean.shape
    C = G * cg
    mean_s = xp.empty((Pp, C))
    run(backend, SPREAD, Pp * C)(mean, cg, mean_s)
    if xv.size:
        sdy, sdx = xp.empty((Pp, C)), xp.empty((Pp, C))
        run(backend, DOT[kind], xv.size)(dyv, xv, flat(kind, mean_s), flat(kind, sdy),
                                         flat(kind, sdx))
    else:
        sdy, sdx = xp.zeros((Pp, C)), xp.zeros((Pp, C))
    if Pp != Pg:           # batch norm rows: one unit spans the A rows
        usdy, usdx = xp.empty((1, C)), xp.empty((1, C))
        run(backend, COLUMN_SUMS, Pp * C)(sdy, usdy.reshape(C))
        run(backend, COLUMN_SUMS, Pp * C)(sdx, usdx.reshape(C))
        sdy, sdx = usdy, usdx
    gw = None if w is None else xp.empty((C,), T)
    gb = xp.empty((C,), T) if has_bias else None
    if gw is not None or gb is not None:
        run(backend, WEIGHT_GRADS, Pg * C)(sdy, sdx, rstd, cg, gw, gb)
    if collective is not None:
        sdy, sdx, n = collective.sums(sdy, sdx, n)
    sg, sgx = xp.empty((Pg, G)), xp.empty((Pg, G))
    run(backend, GROUP_SUMS, Pg * C)(sdy, sdx, w, cg, sg, sgx)
    c1, c2, c3 = xp.empty((Pp, C)), xp.empty((Pp, C)), xp.empty((Pp, C))
    run(backend, BACKWARD_COEFS, Pp * C)(w, rstd, sg, sgx, float(max(n, 1)), training, cg,
                                         c1, c2, c3)
    if xv.size and training:
        run(backend, BWD_APPLY[kind], xv.size)(dyv, xv, flat(kind, mean_s), flat(kind, c1),
                                               flat(kind, c2), flat(kind, c3), dxv)
    elif xv.size:   # constant statistics: dx = (w * rstd) * dy, x not read (torch's eval)
        zero = xp.zeros((Pp, C))
        run(backend, SCALE_SHIFT[kind], xv.size)(dyv, flat(kind, zero), flat(kind, c1),
                                                 flat(kind, zero), dxv)
    return gw, gb


# -------------------------------------------------------------------------- batch norm

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, return_stats=False,
               num_batches_tracked=None, backend=None, collective=None):
    """The body of :func:`fastnorm.batch_norm`; ``collective`` (SyncBatchNorm) merges the
    statistics of every rank between the statistics and coefficient phases."""
    backend, xp = _dispatch.select(backend, input, weight, bias, running_mean, running_var,
                                   out)
    x, xp = xp.open(input, "input", 2)
    if not xp.native(x):
        return xp.via_host(batch_norm, dict(
            input=x, running_mean=running_mean, running_var=running_var, weight=weight,
            bias=bias, training=training, momentum=momentum, eps=eps, axis=axis, out=out,
            return_stats=return_stats, num_batches_tracked=num_batches_tracked,
            collective=collective), ("running_mean", "running_var"))
    ax = _checks.axis(axis, x.ndim)
    C, T = x.shape[ax], xp.stats_dtype(x)   # T: statistics (float32 for half data)
    training = _checks.flag(training, "training")
    w = xp.param(weight, "weight", (C,), x)
    b = xp.param(bias, "bias", (C,), x)
    rm, rv = _checks.running_pair(running_mean, running_var, C, training)
    eps = _checks.eps(eps)
    count = x.size // C if C else 0
    if training:
        if collective is None:
            _checks.batch_count(count, x.shape)
        if rm is not None:
            _checks.momentum(momentum, num_batches_tracked)
    elif rm is None:
        raise ValueError("running_mean and running_var are required when training=False")
    xw, lay = xp.plan(x, ax)
    kind, shape, A = geo.batch_geometry(lay, ax)
    y, final = xp.output(out, x, lay)
    xv, yv = xp.view(xw, lay, shape), xp.view(y, lay, shape)
    Pp = A if kind == "rows" else 1
    if training:
        if count:
            mean, m2 = unit_moments(backend, xp, kind, xv, Pp, C, "samples", count // Pp)
        else:
            mean, m2 = xp.full((1, C), np.nan), xp.full((1, C), np.nan)
        if collective is not None:
            mean, m2, count = collective.moments(mean, m2, count)
            _checks.batch_count(count, x.shape)
        if rm is not None and count:
            update_running(backend, xp, rm, rv, mean, m2, count, momentum,
                           num_batches_tracked)
        n = count
    else:
        mean = xp.vector(rm, "running_mean", (C,)).reshape(1, C)
        m2, n = xp.vector(rv, "running_var", (C,)).reshape(1, C), 1   # var = m2 / 1
    mean_o, rstd_o = apply(backend, xp, kind, xv, yv, mean, m2, n, eps, training, w, b, 1, Pp,
                           1, T)
    y = xp.finish(y, final, lay)
    if not return_stats:
        return y
    return (y,) + xp.result(T, mean_o.reshape(C), rstd_o.reshape(C))


def batch_norm_backward(grad_out, input, mean, rstd, weight=None, training=True, *, axis=1,
                        has_bias=True, backend=None, collective=None):
    """The body of :func:`fastnorm.batch_norm_backward`; ``collective`` (SyncBatchNorm)
    adds every rank's sums between the reduction and coefficient phases."""
    backend, xp = _dispatch.select(backend, grad_out, input, mean, rstd, weight)
    x, xp = xp.open(input, "input", 2)
    if not xp.native(x):
        return xp.via_host(batch_norm_backward, dict(
            grad_out=grad_out, input=x, mean=mean, rstd=rstd, weight=weight,
            training=training, axis=axis, has_bias=has_bias, collective=collective))
    ax = _checks.axis(axis, x.ndim)
    C = x.shape[ax]
    P = xp.stats_dtype(x) if weight is None else np.dtype(weight.dtype)  # gradients' dtype
    training = _checks.flag(training, "training")
    mean = xp.statistics(mean, "mean", (C,))
    rstd = xp.statistics(rstd, "rstd", (C,))
    w = xp.param(weight, "weight", (C,), x)
    xw, lay = xp.plan(x, ax)
    dy = xp.like(grad_out, xw, lay, "grad_out")
    kind, shape, A = geo.batch_geometry(lay, ax)
    dx = xp.empty_in(lay, x.dtype)
    xv, dyv, dxv = xp.view(xw, lay, shape), xp.view(dy, lay, shape), xp.view(dx, lay, shape)
    count = x.size // C if C else 0
    gw, gb = unit_backward(backend, xp, kind, dyv, xv, dxv, mean.reshape(1, C),
                           rstd.reshape(1, C), w, 1, A if kind == "rows" else 1, count,
                           training, has_bias, P, collective)
    return (xp.finish(dx, dx, lay),) + xp.result(P, gw, gb)


# ------------------------------------------------------------------ instance / group norm

def _nc_view(xp, x, ax):
    """Instance/group geometry: (x in layout, Layout, kind, N, C, S, view shape)."""
    xw, lay = xp.plan(x, ax, batch_outer=True)
    kind, N, C, S = geo.instance_geometry(lay, ax)
    return xw, lay, kind, N, C, S, ((N * C, S) if kind == "rows" else (N, S, C))


def _grouped_forward(backend, xp, kind, xw, y, lay, N, C, S, weight, bias, eps, G, T):
    """Fused instance/group norm forward -> (mean, rstd) (N, G) in the compute dtype.

    channels-first: ROWS_FWD_GROUPED on the (N*G, C/G, S) view, weight/bias seen as (G, K);
    channels-last: CHANNELS_FWD_GROUPED on the (N, S, C) view, one sample's slab at a time.
    """
    mean, rstd = xp.empty((N, G), T), xp.empty((N, G), T)
    wt = xp.vector(weight, "weight", (C,), T)    # (checked by the caller)
    bt = xp.vector(bias, "bias", (C,), T)
    if kind == "rows":
        shape, K = (N * G, C // G, S), C // G
        wt = None if wt is None else wt.reshape(G, K)
        bt = None if bt is None else bt.reshape(G, K)
        run(backend, ROWS_FWD_GROUPED, N * C * S)(
            xp.view(xw, lay, shape), wt, bt, eps, xp.view(y, lay, shape), mean.reshape(N * G),
            rstd.reshape(N * G))
    else:
        shape = (N, S, C)
        run(backend, CHANNELS_FWD_GROUPED, N * C * S)(
            xp.view(xw, lay, shape), wt, bt, eps, xp.view(y, lay, shape), mean, rstd)
    return mean, rstd


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  return_stats=False, num_batches_tracked=None, backend=None):
    """The body of :func:`fastnorm.instance_norm`."""
    backend, xp = _dispatch.select(backend, input, weight, bias, running_mean, running_var,
                                   out)
    x, xp = xp.open(input, "input", 2)
    if not xp.native(x):
        return xp.via_host(instance_norm, dict(
            input=x, running_mean=running_mean, running_var=running_var, weight=weight,
            bias=bias, use_input_stats=use_input_stats, momentum=momentum, eps=eps, axis=axis,
            out=out, return_stats=return_stats, num_batches_tracked=num_batches_tracked),
            ("running_mean", "running_var"))
    ax = _checks.channel_axis(axis, x.ndim)
    C, T = x.shape[ax], xp.stats_dtype(x)   # T: statistics (float32 for half data)
    use_input_stats = _checks.flag(use_input_stats, "use_input_stats")
    _checks.parameter(weight, "weight", (C,), x)
    _checks.parameter(bias, "bias", (C,), x)
    update = use_input_stats and running_mean is not None
    rm, rv = _checks.running_pair(running_mean, running_var, C, update)
    eps = _checks.eps(eps)
    if not use_input_stats and rm is None:
        raise ValueError("running_mean and running_var are required when "
                         "use_input_stats=False")
    if update:
        _checks.momentum(momentum, num_batches_tracked)
    xw, lay, kind, N, C, S, shape = _nc_view(xp, x, ax)
    if use_input_stats and x.size:
        _checks.spatial_count(S, x.shape)
    y, final = xp.output(out, x, lay)
    if use_input_stats and x.size and not update and fuse(kind, N, S, C):
        # without running statistics: one fused kernel, x read from memory once
        mean, rstd = _grouped_forward(backend, xp, kind, xw, y, lay, N, C, S, weight, bias,
                                      eps, C, T)
        y = xp.finish(y, final, lay)
        return (y,) + xp.result(T, mean, rstd) if return_stats else y
    w = xp.param(weight, "weight", (C,), x)
    b = xp.param(bias, "bias", (C,), x)
    xv, yv = xp.view(xw, lay, shape), xp.view(y, lay, shape)
    if use_input_stats:
        if x.size:
            mean, m2 = unit_moments(backend, xp, kind, xv, N, C)
        else:
            mean, m2 = xp.full((N, C), np.nan), xp.full((N, C), np.nan)
        if update and x.size:
            update_running(backend, xp, rm, rv, mean, m2, S, momentum, num_batches_tracked)
        n = S
    else:
        mean = xp.vector(rm, "running_mean", (C,)).reshape(1, C)
        m2, n = xp.vector(rv, "running_var", (C,)).reshape(1, C), 1
    mean_o, rstd_o = apply(backend, xp, kind, xv, yv, mean, m2, n, eps, use_input_stats, w, b,
                           1, N, N, T)
    y = xp.finish(y, final, lay)
    return (y,) + xp.result(T, mean_o, rstd_o) if return_stats else y


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               return_stats=False, backend=None):
    """The body of :func:`fastnorm.group_norm`."""
    backend, xp = _dispatch.select(backend, input, weight, bias, out)
    x, xp = xp.open(input, "input", 2)
    if not xp.native(x):
        return xp.via_host(group_norm, dict(
            input=x, num_groups=num_groups, weight=weight, bias=bias, eps=eps, axis=axis,
            out=out, return_stats=return_stats))
    ax = _checks.channel_axis(axis, x.ndim)
    C, T = x.shape[ax], xp.stats_dtype(x)   # T: statistics (float32 for half data)
    G = _checks.groups(num_groups, C, x.shape)
    _checks.parameter(weight, "weight", (C,), x)
    _checks.parameter(bias, "bias", (C,), x)
    eps = _checks.eps(eps)
    xw, lay, kind, N, C, S, shape = _nc_view(xp, x, ax)
    y, final = xp.output(out, x, lay)
    if x.size and fuse(kind, N, S, C):  # one fused kernel: x read from memory once
        mean, rstd = _grouped_forward(backend, xp, kind, xw, y, lay, N, C, S, weight, bias,
                                      eps, G, T)
        y = xp.finish(y, final, lay)
        return (y,) + xp.result(T, mean, rstd) if return_stats else y
    cg = C // G
    w = xp.param(weight, "weight", (C,), x)
    b = xp.param(bias, "bias", (C,), x)
    xv, yv = xp.view(xw, lay, shape), xp.view(y, lay, shape)
    if x.size:              # per (n, c) columns, then merged into groups of C/G columns
        mean, m2 = unit_moments(backend, xp, "channels", xv, N, C, "groups", S, cg)
    else:
        mean, m2 = xp.full((N, G), np.nan), xp.full((N, G), np.nan)
    mean_o, rstd_o = apply(backend, xp, kind, xv, yv, mean, m2, cg * S, eps, True, w, b, cg,
                           N, N, T)
    y = xp.finish(y, final, lay)
    return (y,) + xp.result(T, mean_o, rstd_o) if return_stats else y


def nc_backward(grad_out, input, mean, rstd, weight, axis, has_bias, backend, groups,
                training=True):
    """The body of :func:`fastnorm.instance_norm_backward` (groups=None) and
    :func:`fastnorm.group_norm_backward` (groups=G); mean/rstd (N, C) or (N, G)."""
    backend, xp = _dispatch.select(backend, grad_out, input, mean, rstd, weight)
    x, xp = xp.open(input, "input", 2)
    if not xp.native(x):
        return xp.via_host(nc_backward, dict(
            grad_out=grad_out, input=x, mean=mean, rstd=rstd, weight=weight, axis=axis,
            has_bias=has_bias, groups=groups, training=training))
    ax = _checks.channel_axis(axis, x.ndim)
    C = x.shape[ax]
    P = xp.stats_dtype(x) if weight is None else np.dtype(weight.dtype)  # gradients' dtype
    G = C if groups is None else _checks.groups(groups, C, x.shape)
    training = _checks.flag(training, "use_input_stats")
    xw, lay, kind, N, C, S, shape = _nc_view(xp, x, ax)
    mean = xp.statistics(mean, "mean", (N, G))
    rstd = xp.statistics(rstd, "rstd", (N, G))
    w = xp.param(weight, "weight", (C,), x)
    dy = xp.like(grad_out, xw, lay, "grad_out")
    dx = xp.empty_in(lay, x.dtype)
    cg = C // G if G else 1
    if x.size and kind == "rows" and training:
        # channels-first: one fused kernel, each (sample, group) row read from memory once
        shape3 = (N * G, cg, S)
        sdy, sdxh = xp.empty((N * G, cg)), xp.empty((N * G, cg))
        run(backend, ROWS_BWD_GROUPED, x.size)(
            xp.view(dy, lay, shape3), xp.view(xw, lay, shape3), mean.reshape(N * G),
            rstd.reshape(N * G), None if w is None else w.reshape(G, cg),
            xp.view(dx, lay, shape3), sdy, sdxh)
        gw = None if w is None else xp.empty((C,), P)
        gb = xp.empty((C,), P) if has_bias else None
        for part, g in ((sdxh, gw), (sdy, gb)):
            if g is not None:
                run(backend, COLUMN_SUMS, N * C)(part.reshape(N, C), g)
    else:
        xv, dyv, dxv = xp.view(xw, lay, shape), xp.view(dy, lay, shape), xp.view(dx, lay, shape)
        gw, gb = unit_backward(backend, xp, kind, dyv, xv, dxv, mean, rstd, w, cg, N, cg * S,
                               training, has_bias, P)
    return (xp.finish(dx, dx, lay),) + xp.result(P, gw, gb)


# --------------------------------------------------------------------- layer / RMS norm

def rows_forward(input, normalized_shape, weight, bias, eps, rms, out, return_stats, backend):
    """The body of :func:`fastnorm.layer_norm` (rms=False) and :func:`fastnorm.rms_norm`."""
    backend, xp = _dispatch.select(backend, input, weight, bias, out)
    x, xp = xp.open(input, "input", 1)
    if not xp.native(x):
        return xp.via_host(rows_forward, dict(
            input=x, normalized_shape=normalized_shape, weight=weight, bias=bias, eps=eps,
            rms=rms, out=out, return_stats=return_stats))
    ns, lead, R, M = _checks.rows_shape(x.shape, normalized_shape)
    T = xp.stats_dtype(x)    # statistics and fused weights (float32 for half data)
    w = xp.param(weight, "weight", ns, x, T)
    b = xp.param(bias, "bias", ns, x, T)
    eps = _checks.eps(float(np.finfo(x.dtype).eps) if eps is None and rms else eps)
    xw, lay = xp.plan(x)
    y, final = xp.output(out, x, lay)
    if x.size:
        mean, rstd = xp.empty((R,), T), xp.empty((R,), T)
        run(backend, ROWS_FWD, x.size)(xp.view(xw, lay, (R, M)),
                                       None if w is None else w.reshape(M),
                                       None if b is None else b.reshape(M), eps, rms,
                                       xp.view(y, lay, (R, M)), mean, rstd)
    else:
        mean, rstd = xp.full((R,), 0.0 if rms else np.nan, T), xp.full((R,), np.nan, T)
    y = xp.finish(y, final, lay)
    if not return_stats:
        return y
    if rms:
        return (y,) + xp.result(T, rstd.reshape(lead))
    return (y,) + xp.result(T, mean.reshape(lead), rstd.reshape(lead))


def rows_backward(grad_out, input, mean, rstd, weight, normalized_shape, rms, has_bias,
                  backend):
    """The body of :func:`fastnorm.layer_norm_backward` and :func:`fastnorm.rms_norm_backward`."""
    backend, xp = _dispatch.select(backend, grad_out, input, mean, rstd, weight)
    x, xp = xp.open(input, "input", 1)
    if not xp.native(x):
        return xp.via_host(rows_backward, dict(
            grad_out=grad_out, input=x, mean=mean, rstd=rstd, weight=weight,
            normalized_shape=normalized_shape, rms=rms, has_bias=has_bias))
    T = xp.stats_dtype(x)    # statistics and weight (float32 for half data)
    P = T if weight is None else np.dtype(weight.dtype)   # the gradients' dtype
    if normalized_shape is None:
        if rstd is None:
            _checks.statistics(rstd, "rstd", ())
        normalized_shape = x.shape[len(rstd.shape):]
    ns, lead, R, M = _checks.rows_shape(x.shape, normalized_shape)
    mean = xp.zeros((R,), T) if rms else xp.statistics(mean, "mean", lead, T).reshape(R)
    rstd = xp.statistics(rstd, "rstd", lead, T).reshape(R)
    w = xp.param(weight, "weight", ns, x, T)
    xw, lay = xp.plan(x)
    dy = xp.like(grad_out, xw, lay, "grad_out")
    dx = xp.empty_in(lay, x.dtype)
    B = row_blocks(R)
    dw_part = None if w is None else xp.empty((B, M))
    db_part = xp.empty((B, M)) if has_bias else None
    if x.size:
        run(backend, ROWS_BWD, x.size)(xp.view(dy, lay, (R, M)), xp.view(xw, lay, (R, M)), mean,
                                       rstd, None if w is None else w.reshape(M), rms,
                                       xp.view(dx, lay, (R, M)), dw_part, db_part)
    grads = []
    for part in (dw_part, db_part):
        if part is None:
            grads.append(None)
        elif x.size:
            g = xp.empty((M,), P)
            run(backend, COLUMN_SUMS, B * M)(part, g)
            grads.append(g.reshape(ns))
        else:
            grads.append(xp.zeros(ns, P))
    return (xp.finish(dx, dx, lay),) + xp.result(P, *grads)


# ------------------------------------------------------------ one-call fast paths
# A one-row inference call spends ~10 us (LN) / ~20 us (eval BN) in the general path's
# validation and layout planning and ~0.3 us in the kernel. The fast paths below take the
# common case only -- C-contiguous aligned float32/64 ndarrays, plain weights of the same
# dtype, no out=/return_stats, a float eps > 0, a CPU backend -- and return None for
# anything else, which then goes through the general path (and its error messages). The
# weights are checked here, or, on a backend whose kernels check every argument themselves
# (Cython: ~1 us less per call), by the kernel: what it rejects goes to the general path.
# They call the same kernels, so the results are the same bits (tests/test_cython.py).

def _plain(a, n, dtype):
    """True for None or a C-contiguous aligned ndarray of shape (n,) and ``dtype``."""
    return a is None or (type(a) is np.ndarray and a.shape == (n,) and a.dtype == dtype
                         and a.flags.c_contiguous and a.flags.aligned)


def rows_fast(x, normalized_shape, weight, bias, eps, rms, out, return_stats, backend):
    """layer_norm / rms_norm over the last axis in one kernel call, or None."""
    if (type(x) is not np.ndarray or out is not None or return_stats or type(eps) is not float
            or not 0.0 < eps < _INF or x.dtype not in FAST or not x.size or not x.ndim
            or not x.flags.c_contiguous or not x.flags.aligned):
        return None
    M = x.shape[-1]
    if not ((normalized_shape == M) if type(normalized_shape) is int
            else (type(normalized_shape) is tuple and normalized_shape == (M,)
                  and type(normalized_shape[0]) is int)):
        return None
    k, checks = _dispatch.fast_kernel(ROWS_FWD, backend, x.size)
    if k is None or not (checks or _plain(weight, M, x.dtype) and _plain(bias, M, x.dtype)):
        return None
    R = x.size // M
    y = np.empty_like(x)
    mean, rstd = np.empty(R, x.dtype), np.empty(R, x.dtype)
    x2, y2 = (x, y) if x.ndim == 2 else (x.reshape(R, M), y.reshape(R, M))
    try:
        k(x2, weight, bias, eps, rms, y2, mean, rstd)
    except (TypeError, ValueError):  # an argument the kernel declines: the general path
        return None
    return y


def batch_eval_fast(x, rm, rv, weight, bias, training, eps, axis, out, return_stats, backend):
    """Eval-mode batch_norm with channels on the last axis in one kernel call, or None."""
    if (training is not False or type(x) is not np.ndarray or out is not None
            or return_stats or type(eps) is not float or not 0.0 < eps < _INF
            or x.dtype not in FAST or not x.size or x.ndim < 2
            or not (axis == -1 or axis == x.ndim - 1)
            or not x.flags.c_contiguous or not x.flags.aligned):
        return None
    C = x.shape[-1]
    if rm is None or rv is None:
        return None
    k, checks = _dispatch.fast_kernel(CHANNELS_EVAL, backend, x.size)
    if k is None or not (checks or _plain(rm, C, x.dtype) and _plain(rv, C, x.dtype)
                         and _plain(weight, C, x.dtype) and _plain(bias, C, x.dtype)):
        return None
    y = np.empty_like(x)
    x2, y2 = (x, y) if x.ndim == 2 else (x.reshape(-1, C), y.reshape(-1, C))
    try:
        k(x2, rm, rv, weight, bias, eps, y2)
    except (TypeError, ValueError):  # an argument the kernel declines: the general path
        return None
    return y
