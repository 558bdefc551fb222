"""Tests of mmcore.viz: colormaps, pixel maps, matplotlib figures and attention analysis."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading

import numpy as np
import pytest
from PIL import Image

from mmcore import viz
from mmcore.errors import ArgumentError, ShapeError


def _need_matplotlib():
    return pytest.importorskip("matplotlib", reason="the figures need the viz extra")


def _oklab_lightness(rgb_uint8):
    """OKLab lightness, computed independently of the module's helpers."""
    c = np.asarray(rgb_uint8, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m1 = np.array([[0.4122214708, 0.5363325363, 0.0514459929],
                   [0.2119034982, 0.6806995451, 0.1073969566],
                   [0.0883024619, 0.2817188376, 0.6299787005]])
    lms = np.cbrt(lin @ m1.T)
    return lms @ np.array([0.2104542553, 0.7936177850, -0.0040720468])


# ------------------------------------------------------------------------------- colormap

@pytest.mark.parametrize("name", ["viridis", "magma", "gray"])
def test_colormap_shape_dtype(name):
    v = np.random.default_rng(0).random((4, 5, 6))
    out = viz.colormap(v, name=name)
    assert out.shape == (4, 5, 6, 3)
    assert out.dtype == np.uint8
    assert viz.colormap(0.5, name=name).shape == (3,)


def test_colormap_endpoints():
    ends = viz.colormap(np.array([0.0, 1.0]), name="viridis")
    # dark purple -> bright yellow
    assert ends[0, 2] > ends[0, 1] and ends[0].max() < 110
    assert ends[1, 0] > 200 and ends[1, 1] > 200 and ends[1, 2] < 80
    ends = viz.colormap(np.array([0.0, 1.0]), name="magma")
    assert ends[0].max() < 20                            # near black
    assert ends[1].min() > 170                           # pale yellow
    assert viz.colormap([0.0, 1.0], name="gray").tolist() == [[0, 0, 0], [255, 255, 255]]


@pytest.mark.parametrize("name", ["viridis", "magma", "gray"])
def test_colormap_lightness_increasing(name):
    # matplotlib's 8-bit viridis dips by < 0.001 in OKLab lightness at 3 of its 255 steps;
    # over every 4th entry lightness rises strictly, and by more than 0.6 end to end
    rgb = viz.colormap(np.linspace(0.0, 1.0, 256), name=name)
    light = _oklab_lightness(rgb)
    assert np.all(np.diff(light[::4]) > 0), np.diff(light[::4]).min()
    assert np.diff(light).min() > -1e-3
    assert light[-1] - light[0] > 0.6


@pytest.mark.parametrize("name", ["viridis", "magma", "gray"])
def test_built_in_tables_are_matplotlibs(name):
    """The tables that work without matplotlib are matplotlib's colours, and values are
    indexed into them the way matplotlib indexes (entry floor(t * 256), the last for t = 1)."""
    mpl = _need_matplotlib()
    ref = np.rint(mpl.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    assert (viz.colormap(np.arange(256) / 255.0, name=name, vmin=0, vmax=1) == ref).all()
    t = np.random.default_rng(3).random(1000)
    t[:3] = (0.0, 1.0, 0.5)
    n = mpl.colormaps[name].N
    idx = np.minimum((t * n).astype(int), n - 1)
    assert (viz.colormap(t, name=name, vmin=0, vmax=1) == ref[idx]).all()


def test_colormap_other_matplotlib_names():
    mpl = _need_matplotlib()
    out = viz.colormap([0.0, 1.0], name="inferno")
    ref = np.rint(mpl.colormaps["inferno"]([0.0, 1.0])[:, :3] * 255).astype(np.uint8)
    assert (out == ref).all()


def test_colormap_vmin_vmax_and_clipping():
    out = viz.colormap([-5.0, 0.0, 10.0, 20.0, np.inf, -np.inf], name="gray", vmin=0, vmax=10)
    assert out[:, 0].tolist() == [0, 0, 255, 255, 255, 0]
    mid = viz.colormap([0.0, 5.0, 10.0], name="gray")
    assert mid[1, 0] in (127, 128)
    # constant input maps to the first colour, no division by zero
    const = viz.colormap(np.full(3, 2.0), name="magma")
    assert (const == viz.colormap([0.0], name="magma", vmin=0, vmax=1)[0]).all()


def test_colormap_bad_inputs():
    with pytest.raises(ShapeError, match="name"):
        viz.colormap([0.0], name="no_such_map")
    with pytest.raises(ShapeError, match="name"):
        viz.colormap([0.0], name=3)
    with pytest.raises(ShapeError, match="values"):
        viz.colormap([0.0, np.nan])
    with pytest.raises(ShapeError, match="vmax"):
        viz.colormap([0.0], vmin=1.0, vmax=0.0)
    with pytest.raises(ShapeError, match="values"):
        viz.colormap(["a"])


# ------------------------------------------------------------------------------- heatmap

def test_heatmap_size_and_cells():
    w = np.zeros((3, 5))
    w[1, 2] = 1.0
    img = viz.attention_heatmap(w, cell=6, legend=False)
    assert img.size == (30, 18)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    hot = viz.colormap([1.0], name="viridis", vmin=0, vmax=1)[0]
    cold = viz.colormap([0.0], name="viridis", vmin=0, vmax=1)[0]
    # the whole 6x6 cell of weight (1, 2) is the hot colour: row 1 -> y 6..11, col 2 -> x 12..17
    assert (arr[6:12, 12:18] == hot).all()
    assert (arr[0:6, :] == cold).all()
    assert img.info["grid_box"] == (0, 0, 30, 18)


def test_heatmap_legend_labels_title_and_png(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.random((4, 6))
    w /= w.sum(-1, keepdims=True)
    path = tmp_path / "attn.png"
    img = viz.attention_heatmap(w, cell=10, query_labels=list("abcd"),
                                key_labels=[f"k{i}" for i in range(6)], title="attention",
                                path=path)
    left, top, right, bottom = img.info["grid_box"]
    assert (right - left, bottom - top) == (60, 40)
    assert left > 0 and top > 0                       # room for labels and title
    assert img.width > right                           # legend bar on the right
    with Image.open(path) as back:
        assert back.format == "PNG"
        assert back.size == img.size
        assert (np.asarray(back.convert("RGB")) == np.asarray(img)).all()
    # the legend bar is brightest at its top (high values) and darkest at its bottom
    arr = np.asarray(img)
    bar_x = right + 4 + 1
    light = _oklab_lightness(arr[top:bottom, bar_x])
    assert light[0] > light[-1]


def test_heatmap_heads_mean_and_tile():
    w = np.zeros((2, 3, 4))
    w[0, :, 0] = 1.0
    w[1, :, 3] = 1.0
    mean = viz.attention_heatmap(w, cell=2, legend=False)
    assert mean.size == (8, 6)
    tiled = viz.attention_heatmap(w, cell=2, heads="tile", legend=False)
    assert tiled.size == (2 * 8 + 2, 6)
    arr = np.asarray(tiled)
    hot = viz.colormap([1.0], vmin=0, vmax=1)[0]
    assert (arr[:, 0:2] == hot).all()                  # head 0, key 0
    assert (arr[:, 10 + 6:10 + 8] == hot).all()        # head 1, key 3 (after the 2 px gap)
    assert (arr[:, 8:10] == 255).all()                 # white gap between heads


def test_heatmap_bad_inputs():
    with pytest.raises(ShapeError, match="weights"):
        viz.attention_heatmap(np.ones(4))
    with pytest.raises(ShapeError, match="weights"):
        viz.attention_heatmap(np.ones((1, 2, 3, 4)))
    with pytest.raises(ShapeError, match="NaN"):
        viz.attention_heatmap(np.array([[0.5, np.nan]]))
    with pytest.raises(ShapeError, match="negative"):
        viz.attention_heatmap(np.array([[0.5, -0.1]]))
    with pytest.raises(ShapeError, match="key_labels"):
        viz.attention_heatmap(np.ones((2, 3)), key_labels=["a"])
    with pytest.raises(ShapeError, match="cell"):
        viz.attention_heatmap(np.ones((2, 3)), cell=0)
    with pytest.raises(ShapeError, match="heads"):
        viz.attention_heatmap(np.ones((2, 2, 3)), heads="max")


# ------------------------------------------------------------------------------- spectrogram

def test_spectrogram_low_frequencies_at_bottom(tmp_path):
    feats = np.zeros((40, 50), dtype=np.float32)
    feats[0] = 10.0                                    # energy only in the lowest mel band
    path = tmp_path / "spec.png"
    img = viz.spectrogram_image(feats, path=path)
    assert img.size == (50, 40)
    light = _oklab_lightness(np.asarray(img)).mean(axis=1)
    assert light[-1] > 0.9 and light[:-1].max() < 0.2
    with Image.open(path) as back:
        assert back.format == "PNG" and back.size == (50, 40)


def test_spectrogram_height_and_robust_range():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((80, 120))
    feats[5, 7] = 1e6                                  # one outlier must not wash out the rest
    img = viz.spectrogram_image(feats, height=160, cmap="gray")
    assert img.size == (120, 160)
    small = np.asarray(viz.spectrogram_image(feats, cmap="gray"))[..., 0]
    assert small.std() > 40                            # contrast survives the outlier
    # -inf (log of silence) is fine and drawn at the dark end
    feats2 = np.log(np.maximum(rng.random((10, 10)), 0.0))
    feats2[3, 3] = -np.inf
    arr = np.asarray(viz.spectrogram_image(feats2, cmap="gray"))
    assert arr[10 - 1 - 3, 3, 0] == 0


def test_spectrogram_bad_inputs():
    with pytest.raises(ShapeError, match="features"):
        viz.spectrogram_image(np.zeros((2, 3, 4)))
    with pytest.raises(ShapeError, match="features"):
        viz.spectrogram_image(np.array([[0.0, np.nan]]))
    with pytest.raises(ShapeError, match="height"):
        viz.spectrogram_image(np.zeros((4, 4)), height=0)


# ------------------------------------------------------------------------------- analysis

def test_entropy_hand_cases():
    w = np.array([[1.0, 0.0, 0.0, 0.0],
                  [0.25, 0.25, 0.25, 0.25],
                  [0.0, 0.0, 0.0, 0.0],
                  [0.5, 0.5, 0.0, 0.0],
                  [2.0, 2.0, 2.0, 2.0]])               # unnormalised rows are normalised
    h = viz.attention_entropy(w)
    np.testing.assert_allclose(h, [0.0, np.log(4), 0.0, np.log(2), np.log(4)], atol=1e-12)
    hn = viz.attention_entropy(w, normalize=True)
    np.testing.assert_allclose(hn, [0.0, 1.0, 0.0, 0.5, 1.0], atol=1e-12)
    assert not np.isnan(hn).any()
    # axis=0 works on columns
    np.testing.assert_allclose(viz.attention_entropy(w.T, axis=0), h, atol=1e-12)
    # batched shape
    assert viz.attention_entropy(np.ones((2, 3, 4, 5))).shape == (2, 3, 4)
    # a single key gives 0 even when normalised
    assert viz.attention_entropy(np.ones((3, 1)), normalize=True).tolist() == [0.0] * 3


def test_top_k_hand_cases():
    w = np.array([[0.1, 0.4, 0.2, 0.3],
                  [0.25, 0.25, 0.25, 0.25],
                  [0.0, 0.5, 0.0, 0.5]], dtype=np.float32)
    idx, val = viz.top_k_attention(w, 2)
    assert idx.dtype == np.int64
    assert idx.tolist() == [[1, 3], [0, 1], [1, 3]]
    np.testing.assert_allclose(val, [[0.4, 0.3], [0.25, 0.25], [0.5, 0.5]])
    assert val.dtype == np.float32
    idx0, val0 = viz.top_k_attention(w, 1, axis=0)
    assert idx0.tolist() == [[1, 2, 1, 2]]
    full, _ = viz.top_k_attention(w, 4)
    assert sorted(full[0].tolist()) == [0, 1, 2, 3]


def test_analysis_bad_inputs():
    w = np.full((2, 3), 1 / 3)
    with pytest.raises(ShapeError, match="k"):
        viz.top_k_attention(w, 0)
    with pytest.raises(ShapeError, match="k"):
        viz.top_k_attention(w, -1)
    with pytest.raises(ShapeError, match="k"):
        viz.top_k_attention(w, 4)
    with pytest.raises(ShapeError, match="weights"):
        viz.top_k_attention(np.array([[np.nan, 1.0]]), 1)
    with pytest.raises(ShapeError, match="weights"):
        viz.attention_entropy(np.array([[-0.5, 1.5]]))
    with pytest.raises(ShapeError, match="weights"):
        viz.attention_entropy(np.array([[np.nan, 1.0]]))
    with pytest.raises(ShapeError, match="axis"):
        viz.attention_entropy(w, axis=2)
    with pytest.raises(ShapeError, match="weights"):
        viz.attention_summary(np.ones(3))
    with pytest.raises(ShapeError, match="weights"):
        viz.attention_summary(np.array([[1.0, -1.0]]))


def test_attention_summary():
    eye = np.eye(4)
    flip = eye[:, ::-1]
    agree = viz.attention_summary(np.stack([eye, eye, eye]))
    assert agree["num_heads"] == 3 and agree["num_keys"] == 4
    assert agree["top1_agreement"] == 1.0
    assert agree["mean_entropy"] == 0.0
    assert agree["max_weight"] == 1.0
    mixed = viz.attention_summary(np.stack([eye, eye, flip]))
    assert mixed["top1_agreement"] == pytest.approx(2 / 3)
    uniform = viz.attention_summary(np.full((2, 2, 3, 5), 0.2))
    assert uniform["mean_normalized_entropy"] == pytest.approx(1.0)
    assert uniform["mean_entropy"] == pytest.approx(np.log(5))
    assert len(uniform["entropy_per_head"]) == 2
    single = viz.attention_summary(np.array([[0.0, 0.0], [0.3, 0.7]]))
    assert single["num_heads"] == 1 and single["top1_agreement"] == 1.0
    assert single["empty_rows"] == 1



# ------------------------------------------------------------------------------- figures

def _panel_pixel(fig, img, ax, x, y):
    """RGB of the rendered figure ``img`` at data point (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    return np.asarray(img)[int(round(img.height - py)), int(round(px))].astype(int)


def test_spectrogram_figure_axes_orientation_and_png(tmp_path):
    _need_matplotlib()
    feats = np.zeros((8, 100))
    feats[0] = 10.0                                    # energy only in the lowest mel band
    path = tmp_path / "spec.png"
    fig = viz.spectrogram_figure(feats, sample_rate=16000, hop_length=160, figsize=(6, 3),
                                 dpi=100, path=path, cmap="gray", vmin=0, vmax=10)
    with Image.open(path) as back:
        assert back.format == "PNG" and back.mode == "RGB" and back.size == (600, 300)
        img = back.copy()
    ax = fig.axes[0]
    assert ax.get_xlabel() == "time (s)"
    assert ax.get_xlim() == pytest.approx((0.0, 100 * 160 / 16000))
    assert "Hz" in ax.get_ylabel()
    assert ax.get_title() == "log-mel spectrogram"
    assert len(fig.axes) == 2                          # the colour bar
    # time runs left to right, the lowest band is drawn at the bottom
    low = [_panel_pixel(fig, img, ax, t, 0.5)[0] for t in (0.1, 0.5, 0.9)]
    high = [_panel_pixel(fig, img, ax, t, 7.5)[0] for t in (0.1, 0.5, 0.9)]
    assert min(low) > 240 and max(high) < 15


def test_spectrogram_figure_mel_ticks_in_hz():
    _need_matplotlib()
    n = 80
    fig = viz.spectrogram_figure(np.zeros((n, 10)), sample_rate=16000, dpi=40)
    ax = fig.axes[0]
    ticks = dict(zip([t.get_text() for t in ax.get_yticklabels()], ax.get_yticks()))
    # Slaney mel: 1 kHz is mel 15, 8 kHz is 15 + 27 ln(8) / ln(6.4); n + 2 edges from 0 to 8 kHz
    top = 15 + 27 * np.log(8.0) / np.log(6.4)
    assert ticks["1k"] == pytest.approx(15 / top * (n + 1) - 0.5)
    ys = list(ticks.values())
    assert ys == sorted(ys) and len(ys) >= 5          # higher Hz further up
    lin = viz.spectrogram_figure(np.zeros((201, 10)), scale="linear", sample_rate=16000,
                                 dpi=40, title=None)
    assert lin.axes[0].get_ylim() == pytest.approx((0.0, 8000.0))
    assert lin.axes[0].get_title() == ""
    frames = viz.spectrogram_figure(np.zeros((4, 10)), sample_rate=None, dpi=40)
    assert frames.axes[0].get_xlabel() == "frame" and frames.axes[0].get_ylabel() == "mel band"


def test_spectrogram_figure_bad_inputs():
    _need_matplotlib()
    with pytest.raises(ShapeError, match="features"):
        viz.spectrogram_figure(np.zeros((2, 3, 4)))
    with pytest.raises(ShapeError, match="features"):
        viz.spectrogram_figure(np.zeros((0, 4)))
    with pytest.raises(ShapeError, match="NaN"):
        viz.spectrogram_figure(np.array([[0.0, np.nan]]))
    with pytest.raises(ArgumentError, match="scale"):
        viz.spectrogram_figure(np.zeros((4, 4)), scale="log")
    with pytest.raises(ArgumentError, match="hop_length"):
        viz.spectrogram_figure(np.zeros((4, 4)), hop_length=0)
    with pytest.raises(ArgumentError, match="fmin"):
        viz.spectrogram_figure(np.zeros((4, 4)), fmin=9000.0)
    with pytest.raises(ArgumentError, match="cmap"):
        viz.spectrogram_figure(np.zeros((4, 4)), cmap="no_such_map")
    with pytest.raises(ArgumentError, match="figsize"):
        viz.spectrogram_figure(np.zeros((4, 4)), figsize=(0, 3))


def test_overlay_tints_the_image_patch_by_patch(tmp_path):
    _need_matplotlib()
    w = np.zeros((2, 16))
    w[:, 0] = 1.0                                      # every query looks at patch 0 only
    gray = np.full((64, 64, 3), 128, np.uint8)
    path = tmp_path / "overlay.png"
    fig = viz.attention_overlay_figure(w, gray, query_labels=["a", "b"], alpha=0.5, dpi=80,
                                       path=path)
    with Image.open(path) as back:
        assert back.format == "PNG" and back.mode == "RGB"
        assert 700 < back.width < 1200 and 300 < back.height < 1000
        img = back.copy()
    ax_img, ax_map = fig.axes[0], fig.axes[1]
    hot = viz.colormap([1.0], vmin=0, vmax=1)[0].astype(float)
    cold = viz.colormap([0.0], vmin=0, vmax=1)[0].astype(float)
    # half viridis, half the gray image: top-left patch (0) hot, bottom-right patch (15) cold
    p0 = _panel_pixel(fig, img, ax_img, 4, 4)
    p15 = _panel_pixel(fig, img, ax_img, 60, 60)
    assert np.abs(p0 - (0.5 * hot + 64)).max() <= 4, p0
    assert np.abs(p15 - (0.5 * cold + 64)).max() <= 4, p15
    assert np.abs(p0 - 128).max() > 40 and np.abs(p15 - 128).max() > 20   # not the plain image
    # the heatmap: tokens on one axis, patch indices on the other
    assert [t.get_text() for t in ax_map.get_yticklabels()] == ["a", "b"]
    assert [t.get_text() for t in ax_map.get_xticklabels()] == [str(i) for i in range(16)]
    assert "patch" in ax_map.get_xlabel() and "token" in ax_map.get_ylabel()
    assert "each row sums to 1" in fig.axes[-1].get_ylabel()


def test_overlay_shapes_grid_and_options():
    _need_matplotlib()
    rng = np.random.default_rng(0)
    w = rng.random((4, 3, 12))                         # heads, queries, patches
    fig = viz.attention_overlay_figure(w, rng.random((90, 160, 3)), dpi=30, query=[0, 1])
    assert "3 x 4" in fig.axes[0].get_title()          # grid follows the image's aspect
    assert "mean over 2" in fig.axes[0].get_title()
    assert fig.axes[1].get_images()[0].get_array().shape == (3, 12)
    one = viz.attention_overlay_figure(w[0], None, grid=(2, 6), dpi=30, query=-1,
                                       query_labels=["x", "y", "z"])
    assert "'z'" in one.axes[0].get_title() and "2 x 6" in one.axes[0].get_title()
    square = viz.attention_overlay_figure(np.full((1, 9), 1 / 9), dpi=30, title=None)
    assert "3 x 3" in square.axes[0].get_title()
    for image in (np.zeros((8, 8)), np.zeros((8, 8, 1), np.uint8),
                  np.full((8, 8, 4), 255, np.uint8), np.ones((8, 8, 3), np.float32)):
        fig = viz.attention_overlay_figure(np.full((1, 4), 0.25), image, dpi=30)
        assert fig.axes[0].get_images()[0].get_array().shape == (8, 8, 3)


def test_overlay_bad_inputs():
    _need_matplotlib()
    w = np.full((2, 12), 1 / 12)
    with pytest.raises(ShapeError, match="weights"):
        viz.attention_overlay_figure(np.ones(4))
    with pytest.raises(ShapeError, match="negative"):
        viz.attention_overlay_figure(-w)
    with pytest.raises(ShapeError, match="grid"):
        viz.attention_overlay_figure(w)                # 12 is not square, no image to go by
    with pytest.raises(ShapeError, match="grid"):
        viz.attention_overlay_figure(w, grid=(3, 3))
    with pytest.raises(ShapeError, match="image"):
        viz.attention_overlay_figure(w, np.zeros((4, 4, 2)))
    with pytest.raises(ShapeError, match="image"):
        viz.attention_overlay_figure(w, np.full((4, 4), 2.0))
    with pytest.raises(ShapeError, match="query_labels"):
        viz.attention_overlay_figure(w, grid=(3, 4), query_labels=["a"])
    with pytest.raises(ArgumentError, match="query"):
        viz.attention_overlay_figure(w, grid=(3, 4), query=2)
    with pytest.raises(ArgumentError, match="alpha"):
        viz.attention_overlay_figure(w, grid=(3, 4), alpha=0)


def test_fusion_figure_says_one_softmax_and_marks_modalities(tmp_path):
    _need_matplotlib()
    rng = np.random.default_rng(1)
    parts = {"text": rng.random(5), "image": rng.random(16), "audio": rng.random(2)}
    total = sum(v.sum() for v in parts.values())
    parts = {k: v / total for k, v in parts.items()}
    path = tmp_path / "fusion.png"
    fig = viz.fusion_weights_figure(parts, path=path)
    with Image.open(path) as back:
        assert back.format == "PNG" and back.mode == "RGB" and back.size == (1210, 605)
    ax = fig.axes[0]
    assert "one softmax over all 23 tokens of all modalities" in ax.get_title()
    assert "sum = 1.000" in ax.get_title()
    # boundaries after the 5 text and the 16 image tokens
    bounds = sorted(line.get_xdata()[0] for line in ax.get_lines()
                    if line.get_xdata()[0] == line.get_xdata()[1])
    assert bounds == [4.5, 20.5]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    share = 100 * parts["image"].sum()
    assert f"image: 16 tokens, {share:.1f}% of the weight" in legend
    assert any(t.startswith("uniform: 1/23") for t in legend)
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, np.concatenate(list(parts.values())))


def test_fusion_figure_bad_inputs():
    _need_matplotlib()
    with pytest.raises(ArgumentError, match="mapping"):
        viz.fusion_weights_figure({})
    with pytest.raises(ArgumentError, match="mapping"):
        viz.fusion_weights_figure([0.5, 0.5])
    with pytest.raises(ShapeError, match="text"):
        viz.fusion_weights_figure({"text": np.ones((2, 2)) / 4})
    with pytest.raises(ShapeError, match="negative"):
        viz.fusion_weights_figure({"text": [0.5, -0.5]})
    with pytest.raises(ShapeError, match="no tokens"):
        viz.fusion_weights_figure({"text": []})


def test_plot_attention_without_pyplot():
    mpl = _need_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ax = viz.plot_attention(np.stack([np.eye(3), np.eye(3)]), query_labels=["a", "b", "c"],
                            title="t")
    assert isinstance(ax.figure.canvas, FigureCanvasAgg)
    assert ax.get_images()[0].get_array().shape == (3, 3)
    own = Figure()
    ax2 = own.add_subplot()
    assert viz.plot_attention(np.eye(2), ax=ax2, colorbar=False, cmap="magma") is ax2
    assert len(own.axes) == 1
    with pytest.raises(ArgumentError, match="cmap"):
        viz.plot_attention(np.eye(2), cmap="no_such_map")
    with pytest.raises(ArgumentError, match="key_labels"):
        viz.plot_attention(np.eye(2), key_labels="ab")
    assert mpl.get_backend()                            # still answerable


def test_figures_leave_pyplot_and_the_backend_alone(tmp_path):
    _need_matplotlib()
    code = ("import json, sys\n"
            "import matplotlib\n"
            "matplotlib.use('svg')\n"
            "import numpy as np\n"
            "from mmcore import viz\n"
            "before = matplotlib.get_backend()\n"
            f"out = {str(tmp_path)!r}\n"
            "viz.spectrogram_figure(np.zeros((8, 10)), path=out + '/a.png')\n"
            "viz.attention_overlay_figure(np.full((2, 4), .25), np.zeros((8, 8, 3)),"
            " path=out + '/b.png')\n"
            "viz.fusion_weights_figure({'t': [.5, .5]}, path=out + '/c.png')\n"
            "viz.figure_to_image(viz.plot_attention(np.eye(2)).figure)\n"
            "print(json.dumps([before, matplotlib.get_backend(),"
            " 'matplotlib.pyplot' in sys.modules]))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    before, after, pyplot = json.loads(r.stdout.strip().splitlines()[-1])
    assert before == after == "svg" and not pyplot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]


def test_figures_from_several_threads():
    _need_matplotlib()
    import matplotlib

    backend = matplotlib.get_backend()
    feats = np.random.default_rng(2).standard_normal((40, 60))
    results = [None] * 4

    def draw(i):
        fig = viz.spectrogram_figure(feats, figsize=(4, 2), dpi=60)
        results[i] = np.asarray(viz.figure_to_image(fig))

    threads = [threading.Thread(target=draw, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None and r.shape == (120, 240, 3) for r in results)
    assert all((r == results[0]).all() for r in results)
    assert matplotlib.get_backend() == backend


def test_demo_draws_figures(tmp_path):
    _need_matplotlib()
    from mmcore.demo import format_report, run_demo

    rep = run_demo(str(tmp_path / "d"), warmup=0, repeat=1)
    assert rep["pictures"] == "figures" and rep["pictures_note"] is None
    names = {p.name: p for p in (tmp_path / "d").iterdir()}
    assert sorted(names) == ["attention_text_to_image.png", "fusion_weights.png",
                             "mel_spectrogram.png"]
    for p in names.values():
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.width >= 900
    with Image.open(names["mel_spectrogram.png"]) as im:
        assert im.size == (990, 440)
    assert "PNG figures" in format_report(rep)


# ------------------------------------------------------------------------------- imports

def test_modules_import_only_numpy_pillow_and_errors():
    """matplotlib is imported inside the functions that need it, never at import time."""
    import ast
    import inspect

    from mmcore import _viz_figures

    allowed = {"numpy", "numpy.typing", "PIL", "mmcore.errors", "mmcore._viz_figures", "typing",
               "io", "math"}
    for module in (viz, _viz_figures):
        tree = ast.parse(inspect.getsource(module))
        top = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                top.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                top.add(node.module)
        assert top <= allowed, (module.__name__, top - allowed)


def test_without_matplotlib(tmp_path):
    """Pixel maps and the built-in colormaps work, the figures raise ImportError naming the
    extra, and the demo still runs, writes plain pictures and says what to install."""
    code = ("import json, os, sys\n"
            "sys.modules['matplotlib'] = None\n"
            "import numpy as np\n"
            "from mmcore import viz\n"
            "from mmcore.errors import ShapeError\n"
            "res = {'available': viz.matplotlib_available()}\n"
            "viz.attention_heatmap(np.eye(3)); viz.spectrogram_image(np.eye(3))\n"
            "res['viridis'] = viz.colormap([0.0, 1.0], name='viridis').tolist()\n"
            "calls = {'spectrogram_figure': lambda: viz.spectrogram_figure(np.eye(3)),\n"
            "         'attention_overlay_figure':"
            " lambda: viz.attention_overlay_figure(np.full((1, 4), .25)),\n"
            "         'fusion_weights_figure': lambda: viz.fusion_weights_figure({'t': [1.0]}),\n"
            "         'plot_attention': lambda: viz.plot_attention(np.eye(3))}\n"
            "for name, call in calls.items():\n"
            "    try:\n        call()\n"
            "    except ImportError as e:\n        res[name] = str(e)\n"
            "try:\n    viz.colormap([0.0], name='inferno')\n"
            "except ShapeError as e:\n    res['inferno'] = str(e)\n"
            "from mmcore.demo import format_report, run_demo\n"
            f"rep = run_demo({str(tmp_path / 'bare')!r}, warmup=0, repeat=1)\n"
            "res['pictures'] = rep['pictures']\n"
            "res['files'] = sorted(os.path.basename(f) for f in rep['files'])\n"
            "res['report'] = format_report(rep)\n"
            "print(json.dumps(res))\n")
    # outside the checkout, so that the child imports the installed package
    r = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["available"] is False
    assert res["viridis"] == [[68, 1, 84], [253, 231, 37]]
    for name in ("spectrogram_figure", "attention_overlay_figure", "fusion_weights_figure",
                 "plot_attention"):
        assert f"[{name}]" in res[name] and "pip install 'mmcore[viz]'" in res[name], res
    assert "mmcore[viz]" in res["inferno"]
    assert res["pictures"] == "plain"
    assert res["files"] == ["attention_text_to_image.png", "fusion_weights.png",
                            "mel_spectrogram.png"]
    assert "pip install 'mmcore[viz]'" in res["report"]
    with Image.open(tmp_path / "bare" / "mel_spectrogram.png") as im:
        assert im.size == (200, 160)                     # the plain pixel map
