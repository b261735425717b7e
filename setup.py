"""Builds the Cython backend ``fastnorm_cy``; the project metadata lives in pyproject.toml.

One ``cythonize()`` over ``fastnorm_cy/*.pyx`` with the directives set once here.
``FASTNORM_CYTHON_DEBUG=1`` turns Cython's checks back on and builds with ``-O0 -g``.
If the C build fails with OpenMP, the extension is built again without it (serial kernels);
if that fails too (no compiler), the extension is optional: the install goes on without it
and fastnorm runs on its Numba backend. ``FASTNORM_REQUIRE_CYTHON=1`` (CI) makes it required.
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
OPENMP = {"-fopenmp", "/openmp"}


class BuildExt(build_ext):
    """build_ext with each compiler's OpenMP flags, and a serial build if OpenMP fails."""

    def build_extension(self, ext):
        cflags, lflags = FLAGS.get(self.compiler.compiler_type, FLAGS["unix"])
        base_c, base_l = list(ext.extra_compile_args), list(ext.extra_link_args)
        ext.extra_compile_args, ext.extra_link_args = base_c + cflags, base_l + lflags
        try:
            return super().build_extension(ext)
        except Exception as e:  # CompileError, LinkError: no OpenMP here
            self.warn(f"building {ext.name} with OpenMP failed ({e}); trying without")
        ext.extra_compile_args = base_c + [f for f in cflags if f not in OPENMP]
        ext.extra_link_args = base_l + [f for f in lflags if f not in OPENMP]
        super().build_extension(ext)  # fails: an optional extension is skipped, with a warning
        self.warn(f"{ext.name} was built WITHOUT OpenMP: its kernels run on one thread")


extensions = Extension(
    "fastnorm_cy.*",
    ["fastnorm_cy/*.pyx"],
    include_dirs=[np.get_include(), "fastnorm_cy"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
                   ("FN_CYTHON_VERSION", f'"{cython_version}"'),
                   ("FN_DEBUG_CHECKS", str(int(DEBUG)))],
    depends=["fastnorm_cy/_simd.h", "fastnorm_cy/_simd_isa.h", "fastnorm_cy/_simd_body.h"],
)
ext_modules = cythonize([extensions], compiler_directives=DIRECTIVES, quiet=True)
for ext in ext_modules:  # (cythonize drops ``optional`` from a wildcard template)
    # a failed build skips the extension (fastnorm then runs on Numba); CI requires it
    ext.optional = not REQUIRE

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)
