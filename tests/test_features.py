"""Batch feature extraction: ``mmcore.features.extract_features`` and ``mmcore features``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

from mmcore.config import PreprocessingConfig
from mmcore.errors import ConfigError, ModalityError, ModelFormatError
from mmcore.features import FeatureReport, extract_features
from mmcore.modality import Modality
from mmcore.model import default_config, default_model
from mmcore.preprocess import AudioPreprocessor, ImagePreprocessor, VideoPreprocessor

TIMEOUT = 180


# -- generated inputs ---------------------------------------------------------------------------

def write_wav(path, seconds: float, *, sr: int = 16000, freq: float = 440.0, channels: int = 1):
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
    if channels > 1:
        x = np.repeat(x[:, None], channels, axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(x.tobytes())
    return path


def write_png(path, h: int, w: int, seed: int):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(path)
    return path


def write_video(path, *, n: int = 12, w: int = 48, h: int = 32, seed: int = 0):
    av = pytest.importorskip("av")
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), (i * 20) % 256, np.uint8)
            img[: h // 2] = rng.integers(0, 256, 3).astype(np.uint8)
            for packet in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return path


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / "cwd"
    d.mkdir()
    return d


@pytest.fixture
def audio_files(workdir):
    good = [write_wav(workdir / "a.wav", 1.0, freq=300.0),
            write_wav(workdir / "b.wav", 0.4, sr=22050, freq=900.0),
            write_wav(workdir / "c.wav", 3.0, freq=1500.0)]          # longer than the 2 s chunk
    corrupt = workdir / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    missing = workdir / "missing.wav"
    return good, corrupt, missing


@pytest.fixture
def image_files(workdir):
    good = [write_png(workdir / "x.png", 40, 60, 1), write_png(workdir / "y.png", 90, 30, 2),
            write_png(workdir / "z.png", 64, 64, 3)]
    corrupt = workdir / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    missing = workdir / "nope.png"
    return good, corrupt, missing


def _pre(modality):
    return default_config().modalities[Modality(modality)].preprocessing


def _metadata(path):
    with safe_open(str(path), framework="np") as f:
        return f.metadata()


# -- API ----------------------------------------------------------------------------------------

def test_audio_good_files_match_the_preprocessor_and_bad_ones_are_listed(workdir, audio_files):
    good, corrupt, missing = audio_files
    paths = [good[0], corrupt, good[1], missing, good[2]]
    out = workdir / "feats.safetensors"
    rep = extract_features("audio", paths, out, batch_size=2, progress=False)
    assert isinstance(rep, FeatureReport) and not rep.ok
    assert list(rep.keys) == ["0000_a.wav", "0002_b.wav", "0004_c.wav"]
    assert rep.keys["0002_b.wav"] == str(good[1])
    assert [p for p, _ in rep.failed] == [str(corrupt), str(missing)]
    assert "AudioDecodeError" in rep.failed[0][1] and "corrupt.wav" in rep.failed[0][1]
    assert "missing.wav" in rep.failed[1][1]

    tensors = load_file(str(out))
    assert sorted(tensors) == list(rep.keys)
    pre = AudioPreprocessor(_pre("audio"))
    for key, path in zip(rep.keys, good):
        direct = pre(str(path))
        np.testing.assert_array_equal(tensors[key], direct["input_features"][0])
        assert tensors[key].dtype == np.float32 and tensors[key].shape == (80, 200)

    meta = _metadata(out)
    assert meta["format"] == "mmcore-features" and meta["modality"] == "audio"
    assert json.loads(meta["sources"]) == [str(p) for p in paths]
    assert [f[0] for f in json.loads(meta["failed"])] == [str(corrupt), str(missing)]
    items = json.loads(meta["items"])
    assert [it["key"] for it in items] == list(rep.keys)
    frames = {it["key"]: it["real_frames"] for it in items}
    assert frames["0000_a.wav"] == int(pre(str(good[0]))["attention_mask"].sum()) < 200
    assert frames["0004_c.wav"] == 200
    assert PreprocessingConfig.from_dict(json.loads(meta["preprocessing"])) == _pre("audio")


def test_batching_does_not_change_the_tensors(workdir, audio_files):
    good = audio_files[0]
    one = extract_features("audio", good, None, batch_size=1, progress=False)
    many = extract_features("audio", good, None, batch_size=8, progress=False)
    assert list(one.features) == list(many.features) == list(one.keys)
    for k in one.features:
        np.testing.assert_array_equal(one.features[k], many.features[k])


def test_audio_longest_padding_is_per_file(workdir, audio_files):
    good = audio_files[0]
    changes = {"preset": None, "padding": "longest", "chunk_length_s": None}
    rep = extract_features("audio", good, None, preprocessing=changes, batch_size=3,
                           progress=False)
    pre = AudioPreprocessor(_pre("audio").replace(**changes))
    for key, path in zip(rep.keys, good):
        np.testing.assert_array_equal(rep.features[key], pre(str(path))["input_features"][0])
    shapes = {v.shape[1] for v in rep.features.values()}
    assert len(shapes) == 3  # each file keeps its own length


def test_audio_fbank_preset(workdir, audio_files):
    good = audio_files[0][:1]
    rep = extract_features("audio", good, None, preprocessing={"preset": "fbank"},
                           progress=False)
    pre = AudioPreprocessor(_pre("audio").replace(preset="fbank"))
    np.testing.assert_array_equal(rep.features["0000_a.wav"],
                                  pre(str(good[0]))["input_features"][0])
    assert rep.config.preset == "fbank"


def test_images(workdir, image_files):
    good, corrupt, missing = image_files
    paths = [corrupt, *good, missing]
    out = workdir / "img.safetensors"
    rep = extract_features(Modality.IMAGE, paths, out, batch_size=2, progress=False)
    assert list(rep.keys) == ["0001_x.png", "0002_y.png", "0003_z.png"]
    assert [p for p, _ in rep.failed] == [str(corrupt), str(missing)]
    assert all("ImageDecodeError" in r or "FileNotFound" in r for _, r in rep.failed)
    tensors = load_file(str(out))
    pre = ImagePreprocessor(_pre("image"))
    for key, path in zip(rep.keys, good):
        np.testing.assert_array_equal(tensors[key], pre(str(path))["pixel_values"][0])
        assert tensors[key].shape == (3, 64, 64)


def test_encoded_inputs(workdir, image_files, audio_files):
    good, corrupt, _ = image_files
    datas = [good[0].read_bytes(), bytearray(good[1].read_bytes()),
             io.BytesIO(good[2].read_bytes()), b"not an image"]
    rep = extract_features("image", [good[0], *datas], None, progress=False)
    assert list(rep.keys) == ["0000_x.png", "0001_bytes", "0002_bytes", "0003_bytes"]
    assert rep.failed[0][0] == "<12 encoded bytes>" and "ImageDecodeError" in rep.failed[0][1]
    pre = ImagePreprocessor(_pre("image"))
    for key, path in zip(list(rep.keys)[1:], good):
        np.testing.assert_array_equal(rep.features[key], pre(str(path))["pixel_values"][0])
    np.testing.assert_array_equal(rep.features["0000_x.png"], rep.features["0001_bytes"])
    good_audio = audio_files[0][0]
    rep = extract_features("audio", [good_audio.read_bytes()], None, progress=False)
    ref = AudioPreprocessor(_pre("audio"))(str(good_audio))["input_features"][0]
    np.testing.assert_array_equal(rep.features["0000_bytes"], ref)
    with pytest.raises(ConfigError, match=r"paths\[0\] must be a path"):
        extract_features("image", [123], None, progress=False)


def test_file_objects_read_from_their_start_as_single_inputs(workdir, image_files):
    good = image_files[0]
    handles = [io.BytesIO(p.read_bytes()) for p in good[:2]]
    for fh in handles:
        fh.seek(9)
    rep = extract_features("image", handles, None, progress=False)
    assert rep.ok and not rep.failed
    for fh, key in zip(handles, rep.keys):
        fh.seek(9)
        one = extract_features("image", fh, None, progress=False)
        np.testing.assert_array_equal(rep.features[key], one.features["0000_bytes"])


def test_image_size_override(workdir, image_files):
    rep = extract_features("image", image_files[0][:1], None, preprocessing={"size": 32},
                           progress=False)
    assert rep.features["0000_x.png"].shape == (3, 32, 32)


def test_model_directory_preprocessing(workdir, image_files, tmp_path):
    cfg = default_config()
    mods = dict(cfg.modalities)
    mods[Modality.IMAGE] = mods[Modality.IMAGE].replace(
        preprocessing=PreprocessingConfig(modality="image", size=48, preset="siglip"))
    from mmcore.model import MultiModalModel
    model = MultiModalModel(cfg.replace(modalities=mods), seed=0)
    model.save(tmp_path / "m")
    good = image_files[0]
    rep = extract_features("image", good, None, model=tmp_path / "m", progress=False)
    pre = ImagePreprocessor(mods[Modality.IMAGE].preprocessing)
    for key, path in zip(rep.keys, good):
        assert rep.features[key].shape == (3, 48, 48)
        np.testing.assert_array_equal(rep.features[key], pre(str(path))["pixel_values"][0])
    rep2 = extract_features("image", good[:1], None, model=model, progress=False)
    np.testing.assert_array_equal(rep2.features["0000_x.png"], rep.features["0000_x.png"])
    # a bytes path names the model directory as well
    rep3 = extract_features("image", good[:1], None, model=os.fsencode(tmp_path / "m"),
                            progress=False)
    np.testing.assert_array_equal(rep3.features["0000_x.png"], rep.features["0000_x.png"])


def test_same_basename_twice_gets_unique_keys(workdir, image_files):
    good = image_files[0]
    sub = workdir / "sub"
    sub.mkdir()
    other = write_png(sub / "x.png", 20, 20, 9)
    rep = extract_features("image", [good[0], other, good[0]], None, progress=False)
    assert list(rep.keys) == ["0000_x.png", "0001_x.png", "0002_x.png"]
    np.testing.assert_array_equal(rep.features["0000_x.png"], rep.features["0002_x.png"])
    assert not np.array_equal(rep.features["0000_x.png"], rep.features["0001_x.png"])


def test_all_files_failing_still_writes_the_list(workdir, audio_files):
    _, corrupt, missing = audio_files
    out = workdir / "none.safetensors"
    rep = extract_features("audio", [corrupt, missing], out, progress=False)
    assert rep.keys == {} and rep.num_failed == 2
    assert load_file(str(out)) == {}
    assert len(json.loads(_metadata(out)["failed"])) == 2


def test_progress_goes_to_the_given_stream(workdir, image_files):
    buf = io.StringIO()
    extract_features("image", [*image_files[0], image_files[2]], None, batch_size=2,
                     progress=buf)
    text = buf.getvalue()
    assert "4/4 files" in text and "1 failed" in text


def test_no_output_on_argument_errors(workdir, image_files):
    good = image_files[0]
    out = workdir / "never.safetensors"
    cases = [
        (dict(modality="text"), ModalityError, "modality"),
        (dict(paths=[]), ConfigError, "paths"),
        (dict(paths=[good[0], 3]), ConfigError, "paths[1]"),
        (dict(batch_size=0), ConfigError, "batch_size"),
        (dict(output=workdir), ConfigError, "output"),
        (dict(output=workdir / "no" / "f.safetensors"), ConfigError, "does not exist"),
        (dict(preprocessing={"bogus": 1}), ConfigError, "bogus"),
        (dict(preprocessing={"size": 0}), ConfigError, "size"),
        (dict(preprocessing={"preset": "whisper"}), ConfigError, "preset"),
        (dict(preprocessing=PreprocessingConfig()), ConfigError, "preprocessing"),
        (dict(model=42), ConfigError, "model"),
        (dict(model=workdir), ModelFormatError, str(workdir)),
        (dict(progress=3), ConfigError, "progress"),
    ]
    for kw, exc, frag in cases:
        args = dict(modality="image", paths=good, output=out, progress=False)
        args.update(kw)
        with pytest.raises(exc) as info:
            extract_features(args.pop("modality"), args.pop("paths"), args.pop("output"),
                             **args)
        assert frag in str(info.value), (kw, str(info.value))
        assert str(info.value).startswith("[extract_features]") or exc is ModelFormatError
    assert not out.exists()


def test_videos(workdir):
    pytest.importorskip("av")
    good = [write_video(workdir / "v1.avi", seed=1), write_video(workdir / "v2.avi", n=20)]
    corrupt = workdir / "bad.mp4"
    corrupt.write_bytes(os.urandom(2000))
    out = workdir / "vid.safetensors"
    rep = extract_features("video", [good[0], corrupt, workdir / "gone.mp4", good[1]], out,
                           progress=False)
    assert list(rep.keys) == ["0000_v1.avi", "0003_v2.avi"]
    assert [p for p, _ in rep.failed] == [str(corrupt), str(workdir / "gone.mp4")]
    assert "VideoDecodeError" in rep.failed[0][1]
    tensors = load_file(str(out))
    pre_cfg = _pre("video")
    pre = VideoPreprocessor(pre_cfg)
    for key, path in zip(rep.keys, good):
        np.testing.assert_array_equal(tensors[key], pre(str(path))["pixel_values"])
        assert tensors[key].shape == (8, 3, 32, 32)
    items = json.loads(_metadata(out)["items"])
    assert items[0]["frame_indices"] == pre(str(good[0]))["frame_indices"].tolist()


# -- command line -------------------------------------------------------------------------------

def mmcore_cli(*args, cwd):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("MMCORE_NUM_THREADS", "2")
    return subprocess.run([sys.executable, "-m", "mmcore", *map(str, args)], cwd=str(cwd),
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)


def test_cli_audio_with_bad_files(workdir, audio_files):
    good, corrupt, missing = audio_files
    r = mmcore_cli("features", "audio", "a.wav", "corrupt.wav", "b.wav", "missing.wav", "c.wav",
                   "-o", "out.safetensors", "--batch-size", "2", cwd=workdir)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert "5/5 files" in r.stderr and "2 failed" in r.stderr       # the progress line
    tail = r.stderr[r.stderr.index("file(s) failed"):]
    assert "corrupt.wav" in tail and "missing.wav" in tail and "a.wav" not in tail
    assert "wrote 3 audio tensor(s)" in r.stdout
    tensors = load_file(str(workdir / "out.safetensors"))
    assert sorted(tensors) == ["0000_a.wav", "0002_b.wav", "0004_c.wav"]
    pre = AudioPreprocessor(_pre("audio"))
    np.testing.assert_array_equal(tensors["0002_b.wav"],
                                  pre(str(good[1]))["input_features"][0])


def test_cli_images_all_good_exit_0(workdir, image_files):
    r = mmcore_cli("features", "image", "x.png", "y.png", "z.png", "-o", "img.safetensors",
                   "--size", "32", "--preset", "siglip", "-q", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""                                            # -q: no progress
    tensors = load_file(str(workdir / "img.safetensors"))
    pre = ImagePreprocessor(_pre("image").replace(size=32, preset="siglip"))
    assert sorted(tensors) == ["0000_x.png", "0001_y.png", "0002_z.png"]
    np.testing.assert_array_equal(tensors["0001_y.png"],
                                  pre(str(image_files[0][1]))["pixel_values"][0])


def test_cli_model_dir(workdir, image_files):
    default_model(seed=0).save(workdir / "saved")
    r = mmcore_cli("features", "audio", "missing.wav", "-o", "o.safetensors", "--model", "saved",
                   "--preset", "none", cwd=workdir)
    assert r.returncode == 1 and "missing.wav" in r.stderr
    assert json.loads(_metadata(workdir / "o.safetensors")["preprocessing"])["preset"] is None


@pytest.mark.parametrize("args, message", [
    (("features",), "required"),
    (("features", "text", "x.png", "-o", "o.safetensors"), "invalid choice"),
    (("features", "image", "x.png"), "-o/--output"),
    (("features", "image", "-o", "o.safetensors"), "required"),
    (("features", "image", "x.png", "-o", "o.safetensors", "--batch-size", "0"),
     "positive integer"),
    (("features", "audio", "a.wav", "-o", "o.safetensors", "--size", "32"), "size"),
    (("features", "image", "x.png", "-o", "o.safetensors", "--preset", "whisper"), "preset"),
    (("features", "image", "x.png", "-o", "nodir/o.safetensors"), "does not exist"),
    (("features", "image", "x.png", "-o", "o.safetensors", "--model", "nosuchdir"),
     "nosuchdir"),
])
def test_cli_bad_arguments(workdir, image_files, args, message):
    r = mmcore_cli(*args, cwd=workdir)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (workdir / "o.safetensors").exists()


def test_cli_video(workdir):
    pytest.importorskip("av")
    write_video(workdir / "v.avi")
    (workdir / "junk.mp4").write_bytes(b"\x00" * 100)
    r = mmcore_cli("features", "video", "v.avi", "junk.mp4", "-o", "v.safetensors",
                   "--num-frames", "4", cwd=workdir)
    assert r.returncode == 1, r.stderr
    assert "junk.mp4" in r.stderr and "Traceback" not in r.stderr
    t = load_file(str(workdir / "v.safetensors"))
    assert list(t) == ["0000_v.avi"] and t["0000_v.avi"].shape == (4, 3, 32, 32)
