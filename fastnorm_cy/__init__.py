raise ImportError("the Cython backend is not built yet")
