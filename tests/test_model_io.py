"""Model directory format: round trips, quantization tolerances, atomic writes, corruption."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import mmcore
from mmcore.config import LateFusion, ModalityConfig, MultiModalConfig
from mmcore.errors import ConfigError, ModelFormatError, ShapeError
from mmcore.model import io as mio
from mmcore.model.io import dir_nbytes, load_model_dir, save_model_dir, state_nbytes


def _config():
    return MultiModalConfig([ModalityConfig("text", embed_dim=64),
                             ModalityConfig("image", embed_dim=64)],
                            fusion=LateFusion(reduce="concat")).to_dict()


def _state(seed=0, rows=64, cols=48):
    rng = np.random.default_rng(seed)
    return {
        "encoders.text.proj.weight": rng.standard_normal((rows, cols)).astype(np.float32),
        "encoders.text.proj.bias": rng.standard_normal(rows).astype(np.float32),
        "encoders.text.norm.weight": np.ones(cols, np.float32),
        "encoders.image.patch.weight": rng.standard_normal((rows, 3, 4, 4)).astype(np.float32),
        "encoders.image.proj.weight": (rng.standard_normal((rows, cols)) * 1e-3
                                       ).astype(np.float32),
        "fusion.scale": np.array(0.5, np.float32),
    }


def _save(path, state=None, **kw):
    kw.setdefault("config", _config())
    kw.setdefault("name", "tiny")
    kw.setdefault("version", "1.2")
    return save_model_dir(path, state=_state() if state is None else state, **kw)


def _edit_json(d, fn):
    p = os.path.join(d, "mmcore.json")
    with open(p) as f:
        meta = json.load(f)
    fn(meta)
    with open(p, "w") as f:
        json.dump(meta, f)


# --------------------------------------------------------------------------------------------
# round trips

def test_float32_round_trip_is_exact_and_metadata_complete(tmp_path):
    d = tmp_path / "m"
    state = _state()
    written = _save(d, state)
    config, loaded, meta = load_model_dir(d)
    assert config == _config()
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == np.float32 and loaded[k].shape == v.shape
        np.testing.assert_array_equal(loaded[k], v)
    assert meta == written
    for field in ("format", "format_version", "name", "version", "mmcore_version", "created",
                  "modalities", "dims", "files", "tensors", "config", "quantization"):
        assert field in meta, field
    assert meta["name"] == "tiny" and meta["version"] == "1.2"
    assert meta["mmcore_version"] == mmcore.__version__
    assert meta["created"].endswith("+00:00")
    assert meta["modalities"] == ["text", "image"]
    assert meta["dims"]["text"] == 64 and meta["dims"]["output_dim"] == 128
    assert set(meta["files"]) == {"model.safetensors"}
    assert len(meta["files"]["model.safetensors"]["sha256"]) == 64
    t = meta["tensors"]["encoders.image.patch.weight"]
    assert t == {"dtype": "float32", "shape": [64, 3, 4, 4], "quantization": None,
                 "stored": ["encoders.image.patch.weight"], "nbytes": 64 * 48 * 4}
    assert sorted(os.listdir(d)) == ["mmcore.json", "model.safetensors"]
    assert [p for p in os.listdir(tmp_path) if p != "m"] == []  # no temp dirs left behind
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), framework="numpy") as f:
        st = f.metadata()
    assert st["name"] == "tiny" and st["version"] == "1.2"


@pytest.mark.parametrize("mode", ["float16", "bfloat16", "int8"])
def test_quantized_round_trip_within_documented_tolerance(tmp_path, mode):
    state = _state()
    meta = _save(tmp_path / "m", state, quantization={"encoders.": mode})
    _, loaded, meta2 = load_model_dir(tmp_path / "m")
    assert meta2["quantization"] == {"encoders.": mode}
    for k, w in state.items():
        got = loaded[k]
        assert got.dtype == np.float32 and got.shape == w.shape
        entry = meta["tensors"][k]
        if w.ndim < 2 or not k.startswith("encoders."):  # weight-only: 1-D stays float32
            assert entry["quantization"] is None and entry["dtype"] == "float32"
            np.testing.assert_array_equal(got, w)
            continue
        assert entry["quantization"] == mode and entry["dtype"] == mode
        err = np.abs(got - w)
        if mode == "float16":
            assert (err <= 1e-3 * np.abs(w) + 3e-8).all()
        elif mode == "bfloat16":
            assert (err <= 4e-3 * np.abs(w)).all()
        else:
            rowmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
            bound = rowmax.reshape((-1,) + (1,) * (w.ndim - 1)) / 254 * (1 + 1e-5)
            assert (err <= bound).all()


def test_bfloat16_rounds_to_nearest_even():
    one = np.float32(1.0).view(np.uint32)
    vals = np.array([one + 0x8000,      # exactly halfway, even below -> rounds down
                     one + 0x18000,     # halfway, odd below -> rounds up
                     one + 0x8001,      # just above halfway -> up
                     one + 0x7FFF],     # just below -> down
                    np.uint32).view(np.float32)
    bits = mio.float32_to_bfloat16_bits(vals)
    assert bits.tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80]
    np.testing.assert_array_equal(mio.bfloat16_bits_to_float32(np.array([0x3F80], np.uint16)),
                                  [1.0])


def test_int8_zero_rows_and_longest_prefix_wins(tmp_path):
    state = {"a.w": np.zeros((3, 5), np.float32), "a.keep.w": np.full((2, 2), 0.1, np.float32)}
    meta = _save(tmp_path / "m", state, quantization={"a.": "int8", "a.keep.": None})
    assert meta["tensors"]["a.w"]["stored"] == ["a.w.__q8", "a.w.__scale"]
    assert meta["tensors"]["a.keep.w"]["quantization"] is None
    _, loaded, _ = load_model_dir(tmp_path / "m")
    np.testing.assert_array_equal(loaded["a.w"], 0)
    np.testing.assert_array_equal(loaded["a.keep.w"], state["a.keep.w"])


def test_disk_size_shrinks_with_quantization(tmp_path):
    rng = np.random.default_rng(1)
    # ~10 MB of float32: five 512 x 1024 weights and their biases
    state = {}
    for i in range(5):
        state[f"encoders.text.layers.{i}.weight"] = rng.standard_normal((512, 1024)
                                                                        ).astype(np.float32)
        state[f"encoders.text.layers.{i}.bias"] = rng.standard_normal(512).astype(np.float32)
    mem = state_nbytes(state)
    assert 10_000_000 <= mem <= 11_000_000
    sizes = {}
    for mode in (None, "float16", "bfloat16", "int8"):
        d = tmp_path / str(mode)
        save_model_dir(d, config={}, state=state, name="big", version="1", quantization=mode)
        sizes[mode] = dir_nbytes(d)
        _, loaded, _ = load_model_dir(d)
        assert state_nbytes(loaded) == mem  # always float32 in memory
    assert mem <= sizes[None] <= mem * 1.01
    assert sizes["float16"] <= mem * 0.51 and sizes["bfloat16"] <= mem * 0.51
    assert sizes["int8"] <= mem * 0.26


def test_extra_files_are_copied_and_checksummed(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": {"type": "BPE"}}')
    meta = _save(tmp_path / "m", extra_files={"tokenizer.json": tok})
    assert (tmp_path / "m" / "tokenizer.json").read_text() == tok.read_text()
    assert "tokenizer.json" in meta["files"]
    load_model_dir(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text('{"model": {"type": "BPX"}}')
    with pytest.raises(ModelFormatError, match="tokenizer.json.*checksum"):
        load_model_dir(tmp_path / "m")
    load_model_dir(tmp_path / "m", verify=False)  # same size, checksum not checked
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        _save(tmp_path / "m2", extra_files={"tokenizer.json": tmp_path / "nope.json"})
    with pytest.raises(ModelFormatError, match="plain file name"):
        _save(tmp_path / "m2", extra_files={"../x.json": tok})
    assert not (tmp_path / "m2").exists()


def test_a_config_object_is_accepted(tmp_path):
    cfg = MultiModalConfig([ModalityConfig("text")])
    _save(tmp_path / "m", config=cfg)
    config, _, _ = load_model_dir(tmp_path / "m")
    assert MultiModalConfig.from_dict(config) == cfg


# --------------------------------------------------------------------------------------------
# bad arguments to save

def test_save_rejects_bad_arguments(tmp_path):
    d = tmp_path / "m"
    with pytest.raises(ConfigError, match=r"quantization\['enc'\]"):
        _save(d, quantization={"enc": "int4"})
    with pytest.raises(ShapeError, match="reserved suffix"):
        _save(d, state={"w.__q8": np.zeros((2, 2), np.float32)})
    with pytest.raises(ShapeError, match="'w'"):
        _save(d, state={"w": np.array(["a", "b"])})
    with pytest.raises(ShapeError, match="float16 range"):
        _save(d, state={"w": np.full((2, 2), 1e6, np.float32)}, quantization="float16")
    with pytest.raises(ShapeError, match="NaN"):
        _save(d, state={"w": np.full((2, 2), np.nan, np.float32)}, quantization="int8")
    with pytest.raises(ConfigError, match="JSON"):
        _save(d, config={"x": object()})
    assert not d.exists() and os.listdir(tmp_path) == []
    other = tmp_path / "data"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ModelFormatError, match="refusing"):
        _save(other)
    assert (other / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------
# atomic writes

def test_overwrite_replaces_the_directory(tmp_path):
    d = tmp_path / "m"
    _save(d, _state(0), extra_files={"tokenizer.json": _tok(tmp_path)})
    _save(d, _state(1), version="2")
    _, loaded, meta = load_model_dir(d)
    assert meta["version"] == "2" and "tokenizer.json" not in meta["files"]
    assert not (d / "tokenizer.json").exists()
    np.testing.assert_array_equal(loaded["encoders.text.proj.bias"],
                                  _state(1)["encoders.text.proj.bias"])
    assert sorted(os.listdir(tmp_path)) == ["m", "tok.json"]  # the old directory was removed


def _tok(tmp_path):
    p = tmp_path / "tok.json"
    p.write_text("{}")
    return p


def _assert_old_intact(tmp_path, d):
    _, loaded, meta = load_model_dir(d)
    assert meta["version"] == "1.2"
    np.testing.assert_array_equal(loaded["encoders.text.proj.bias"],
                                  _state(0)["encoders.text.proj.bias"])
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary or old directories left


def test_failure_while_writing_keeps_the_previous_directory(tmp_path, monkeypatch):
    d = tmp_path / "m"
    _save(d, _state(0))
    real = json.dump

    def broken_dump(obj, fp, *a, **kw):  # fails after the weights were written
        fp.write('{"half": ')
        raise OSError("disk full")

    monkeypatch.setattr(mio.json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        _save(d, _state(1), version="2")
    monkeypatch.setattr(mio.json, "dump", real)
    _assert_old_intact(tmp_path, d)


def test_failure_while_renaming_restores_the_previous_directory(tmp_path, monkeypatch):
    d = tmp_path / "m"
    _save(d, _state(0))
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new directory moving in
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(mio.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        _save(d, _state(1), version="2")
    monkeypatch.setattr(mio.os, "rename", real_rename)
    assert len(calls) == 3  # old aside, new in (failed), old back
    _assert_old_intact(tmp_path, d)


# --------------------------------------------------------------------------------------------
# corrupt directories

@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "m"
    _save(d, quantization={"encoders.image.": "int8"})
    return d


def _rewrite_weights(d, fn):
    """Replace model.safetensors with fn(tensors) and record its new checksum and size."""
    from safetensors.numpy import load_file, save_file
    p = str(d / "model.safetensors")
    tensors = fn(load_file(p))
    save_file(tensors, p, metadata={"name": "tiny", "version": "1.2"})

    def fix(meta):
        meta["files"]["model.safetensors"] = {"sha256": mio._file_sha256(p),
                                              "size": os.path.getsize(p)}
    _edit_json(d, fix)


def test_missing_directory_and_files(tmp_path, model_dir):
    with pytest.raises(ModelFormatError, match="nowhere"):
        load_model_dir(tmp_path / "nowhere")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="model.safetensors.*missing"):
        load_model_dir(model_dir)
    (model_dir / "mmcore.json").unlink()
    with pytest.raises(ModelFormatError, match="mmcore.json.*missing"):
        load_model_dir(model_dir)


def test_truncated_weights(model_dir):
    p = model_dir / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="model.safetensors.*size"):
        load_model_dir(model_dir)
    # with a matching recorded size and no checksum check the parser catches it
    _edit_json(model_dir, lambda m: m["files"]["model.safetensors"].update(
        size=len(data) // 2))
    with pytest.raises(ModelFormatError, match="model.safetensors.*(truncated|corrupt)"):
        load_model_dir(model_dir, verify=False)


def test_flipped_byte_is_a_checksum_error(model_dir):
    p = model_dir / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="model.safetensors.*checksum"):
        load_model_dir(model_dir)


def test_missing_tensor(model_dir):
    _rewrite_weights(model_dir, lambda t: {k: v for k, v in t.items()
                                           if k != "encoders.text.proj.bias"})
    with pytest.raises(ModelFormatError, match="'encoders.text.proj.bias' is missing"):
        load_model_dir(model_dir)


def test_missing_int8_scale(model_dir):
    _rewrite_weights(model_dir, lambda t: {k: v for k, v in t.items()
                                           if k != "encoders.image.proj.weight.__scale"})
    with pytest.raises(ModelFormatError, match="encoders.image.proj.weight"):
        load_model_dir(model_dir)


def test_extra_tensor(model_dir):
    _rewrite_weights(model_dir, lambda t: dict(t, stray=np.zeros(3, np.float32)))
    with pytest.raises(ModelFormatError, match="not listed.*'stray'"):
        load_model_dir(model_dir)


def test_wrong_shape_in_json(model_dir):
    _edit_json(model_dir, lambda m: m["tensors"]["encoders.text.proj.weight"].update(
        shape=[48, 64]))
    with pytest.raises(ModelFormatError, match="'encoders.text.proj.weight' has shape"):
        load_model_dir(model_dir)


def test_wrong_stored_dtype(model_dir):
    _rewrite_weights(model_dir, lambda t: dict(
        t, **{"encoders.text.proj.bias": t["encoders.text.proj.bias"].astype(np.float16)}))
    with pytest.raises(ModelFormatError, match="'encoders.text.proj.bias' is stored as float16"):
        load_model_dir(model_dir)


def test_bad_json(model_dir):
    (model_dir / "mmcore.json").write_text('{"format": "mmcore-model", ')
    with pytest.raises(ModelFormatError, match="mmcore.json.*not valid JSON"):
        load_model_dir(model_dir)
    (model_dir / "mmcore.json").write_text("[1, 2]")
    with pytest.raises(ModelFormatError, match="mmcore.json.*JSON object"):
        load_model_dir(model_dir)


def test_unknown_quantization(model_dir):
    _edit_json(model_dir, lambda m: m["tensors"]["encoders.text.proj.weight"].update(
        quantization="int4", dtype="int4"))
    with pytest.raises(ModelFormatError, match="'encoders.text.proj.weight'.*unknown "
                                               "quantization 'int4'"):
        load_model_dir(model_dir)


def test_format_version_and_fields(model_dir):
    _edit_json(model_dir, lambda m: m.update(format_version=99))
    with pytest.raises(ModelFormatError, match="format_version 99 is newer"):
        load_model_dir(model_dir)
    _edit_json(model_dir, lambda m: m.update(format_version=1, files={"../x": {}}))
    with pytest.raises(ModelFormatError, match="mmcore.json"):
        load_model_dir(model_dir)
    _edit_json(model_dir, lambda m: m.pop("format_version"))
    with pytest.raises(ModelFormatError, match="format_version"):
        load_model_dir(model_dir)


def test_name_mismatch_with_safetensors_metadata(model_dir):
    _edit_json(model_dir, lambda m: m.update(name="other"))
    with pytest.raises(ModelFormatError, match="model.safetensors.*name"):
        load_model_dir(model_dir)


def test_listed_extra_file_missing(tmp_path):
    d = tmp_path / "m"
    _save(d, extra_files={"tokenizer.json": _tok(tmp_path)})
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelFormatError, match="tokenizer.json.*missing"):
        load_model_dir(d)


@pytest.mark.parametrize("mode,ratio", [("float16", 0.5), ("bfloat16", 0.5), ("int8", 0.27)])
def test_quantized_models_stay_quantized_in_memory(tmp_path, mode, ratio):
    from mmcore.model import MultiModalModel, default_model
    from mmcore.model.model import default_config
    from mmcore.ops.linear import QuantizedTensor
    base = default_model(seed=0, cache=False)
    cfg = default_config()
    mods = [mc.replace(quantization=mode) for mc in cfg.modalities.values()]
    q = MultiModalModel(cfg.replace(modalities=mods), seed=0)
    q.load_state_dict(base.state_dict())
    q.save(tmp_path / "m")
    back = MultiModalModel.from_pretrained(tmp_path / "m")
    held = dict(back.named_parameters())
    quantized = [k for k, v in held.items() if isinstance(v, QuantizedTensor)]
    assert quantized and all(k.startswith("encoders.") for k in quantized)
    assert all(isinstance(held[k], QuantizedTensor) for k in held
               if k.startswith("encoders.") and k.endswith(("proj.weight", "linear1.weight",
                                                            "linear2.weight", "in_proj_weight")))

    def enc_bytes(model):
        return sum(v.nbytes for k, v in model.named_parameters() if k.startswith("encoders."))
    # linear weights at 2 bytes (1 + scales for int8); embeddings and norms stay float32
    assert enc_bytes(back) < (ratio + 0.35) * enc_bytes(base)
    assert back.parameter_nbytes() < base.parameter_nbytes()
    # the same outputs as the dequantized float32 model, and a float32 state dict
    sd = back.state_dict()
    assert all(v.dtype == np.float32 and isinstance(v, np.ndarray) for v in sd.values())
    deq = MultiModalModel(back.config, seed=0, cache=False)
    deq.load_state_dict(sd)
    from mmcore.demo import demo_inputs
    x = demo_inputs(2, seed=3)
    np.testing.assert_array_equal(back.infer(x).fused, deq.infer(x).fused)
    assert back.identity == deq.identity
    # saving again keeps the format and the values
    back.save(tmp_path / "again")
    again = MultiModalModel.from_pretrained(tmp_path / "again")
    np.testing.assert_array_equal(again.infer(x).fused, back.infer(x).fused)
