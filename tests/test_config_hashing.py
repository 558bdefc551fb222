"""The one hashing scheme of the configs: ``hash()`` in process, ``digest()`` across processes."""

from __future__ import annotations

import hashlib

import pytest

from mmcore.config import (
    CacheConfig,
    CachePolicy,
    CustomFusion,
    EncoderConfig,
    LateFusion,
    ModalityConfig,
    MultiModalConfig,
    PreprocessingConfig,
    config_digest,
    register_fusion,
    unregister_fusion,
)
from mmcore.config.base import canonical_json
from mmcore.errors import ConfigError


def _mm(**kw):
    return MultiModalConfig([ModalityConfig("text", extra={"b": [1, 2], "a": {"x": 1}}),
                             ModalityConfig("image")], **kw)


def test_digest_is_pinned():
    # the value must not change between processes, machines or releases of the same format:
    # it is BLAKE2b-256 over a domain tag and the canonical JSON of type name and fields
    cfg = PreprocessingConfig()
    text = canonical_json({"type": "AudioPreprocessingConfig", "fields": cfg.to_dict()})
    want = hashlib.blake2b(b"mmcore.config.digest.v1\x00" + text.encode(), digest_size=32)
    assert cfg.digest() == want.hexdigest()
    assert cfg.digest() == "cb293d021b7cc3cc68752c397e823ad5e81f6e300839ea7b23227a69b4006809"


def test_equal_configs_equal_hash_and_digest():
    a, b = _mm(), _mm()
    assert a == b and a is not b
    assert hash(a) == hash(b) and a.digest() == b.digest()
    assert len({a, b}) == 1
    # dict fields in another insertion order are the same config
    c = MultiModalConfig([ModalityConfig("text", extra={"a": {"x": 1}, "b": [1, 2]}),
                          ModalityConfig("image")])
    assert c == a and hash(c) == hash(a) and c.digest() == a.digest()


@pytest.mark.parametrize("other", [
    lambda: _mm(fusion=LateFusion(reduce="max")),
    lambda: _mm(cache=CacheConfig(global_budget_bytes=2**20)),
    lambda: _mm().with_enabled("image", False),
    lambda: _mm(name="other"),
])
def test_any_change_changes_the_digest(other):
    assert other().digest() != _mm().digest()
    assert other() != _mm()


def test_digest_separates_classes_and_modalities():
    assert CachePolicy().digest() != EncoderConfig().digest()
    digests = {PreprocessingConfig(modality=m).digest() for m in ("audio", "image", "video",
                                                                   "text")}
    assert len(digests) == 4


def test_config_digest_of_mappings_ignores_key_order():
    assert (config_digest({"enc": EncoderConfig(), "dim": 512})
            == config_digest({"dim": 512, "enc": EncoderConfig()}))
    assert config_digest({"dim": 512}) != config_digest({"dim": 513})
    assert len(config_digest([CachePolicy(), None])) == 64


def test_custom_fusion_hashes_unregistered_functions_but_cannot_digest_them():
    def pick(embeddings, **options):
        return next(iter(embeddings.values()))

    cfg = CustomFusion(pick)
    assert hash(cfg) == hash(CustomFusion(pick))
    with pytest.raises(ConfigError, match="not registered"):
        cfg.digest()
    register_fusion("pick_for_digest", pick)
    try:
        named = CustomFusion(pick)
        assert named.fn == "pick_for_digest" and len(named.digest()) == 64
    finally:
        unregister_fusion("pick_for_digest")
