"""fastnorm: batch, layer, group, instance and RMS normalization for NumPy arrays."""
from ._dispatch import available as available_backends
from ._dispatch import get_num_threads, set_num_threads, use_backend
from . import api
from .api import *  # noqa: F401,F403  (the functional API: api.__all__)
from . import nn, optim
from .autograd import Tensor, no_grad
from .moments import Moments, moments

__version__ = "0.1.0"

__all__ = api.__all__ + ["Tensor", "use_backend", "set_num_threads", "get_num_threads",
                         "available_backends", "no_grad", "nn", "optim", "moments",
                         "Moments"]
