"""The ``mmcore`` command line, run as a separate process the way a user runs it.

Every command runs in a temporary folder outside the source tree, so ``python -m mmcore``
imports the installed package, not the checkout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

TIMEOUT = 120
DEMO_PNGS = ("attention_text_to_image.png", "fusion_weights.png", "mel_spectrogram.png")


def mmcore_cli(*args, cwd):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("MMCORE_NUM_THREADS", "2")
    return subprocess.run([sys.executable, "-m", "mmcore", *map(str, args)], cwd=str(cwd),
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)


@pytest.fixture
def workdir(tmp_path):
    d = tmp_path / "cwd"
    d.mkdir()
    return d


@pytest.fixture
def media(workdir):
    """A generated WAV (1.5 s chirp at 22.05 kHz, resampled on load) and PNG in ``workdir``."""
    import soundfile as sf

    from mmcore.demo import synthetic_image, tone_sweep

    wav = workdir / "tone.wav"
    sf.write(str(wav), tone_sweep(1.5, sr=22050), 22050)
    png = workdir / "picture.png"
    Image.fromarray(synthetic_image(120, 160)).save(png)
    return wav, png


def test_demo_writes_pngs_and_prints_table(workdir):
    r = mmcore_cli("demo", "--out", "tmp", cwd=workdir)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for stage in ("preprocess:text", "preprocess:image", "preprocess:audio", "preprocess:video",
                  "encode:text", "encode:video", "fusion", "total"):
        assert stage in out
    assert "p50 ms" in out
    assert "fused             (1, 64)" in out
    for m in ("text", "image", "audio", "video"):
        assert f"pooled:{m}" in out
    for name in DEMO_PNGS:
        path = workdir / "tmp" / name
        assert path.is_file(), name
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size[0] > 10 and im.size[1] > 10
    with Image.open(workdir / "tmp" / "mel_spectrogram.png") as im:
        assert im.size == (990, 440)          # a 9 x 4 in figure at 110 dpi, axes and colour bar


def test_demo_json_batch(workdir):
    r = mmcore_cli("demo", "--out", "d", "--batch", "3", "--seed", "1", "--repeat", "2",
                   "--json", cwd=workdir)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["batch"] == 3 and rep["seed"] == 1
    assert rep["shapes"]["fused"] == [3, 64]
    assert set(rep["shapes"]["pooled"]) == {"text", "image", "audio", "video"}
    assert all(s == [3, 64] for s in rep["shapes"]["pooled"].values())
    assert list(rep["stages"])[-1] == "total"
    assert all(v["p50_ms"] > 0 for v in rep["stages"].values())
    assert rep["stages"]["total"]["p50_ms"] >= rep["stages"]["fusion"]["p50_ms"]
    assert sorted(os.path.basename(f) for f in rep["files"]) == sorted(DEMO_PNGS)
    assert all(os.path.isfile(f) for f in rep["files"])


def test_demo_default_out_dir(workdir):
    r = mmcore_cli("demo", "--repeat", "1", "--warmup", "0", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (workdir / "mmcore-demo").iterdir()) == sorted(DEMO_PNGS)


def test_run_with_wav_and_png(workdir, media):
    wav, png = media
    r = mmcore_cli("run", "--text", "a picture and a tone", "--image", png, "--audio", wav,
                   "--json", "out.json", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "fused  (1, 64)" in r.stdout
    assert "pooled:image" in r.stdout and "pooled:audio" in r.stdout
    doc = json.loads((workdir / "out.json").read_text())
    fused = np.asarray(doc["fused"])
    assert fused.shape == (1, 64) and np.isfinite(fused).all()
    assert set(doc["pooled"]) == {"text", "image", "audio"}
    assert np.asarray(doc["pooled"]["audio"]).shape == (1, 64)
    assert "total" in doc["stats"] and "encode:image" in doc["stats"]

    # the same request in-process gives the same fused vector
    from mmcore.model import default_model
    ref = default_model(seed=0).infer({"text": "a picture and a tone", "image": str(png),
                                       "audio": str(wav)}).fused
    np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-6)


def test_run_single_modality(workdir, media):
    _, png = media
    r = mmcore_cli("run", "--image", png, cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "pooled:image" in r.stdout and "pooled:text" not in r.stdout


def test_init_model_then_run(workdir, media):
    from mmcore.model import MultiModalModel
    if not (hasattr(MultiModalModel, "save") and hasattr(MultiModalModel, "from_pretrained")):
        pytest.skip("MultiModalModel.save / from_pretrained are not available")
    wav, _ = media
    r = mmcore_cli("init-model", "saved", "--seed", "3", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert (workdir / "saved").is_dir()
    r = mmcore_cli("run", "--model", "saved", "--text", "hello", "--audio", wav, "--json", "a.json",
                   cwd=workdir)
    assert r.returncode == 0, r.stderr
    r2 = mmcore_cli("run", "--seed", "3", "--text", "hello", "--audio", wav, "--json", "b.json",
                    cwd=workdir)
    assert r2.returncode == 0, r2.stderr
    a = np.asarray(json.loads((workdir / "a.json").read_text())["fused"])
    b = np.asarray(json.loads((workdir / "b.json").read_text())["fused"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_info_still_works(workdir):
    r = mmcore_cli("info", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("mmcore ")
    assert "attention self-check" in r.stdout
    r = mmcore_cli("info", "--json", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "native" in json.loads(r.stdout)["backends"]


def test_imports_installed_package(workdir):
    r = subprocess.run([sys.executable, "-c", "import mmcore, os; print(mmcore.__file__)"],
                       cwd=str(workdir), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert not r.stdout.strip().startswith(str(workdir))


@pytest.mark.parametrize("args, message", [
    (("bogus",), "invalid choice"),
    (("demo", "--batch", "0"), "positive integer"),
    (("demo", "--batch", "x"), "positive integer"),
    (("demo", "--frobnicate"), "unrecognized arguments"),
    (("run",), "at least one input"),
    (("run", "--image", "missing.png"), "no such file"),
    (("run", "--audio", "missing.wav"), "no such file"),
    (("run", "--model", "no-such-dir", "--text", "x"), "no-such-dir"),
    (("init-model",), "required"),
])
def test_bad_arguments(workdir, args, message):
    r = mmcore_cli(*args, cwd=workdir)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_run_undecodable_file(workdir):
    (workdir / "noise.wav").write_bytes(b"not audio at all")
    r = mmcore_cli("run", "--audio", "noise.wav", cwd=workdir)
    assert r.returncode == 1
    assert "noise.wav" in r.stderr and "Traceback" not in r.stderr


def test_demo_without_optional_dependencies(workdir):
    code = ("import sys\n"
            "for name in ('torch', 'librosa', 'numba', 'av', 'tokenizers', 'cv2', 'matplotlib'):\n"
            "    sys.modules[name] = None\n"
            "from mmcore.cli import main\n"
            "sys.exit(main(['demo', '--out', 'bare', '--repeat', '1', '--json']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=str(workdir), capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert sorted(p.name for p in (workdir / "bare").iterdir()) == sorted(DEMO_PNGS)
    assert rep["shapes"]["fused"] == [1, 64]


def test_version(workdir):
    import mmcore
    r = mmcore_cli("--version", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"mmcore {mmcore.__version__}"


def test_repeated_inputs_run_as_one_batch(workdir, media):
    wav, png = media
    png2 = workdir / "second.png"
    Image.fromarray(np.full((50, 70, 3), 90, np.uint8)).save(png2)
    r = mmcore_cli("run", "--text", "first", "--text", "second", "--image", png, "--image", png2,
                   "--audio", wav, "--audio", wav, "--json", "batch.json", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "fused  (2, 64)" in r.stdout and "(batch 2)" in r.stdout
    fused = np.asarray(json.loads((workdir / "batch.json").read_text())["fused"])
    from mmcore.model import default_model
    ref = default_model(seed=0).infer({"text": ["first", "second"],
                                       "image": [str(png), str(png2)],
                                       "audio": [str(wav), str(wav)]}).fused
    np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(fused[0], fused[1])
    # counts that differ are refused, naming each option's count
    r = mmcore_cli("run", "--text", "a", "--text", "b", "--image", png, cwd=workdir)
    assert r.returncode == 1 and "2 --text, 1 --image" in r.stderr


def test_init_model_refuses_a_non_empty_directory_without_force(workdir):
    target = workdir / "saved"
    r = mmcore_cli("init-model", target, "--seed", "1", cwd=workdir)
    assert r.returncode == 0, r.stderr
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    r = mmcore_cli("init-model", target, "--seed", "2", cwd=workdir)
    assert r.returncode == 1 and "not empty" in r.stderr and "--force" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before
    r = mmcore_cli("init-model", target, "--seed", "2", "--force", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "seed=2" in r.stdout
    # a directory that holds something else is never replaced, even with --force
    busy = workdir / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    for extra in ([], ["--force"]):
        r = mmcore_cli("init-model", busy, *extra, cwd=workdir)
        assert r.returncode == 1, r.stdout
        assert sorted(os.listdir(busy)) == ["notes.txt"]
    (workdir / "plain").write_text("x")
    r = mmcore_cli("init-model", workdir / "plain", cwd=workdir)
    assert r.returncode == 1 and "not a directory" in r.stderr
