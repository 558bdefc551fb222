"""Encoders stored as ONNX graphs (``encoder="onnx"``), run with onnxruntime."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import mmcore  # noqa: E402
from mmcore.config import ModalityConfig  # noqa: E402
from mmcore.errors import ConfigError, ModelFormatError, ShapeError  # noqa: E402
from mmcore.modality import Modality  # noqa: E402
from mmcore.model import MultiModalLoader, MultiModalModel, default_config  # noqa: E402
from mmcore.model.onnx_encoder import OnnxEncoder, onnx_path_of  # noqa: E402

D = 64
CUSTOM = Modality("custom:5")


def save_graph(path, *, in_dim, out_dim, seed=0, transpose=False, with_mask=False,
               pooled_only=False):
    """A graph ``tokens = x @ W + b`` over (B, L, in_dim) features (``transpose``: the input is
    (B, in_dim, L)); ``with_mask``: a second input (B, L) bool, returned as the mask output;
    ``pooled_only``: one (B, out_dim) output, the mean over L. Returns (W, b)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((in_dim, out_dim)) / np.sqrt(in_dim)).astype(np.float32)
    b = rng.standard_normal(out_dim).astype(np.float32)
    nodes, x = [], "x"
    x_shape = ["B", in_dim, "L"] if transpose else ["B", "L", in_dim]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    if transpose:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]))
        x = "xt"
    nodes += [helper.make_node("MatMul", [x, "w"], ["xw"]),
              helper.make_node("Add", ["xw", "b"], ["tokens"])]
    outputs = [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["B", "L", out_dim])]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.BOOL,
                                                    ["B", "L"]))
        nodes.append(helper.make_node("Identity", ["attention_mask"], ["mask"]))
        outputs.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", "L"]))
    if pooled_only:
        nodes.append(helper.make_node("ReduceMean", ["tokens", "axes"], ["pooled"], keepdims=0))
        outputs = [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["B", out_dim])]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    if pooled_only:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    graph = helper.make_graph(nodes, "encoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "model.onnx"))
    return w, b


def with_modality(cfg, mc):
    mods = dict(cfg.modalities)
    mods[mc.modality] = mc
    return cfg.replace(modalities=list(mods.values()))


def custom_config(**kw):
    return with_modality(default_config(), ModalityConfig(CUSTOM, encoder="onnx", embed_dim=D,
                                                          preprocessing=None, **kw))


def onnx_audio_config():
    cfg = default_config()
    return with_modality(cfg, cfg.modalities[Modality.AUDIO].replace(encoder="onnx"))


def masked_mean(t, m):
    m = m.astype(np.float64)[..., None]
    return (t.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1)


def test_custom_modality_through_the_loader(tmp_path):
    w, b = save_graph(tmp_path / "enc", in_dim=12, out_dim=D)
    model = MultiModalLoader(custom_config()).with_modality_path(CUSTOM, tmp_path / "enc").load()
    assert isinstance(model.encoder(CUSTOM), OnnxEncoder)
    assert onnx_path_of(model.config.modalities[CUSTOM]) == str(tmp_path / "enc" / "model.onnx")
    x = np.random.default_rng(1).standard_normal((3, 7, 12)).astype(np.float32)
    out = model.infer({CUSTOM: x, "text": ["a", "bb", "ccc"]})
    ref = x.astype(np.float64) @ w + b
    np.testing.assert_allclose(out.embeddings[CUSTOM], ref, rtol=1e-5, atol=1e-5)
    assert out.masks[CUSTOM].shape == (3, 7) and out.masks[CUSTOM].all()
    np.testing.assert_allclose(out.pooled[CUSTOM], ref.mean(1), rtol=1e-5, atol=1e-5)
    assert out.fused.shape == (3, 64) and np.isfinite(out.fused).all()
    # the same request again (served by the per-item cache) gives the same result
    again = model.infer({CUSTOM: x, "text": ["a", "bb", "ccc"]})
    np.testing.assert_array_equal(again.embeddings[CUSTOM], out.embeddings[CUSTOM])


def test_audio_with_mask_input_and_output(tmp_path):
    w, b = save_graph(tmp_path / "audio", in_dim=80, out_dim=D, transpose=True, with_mask=True)
    model = (MultiModalLoader(onnx_audio_config(), {"seed": 0})
             .with_modality_path("audio", tmp_path / "audio").load())
    rng = np.random.default_rng(2)
    waves = [(rng.standard_normal(16000) * 0.1).astype(np.float32),
             (rng.standard_normal(6000) * 0.1).astype(np.float32)]
    out = model.infer({"audio": waves})
    pre = model.preprocessors[Modality.AUDIO](waves)
    feats, mask = pre["input_features"], pre["attention_mask"]
    assert not mask.all()
    ref = feats.transpose(0, 2, 1).astype(np.float64) @ w + b
    ref = np.where(mask[..., None], ref, 0.0)
    np.testing.assert_array_equal(out.masks[Modality.AUDIO], mask)
    np.testing.assert_allclose(out.embeddings[Modality.AUDIO], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.pooled[Modality.AUDIO], masked_mean(ref, mask),
                               rtol=1e-4, atol=1e-4)
    # the other modalities keep their built-in encoders
    assert model.infer({"text": ["x"], "audio": waves[:1]}).fused.shape == (1, 64)


def test_mask_defaults_to_ones_when_none_is_given(tmp_path):
    save_graph(tmp_path / "e", in_dim=5, out_dim=8, with_mask=True)
    enc = OnnxEncoder(tmp_path / "e", modality=CUSTOM, embed_dim=8)
    assert enc.input_names == ["x", "attention_mask"]
    tokens, mask, pooled = enc(np.ones((2, 4, 5), np.float32))
    assert tokens.shape == (2, 4, 8) and mask.dtype == np.bool_ and mask.all()
    _, mask, _ = enc(np.ones((2, 4, 5), np.float32),
                     attention_mask=np.array([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert mask.tolist() == [[True, True, False, False], [True] * 4]


def test_pooled_only_output(tmp_path):
    w, b = save_graph(tmp_path / "p", in_dim=6, out_dim=8, pooled_only=True)
    x = np.random.default_rng(3).standard_normal((2, 5, 6)).astype(np.float32)
    tokens, mask, pooled = OnnxEncoder(tmp_path / "p" / "model.onnx", modality=CUSTOM,
                                       embed_dim=8)(x)
    ref = (x.astype(np.float64) @ w + b).mean(1)
    assert tokens.shape == (2, 1, 8) and mask.shape == (2, 1)
    np.testing.assert_allclose(pooled, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["encoder_config", "extra"])
def test_path_in_the_config_and_save_round_trip(tmp_path, where):
    w, b = save_graph(tmp_path / "enc", in_dim=4, out_dim=D, seed=5)
    path = str(tmp_path / "enc")
    kw = ({"encoder_config": {"extra": {"onnx_path": path}}} if where == "encoder_config"
          else {"extra": {"onnx_path": path}})
    model = MultiModalModel(custom_config(**kw), seed=0)
    x = np.ones((1, 3, 4), np.float32)
    ref = x.astype(np.float64) @ w + b
    np.testing.assert_allclose(model.infer({CUSTOM: x}).embeddings[CUSTOM], ref, rtol=1e-5,
                               atol=1e-5)
    model.save(tmp_path / "saved")
    again = MultiModalModel.from_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(again.infer({CUSTOM: x}).embeddings[CUSTOM], ref, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(again.infer({"text": ["q"]}).fused,
                               model.infer({"text": ["q"]}).fused, rtol=1e-6, atol=1e-6)


def test_threads_follow_mmcore(tmp_path):
    save_graph(tmp_path / "e", in_dim=4, out_dim=8)
    before = mmcore.get_num_threads()
    try:
        mmcore.set_num_threads(1)
        enc = OnnxEncoder(tmp_path / "e", modality=CUSTOM, embed_dim=8)
        assert enc.num_threads == 1
        assert enc.session.get_session_options().intra_op_num_threads == 1
        enc3 = OnnxEncoder(tmp_path / "e", modality=CUSTOM, embed_dim=8, num_threads=3)
        assert enc3.session.get_session_options().intra_op_num_threads == 3
    finally:
        mmcore.set_num_threads(before)


# -- errors -------------------------------------------------------------------------------------

def test_missing_model_onnx_names_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    loader = MultiModalLoader(custom_config())
    with pytest.raises(ModelFormatError, match=r"model\.onnx") as info:
        loader.with_modality_path(CUSTOM, tmp_path / "empty")
    assert str(tmp_path / "empty" / "model.onnx") in str(info.value)
    with pytest.raises(ModelFormatError, match="does not exist"):
        loader.with_modality_path(CUSTOM, tmp_path / "nowhere")
    with pytest.raises(ModelFormatError, match=r"model\.onnx"):
        OnnxEncoder(tmp_path / "empty", modality=CUSTOM, embed_dim=D)


def test_wrong_output_width_is_a_shape_error(tmp_path):
    save_graph(tmp_path / "narrow", in_dim=4, out_dim=D - 1)
    model = MultiModalLoader(custom_config()).with_modality_path(CUSTOM, tmp_path / "narrow").load()
    with pytest.raises(ShapeError, match=r"\[OnnxEncoder\].*expected \(B, L, 64\)"):
        model.infer({CUSTOM: np.ones((2, 3, 4), np.float32)})


def test_bad_input_width_is_a_shape_error(tmp_path):
    save_graph(tmp_path / "e", in_dim=4, out_dim=D)
    enc = OnnxEncoder(tmp_path / "e", modality=CUSTOM, embed_dim=D)
    with pytest.raises(ShapeError, match=r"\[OnnxEncoder\].*x \(2, 3, 5\)"):
        enc(np.ones((2, 3, 5), np.float32))


def test_corrupt_file_is_a_model_format_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.onnx").write_bytes(b"not a protobuf at all" * 10)
    loader = MultiModalLoader(custom_config()).with_modality_path(CUSTOM, tmp_path / "bad")
    with pytest.raises(ModelFormatError, match=r"\[OnnxEncoder\].*not a loadable ONNX model"):
        loader.load()


def test_onnx_modality_without_a_path(tmp_path):
    with pytest.raises(ConfigError, match="onnx_path"):
        MultiModalModel(custom_config(), seed=0)
    with pytest.raises(ConfigError, match="onnx_path"):
        MultiModalLoader(custom_config()).load()


def test_onnx_dir_needs_the_config_first(tmp_path):
    save_graph(tmp_path / "e", in_dim=4, out_dim=D)
    with pytest.raises(ModelFormatError, match="give the config"):
        MultiModalLoader().with_modality_path(CUSTOM, tmp_path / "e")


def test_both_callable_and_onnx_dir(tmp_path):
    save_graph(tmp_path / "e", in_dim=4, out_dim=D)
    loader = MultiModalLoader(custom_config()).with_encoder(
        CUSTOM, lambda x: np.zeros((len(x), D), np.float32))
    with pytest.raises(ConfigError, match="both"):
        loader.with_modality_path(CUSTOM, tmp_path / "e")


def test_missing_onnxruntime_is_a_clear_import_error(tmp_path, monkeypatch):
    save_graph(tmp_path / "e", in_dim=4, out_dim=D)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"mmcore\[onnx\]"):
        OnnxEncoder(tmp_path / "e", modality=CUSTOM, embed_dim=D)


def test_bad_arguments(tmp_path):
    save_graph(tmp_path / "e", in_dim=4, out_dim=D)
    with pytest.raises(ConfigError, match=r"\[OnnxEncoder\] embed_dim"):
        OnnxEncoder(tmp_path / "e", modality=CUSTOM, embed_dim=0)
    with pytest.raises(ConfigError, match=r"\[OnnxEncoder\] num_threads"):
        OnnxEncoder(tmp_path / "e", modality=CUSTOM, embed_dim=D, num_threads=0)
    with pytest.raises(ConfigError, match="disagree"):
        MultiModalModel(custom_config(extra={"onnx_path": "a"},
                                      encoder_config={"extra": {"onnx_path": "b"}}), seed=0)
