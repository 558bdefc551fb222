"""Type aliases of the ops' signatures.

``Array`` is what an op that runs on every backend takes and returns: on the host backends a
NumPy array (or anything ``numpy.asarray`` reads), on the cuda backend a CuPy array or any CUDA
array (``__cuda_array_interface__`` or DLPack, such as a torch tensor), with a CuPy result on
the same device. No static type spans both without making CuPy a dependency, so ``Array`` is
``Any``; the docstrings give the shapes and dtypes. The host-only ops (``linear``,
``layer_norm``, ``encoder_layer``) take ``numpy.typing.ArrayLike`` and return
``numpy.ndarray`` instead.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["Array", "Backend", "HostBackend"]

#: A NumPy or CuPy (CUDA) array; see the module docstring.
Array = Any
#: A backend name, as ``backend=`` takes it (see :mod:`mmcore._backend`).
Backend = Literal["native", "numba", "cuda"]
#: The backends of the host-only ops.
HostBackend = Literal["native", "numba"]
