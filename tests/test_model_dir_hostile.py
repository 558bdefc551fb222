"""Hostile and mistaken model directories: sizes that would allocate before they are checked,
deep JSON, files outside the directory or outside its checksums, FIFOs, and the leftovers of
killed saves."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import pytest

from _helpers import call_bounded
from mmcore.config import LateFusion, ModalityConfig, MultiModalConfig, PreprocessingConfig
from mmcore.errors import ConfigError, ModelFormatError
from mmcore.model import MultiModalLoader, MultiModalModel, default_model
from mmcore.model import io as mio
from mmcore.model.io import load_model_dir, save_model_dir


def _small_config(preprocessing=None):
    enc = {"num_layers": 2, "num_heads": 2, "mlp_ratio": 2.0}
    return MultiModalConfig([ModalityConfig("text", embed_dim=16, encoder_config=enc,
                                            preprocessing=preprocessing or {"max_length": 8})],
                            fusion=LateFusion("mean"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small saved model directory (copied per test with :func:`_copy`)."""
    d = tmp_path_factory.mktemp("base") / "m"
    MultiModalModel(_small_config(), seed=0).save(d)
    return d


def _copy(saved, tmp_path, name="m"):
    d = tmp_path / name
    shutil.copytree(saved, d)
    return d


def _edit_config(d, fn):
    """Rewrite the config stored in ``d/mmcore.json`` (which no checksum covers) with fn."""
    p = d / "mmcore.json"
    meta = json.loads(p.read_text())
    fn(meta["config"])
    p.write_text(json.dumps(meta))


def _text(cfg):
    return cfg["modalities"]["text"]


def _bounded(fn, limit_s=2.0, limit_bytes=64 << 20):
    """Run fn(); return (its exception, seconds, peak traced bytes)."""
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        fn()
    except Exception as exc:  # returned to the caller, which checks the type
        err = exc
    else:
        err = None
    dt = time.monotonic() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return err, dt, peak


# --------------------------------------------------------------------------------------------
# item: sizes in mmcore.json are checked against the stored tensors before anything is built

SIZE_ATTACKS = {
    "num_layers=20000": lambda c: _text(c)["encoder_config"].update(num_layers=20000),
    "num_layers=10**12": lambda c: _text(c)["encoder_config"].update(num_layers=10 ** 12),
    "num_layers=0": lambda c: _text(c)["encoder_config"].update(num_layers=0),
    "vocab_size=10**12": lambda c: _text(c)["encoder_config"].update(vocab_size=10 ** 12),
    "vocab_size=10**8": lambda c: _text(c)["encoder_config"].update(vocab_size=10 ** 8),
    "max_positions=10**9": lambda c: _text(c)["encoder_config"].update(max_positions=10 ** 9),
    "hidden_dim=10**9": lambda c: _text(c)["encoder_config"].update(hidden_dim=10 ** 9),
    "hidden_dim=10**5": lambda c: _text(c)["encoder_config"].update(hidden_dim=10 ** 5),
    "embed_dim=10**6": lambda c: _text(c).update(embed_dim=10 ** 6),
    "mlp_ratio=10**7": lambda c: _text(c)["encoder_config"].update(mlp_ratio=1e7),
    "fused_dim=10**9": lambda c: c.update(fused_dim=10 ** 9),
}


_SIZE_CHILD = textwrap.dedent("""
    import json, resource, sys, time, tracemalloc
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a regression fails, no OOM
    from mmcore.model import MultiModalLoader, MultiModalModel
    how, path = sys.argv[1], sys.argv[2]
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        if how == "loader":
            MultiModalLoader().with_weights(path).load()
        else:
            MultiModalModel.from_pretrained(path)
        err = None
    except BaseException as exc:
        err = exc
    print(json.dumps({"type": type(err).__name__, "mro": [c.__name__ for c in type(err).__mro__],
                      "msg": str(err), "s": time.monotonic() - t0,
                      "peak": tracemalloc.get_traced_memory()[1]}))
""")


def _load_in_child(path, how="from_pretrained"):
    """Load ``path`` in a child process (3 GiB address space, 120 s), so that a regression
    fails the test instead of exhausting the machine: the child's report."""
    out = subprocess.run([sys.executable, "-c", _SIZE_CHILD, how, str(path)],
                         capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir())   # the installed package, not the checkout
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("attack", sorted(SIZE_ATTACKS))
def test_sizes_beyond_the_stored_weights_fail_fast_and_small(saved, tmp_path, attack):
    d = _copy(saved, tmp_path)
    _edit_config(d, SIZE_ATTACKS[attack])
    rep = _load_in_child(d)
    assert "ModelFormatError" in rep["mro"], rep
    assert rep["msg"].startswith("[") and str(d) in rep["msg"], rep
    assert rep["s"] < 2.0, f"{attack}: {rep['s']:.2f} s"
    assert rep["peak"] < 64 << 20, f"{attack}: {rep['peak'] / 2 ** 20:.0f} MiB"


def test_num_layers_mismatch_names_the_field(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit_config(d, SIZE_ATTACKS["num_layers=20000"])
    rep = _load_in_child(d)
    assert re.search(r"modalities\.text\.encoder_config\.num_layers = 20000.*holds 2 layers",
                     rep["msg"]), rep


def test_vocab_size_mismatch_names_the_shape(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit_config(d, SIZE_ATTACKS["vocab_size=10**8"])
    rep = _load_in_child(d)
    assert re.search(r"implies more weights.*\(100000000, 16\).*vocab_size", rep["msg"]), rep


@pytest.mark.parametrize("attack", ["num_layers=10**12", "vocab_size=10**12", "hidden_dim=10**9"])
def test_the_loader_checks_sizes_too(saved, tmp_path, attack):
    d = _copy(saved, tmp_path)
    _edit_config(d, SIZE_ATTACKS[attack])
    rep = _load_in_child(d, "loader")
    assert "ModelFormatError" in rep["mro"], rep
    assert rep["s"] < 2.0 and rep["peak"] < 64 << 20, rep


def test_a_faithful_directory_still_loads_the_same(saved):
    """The budgeted build changes nothing for a directory whose config fits its tensors."""
    ref = MultiModalModel(_small_config(), seed=0).state_dict()
    for load in (lambda: MultiModalModel.from_pretrained(saved),
                 lambda: MultiModalLoader().with_weights(saved).load()):
        state = load().state_dict()
        assert sorted(state) == sorted(ref)
        for k, v in ref.items():
            np.testing.assert_array_equal(state[k], v)
    sub = MultiModalModel.from_pretrained(saved, modalities=["text"]).state_dict()
    assert sorted(sub) == sorted(ref)


def _nest(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deep_json_in_mmcore_json_is_a_format_error(saved, tmp_path, depth):
    d = _copy(saved, tmp_path)
    p = d / "mmcore.json"
    text = p.read_text()
    head, tail = text.rsplit("}", 1)  # nest a value into the top-level object
    p.write_text(head + f', "deep": {_nest(depth)}' + "}" + tail)
    err, dt, _ = _bounded(lambda: MultiModalModel.from_pretrained(d))
    assert isinstance(err, ModelFormatError), repr(err)
    assert "mmcore.json" in str(err) and "nested deeper" in str(err)
    assert dt < 2.0


def test_deep_json_in_the_config_extra_is_a_format_error(saved, tmp_path):
    d = _copy(saved, tmp_path)
    deep = []
    for _ in range(500):
        deep = [deep]
    _edit_config(d, lambda c: _text(c)["extra"].update(deep=deep))
    with pytest.raises(ModelFormatError, match="nested deeper"):
        MultiModalModel.from_pretrained(d)


def test_deep_json_in_the_safetensors_header_is_a_format_error(saved, tmp_path):
    d = _copy(saved, tmp_path)
    w = d / "model.safetensors"
    data = w.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    hdr = json.dumps(header)[:-1] + ', "deep": ' + _nest(100_000) + "}"
    hdr = hdr.encode()
    hdr += b" " * (-len(hdr) % 8)
    new = len(hdr).to_bytes(8, "little") + hdr + data[8 + n:]
    w.write_bytes(new)
    import hashlib
    p = d / "mmcore.json"
    meta = json.loads(p.read_text())
    meta["files"]["model.safetensors"] = {"sha256": hashlib.sha256(new).hexdigest(),
                                          "size": len(new)}
    p.write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="safetensors header"):
        load_model_dir(d)


@pytest.mark.parametrize("kind", ["json", "toml"])
@pytest.mark.parametrize("depth", [100, 100_000])
def test_deep_config_files_are_config_errors(tmp_path, kind, depth):
    p = tmp_path / f"c.{kind}"
    if kind == "json":
        p.write_text('{"name": "x", "extra": ' + _nest(depth) + "}")
        load = MultiModalConfig.from_json
    else:
        p.write_text("a = " + _nest(depth) + "\n")
        load = MultiModalConfig.from_toml
    err, dt, _ = _bounded(lambda: load(p))
    assert isinstance(err, ConfigError), repr(err)
    assert "nested deeper" in str(err) and str(p) in str(err)
    assert dt < 2.0


# --------------------------------------------------------------------------------------------
# item: FIFOs are refused without blocking

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("name", ["mmcore.json", "model.safetensors"])
def test_fifo_in_place_of_a_file_is_refused(saved, tmp_path, name):
    d = _copy(saved, tmp_path)
    os.remove(d / name)
    os.mkfifo(d / name)
    err = call_bounded(lambda: MultiModalModel.from_pretrained(d), d / name, bound=20.0)
    assert isinstance(err, ModelFormatError), repr(err)
    assert "FIFO" in str(err) and name in str(err)
    err = call_bounded(lambda: load_model_dir(d, verify=False), d / name, bound=20.0)
    assert isinstance(err, ModelFormatError) and "FIFO" in str(err)
    err = call_bounded(lambda: MultiModalLoader().with_weights(d).load(), d / name,
                       bound=20.0)
    assert isinstance(err, ModelFormatError) and "FIFO" in str(err)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_extra_file_is_refused_with_and_without_verify(saved, tmp_path):
    src = tmp_path / "tok.json"
    src.write_text("{}")
    d = tmp_path / "m"
    save_model_dir(d, config={}, state={"w": np.ones(2, np.float32)}, name="n", version="1",
                   extra_files={"tokenizer.json": src})
    os.remove(d / "tokenizer.json")
    os.mkfifo(d / "tokenizer.json")
    for verify in (True, False):
        err = call_bounded(lambda verify=verify: load_model_dir(d, verify=verify),
                           d / "tokenizer.json",
                           bound=20.0)
        assert isinstance(err, ModelFormatError) and "FIFO" in str(err), repr(err)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_config_file_is_refused(tmp_path):
    p = tmp_path / "c.json"
    os.mkfifo(p)
    for load in (MultiModalConfig.from_json, MultiModalConfig.from_toml):
        err = call_bounded(lambda load=load: load(p), p, bound=20.0)
        assert isinstance(err, ConfigError) and "FIFO" in str(err), repr(err)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
def test_fifo_tokenizer_is_refused(tmp_path):
    pytest.importorskip("tokenizers")
    from mmcore.preprocess.text import HFTokenizer
    p = tmp_path / "tokenizer.json"
    os.mkfifo(p)
    err = call_bounded(lambda: HFTokenizer(p), p, bound=20.0)
    assert isinstance(err, ModelFormatError) and "FIFO" in str(err), repr(err)


# --------------------------------------------------------------------------------------------
# item: the files a model directory uses lie inside it and are covered by its checksums

def _tokenizer_file(path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a b c", "b c d"],
                            trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tok.save(str(path))
    return path


def _set_tokenizer(value):
    return lambda c: _text(c)["preprocessing"].update(tokenizer=value)


@pytest.fixture
def outside(tmp_path):
    o = tmp_path / "outside"
    o.mkdir()
    _tokenizer_file(o / "tokenizer.json")
    return o


def _tokenizer_attacks(d, outside):
    return {
        "absolute": (str(outside / "tokenizer.json"), "absolute path"),
        "dotdot": ("../outside/tokenizer.json", "outside the model directory"),
        "symlink": ("link.json", "outside the model directory"),
        "unlisted": ("stray.json", "does not list"),
        "dir-escape": ("..", "outside the model directory"),
    }


@pytest.mark.parametrize("attack", ["absolute", "dotdot", "symlink", "unlisted", "dir-escape"])
def test_tokenizer_path_must_be_a_listed_file_inside(saved, tmp_path, outside, attack):
    d = _copy(saved, tmp_path)
    os.symlink(outside / "tokenizer.json", d / "link.json")
    shutil.copy(outside / "tokenizer.json", d / "stray.json")
    value, why = _tokenizer_attacks(d, outside)[attack]
    _edit_config(d, _set_tokenizer(value))
    for load in (lambda: MultiModalModel.from_pretrained(d),
                 lambda: MultiModalModel.from_pretrained(d, verify=False),
                 lambda: MultiModalLoader().with_weights(d).load()):
        with pytest.raises(ModelFormatError, match=r"modalities\.text\.preprocessing\.tokenizer")\
                as info:
            load()
        assert why in str(info.value) and str(info.value).startswith("[")


def test_tokenizer_resolves_against_the_directory_not_the_cwd(saved, tmp_path, monkeypatch):
    tok = _tokenizer_file(tmp_path / "src_tokenizer.json")
    model = MultiModalModel(_small_config(), seed=0)
    d = tmp_path / "m"
    model.save(d, tokenizer=tok)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "tokenizer.json").write_text("not a tokenizer")  # must not be read
    monkeypatch.chdir(elsewhere)
    # the stored config says "tokenizer.json": the copy inside the directory is meant
    _edit_config(d, _set_tokenizer("tokenizer.json"))
    loaded = MultiModalModel.from_pretrained(os.path.relpath(d, elsewhere))
    path = loaded.preprocessors[list(loaded.preprocessors)[0]].tokenizer.path
    assert os.path.realpath(path) == os.path.realpath(d / "tokenizer.json")


def test_symlinked_model_directory_and_internal_links_are_fine(saved, tmp_path):
    d = _copy(saved, tmp_path, "real")
    direct = MultiModalModel.from_pretrained(d).state_dict()
    (d / "blobs").mkdir()
    shutil.move(d / "model.safetensors", d / "blobs" / "weights")
    os.symlink(os.path.join("blobs", "weights"), d / "model.safetensors")  # stays inside
    link = tmp_path / "current"
    os.symlink(d, link)
    via_link = MultiModalModel.from_pretrained(link).state_dict()
    assert direct and sorted(via_link) == sorted(direct)
    for k, v in direct.items():
        np.testing.assert_array_equal(via_link[k], v, err_msg=k)


def test_listed_file_linked_outside_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(d / "model.safetensors", moved)
    os.symlink(moved, d / "model.safetensors")  # same bytes, same checksum, but outside
    with pytest.raises(ModelFormatError, match="model.safetensors.*outside the model directory"):
        MultiModalModel.from_pretrained(d)


def test_save_bundles_the_tokenizer_the_model_uses(tmp_path, monkeypatch):
    tok = _tokenizer_file(tmp_path / "mine.json")
    model = MultiModalModel(_small_config(preprocessing={"tokenizer": str(tok), "max_length": 8}),
                            seed=0)
    d = tmp_path / "m"
    meta = model.save(d)
    assert "tokenizer.json" in meta["files"]
    assert meta["config"]["modalities"]["text"]["preprocessing"]["tokenizer"] == "tokenizer.json"
    os.remove(tok)
    monkeypatch.chdir(tmp_path)
    again = MultiModalModel.from_pretrained(d)
    a = model.infer({"text": ["a b c"]}).fused
    np.testing.assert_array_equal(again.infer({"text": ["a b c"]}).fused, a)


# ONNX graphs ------------------------------------------------------------------------------

def _graph(path, in_dim=4, out_dim=16, value=0.25):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    w = np.full((in_dim, out_dim), value, np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["tokens"])], "enc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "L", in_dim])],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["B", "L", out_dim])],
        [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(path))
    return path


def _onnx_config(onnx_path):
    cfg = _small_config()
    mods = list(cfg.modalities.values()) + [ModalityConfig(
        "custom:3", encoder="onnx", embed_dim=16, preprocessing=None,
        encoder_config={"extra": {"onnx_path": str(onnx_path)}})]
    return cfg.replace(modalities=mods)


@pytest.fixture
def onnx_saved(tmp_path):
    g = _graph(tmp_path / "graphs" / "model.onnx")
    d = tmp_path / "m"
    MultiModalModel(_onnx_config(g), seed=0).save(d)
    shutil.rmtree(tmp_path / "graphs")  # the directory is self-contained
    return d


def _set_onnx(value, where="encoder_config"):
    def fn(c):
        m = c["modalities"]["custom:3"]
        holder = m["encoder_config"] if where == "encoder_config" else m
        holder["extra"]["onnx_path"] = value
    return fn


def test_saved_onnx_graph_is_bundled_and_loads_from_any_cwd(onnx_saved, tmp_path, monkeypatch):
    meta = json.loads((onnx_saved / "mmcore.json").read_text())
    assert "encoder.custom-3.onnx" in meta["files"]
    monkeypatch.chdir(tmp_path)
    model = MultiModalModel.from_pretrained(onnx_saved.name)
    from mmcore.modality import Modality
    out = model.infer({"custom:3": np.ones((1, 2, 4), np.float32)})
    np.testing.assert_allclose(out.embeddings[Modality("custom:3")], np.ones((1, 2, 16)),
                               rtol=1e-6)


@pytest.mark.parametrize("attack", ["absolute", "dotdot", "symlink", "unlisted", "cwd"])
@pytest.mark.parametrize("verify", [True, False])
def test_onnx_path_must_be_a_listed_file_inside(onnx_saved, tmp_path, monkeypatch, attack,
                                                verify):
    evil = _graph(tmp_path / "evil" / "model.onnx", out_dim=16)
    d = onnx_saved
    os.symlink(evil, d / "link.onnx")
    shutil.copy(evil, d / "stray.onnx")
    value, why = {"absolute": (str(evil), "absolute path"),
                  "dotdot": ("../evil/model.onnx", "outside the model directory"),
                  "symlink": ("link.onnx", "outside the model directory"),
                  "unlisted": ("stray.onnx", "does not list"),
                  "cwd": ("evil", "does not list")}[attack]
    monkeypatch.chdir(tmp_path)  # "evil" exists relative to the working directory only
    _edit_config(d, _set_onnx(value))
    from mmcore.model import onnx_encoder
    ran = []
    real = onnx_encoder.OnnxEncoder.__init__
    monkeypatch.setattr(onnx_encoder.OnnxEncoder, "__init__",
                        lambda self, *a, **k: (ran.append(a), real(self, *a, **k))[1])
    with pytest.raises(ModelFormatError, match=r"modalities\.custom:3\.encoder_config\."
                                               r"extra\['onnx_path'\]") as info:
        MultiModalModel.from_pretrained(d, verify=verify)
    assert why in str(info.value)
    assert not ran  # the graph never reached onnxruntime


def test_onnx_path_in_the_modality_extra_is_checked_too(onnx_saved, tmp_path):
    evil = _graph(tmp_path / "evil" / "model.onnx")
    _edit_config(onnx_saved, _set_onnx(str(evil), where="extra"))
    with pytest.raises(ModelFormatError, match=r"modalities\.custom:3\.extra\['onnx_path'\]"):
        MultiModalModel.from_pretrained(onnx_saved)


def test_onnx_file_replaced_inside_fails_the_checksum(onnx_saved, tmp_path):
    evil = _graph(tmp_path / "evil" / "model.onnx", value=0.5)  # same size, other weights
    graph = onnx_saved / "encoder.custom-3.onnx"
    data = evil.read_bytes()
    assert len(data) == graph.stat().st_size and data != graph.read_bytes()
    graph.write_bytes(data)
    with pytest.raises(ModelFormatError, match="encoder.custom-3.onnx.*checksum"):
        MultiModalModel.from_pretrained(onnx_saved)
    graph.write_bytes(data + b"\0")
    with pytest.raises(ModelFormatError, match="size"):
        MultiModalModel.from_pretrained(onnx_saved, verify=False)


def test_an_explicit_onnx_directory_may_lie_elsewhere(tmp_path):
    g = _graph(tmp_path / "graphs" / "model.onnx")
    cfg = _onnx_config("unused")
    mods = dict(cfg.modalities)
    from mmcore.modality import Modality
    m = Modality("custom:3")
    mods[m] = mods[m].replace(encoder_config=mods[m].encoder_config.replace(extra={}))
    cfg = cfg.replace(modalities=list(mods.values()))
    model = MultiModalLoader(cfg).with_modality_path("custom:3", g.parent).load()
    assert model.infer({"custom:3": np.ones((1, 2, 4), np.float32)}).fused.shape == (1, 16)


# --------------------------------------------------------------------------------------------
# item: leftovers of killed saves are removed by the next save; live saves are not touched

_CHILD = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    from mmcore.model import io as mio
    target, ready, stage = sys.argv[1], sys.argv[2], sys.argv[3]
    real_rename, real_dump = os.rename, json.dump

    def park():
        open(ready, "w").close()
        while True:
            time.sleep(1)

    def dump(obj, fp, *a, **k):        # parks while writing the temporary directory
        if stage == "tmp":
            park()
        return real_dump(obj, fp, *a, **k)

    def rename(src, dst):              # parks between moving the old directory aside ...
        real_rename(src, dst)
        if stage == "old" and ".old-" in os.path.basename(dst):
            park()                     # ... and moving the new one in

    mio.json.dump = dump
    mio.os.rename = rename
    mio.save_model_dir(target, config={{}}, state={{"w": np.ones((64, 64), np.float32)}},
                       name="n", version="child")
""")


def _start_parked_save(tmp_path, target, stage):
    ready = tmp_path / f"ready-{stage}-{time.monotonic_ns()}"
    script = tmp_path / "child_save.py"
    script.write_text(_CHILD.format())
    proc = subprocess.Popen([sys.executable, str(script), str(target), str(ready), stage],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child save ended early: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("child save did not reach the parking point")
        time.sleep(0.02)
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def _leftovers(parent, base="m"):
    return sorted(n for n in os.listdir(parent) if n.startswith(f".{base}."))


def _save(target, version):
    return save_model_dir(target, config={}, state={"w": np.zeros(3, np.float32)}, name="n",
                          version=version)


needs_flock = pytest.mark.skipif(mio._fcntl is None, reason="needs fcntl.flock")


@needs_flock
def test_killed_saves_leave_nothing_after_the_next_save(tmp_path):
    target = tmp_path / "m"
    _save(target, "0")
    for stage in ("tmp", "old", "tmp"):
        _kill(_start_parked_save(tmp_path, target, stage))
    left = _leftovers(tmp_path)
    assert any(".tmp-" in n for n in left) and any(".old-" in n for n in left), left
    # the save killed between its renames left no directory at the target: the previous
    # model survives under .old-* until a save completes
    assert not target.exists()
    _save(target, "1")
    assert _leftovers(tmp_path) == []
    assert load_model_dir(target)[2]["version"] == "1"


@needs_flock
def test_a_live_save_in_another_process_is_never_touched(tmp_path):
    target = tmp_path / "m"
    _save(target, "0")
    live = _start_parked_save(tmp_path, target, "tmp")
    try:
        held = _leftovers(tmp_path)
        assert len(held) == 1 and ".tmp-" in held[0]
        _save(target, "1")
        _save(target, "2")
        assert _leftovers(tmp_path) == held  # still there, untouched
        assert (tmp_path / held[0] / "model.safetensors").exists()
    finally:
        _kill(live)
    _save(target, "3")
    assert _leftovers(tmp_path) == []
    assert load_model_dir(target)[2]["version"] == "3"


@needs_flock
def test_a_live_save_in_another_thread_is_never_touched(tmp_path, monkeypatch):
    target = tmp_path / "m"
    _save(target, "0")
    parked, release = threading.Event(), threading.Event()
    real_dump = json.dump

    def dump(obj, fp, *a, **k):
        if threading.current_thread().name == "slow-save":
            parked.set()
            assert release.wait(60)
        return real_dump(obj, fp, *a, **k)

    monkeypatch.setattr(mio.json, "dump", dump)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("meta", _save(target, "slow")),
                         name="slow-save", daemon=True)
    t.start()
    try:
        assert parked.wait(60)
        held = _leftovers(tmp_path)
        assert len(held) == 1
        _save(target, "fast")
        assert _leftovers(tmp_path) == held
    finally:
        release.set()
        t.join(60)
    assert box["meta"]["version"] == "slow"
    assert load_model_dir(target)[2]["version"] == "slow"
    assert _leftovers(tmp_path) == []


@needs_flock
def test_parent_folder_behind_a_symlink_is_locked_too(tmp_path):
    """A save through a symlinked folder locks the real folder (two saves exclude each
    other), so leftovers are still claimed safely and removed."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    os.symlink(real, link)
    with mio._parent_lock(str(link)) as locked:
        assert locked
        fd = os.open(str(real), os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                mio._fcntl.flock(fd, mio._fcntl.LOCK_EX | mio._fcntl.LOCK_NB)
        finally:
            os.close(fd)
    target = link / "m"
    _save(target, "0")
    _kill(_start_parked_save(real, real / "m", "tmp"))
    assert any(".tmp-" in n for n in _leftovers(real))
    _save(target, "1")
    assert _leftovers(real) == []
    assert load_model_dir(target)[2]["version"] == "1"


@needs_flock
def test_concurrent_saves_to_one_target(tmp_path):
    target = tmp_path / "m"
    errors = []

    def worker(i):
        try:
            for j in range(5):
                _save(target, f"{i}.{j}")
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert load_model_dir(target)[2]["version"].endswith(".4")
    assert _leftovers(tmp_path) == []


def test_other_hidden_entries_are_left_alone(tmp_path):
    target = tmp_path / "m"
    for name in (".m.tmp-keep me", ".m.tmpx", ".other.tmp-abc12345", ".m.old-x.y"):
        (tmp_path / name).mkdir()
    (tmp_path / ".m.tmp-file1234").write_text("a file, not a directory")
    os.symlink(tmp_path, tmp_path / ".m.tmp-link1234")
    _save(target, "0")
    _save(target, "1")
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".m.tmp-keep me", ".m.tmpx", ".other.tmp-abc12345", ".m.old-x.y", ".m.tmp-file1234",
         ".m.tmp-link1234", "m"])


def test_oversized_mmcore_json_is_refused_before_it_is_read(saved, tmp_path, monkeypatch):
    d = _copy(saved, tmp_path)
    monkeypatch.setattr(mio, "MAX_CONFIG_BYTES", 1000)
    with pytest.raises(ModelFormatError, match=r"mmcore\.json.*more than the 1000"):
        load_model_dir(d)


def test_oversized_safetensors_header_claim_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes((10 ** 12).to_bytes(8, "little") + data[8:])
    with pytest.raises(ModelFormatError, match="safetensors header"):
        load_model_dir(d, verify=False)


def _graph_with_external_data(folder, location="weights.bin"):
    onnx = pytest.importorskip("onnx")
    g = _graph(folder / "model.onnx")
    m = onnx.load(str(g))
    onnx.save_model(m, str(g), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    assert (folder / location).exists()
    return g


def test_onnx_external_data_is_bundled_and_must_be_listed(tmp_path, monkeypatch):
    g = _graph_with_external_data(tmp_path / "graphs")
    d = tmp_path / "m"
    meta = MultiModalModel(_onnx_config(g), seed=0).save(d)
    assert "weights.bin" in meta["files"] and "encoder.custom-3.onnx" in meta["files"]
    shutil.rmtree(tmp_path / "graphs")
    monkeypatch.chdir(tmp_path)
    from mmcore.modality import Modality
    out = MultiModalModel.from_pretrained(d).infer({"custom:3": np.ones((1, 2, 4), np.float32)})
    np.testing.assert_allclose(out.embeddings[Modality("custom:3")], np.ones((1, 2, 16)),
                               rtol=1e-6)
    # the same file, present but no longer listed (so not covered by the checksums)
    p = d / "mmcore.json"
    meta = json.loads(p.read_text())
    del meta["files"]["weights.bin"]
    p.write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=r"extra\['onnx_path'\] \(external data "
                                               r"'weights.bin'.*does not list"):
        MultiModalModel.from_pretrained(d)


def test_audio_chunk_lengths_beyond_four_hours_are_refused(tmp_path):
    """A model directory whose audio preprocessing pads every clip to 20,000 s (and a frame
    stride that keeps the positions consistent) would make each item take gigabytes."""
    d = tmp_path / "m"
    default_model().save(d)

    def edit(cfg):
        audio = cfg["modalities"]["audio"]
        audio["preprocessing"]["chunk_length_s"] = 20000
        audio["encoder_config"].setdefault("extra", {})["frame_stride"] = 40000
    _edit_config(d, edit)
    exc, took, peak = _bounded(lambda: MultiModalModel.from_pretrained(d))
    assert isinstance(exc, ModelFormatError) and "chunk_length_s" in str(exc), exc
    with pytest.raises(ConfigError, match="max_length_s"):
        PreprocessingConfig("audio", max_length_s=4 * 3600 + 1)
