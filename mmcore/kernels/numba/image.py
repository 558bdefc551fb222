"""Numba fallback for the image ops (:mod:`mmcore.ops.image`).

The four entry points take the same arguments as the native kernels ``mmcore._C.resize``,
``normalize``, ``patchify`` and ``preprocess_image`` (less ``num_threads``) and fill the
preallocated outputs. They are written independently of the C++ kernels as the plain, readable
second implementation; Python loops over the images of a batch (each image may have its own
size) and compiled kernels, parallel over rows, do the pixels.

Resize semantics (Pillow's ``Image.resize`` with ``reducing_gap=None``), per axis of ``n_in``
samples resized to ``n_out``, ``scale = n_in / n_out``:

* bilinear / bicubic / lanczos: the filter (triangle; Keys cubic with ``a = -0.5``;
  ``sinc(x) sinc(x / 3)`` on ``[-3, 3)``) is stretched by ``fs = max(scale, 1)`` when
  ``antialias`` (``fs = 1`` otherwise) so its support is ``support * fs``; output ``i`` is
  centred at ``center = (i + 0.5) * scale`` and reads inputs ``[xmin, xmax)`` with
  ``xmin = max(trunc(center - support + 0.5), 0)`` and ``xmax = min(trunc(center + support +
  0.5), n_in)``, weighted by ``filter((j - center + 0.5) / fs)`` normalized to sum 1.
* nearest: input ``trunc(x_i)`` with ``x_0 = scale / 2`` and ``x_{i+1} = x_i + scale``, summed
  in double precision one step at a time (which decides exact ties the way Pillow does).
* an axis whose size does not change is copied.
* uint8: the weights become 22-bit fixed point (rounded half away from zero); each pass adds
  ``2**21``, shifts right by 22 and clamps to ``[0, 255]``. The horizontal pass runs first, over
  the rows the vertical pass needs, into a uint8 intermediate, except where Pillow 13 and later
  start with the vertical pass (see :func:`vertical_first`). 4-channel uint8 images are RGBA:
  unless the filter is nearest or the size is unchanged, the colour channels are premultiplied
  by alpha (``t = v a + 128; (t + (t >> 8)) >> 8``) before filtering and divided by it after
  (``min(255 v // a, 255)``, pixels with alpha 0 or 255 kept), as Pillow does.
* float32: the same weights in float64 arithmetic, a float32 intermediate, no clamping.
* sizes: indices are int64, so an axis may be longer than 2^31 pixels (a view repeating one row,
  stride 0, is read in place); filter tables beyond 1 GiB per axis (an antialiased downscale of
  hundreds of millions of pixels to a few) raise ``ShapeError`` up front, as the native kernels
  do. Beyond Pillow's int32 sizes the nearest filter computes ``(i + 0.5) * scale`` directly
  instead of walking there by repeated addition.

``normalize``: ``(float32(v) * scale - mean[c]) / std[c]``, every operation rounded to float32.
``preprocess_image``: the resize restricted to the crop window, then the normalization of the
uint8 result (pixels of the window outside the resized image count as 0).
"""

from __future__ import annotations

import math
import threading

import numpy as np
from numba import njit, prange

__all__ = ["resize_numba", "normalize_numba", "patchify_numba", "preprocess_image_numba",
           "FILTER_IDS"]

FILTER_IDS = {"nearest": 0, "bilinear": 1, "bicubic": 2, "lanczos": 3}

_PRECISION_BITS = 22
_ONE = 1 << _PRECISION_BITS
_HALF = 1 << (_PRECISION_BITS - 1)

# Numba's fallback "workqueue" threading layer aborts the process when two threads launch
# parallel kernels at once, so launches are serialized (each launch already uses every core).
_launch_lock = threading.RLock()

# Scratch budget of one axis's filter tables (as the native kernels: mmcore/csrc/cpu/image.cpp),
# and the output index up to which the nearest filter walks its coordinate as Pillow does.
_MAX_TAP_BYTES = 1 << 30
# Budget of the intermediate between the passes of one band of output rows (vertical first).
_MAX_INTER_BYTES = 1 << 26
_NEAREST_WALK = 1 << 31


# ----------------------------------------------------------------------------------------------
# filter taps


@njit(cache=True, nogil=True)
def _sinc(x):
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


@njit(cache=True, nogil=True)
def _filter(fid, x):
    if fid == 1:
        ax = abs(x)
        return 1.0 - ax if ax < 1.0 else 0.0
    if fid == 2:
        a = -0.5
        ax = abs(x)
        if ax < 1.0:
            return ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0
        if ax < 2.0:
            return (((ax - 5.0) * ax + 8.0) * ax - 4.0) * a
        return 0.0
    if fid == 3:
        if -3.0 <= x < 3.0:
            return _sinc(x) * _sinc(x / 3.0)
        return 0.0
    return 0.0


def _ksize(n_in, n_out, fid, antialias):
    if fid == 0 or n_in == n_out:
        return 1
    scale = n_in / n_out
    fs = scale if (antialias and scale > 1.0) else 1.0
    return int(math.ceil((1.0, 2.0, 3.0)[fid - 1] * fs)) * 2 + 1


def check_scratch(op, H, W, OH, OW, n_rows, n_cols, fid, antialias):
    """Raise ShapeError when the filter tables of computing ``n_rows x n_cols`` outputs of the
    (OH, OW) resize of an (H, W) image exceed the scratch budget (1 GiB per axis; the tables
    here hold int64 and float64 weights)."""
    from ...errors import ShapeError
    for axis, n_in, n_out, n in (("rows", H, OH, n_rows), ("columns", W, OW, n_cols)):
        nbytes = _ksize(n_in, n_out, fid, antialias) * n * 16
        if nbytes > _MAX_TAP_BYTES:
            raise ShapeError(
                f"[{op}] resizing {n_in} {axis} to {n_out}"
                f"{' with antialiasing' if antialias else ''} needs {nbytes / 2**30:.1f} GiB of "
                f"filter tables (limit {_MAX_TAP_BYTES / 2**30:.1f} GiB); resize in several "
                "smaller steps, or pass antialias=False or filter='nearest'")


@njit(cache=True, nogil=True)
def _taps(n_in, n_out, o0, n, fid, antialias):
    """Taps of outputs ``o0 .. o0 + n - 1`` of one axis: (start, count, fixed, float) with
    weights (n, K) zero past ``count``."""
    start = np.zeros(n, np.int64)
    count = np.ones(n, np.int64)
    scale = n_in / n_out
    if fid == 0 or n_in == n_out:
        wi = np.full((n, 1), _ONE, np.int64)
        wf = np.ones((n, 1), np.float64)
        if n_in == n_out:
            for i in range(n):
                start[i] = o0 + i
            return start, count, wi, wf
        if n_out > _NEAREST_WALK:
            # beyond Pillow's int32 sizes: the coordinate directly instead of walking there
            # (decided by the output size, never by the window o0 .. o0 + n)
            for i in range(n):
                x = (o0 + i + 0.5) * scale
                start[i] = int(x) if x < n_in else n_in - 1
            return start, count, wi, wf
        x = scale * 0.5
        for i in range(o0 + n):
            if i >= o0:
                s = int(x)
                start[i - o0] = s if s < n_in else n_in - 1
            x += scale
        return start, count, wi, wf
    fs = scale if (antialias and scale > 1.0) else 1.0
    support = (1.0, 2.0, 3.0)[fid - 1] * fs
    K = int(math.ceil(support)) * 2 + 1
    inv_fs = 1.0 / fs
    wi = np.zeros((n, K), np.int64)
    wf = np.zeros((n, K), np.float64)
    k = np.empty(K, np.float64)
    for i in range(n):
        center = (o0 + i + 0.5) * scale
        xmin = int(center - support + 0.5)
        if xmin < 0:
            xmin = 0
        xmax = int(center + support + 0.5)
        if xmax > n_in:
            xmax = n_in
        cnt = min(xmax - xmin, K)
        total = 0.0
        for t in range(cnt):
            w = _filter(fid, (xmin + t - center + 0.5) * inv_fs)
            k[t] = w
            total += w
        for t in range(cnt):
            w = k[t] / total if total != 0.0 else 0.0
            wf[i, t] = w
            fx = w * _ONE
            wi[i, t] = int(fx - 0.5) if w < 0 else int(fx + 0.5)
        start[i] = xmin
        count[i] = cnt
    return start, count, wi, wf


# ----------------------------------------------------------------------------------------------
# the two passes


@njit(parallel=True, cache=True, nogil=True)
def _hpass_u8(src, r0, start, count, wi, out):
    n_rows, n, C = out.shape
    for y in prange(n_rows):
        for j in range(n):
            s = start[j]
            for c in range(C):
                acc = np.int64(_HALF)
                for t in range(count[j]):
                    acc += np.int64(src[r0 + y, s + t, c]) * wi[j, t]
                v = acc >> _PRECISION_BITS
                out[y, j, c] = 0 if v < 0 else (255 if v > 255 else v)


@njit(parallel=True, cache=True, nogil=True)
def _vpass_u8(mid, r0, start, count, wi, out, x0=0):
    n, W, C = out.shape
    for i in prange(n):
        s = start[i] - r0
        for x in range(W):
            for c in range(C):
                acc = np.int64(_HALF)
                for t in range(count[i]):
                    acc += np.int64(mid[s + t, x0 + x, c]) * wi[i, t]
                v = acc >> _PRECISION_BITS
                out[i, x, c] = 0 if v < 0 else (255 if v > 255 else v)


@njit(parallel=True, cache=True, nogil=True)
def _hpass_f32(src, r0, start, count, wf, out):
    n_rows, n, C = out.shape
    for y in prange(n_rows):
        for j in range(n):
            s = start[j]
            for c in range(C):
                acc = 0.0
                for t in range(count[j]):
                    acc += np.float64(src[r0 + y, s + t, c]) * wf[j, t]
                out[y, j, c] = acc


@njit(parallel=True, cache=True, nogil=True)
def _vpass_f32(mid, r0, start, count, wf, out, x0=0):
    n, W, C = out.shape
    for i in prange(n):
        s = start[i] - r0
        for x in range(W):
            for c in range(C):
                acc = 0.0
                for t in range(count[i]):
                    acc += np.float64(mid[s + t, x0 + x, c]) * wf[i, t]
                out[i, x, c] = acc


def vertical_first(H, W, OH, OW):
    """Pillow 13's pass order: the vertical pass runs first when the height shrinks by more than
    twice as many pixels as the width (``OH < H and H - OH > 2 * (W - OW)``)."""
    return OH < H and (H - OH) > 2 * (W - OW)


def _resize_region(src, out, OH, OW, y0, x0, fid, antialias):
    """Rows ``y0 ..`` and columns ``x0 ..`` of the (OH, OW) resize of ``src`` into ``out``
    (ny, nx, C)."""
    H, W, C = src.shape
    ny, nx = out.shape[:2]
    if ny == 0 or nx == 0:
        return
    hs, hc, hwi, hwf = _taps(W, OW, x0, nx, fid, antialias)
    vs, vc, vwi, vwf = _taps(H, OH, y0, ny, fid, antialias)
    u8 = src.dtype == np.uint8
    if vertical_first(H, W, OH, OW):
        c0 = int(hs.min())
        c1 = int((hs + hc).max())
        # the vertical pass reads columns c0 .. c1 of src in place (no copy of the source), for
        # bands of output rows whose intermediate fits _MAX_INTER_BYTES
        band = max(1, min(ny, _MAX_INTER_BYTES // max(1, (c1 - c0) * C * src.itemsize)))
        mid = np.empty((band, c1 - c0, C), src.dtype)
        for b0 in range(0, ny, band):
            b1 = min(ny, b0 + band)
            m = mid[:b1 - b0]
            if u8:
                _vpass_u8(src, 0, vs[b0:b1], vc[b0:b1], vwi[b0:b1], m, c0)
                _hpass_u8(m, 0, hs - c0, hc, hwi, out[b0:b1])
            else:
                _vpass_f32(src, 0, vs[b0:b1], vc[b0:b1], vwf[b0:b1], m, c0)
                _hpass_f32(m, 0, hs - c0, hc, hwf, out[b0:b1])
        return
    r0 = int(vs.min())
    r1 = int((vs + vc).max())
    if H > 1 and src.strides[0] == 0:
        # one row repeated (a broadcast view): the horizontal pass of that row, read back with
        # stride 0 by the vertical pass, instead of an intermediate of the whole source height
        mid = np.empty((1, nx, C), src.dtype)
        if u8:
            _hpass_u8(src, r0, hs, hc, hwi, mid)
        else:
            _hpass_f32(src, r0, hs, hc, hwf, mid)
        mid = np.broadcast_to(mid, (r1 - r0, nx, C))
        if u8:
            _vpass_u8(mid, r0, vs, vc, vwi, out)
        else:
            _vpass_f32(mid, r0, vs, vc, vwf, out)
        return
    mid = np.empty((r1 - r0, nx, C), src.dtype)
    if u8:
        _hpass_u8(src, r0, hs, hc, hwi, mid)
        _vpass_u8(mid, r0, vs, vc, vwi, out)
    else:
        _hpass_f32(src, r0, hs, hc, hwf, mid)
        _vpass_f32(mid, r0, vs, vc, vwf, out)


def _premultiply(img):
    if img.shape[0] > 1 and img.strides[0] == 0:  # one row repeated: premultiply it once
        return np.broadcast_to(_premultiply(img[:1]), img.shape)
    v = img.astype(np.uint32)
    a = v[..., 3:4]
    t = v[..., :3] * a + 128
    out = np.empty(img.shape, np.uint8)
    out[..., :3] = (t + (t >> 8)) >> 8
    out[..., 3] = img[..., 3]
    return out


def _unpremultiply(img):
    a = img[..., 3:4].astype(np.uint32)
    v = img[..., :3].astype(np.uint32)
    div = np.minimum((255 * v) // np.maximum(a, 1), 255)
    keep = (a == 0) | (a == 255)
    img[..., :3] = np.where(keep, v, div).astype(np.uint8)


def _resize_one(src, dst, fid, antialias):
    H, W, C = src.shape
    OH, OW = dst.shape[:2]
    if OH == 0 or OW == 0:
        return
    rgba = src.dtype == np.uint8 and C == 4 and fid != 0 and (H, W) != (OH, OW)
    if rgba:
        src = _premultiply(src)
    _resize_region(src, dst, OH, OW, 0, 0, fid, antialias)
    if rgba:
        _unpremultiply(dst)


def resize_numba(srcs, dsts, filter, antialias):
    """Resize every ``srcs[i]`` (H, W, C) into ``dsts[i]`` (OH, OW, C) of the same dtype
    (uint8 or float32); see the module docstring for the arithmetic."""
    fid = FILTER_IDS[filter]
    if len(srcs) != len(dsts):
        from ...errors import ShapeError
        raise ShapeError(f"[resize] srcs has {len(srcs)} images but dsts has {len(dsts)}")
    for src, dst in zip(srcs, dsts):
        check_scratch("resize", src.shape[0], src.shape[1], dst.shape[0], dst.shape[1],
                      dst.shape[0], dst.shape[1], fid, bool(antialias))
    with _launch_lock:
        for src, dst in zip(srcs, dsts):
            _resize_one(src, dst, fid, bool(antialias))


# ----------------------------------------------------------------------------------------------
# normalize and patchify


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _normalize_kernel(src, dst, mean, std, scale, chw):
    N, H, W, C = src.shape
    for r in prange(N * H):
        b = r // H
        y = r - b * H
        for x in range(W):
            for c in range(C):
                v = (np.float32(src[b, y, x, c]) * scale - mean[c]) / std[c]
                if chw:
                    dst[b, c, y, x] = v
                else:
                    dst[b, y, x, c] = v


def normalize_numba(src, dst, mean, std, scale, layout):
    """``dst = (src * scale - mean) / std`` in float32 over the channels of ``src``
    (N, H, W, C), written (N, C, H, W) for ``layout="chw"`` or (N, H, W, C) for ``"hwc"``."""
    if src.size == 0:
        return
    mean = np.ascontiguousarray(mean, dtype=np.float32)
    std = np.ascontiguousarray(std, dtype=np.float32)
    with _launch_lock:
        _normalize_kernel(src, dst, mean, std, np.float32(scale), layout == "chw")


@njit(parallel=True, cache=True, nogil=True)
def _patchify_kernel(src, dst, p, tp):
    B, T, C, H, W = src.shape
    gt, gh, gw = T // tp, H // p, W // p
    for task in prange(B * gt * gh):
        b = task // (gt * gh)
        rem = task - b * (gt * gh)
        g = rem // gh
        py = rem - g * gh
        for px in range(gw):
            row = (g * gh + py) * gw + px
            col = 0
            for c in range(C):
                for t in range(tp):
                    for y in range(p):
                        for x in range(p):
                            dst[b, row, col] = src[b, g * tp + t, c, py * p + y, px * p + x]
                            col += 1


def patchify_numba(src, dst, patch, temporal_patch):
    """Patches of ``src`` (B, T, C, H, W) into ``dst`` (B, (T/tp)(H/p)(W/p), C tp p p): each
    patch flattened (c, t, y, x), patches t-major then row-major."""
    if src.size == 0:
        return
    with _launch_lock:
        _patchify_kernel(src, dst, int(patch), int(temporal_patch))


# ----------------------------------------------------------------------------------------------
# fused preprocess


def preprocess_image_numba(srcs, out, geoms, mean, std, crop_h, crop_w, filter, antialias, scale,
                           patch):
    """Resize (to ``geoms[i, :2]``), crop (at ``geoms[i, 2:]``, zeros outside), rescale and
    normalize every uint8 ``srcs[i]`` into ``out[i]``: (C, crop_h, crop_w), or patches
    (num_patches, C p p) when ``patch > 0``."""
    fid = FILTER_IDS[filter]
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    C = mean.shape[0]
    # value of channel c for pixel v, rounded as the kernels do (float32 at every step)
    lut = (np.arange(256, dtype=np.float32)[None, :] * np.float32(scale) - mean[:, None]) \
        / std[:, None]
    chan = np.arange(C)
    for i, src in enumerate(srcs):
        RH, RW = int(geoms[i][0]), int(geoms[i][1])
        check_scratch("preprocess_image", src.shape[0], src.shape[1], RH, RW, min(crop_h, RH),
                      min(crop_w, RW), fid, bool(antialias))
    with _launch_lock:
        for i, src in enumerate(srcs):
            RH, RW, top, left = (int(v) for v in geoms[i])
            img = np.empty((C, crop_h, crop_w), np.float32)
            img[:] = lut[:, 0, None, None]
            ya, yb = max(top, 0), min(top + crop_h, RH)
            xa, xb = max(left, 0), min(left + crop_w, RW)
            if yb > ya and xb > xa:
                region = np.empty((yb - ya, xb - xa, C), np.uint8)
                _resize_region(src, region, RH, RW, ya, xa, fid, bool(antialias))
                img[:, ya - top:yb - top, xa - left:xb - left] = \
                    lut[chan[:, None, None], region.transpose(2, 0, 1)]
            if patch:
                _patchify_kernel(img[None, None], out[i:i + 1], int(patch), 1)
            else:
                out[i] = img
