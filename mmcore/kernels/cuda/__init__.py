"""CUDA launchers of the ops: device pointers and streams for ``mmcore._cuda``.

One module per op family (:mod:`.attention`, :mod:`.fusion`, :mod:`.image`, :mod:`.spectral`),
and :mod:`.common` for the CuPy / ``mmcore._cuda`` lookup and device arrays. The public ops in
:mod:`mmcore.ops` validate every argument (against CuPy) before they call a launcher here; the
launchers check only what is specific to the device (arrays on one device, limits of the GPU
kernels) and run the kernel asynchronously on CuPy's current stream. Nothing here imports CuPy
at module level: importing mmcore never needs a GPU.
"""
