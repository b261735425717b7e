"""Numba backend: KERNELS maps each kernel name to its (serial, parallel) dispatchers."""
import numba

from . import channels, rows
from .. import reference as _reference

KERNELS = {name: getattr(rows if name.startswith("rows") else channels, name)
           for name in _reference.KERNELS}


def set_num_threads(n):
    # numba's thread count is per calling thread; the dispatcher calls this before each
    # parallel launch when it differs.
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def get_num_threads():
    return numba.get_num_threads()


def info():
    return {"numba": numba.__version__, "threading_layer": _threading_layer()}


def _threading_layer():
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return "not initialized (" + numba.config.THREADING_LAYER + ")"
