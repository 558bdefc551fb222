"""Tests of mmcore.viz: colormaps, images and attention analysis helpers."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from mmcore import viz
from mmcore.errors import ShapeError


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
def test_colormap_lightness_strictly_increasing(name):
    rgb = viz.colormap(np.linspace(0.0, 1.0, 256), name=name)
    light = _oklab_lightness(rgb)
    assert np.all(np.diff(light) > 0), np.diff(light).min()
    assert light[-1] - light[0] > 0.6


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
        viz.colormap([0.0], name="jet")
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


# ------------------------------------------------------------------------------- imports

def test_module_imports_only_numpy_pillow_and_errors():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(viz))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            top.add(node.module)
    assert top <= {"numpy", "PIL", "mmcore.errors", "typing"}, top


def test_works_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "import numpy as np; from mmcore import viz\n"
            "viz.attention_heatmap(np.eye(3)); viz.spectrogram_image(np.eye(3))\n"
            "try:\n    viz.plot_attention(np.eye(3))\nexcept ImportError as e:\n"
            "    assert 'matplotlib' in str(e)\nelse:\n    raise SystemExit('no ImportError')\n")
    # outside the checkout, so that the child imports the installed package
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tempfile.gettempdir(),
                   timeout=120)
