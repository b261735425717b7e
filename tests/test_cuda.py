"""The CUDA backend: simulator tests in a subprocess, and the import contract.

``NUMBA_ENABLE_CUDASIM`` is read when numba.cuda is first imported, so the kernel and API
tests (tests/cuda_sim_check.py) run in a child pytest with it set, away from this process.
Without numba-cuda they skip with the reason; the import-contract tests run either way.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
try:
    HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
except (ImportError, ValueError):  # a broken or blocked install counts as missing
    HAVE_NUMBA_CUDA = False
needs_numba_cuda = pytest.mark.skipif(
    not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed (pip install 'fastnorm[cuda]')")


def _python(code, **env):
    """Run ``code`` in a fresh interpreter (repo on the path); returns the completed process."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=300)


def _run_check_file(tmp_path, env):
    """tests/cuda_sim_check.py in a child pytest with ``env``; fails with its failures."""
    report = tmp_path / "cuda_check.xml"
    env = dict({k: v for k, v in os.environ.items()
                if k not in ("FASTNORM_BACKEND", "NUMBA_ENABLE_CUDASIM")}, **env)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         f"--junitxml={report}", str(HERE / "cuda_sim_check.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert report.exists(), f"the CUDA test run wrote no report (rc={proc.returncode}):\n{tail}"
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    ran = int(suite.get("tests")) - int(suite.get("skipped"))
    failed = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)   # (an Element without children is falsy: test for None)
            if node is not None:
                failed.append(f"{case.get('name')}: {node.get('message', '')}")
    assert not failed and proc.returncode == 0, (
        "CUDA tests failed:\n" + "\n".join(failed) + "\n\n" + tail)
    assert ran >= 20, f"only {ran} CUDA tests ran:\n{tail}"


@needs_numba_cuda
def test_kernels_and_api_under_the_simulator(tmp_path):
    """Every kernel and public function, fwd and bwd, float32/64, under NUMBA_ENABLE_CUDASIM=1."""
    _run_check_file(tmp_path, {"NUMBA_ENABLE_CUDASIM": "1"})


@needs_numba_cuda
def test_kernels_and_api_on_a_gpu(tmp_path):
    """The same tests on a real NVIDIA GPU (warp-shuffle path), where one is present."""
    probe = _python("from numba import cuda; print(cuda.is_available())",
                    NUMBA_ENABLE_CUDASIM="0")
    if probe.stdout.strip() != "True":
        pytest.skip("no CUDA GPU here (the simulator test covers the kernels' logic)")
    _run_check_file(tmp_path, {"FASTNORM_CUDA_DEVICE": "1"})


@needs_numba_cuda
def test_gpu_kernels_compile_to_ptx():
    """The warp-shuffle (real GPU) path of every kernel compiles to PTX for sm_90.

    No GPU is needed, only the CUDA compiler libraries (NVVM, NVRTC; e.g. from
    ``pip install 'numba-cuda[cu12]'``): without them this skips.
    """
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, __file__, "--ptx"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip()[-300:])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "shfl.sync: 0" not in proc.stdout, proc.stdout


def _ptx_main():
    """Compile every kernel of fastnorm._cuda to PTX (sm_90) for float32 and float64, with
    and without the optional arrays. Exit 77 when the CUDA compiler libraries are missing."""
    import types as pytypes

    sys.path.insert(0, str(ROOT))
    import numba.cuda.dispatcher as disp
    from numba import cuda, types as t

    from fastnorm import _cuda as K
    assert K.USE_SHUFFLE and not K.SIMULATOR
    # device functions ask the current device for its compute capability: an H100's
    disp.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
    try:
        cuda.compile_ptx(lambda a: None, (t.float64[:],), cc=(9, 0))
    except Exception as e:  # noqa: BLE001 - any failure here is a missing toolchain
        print(f"CUDA compiler libraries not available: {type(e).__name__}: {e}")
        return 77
    f64, b1, i8, N = t.float64, t.boolean, t.int64, t.none

    def arr(dt, nd):
        return t.Array(dt, nd, "C")
    sigs = []
    d1, d2, d3 = arr(f64, 1), arr(f64, 2), arr(f64, 3)
    for T in (t.float32, t.float64):
        t1, x2, x3 = arr(T, 1), arr(T, 2), arr(T, 3)
        for w in (t1, N):
            for b in (t1, N):
                sigs.append(("_rows_fwd_k", (x2, w, b, f64, b1, x2, t1, t1)))
            sigs.append(("_rows_bwd_dx_k", (x2, x2, t1, t1, w, b1, x2)))
            sigs.append(("_finalize_k", (d2, d2, f64, f64, b1, w, w, i8, d2, d2, d2, x2, x2)))
            sigs.append(("_backward_coefs_k", (w, x2, d2, d2, f64, b1, i8, d2, d2, d2)))
        for dw, db in ((d2, d2), (N, d2), (d2, N)):
            sigs.append(("_rows_bwd_wgrad_part_k", (x2, x2, t1, t1, i8, dw, db)))
        sigs += [("_rows_moments_k", (x2, d1, d1)), ("_rows_dot_k", (x2, x2, d1, d1, d1)),
                 ("_rows_scale_shift_k", (x2, d1, d1, d1, x2)),
                 ("_rows_bwd_apply_k", (x2, x2, d1, d1, d1, d1, x2)),
                 ("_channels_moments_part_k", (x3, d3, d3)),
                 ("_channels_dot_part_k", (x3, x3, d2, d3, d3)),
                 ("_channels_scale_shift_k", (x3, d2, d2, d2, x3)),
                 ("_channels_bwd_apply_k", (x3, x3, d2, d2, d2, d2, x3)),
                 ("_finalize_k", (x2, x2, f64, f64, b1, d1, N, i8, d2, d2, d2, x2, x2)),
                 ("_running_update_k", (d2, d2, f64, f64, f64, t1, t1)),
                 ("_weight_grads_k", (d2, d2, x2, i8, t1, t1)),
                 ("_weight_grads_k", (d2, d2, x2, i8, N, t1)),
                 ("_column_sums_k", (d2, t1)), ("_spread_k", (x2, i8, d2))]
    sigs += [("_channels_moments_merge_k", (d3, d3, i8, d2, d2)), ("_sum_mid_k", (d3, d3, d2, d2)),
             ("_group_sums_k", (d2, d2, d1, i8, d2, d2)),
             ("_group_sums_k", (d2, d2, N, i8, d2, d2))]
    shfl = 0
    for name, sig in sigs:
        ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, sig, cc=(9, 0))
        shfl += ptx.count("shfl.sync")
    print(f"{len(sigs)} kernel signatures compiled to PTX (sm_90), shfl.sync: {shfl}")
    return 0


def test_import_fastnorm_does_not_import_cuda():
    proc = _python("""
        import sys, numpy as np, fastnorm as fn
        fn.layer_norm(np.ones((2, 3)), 3)
        fn.available_backends()
        assert "fastnorm._cuda" not in sys.modules, "fastnorm imported its cuda backend"
        assert "numba_cuda" not in sys.modules, "fastnorm imported numba-cuda"
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_missing_numba_cuda_is_a_clear_import_error():
    """With numba-cuda unimportable, the cuda backend is unavailable with an explanation."""
    proc = _python("""
        import sys
        sys.modules["numba_cuda"] = None          # as if it were not installed
        import numpy as np, fastnorm as fn
        from fastnorm import _dispatch
        try:
            import fastnorm._cuda
        except ImportError as e:
            assert "numba-cuda" in str(e), str(e)
        else:
            raise AssertionError("fastnorm._cuda imported without numba-cuda")
        assert _dispatch._load("cuda") is False
        assert "numba-cuda" in _dispatch._FAILED["cuda"]
        try:
            fn.layer_norm(np.ones((2, 3)), 3, backend="cuda")
        except ImportError as e:
            assert "numba-cuda" in str(e)
        else:
            raise AssertionError("backend='cuda' ran without numba-cuda")
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


if __name__ == "__main__" and sys.argv[1:] == ["--ptx"]:
    sys.exit(_ptx_main())
