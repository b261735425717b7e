"""python -m fastnorm info: what resolved on this machine."""
import os
import platform
import sys

import numpy as np

from . import __version__, _dispatch


def add_arguments(parser):
    pass


def collect():
    """A dict of versions, backends and threads (also written into bench --json)."""
    info = {
        "fastnorm": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": _dispatch.get_num_threads(),
        "backends": _dispatch.available(),
        "default_backend": _dispatch.default_backend(),
        "unavailable": dict(_dispatch._FAILED),
    }
    for name, mod in _dispatch._MODS.items():
        if hasattr(mod, "info"):
            info[name] = mod.info()
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(args):
    for key, value in collect().items():
        if isinstance(value, dict):
            for k, v in value.items():
                print(f"{key + '.' + k:24s} {v}")
        else:
            print(f"{key:24s} {value}")
