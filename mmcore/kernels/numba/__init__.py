"""Numba CPU fallbacks, one module per op family.

This package is the only place in mmcore that imports :mod:`numba`; nothing imports it unless the
``numba`` backend is selected, so numba stays an optional dependency. The modules take arrays that
the public ops in :mod:`mmcore.ops` have already validated and laid out, and fill preallocated
outputs.
"""
