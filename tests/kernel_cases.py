"""Argument lists for every kernel of the dispatch table, on hostile data.

``cases(name, dtype, size, rng)`` yields ``(label, args, outs)``: the arguments of kernel
``name`` in its contract order (``fastnorm.reference``) and the positions of the arrays it
writes (an array may be read and written: ``running_update``'s running statistics). The
data carry a large mean (cancellation), a constant row or channel (x - mean is exactly 0)
and, in the "nan" variants, one NaN that must stay in its row or channel.

Sizes: "tiny" (the CUDA simulator runs each thread in Python), "small" (odd extents) and
"big" (at least ``_dispatch.PARALLEL_MIN`` elements: the parallel kernels split the work).
Used by tests/test_kernels.py for every CPU backend and by tests/cuda_sim_check.py for the
CUDA backend, so a backend is tested by registering it.
"""
import numpy as np

F64 = np.float64

# (R, M) rows, (P, Q, C) channels, (R, K, S, G) grouped rows, (P, Q, C, G) grouped channels
SHAPES = {
    "tiny": dict(rows=(3, 37), channels=(2, 7, 3), grouped=(4, 2, 5, 2), cgrouped=(2, 7, 6, 3)),
    "small": dict(rows=(5, 37), channels=(2, 9, 5), grouped=(6, 2, 7, 3),
                  cgrouped=(2, 9, 6, 3)),
    "big": dict(rows=(64, 521), channels=(1, 700, 48), grouped=(64, 2, 261, 4),
                cgrouped=(2, 300, 64, 16)),
}
VARIANTS = ("centered", "offset", "nan")


def _data(rng, shape, dtype, variant, const_axis):
    """offset + N(0, 1) with one constant slice along ``const_axis`` (index 1). The constant
    is dyadic (offset + 0.5), so every summation order gives its mean exactly and x - mean
    is exactly 0 in every implementation; a constant whose float64 mean rounds (offset +
    0.1) is amplified by 1/sqrt(eps) into ~1e-8 differences between orders, which is the
    kernels' own test of exact constant channels to settle, not this comparison."""
    offset = 0.0 if variant == "centered" else 1e4
    x = offset + rng.standard_normal(shape)
    idx = [slice(None)] * len(shape)
    idx[const_axis] = 1
    x[tuple(idx)] = offset + 0.5
    if variant == "nan":
        x.flat[x.size // 2 + 3] = np.nan
    return x.astype(dtype)


def _unit_stats(rng, shape):
    """Plausible per-unit (mean, m2) with a zero-variance unit."""
    mean, m2 = rng.normal(5, 2, shape), rng.uniform(0.5, 30, shape)
    m2.flat[0] = 0.0
    return mean, m2


def cases(name, dtype, size, rng):
    T = np.dtype(dtype)
    sh = SHAPES[size]
    R, M = sh["rows"]
    P, Q, C = sh["channels"]
    for v in VARIANTS:
        x = _data(rng, (R, M), T, v, 0)                        # row 1 constant
        dy = rng.standard_normal((R, M)).astype(T)
        w, b = rng.normal(1, 0.3, M).astype(T), rng.normal(0, 0.3, M).astype(T)
        m64 = x.astype(F64).mean(axis=1)
        r64 = 1.0 / np.sqrt(x.astype(F64).var(axis=1) + 1e-5)
        per = [rng.standard_normal(R) for _ in range(3)]
        xc = _data(rng, (P, Q, C), T, v, 2)                    # channel 1 constant
        dyc = rng.standard_normal((P, Q, C)).astype(T)
        mc = xc.astype(F64).mean(axis=1)
        pc = [rng.standard_normal((P, C)) for _ in range(3)]
        B = max(1, min(64, R // 16))
        if name == "rows_fwd":
            for wb, rms in (((w, b), False), ((None, None), False), ((w, None), True)):
                yield (f"{v} rms={rms} w={wb[0] is not None}",
                       [x, *wb, 1e-5, rms, np.empty_like(x), np.empty(R, T), np.empty(R, T)],
                       (5, 6, 7))
        elif name == "rows_bwd":
            for wt, parts, rms in ((w, (B, B), False), (None, (None, B), False),
                                   (w, (B, None), True)):
                dw = None if parts[0] is None else np.empty((B, M))
                db = None if parts[1] is None else np.empty((B, M))
                mean = np.zeros(R, T) if rms else m64.astype(T)
                yield (f"{v} rms={rms} w={wt is not None}",
                       [dy, x, mean, r64.astype(T), wt, rms, np.empty_like(x), dw, db],
                       tuple(i for i, a in ((6, 1), (7, dw), (8, db)) if a is not None))
        elif name == "rows_moments":
            yield v, [x, np.empty(R), np.empty(R)], (1, 2)
        elif name == "rows_scale_shift":
            yield v, [x, m64, per[0], per[1], np.empty_like(x)], (4,)
        elif name == "rows_dot":
            yield v, [dy, x, m64, np.empty(R), np.empty(R)], (3, 4)
        elif name == "rows_bwd_apply":
            yield v, [dy, x, m64, *per, np.empty_like(x)], (6,)
        elif name in ("rows_fwd_grouped", "rows_bwd_grouped"):
            Rg, K, S, G = sh["grouped"]
            xg = _data(rng, (Rg, K, S), T, v, 0)
            if name == "rows_fwd_grouped":
                wg, bg = rng.normal(1, 0.3, (G, K)).astype(T), rng.normal(0, 0.3, (G, K)).astype(T)
                for wb in ((wg, bg), (None, bg), (None, None)):
                    yield (f"{v} w={wb[0] is not None} b={wb[1] is not None}",
                           [xg, *wb, 1e-5, np.empty_like(xg), np.empty(Rg, T), np.empty(Rg, T)],
                           (4, 5, 6))
            else:
                dyg = rng.standard_normal((Rg, K, S)).astype(T)
                mg = xg.astype(F64).mean(axis=(1, 2))
                rg = 1.0 / np.sqrt(xg.astype(F64).var(axis=(1, 2)) + 1e-5)
                for wt in (rng.normal(1, 0.3, (G, K)), None):
                    yield (f"{v} w={wt is not None}",
                           [dyg, xg, mg, rg, wt, np.empty_like(xg), np.empty((Rg, K)),
                            np.empty((Rg, K))], (5, 6, 7))
        elif name == "channels_moments":
            yield v, [xc, np.empty((P, C)), np.empty((P, C))], (1, 2)
        elif name == "channels_scale_shift":
            yield v, [xc, mc, pc[0], pc[1], np.empty_like(xc)], (4,)
        elif name == "channels_dot":
            yield v, [dyc, xc, mc, np.empty((P, C)), np.empty((P, C))], (3, 4)
        elif name == "channels_bwd_apply":
            yield v, [dyc, xc, mc, *pc, np.empty_like(xc)], (6,)
        elif name == "channels_fwd_grouped":
            Pg, Qg, Cg, G = sh["cgrouped"]
            xq = _data(rng, (Pg, Qg, Cg), T, v, 2)
            wq, bq = rng.normal(1, 0.3, Cg).astype(T), rng.normal(0, 0.3, Cg).astype(T)
            for g, wb in ((G, (wq, bq)), (Cg, (None, bq)), (1, (wq, None))):
                yield (f"{v} G={g}",
                       [xq, *wb, 1e-5, np.empty_like(xq), np.empty((Pg, g), T),
                        np.empty((Pg, g), T)], (4, 5, 6))
        elif name == "channels_eval":
            xe = _data(rng, (P * Q, C), T, v, 1)
            mean, var = rng.normal(1e4 if v != "centered" else 0, 1, C), rng.uniform(0.5, 2, C)
            for wb in ((w[:C], b[:C]), (None, None)):
                yield (f"{v} w={wb[0] is not None}",
                       [xe, mean.astype(T), var.astype(T), *wb, 1e-5, np.empty_like(xe)], (6,))
        else:
            yield from _phase_cases(name, T, v, rng, sh)


def _phase_cases(name, T, v, rng, sh):
    """The per-unit phase kernels: batch norm rows (Pp=A, Pg=1), instance norm (Pp=Pg=N,
    cg=1) and group norm (cg > 1) layouts of the same (P', C) grid."""
    if v == "nan":      # the phases see finite statistics; NaN is the data kernels' matter
        return
    P, Q, C = sh["channels"]
    Cg = sh["cgrouped"][2]
    Gg = sh["cgrouped"][3]
    grids = [("batch rows", 4, 1, C, 1), ("instance", P, P, C, 1),
             ("group", P, P, Cg, Cg // Gg)]
    for label, Pp, Pg, Cx, cg in grids:
        G = Cx // cg
        w, b = rng.uniform(0.5, 2, Cx), rng.normal(size=Cx)
        mean, m2 = _unit_stats(rng, (Pg, G))
        if v == "offset":
            mean += 1e4
        rstd = rng.uniform(0.5, 2, (Pg, G))
        sdy, sdx = rng.standard_normal((Pg, Cx)), rng.standard_normal((Pg, Cx))
        n = 10.0 * cg
        tag = f"{v} {label}"
        if name == "merge_equal":
            K = 3
            pm, pq = _unit_stats(rng, (Pg, K, G))
            yield tag, [pm, pq, 7, np.empty((Pg, G)), np.empty((Pg, G))], (3, 4)
        elif name == "finalize":
            for clamp, wb in ((True, (w, b)), (False, (None, None))):
                yield (f"{tag} clamp={clamp}",
                       [mean, m2, n, 1e-5, clamp, *wb, cg, np.empty((Pp, Cx)),
                        np.empty((Pp, Cx)), np.empty((Pp, Cx)), np.empty((Pg, G), T),
                        np.empty((Pg, G), T)], (8, 9, 10, 11, 12))
        elif name == "running_update" and cg == 1:
            rm, rv = rng.normal(size=Cx).astype(T), rng.uniform(0.5, 2, Cx).astype(T)
            bm, bq = _unit_stats(rng, (Pg, Cx))
            yield tag, [bm, bq, n - 1, 0.9, 0.1, rm, rv], (5, 6)
        elif name == "spread":
            yield tag, [mean, cg, np.empty((Pp, Cx))], (2,)
        elif name == "column_sums":
            part = rng.standard_normal((Pp, Cx))
            yield tag, [part, np.empty(Cx, T)], (1,)
        elif name == "group_sums":
            for wt in (w, None):
                yield (f"{tag} w={wt is not None}",
                       [sdy, sdx, wt, cg, np.empty((Pg, G)), np.empty((Pg, G))], (4, 5))
        elif name == "backward_coefs":
            sg, sgx = rng.standard_normal((Pg, G)), rng.standard_normal((Pg, G))
            for training, wt in ((True, w), (False, None)):
                yield (f"{tag} training={training}",
                       [wt, rstd, sg, sgx, n, training, cg, np.empty((Pp, Cx)),
                        np.empty((Pp, Cx)), np.empty((Pp, Cx))], (7, 8, 9))
        elif name == "weight_grads":
            for gw, gb in ((np.empty(Cx, T), np.empty(Cx, T)), (None, np.empty(Cx, T))):
                yield (f"{tag} gw={gw is not None}", [sdy, sdx, rstd, cg, gw, gb],
                       tuple(i for i, a in ((4, gw), (5, gb)) if a is not None))


def _copy(a):
    return a.copy() if isinstance(a, np.ndarray) else a


def run_case(fn, args, outs, to_device=None, to_host=None):
    """Call ``fn`` on copies of ``args`` (moved with ``to_device`` when given); returns the
    arrays at positions ``outs`` as host arrays."""
    call = [_copy(a) for a in args]
    if to_device is not None:
        call = [to_device(a) if isinstance(a, np.ndarray) else a for a in call]
    fn(*call)
    got = [call[i] for i in outs]
    return [to_host(g) for g in got] if to_host is not None else got


def check_entry(name, fns, twin, dtype, size, seed=0, variants=VARIANTS, to_device=None,
                to_host=None, same_bits=True):
    """Every case of kernel ``name``: each of ``fns`` against ``twin`` (the tolerance of
    tests/conftest.py for ``dtype``, same NaN pattern) and, with ``same_bits``, all of
    ``fns`` (serial and parallel) bit for bit. Returns the number of cases run."""
    from conftest import assert_close
    rng = np.random.default_rng(seed)
    n = 0
    for label, args, outs in cases(name, dtype, size, rng):
        if label.split()[0] not in variants:
            continue
        n += 1
        want = run_case(twin, args, outs)
        runs = [run_case(f, args, outs, to_device, to_host) for f in fns]
        for k, got in enumerate(runs):
            for i, g, e in zip(outs, got, want):
                assert_close(g, e, dtype, f"{name} [{label}] {np.dtype(dtype)} {size} "
                             f"kernel {k} output {i}")
        if same_bits:
            for got in runs[1:]:
                for i, g, e in zip(outs, got, runs[0]):
                    np.testing.assert_array_equal(
                        g, e, err_msg=f"{name} [{label}] {size}: serial != parallel, output {i}")
    return n
