"""fastnorm: batch, layer, group, instance and RMS normalization for NumPy arrays."""
from ._dispatch import available as available_backends
from ._dispatch import get_num_threads, set_num_threads, use_backend
from .api import (batch_norm, batch_norm_backward, group_norm, group_norm_backward,
                  instance_norm, instance_norm_backward, layer_norm, layer_norm_backward,
                  rms_norm, rms_norm_backward)
from . import nn, optim
from .autograd import Tensor, no_grad
from .moments import Moments, moments

__version__ = "0.1.0"

__all__ = ["batch_norm", "batch_norm_backward", "layer_norm", "layer_norm_backward",
           "group_norm", "group_norm_backward", "instance_norm", "instance_norm_backward",
           "rms_norm", "rms_norm_backward", "Tensor", "use_backend", "set_num_threads",
           "get_num_threads", "available_backends", "no_grad", "nn", "optim",
           "moments", "Moments"]
