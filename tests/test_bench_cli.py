"""python -m fastnorm bench on tiny shapes: case table, timing loop, checks, table and JSON.

Fast (a few seconds once the kernels are cached): the real benchmark runs on full shapes,
these tests only exercise its code paths and the decisions it prints.
"""
import json
import sys

import numpy as np
import pytest

from fastnorm import _bench as B
from fastnorm import _floor
from fastnorm.__main__ import main

TINY = ["--quick", "--no-default-shapes", "--threads", "1", "--rounds", "3",
        "--budget", "0.001", "--no-progress"]


# ------------------------------------------------------------------------- case table

def test_case_table_quick_and_full():
    full, quick = B.cases(), B.cases(quick=True)
    assert {c.variant for c in full} == set(B.VARIANTS)
    assert {(c.variant, c.layout) for c in full} >= {(v, lay) for v in ("batch", "instance",
                                                     "group") for lay in ("NCHW", "NHWC")}
    bn = next(c for c in full if c.variant == "batch" and c.layout == "NCHW")
    assert bn.shape == (32, 64, 56, 56) and bn.label == "BN NCHW 32×64×56×56"
    assert bn.modes == B.MODES and "eval" not in B.Case("layer", "rows", (4, 8)).modes
    # quick shapes stay >= 1 MiB in float32 so the floor target applies to them
    assert all(c.nbytes("float32") >= 2 ** 20 for c in quick)
    assert len(quick) < len(full)   # the 32 MiB page-fault case is full mode only


def test_user_shapes():
    cs = B.cases(variants=("batch", "group", "layer"), shapes=["2x8x3x5"], defaults=False)
    assert [(c.variant, c.layout, c.shape) for c in cs] == [
        ("batch", "NCHW", (2, 8, 3, 5)), ("batch", "NHWC", (2, 3, 5, 8)),
        ("group", "NCHW", (2, 8, 3, 5)), ("group", "NHWC", (2, 3, 5, 8)),
        ("layer", "rows", (2, 8, 3, 5))]
    assert cs[2].groups == 8 and cs[3].channels == 8   # gcd(C, 32)
    assert B.cases(shapes=["rms:64x32", "rms:64x32"], defaults=False) == [
        B.Case("rms", "rows", (64, 32))]
    two_d = B.cases(shapes=["16x4"], defaults=False)   # no spatial dims: no instance/group
    assert {c.variant for c in two_d} == {"batch", "layer", "rms"}


@pytest.mark.parametrize("bad", ["32", "4xq", "0x4", "foo:4x4"])
def test_bad_shape(bad):
    with pytest.raises(ValueError, match="--shape"):
        B.parse_shape(bad)


@pytest.mark.parametrize("argv, word", [(["--threads", "0"], "--threads"),
                                        (["--dtype", "float16"], "--dtype"),
                                        (["--mode", "fwd"], "--mode"),
                                        (["--peers", "jax"], "--peers"),
                                        (["--shape", "3"], "--shape")])
def test_bad_options_exit_with_the_option_named(argv, word):
    with pytest.raises(SystemExit, match=word):
        main(["bench"] + TINY + argv)


# ------------------------------------------------------------------------------ floor

def test_floor_loops_compute_their_passes():
    x = np.arange(1000, dtype=np.float32) / 7
    a = np.linspace(-1, 1, 1000).astype(np.float32)
    y = np.empty_like(x)
    assert _floor._sum(x) == pytest.approx(x.astype(np.float64).sum(), rel=1e-12)
    assert _floor._dot(a, x) == pytest.approx((a.astype(np.float64) * x).sum(), rel=1e-9)
    _floor._shift(x, np.float32(2), y)
    np.testing.assert_array_equal(y, x - np.float32(2))
    _floor._axpby(a, x, np.float32(0.5), np.float32(3), y)
    np.testing.assert_allclose(y, 0.5 * a + 3 * x, rtol=1e-6)
    cl = np.ascontiguousarray(np.ones((2, 3, 4, 5)).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    flat = _floor._flat(cl)
    assert flat.shape == (120,) and np.shares_memory(flat, cl)
    with pytest.raises(ValueError):
        _floor._flat(np.ones((4, 6))[:, ::2])
    with pytest.raises(ValueError, match="mode"):
        _floor.floor_fn("inference", x, x, 1)


# ------------------------------------------------------------------------------ timing

def test_measure_rotates_and_reports_every_callable():
    seen, calls = {}, {"a": 0, "b": 0}

    def make(name):
        def f():
            calls[name] += 1
            return name
        return f
    out = B.measure({"a": make("a"), "b": make("b")}, rounds=4, budget=1.0, target=1e-4,
                    on_first=lambda n, r: seen.setdefault(n, r), settle=0)
    assert seen == {"a": "a", "b": "b"}
    for name, (sec, timed, samples) in out.items():
        assert 0 < sec < 1e-3 and timed >= 4 and len(samples) == 4
        assert sec == sorted(samples)[1] / 2 + sorted(samples)[2] / 2   # the median
        # warm-up and calibration calls, then one untimed priming call per sample
        assert calls[name] >= timed + len(samples) + 2


def test_paired_ratio_cancels_a_slow_phase():
    # rounds 1 and 2 ran while the machine was 10x slower for "a" and "b" alike, but
    # the phase started between a's and b's samples of round 1
    a, b = [1.0, 10.0, 10.0], [2.0, 2.0, 20.0]
    assert B.paired_ratio(a, b) == 0.5          # the median of the medians' ratio: 5.0
    assert B.paired_ratio(a, b[:2]) == (0.5 + 5.0) / 2
    assert B.paired_ratio(a, []) is None
    row = {"impls": {"x": {"ms": 10.0, "samples_ms": a}, "y": {"ms": 2.0, "samples_ms": b},
                     "z": {"ms": 4.0}}}
    assert B.ratio_of(row, "x", "y") == 0.5
    assert B.ratio_of(row, "x", "z") == 2.5     # no samples: ratio of the medians
    assert B.ratio_of(row, "x", "w") is None


def test_shortfalls_name_each_missed_target():
    row = {"mode": "forward", "variant": "batch", "layout": "NCHW", "mib": 24.5,
           "default": "fastnorm[numba]",
           "impls": {"fastnorm[numba]": {"ms": 4.0}, "floor": {"ms": 2.0},
                     "out=": {"ms": 2.2}, "torch": {"ms": 8.0}, "numpy": {"ms": 90.0},
                     "onnxruntime": {"ms": 3.0}}}
    assert B.shortfalls(row) == ["0.75× onnxruntime (slower)", "floor/ours 0.50 (out= 0.91)",
                                 "2.0× torch < 3×"]
    row["impls"].update({"fastnorm[numba]": {"ms": 2.4}, "onnxruntime": {"na": "x"}})
    assert B.shortfalls(row) == []
    row.update(mode="backward", layout="NHWC")   # no peer or 3× target on backward
    row["impls"]["torch"] = {"ms": 1.0}
    assert B.shortfalls(row) == []


# ---------------------------------------------------------------------- end to end

def test_cli_writes_table_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "b.json", tmp_path / "b.md"
    assert main(["bench"] + TINY + ["--shape", "layer:64x32", "--shape", "batch:4x8x3x3",
                                    "--peers", "numpy", "--json", str(js),
                                    "--markdown", str(md)]) == 0
    report = json.loads(js.read_text())
    rows = report["results"]
    assert [(r["case"], r["mode"]) for r in rows] == (   # in the order of the --shape options
        [("LN 64×32", m) for m in ("forward", "backward", "forward+backward")]
        + [("BN NCHW 4×8×3×3", m) for m in B.MODES] + [("BN NHWC 4×3×3×8", m) for m in B.MODES])
    for r in rows:
        assert r["bytes"] == B.PASSES[r["mode"]] * 4 * np.prod(r["shape"])
        for name in ("floor", r["default"], "numpy"):
            assert r["impls"][name]["ms"] > 0 and r["impls"][name]["gbps"] > 0
        assert ("out=" in r["impls"]) == (r["mode"] in ("forward", "eval"))
        assert not r["impls"][r["default"]].get("mismatch")
        assert r["impls"][r["default"]]["max_rel_err"] < 1e-5
    meta = report["meta"]
    assert meta["versions"]["numpy"] == np.__version__ and meta["cpu"] and meta["cores"] >= 1
    text = md.read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "#### float32, 1 thread" in text and "| case " in text and "floor/ours" in text
    assert ("Command: `python -m fastnorm bench --quick --threads 1 --shape layer:64x32 "
            "--shape batch:4x8x3x3 --no-default-shapes --peers numpy --rounds 3 --budget 0.001 "
            f"--json {js} --markdown {md} --no-progress`") in text
    assert "torch" not in text.split("Columns:")[1]   # not asked for: no empty columns


def test_missing_and_wrong_peers_are_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)        # import torch -> ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    p = B.Problem(B.Case("layer", "rows", (16, 8)), "float32")
    row = B.run_case(p, "forward", 1, ["numba"], "numba", ["numpy", "torch", "onnxruntime"],
                     rounds=3, budget=0.001)
    assert row["impls"]["torch"] == {"na": "torch is not installed"}
    assert row["impls"]["onnxruntime"]["na"].endswith("is not installed")
    meta = B.metadata(["numpy", "torch", "onnxruntime"])
    assert any(m.startswith("torch:") for m in meta["missing"])
    # a peer whose output is wrong is flagged, not silently timed
    good = B.fastnorm_fn

    def wrong(p, mode, backend, out=False):
        fn, conv = good(p, mode, backend, out)
        return (lambda: fn() + (backend == "numba")), conv
    monkeypatch.setattr(B, "fastnorm_fn", wrong)
    row = B.run_case(p, "forward", 1, ["numba"], "numba", ["numpy"], rounds=3, budget=0.001)
    assert row["impls"]["fastnorm[numba]"]["mismatch"] is True
    assert "✗" in B.markdown_table([row])


def test_plot_needs_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="matplotlib"):
        main(["bench"] + TINY + ["--shape", "rms:8x8", "--plot", str(tmp_path / "p.png")])


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    main(["bench"] + TINY + ["--shape", "rms:8x8", "--mode", "forward", "--peers", "numpy",
                             "--json", str(js), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("peer", ["torch", "onnxruntime"])
def test_installed_peers_run_every_case_and_agree(peer):
    pytest.importorskip(peer)
    if peer == "onnxruntime":
        pytest.importorskip("onnx")
    expect_na = {"onnxruntime": lambda c, m: (c.layout == "NHWC" or "backward" in m
                                              or (c.variant == "instance" and m == "eval")),
                 "torch": lambda c, m: False}[peer]
    # batch: both layouts (torch's channels_last strides); group: ONNX's stash_type; rms
    for case in B.cases(shapes=["3x64x4x5", "rms:6x16"], variants=("batch", "group", "rms"),
                        defaults=False):
        p = B.Problem(case, "float32")
        for mode in case.modes:
            row = B.run_case(p, mode, 1, ["numba"], "numba", ["numpy", peer], rounds=3,
                             budget=0.001, reuse=False, target=1e-4)
            got = row["impls"][peer]
            where = f"{peer} {case.label} {mode}"
            if expect_na(case, mode):
                assert "na" in got, where
            else:
                assert got["ms"] > 0 and got["max_rel_err"] < 1e-4, (where, got)
