"""PreprocessingConfig as a tagged union: dispatch, per-modality fields, files written by the
single class it replaced, and the deprecated reads of other modalities' fields."""

from __future__ import annotations

import copy
import json
import pickle
import sys
import warnings

import pytest

from mmcore.config import (
    AudioPreprocessingConfig,
    ImagePreprocessingConfig,
    ModalityConfig,
    MultiModalConfig,
    PreprocessingConfig,
    TextPreprocessingConfig,
    VideoPreprocessingConfig,
)
from mmcore.errors import ConfigError
from mmcore.modality import Modality

CLASSES = {"audio": AudioPreprocessingConfig, "image": ImagePreprocessingConfig,
           "video": VideoPreprocessingConfig, "text": TextPreprocessingConfig}

# every field of the single class that held all modalities, in its order
LEGACY_FIELDS = (
    "modality", "preset", "sample_rate", "n_mels", "n_fft", "hop_length", "chunk_length_s",
    "padding", "max_length_s", "truncation", "mono", "extra", "size", "crop_size",
    "resize_mode", "filter", "mean", "std", "patch_size", "num_frames", "fps", "sampling",
    "min_frames", "max_frames", "temporal_patch", "tokenizer", "max_length", "padding_side",
    "add_eos")

# to_dict() of PreprocessingConfig(modality="image", size=384) as the single class wrote it
LEGACY_IMAGE = {
    "modality": "image", "preset": "clip", "sample_rate": 16000, "n_mels": 80, "n_fft": 400,
    "hop_length": 160, "chunk_length_s": None, "padding": "none", "max_length_s": None,
    "truncation": True, "mono": True, "extra": {}, "size": 384, "crop_size": None,
    "resize_mode": None, "filter": None, "mean": None, "std": None, "patch_size": None,
    "num_frames": None, "fps": None, "sampling": None, "min_frames": None, "max_frames": None,
    "temporal_patch": None, "tokenizer": None, "max_length": None, "padding_side": None,
    "add_eos": None}

# to_toml() of PreprocessingConfig(modality="text", max_length=16) as the single class wrote it
LEGACY_TEXT_TOML = """\
modality = "text"
preset = "none"
sample_rate = 16000
n_mels = 80
n_fft = 400
hop_length = 160
chunk_length_s = "none"
padding = "longest"
max_length_s = "none"
truncation = true
mono = true
extra = {}
crop_size = "none"
resize_mode = "none"
filter = "none"
mean = "none"
std = "none"
patch_size = "none"
num_frames = "none"
fps = "none"
tokenizer = "byte"
max_length = 16
padding_side = "right"
add_eos = "none"
"""


# --------------------------------------------------------------------------------------------
# dispatch

@pytest.mark.parametrize("modality", list(CLASSES))
def test_base_builds_the_modality_class(modality):
    cfg = PreprocessingConfig(modality=modality)
    assert type(cfg) is CLASSES[modality] and isinstance(cfg, PreprocessingConfig)
    assert cfg.modality == modality and cfg.MODALITY == modality
    assert CLASSES[modality]() == cfg
    assert PreprocessingConfig(modality.upper()) == cfg            # positional, any case
    assert PreprocessingConfig(modality=Modality(modality)) == cfg
    assert PreprocessingConfig.subclass(modality) is CLASSES[modality]


def test_default_is_audio_and_types_in_order():
    assert type(PreprocessingConfig()) is AudioPreprocessingConfig
    assert type(PreprocessingConfig.from_dict({})) is AudioPreprocessingConfig
    assert PreprocessingConfig.types() == ("audio", "image", "video", "text")


@pytest.mark.parametrize("bad", ["depth", None, True, 3])
def test_unknown_modality_names_the_field(bad):
    with pytest.raises(ConfigError, match=r"^PreprocessingConfig\.modality must be one of "
                                          r"'audio' \| 'image' \| 'video' \| 'text'"):
        PreprocessingConfig(modality=bad)


def test_subclass_refuses_another_modality():
    with pytest.raises(ConfigError, match=r"PreprocessingConfig\.modality must be 'image'"):
        ImagePreprocessingConfig(modality="video")
    with pytest.raises(ConfigError, match=r"PreprocessingConfig\.modality"):
        ImagePreprocessingConfig.from_dict({"modality": "text"})


def test_each_class_holds_its_own_fields_only():
    owned = {m: set(cls.field_names()) for m, cls in CLASSES.items()}
    assert "sample_rate" in owned["audio"] and "sample_rate" not in owned["text"]
    assert "size" in owned["video"] and "size" not in owned["audio"]
    assert "tokenizer" in owned["text"] and "tokenizer" not in owned["image"]
    assert owned["video"] > owned["image"]
    assert set().union(*owned.values()) == set(LEGACY_FIELDS) == PreprocessingConfig.field_names()
    for m, cls in CLASSES.items():
        d = cls().to_dict()
        assert set(d) == owned[m] and list(d)[0] == "modality" and list(d)[-1] == "extra"


# --------------------------------------------------------------------------------------------
# fields of other modalities given at construction

@pytest.mark.parametrize("modality,field,value", [
    ("audio", "size", 224), ("audio", "tokenizer", "byte"), ("image", "padding", "longest"),
    ("image", "chunk_length_s", 30.0), ("video", "max_length", 16), ("text", "preset", "clip"),
    ("text", "fps", 2.0), ("image", "num_frames", 8)])
def test_field_of_another_modality_raises_naming_it(modality, field, value):
    with pytest.raises(ConfigError, match=rf"^PreprocessingConfig\.{field} applies to modality "
                                          rf".* only \(this config is '{modality}'\)"):
        PreprocessingConfig(modality=modality, **{field: value})


def test_neutral_values_of_other_modalities_are_dropped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        img = PreprocessingConfig(modality="image", chunk_length_s=None, padding="none",
                                  tokenizer=None, num_frames=None, sample_rate=16000, mono=True)
        aud = PreprocessingConfig(size=None, mean=None, max_length=None)
    assert img == ImagePreprocessingConfig() and aud == AudioPreprocessingConfig()


def test_carried_audio_fields_are_dropped_with_a_warning_when_set():
    with pytest.warns(DeprecationWarning, match=r"n_mels=64 is ignored by 'image' configs"):
        img = PreprocessingConfig(modality="image", n_mels=64)
    assert img == ImagePreprocessingConfig()
    with pytest.warns(DeprecationWarning, match="truncation=False is ignored by 'video'"):
        PreprocessingConfig(modality="video", truncation=False)
    with pytest.raises(ConfigError, match=r"PreprocessingConfig\.mono must be True or False"):
        PreprocessingConfig(modality="text", mono="yes")
    with pytest.raises(TypeError):
        PreprocessingConfig(modality="text", not_a_field=1)


# --------------------------------------------------------------------------------------------
# reading fields of other modalities

def test_reading_another_modalities_field_warns_and_gives_the_old_neutral_value():
    img = PreprocessingConfig(modality="image")
    with pytest.warns(DeprecationWarning, match=r"'padding' is not a field of 'image' configs"):
        assert img.padding == "none"
    with pytest.warns(DeprecationWarning):
        assert img.sample_rate == 16000 and img.mono is True
    with pytest.warns(DeprecationWarning):
        assert img.tokenizer is None and img.target_length is None
    text = PreprocessingConfig(modality="text")
    with pytest.warns(DeprecationWarning):
        assert text.preset is None and text.size is None and text.max_samples is None
    with pytest.raises(AttributeError):
        img.no_such_field  # noqa: B018
    assert not hasattr(PreprocessingConfig(), "no_such_field")


def test_own_fields_read_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for cls in CLASSES.values():
            cfg = cls()
            for name in cls.field_names():
                getattr(cfg, name)
        assert PreprocessingConfig().target_length == 480000


# --------------------------------------------------------------------------------------------
# conversion, equality, files

@pytest.mark.parametrize("kwargs", [
    {}, {"preset": "fbank", "n_mels": 64}, {"modality": "image", "size": (224, 320),
                                            "resize_mode": "squash"},
    {"modality": "video", "fps": 2.0, "patch_size": 14}, {"modality": "text", "max_length": 8,
                                                          "extra": {"a": [1, 2]}}])
def test_round_trips_hash_pickle(kwargs, tmp_path):
    cfg = PreprocessingConfig(**kwargs)
    d = cfg.to_dict()
    assert d["modality"] == cfg.modality and json.loads(json.dumps(d)) == d
    assert PreprocessingConfig.from_dict(d) == cfg and type(cfg).from_dict(d) == cfg
    cfg.to_json(tmp_path / "p.json")
    assert PreprocessingConfig.from_json(tmp_path / "p.json") == cfg
    if sys.version_info >= (3, 11):
        cfg.to_toml(tmp_path / "p.toml")
        assert PreprocessingConfig.from_toml(tmp_path / "p.toml") == cfg
    again = PreprocessingConfig(**kwargs)
    assert again == cfg and hash(again) == hash(cfg) and again is not cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg
    assert type(pickle.loads(pickle.dumps(cfg))) is type(cfg)


def test_configs_of_different_modalities_differ():
    assert PreprocessingConfig(modality="image") != PreprocessingConfig(modality="video")
    assert len({PreprocessingConfig(modality=m) for m in CLASSES}) == 4


def test_unknown_key_in_mapping_names_it():
    with pytest.raises(ConfigError, match=r"has no field\(s\) 'colour'"):
        PreprocessingConfig.from_dict({"modality": "image", "colour": "red"})
    with pytest.raises(ConfigError, match=r"from_dict expects a mapping"):
        PreprocessingConfig.from_dict([("modality", "image")])


def test_files_written_by_the_single_class_load(tmp_path):
    assert PreprocessingConfig.from_dict(LEGACY_IMAGE) == PreprocessingConfig(modality="image",
                                                                              size=384)
    if sys.version_info >= (3, 11):
        path = tmp_path / "text.toml"
        path.write_text(LEGACY_TEXT_TOML)
        assert PreprocessingConfig.from_toml(path) == PreprocessingConfig(modality="text",
                                                                          max_length=16)
    mm = MultiModalConfig.from_dict({"modalities": {"image": {"preprocessing": LEGACY_IMAGE}}})
    assert mm.modalities["image"].preprocessing.size == 384


def test_written_files_hold_legacy_fields_only():
    # a reader of the single class fills every missing field with its default, which is the
    # value these configs have
    for m in CLASSES:
        assert set(PreprocessingConfig(modality=m).to_dict()) <= set(LEGACY_FIELDS)


def test_replace():
    img = PreprocessingConfig(modality="image")
    assert img.replace(size=336).size == 336 and type(img.replace(size=336)) is type(img)
    with pytest.raises(ConfigError, match=r"PreprocessingConfig\.size must be"):
        img.replace(size=0)
    with pytest.raises(ConfigError, match=r"PreprocessingConfig\.num_frames applies"):
        img.replace(num_frames=4)
    vid = img.replace(modality="video", patch_size=16)       # image fields carry over
    assert type(vid) is VideoPreprocessingConfig and vid.patch_size == 16
    with pytest.raises(ConfigError, match=r"PreprocessingConfig\.preset"):
        PreprocessingConfig().replace(modality="text")        # preset='whisper' is audio's


def test_modality_config_checks_use_the_right_class():
    mc = ModalityConfig("image", preprocessing={"patch_size": 16},
                        encoder_config={"patch_size": 16})
    assert type(mc.preprocessing) is ImagePreprocessingConfig
    with pytest.raises(ConfigError, match=r"encoder_config\.patch_size must equal"):
        ModalityConfig("video", preprocessing={"patch_size": 14},
                       encoder_config={"patch_size": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModalityConfig("audio", encoder_config={"patch_size": 16})
        ModalityConfig("custom:spec", preprocessing={"modality": "audio"})


# -- compatibility with the former single class ------------------------------------------------

def _old_state(modality, **fields):
    """The ``__dict__`` a pickle of the former single class held: every field of every
    modality, the other modalities' at their neutral values."""
    state = {"modality": modality, "preset": None, "sample_rate": 16000, "n_mels": 80,
             "n_fft": 400, "hop_length": 160, "chunk_length_s": None, "padding": "none",
             "max_length_s": None, "truncation": True, "mono": True, "extra": {}, "size": None,
             "crop_size": None, "resize_mode": None, "filter": None, "mean": None, "std": None,
             "patch_size": None, "num_frames": None, "fps": None, "sampling": None,
             "min_frames": None, "max_frames": None, "temporal_patch": None,
             "tokenizer": None, "max_length": None, "padding_side": None, "add_eos": None}
    state.update(fields)
    return state


class _OldPickle:
    """Pickles as the former single class did: ``copyreg.__newobj__(PreprocessingConfig)``
    then the instance dict."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        import copyreg
        return copyreg.__newobj__, (PreprocessingConfig,), self.state


@pytest.mark.parametrize("modality, fields, expected", [
    ("image", {"preset": "clip", "size": 256}, {"modality": "image", "size": 256}),
    ("video", {"preset": "clip", "size": 224, "num_frames": 8, "sampling": "uniform",
               "min_frames": 4, "max_frames": 768, "temporal_patch": 2},
     {"modality": "video"}),
    ("text", {"tokenizer": "byte", "padding": "longest", "padding_side": "right"},
     {"modality": "text"}),
    ("audio", {"preset": "whisper", "chunk_length_s": 30.0, "padding": "max_length"},
     {"modality": "audio"}),
])
def test_pickles_of_the_former_single_class_load_as_their_modality(modality, fields, expected):
    import pickle
    # protocol 1 writes the call out (protocol 2+ refuses a stand-in for the class); loading
    # runs the same PreprocessingConfig.__new__(PreprocessingConfig) as an old NEWOBJ pickle
    old = pickle.loads(pickle.dumps(_OldPickle(_old_state(modality, **fields)), protocol=1))
    new = PreprocessingConfig(**expected)
    assert type(old) is type(new) and old == new and hash(old) == hash(new)
    assert old.to_dict() == new.to_dict() and old.digest() == new.digest()


def test_positional_fields_follow_the_former_order_with_a_warning():
    with pytest.warns(DeprecationWarning, match="by position") as rec:
        cfg = PreprocessingConfig("image", "siglip", 16000, 80, 400, 160, None, None, None,
                                  True, True, {}, 384)
    assert rec[0].filename == __file__                 # the warning names the caller's line
    assert type(cfg).__name__ == "ImagePreprocessingConfig"
    assert (cfg.preset, cfg.size) == ("siglip", 384)
    with pytest.warns(DeprecationWarning):
        assert PreprocessingConfig("text", None).tokenizer == "byte"   # None: the old preset
    with pytest.raises(ConfigError, match="'preset' by position and by name"), \
            pytest.warns(DeprecationWarning):
        PreprocessingConfig("image", "clip", preset="clip")


def test_dropped_field_warnings_name_the_callers_line():
    with pytest.warns(DeprecationWarning, match="sample_rate=8000 is ignored") as rec:
        PreprocessingConfig(modality="image", sample_rate=8000)
    assert rec[0].filename == __file__
    with pytest.warns(DeprecationWarning, match="sample_rate=8000 is ignored") as rec:
        PreprocessingConfig.from_dict({"modality": "image", "sample_rate": 8000})
    assert rec[0].filename == __file__


def test_names_importable_from_their_former_modules():
    from mmcore.config import ConfigError as E1  # noqa: F401
    from mmcore.model.io import MAX_HEADER_BYTES
    from mmcore.model.model import AttentionFusion, EncoderConfig  # noqa: F401
    from mmcore.model.tensor_io import MAX_HEADER_BYTES as current
    assert MAX_HEADER_BYTES == current and E1 is ConfigError
