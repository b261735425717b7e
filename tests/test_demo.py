"""python -m fastnorm demo, in a tiny version (a few steps) so CI stays fast."""
import argparse
import subprocess
import sys

import numpy as np
import pytest

from fastnorm import demo


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(["--steps", "12", "--eval-every", "4", "--hidden", "16",
                              "--no-progress", "--out", str(tmp_path / "demo.png"),
                              *extra])


def test_importing_the_demo_stays_cheap():
    code = ("import sys, fastnorm.demo, fastnorm.__main__; "
            "print(sorted(m for m in ('sklearn', 'matplotlib', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_tiny_demo_writes_png_and_tables(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    args = _args(tmp_path)
    assert demo.run(args) == 0
    png = tmp_path / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    out = capsys.readouterr().out
    assert "validation accuracy against step" in out
    assert "steps to reach run (a)'s final accuracy" in out
    for label, *_ in demo.RUNS:
        assert out.count(label) == 2, label          # one row in each table
    steps_row = next(line for line in out.splitlines() if line.startswith("step "))
    assert steps_row.split()[1:] == ["0", "4", "8", "12"]


def test_train_run_learns_and_is_reproducible():
    pytest.importorskip("sklearn")
    data = demo.load_digits(0)
    assert data[0].shape[1] == 64 and data[0].max() <= 1.0
    args = argparse.Namespace(steps=60, batch_size=60, hidden=32, eval_every=30, seed=3)
    st, acc, _ = demo.train_run(data, "relu", True, 0.1, args)
    st2, acc2, _ = demo.train_run(data, "relu", True, 0.1, args)
    assert st.tolist() == [0, 30, 60]
    np.testing.assert_array_equal(acc, acc2)
    assert acc[-1] > 0.6 > acc[0]                       # 60 BN steps beat chance by far


def test_build_mlp_variants_share_initial_weights():
    a = demo.build_mlp(64, 20, 10, "relu", False, seed=5)
    b = demo.build_mlp(64, 20, 10, "sigmoid", True, seed=5)
    lin_a = [m.weight.data for m in a if hasattr(m, "in_features")]
    lin_b = [m.weight.data for m in b if hasattr(m, "in_features")]
    assert len(lin_a) == len(lin_b) == 4
    for x, y in zip(lin_a, lin_b):
        np.testing.assert_array_equal(x, y)
    assert sum(type(m).__name__ == "BatchNorm1d" for m in b) == 3


def test_steps_to_reach_and_tables():
    steps = np.array([0, 10, 20, 30])
    assert demo.steps_to_reach(steps, np.array([0.1, 0.5, 0.9, 0.8]), 0.8) == 20
    assert demo.steps_to_reach(steps, np.array([0.1, 0.2, 0.3, 0.4]), 0.8) is None
    res = [("a: base", steps, np.array([0.1, 0.5, 0.7, 0.8]), 1.0),
           ("b: fast", steps, np.array([0.1, 0.9, 0.9, 0.9]), 2.0)]
    lines = demo.format_tables(res).splitlines()
    assert "final accuracy 0.800" in lines[5]            # target = run a's final accuracy
    assert lines[-2].split()[2:4] == ["30", "0.800"]     # a: steps, best accuracy
    assert lines[-1].split()[2:4] == ["10", "0.900"]     # b reaches 0.8 at step 10


def test_bad_arguments_exit(tmp_path):
    with pytest.raises(SystemExit, match="steps"):
        demo.run(_args(tmp_path, "--steps", "0"))
    with pytest.raises(SystemExit, match="lr"):
        demo.run(_args(tmp_path, "--lr", "-1"))


# ------------------------------------------------------------------------- --model cnn

def test_tiny_cnn_demo_writes_figure_and_tables(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    args = _args(tmp_path, "--model", "cnn", "--unit", "3")
    assert demo.run(args) == 0
    png = tmp_path / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    out = capsys.readouterr().out
    assert "CNN conv8-pool-conv16-pool-16 sigmoid-10" in out
    for i, (label, *_) in enumerate(demo.CNN_RUNS):      # a row in each table, and runs
        assert out.count(label) == (5 if i < 2 else 2), label   # a, b: 3 percentile rows
    assert "sigmoid input percentiles 15/50/85 against step" in out
    rows = [line for line in out.splitlines() if line.split()[-5:-4] in (["p15"], ["p85"])]
    assert [r.split()[0] for r in rows] == ["a:", "a:", "b:", "b:"]
    assert all(len(r.split()) == len(r.split(" p")[0].split()) + 5 for r in rows)


def test_train_cnn_run_learns_is_reproducible_and_records_percentiles():
    pytest.importorskip("sklearn")
    data = demo.load_digits(0)
    args = argparse.Namespace(steps=40, batch_size=60, hidden=24, eval_every=20, seed=3,
                              unit=5)
    st, acc, _, pct = demo.train_cnn_run(data, True, 0.2, args)
    st2, acc2, _, pct2 = demo.train_cnn_run(data, True, 0.2, args)
    assert st.tolist() == [0, 20, 40] and pct.shape == (3, 3)
    np.testing.assert_array_equal(acc, acc2)
    np.testing.assert_array_equal(pct, pct2)
    assert np.all(pct[:, 0] <= pct[:, 1]) and np.all(pct[:, 1] <= pct[:, 2])
    assert acc[-1] > 0.6 > acc[0]                        # 40 BN steps beat chance by far


def test_cnn_percentiles_are_the_sigmoid_input_of_the_unit():
    from fastnorm import nn
    from fastnorm.autograd import no_grad
    net = demo.build_cnn(12, True, seed=1)
    x = np.random.default_rng(0).random((30, 1, 8, 8)).astype(np.float32)
    acc, pct = demo.evaluate(net, x, np.zeros(30, np.int64), unit=4)
    assert all(m.training for m in net.modules())         # evaluate() restores train mode
    with no_grad():
        pre = nn.Sequential(*list(net)[:-2]).eval()(x).data     # everything before Sigmoid
    np.testing.assert_allclose(pct, np.percentile(pre[:, 4], demo.PERCENTILES), rtol=1e-6)


def test_build_cnn_variants_share_initial_weights():
    a = demo.build_cnn(20, False, seed=5)
    b = demo.build_cnn(20, True, seed=5)
    wa = [m.weight.data for m in a if hasattr(m, "in_features") or hasattr(m, "in_channels")]
    wb = [m.weight.data for m in b if hasattr(m, "in_features") or hasattr(m, "in_channels")]
    assert len(wa) == len(wb) == 4
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)
    names = [type(m).__name__ for m in b]
    assert names.count("BatchNorm2d") == 2 and names.count("BatchNorm1d") == 1
    assert names.index("BatchNorm1d") + 1 == names.index("Sigmoid")
    # with BN the layers before a batch norm have no bias; the output layer keeps its own
    assert [m.bias is None for m in b if type(m).__name__ in ("Conv2d", "Linear")] == \
        [True] * 3 + [False]
    assert "BatchNorm" not in " ".join(type(m).__name__ for m in a)


def test_cnn_unit_argument_is_checked(tmp_path):
    with pytest.raises(SystemExit, match="unit"):
        demo.run(_args(tmp_path, "--model", "cnn", "--unit", "16"))
