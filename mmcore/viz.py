"""Pictures and numbers for looking at attention and audio features.

Everything here needs only NumPy and Pillow. Matplotlib is optional: when it is installed,
:func:`plot_attention` draws onto a matplotlib axes; the main functions never import it.

Colormaps
---------
``"viridis"`` and ``"magma"`` are *approximations* of the perceptually uniform colormaps of the
same names, rebuilt here from a short published-style definition rather than copied tables:

1. a handful of anchor colours along each map (sRGB hex values listed in ``_ANCHORS``) are
   converted to the OKLab perceptual colour space;
2. lightness is replaced by a straight line between the two end anchors, so that lightness rises
   strictly and evenly along the map (the defining property of both maps);
3. the two chroma coordinates ``a(t)`` and ``b(t)`` are fitted with low-degree least-squares
   polynomials in ``t`` (the end points weighted heavily so the ends stay put);
4. colours that fall outside the sRGB gamut have their chroma reduced at constant lightness;
5. the smooth curve is sampled at 256 points and converted back to 8-bit sRGB (each entry
   rounded to the nearest 8-bit colour that keeps lightness strictly increasing), giving a
   256-entry lookup table built once at import.

The tables look like the familiar maps but are not bit-identical to matplotlib's. ``"gray"`` is a
linear ramp from black to white.

Examples
--------
>>> import numpy as np
>>> from mmcore import viz
>>> w = np.full((3, 4), 0.25)
>>> viz.attention_heatmap(w, cell=4).mode
'RGB'
>>> np.allclose(viz.attention_entropy(w), np.log(4))
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from mmcore.errors import ShapeError

if TYPE_CHECKING:     # names of the annotations only
    import os

    from matplotlib.axes import Axes

__all__ = [
    "colormap",
    "attention_heatmap",
    "spectrogram_image",
    "attention_entropy",
    "top_k_attention",
    "attention_summary",
    "plot_attention",
]

#: The names :func:`colormap` knows.
ColormapName = Literal["viridis", "magma", "gray"]
#: Where an image is saved.
ImagePath = Union[str, "os.PathLike[str]"]

# --------------------------------------------------------------------------------------------
# colour science: sRGB <-> OKLab (Bjoern Ottosson's published matrices)
# --------------------------------------------------------------------------------------------

_M1 = np.array([[0.4122214708, 0.5363325363, 0.0514459929],
                [0.2119034982, 0.6806995451, 0.1073969566],
                [0.0883024619, 0.2817188376, 0.6299787005]])
_M2 = np.array([[0.2104542553, 0.7936177850, -0.0040720468],
                [1.9779984951, -2.4285922050, 0.4505937099],
                [0.0259040371, 0.7827717662, -0.8086757660]])
_M1_INV = np.linalg.inv(_M1)
_M2_INV = np.linalg.inv(_M2)


def _srgb_to_linear(c):
    c = np.asarray(c, dtype=np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c):
    c = np.clip(np.asarray(c, dtype=np.float64), 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * np.power(c, 1.0 / 2.4) - 0.055)


def _srgb_to_oklab(rgb):
    """sRGB in [0, 1], shape (..., 3) -> OKLab (..., 3)."""
    lms = _srgb_to_linear(rgb) @ _M1.T
    return np.cbrt(lms) @ _M2.T


def _oklab_to_linear(lab):
    lms = (np.asarray(lab, dtype=np.float64) @ _M2_INV.T) ** 3
    return lms @ _M1_INV.T


def _oklab_to_srgb(lab):
    """OKLab (..., 3) -> sRGB in [0, 1] (clipped to the gamut)."""
    return _linear_to_srgb(_oklab_to_linear(lab))


def _into_gamut(lab, steps=40):
    """Pull out-of-gamut OKLab colours towards the grey axis, keeping their lightness."""
    lab = np.array(lab, dtype=np.float64)
    lo = np.zeros(lab.shape[:-1])
    hi = np.ones(lab.shape[:-1])
    eps = 1e-9

    def inside(scale):
        trial = lab.copy()
        trial[..., 1:] *= scale[..., None]
        rgb = _oklab_to_linear(trial)
        return np.all((rgb >= -eps) & (rgb <= 1 + eps), axis=-1)

    ok = inside(hi)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        good = inside(mid)
        lo = np.where(good, mid, lo)
        hi = np.where(good, hi, mid)
    scale = np.where(ok, 1.0, lo)
    lab[..., 1:] *= scale[..., None]
    return lab


def _hex(code):
    code = code.lstrip("#")
    return [int(code[i:i + 2], 16) / 255.0 for i in (0, 2, 4)]


# Anchor colours, evenly spaced in t from 0 to 1 (chosen by eye to follow each map's path).
_ANCHORS = {
    "viridis": ["#440154", "#3b528b", "#21918c", "#5ec962", "#fde725"],
    "magma": ["#000004", "#3b0f70", "#8c2981", "#de4968", "#fe9f6d", "#fcfdbf"],
}
_DEGREE = {"viridis": 4, "magma": 4}


def _build_table(name):
    anchors = np.array([_hex(h) for h in _ANCHORS[name]])
    lab = _srgb_to_oklab(anchors)
    t_anchor = np.linspace(0.0, 1.0, len(anchors))
    weights = np.ones(len(anchors))
    weights[[0, -1]] = 10.0
    t = np.linspace(0.0, 1.0, 256)
    out = np.empty((256, 3))
    out[:, 0] = lab[0, 0] + (lab[-1, 0] - lab[0, 0]) * t     # lightness: a straight line
    for ch in (1, 2):
        coef = np.polyfit(t_anchor, lab[:, ch], _DEGREE[name], w=weights)
        out[:, ch] = np.polyval(coef, t)
    target = _into_gamut(out)
    rgb = _oklab_to_srgb(target) * 255.0
    # Quantise to 8 bits: per entry, pick the floor/ceil combination nearest to the target in
    # OKLab among those whose lightness still exceeds the previous entry's (rounding each channel
    # on its own can make lightness dip by a hair where the curve is flat in one channel).
    corners = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=np.float64)
    table = np.empty((256, 3), dtype=np.uint8)
    prev_l = -np.inf
    for i in range(256):
        cand = np.clip(np.floor(rgb[i]) + corners, 0, 255)
        cand_lab = _srgb_to_oklab(cand / 255.0)
        dist = np.sum((cand_lab - target[i]) ** 2, axis=1)
        dist = np.where(cand_lab[:, 0] > prev_l, dist, dist + 1e6)
        best = int(np.argmin(dist))
        table[i] = cand[best]
        prev_l = cand_lab[best, 0]
    return table


_TABLES = {name: _build_table(name) for name in _ANCHORS}
_TABLES["gray"] = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
for _table in _TABLES.values():
    _table.setflags(write=False)


def _lightness(rgb_uint8):
    """OKLab lightness of uint8 sRGB colours (used by the tests and for legend text contrast)."""
    return _srgb_to_oklab(np.asarray(rgb_uint8, dtype=np.float64) / 255.0)[..., 0]


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------

def _as_real_array(x, name):
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ShapeError(f"[viz] {name} could not be converted to an array: {exc}") from None
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ShapeError(f"[viz] {name} has dtype {arr.dtype}, expected a real numeric array")
    return arr.astype(np.float64, copy=False)


def _check_weights(weights, name="weights", ndims=None):
    w = _as_real_array(weights, name)
    if ndims is not None and w.ndim not in ndims:
        expected = " or ".join(str(n) for n in ndims)
        raise ShapeError(f"[viz] {name} has {w.ndim} dims, expected {expected}")
    if w.ndim == 0:
        raise ShapeError(f"[viz] {name} is a scalar, expected at least 1 dim")
    if np.isnan(w).any():
        raise ShapeError(f"[viz] {name} contains NaN")
    if np.isinf(w).any():
        raise ShapeError(f"[viz] {name} contains inf")
    if (w < 0).any():
        raise ShapeError(f"[viz] {name} contains negative values (min {w.min():.4g}); "
                         "attention weights must be >= 0")
    return w


def _norm_axis(axis, ndim, name="axis"):
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise ShapeError(f"[viz] {name} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ShapeError(f"[viz] {name}={axis} is out of range for an array with {ndim} dims")
    return int(axis) % ndim


# --------------------------------------------------------------------------------------------
# colormap
# --------------------------------------------------------------------------------------------

def colormap(values: npt.ArrayLike, *, name: ColormapName = "viridis",
             vmin: Optional[float] = None, vmax: Optional[float] = None) -> np.ndarray:
    """Map values to 8-bit RGB colours.

    Parameters
    ----------
    values : array_like
        Real values of any shape. ``+-inf`` are clipped to the ends; NaN is an error.
    name : {"viridis", "magma", "gray"}
        ``"viridis"`` and ``"magma"`` approximate the perceptually uniform maps of those names
        (see the module docstring for how they are derived); their lightness increases
        monotonically from the first to the last colour. ``"gray"`` is black to white.
    vmin, vmax : float, optional
        The values mapped to the first and last colour; default to the minimum and maximum of
        the finite values. When ``vmax == vmin`` everything maps to the first colour.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``values.shape + (3,)``.

    Examples
    --------
    >>> colormap([0.0, 1.0], name="gray").tolist()
    [[0, 0, 0], [255, 255, 255]]
    """
    if name not in _TABLES:
        raise ShapeError(f"[colormap] name={name!r} is unknown, expected one of "
                         f"{sorted(_TABLES)}")
    v = _as_real_array(values, "values")
    if np.isnan(v).any():
        raise ShapeError("[colormap] values contains NaN")
    finite = v[np.isfinite(v)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ShapeError(f"[colormap] vmin/vmax must be finite, got {lo}, {hi}")
    if hi < lo:
        raise ShapeError(f"[colormap] vmax ({hi}) is smaller than vmin ({lo})")
    if hi == lo:
        t = np.zeros(v.shape)
    else:
        t = np.clip((v - lo) / (hi - lo), 0.0, 1.0)
    idx = np.rint(t * 255.0).astype(np.intp)
    return _TABLES[name][idx]


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def _font():
    return ImageFont.load_default()


def _text_size(draw, text, font):
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0, x0, y0


def _labels(labels, n, name):
    if labels is None:
        return None
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise ShapeError(f"[attention_heatmap] {name} has {len(labels)} entries, expected {n}")
    return labels


def _fmt(x):
    return f"{x:.3g}"


def attention_heatmap(weights: npt.ArrayLike, *, query_labels: Optional[Sequence[str]] = None,
                      key_labels: Optional[Sequence[str]] = None, cell: int = 8,
                      heads: Literal["mean", "tile"] = "mean", cmap: ColormapName = "viridis",
                      vmin: float = 0.0, vmax: Optional[float] = None, legend: bool = True,
                      path: Optional[ImagePath] = None,
                      title: Optional[str] = None) -> Image.Image:
    """Render attention weights as an image, one square cell per weight.

    Parameters
    ----------
    weights : array_like
        ``(Lq, Lk)`` or ``(H, Lq, Lk)`` non-negative, finite weights. Rows are queries (top to
        bottom), columns are keys (left to right).
    query_labels, key_labels : sequence of str, optional
        Text drawn left of each row / above each column (keys rotated to run upwards), with
        Pillow's default font.
    cell : int
        Side of each cell in pixels (nearest-neighbour upscaling).
    heads : {"mean", "tile"}
        For 3-D weights: average over heads, or draw the heads side by side (separated by a
        2-pixel gap), left to right in head order.
    cmap : str
        A :func:`colormap` name.
    vmin : float, default 0.0
    vmax : float, optional
        Colour range; ``vmax`` defaults to the largest weight (1 if all are 0).
    legend : bool
        Draw a thin vertical colour bar right of the grid (high values on top) with the
        ``vmax`` / ``vmin`` values printed beside it.
    path : str or os.PathLike, optional
        When given, the image is also saved there as PNG.
    title : str, optional
        Drawn above everything.

    Returns
    -------
    PIL.Image.Image
        RGB image. ``image.info["grid_box"]`` is ``(left, top, right, bottom)`` of the weight
        grid in pixels (right/bottom exclusive). Without labels and title the grid starts at
        ``(0, 0)`` and the image is ``Lq * cell`` pixels high (taller only if the legend text
        needs it).

    Examples
    --------
    >>> import numpy as np
    >>> img = attention_heatmap(np.eye(3), cell=5, legend=False)
    >>> img.size
    (15, 15)
    """
    w = _check_weights(weights, "weights", ndims=(2, 3))
    if not isinstance(cell, (int, np.integer)) or isinstance(cell, bool) or cell < 1:
        raise ShapeError(f"[attention_heatmap] cell must be a positive int, got {cell!r}")
    cell = int(cell)
    if heads not in ("mean", "tile"):
        raise ShapeError(f"[attention_heatmap] heads={heads!r}, expected 'mean' or 'tile'")
    if w.ndim == 2:
        panels = [w]
    elif heads == "mean":
        panels = [w.mean(axis=0)]
    else:
        panels = list(w)
    lq, lk = panels[0].shape
    if lq == 0 or lk == 0 or not panels:
        raise ShapeError(f"[attention_heatmap] weights has an empty dimension: shape {w.shape}")
    qlab = _labels(query_labels, lq, "query_labels")
    klab = _labels(key_labels, lk, "key_labels")

    lo = float(vmin)
    hi = float(vmax) if vmax is not None else float(max(p.max() for p in panels))
    if hi <= lo:
        hi = lo + 1.0

    gap = 2
    panel_w = lk * cell
    grid_w = len(panels) * panel_w + gap * (len(panels) - 1)
    grid_h = lq * cell

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 4

    left = 0
    if qlab:
        left = max(_text_size(probe, s, font)[0] for s in qlab) + pad
    key_h = 0
    if klab:
        key_h = max(_text_size(probe, s, font)[0] for s in klab) + pad
    title_h = 0
    if title:
        title_h = _text_size(probe, str(title), font)[1] + 2 * pad
    top = title_h + key_h

    bar_w = max(4, min(10, cell))
    legend_w = 0
    text_h = 0
    hi_s, lo_s = _fmt(hi), _fmt(lo)
    if legend:
        tw = max(_text_size(probe, s, font)[0] for s in (hi_s, lo_s))
        text_h = max(_text_size(probe, s, font)[1] for s in (hi_s, lo_s))
        legend_w = pad + bar_w + 2 + tw + 2
    width = left + grid_w + legend_w
    height = top + max(grid_h, 2 * text_h + 4 if legend else 0)
    if title:
        width = max(width, _text_size(probe, str(title), font)[0] + 2 * pad)

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    for i, panel in enumerate(panels):
        rgb = colormap(panel, name=cmap, vmin=lo, vmax=hi)
        tile = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
        tile = tile.resize((panel_w, grid_h), Image.Resampling.NEAREST)
        canvas.paste(tile, (left + i * (panel_w + gap), top))

    if legend:
        bx = left + grid_w + pad
        ramp = np.linspace(1.0, 0.0, max(grid_h, 2))[:, None].repeat(bar_w, axis=1)
        bar = Image.fromarray(np.ascontiguousarray(colormap(ramp, name=cmap, vmin=0.0,
                                                            vmax=1.0)), "RGB")
        canvas.paste(bar, (bx, top))
        tx = bx + bar_w + 2
        _, _, ox, oy = _text_size(draw, hi_s, font)
        draw.text((tx - ox, top - oy), hi_s, fill=_TEXT, font=font)
        _, h2, ox, oy = _text_size(draw, lo_s, font)
        draw.text((tx - ox, top + max(grid_h, 2 * text_h + 4) - h2 - oy), lo_s, fill=_TEXT,
                  font=font)

    if title:
        tw, th, ox, oy = _text_size(draw, str(title), font)
        draw.text(((width - tw) // 2 - ox, pad - oy), str(title), fill=_TEXT, font=font)

    if qlab:
        for r, s in enumerate(qlab):
            tw, th, ox, oy = _text_size(draw, s, font)
            y = top + r * cell + (cell - th) // 2 - oy
            draw.text((left - pad // 2 - tw - ox, y), s, fill=_TEXT, font=font)

    if klab:
        for p in range(len(panels)):
            x0 = left + p * (panel_w + gap)
            for c, s in enumerate(klab):
                tw, th, ox, oy = _text_size(draw, s, font)
                strip = Image.new("RGB", (tw, th), _BACKGROUND)
                ImageDraw.Draw(strip).text((-ox, -oy), s, fill=_TEXT, font=font)
                strip = strip.rotate(90, expand=True)   # reads bottom to top
                x = x0 + c * cell + (cell - strip.width) // 2
                y = top - pad // 2 - strip.height
                canvas.paste(strip, (x, y))

    canvas.info["grid_box"] = (left, top, left + grid_w, top + grid_h)
    if path is not None:
        canvas.save(path, format="PNG")
    return canvas


def spectrogram_image(features: npt.ArrayLike, *, path: Optional[ImagePath] = None,
                      cmap: ColormapName = "magma", height: Optional[int] = None,
                      vmin: Optional[float] = None, vmax: Optional[float] = None,
                      percentiles: Tuple[float, float] = (2.0, 98.0)) -> Image.Image:
    """Render a (log-)mel spectrogram or any ``(n_mels, frames)`` feature map.

    Parameters
    ----------
    features : array_like
        ``(n_mels, frames)`` real values, lowest mel band first (the layout of
        :func:`mmcore.ops.mel_spectrogram`). ``-inf`` (log of silence) is allowed and drawn at
        the low end; NaN is an error.
    path : str or os.PathLike, optional
        When given, the image is also saved there as PNG.
    cmap : str
        A :func:`colormap` name.
    height : int, optional
        Output height in pixels (bilinear resampling along frequency); the width is always
        ``frames``. Defaults to ``n_mels``.
    vmin, vmax : float, optional
        Colour range. By default taken robustly from the ``percentiles`` of the finite values,
        so a few outliers do not wash the picture out.
    percentiles : (float, float)
        Lower and upper percentile used for the default range.

    Returns
    -------
    PIL.Image.Image
        RGB image of size ``(frames, height)`` with low frequencies at the bottom.

    Examples
    --------
    >>> import numpy as np
    >>> spectrogram_image(np.zeros((80, 100)), height=160).size
    (100, 160)
    """
    f = _as_real_array(features, "features")
    if f.ndim != 2:
        raise ShapeError(f"[spectrogram_image] features has {f.ndim} dims, expected 2 "
                         "(n_mels, frames)")
    if f.shape[0] == 0 or f.shape[1] == 0:
        raise ShapeError(f"[spectrogram_image] features is empty: shape {f.shape}")
    if np.isnan(f).any():
        raise ShapeError("[spectrogram_image] features contains NaN")
    if height is not None and (not isinstance(height, (int, np.integer)) or
                               isinstance(height, bool) or height < 1):
        raise ShapeError(f"[spectrogram_image] height must be a positive int, got {height!r}")
    try:
        p_lo, p_hi = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise ShapeError(f"[spectrogram_image] percentiles must be two numbers, "
                         f"got {percentiles!r}") from None
    if not 0.0 <= p_lo <= p_hi <= 100.0:
        raise ShapeError(f"[spectrogram_image] percentiles={percentiles!r} must satisfy "
                         "0 <= low <= high <= 100")
    finite = f[np.isfinite(f)]
    if finite.size:
        lo_d, hi_d = np.percentile(finite, [p_lo, p_hi])
    else:
        lo_d, hi_d = 0.0, 1.0
    lo = float(vmin) if vmin is not None else float(lo_d)
    hi = float(vmax) if vmax is not None else float(hi_d)
    if hi < lo:
        raise ShapeError(f"[spectrogram_image] vmax ({hi}) is smaller than vmin ({lo})")
    rgb = colormap(f[::-1], name=cmap, vmin=lo, vmax=hi)   # row 0 of the image = highest band
    img = Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    if height is not None and int(height) != f.shape[0]:
        img = img.resize((f.shape[1], int(height)), Image.Resampling.BILINEAR)
    if path is not None:
        img.save(path, format="PNG")
    return img


# --------------------------------------------------------------------------------------------
# analysis
# --------------------------------------------------------------------------------------------

def attention_entropy(weights: npt.ArrayLike, *, axis: int = -1,
                      normalize: bool = False) -> np.ndarray:
    """Shannon entropy (nats) of attention distributions along ``axis``.

    Each slice along ``axis`` is divided by its sum first, so unnormalised non-negative scores
    are fine. A one-hot row has entropy 0, a uniform row over ``n`` keys ``log(n)``. An all-zero
    row (a query that attends to nothing) has entropy 0, never NaN.

    Parameters
    ----------
    weights : array_like
        Non-negative finite weights, any rank >= 1.
    axis : int
        The key axis.
    normalize : bool
        Divide by ``log(n)`` so the result lies in [0, 1] (``n == 1`` gives 0).

    Returns
    -------
    numpy.ndarray
        float64, ``weights.shape`` without ``axis``.

    Examples
    --------
    >>> attention_entropy([[1.0, 0.0], [0.5, 0.5]], normalize=True).tolist()
    [0.0, 1.0]
    """
    w = _check_weights(weights, "weights")
    ax = _norm_axis(axis, w.ndim)
    n = w.shape[ax]
    total = w.sum(axis=ax, keepdims=True)
    safe = np.where(total > 0, total, 1.0)
    p = w / safe
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    h = terms.sum(axis=ax)
    h = np.maximum(h, 0.0)
    if normalize:
        h = h / np.log(n) if n > 1 else np.zeros_like(h)
    return h


def top_k_attention(weights: npt.ArrayLike, k: int, *,
                    axis: int = -1) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest weights along ``axis``, largest first.

    Ties are broken by the lower index, so the result is deterministic.

    Parameters
    ----------
    weights : array_like
        Non-negative finite weights, any rank >= 1.
    k : int
        ``1 <= k <= weights.shape[axis]``.
    axis : int
        The key axis.

    Returns
    -------
    indices : numpy.ndarray
        int64, ``weights.shape`` with ``axis`` replaced by ``k``.
    values : numpy.ndarray
        The weights at those indices, same shape, in the input's float dtype (float64 for
        integer inputs).

    Examples
    --------
    >>> idx, val = top_k_attention([0.1, 0.6, 0.3], 2)
    >>> idx.tolist(), val.tolist()
    ([1, 2], [0.6, 0.3])
    """
    src = np.asarray(weights)
    w = _check_weights(weights, "weights")
    ax = _norm_axis(axis, w.ndim)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise ShapeError(f"[top_k_attention] k must be an int, got {k!r}")
    n = w.shape[ax]
    if k <= 0 or k > n:
        raise ShapeError(f"[top_k_attention] k={k} is out of range, expected 1 <= k <= {n}")
    order = np.argsort(-w, axis=ax, kind="stable")
    idx = np.take(order, np.arange(int(k)), axis=ax).astype(np.int64)
    values = np.take_along_axis(w, idx, axis=ax)
    if np.issubdtype(src.dtype, np.floating):
        values = values.astype(src.dtype)
    return idx, values


def attention_summary(weights: npt.ArrayLike) -> Dict[str, Any]:
    """A few numbers that describe an attention map.

    Parameters
    ----------
    weights : array_like
        ``(Lq, Lk)``, ``(H, Lq, Lk)`` or ``(B, H, Lq, Lk)`` non-negative finite weights.

    Returns
    -------
    dict
        ``shape``; ``num_heads``; ``num_keys``; ``mean_entropy`` (nats) and
        ``mean_normalized_entropy`` (entropy / log(Lk)) over all query rows;
        ``entropy_per_head`` (list, averaged over batch and queries); ``max_weight``;
        ``mean_max_weight`` (mean over rows of each row's largest weight); ``empty_rows``
        (rows that sum to 0); ``top1_agreement``: for each (batch, query), the fraction of
        heads whose top-1 key equals the most common top-1 key among the heads (ties to the
        lower key index), averaged -- 1.0 when all heads look at the same key, and 1.0 for a
        single head.

    Examples
    --------
    >>> import numpy as np
    >>> attention_summary(np.stack([np.eye(3), np.eye(3)]))["top1_agreement"]
    1.0
    """
    w = _check_weights(weights, "weights", ndims=(2, 3, 4))
    if w.size == 0:
        raise ShapeError(f"[attention_summary] weights is empty: shape {w.shape}")
    w4 = w.reshape((1,) * (4 - w.ndim) + w.shape)
    b, h, lq, lk = w4.shape
    ent = attention_entropy(w4)
    top1 = np.argmax(w4, axis=-1)                                     # (B, H, Lq), lowest on ties
    counts = np.zeros((b, lq, lk), dtype=np.int64)
    for head in range(h):
        np.add.at(counts, (np.arange(b)[:, None], np.arange(lq)[None, :], top1[:, head]), 1)
    agreement = counts.max(axis=-1) / h
    return {
        "shape": tuple(w.shape),
        "num_heads": int(h),
        "num_keys": int(lk),
        "mean_entropy": float(ent.mean()),
        "mean_normalized_entropy": float(ent.mean() / np.log(lk)) if lk > 1 else 0.0,
        "entropy_per_head": [float(x) for x in ent.mean(axis=(0, 2))],
        "max_weight": float(w.max()),
        "mean_max_weight": float(w4.max(axis=-1).mean()),
        "empty_rows": int((w4.sum(axis=-1) == 0).sum()),
        "top1_agreement": float(agreement.mean()),
    }


# --------------------------------------------------------------------------------------------
# optional matplotlib helper
# --------------------------------------------------------------------------------------------

def plot_attention(weights: npt.ArrayLike, *, ax: Optional[Axes] = None,
                   query_labels: Optional[Sequence[str]] = None,
                   key_labels: Optional[Sequence[str]] = None, cmap: ColormapName = "viridis",
                   title: Optional[str] = None, colorbar: bool = True) -> Axes:
    """Draw ``(Lq, Lk)`` or ``(H, Lq, Lk)`` (head-averaged) weights on a matplotlib axes.

    Needs matplotlib; raises ImportError with a hint when it is missing. Uses this module's
    colour tables so the colours match :func:`attention_heatmap`.

    Parameters
    ----------
    weights : array_like
        ``(Lq, Lk)`` or ``(H, Lq, Lk)`` non-negative, finite weights.
    ax : matplotlib.axes.Axes, optional
        Where to draw; default a new figure's axes (``plt.subplots()``).
    query_labels, key_labels : sequence of str, optional
        Tick labels of the rows (queries) and of the columns (keys, rotated).
    cmap : {"viridis", "magma", "gray"}
        A :func:`colormap` name.
    title : str, optional
    colorbar : bool
        Add a colour bar next to the axes.

    Returns
    -------
    matplotlib.axes.Axes
    """
    try:
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("plot_attention needs matplotlib (pip install matplotlib); "
                          "attention_heatmap works without it") from exc
    w = _check_weights(weights, "weights", ndims=(2, 3))
    if w.ndim == 3:
        w = w.mean(axis=0)
    if cmap not in _TABLES:
        raise ShapeError(f"[plot_attention] cmap={cmap!r} is unknown, expected one of "
                         f"{sorted(_TABLES)}")
    if ax is None:
        _, ax = plt.subplots()
    im = ax.imshow(w, cmap=ListedColormap(_TABLES[cmap] / 255.0, name=f"mmcore_{cmap}"),
                   aspect="auto", interpolation="nearest", vmin=0.0)
    if query_labels is not None:
        ax.set_yticks(range(w.shape[0]), [str(s) for s in _labels(query_labels, w.shape[0],
                                                                   "query_labels")])
    if key_labels is not None:
        ax.set_xticks(range(w.shape[1]), [str(s) for s in _labels(key_labels, w.shape[1],
                                                                  "key_labels")], rotation=90)
    if title:
        ax.set_title(str(title))
    if colorbar:
        ax.figure.colorbar(im, ax=ax)
    return ax
