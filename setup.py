"""Builds the Cython backend ``fastnorm_cy``; the project metadata lives in pyproject.toml.

One ``cythonize()`` over ``fastnorm_cy/*.pyx`` with the directives set once here.
``FASTNORM_CYTHON_DEBUG=1`` turns Cython's checks back on and builds with ``-O0 -g``.
If the C build fails (no compiler, no OpenMP), the extension is built again without OpenMP
(serial kernels); if that fails too, the install goes on without it and fastnorm runs on
its Numba backend. ``FASTNORM_REQUIRE_CYTHON=1`` (CI) makes a failed build an error.
``FASTNORM_SANITIZE=address`` builds with AddressSanitizer (``-fsanitize=address
-fno-omit-frame-pointer -g``, same optimization); such an extension only loads with libasan
preloaded (README, Reliability: build it into a separate directory with ``build_ext -b``).
"""
import os
import platform

import numpy as np
from Cython import __version__ as cython_version
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("FASTNORM_CYTHON_DEBUG", "") == "1"
REQUIRE = os.environ.get("FASTNORM_REQUIRE_CYTHON", "") == "1"
SANITIZE = os.environ.get("FASTNORM_SANITIZE", "")
if SANITIZE not in ("", "address"):
    raise SystemExit(f"FASTNORM_SANITIZE must be 'address' or unset, got {SANITIZE!r}")

CHECKS = dict(boundscheck=DEBUG, wraparound=DEBUG, initializedcheck=DEBUG)
DIRECTIVES = dict(language_level=3, cdivision=True, **CHECKS)

# compiler type -> (compile args, link args); OpenMP flags are dropped on the retry
FLAGS = {
    "msvc": (["/O2", "/openmp"], []),
    "unix": ((["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"])
             # no errno: lets sqrt vectorize. no-wrapv undoes CPython's -fwrapv, under which
             # GCC cannot prove x + q*C never wraps and the channels statistics loop ran
             # 1.8 ms instead of 1.3 (32x56x56x64 float32, one thread)
             + ["-fno-math-errno", "-fno-wrapv", "-fopenmp"],
             ["-fopenmp"]),
}
if platform.machine().lower() in ("x86_64", "amd64"):
    # GCC's x86-64-v4 clone prefers 256-bit vectors; the kernels are streaming loops that
    # gain from full 512-bit ones (the flag only acts on the AVX-512 clone)
    FLAGS["unix"][0].append("-mprefer-vector-width=512")
if SANITIZE:
    FLAGS["unix"][0].extend([f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"])
    FLAGS["unix"][1].append(f"-fsanitize={SANITIZE}")
OPENMP = {"-fopenmp", "/openmp"}


class OptionalBuildExt(build_ext):
    """build_ext with OpenMP flags per compiler; a failed build warns instead of failing."""

    def build_extension(self, ext):
        cflags, lflags = FLAGS.get(self.compiler.compiler_type, FLAGS["unix"])
        base_c, base_l = list(ext.extra_compile_args), list(ext.extra_link_args)
        serial = ([f for f in cflags if f not in OPENMP], [f for f in lflags if f not in OPENMP])
        attempts = [(cflags, lflags), serial]
        for i, (c, l) in enumerate(attempts):
            ext.extra_compile_args, ext.extra_link_args = base_c + c, base_l + l
            try:
                super().build_extension(ext)
            except Exception as e:  # CompileError, LinkError, missing compiler ...
                what = "with OpenMP" if i == 0 else "without OpenMP"
                self.warn(f"building {ext.name} {what} failed: {e}")
                continue
            if i:
                self.warn(f"{ext.name} was built WITHOUT OpenMP: its kernels run on one thread")
            return
        if REQUIRE:
            raise RuntimeError(f"{ext.name} failed to build and FASTNORM_REQUIRE_CYTHON=1")
        self.warn(f"{ext.name} could not be built: fastnorm will use its Numba backend "
                  "(python -m fastnorm info shows what is available)")

    def run(self):
        try:
            super().run()
        except Exception as e:  # e.g. no C compiler at all
            if REQUIRE:
                raise
            self.warn(f"the Cython backend could not be built ({e}); "
                      "fastnorm will use its Numba backend")


extensions = Extension(
    "fastnorm_cy.*",
    ["fastnorm_cy/*.pyx"],
    include_dirs=[np.get_include(), "fastnorm_cy"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                   ("FN_CYTHON_VERSION", f'"{cython_version}"'),
                   ("FN_DEBUG_CHECKS", str(int(DEBUG)))],
    depends=["fastnorm_cy/_simd.h", "fastnorm_cy/_simd_isa.h", "fastnorm_cy/_simd_body.h"],
)

setup(
    ext_modules=cythonize([extensions], compiler_directives=DIRECTIVES, quiet=True),
    cmdclass={"build_ext": OptionalBuildExt},
)
