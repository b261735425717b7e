"""The case table shared by ``python -m fastnorm bench`` and the pytest-benchmark suite.

It lives in ``fastnorm._bench`` (installed with the package, so the command finds it); this
module is the suite's handle on it, in the role of numbagg's ``COMPARISONS``.
"""
from fastnorm._bench import (CASE_TABLE, MODES, PASSES, PEERS, Case, Problem,  # noqa: F401
                             Unavailable, cases, implementations, set_threads)
