"""Pictures and numbers for looking at attention and audio features.

Two kinds of pictures:

* **Figures** (need matplotlib, the ``viz`` extra: ``pip install 'mmcore[viz]'``), with axes,
  labels, titles and colour bars: :func:`spectrogram_figure` (time in s, frequency in Hz on a
  mel or linear axis), :func:`attention_overlay_figure` (cross-attention tinted over the input
  image's patch grid, beside the query-by-patch heatmap), :func:`fusion_weights_figure` (the
  fusion pooling weights as the one softmax over all modalities' tokens they are) and
  :func:`plot_attention` (a heatmap on an axes of yours). They return
  :class:`matplotlib.figure.Figure` objects drawn on the Agg canvas without pyplot, so they work
  headless, from several threads, and leave the user's backend alone; ``path=`` also saves an
  RGB PNG (:func:`figure_to_image` renders any figure to a Pillow image). Without matplotlib
  they raise ImportError naming the extra.
* **Pixel maps** (NumPy and Pillow only): :func:`attention_heatmap` (one square cell per
  weight) and :func:`spectrogram_image` (one pixel per frame), with no axes or text beyond
  optional labels.

:func:`colormap` maps values to 8-bit colours with matplotlib's colormaps; ``"viridis"``,
``"magma"`` and ``"gray"`` are built in (the same 256 colours as matplotlib's, so the pixel maps
work without it), every other matplotlib colormap name works when matplotlib is installed.
:func:`attention_entropy`, :func:`top_k_attention` and :func:`attention_summary` describe
attention maps with numbers.

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

from typing import Any, Dict, Literal, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from mmcore._viz_figures import (
    VIZ_EXTRA,
    ImagePath,
    _as_real_array,
    _check_weights,
    _colormap,
    _labels,
    _robust_range,
    _spectrogram_features,
    attention_overlay_figure,
    figure_to_image,
    fusion_weights_figure,
    matplotlib_available,
    plot_attention,
    spectrogram_figure,
)
from mmcore.errors import ShapeError

__all__ = [
    "colormap",
    "attention_heatmap",
    "spectrogram_image",
    "attention_entropy",
    "top_k_attention",
    "attention_summary",
    "plot_attention",
    "spectrogram_figure",
    "attention_overlay_figure",
    "fusion_weights_figure",
    "figure_to_image",
    "matplotlib_available",
    "VIZ_EXTRA",
]

#: The colormap names that work without matplotlib (any matplotlib name works with it).
ColormapName = Literal["viridis", "magma", "gray"]

# --------------------------------------------------------------------------------------------
# colormaps
# --------------------------------------------------------------------------------------------

# matplotlib's "viridis" and "magma" (by Nathaniel J. Smith, Stefan van der Walt and Eric
# Firing, released under CC0), sampled at 256 points and rounded to 8 bits: hex RGB triples.
_HEX = {
    "viridis": (
        "44015444025645045745055946075a46085c460a5d460b5e470d60470e61471063471164471365481467481668"
        "48176948186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979"
        "472a7a472c7a472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84"
        "433d84433e85423f854240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a"
        "3d4e8a3c4f8a3c508b3b518b3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d"
        "355e8d355f8d34608d34618d33628d33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e"
        "2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e"
        "297b8e287c8e287d8e277e8e277f8e27808e26818e26828e26828e25838e25848e25858e24868e24878e23888e"
        "23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d21918c20928c20928c20938c1f948c1f958b1f968b"
        "1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f881fa0881fa1881fa1871fa28720a38620a486"
        "21a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad8128ae8029af7f2ab07f2cb17e2db27d"
        "2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc743fbc7340bd7242be7144bf70"
        "46c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc8635ec96260ca6063cb5f"
        "65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d84d44b86d549"
        "89d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32addc30"
        "b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21a"
        "d8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723"
        "fde725"
    ),
    "magma": (
        "00000401000501010601010802010902020b02020d03030f03031204041405041606051806051a07061c08071e"
        "0907200a08220b09240c09260d0a290e0b2b100b2d110c2f120d31130d34140e36150e38160f3b180f3d19103f"
        "1a10421c10441d11471e114920114b21114e22115024125325125527125829115a2a115c2c115f2d11612f1163"
        "31116533106734106936106b38106c390f6e3b0f703d0f713f0f72400f74420f75440f76451077471078491078"
        "4a10794c117a4e117b4f127b51127c52137c54137d56147d57157e59157e5a167e5c167f5d177f5f187f601880"
        "621980641a80651a80671b80681c816a1c816b1d816d1d816e1e81701f81721f81732081752181762181782281"
        "7922827b23827c23827e24828025828125818326818426818627818827818928818b29818c29818e2a81902a81"
        "912b81932b80942c80962c80982d80992d809b2e7f9c2e7f9e2f7fa02f7fa1307ea3307ea5317ea6317da8327d"
        "aa337dab337cad347cae347bb0357bb2357bb3367ab5367ab73779b83779ba3878bc3978bd3977bf3a77c03a76"
        "c23b75c43c75c53c74c73d73c83e73ca3e72cc3f71cd4071cf4070d0416fd2426fd3436ed5446dd6456cd8456c"
        "d9466bdb476adc4869de4968df4a68e04c67e24d66e34e65e44f64e55064e75263e85362e95462ea5661eb5760"
        "ec5860ed5a5fee5b5eef5d5ef05f5ef1605df2625df2645cf3655cf4675cf4695cf56b5cf66c5cf66e5cf7705c"
        "f7725cf8745cf8765cf9785df9795df97b5dfa7d5efa7f5efa815ffb835ffb8560fb8761fc8961fc8a62fc8c63"
        "fc8e64fc9065fd9266fd9467fd9668fd9869fd9a6afd9b6bfe9d6cfe9f6dfea16efea36ffea571fea772fea973"
        "feaa74feac76feae77feb078feb27afeb47bfeb67cfeb77efeb97ffebb81febd82febf84fec185fec287fec488"
        "fec68afec88cfeca8dfecc8ffecd90fecf92fed194fed395fed597fed799fed89afdda9cfddc9efddea0fde0a1"
        "fde2a3fde3a5fde5a7fde7a9fde9aafdebacfcecaefceeb0fcf0b2fcf2b4fcf4b6fcf6b8fcf7b9fcf9bbfcfbbd"
        "fcfdbf"
    ),
}
_TABLES = {name: np.frombuffer(bytes.fromhex("".join(h)), np.uint8).reshape(256, 3)
           for name, h in _HEX.items()}
_TABLES["gray"] = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
for _entry in _TABLES.values():
    _entry.setflags(write=False)


def _table(name, op):
    """The 256 x 3 uint8 table of a colormap: built in, or from matplotlib."""
    if isinstance(name, str) and name in _TABLES:
        return _TABLES[name]
    if not isinstance(name, str):
        raise ShapeError(f"[{op}] name={name!r} is unknown, expected a colormap name")
    try:
        cmap = _colormap(op, name)
    except ImportError:
        raise ShapeError(f"[{op}] name={name!r} is unknown without matplotlib, expected one of "
                         f"{sorted(_TABLES)} (other names need {VIZ_EXTRA})") from None
    except ValueError:
        raise ShapeError(f"[{op}] name={name!r} is unknown, expected one of {sorted(_TABLES)} "
                         "or another matplotlib colormap name") from None
    rgb = cmap(np.linspace(0.0, 1.0, 256))[:, :3]
    return np.rint(rgb * 255.0).astype(np.uint8)


def colormap(values: npt.ArrayLike, *, name: str = "viridis",
             vmin: Optional[float] = None, vmax: Optional[float] = None) -> np.ndarray:
    """Map values to 8-bit RGB colours with a matplotlib colormap.

    Parameters
    ----------
    values : array_like
        Real values of any shape. ``+-inf`` are clipped to the ends; NaN is an error.
    name : str, default "viridis"
        ``"viridis"``, ``"magma"`` (perceptually uniform, lightness rising from the first to
        the last colour) and ``"gray"`` (black to white) work without matplotlib and give
        matplotlib's colours; any other matplotlib colormap name needs matplotlib.
    vmin, vmax : float, optional
        The values mapped to the first and last colour; default to the minimum and maximum of
        the finite values. When ``vmax == vmin`` everything maps to the first colour.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of shape ``values.shape + (3,)``: entry ``min(floor(t * 256), 255)``
        of the 256-colour table for ``t = (v - vmin) / (vmax - vmin)`` clipped to [0, 1], as
        matplotlib indexes its tables.

    Examples
    --------
    >>> colormap([0.0, 1.0], name="gray").tolist()
    [[0, 0, 0], [255, 255, 255]]
    >>> colormap([0.0], name="viridis").tolist()     # matplotlib's first viridis colour
    [[68, 1, 84]]
    """
    table = _table(name, "colormap")
    v = _as_real_array(values, "values", "colormap")
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
    idx = np.minimum((t * 256.0).astype(np.intp), 255)
    return table[idx]


# --------------------------------------------------------------------------------------------
# pixel maps (NumPy and Pillow only)
# --------------------------------------------------------------------------------------------

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def _font():
    return ImageFont.load_default()


def _text_size(draw, text, font):
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0, x0, y0


def _fmt(x):
    return f"{x:.3g}"


def _norm_axis(axis, ndim, name="axis"):
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise ShapeError(f"[viz] {name} must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ShapeError(f"[viz] {name}={axis} is out of range for an array with {ndim} dims")
    return int(axis) % ndim


def attention_heatmap(weights: npt.ArrayLike, *, query_labels: Optional[Sequence[str]] = None,
                      key_labels: Optional[Sequence[str]] = None, cell: int = 8,
                      heads: Literal["mean", "tile"] = "mean", cmap: str = "viridis",
                      vmin: float = 0.0, vmax: Optional[float] = None, legend: bool = True,
                      path: Optional[ImagePath] = None,
                      title: Optional[str] = None) -> Image.Image:
    """Render attention weights as an image, one square cell per weight.

    A pixel map (NumPy and Pillow only); :func:`attention_overlay_figure` and
    :func:`plot_attention` draw labelled matplotlib figures.

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
                      cmap: str = "magma", height: Optional[int] = None,
                      vmin: Optional[float] = None, vmax: Optional[float] = None,
                      percentiles: Tuple[float, float] = (2.0, 98.0)) -> Image.Image:
    """Render a (log-)mel spectrogram or any ``(n_mels, frames)`` feature map, one pixel per value.

    A plain pixel map without axes (NumPy and Pillow only); :func:`spectrogram_figure` draws
    the same data with time and frequency axes, a title and a colour bar.

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
    op = "spectrogram_image"
    f = _spectrogram_features(features, op)
    if height is not None and (not isinstance(height, (int, np.integer)) or
                               isinstance(height, bool) or height < 1):
        raise ShapeError(f"[{op}] height must be a positive int, got {height!r}")
    lo, hi = _robust_range(f, vmin, vmax, percentiles, op)
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


