"""CUDA launchers of the image ops: device arrays and pointers for ``mmcore._cuda``.

Options (filter, layout, scale, sizes) arrive validated by :mod:`mmcore.ops.image`; only the
device-side facts (same device, row layouts the kernels read) are checked here.

:func:`resize_cuda`, :func:`normalize_cuda`, :func:`patchify_cuda` and
:func:`preprocess_image_cuda` take the same arguments as the native kernels ``mmcore._C.resize``,
``normalize``, ``patchify`` and ``preprocess_image`` (less ``num_threads``), with CuPy arrays (or
anything exposing ``__cuda_array_interface__`` / CUDA DLPack) on one device in place of NumPy
arrays. Outputs are written in place, asynchronously on CuPy's current stream of the device of
the first input; each function returns its output argument.

Batches
    ``srcs`` (and ``dsts``) are sequences of per-image ``(H, W, C)`` arrays, or one
    ``(N, H, W, C)`` array read as N images. Images of one call may differ in size: the whole
    list runs as one pair of kernel launches. All images share a dtype; ``resize`` may mix channel
    counts (one launch pair per channel count), ``preprocess_image`` may not. Rows may be strided
    but each row's ``(W, C)`` part must be contiguous; a source that is not is copied to a
    contiguous array on the device first, an output that is not raises :class:`ShapeError`.

Host data
    Data never moves between host and device implicitly, with two documented exceptions for
    small constant arguments: ``mean`` and ``std`` (C values) may be NumPy arrays or sequences and
    are copied to the device, and ``geoms`` of :func:`preprocess_image_cuda` is read on the
    host (a NumPy array or a nested sequence is used as is; a device array is copied back, which
    waits for the current stream). The filter tables are built on the host from the shapes and
    copied into a device workspace allocated from CuPy's pool for the call.

Semantics: see ``csrc/include/mmcore/image.h``. uint8 resizes follow Pillow 13 bit for bit: two
passes in 22-bit fixed point with a uint8 intermediate, horizontal first unless the height shrinks
by more than twice as many pixels as the width; LA and RGBA (C == 2 or 4) are filtered with
premultiplied alpha except with ``nearest`` or an unchanged size. float32 resizes use the same
weights and pass order in float32 arithmetic. The fused preprocess resizes every channel
independently (no premultiplication). Normalization is ``(x * scale - mean[c]) / std[c]`` with a
float32 rounding after each operation.
"""

from __future__ import annotations

import numpy as np

from ..._backend import is_cuda_array
from ...errors import BackendError, ShapeError
from .common import cuda_module as _cuda_module
from .common import cupy_module as _cupy
from .common import device_array as _device_array
from .common import same_device as _same_device

__all__ = ["resize_cuda", "normalize_cuda", "patchify_cuda", "preprocess_image_cuda"]

_LAYOUTS = {"chw": 0, "hwc": 1}
_DTYPES = {"uint8": 0, "float32": 1}


def _ptr(a) -> int:
    return 0 if a.size == 0 else int(a.data.ptr)


def _image_list(cp, op: str, name: str, xs) -> list:
    """A sequence of images or one (N, H, W, C) device array -> list of CuPy arrays."""
    if xs is None:
        raise ShapeError(f"[{op}] {name} is required")
    if isinstance(xs, (list, tuple)):
        return [_device_array(cp, op, f"{name}[{i}]", x) for i, x in enumerate(xs)]
    arr = _device_array(cp, op, name, xs)
    if arr.ndim != 4:
        raise ShapeError(f"[{op}] {name} has {arr.ndim} dims, expected a sequence of (H, W, C) "
                         "images or one (N, H, W, C) array")
    return [arr[i] for i in range(int(arr.shape[0]))]


def _row_contiguous(a) -> bool:
    """True when each row's (W, C) part is contiguous and rows are a non-negative stride apart."""
    if a.size == 0:
        return True  # nothing is read or written; the strides of an empty array are arbitrary
    item = a.dtype.itemsize
    H, W, C = (int(n) for n in a.shape)
    s0, s1, s2 = (int(s) for s in a.strides)
    if C > 1 and s2 != item:
        return False
    if W > 1 and s1 != item * C:
        return False
    if H > 1 and (s0 < 0 or s0 % item != 0 or s0 < item * W * C):
        return False
    return True


def _row_stride(a) -> int:
    """Elements between rows of an (H, W, C) image that passed :func:`_row_contiguous`."""
    H, W, C = (int(n) for n in a.shape)
    return int(a.strides[0]) // a.dtype.itemsize if H > 1 and a.size else W * C


def _source_image(cp, op: str, name: str, a):
    if a.ndim != 3:
        raise ShapeError(f"[{op}] {name} has {a.ndim} dims, expected 3 (H, W, C)")
    if not _row_contiguous(a):
        a = cp.ascontiguousarray(a)
    return a


def _channel_table(cp, op: str, name: str, values, C: int, device: int):
    """mean / std: C finite values as a contiguous float32 device array."""
    if values is None:
        raise ShapeError(f"[{op}] {name} is required")
    if isinstance(values, cp.ndarray) or is_cuda_array(values):
        arr = _device_array(cp, op, name, values)
        _same_device(op, name, arr, device)
        if arr.dtype.kind not in "fiu":
            raise ShapeError(f"[{op}] {name} has dtype {arr.dtype}, expected a real dtype")
        if tuple(int(n) for n in arr.shape) != (C,):
            raise ShapeError(f"[{op}] {name} has shape {tuple(arr.shape)}, expected ({C},) = (C,)")
        return cp.ascontiguousarray(arr, dtype=cp.float32)
    try:
        host = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"[{op}] {name} cannot be converted to an array of numbers: "
                         f"{exc}") from None
    if host.shape != (C,):
        raise ShapeError(f"[{op}] {name} has shape {host.shape}, expected ({C},) = (C,)")
    if not np.all(np.isfinite(host)):
        raise ShapeError(f"[{op}] {name} must be finite")
    if name == "std" and np.any(host == 0):
        raise ShapeError(f"[{op}] std must be nonzero")
    return cp.asarray(host.astype(np.float32))


def _run(op: str, fn, *args):
    """Calls a kernel binding; an argument the kernel still rejects is a limit of the backend."""
    try:
        return fn(*args)
    except RuntimeError as exc:
        if "invalid argument" in str(exc):
            raise BackendError(str(exc)) from None
        raise


def resize_cuda(srcs, dsts, *, filter, antialias):
    """Resize each ``srcs[i]`` into ``dsts[i]`` on the device; Pillow's conventions.

    Parameters
    ----------
    srcs : sequence of CuPy arrays (H, W, C), or one (N, H, W, C) array
        uint8 or float32 images; sizes may differ between images.
    dsts : sequence of CuPy arrays (OH, OW, C), or one (N, OH, OW, C) array
        Outputs of the sources' dtype and channel count; each row's (OW, C) part contiguous.
    filter : {"nearest", "bilinear", "bicubic", "lanczos"}
    antialias : bool
        Widen the filter by the scale when downscaling (Pillow always does).

    Returns
    -------
    dsts, as given (filled asynchronously on the current stream).

    Examples
    --------
    >>> import cupy as cp                                                # doctest: +SKIP
    >>> src = cp.zeros((480, 640, 3), cp.uint8)                          # doctest: +SKIP
    >>> dst = cp.empty((224, 298, 3), cp.uint8)                          # doctest: +SKIP
    >>> resize_cuda([src], [dst], filter="bicubic", antialias=True)[0].shape   # doctest: +SKIP
    (224, 298, 3)
    """
    op = "resize"
    cp = _cupy(op)
    mod = _cuda_module(op, "resize")
    filt = filter
    aa = bool(antialias)
    src_list = _image_list(cp, op, "srcs", srcs)
    dst_list = _image_list(cp, op, "dsts", dsts)
    if len(src_list) != len(dst_list):
        raise ShapeError(f"[{op}] srcs has {len(src_list)} images but dsts has {len(dst_list)}")
    if not src_list:
        return dsts
    device = src_list[0].device.id
    dtype = src_list[0].dtype
    if dtype.name not in _DTYPES:
        raise ShapeError(f"[{op}] srcs[0] has dtype {dtype}, expected uint8 or float32")
    groups: dict[int, list] = {}  # channel count -> [(src, dst), ...]
    for i, (s, d) in enumerate(zip(src_list, dst_list)):
        _same_device(op, f"srcs[{i}]", s, device)
        _same_device(op, f"dsts[{i}]", d, device)
        if s.dtype != dtype:
            raise ShapeError(f"[{op}] srcs[{i}] has dtype {s.dtype}, expected {dtype} like srcs[0]")
        if d.dtype != dtype:
            raise ShapeError(f"[{op}] dsts[{i}] has dtype {d.dtype}, expected {dtype} like srcs")
        if d.ndim != 3:
            raise ShapeError(f"[{op}] dsts[{i}] has {d.ndim} dims, expected 3 (OH, OW, C)")
        s = _source_image(cp, op, f"srcs[{i}]", s)
        H, W, C = (int(n) for n in s.shape)
        if H == 0 or W == 0:
            raise ShapeError(f"[{op}] srcs[{i}] is empty ({H} x {W})")
        if int(d.shape[2]) != C:
            raise ShapeError(f"[{op}] dsts[{i}] has {int(d.shape[2])} channels but srcs[{i}] has "
                             f"{C}")
        if not _row_contiguous(d):
            raise ShapeError(f"[{op}] dsts[{i}] needs contiguous rows: each row's (OW, C) part "
                             "must be contiguous")
        if C > 0:
            groups.setdefault(C, []).append((s, d))

    dt = dtype.name
    with cp.cuda.Device(device):
        stream = cp.cuda.get_current_stream()
        for C, pairs in groups.items():
            shapes = [(int(s.shape[0]), int(s.shape[1]), _row_stride(s), int(d.shape[0]),
                       int(d.shape[1]), _row_stride(d)) for s, d in pairs]
            nbytes = _run(op, mod.resize_workspace, shapes, C, dt, filt, aa)
            workspace = cp.empty(max(int(nbytes), 1), dtype=cp.uint8)
            _run(op, mod.resize, [_ptr(s) for s, _ in pairs], [_ptr(d) for _, d in pairs],
                 shapes, C, dt, filt, aa, int(workspace.data.ptr), int(nbytes), int(stream.ptr),
                 device)
            # The workspace and any contiguous copies go back to CuPy's pool here; the pool
            # hands their memory out again only in stream order.
    return dsts


def normalize_cuda(src, dst, mean, std, *, scale, layout):
    """``(src * scale - mean[c]) / std[c]`` of an (N, H, W, C) batch into float32 ``dst``.

    Parameters
    ----------
    src : CuPy array (N, H, W, C), uint8 or float32 (a non-contiguous array is copied first)
    dst : CuPy float32 array, C-contiguous: (N, C, H, W) for layout "chw", (N, H, W, C) for "hwc"
    mean, std : C values (NumPy / sequence, copied to the device, or a CuPy array)
    scale : float
    layout : {"chw", "hwc"}

    Returns
    -------
    dst

    Examples
    --------
    >>> import cupy as cp                                                # doctest: +SKIP
    >>> x = cp.full((2, 4, 4, 3), 255, cp.uint8)                         # doctest: +SKIP
    >>> out = cp.empty((2, 3, 4, 4), cp.float32)                         # doctest: +SKIP
    >>> float(normalize_cuda(x, out, [0.5] * 3, [0.5] * 3, scale=1 / 255,
    ...                      layout="chw")[0, 0, 0, 0])                   # doctest: +SKIP
    1.0
    """
    op = "normalize"
    cp = _cupy(op)
    mod = _cuda_module(op, "normalize")
    lay = _LAYOUTS[layout]
    sc = float(scale)
    x = _device_array(cp, op, "src", src)
    out = _device_array(cp, op, "dst", dst)
    device = x.device.id
    _same_device(op, "dst", out, device)
    if x.ndim != 4:
        raise ShapeError(f"[{op}] src has {x.ndim} dims, expected 4 (N, H, W, C)")
    if x.dtype.name not in _DTYPES:
        raise ShapeError(f"[{op}] src has dtype {x.dtype}, expected uint8 or float32")
    N, H, W, C = (int(n) for n in x.shape)
    want = (N, C, H, W) if lay == 0 else (N, H, W, C)
    if out.dtype != cp.float32:
        raise ShapeError(f"[{op}] dst has dtype {out.dtype}, expected float32")
    if tuple(int(n) for n in out.shape) != want:
        raise ShapeError(f"[{op}] dst has shape {tuple(out.shape)}, expected {want} "
                         f"({'(N, C, H, W)' if lay == 0 else '(N, H, W, C)'})")
    if not out.flags.c_contiguous:
        raise ShapeError(f"[{op}] dst must be C-contiguous")
    with cp.cuda.Device(device):
        m = _channel_table(cp, op, "mean", mean, C, device)
        s = _channel_table(cp, op, "std", std, C, device)
        if x.size == 0:
            return dst
        x = cp.ascontiguousarray(x)
        stream = cp.cuda.get_current_stream()
        _run(op, mod.normalize, _ptr(x), _ptr(out), N, H, W, C, x.dtype.name, _ptr(m),
             _ptr(s), sc, layout, int(stream.ptr), device)
    return dst


def patchify_cuda(src, dst, *, patch, temporal_patch):
    """Split a float32 (B, T, C, H, W) array into patches.

    ``dst`` is float32 (B, T/tp * H/p * W/p, C * tp * p * p), C-contiguous: patches t-major,
    then row-major over the (H/p, W/p) grid; each patch flattened (c, t, py, px), the order of a
    Conv3d / Conv2d patch embedding. T, H and W must be multiples of ``temporal_patch`` and
    ``patch``. A non-contiguous ``src`` is copied to a contiguous device array first.

    Examples
    --------
    >>> import cupy as cp                                                # doctest: +SKIP
    >>> x = cp.zeros((1, 2, 3, 28, 28), cp.float32)                      # doctest: +SKIP
    >>> out = cp.empty((1, 4, 3 * 2 * 14 * 14), cp.float32)              # doctest: +SKIP
    >>> patchify_cuda(x, out, patch=14, temporal_patch=2).shape          # doctest: +SKIP
    (1, 4, 1176)
    """
    op = "patchify"
    cp = _cupy(op)
    mod = _cuda_module(op, "patchify")
    p = int(patch)
    tp = int(temporal_patch)
    x = _device_array(cp, op, "src", src)
    out = _device_array(cp, op, "dst", dst)
    device = x.device.id
    _same_device(op, "dst", out, device)
    if x.ndim != 5:
        raise ShapeError(f"[{op}] src has {x.ndim} dims, expected 5 (B, T, C, H, W)")
    if x.dtype != cp.float32:
        raise ShapeError(f"[{op}] src has dtype {x.dtype}, expected float32")
    B, T, C, H, W = (int(n) for n in x.shape)
    if H % p or W % p or T % tp:
        raise ShapeError(f"[{op}] (T, H, W) = ({T}, {H}, {W}) must be multiples of "
                         f"(temporal_patch, patch, patch) = ({tp}, {p}, {p})")
    want = (B, (T // tp) * (H // p) * (W // p), C * tp * p * p)
    if out.dtype != cp.float32:
        raise ShapeError(f"[{op}] dst has dtype {out.dtype}, expected float32")
    if tuple(int(n) for n in out.shape) != want:
        raise ShapeError(f"[{op}] dst has shape {tuple(out.shape)}, expected {want} "
                         "= (B, T/tp * H/p * W/p, C * tp * p * p)")
    if not out.flags.c_contiguous:
        raise ShapeError(f"[{op}] dst must be C-contiguous")
    if x.size == 0:
        return dst
    with cp.cuda.Device(device):
        x = cp.ascontiguousarray(x)
        stream = cp.cuda.get_current_stream()
        _run(op, mod.patchify, _ptr(x), _ptr(out), B, T, C, H, W, p, tp, int(stream.ptr), device)
    return dst


def _host_geoms(cp, op: str, geoms, n: int) -> np.ndarray:
    if geoms is None:
        raise ShapeError(f"[{op}] geoms is required")
    if isinstance(geoms, cp.ndarray) or is_cuda_array(geoms):
        g = _device_array(cp, op, "geoms", geoms).get()  # waits for the current stream
    else:
        try:
            g = np.asarray(geoms)
        except Exception as exc:
            raise ShapeError(f"[{op}] geoms cannot be converted to an array: {exc}") from None
    if g.dtype.kind not in "iu":
        raise ShapeError(f"[{op}] geoms has dtype {g.dtype}, expected an integer dtype")
    if g.shape != (n, 4):
        raise ShapeError(f"[{op}] geoms has shape {g.shape}, expected ({n}, 4) = "
                         "(N, (resize_h, resize_w, top, left))")
    g = g.astype(np.int64)
    if n and (g[:, 0].min() < 1 or g[:, 1].min() < 1):
        raise ShapeError(f"[{op}] geoms: resize sizes must be >= 1")
    return g


def preprocess_image_cuda(srcs, out, geoms, mean, std, *, crop_h, crop_w, filter, antialias,
                          scale, patch):
    """Fused resize + crop + rescale + normalize [+ patchify] of uint8 images on the device.

    Image i is resized (Pillow's conventions) to ``(geoms[i, 0], geoms[i, 1])``; the window
    ``[top, top + crop_h) x [left, left + crop_w)`` with ``top, left = geoms[i, 2:]`` is kept
    (pixels outside the resized image are 0), then each value becomes
    ``(v * scale - mean[c]) / std[c]``. Only the window is computed.

    Parameters
    ----------
    srcs : sequence of CuPy uint8 arrays (H, W, C), or one (N, H, W, C) array
        Sizes may differ between images; C may not.
    out : CuPy float32 array, C-contiguous
        (N, C, crop_h, crop_w) when ``patch == 0``, else (N, crop_h/p * crop_w/p, C * p * p):
        patches row-major over the grid, each flattened (c, py, px).
    geoms : int array (N, 4) of (resize_h, resize_w, top, left), read on the host
    mean, std : C values (NumPy / sequence, copied to the device, or a CuPy array)
    crop_h, crop_w : int
    filter : {"nearest", "bilinear", "bicubic", "lanczos"}
    antialias : bool
    scale : float
    patch : int
        0 for CHW output, else the patch size (a divisor of crop_h and crop_w).

    Returns
    -------
    out

    Examples
    --------
    >>> import cupy as cp, numpy as np                                   # doctest: +SKIP
    >>> img = cp.zeros((480, 640, 3), cp.uint8)                          # doctest: +SKIP
    >>> out = cp.empty((1, 3, 224, 224), cp.float32)                     # doctest: +SKIP
    >>> geoms = np.array([[224, 298, 0, 37]])                            # doctest: +SKIP
    >>> preprocess_image_cuda([img], out, geoms, [0.5] * 3, [0.5] * 3, crop_h=224, crop_w=224,
    ...                       filter="bicubic", antialias=True, scale=1 / 255,
    ...                       patch=0).shape                              # doctest: +SKIP
    (1, 3, 224, 224)
    """
    op = "preprocess_image"
    cp = _cupy(op)
    mod = _cuda_module(op, "preprocess_image")
    filt = filter
    aa = bool(antialias)
    sc = float(scale)
    ch = int(crop_h)
    cw = int(crop_w)
    p = int(patch)
    if p > 0 and (ch % p or cw % p):
        raise ShapeError(f"[{op}] the crop {ch} x {cw} must be a multiple of patch = {p}")
    images = _image_list(cp, op, "srcs", srcs)
    o = _device_array(cp, op, "out", out)
    n = len(images)
    device = images[0].device.id if images else o.device.id
    _same_device(op, "out", o, device)
    C = None
    for i, a in enumerate(images):
        _same_device(op, f"srcs[{i}]", a, device)
        if a.dtype != cp.uint8:
            raise ShapeError(f"[{op}] srcs[{i}] has dtype {a.dtype}, expected uint8")
        images[i] = a = _source_image(cp, op, f"srcs[{i}]", a)
        H, W, c = (int(v) for v in a.shape)
        if H == 0 or W == 0:
            raise ShapeError(f"[{op}] srcs[{i}] is empty ({H} x {W})")
        if C is None:
            C = c
        elif c != C:
            raise ShapeError(f"[{op}] srcs[{i}] has {c} channels but srcs[0] has {C}")
    g = _host_geoms(cp, op, geoms, n)
    if n == 0:
        return out
    assert C is not None    # set by the first of the n > 0 images
    if C == 0:
        raise ShapeError(f"[{op}] images need at least one channel")
    want = (n, C, ch, cw) if p == 0 else (n, (ch // p) * (cw // p), C * p * p)
    if o.dtype != cp.float32:
        raise ShapeError(f"[{op}] out has dtype {o.dtype}, expected float32")
    if tuple(int(v) for v in o.shape) != want:
        raise ShapeError(f"[{op}] out has shape {tuple(o.shape)}, expected {want} "
                         f"{'(N, C, crop_h, crop_w)' if p == 0 else '(N, patches, C * p * p)'}")
    if not o.flags.c_contiguous:
        raise ShapeError(f"[{op}] out must be C-contiguous")
    shapes = [(int(a.shape[0]), int(a.shape[1]), _row_stride(a), int(r[0]), int(r[1]), int(r[2]),
               int(r[3])) for a, r in zip(images, g)]
    with cp.cuda.Device(device):
        m = _channel_table(cp, op, "mean", mean, C, device)
        s = _channel_table(cp, op, "std", std, C, device)
        nbytes = _run(op, mod.preprocess_image_workspace, shapes, C, ch, cw, filt, aa, p)
        workspace = cp.empty(max(int(nbytes), 1), dtype=cp.uint8)
        stream = cp.cuda.get_current_stream()
        _run(op, mod.preprocess_image, [_ptr(a) for a in images], shapes, C, _ptr(o), ch, cw, filt,
             aa, _ptr(m), _ptr(s), sc, p, int(workspace.data.ptr), int(nbytes), int(stream.ptr),
             device)
    return out
