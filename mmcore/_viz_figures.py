"""The matplotlib figures of :mod:`mmcore.viz`, and the argument checks it shares with them.

Import the public names from :mod:`mmcore.viz`. The figures need matplotlib (the ``viz``
extra: ``pip install 'mmcore[viz]'``); without it they raise ImportError naming the extra.
They are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas attached
directly: pyplot is never imported, so the user's backend and pyplot's list of open figures
stay as they are, nothing opens a window, and figures can be drawn from several threads at
once (one figure per thread).
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt
from PIL import Image

from mmcore.errors import ArgumentError, ShapeError

if TYPE_CHECKING:     # names of the annotations only
    import os

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Where an image is saved.
ImagePath = Union[str, "os.PathLike[str]"]

#: How to install what the figures need.
VIZ_EXTRA = "pip install 'mmcore[viz]'"


# --------------------------------------------------------------------------------------------
# argument checks (shared with the Pillow renderers of mmcore.viz)
# --------------------------------------------------------------------------------------------

def _as_real_array(x, name, op="viz"):
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ShapeError(f"[{op}] {name} could not be converted to an array: {exc}") from None
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ShapeError(f"[{op}] {name} has dtype {arr.dtype}, expected a real numeric array")
    return arr.astype(np.float64, copy=False)


def _check_weights(weights, name="weights", ndims=None, op="viz"):
    w = _as_real_array(weights, name, op)
    if ndims is not None and w.ndim not in ndims:
        expected = " or ".join(str(n) for n in ndims)
        raise ShapeError(f"[{op}] {name} has {w.ndim} dims (shape {w.shape}), expected {expected}")
    if w.ndim == 0:
        raise ShapeError(f"[{op}] {name} is a scalar, expected at least 1 dim")
    if np.isnan(w).any():
        raise ShapeError(f"[{op}] {name} contains NaN")
    if np.isinf(w).any():
        raise ShapeError(f"[{op}] {name} contains inf")
    if (w < 0).any():
        raise ShapeError(f"[{op}] {name} contains negative values (min {w.min():.4g}); "
                         "attention weights must be >= 0")
    return w


def _labels(labels, n, name, op="attention_heatmap"):
    if labels is None:
        return None
    if isinstance(labels, str):
        raise ArgumentError(f"[{op}] {name} is a str, expected a sequence of {n} labels")
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise ShapeError(f"[{op}] {name} has {len(labels)} entries, expected {n}")
    return labels


def _robust_range(f, vmin, vmax, percentiles, op):
    """``(lo, hi)``: ``vmin`` / ``vmax``, else the ``percentiles`` of the finite values."""
    try:
        p_lo, p_hi = (float(p) for p in percentiles)
    except (TypeError, ValueError):
        raise ShapeError(f"[{op}] percentiles must be two numbers, "
                         f"got {percentiles!r}") from None
    if not 0.0 <= p_lo <= p_hi <= 100.0:
        raise ShapeError(f"[{op}] percentiles={percentiles!r} must satisfy "
                         "0 <= low <= high <= 100")
    finite = f[np.isfinite(f)]
    lo_d, hi_d = np.percentile(finite, [p_lo, p_hi]) if finite.size else (0.0, 1.0)
    lo = float(vmin) if vmin is not None else float(lo_d)
    hi = float(vmax) if vmax is not None else float(hi_d)
    if hi < lo:
        raise ShapeError(f"[{op}] vmax ({hi}) is smaller than vmin ({lo})")
    return lo, hi


def _spectrogram_features(features, op):
    f = _as_real_array(features, "features", op)
    if f.ndim != 2:
        raise ShapeError(f"[{op}] features has {f.ndim} dims (shape {f.shape}), expected 2: "
                         "(n_mels, frames)")
    if f.shape[0] == 0 or f.shape[1] == 0:
        raise ShapeError(f"[{op}] features is empty: shape {f.shape}")
    if np.isnan(f).any():
        raise ShapeError(f"[{op}] features contains NaN")
    return f


def _positive(op, name, value, *, integer=False, optional=False):
    if value is None and optional:
        return None
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0 \
            or not math.isfinite(value):
        what = "int" if integer else "number"
        raise ArgumentError(f"[{op}] {name} must be a positive {what}, got {value!r}")
    return int(value) if integer else float(value)


# --------------------------------------------------------------------------------------------
# matplotlib without pyplot
# --------------------------------------------------------------------------------------------

def _matplotlib(op):
    """``(matplotlib, Figure, FigureCanvasAgg)``, or ImportError naming the extra."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"[{op}] needs matplotlib, which the viz extra installs: {VIZ_EXTRA} "
                          "(attention_heatmap and spectrogram_image draw plain pixel maps "
                          "without it)") from exc
    return matplotlib, Figure, FigureCanvasAgg


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (the figures of :mod:`mmcore.viz` need it).

    Examples
    --------
    >>> isinstance(matplotlib_available(), bool)
    True
    """
    try:
        _matplotlib("matplotlib_available")
    except ImportError:
        return False
    return True


def _colormap(op, name):
    mpl = _matplotlib(op)[0]
    if not isinstance(name, str) or name not in mpl.colormaps:
        raise ArgumentError(f"[{op}] cmap={name!r} is not a matplotlib colormap name "
                            "(for example 'viridis', 'magma', 'inferno', 'gray')")
    return mpl.colormaps[name]


def _new_figure(op, figsize, dpi):
    _, Figure, FigureCanvasAgg = _matplotlib(op)
    dpi = _positive(op, "dpi", dpi)
    try:
        w, h = (float(v) for v in figsize)
    except (TypeError, ValueError):
        raise ArgumentError(f"[{op}] figsize must be (width, height) in inches, "
                            f"got {figsize!r}") from None
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        raise ArgumentError(f"[{op}] figsize must be positive, got {figsize!r}")
    fig = Figure(figsize=(w, h), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_image(fig: Figure) -> Image.Image:
    """Render a matplotlib figure to an RGB Pillow image at the figure's own dpi.

    Works for any figure (also one made with pyplot); pyplot's state is not touched.

    Examples
    --------
    >>> img = figure_to_image(spectrogram_figure(np.zeros((8, 10)), figsize=(3, 2), dpi=50))
    >>> img.mode, img.size
    ('RGB', (150, 100))
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor="white")
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def _finish(fig, path):
    if path is not None:
        figure_to_image(fig).save(path, format="PNG")
    return fig


# --------------------------------------------------------------------------------------------
# spectrogram
# --------------------------------------------------------------------------------------------

def _hz_to_mel(f, htk):
    f = np.asarray(f, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    # Slaney's Auditory Toolbox scale (librosa's default): linear below 1 kHz, log above
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def _hz_label(f):
    if f >= 1000:
        return f"{f / 1000:g}k"
    return f"{f:g}"


def _mel_ticks(n_mels, fmin, fmax, htk):
    """Tick positions (in band units, band ``m`` spanning ``[m, m + 1]``) and Hz labels."""
    m_lo, m_hi = _hz_to_mel([fmin, fmax], htk)
    cands = [0, 50, 100, 200, 300, 500, 700, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000,
             10000, 12000, 16000, 20000, 24000, 32000, 48000]
    ticks: List[float] = []
    labels: List[str] = []
    # band m's centre is edge m + 1 of the n_mels + 2 edges spaced evenly in mel
    for f in cands:
        if not fmin <= f <= fmax:
            continue
        y = float((_hz_to_mel(f, htk) - m_lo) / (m_hi - m_lo) * (n_mels + 1) - 0.5)
        if not 0.0 <= y <= n_mels or (ticks and y - ticks[-1] < n_mels / 11):
            continue
        ticks.append(y)
        labels.append(_hz_label(f))
    return ticks, labels


def spectrogram_figure(features: npt.ArrayLike, *, sample_rate: Optional[float] = 16000.0,
                       hop_length: int = 160, scale: Literal["mel", "linear"] = "mel",
                       fmin: float = 0.0, fmax: Optional[float] = None, htk: bool = False,
                       title: Optional[str] = "log-mel spectrogram",
                       value_label: str = "log-mel value", cmap: str = "magma",
                       vmin: Optional[float] = None, vmax: Optional[float] = None,
                       percentiles: Tuple[float, float] = (2.0, 98.0),
                       figsize: Tuple[float, float] = (9.0, 4.0), dpi: float = 110,
                       path: Optional[ImagePath] = None) -> Figure:
    """A spectrogram with a time axis in seconds, a frequency axis in Hz and a colour bar.

    Needs matplotlib (``pip install 'mmcore[viz]'``); draws without pyplot.

    Parameters
    ----------
    features : array_like
        ``(n_bins, frames)`` real values, lowest frequency first (the layout of
        :func:`mmcore.ops.log_mel_spectrogram`); drawn with low frequencies at the bottom and
        time running left to right. ``-inf`` (log of silence) is drawn at the low end; NaN is
        an error.
    sample_rate : float or None, default 16000
        With ``hop_length``, places frame ``i`` at ``i * hop_length / sample_rate`` seconds and
        labels the frequency axis in Hz. ``None``: frame and bin numbers instead.
    hop_length : int, default 160
        Samples between frames.
    scale : {"mel", "linear"}
        "mel": rows are mel bands from ``fmin`` to ``fmax`` (librosa's layout; Slaney's mel
        scale, or HTK's with ``htk=True``), ticks at round Hz values. "linear": rows are STFT
        bins evenly spaced from 0 to ``fmax``.
    fmin, fmax : float
        Frequency range of the rows in Hz; ``fmax`` defaults to ``sample_rate / 2``.
    htk : bool
        The HTK mel formula instead of Slaney's.
    title, value_label : str
        Figure title (None for none) and colour-bar label.
    cmap : str
        A matplotlib colormap name.
    vmin, vmax : float, optional
        Colour range; by default the ``percentiles`` of the finite values, so that a few
        outliers do not wash the picture out.
    percentiles : (float, float)
    figsize : (float, float)
        Inches; the PNG is ``figsize * dpi`` pixels.
    dpi : float
    path : str or os.PathLike, optional
        Also save the figure there as an RGB PNG.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = spectrogram_figure(np.zeros((80, 200)), figsize=(6, 3), dpi=50)
    >>> [ax.get_xlabel() for ax in fig.axes][:1]
    ['time (s)']
    """
    op = "spectrogram_figure"
    f = _spectrogram_features(features, op)
    if scale not in ("mel", "linear"):
        raise ArgumentError(f"[{op}] scale={scale!r}, expected 'mel' or 'linear'")
    hop = _positive(op, "hop_length", hop_length, integer=True)
    sr = _positive(op, "sample_rate", sample_rate, optional=True)
    lo, hi = _robust_range(f, vmin, vmax, percentiles, op)
    n, frames = f.shape
    colors = _colormap(op, cmap)
    fig = _new_figure(op, figsize, dpi)
    ax = fig.add_subplot()

    if sr is None:
        x1, xlabel = float(frames), "frame"
    else:
        x1, xlabel = frames * hop / sr, "time (s)"
    top_hz = None
    if sr is not None:
        top_hz = sr / 2 if fmax is None else float(fmax)
        f_lo = float(fmin)
        if not (math.isfinite(top_hz) and math.isfinite(f_lo) and 0 <= f_lo < top_hz):
            raise ArgumentError(f"[{op}] need 0 <= fmin < fmax, got fmin={fmin!r}, "
                                f"fmax={top_hz!r}")
    if scale == "linear" and top_hz is not None:
        extent = (0.0, x1, 0.0, top_hz)
        ylabel = "frequency (Hz)"
    else:
        extent = (0.0, x1, 0.0, float(n))
        ylabel = "mel band" if scale == "mel" else "frequency bin"
    shown = np.where(np.isneginf(f), lo, f)
    im = ax.imshow(shown, origin="lower", aspect="auto", interpolation="nearest",
                   extent=extent, cmap=colors, vmin=lo, vmax=max(hi, lo + 1e-12))
    if scale == "mel" and top_hz is not None:
        ticks, labels = _mel_ticks(n, float(fmin), top_hz, htk)
        ax.set_yticks(ticks, labels)
        ylabel = "frequency (Hz, mel scale)"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(str(title))
    fig.colorbar(im, ax=ax, label=str(value_label), pad=0.015)
    return _finish(fig, path)


# --------------------------------------------------------------------------------------------
# cross-attention over image patches
# --------------------------------------------------------------------------------------------

def _patch_grid(op, lk, grid, image_shape):
    if grid is not None:
        try:
            rows, cols = (int(v) for v in grid)
        except (TypeError, ValueError):
            raise ArgumentError(f"[{op}] grid must be (rows, cols), got {grid!r}") from None
        if rows < 1 or cols < 1 or rows * cols != lk:
            raise ShapeError(f"[{op}] grid={grid!r} has {rows * cols} patches, but weights has "
                             f"{lk} keys")
        return rows, cols
    pairs = [(r, lk // r) for r in range(1, lk + 1) if lk % r == 0]
    if image_shape is not None:
        aspect = image_shape[0] / image_shape[1]
        return min(pairs, key=lambda p: (abs(math.log(p[0] / p[1] / aspect)), p[0]))
    side = math.isqrt(lk)
    if side * side == lk:
        return side, side
    raise ShapeError(f"[{op}] weights has {lk} keys, which is not a square number of patches; "
                     "pass grid=(rows, cols)")


def _display_image(op, image):
    a = np.asarray(image)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or 0 in a.shape:
        raise ShapeError(f"[{op}] image has shape {a.shape}, expected (H, W), (H, W, 1), "
                         "(H, W, 3) or (H, W, 4)")
    if a.dtype == np.uint8:
        a = a.astype(np.float64) / 255.0
    elif np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise ShapeError(f"[{op}] image contains NaN or inf")
        if a.min() < 0.0 or a.max() > 1.0:
            raise ShapeError(f"[{op}] image of dtype {np.asarray(image).dtype} must lie in "
                             f"[0, 1] (or be uint8), got [{a.min():.4g}, {a.max():.4g}]")
    else:
        raise ShapeError(f"[{op}] image has dtype {a.dtype}, expected uint8 or float")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return a[..., :3]


def _plural(name):
    return name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")


def _tick_every(n, room):
    """Every how many rows / columns a tick label fits when ``room`` labels fit."""
    return max(1, math.ceil(n / max(room, 1)))


def _overlay(ax, patch, img, colors, alpha, title, lk):
    """One patch-weight map on ``ax``: tinted over ``img`` (or bare), grid lines, numbers."""
    rows, cols = patch.shape
    h, wd = (img.shape[:2] if img is not None else (rows, cols))
    ext = (0.0, float(wd), float(h), 0.0)
    if img is not None:
        ax.imshow(img, extent=ext, interpolation="antialiased")
    over = ax.imshow(patch, extent=ext, cmap=colors, vmin=0.0,
                     vmax=max(float(patch.max()), 1e-12), interpolation="nearest",
                     alpha=alpha if img is not None else 1.0)
    for r in range(1, rows):
        ax.axhline(r * h / rows, color="white", lw=0.8, alpha=0.8)
    for c in range(1, cols):
        ax.axvline(c * wd / cols, color="white", lw=0.8, alpha=0.8)
    if lk <= 64:
        from matplotlib import patheffects
        outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]
        for k in range(lk):
            r, c = divmod(k, cols)
            ax.text((c + 0.5) * wd / cols, (r + 0.5) * h / rows, str(k), color="white",
                    ha="center", va="center", fontsize=9, path_effects=outline)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlim(0, wd)
    ax.set_ylim(h, 0)
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(over, ax=ax, shrink=0.9, pad=0.02, label="attention weight")


def attention_overlay_figure(weights: npt.ArrayLike, image: Optional[npt.ArrayLike] = None, *,
                             query_labels: Optional[Sequence[str]] = None,
                             grid: Optional[Tuple[int, int]] = None,
                             query: Union[None, int, Sequence[int]] = None,
                             cmap: str = "viridis", alpha: float = 0.6,
                             title: Optional[str] = "cross-attention",
                             query_name: str = "query token", key_name: str = "image patch",
                             figsize: Optional[Tuple[float, float]] = None, dpi: float = 110,
                             path: Optional[ImagePath] = None) -> Figure:
    """Cross-attention from queries to image patches: on the image, and as a heatmap.

    Left, the image with the patch grid drawn on it and each patch tinted by its weight (the
    mean over the chosen query rows), every patch numbered when there are at most 64, and
    below it the same for the single query row with the largest weight (when that is another
    picture); right, the full ``(queries, patches)`` heatmap with the query labels on the
    vertical axis and the patch numbers (row-major, the numbers of the left panels) on the
    horizontal one.

    Needs matplotlib (``pip install 'mmcore[viz]'``); draws without pyplot.

    Parameters
    ----------
    weights : array_like
        ``(Lq, Lk)`` or ``(H, Lq, Lk)`` (averaged over heads) non-negative finite weights; the
        ``Lk`` keys are the image's patches in row-major order.
    image : array_like, optional
        The picture the patches were cut from, as the model saw it (after resizing and
        cropping): ``(H, W)`` or ``(H, W, 1 | 3 | 4)``, uint8 or floats in [0, 1]. Any
        resolution; the patch grid is stretched over the whole image. Without it the left
        panel shows the weights on the bare grid.
    query_labels : sequence of str, optional
        One label per query row (for example the text tokens).
    grid : (int, int), optional
        Patch rows and columns, ``rows * cols == Lk``. By default a square grid, or with an
        image the factorisation of ``Lk`` closest to the image's aspect ratio.
    query : int or sequence of int, optional
        The query rows averaged for the left panel; default all of them.
    cmap : str
        A matplotlib colormap name.
    alpha : float
        Opacity of the weights over the image, in (0, 1].
    title, query_name, key_name : str
        Figure title (None for none) and the names of the two heatmap axes.
    figsize : (float, float), optional
        Inches; by default tall enough for one readable label per query row (up to 64 rows).
    dpi : float
    path : str or os.PathLike, optional
        Also save the figure there as an RGB PNG.

    Returns
    -------
    matplotlib.figure.Figure
        ``fig.axes[0]`` is the (first) image panel, ``fig.axes[1]`` the heatmap.

    Examples
    --------
    >>> w = np.full((3, 16), 1 / 16)
    >>> fig = attention_overlay_figure(w, np.zeros((64, 64, 3), np.uint8), dpi=40,
    ...                                query_labels=["a", "b", "c"])
    >>> fig.axes[1].get_xlabel()
    'image patch (row-major index)'
    """
    op = "attention_overlay_figure"
    w = _check_weights(weights, "weights", ndims=(2, 3), op=op)
    if w.ndim == 3:
        w = w.mean(axis=0)
    lq, lk = w.shape
    if lq == 0 or lk == 0:
        raise ShapeError(f"[{op}] weights has an empty dimension: shape {w.shape}")
    qlab = _labels(query_labels, lq, "query_labels", op)
    img = None if image is None else _display_image(op, image)
    rows, cols = _patch_grid(op, lk, grid, None if img is None else img.shape)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) \
            or not 0.0 < float(alpha) <= 1.0:
        raise ArgumentError(f"[{op}] alpha must be in (0, 1], got {alpha!r}")
    if query is None:
        picked = list(range(lq))
    else:
        seq = [query] if isinstance(query, (int, np.integer)) else list(query)
        if not seq or any(isinstance(q, bool) or not isinstance(q, (int, np.integer))
                          or not -lq <= q < lq for q in seq):
            raise ArgumentError(f"[{op}] query={query!r} must be row indices in "
                                f"[-{lq}, {lq})")
        picked = [int(q) % lq for q in seq]
    colors = _colormap(op, cmap)
    # the second overlay (the row with the largest single weight) only when it adds something
    focus = int(np.argmax(w.max(axis=1)))
    two = lq > 1 and picked != [focus]
    if figsize is None:
        figsize = (12.0, float(np.clip(0.17 * min(lq, 64) + 1.8, 7.5 if two else 4.5, 13.0)))
    fig = _new_figure(op, figsize, dpi)
    gs = fig.add_gridspec(2 if two else 1, 2, width_ratios=[1.0, 1.3])
    ax_img = fig.add_subplot(gs[0, 0])
    ax_map = fig.add_subplot(gs[:, 1])

    def describe(rows_):
        if len(rows_) == lq and lq > 1:
            return f"mean over all {lq} {_plural(query_name)}"
        if len(rows_) == 1:
            label = qlab[rows_[0]] if qlab else str(rows_[0])
            return f"{query_name} {label!r}"
        return f"mean over {len(rows_)} {_plural(query_name)}"

    _overlay(ax_img, w[picked].mean(axis=0).reshape(rows, cols), img, colors, float(alpha),
             f"{describe(picked)} ({rows} x {cols} {_plural(key_name)})", lk)
    if two:
        ax_focus = fig.add_subplot(gs[1, 0])
        _overlay(ax_focus, w[focus].reshape(rows, cols), img, colors, float(alpha),
                 f"{describe([focus])}: the row with the largest weight", lk)
    sums = w.sum(axis=1)
    rowsum = " (each row sums to 1)" if np.allclose(sums, 1.0, atol=1e-3) else ""

    # right: every query row against every patch
    hm = ax_map.imshow(w, aspect="auto", interpolation="nearest", cmap=colors, vmin=0.0,
                       vmax=max(float(w.max()), 1e-12))
    height_in = fig.get_size_inches()[1]
    yfont = 8 if lq > 24 else 10
    step = _tick_every(lq, (height_in - 1.2) * 72 / (yfont * 1.35))
    ys = list(range(0, lq, step))
    ax_map.set_yticks(ys, [qlab[i] for i in ys] if qlab else [str(i) for i in ys],
                      fontsize=yfont)
    xs = list(range(0, lk, _tick_every(lk, 32)))
    ax_map.set_xticks(xs, [str(i) for i in xs], fontsize=8 if lk > 16 else 9)
    ax_map.set_xlabel(f"{key_name} (row-major index)")
    ax_map.set_ylabel(query_name)
    ax_map.set_title(f"{_plural(query_name)} x {_plural(key_name)}", fontsize=10)
    fig.colorbar(hm, ax=ax_map, pad=0.015, label=f"attention weight{rowsum}")
    if title:
        fig.suptitle(str(title))
    return _finish(fig, path)


# --------------------------------------------------------------------------------------------
# fusion pooling weights
# --------------------------------------------------------------------------------------------

def fusion_weights_figure(weights: Mapping[Any, npt.ArrayLike], *,
                          title: Optional[str] = None, figsize: Tuple[float, float] = (11.0, 5.5),
                          dpi: float = 110, path: Optional[ImagePath] = None) -> Figure:
    """The fusion layer's pooling weights: one softmax over the tokens of all modalities.

    The attention fusion pools every modality's tokens with a single query, so its weights are
    one distribution over the concatenated sequence (text tokens, then image patches, then
    audio frames, ...), summing to 1 over all modalities together. Drawn as one bar per token
    along that sequence, coloured by modality, with the modality boundaries marked, each
    modality's share of the total in the legend and the uniform weight ``1 / N`` dashed; below,
    the difference from ``1 / N`` on its own scale, which shows the structure of weights that
    are close to uniform.

    Needs matplotlib (``pip install 'mmcore[viz]'``); draws without pyplot.

    Parameters
    ----------
    weights : mapping
        Modality name -> ``(L_m,)`` non-negative finite weights of one batch item, in the
        order of the concatenated sequence.
    title : str, optional
        Default: says that the weights are one softmax over all ``N`` tokens and their sum.
    figsize : (float, float)
    dpi : float
    path : str or os.PathLike, optional
        Also save the figure there as an RGB PNG.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = fusion_weights_figure({"text": [0.1, 0.2], "image": [0.3, 0.1, 0.3]}, dpi=40)
    >>> "one softmax over all 5 tokens" in fig.axes[0].get_title()
    True
    """
    op = "fusion_weights_figure"
    if not isinstance(weights, Mapping) or not weights:
        raise ArgumentError(f"[{op}] weights must be a non-empty mapping modality -> (L,) "
                            f"weights, got {type(weights).__name__}")
    names, rows = [], []
    for key, value in weights.items():
        name = str(getattr(key, "value", key))
        v = _check_weights(value, f"weights[{name!r}]", ndims=(1,), op=op)
        names.append(name)
        rows.append(v)
    n = sum(r.size for r in rows)
    if n == 0:
        raise ShapeError(f"[{op}] weights has no tokens")
    total = float(sum(r.sum() for r in rows))
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f", "#bcbd22", "#17becf"]
    fig = _new_figure(op, figsize, dpi)
    ax, dev = fig.subplots(2, 1, sharex=True, height_ratios=[3.0, 1.4])
    off = 0
    top = max(float(max((r.max() for r in rows if r.size), default=0.0)), 1.0 / n)
    for i, (name, r) in enumerate(zip(names, rows)):
        color = palette[i % len(palette)]
        share = float(r.sum()) / total if total > 0 else 0.0
        ax.bar(np.arange(off, off + r.size), r, width=1.0, color=color, linewidth=0,
               label=f"{name}: {r.size} tokens, {100 * share:.1f}% of the weight")
        if r.size >= 0.06 * n:           # narrower spans are named in the legend only
            ax.text(off + (r.size - 1) / 2, top * 1.2, name, ha="center", va="center",
                    fontsize=10, color=color, fontweight="bold", clip_on=True)
        dev.bar(np.arange(off, off + r.size), r - 1.0 / n, width=1.0, color=color,
                linewidth=0)
        if off:
            ax.axvline(off - 0.5, color="0.35", lw=1.0)
            dev.axvline(off - 0.5, color="0.35", lw=1.0)
        off += r.size
    ax.axhline(1.0 / n, color="0.3", ls="--", lw=1.0, label=f"uniform: 1/{n} = {1.0 / n:.4f}")
    dev.axhline(0.0, color="0.3", ls="--", lw=1.0)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(0, top * 1.32)
    dev.set_xlabel("token position in the concatenated sequence (" + ", then ".join(names) + ")")
    ax.set_ylabel("pooling weight")
    dev.set_ylabel(f"weight - 1/{n}")
    dev.set_title("difference from the uniform weight (own scale)", fontsize=9)
    if title is None:
        title = (f"fusion pooling weights: one softmax over all {n} tokens of all modalities "
                 f"together (sum = {total:.3f})")
    ax.set_title(str(title), fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return _finish(fig, path)


# --------------------------------------------------------------------------------------------
# a heatmap on an axes of the caller's
# --------------------------------------------------------------------------------------------

def plot_attention(weights: npt.ArrayLike, *, ax: Optional[Axes] = None,
                   query_labels: Optional[Sequence[str]] = None,
                   key_labels: Optional[Sequence[str]] = None, cmap: str = "viridis",
                   title: Optional[str] = None, colorbar: bool = True) -> Axes:
    """Draw ``(Lq, Lk)`` or ``(H, Lq, Lk)`` (head-averaged) weights on a matplotlib axes.

    Needs matplotlib (``pip install 'mmcore[viz]'``); raises ImportError naming the extra when
    it is missing. Never imports pyplot: without ``ax`` the axes belongs to a new
    :class:`matplotlib.figure.Figure` on the Agg canvas (``ax.figure.savefig(...)`` saves it).

    Parameters
    ----------
    weights : array_like
        ``(Lq, Lk)`` or ``(H, Lq, Lk)`` non-negative, finite weights.
    ax : matplotlib.axes.Axes, optional
        Where to draw; default the axes of a new figure.
    query_labels, key_labels : sequence of str, optional
        Tick labels of the rows (queries) and of the columns (keys, rotated).
    cmap : str
        A matplotlib colormap name.
    title : str, optional
    colorbar : bool
        Add a colour bar next to the axes.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> ax = plot_attention(np.eye(3), key_labels=["x", "y", "z"])
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['x', 'y', 'z']
    """
    op = "plot_attention"
    _matplotlib(op)
    w = _check_weights(weights, "weights", ndims=(2, 3), op=op)
    if w.ndim == 3:
        w = w.mean(axis=0)
    qlab = _labels(query_labels, w.shape[0], "query_labels", op)
    klab = _labels(key_labels, w.shape[1], "key_labels", op)
    colors = _colormap(op, cmap)
    if ax is None:
        ax = _new_figure(op, (6.4, 4.8), 100).add_subplot()
    im = ax.imshow(w, cmap=colors, aspect="auto", interpolation="nearest", vmin=0.0)
    if qlab is not None:
        ax.set_yticks(range(w.shape[0]), qlab)
    if klab is not None:
        ax.set_xticks(range(w.shape[1]), klab, rotation=90)
    if title:
        ax.set_title(str(title))
    if colorbar:
        ax.figure.colorbar(im, ax=ax)
    return ax
