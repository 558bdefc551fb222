"""Modality, the model configs (MultiModalConfig and its parts) and the fusion registry."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import sys

import numpy as np
import pytest

import mmcore
from mmcore.config import (
    AttentionFusion,
    CacheConfig,
    CachePolicy,
    CrossModalAttentionConfig,
    CustomFusion,
    EarlyFusion,
    EncoderConfig,
    FusionStrategy,
    LateFusion,
    MiddleFusion,
    ModalityConfig,
    ModalityMap,
    MultiModalConfig,
    PreprocessingConfig,
    get_fusion,
    register_fusion,
    registered_fusions,
    unregister_fusion,
)
from mmcore.errors import ConfigError, MMCoreError, ModalityError
from mmcore.modality import Modality

TEXT, IMAGE, AUDIO, VIDEO = Modality.TEXT, Modality.IMAGE, Modality.AUDIO, Modality.VIDEO

def _toml_available() -> bool:
    if sys.version_info >= (3, 11):
        return True
    import importlib.util
    return importlib.util.find_spec("tomli") is not None


toml_only = pytest.mark.skipif(not _toml_available(), reason="needs tomllib or tomli")


@pytest.fixture
def fusion_registry():
    """Names registered by a test are removed afterwards."""
    before = set(registered_fusions())
    yield
    for name in set(registered_fusions()) - before:
        unregister_fusion(name)


# ============================================================================================
# Modality

def test_builtin_modalities():
    assert [str(m) for m in Modality.builtins()] == ["text", "image", "audio", "video"]
    assert (TEXT.name, TEXT.is_custom, TEXT.id) == ("text", False, None)
    assert repr(AUDIO) == "Modality.AUDIO"
    for m in Modality.builtins():
        assert Modality.parse(str(m)) is m
        assert Modality(str(m)) is m
        assert Modality(m) is m


@pytest.mark.parametrize("text,expected", [
    ("text", "text"), ("IMAGE", "image"), (" audio ", "audio"), ("Video", "video"),
    ("custom:7", "custom:7"), ("custom:0", "custom:0"), ("CUSTOM:007", "custom:7"),
    ("custom:Depth", "custom:depth"), ("custom:lidar_v2.1-a", "custom:lidar_v2.1-a"),
    ("custom:_x", "custom:_x"), (f"custom:{2**31 - 1}", f"custom:{2**31 - 1}"),
])
def test_parse_round_trip(text, expected):
    m = Modality.parse(text)
    assert str(m) == expected and m.name == expected
    assert Modality.parse(str(m)) == m
    assert Modality.parse(str(m)).__hash__() == m.__hash__()


def test_custom_modalities():
    seven = Modality.custom(7)
    assert (str(seven), seven.is_custom, seven.id) == ("custom:7", True, 7)
    assert repr(seven) == "Modality.custom(7)"
    assert Modality.custom("7") == seven and Modality.custom(np.int64(7)) == seven
    assert type(Modality.custom(np.int32(7)).id) is int
    depth = Modality.custom("Depth")
    assert (str(depth), depth.id, repr(depth)) == ("custom:depth", "depth",
                                                   "Modality.custom('depth')")
    assert Modality.custom("text") != TEXT           # a name is never a built-in
    assert str(Modality.custom("text")) == "custom:text"


@pytest.mark.parametrize("bad", [-1, 2**31, True, False, 1.5, None, "", "1abc", "a b",
                                 "a:b", "x" * 65, "é", b"text", [1]])
def test_custom_rejects_bad_ids(bad):
    with pytest.raises(ModalityError) as info:
        Modality.custom(bad)
    assert isinstance(info.value, MMCoreError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", ["smell", "", "custom:", "custom:-1", "custom:a b", "texts",
                                 "custom 7", "custom:x:y"])
def test_parse_rejects_bad_strings(bad):
    with pytest.raises(ModalityError, match="modality"):
        Modality.parse(bad)


@pytest.mark.parametrize("bad", [3, None, 1.0, b"text", ("text",)])
def test_parse_and_constructor_reject_non_strings(bad):
    with pytest.raises(ModalityError):
        Modality.parse(bad)  # type: ignore[arg-type]
    with pytest.raises(ModalityError):
        Modality(bad)  # type: ignore[arg-type]


def test_equality_and_hashing():
    assert Modality.custom(3) == Modality.custom(3) and Modality.custom(3) is not Modality.custom(3)
    assert Modality.custom(3) != Modality.custom(4) and Modality.custom(3) != Modality.custom("c")
    assert hash(Modality.custom(3)) == hash(Modality.parse("custom:3"))
    # a modality is not a string: no accidental mixing of keys
    assert TEXT != "text" and "text" != TEXT and TEXT != 0
    d = {TEXT: 1, Modality.custom(3): 2, Modality.custom("x"): 3}
    assert d[Modality.parse("text")] == 1 and d[Modality.custom("3")] == 2
    assert d[Modality.custom("X")] == 3
    assert len({TEXT, Modality("text"), Modality.parse("TEXT"), IMAGE}) == 2


def test_ordering_is_deterministic():
    ms = [Modality.custom("b"), VIDEO, Modality.custom(10), TEXT, Modality.custom("a"),
          AUDIO, Modality.custom(2), IMAGE]
    expected = [TEXT, IMAGE, AUDIO, VIDEO, Modality.custom(2), Modality.custom(10),
                Modality.custom("a"), Modality.custom("b")]
    assert sorted(ms) == expected
    assert sorted(reversed(ms)) == expected
    assert TEXT < IMAGE <= IMAGE < Modality.custom(0) and VIDEO > AUDIO >= AUDIO
    assert max(ms) == Modality.custom("b") and min(ms) == TEXT
    with pytest.raises(TypeError):
        _ = TEXT < "image"  # type: ignore[operator]


def test_modality_is_immutable_and_pickles_to_singletons():
    with pytest.raises(AttributeError):
        TEXT._name = "image"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        TEXT.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        del TEXT._name
    assert pickle.loads(pickle.dumps(TEXT)) is TEXT
    assert pickle.loads(pickle.dumps(Modality.custom(5))) == Modality.custom(5)
    assert copy.copy(IMAGE) is IMAGE and copy.deepcopy(IMAGE) is IMAGE


def test_modality_in_json_as_strings():
    doc = json.dumps({str(m): 1 for m in [TEXT, Modality.custom(7)]})
    back = {Modality.parse(k): v for k, v in json.loads(doc).items()}
    assert back == {TEXT: 1, Modality.custom(7): 1}
    assert f"{VIDEO}" == "video"


def test_preprocessing_config_accepts_modality_objects():
    assert PreprocessingConfig(modality=IMAGE).modality == "image"
    assert PreprocessingConfig(modality=TEXT).tokenizer == "byte"


def test_modality_map():
    mm = ModalityMap([(VIDEO, "v"), ("text", "t"), (Modality.custom(1), "c")])
    assert list(mm) == [TEXT, VIDEO, Modality.custom(1)]
    assert mm["text"] == mm[TEXT] == "t" and mm["custom:1"] == "c"
    assert "video" in mm and VIDEO in mm and "audio" not in mm and "smell" not in mm
    assert 5 not in mm
    with pytest.raises(KeyError):
        mm["audio"]
    with pytest.raises(KeyError):
        mm["smell"]
    with pytest.raises(ModalityError, match="twice"):
        ModalityMap([("text", 1), (TEXT, 2)])
    with pytest.raises(AttributeError):
        mm.x = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        mm["text"] = "x"  # type: ignore[index]
    assert mm == {TEXT: "t", VIDEO: "v", Modality.custom(1): "c"}
    assert hash(mm) == hash(ModalityMap(dict(mm)))
    assert pickle.loads(pickle.dumps(mm)) == mm and copy.deepcopy(mm) == mm
    assert "'text': 't'" in repr(mm)


# ============================================================================================
# every ConfigError names its field

def _mods(**kw):
    """Two modalities, text and image, both 512 wide."""
    return [ModalityConfig(TEXT, **kw), ModalityConfig(IMAGE)]


BAD = [
    # EncoderConfig
    (EncoderConfig, dict(num_layers=-1), "num_layers"),
    (EncoderConfig, dict(num_layers=1.5), "num_layers"),
    (EncoderConfig, dict(num_heads=0), "num_heads"),
    (EncoderConfig, dict(num_heads=True), "num_heads"),
    (EncoderConfig, dict(hidden_dim=0), "hidden_dim"),
    (EncoderConfig, dict(hidden_dim=100), "hidden_dim"),           # not divisible by 8 heads
    (EncoderConfig, dict(mlp_ratio=0), "mlp_ratio"),
    (EncoderConfig, dict(mlp_ratio="4"), "mlp_ratio"),
    (EncoderConfig, dict(max_positions=0), "max_positions"),
    (EncoderConfig, dict(patch_size=True), "patch_size"),
    (EncoderConfig, dict(vocab_size=-5), "vocab_size"),
    (EncoderConfig, dict(activation="tanh"), "activation"),
    (EncoderConfig, dict(norm_eps=0.0), "norm_eps"),
    (EncoderConfig, dict(norm_eps=float("nan")), "norm_eps"),
    (EncoderConfig, dict(pooling="first"), "pooling"),
    (EncoderConfig, dict(extra=[1]), "extra"),
    # CachePolicy
    (CachePolicy, dict(policy="random"), "policy"),
    (CachePolicy, dict(policy=None), "policy"),
    (CachePolicy, dict(budget_bytes=0), "budget_bytes"),
    (CachePolicy, dict(budget_bytes=1.0), "budget_bytes"),
    (CachePolicy, dict(ttl_s=-1), "ttl_s"),
    (CachePolicy, dict(policy="ttl"), "ttl_s"),                     # ttl needs ttl_s
    (CachePolicy, dict(priority=1.5), "priority"),
    (CachePolicy, dict(priority=None), "priority"),
    (CachePolicy, dict(dtype="int8"), "dtype"),
    (CachePolicy, dict(enabled="yes"), "enabled"),
    # CacheConfig
    (CacheConfig, dict(enabled=1), "enabled"),
    (CacheConfig, dict(global_budget_bytes=0), "global_budget_bytes"),
    (CacheConfig, dict(default=5), "default"),
    (CacheConfig, dict(default={"policy": "x"}), "default"),
    (CacheConfig, dict(per_modality=[("text", CachePolicy())]), "per_modality"),
    (CacheConfig, dict(per_modality={"smell": CachePolicy()}), "per_modality"),
    (CacheConfig, dict(per_modality={"text": 3}), "per_modality['text']"),
    (CacheConfig, dict(per_modality={"text": {}, TEXT: {}}), "per_modality"),
    (CacheConfig, dict(global_budget_bytes=1000, default=CachePolicy(budget_bytes=2000)),
     "default.budget_bytes"),
    (CacheConfig, dict(global_budget_bytes=1000,
                       per_modality={"text": CachePolicy(budget_bytes=2000)}),
     "per_modality['text'].budget_bytes"),
    (CacheConfig, dict(global_budget_bytes=1000,
                       per_modality={"text": CachePolicy(budget_bytes=600),
                                     "image": CachePolicy(budget_bytes=600)}),
     "global_budget_bytes"),
    # ModalityConfig
    (ModalityConfig, dict(modality="smell"), "modality"),
    (ModalityConfig, dict(modality=None), "modality"),
    (ModalityConfig, dict(modality=3), "modality"),
    (ModalityConfig, dict(modality="text", enabled="no"), "enabled"),
    (ModalityConfig, dict(modality="text", required=1), "required"),
    (ModalityConfig, dict(modality="text", required=True, enabled=False), "enabled"),
    (ModalityConfig, dict(modality="text", preprocessing=5), "preprocessing"),
    (ModalityConfig, dict(modality="text", preprocessing=PreprocessingConfig()), "preprocessing"),
    (ModalityConfig, dict(modality="text", preprocessing={"modality": "image"}),
     "preprocessing"),
    (ModalityConfig, dict(modality="audio", preprocessing={"n_mels": 0}), "preprocessing"),
    (ModalityConfig, dict(modality="custom:1", preprocessing={"n_mels": 64}), "preprocessing"),
    (ModalityConfig, dict(modality="text", encoder="torch"), "encoder"),
    (ModalityConfig, dict(modality="text", embed_dim=0), "embed_dim"),
    (ModalityConfig, dict(modality="text", embed_dim=512.0), "embed_dim"),
    (ModalityConfig, dict(modality="text", encoder_config=3), "encoder_config"),
    (ModalityConfig, dict(modality="text", encoder_config={"num_heads": 0}), "encoder_config"),
    (ModalityConfig, dict(modality="text", encoder_config={"heads": 8}), "encoder_config"),
    (ModalityConfig, dict(modality="text", priority="high"), "priority"),
    (ModalityConfig, dict(modality="text", quantization="int4"), "quantization"),
    (ModalityConfig, dict(modality="text", quantization="int8", encoder="external"),
     "quantization"),
    (ModalityConfig, dict(modality="text", cache=5), "cache"),
    (ModalityConfig, dict(modality="text", cache={"policy": "mru"}), "cache"),
    (ModalityConfig, dict(modality="text", extra={1: 2}), "extra"),
    (ModalityConfig, dict(modality="text", embed_dim=100), "encoder_config.num_heads"),
    (ModalityConfig, dict(modality="image", encoder_config={"vocab_size": 100}),
     "encoder_config.vocab_size"),
    (ModalityConfig, dict(modality="text", encoder_config={"patch_size": 16}),
     "encoder_config.patch_size"),
    (ModalityConfig, dict(modality="image", preprocessing={"patch_size": 14},
                          encoder_config={"patch_size": 16}), "encoder_config.patch_size"),
    # CrossModalAttentionConfig
    (CrossModalAttentionConfig, dict(num_heads=0), "num_heads"),
    (CrossModalAttentionConfig, dict(head_dim=0), "head_dim"),
    (CrossModalAttentionConfig, dict(head_dim=64.0), "head_dim"),
    (CrossModalAttentionConfig, dict(dropout=1.0), "dropout"),
    (CrossModalAttentionConfig, dict(dropout=-0.1), "dropout"),
    (CrossModalAttentionConfig, dict(dropout=float("nan")), "dropout"),
    (CrossModalAttentionConfig, dict(dropout="0.1"), "dropout"),
    (CrossModalAttentionConfig, dict(temperature=0), "temperature"),
    (CrossModalAttentionConfig, dict(temperature=float("inf")), "temperature"),
    (CrossModalAttentionConfig, dict(scale=-1.0), "scale"),
    (CrossModalAttentionConfig, dict(return_weights="no"), "return_weights"),
    (CrossModalAttentionConfig, dict(pairs="some"), "pairs"),
    (CrossModalAttentionConfig, dict(pairs=[]), "pairs"),
    (CrossModalAttentionConfig, dict(pairs=5), "pairs"),
    (CrossModalAttentionConfig, dict(pairs=[("text",)]), "pairs[0]"),
    (CrossModalAttentionConfig, dict(pairs=["text"]), "pairs[0]"),
    (CrossModalAttentionConfig, dict(pairs=[("text", "text")]), "pairs[0]"),
    (CrossModalAttentionConfig, dict(pairs=["image->image"]), "pairs[0]"),
    (CrossModalAttentionConfig, dict(pairs=[("text", "smell")]), "pairs[0]"),
    (CrossModalAttentionConfig, dict(pairs=[("text", "image"), ["text", "image"]]), "pairs[1]"),
    # fusion strategies
    (MiddleFusion, dict(fusion_layer=-1), "fusion_layer"),
    (MiddleFusion, dict(fusion_layer="2"), "fusion_layer"),
    (LateFusion, dict(reduce="median"), "reduce"),
    (LateFusion, dict(reduce=None), "reduce"),
    (LateFusion, dict(weights={"text": 1.0}), "weights"),            # needs reduce="weighted"
    (LateFusion, dict(reduce="weighted", weights={}), "weights"),
    (LateFusion, dict(reduce="weighted", weights=[1, 2]), "weights"),
    (LateFusion, dict(reduce="weighted", weights={"text": -1}), "weights['text']"),
    (LateFusion, dict(reduce="weighted", weights={"text": float("inf")}), "weights['text']"),
    (LateFusion, dict(reduce="weighted", weights={"text": True}), "weights['text']"),
    (LateFusion, dict(reduce="weighted", weights={"text": 0, "image": 0.0}), "weights"),
    (LateFusion, dict(reduce="weighted", weights={"smell": 1}), "weights"),
    (LateFusion, dict(reduce="weighted", weights={"text": 1, TEXT: 2}), "weights"),
    (AttentionFusion, dict(attention_dim=0), "attention_dim"),
    (AttentionFusion, dict(num_heads=0), "num_heads"),
    (AttentionFusion, dict(attention_dim=100), "attention_dim"),
    (CustomFusion, dict(fn=5), "fn"),
    (CustomFusion, dict(fn="not_registered_anywhere"), "fn"),
    (CustomFusion, dict(fn=len, options={1: 2}), "options"),
    # MultiModalConfig: fields
    (MultiModalConfig, dict(modalities="text"), "modalities"),
    (MultiModalConfig, dict(modalities=[]), "modalities"),
    (MultiModalConfig, dict(modalities={}), "modalities"),
    (MultiModalConfig, dict(modalities=[5]), "modalities[0]"),
    (MultiModalConfig, dict(modalities=[{"embed_dim": 64}]), "modalities[0]"),
    (MultiModalConfig, dict(modalities={"smell": {}}), "modalities"),
    (MultiModalConfig, dict(modalities={"text": 5}), "modalities['text']"),
    (MultiModalConfig, dict(modalities={"text": {"embed_dim": -1}}), "modalities['text']"),
    (MultiModalConfig, dict(modalities={"text": {"modality": "image"}}),
     "modalities['text'].modality"),
    (MultiModalConfig, dict(modalities={"text": ModalityConfig(IMAGE)}),
     "modalities['text'].modality"),
    (MultiModalConfig, dict(modalities=[ModalityConfig(TEXT), {"modality": "text"}]),
     "modalities"),
    (MultiModalConfig, dict(modalities={"text": {}, TEXT: {}}), "modalities"),
    (MultiModalConfig, dict(modalities=[ModalityConfig(TEXT, enabled=False)]), "modalities"),
    (MultiModalConfig, dict(modalities=_mods(), fusion="median"), "fusion"),
    (MultiModalConfig, dict(modalities=_mods(), fusion="middle"), "fusion"),
    (MultiModalConfig, dict(modalities=_mods(), fusion=5), "fusion"),
    (MultiModalConfig, dict(modalities=_mods(), fusion={"reduce": "max"}), "fusion"),
    (MultiModalConfig, dict(modalities=_mods(), fusion={"type": "x"}), "fusion"),
    (MultiModalConfig, dict(modalities=_mods(), fusion={"type": "late", "reduce": "x"}),
     "fusion"),
    (MultiModalConfig, dict(modalities=_mods(), cross_attention=5), "cross_attention"),
    (MultiModalConfig, dict(modalities=_mods(), cross_attention={"num_heads": 0}),
     "cross_attention"),
    (MultiModalConfig, dict(modalities=_mods(), fused_dim=0), "fused_dim"),
    (MultiModalConfig, dict(modalities=_mods(), cache=5), "cache"),
    (MultiModalConfig, dict(modalities=_mods(), name=""), "name"),
    (MultiModalConfig, dict(modalities=_mods(), name=None), "name"),
    (MultiModalConfig, dict(modalities=_mods(), version=1), "version"),
    (MultiModalConfig, dict(modalities=_mods(), extra=[]), "extra"),
    # MultiModalConfig: cross-field
    (MultiModalConfig, dict(modalities=_mods(), cross_attention=CrossModalAttentionConfig(
        pairs=[("text", "audio")])), "cross_attention.pairs"),
    (MultiModalConfig, dict(modalities=[ModalityConfig(TEXT, embed_dim=96,
                                                       encoder_config={"num_heads": 4}),
                                        ModalityConfig(IMAGE, embed_dim=96,
                                                       encoder_config={"num_heads": 4})],
                            cross_attention=CrossModalAttentionConfig(num_heads=5, pairs="all")),
     "cross_attention.num_heads"),
    (MultiModalConfig, dict(modalities=_mods(), fusion=MiddleFusion(fusion_layer=5)),
     "fusion.fusion_layer"),
    (MultiModalConfig, dict(modalities=[ModalityConfig(TEXT, encoder="onnx"),
                                        ModalityConfig(IMAGE)],
                            fusion=MiddleFusion(fusion_layer=1)), "fusion"),
    (MultiModalConfig, dict(modalities=_mods(), fusion=LateFusion(
        reduce="weighted", weights={"audio": 1.0})), "fusion.weights"),
    (MultiModalConfig, dict(modalities=[ModalityConfig(TEXT), ModalityConfig(IMAGE,
                                                                             embed_dim=768)]),
     "fused_dim"),
    (MultiModalConfig, dict(modalities=_mods(), cache=CacheConfig(
        per_modality={"audio": CachePolicy()})), "cache.per_modality"),
    (MultiModalConfig, dict(modalities=_mods(cache=CachePolicy()), cache=CacheConfig(
        per_modality={"text": CachePolicy()})), "modalities['text'].cache"),
    (MultiModalConfig, dict(modalities=_mods(cache=CachePolicy(budget_bytes=2000)),
                            cache=CacheConfig(global_budget_bytes=1000)),
     "modalities['text'].cache.budget_bytes"),
    (MultiModalConfig, dict(modalities=_mods(cache=CachePolicy(budget_bytes=600)),
                            cache=CacheConfig(global_budget_bytes=1000, per_modality={
                                "image": CachePolicy(budget_bytes=600)})),
     "cache.global_budget_bytes"),
]


@pytest.mark.parametrize("cls,kwargs,field", BAD,
                         ids=[f"{c.__name__}-{f}-{i}" for i, (c, _, f) in enumerate(BAD)])
def test_bad_value_names_its_field(cls, kwargs, field):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    msg = str(info.value)
    assert f"{cls.__name__}.{field}" in msg, msg
    assert isinstance(info.value, MMCoreError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("cls,kwargs,inner", [
    (ModalityConfig, dict(modality="audio", preprocessing={"n_mels": 0}),
     "PreprocessingConfig.n_mels"),
    (ModalityConfig, dict(modality="text", encoder_config={"num_heads": 0}),
     "EncoderConfig.num_heads"),
    (CacheConfig, dict(default={"policy": "x"}), "CachePolicy.policy"),
    (MultiModalConfig, dict(modalities={"text": {"embed_dim": -1}}), "ModalityConfig.embed_dim"),
    (MultiModalConfig, dict(modalities=_mods(), fusion={"type": "late", "reduce": "x"}),
     "LateFusion.reduce"),
])
def test_nested_errors_name_the_inner_field_too(cls, kwargs, inner):
    with pytest.raises(ConfigError, match=inner.replace(".", r"\.")):
        cls(**kwargs)


def test_from_dict_missing_required_field_and_unknown_key():
    with pytest.raises(ConfigError, match=r"ModalityConfig\.modality is required"):
        ModalityConfig.from_dict({"embed_dim": 64})
    with pytest.raises(ConfigError, match=r"MultiModalConfig\.modalities is required"):
        MultiModalConfig.from_dict({})
    with pytest.raises(ConfigError, match=r"MiddleFusion\.fusion_layer is required"):
        FusionStrategy.from_dict({"type": "middle"})
    with pytest.raises(ConfigError, match="'embed_size'"):
        ModalityConfig.from_dict({"modality": "text", "embed_size": 64})
    with pytest.raises(ConfigError, match="'layers'"):
        EncoderConfig.from_dict({"layers": 2})


# ============================================================================================
# defaults and normalization

def test_modality_config_defaults():
    mc = ModalityConfig("text")
    assert mc.modality is TEXT and mc.enabled and not mc.required
    assert mc.preprocessing == PreprocessingConfig(modality="text")
    assert (mc.encoder, mc.embed_dim, mc.priority, mc.quantization, mc.cache) == (
        "builtin", 512, 0, None, None)
    assert mc.encoder_config == EncoderConfig()
    for m in Modality.builtins():
        assert ModalityConfig(m).preprocessing.modality == str(m)
    assert ModalityConfig(Modality.custom(2)).preprocessing is None
    assert ModalityConfig("image", preprocessing=None).preprocessing is None


def test_modality_config_normalizes():
    mc = ModalityConfig("IMAGE", encoder="ONNX", quantization="BFloat16", embed_dim=np.int64(768),
                        encoder_config={"num_heads": 12, "patch_size": 16},
                        preprocessing={"preset": "siglip", "size": 384, "patch_size": 16},
                        cache={"policy": "LFU"}, priority=np.int32(-3))
    assert mc.modality is IMAGE and mc.encoder == "onnx" and mc.quantization == "bfloat16"
    assert type(mc.embed_dim) is int and mc.embed_dim == 768 and mc.priority == -3
    assert isinstance(mc.encoder_config, EncoderConfig) and mc.encoder_config.num_heads == 12
    assert isinstance(mc.preprocessing, PreprocessingConfig)
    assert (mc.preprocessing.modality, mc.preprocessing.size) == ("image", 384)
    assert mc.cache == CachePolicy(policy="lfu")
    # a custom modality may borrow a preprocessor, named in the mapping
    ecg = ModalityConfig("custom:ecg", preprocessing={"modality": "audio", "preset": None})
    assert ecg.preprocessing.modality == "audio" and ecg.preprocessing.preset is None
    # hidden_dim decides the head split of a builtin encoder
    ModalityConfig("text", embed_dim=100, encoder_config={"hidden_dim": 128})
    # non-builtin encoders do not need heads that divide embed_dim
    ModalityConfig("text", embed_dim=100, encoder="external")


@pytest.mark.parametrize("q", [None, "float16", "bfloat16", "int8"])
def test_quantization_choices(q):
    assert ModalityConfig("audio", quantization=q).quantization == q
    assert ModalityConfig("audio", quantization=q, encoder="remote").quantization == q


# the digests and the JSON of configs without matmul_precision, as written before the field
# existed (the field is left out of to_dict while None, so they are unchanged)
_DIGEST_TEXT = "7fb8fa4d817ca83eb1cd4d334360cf0f926737239fd24e28330ff35e68fb9946"
_DIGEST_IMAGE_INT8 = "e408936ab95619f8d59cde176aa026bc4c356e876a68f470fbbf8053769f737c"


@pytest.mark.parametrize("p", [None, "highest", "bf16", "int8"])
def test_matmul_precision_choices(p):
    for enc in ("builtin", "external", "remote"):
        mc = ModalityConfig("audio", encoder=enc, matmul_precision=p)
        assert mc.matmul_precision == p
    assert ModalityConfig("text", matmul_precision=p.upper() if p else p).matmul_precision == p
    assert ModalityConfig.MATMUL_PRECISIONS == mmcore._precision.PRECISIONS


@pytest.mark.parametrize("bad", ["fp16", "float32", "", "int4", 8, True, ["int8"], b"int8"])
def test_matmul_precision_rejects_other_values(bad):
    with pytest.raises(ConfigError, match=r"^ModalityConfig\.matmul_precision must be one of "
                       r"'highest' \| 'bf16' \| 'int8' \| None, got "):
        ModalityConfig("text", matmul_precision=bad)
    with pytest.raises(ConfigError, match=r"ModalityConfig\.matmul_precision"):
        MultiModalConfig({"text": {"matmul_precision": bad}})
    with pytest.raises(ConfigError, match=r"ModalityConfig\.matmul_precision"):
        ModalityConfig("text").replace(matmul_precision=bad)


def test_matmul_precision_not_for_onnx_encoders():
    with pytest.raises(ConfigError, match=r"ModalityConfig\.matmul_precision applies to "
                       r"'builtin', 'external' and 'remote' encoders, not encoder='onnx'"):
        ModalityConfig("image", encoder="onnx", matmul_precision="bf16")
    assert ModalityConfig("image", encoder="onnx").matmul_precision is None


def test_matmul_precision_keeps_old_files_and_digests(tmp_path):
    plain = ModalityConfig("text")
    assert plain.matmul_precision is None and "matmul_precision" not in plain.to_dict()
    assert plain.digest() == _DIGEST_TEXT
    assert ModalityConfig("image", embed_dim=768, quantization="int8").digest() == \
        _DIGEST_IMAGE_INT8
    # a file written before the field existed loads, with the field None
    old = {k: v for k, v in plain.to_dict().items()}
    (tmp_path / "old.json").write_text(json.dumps(old), encoding="utf-8")
    assert ModalityConfig.from_json(tmp_path / "old.json") == plain
    cfg = MultiModalConfig([plain, ModalityConfig("image")])
    assert all("matmul_precision" not in v for v in cfg.to_dict()["modalities"].values())


@pytest.mark.parametrize("p", ["highest", "bf16", "int8"])
def test_matmul_precision_round_trips_and_changes_the_digest(p, tmp_path):
    mc = ModalityConfig("text", matmul_precision=p)
    assert mc.to_dict()["matmul_precision"] == p
    assert ModalityConfig.from_dict(mc.to_dict()) == mc
    assert mc.digest() != _DIGEST_TEXT and mc != ModalityConfig("text")
    assert hash(mc) != hash(ModalityConfig("text"))
    others = {ModalityConfig("text", matmul_precision=q).digest() for q in ("highest", "bf16",
                                                                            "int8")}
    assert len(others) == 3
    mc.to_json(tmp_path / "m.json")
    assert ModalityConfig.from_json(tmp_path / "m.json") == mc
    cfg = MultiModalConfig([mc, ModalityConfig("image")])
    assert MultiModalConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert cfg.digest() != MultiModalConfig([ModalityConfig("text"),
                                             ModalityConfig("image")]).digest()
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    # with_enabled keeps it
    assert cfg.with_enabled("image", False).modality_config("text").matmul_precision == p
    if _toml_available():
        cfg.to_toml(tmp_path / "m.toml")
        assert MultiModalConfig.from_toml(tmp_path / "m.toml") == cfg
        mc.to_toml(tmp_path / "one.toml")
        assert ModalityConfig.from_toml(tmp_path / "one.toml") == mc


@toml_only
def test_matmul_precision_in_hand_written_toml(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('''
[modalities.text]
matmul_precision = "INT8"
[modalities.image]
matmul_precision = "none"
[modalities.audio]
''', encoding="utf-8")
    cfg = MultiModalConfig.from_toml(path)
    assert [cfg.modality_config(m).matmul_precision for m in ("text", "image", "audio")] == [
        "int8", None, None]


def test_configs_are_frozen_and_replace_revalidates():
    mc = ModalityConfig("text")
    with pytest.raises(dataclasses.FrozenInstanceError):
        mc.embed_dim = 3  # type: ignore[misc]
    assert mc.replace(embed_dim=256).embed_dim == 256
    with pytest.raises(ConfigError, match=r"ModalityConfig\.embed_dim"):
        mc.replace(embed_dim=0)
    cfg = MultiModalConfig(_mods())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fused_dim = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.modalities[TEXT] = mc  # type: ignore[index]
    assert cfg.replace(fused_dim=256).fused_dim == 256


def test_modalities_in_canonical_order_however_written():
    a = MultiModalConfig([ModalityConfig(VIDEO), ModalityConfig(Modality.custom(1)),
                          ModalityConfig(TEXT), ModalityConfig(AUDIO)])
    b = MultiModalConfig({"audio": {}, "custom:1": {}, "text": {}, "video": {}})
    assert list(a.modalities) == [TEXT, AUDIO, VIDEO, Modality.custom(1)]
    assert a == b and hash(a) == hash(b)
    assert list(a.to_dict()["modalities"]) == ["text", "audio", "video", "custom:1"]
    assert isinstance(a.modalities, ModalityMap)
    assert a.modalities["text"] is a.modality_config(TEXT)


def test_cross_attention_pairs_and_dims():
    ca = CrossModalAttentionConfig(pairs=[["image", "text"], "audio -> image",
                                          (Modality.custom(1), TEXT)])
    assert ca.pairs == ((IMAGE, TEXT), (AUDIO, IMAGE), (Modality.custom(1), TEXT))
    assert ca.to_dict()["pairs"] == [["image", "text"], ["audio", "image"], ["custom:1", "text"]]
    assert ca.resolve_pairs([TEXT, IMAGE]) == ((IMAGE, TEXT),)
    assert CrossModalAttentionConfig(pairs="ALL").pairs == "all"
    everything = CrossModalAttentionConfig().resolve_pairs(["audio", "text", "image"])
    assert everything == ((TEXT, IMAGE), (TEXT, AUDIO), (IMAGE, TEXT), (IMAGE, AUDIO),
                          (AUDIO, TEXT), (AUDIO, IMAGE))
    assert CrossModalAttentionConfig().resolve_pairs(["text"]) == ()
    assert CrossModalAttentionConfig(num_heads=8).inner_dim(768) == 768
    assert CrossModalAttentionConfig(num_heads=4, head_dim=32).inner_dim(768) == 128
    d = CrossModalAttentionConfig(dropout=0.25, temperature=0.5, scale=0.1)
    assert (d.dropout, d.temperature, d.scale, d.return_weights) == (0.25, 0.5, 0.1, False)


def test_cache_config():
    cfg = CacheConfig(global_budget_bytes=1000, per_modality={
        "text": {"budget_bytes": 400}, IMAGE: CachePolicy(policy="ttl", ttl_s=2, dtype="float16")})
    assert list(cfg.per_modality) == [TEXT, IMAGE]
    assert cfg.policy_for("text").budget_bytes == 400 and cfg.policy_for(IMAGE).ttl_s == 2.0
    assert cfg.policy_for(AUDIO) is cfg.default
    assert CachePolicy(ttl_s=3).ttl_s == 3.0                # an age limit for lru too
    for p in CachePolicy.POLICIES:
        assert CachePolicy(policy=p, ttl_s=1.0).policy == p


# ============================================================================================
# cross-field validation (accepted cases) and run-time helpers

def test_fused_dim_rules():
    # differing widths: fine with fused_dim, and with concat without it
    mixed = [ModalityConfig(TEXT), ModalityConfig(IMAGE, embed_dim=768)]
    with_fused = MultiModalConfig(mixed, fused_dim=256)
    assert with_fused.common_dim == with_fused.output_dim == 256
    concat = MultiModalConfig(mixed, fusion=LateFusion(reduce="concat"))
    assert concat.common_dim is None and concat.output_dim == 512 + 768
    concat_fused = MultiModalConfig(mixed, fusion={"type": "late", "reduce": "concat"},
                                    fused_dim=128)
    assert concat_fused.output_dim == 256
    same = MultiModalConfig(_mods())
    assert same.common_dim == same.output_dim == 512
    # a disabled modality keeps its place in the concat width
    assert concat.with_enabled(IMAGE, False).output_dim == 512 + 768


def test_cross_field_accepted_cases():
    heads = [ModalityConfig(TEXT, embed_dim=96, encoder_config={"num_heads": 4}),
             ModalityConfig(IMAGE, embed_dim=96, encoder_config={"num_heads": 4})]
    # an explicit head_dim does not need to divide the embed dims
    MultiModalConfig(heads, cross_attention=CrossModalAttentionConfig(num_heads=5, head_dim=20))
    # only query modalities of the pairs are checked
    mixed = [ModalityConfig(TEXT, embed_dim=96, encoder_config={"num_heads": 4}),
             ModalityConfig(IMAGE, embed_dim=64)]
    MultiModalConfig(mixed, fused_dim=64,
                     cross_attention=CrossModalAttentionConfig(num_heads=32, pairs=[("image",
                                                                                    "text")]))
    # middle fusion up to the shallowest encoder
    deep = [ModalityConfig(TEXT, encoder_config={"num_layers": 6}),
            ModalityConfig(IMAGE, encoder_config={"num_layers": 3})]
    assert MultiModalConfig(deep, fusion=MiddleFusion(fusion_layer=3)).fusion.fusion_layer == 3
    assert MultiModalConfig(deep, fusion=MiddleFusion(fusion_layer=0)).fusion.fusion_layer == 0
    with pytest.raises(ConfigError, match=r"MultiModalConfig\.fusion\.fusion_layer.*'image'"):
        MultiModalConfig(deep, fusion=MiddleFusion(fusion_layer=4))
    # the checks cover disabled modalities too, so enabling them later stays valid
    off = [ModalityConfig(TEXT), ModalityConfig(AUDIO, enabled=False,
                                                encoder_config={"num_layers": 1})]
    with pytest.raises(ConfigError, match="fusion_layer"):
        MultiModalConfig(off, fusion=MiddleFusion(fusion_layer=2))
    # budgets that fit
    MultiModalConfig(_mods(cache=CachePolicy(budget_bytes=500)),
                     cache=CacheConfig(global_budget_bytes=1000,
                                       per_modality={"image": CachePolicy(budget_bytes=500)}))


def test_enabled_modalities_and_with_enabled():
    cfg = MultiModalConfig([ModalityConfig(TEXT, required=True), ModalityConfig(IMAGE),
                            ModalityConfig(AUDIO, enabled=False)],
                           cross_attention=CrossModalAttentionConfig())
    assert cfg.enabled_modalities() == (TEXT, IMAGE)
    assert cfg.is_enabled("text") and not cfg.is_enabled(AUDIO) and not cfg.is_enabled("video")
    assert not cfg.is_enabled("smell")
    assert cfg.cross_attention_pairs() == ((TEXT, IMAGE), (IMAGE, TEXT))
    assert len(cfg.cross_attention_pairs(enabled_only=False)) == 6

    on = cfg.with_enabled("audio", True)
    assert on.enabled_modalities() == (TEXT, IMAGE, AUDIO)
    assert cfg.enabled_modalities() == (TEXT, IMAGE)          # the original is unchanged
    assert on.with_enabled(AUDIO, False) == cfg
    assert cfg.with_enabled(IMAGE, True) == cfg                # already enabled: same config
    only_text = cfg.with_enabled(IMAGE, False)
    assert only_text.enabled_modalities() == (TEXT,) and only_text.cross_attention_pairs() == ()

    with pytest.raises(ModalityError, match="'video' is not configured"):
        cfg.with_enabled(VIDEO, True)
    with pytest.raises(ModalityError):
        cfg.modality_config("custom:9")
    with pytest.raises(ConfigError, match=r"ModalityConfig\.enabled.*required"):
        cfg.with_enabled(TEXT, False)
    single = MultiModalConfig([ModalityConfig(TEXT)])
    with pytest.raises(ConfigError, match=r"MultiModalConfig\.modalities.*enabled"):
        single.with_enabled(TEXT, False)
    with pytest.raises(ConfigError, match=r"ModalityConfig\.enabled"):
        cfg.with_enabled(IMAGE, "no")  # type: ignore[arg-type]


def test_cache_policy_resolution():
    own = CachePolicy(policy="fifo")
    shared = CachePolicy(policy="lfu")
    cfg = MultiModalConfig(_mods(cache=own) + [ModalityConfig(AUDIO)],
                           cache={"per_modality": {"image": shared}})
    assert cfg.cache_policy(TEXT) is own
    assert cfg.cache_policy("image") == shared
    assert cfg.cache_policy(AUDIO) == cfg.cache.default == CachePolicy()


# ============================================================================================
# fusion strategies: tagging and the registry

@pytest.mark.parametrize("strategy,tagged", [
    (EarlyFusion(), {"type": "early"}),
    (MiddleFusion(fusion_layer=3), {"type": "middle", "fusion_layer": 3}),
    (LateFusion(), {"type": "late", "reduce": "mean", "weights": None}),
    (LateFusion(reduce="weighted", weights={"image": 1, "text": 0.5}),
     {"type": "late", "reduce": "weighted", "weights": {"text": 0.5, "image": 1.0}}),
    (AttentionFusion(attention_dim=256, num_heads=4),
     {"type": "attention", "attention_dim": 256, "num_heads": 4}),
])
def test_fusion_tagged_round_trip(strategy, tagged):
    d = strategy.to_dict()
    assert d == tagged and next(iter(d)) == "type"
    assert json.loads(json.dumps(d)) == d
    back = FusionStrategy.from_dict(d)
    assert type(back) is type(strategy) and back == strategy and hash(back) == hash(strategy)
    assert type(strategy).from_dict(d) == strategy                     # tag matches
    untagged = {k: v for k, v in d.items() if k != "type"}
    assert type(strategy).from_dict(untagged) == strategy               # tag optional there
    assert isinstance(strategy, FusionStrategy)


def test_fusion_tag_errors():
    assert FusionStrategy.types() == ("early", "middle", "late", "attention", "custom")
    with pytest.raises(ConfigError, match=r"FusionStrategy\.type is missing"):
        FusionStrategy.from_dict({"reduce": "max"})
    with pytest.raises(ConfigError, match=r"FusionStrategy\.type must be one of"):
        FusionStrategy.from_dict({"type": "fancy"})
    with pytest.raises(ConfigError, match=r"LateFusion\.type must be 'late'"):
        LateFusion.from_dict({"type": "early"})
    with pytest.raises(ConfigError, match=r"LateFusion\.type must be one of"):
        LateFusion.from_dict({"type": 3})
    with pytest.raises(ConfigError, match="mapping"):
        FusionStrategy.from_dict(["late"])
    with pytest.raises(TypeError, match="abstract"):
        FusionStrategy()
    assert FusionStrategy.from_dict({"type": "LATE"}) == LateFusion()
    assert FusionStrategy.from_name("attention") == AttentionFusion()
    with pytest.raises(ConfigError, match="needs arguments"):
        FusionStrategy.from_name("middle")


def test_fusion_given_as_tag_or_mapping():
    assert MultiModalConfig(_mods(), fusion="early").fusion == EarlyFusion()
    assert MultiModalConfig(_mods(), fusion="Attention").fusion == AttentionFusion()
    assert MultiModalConfig(_mods()).fusion == LateFusion()
    cfg = MultiModalConfig(_mods(), fusion={"type": "middle", "fusion_layer": 2})
    assert cfg.fusion == MiddleFusion(fusion_layer=2)


def test_register_fusion(fusion_registry):
    def gate(embeddings, **options):
        return embeddings

    assert register_fusion("gate", gate) is gate
    assert get_fusion("gate") is gate and "gate" in registered_fusions()
    assert register_fusion("gate", gate) is gate                       # same function: no-op
    with pytest.raises(ConfigError, match="already registered"):
        register_fusion("gate", len)
    register_fusion("gate", len, overwrite=True)
    assert get_fusion("gate") is len
    register_fusion("gate", gate, overwrite=True)

    @register_fusion("decorated")
    def decorated(embeddings):
        return embeddings

    assert get_fusion("decorated") is decorated
    for bad in ("", " pad", None, 3):
        with pytest.raises(ConfigError, match=r"register_fusion\.name"):
            register_fusion(bad, gate)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"register_fusion\.fn"):
        register_fusion("x", 5)  # type: ignore[arg-type]
    assert unregister_fusion("decorated") is decorated
    with pytest.raises(ConfigError, match="not registered"):
        unregister_fusion("decorated")
    with pytest.raises(ConfigError, match="not registered"):
        get_fusion("decorated")


def test_custom_fusion_by_name_and_callable(fusion_registry):
    def gate(embeddings, **options):
        return embeddings

    register_fusion("gate", gate)
    by_name = CustomFusion("gate", options={"alpha": 0.5})
    by_fn = CustomFusion(gate, options={"alpha": 0.5})
    assert by_fn.fn == "gate" and by_fn == by_name and hash(by_fn) == hash(by_name)
    assert by_name.resolve() is gate and by_name.name == "gate"
    d = by_fn.to_dict()
    assert d == {"type": "custom", "fn": "gate", "options": {"alpha": 0.5}}
    assert FusionStrategy.from_dict(d) == by_fn
    cfg = MultiModalConfig(_mods(), fusion=by_fn)
    assert MultiModalConfig.from_dict(cfg.to_dict()) == cfg

    # a bound method is a new object on each access, still found by equality
    class Holder:
        def fuse(self, embeddings):
            return embeddings

    h = Holder()
    register_fusion("method", h.fuse)
    assert CustomFusion(h.fuse).fn == "method"


def test_custom_fusion_unregistered_callable(fusion_registry):
    def private(embeddings):
        return embeddings

    cf = CustomFusion(private)
    assert cf.fn is private and cf.name is None and cf.resolve() is private
    assert hash(cf) == hash(CustomFusion(private))
    with pytest.raises(ConfigError, match=r"CustomFusion\.fn.*not registered"):
        cf.to_dict()
    cfg = MultiModalConfig(_mods(), fusion=cf)          # usable in memory, hashable
    assert hash(cfg) == hash(MultiModalConfig(_mods(), fusion=CustomFusion(private)))
    with pytest.raises(ConfigError, match=r"CustomFusion\.fn"):
        cfg.to_dict()
    register_fusion("private", private)                 # registering later makes it savable
    assert cf.to_dict()["fn"] == "private"
    unregister_fusion("private")
    with pytest.raises(ConfigError, match=r"CustomFusion\.fn: fusion 'private' is not registered"):
        FusionStrategy.from_dict({"type": "custom", "fn": "private"})


def test_custom_fusion_name_unregistered_after_construction(fusion_registry):
    register_fusion("temp", len)
    cf = CustomFusion("temp")
    unregister_fusion("temp")
    with pytest.raises(ConfigError, match=r"CustomFusion\.fn"):
        cf.resolve()
    assert cf.to_dict()["fn"] == "temp"                 # the name is still what was configured


# ============================================================================================
# round trips: dicts, JSON and TOML files

def _full_config():
    return MultiModalConfig(
        [ModalityConfig(VIDEO, embed_dim=256, quantization="int8", priority=2,
                        encoder_config=EncoderConfig(num_layers=6, patch_size=14, hidden_dim=384,
                                                     extra={"tubelet": 2}),
                        preprocessing={"patch_size": 14, "crop_size": 224, "mean": [0.5] * 3,
                                       "std": (0.25, 0.25, 0.25)},
                        cache=CachePolicy(policy="ttl", ttl_s=5, budget_bytes=1000)),
         ModalityConfig(TEXT, embed_dim=256, required=True,
                        encoder_config={"vocab_size": 259, "max_positions": 1024,
                                        "activation": "gelu_tanh", "pooling": "cls"},
                        preprocessing={"max_length": 64, "padding": "max_length"},
                        extra={"a": [1, {"b": "x"}], "quote": 'say "hi"\n\ttab \\ \x7f é'},
                        matmul_precision="int8"),
         ModalityConfig(Modality.custom("ecg"), embed_dim=128, encoder="external",
                        preprocessing={"modality": "audio", "preset": None, "n_mels": 64}),
         ModalityConfig(Modality.custom(3), embed_dim=256, enabled=False, encoder="remote",
                        preprocessing=None, quantization="float16"),
         ModalityConfig(AUDIO, embed_dim=256, quantization="bfloat16", matmul_precision="bf16",
                        preprocessing={"preset": "fbank", "max_length_s": 12.5})],
        fusion=LateFusion(reduce="weighted", weights={"text": 2, "video": 1, "custom:ecg": 0.5}),
        cross_attention=CrossModalAttentionConfig(num_heads=4, pairs=["text->video",
                                                                      ("custom:3", "text")],
                                                  dropout=0.1, temperature=0.07,
                                                  return_weights=True),
        fused_dim=256,
        cache=CacheConfig(global_budget_bytes=10**6, default=CachePolicy(dtype="float16"),
                          per_modality={"text": CachePolicy(budget_bytes=500, priority=-1)}),
        name="my-model", version="2.1.0", extra={"notes": "x", "n": 1.5})


CONFIGS = [
    lambda: MultiModalConfig([ModalityConfig(TEXT)]),
    lambda: MultiModalConfig(_mods(), fusion=EarlyFusion()),
    lambda: MultiModalConfig(_mods(), fusion=MiddleFusion(fusion_layer=2),
                             cross_attention=CrossModalAttentionConfig()),
    lambda: MultiModalConfig([ModalityConfig(TEXT), ModalityConfig(IMAGE, embed_dim=768,
                                                                   encoder_config={
                                                                       "num_heads": 12})],
                             fusion=LateFusion(reduce="concat")),
    lambda: MultiModalConfig(_mods(), fusion=AttentionFusion(attention_dim=128, num_heads=2),
                             cross_attention=CrossModalAttentionConfig(head_dim=32, scale=0.2)),
    _full_config,
]


@pytest.mark.parametrize("make", CONFIGS)
def test_dict_round_trip(make):
    cfg = make()
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d                 # JSON-friendly values only
    assert all(isinstance(k, str) and "modality" not in v for k, v in d["modalities"].items())
    back = MultiModalConfig.from_dict(d)
    assert back == cfg and back.to_dict() == d and hash(back) == hash(cfg)
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg


@pytest.mark.parametrize("make", CONFIGS)
def test_json_file_round_trip(make, tmp_path):
    cfg = make()
    path = tmp_path / "model.json"
    text = cfg.to_json(path)
    assert path.read_text(encoding="utf-8") == text
    assert MultiModalConfig.from_json(path) == cfg
    assert MultiModalConfig.from_json(str(path)) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]    # no temporary left


@toml_only
@pytest.mark.parametrize("make", CONFIGS)
def test_toml_file_round_trip(make, tmp_path):
    cfg = make()
    path = tmp_path / "model.toml"
    text = cfg.to_toml(path)
    assert path.read_text(encoding="utf-8") == text
    assert MultiModalConfig.from_toml(path) == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["model.toml"]


@toml_only
@pytest.mark.parametrize("cfg", [ModalityConfig("custom:1", preprocessing=None),
                                 CacheConfig(per_modality={"video": CachePolicy(ttl_s=1)}),
                                 CrossModalAttentionConfig(pairs=[("text", "audio")]),
                                 EncoderConfig(vocab_size=1000),
                                 PreprocessingConfig(modality="video", fps=2.0),
                                 PreprocessingConfig(modality="text")])
def test_part_configs_round_trip_through_files(cfg, tmp_path):
    cls = type(cfg)
    assert cls.from_dict(cfg.to_dict()) == cfg
    cfg.to_toml(tmp_path / "c.toml")
    cfg.to_json(tmp_path / "c.json")
    assert cls.from_toml(tmp_path / "c.toml") == cfg
    assert cls.from_json(tmp_path / "c.json") == cfg


@toml_only
def test_hand_written_toml(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text('''
name = "clip-like"
fused_dim = 512
cross_attention = "none"

[modalities.text]
embed_dim = 512
preprocessing = { max_length = 77, padding = "max_length" }
quantization = "none"

[modalities.image]
embed_dim = 768
encoder = "onnx"
priority = 1
preprocessing = { preset = "siglip", size = 384 }
cache = { policy = "lfu", budget_bytes = 1048576 }

[modalities."custom:7"]
enabled = false
encoder = "remote"
embed_dim = 64
preprocessing = "none"

[fusion]
type = "attention"
attention_dim = 256

[cache]
global_budget_bytes = 67108864
[cache.per_modality.text]
policy = "ttl"
ttl_s = 30
''', encoding="utf-8")
    cfg = MultiModalConfig.from_toml(path)
    assert cfg.name == "clip-like" and cfg.fused_dim == 512 and cfg.cross_attention is None
    assert list(cfg.modalities) == [TEXT, IMAGE, Modality.custom(7)]
    assert cfg.modalities["text"].preprocessing.max_length == 77
    assert cfg.modalities["text"].quantization is None
    img = cfg.modality_config(IMAGE)
    assert (img.encoder, img.priority, img.preprocessing.size) == ("onnx", 1, 384)
    assert cfg.cache_policy(IMAGE) == CachePolicy(policy="lfu", budget_bytes=2**20)
    assert cfg.cache_policy("text").ttl_s == 30.0
    seven = cfg.modality_config("custom:7")
    assert seven.preprocessing is None and not seven.enabled
    assert cfg.enabled_modalities() == (TEXT, IMAGE)
    assert cfg.fusion == AttentionFusion(attention_dim=256)


@toml_only
def test_toml_array_of_tables_and_sections(tmp_path):
    path = tmp_path / "app.toml"
    path.write_text('''
[model]
fusion = "late"
[[model.modalities]]
modality = "audio"
cache = "none"
preprocessing = { preset = "none", padding = "longest" }
[[model.modalities]]
modality = "custom:depth"
preprocessing = "NONE"
''', encoding="utf-8")
    cfg = MultiModalConfig.from_toml(path, section="model")
    assert list(cfg.modalities) == [AUDIO, Modality.custom("depth")]
    assert cfg.modalities["audio"].preprocessing.preset is None
    assert cfg.modalities["custom:depth"].preprocessing is None
    with pytest.raises(ConfigError, match="section"):
        MultiModalConfig.from_toml(path, section="other")


def test_json_with_sections_and_errors(tmp_path):
    path = tmp_path / "app.json"
    path.write_text(json.dumps({"model": {"modalities": {"text": {"embed_dim": 64}},
                                          "fusion": {"type": "late", "reduce": "sum"}}}))
    cfg = MultiModalConfig.from_json(path, section="model")
    assert cfg.modalities["text"].embed_dim == 64 and cfg.fusion == LateFusion(reduce="sum")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"modalities": {"text": {"embed_dim": 0}}}))
    with pytest.raises(ConfigError, match=r"modalities\['text'\].*ModalityConfig\.embed_dim"):
        MultiModalConfig.from_json(bad)
    with pytest.raises(ConfigError, match="missing.json"):
        MultiModalConfig.from_json(tmp_path / "missing.json")


def test_to_json_returns_text_without_path():
    cfg = MultiModalConfig([ModalityConfig(TEXT)])
    assert json.loads(cfg.to_json())["modalities"]["text"]["embed_dim"] == 512
    assert json.loads(cfg.to_json(indent=None)) == cfg.to_dict()


def test_toml_writer_refuses_none_in_free_form_values(tmp_path):
    cfg = MultiModalConfig([ModalityConfig(TEXT, extra={"k": None})])
    with pytest.raises(ConfigError, match="TOML has no null"):
        cfg.to_toml()
    with pytest.raises(ConfigError, match="TOML has no null"):
        cfg.to_toml(tmp_path / "x.toml")
    assert not (tmp_path / "x.toml").exists()
    assert MultiModalConfig.from_json(_write(tmp_path / "x.json", cfg.to_json())) == cfg


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@toml_only
def test_toml_writer_values(tmp_path):
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    extra = {"s": 'q"uote\\ \x01 \x7f ü 😀', "f": [1.5, float("inf"), -float("inf"), 1e-300],
             "nested": {"deep": {"x": 1}, "empty": {}}, "list": [[1, 2], ["a"], {"k": True}],
             "key with space": 1, "": 2}
    cfg = ModalityConfig(Modality.custom("x"), extra=extra)
    parsed = tomllib.loads(cfg.to_toml())
    assert parsed["extra"] == extra
    nan_cfg = ModalityConfig(Modality.custom("x"), extra={"v": float("nan")})
    assert math.isnan(tomllib.loads(nan_cfg.to_toml())["extra"]["v"])


def test_write_error_names_the_file(tmp_path):
    cfg = MultiModalConfig([ModalityConfig(TEXT)])
    with pytest.raises(ConfigError, match="no_such_dir"):
        cfg.to_json(tmp_path / "no_such_dir" / "m.json")


# ============================================================================================
# the public names

def test_top_level_exports():
    for name in ["Modality", "MultiModalConfig", "ModalityConfig", "PreprocessingConfig",
                 "CrossModalAttentionConfig", "CacheConfig", "EarlyFusion", "MiddleFusion",
                 "LateFusion", "AttentionFusion", "CustomFusion", "FusionStrategy"]:
        assert name in mmcore.__all__
        assert getattr(mmcore, name) is getattr(mmcore.config if name != "Modality"
                                                else mmcore.modality, name)
