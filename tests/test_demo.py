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
