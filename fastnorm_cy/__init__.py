"""Cython backend: ahead-of-time kernels with explicit SIMD and runtime ISA dispatch.

``KERNELS = {name: (serial, parallel)}`` with the names and signatures of
``fastnorm.reference`` (its module docstring is the contract), plus ``channels_eval``
(eval-mode normalization with fixed statistics, fused; see ``fastnorm._dispatch.FUSED``).
Importing this package raises ImportError when the extension was not built (``pip install .``
warns and installs the Numba backend only); ``fastnorm._dispatch`` then falls back to Numba.
"""
try:
    from . import _kernels
except ImportError:
    # Run inside a source checkout (`python -m fastnorm bench` in the clone, as the README
    # says): this directory shadows the installed package and holds no compiled extension,
    # but `pip install .` put one in site-packages. Look in every fastnorm_cy on sys.path.
    import pkgutil
    __path__ = pkgutil.extend_path(__path__, __name__)
    try:
        from . import _kernels
    except ImportError as e:  # the extension was not compiled (the message is misleading)
        raise ImportError("the Cython backend is not built: its C extension failed to compile "
                          "at install time (`pip install -v .` shows why) or this source "
                          "checkout has not run `python setup.py build_ext --inplace`; "
                          "fastnorm uses Numba instead") from e
from ._kernels import get_num_threads, info, set_num_threads, simd_select  # noqa: E402

KERNELS = {name: (getattr(_kernels, name), getattr(_kernels, name + "_parallel"))
           for name in ("rows_fwd", "rows_fwd_grouped", "rows_bwd", "rows_moments",
                        "rows_scale_shift", "rows_dot", "rows_bwd_apply", "rows_bwd_grouped",
                        "channels_moments", "channels_scale_shift", "channels_dot",
                        "channels_bwd_apply", "channels_fwd_grouped", "channels_eval")}

__all__ = ["KERNELS", "set_num_threads", "get_num_threads", "info", "simd_select"]
