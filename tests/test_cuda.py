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
HAVE_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
needs_numba_cuda = pytest.mark.skipif(
    not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed (pip install 'fastnorm[cuda]')")


def _python(code, **env):
    """Run ``code`` in a fresh interpreter (repo on the path); returns the completed process."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=300)


@needs_numba_cuda
def test_kernels_and_api_under_the_simulator(tmp_path):
    """Runs tests/cuda_sim_check.py with NUMBA_ENABLE_CUDASIM=1 and reports its failures."""
    report = tmp_path / "cuda_sim.xml"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env.pop("FASTNORM_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         f"--junitxml={report}", str(HERE / "cuda_sim_check.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert report.exists(), f"the simulator run wrote no report (rc={proc.returncode}):\n{tail}"
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
        "simulator tests failed:\n" + "\n".join(failed) + "\n\n" + tail)
    assert ran >= 20, f"only {ran} simulator tests ran:\n{tail}"


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
