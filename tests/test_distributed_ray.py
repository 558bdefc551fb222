"""The Ray backend of mmcore.distributed on a local Ray instance (skipped without ray)."""

from __future__ import annotations

import os

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import mmcore.distributed  # noqa: E402
from mmcore.distributed import DistributedConfig, ShardingStrategy  # noqa: E402
from mmcore.errors import ConfigError, ShapeError  # noqa: E402
from mmcore.model import MultiModalLoader, MultiModalModel, default_model  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("raymodel") / "m"
    default_model(seed=3).save(d)
    return str(d)


@pytest.fixture(scope="module")
def ray_model(model_dir, tmp_path_factory):
    # Ray workers take the driver's working directory first on sys.path: not the source tree
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("raycwd"))
    cfg = DistributedConfig(
        backend="ray",
        sharding_strategy=ShardingStrategy.modality_specific({"image": 2, "audio": 1}),
        ray_resources={"image": {"mmcore_vision": 1}}, request_timeout_s=60)
    try:
        model = mmcore.distributed.load(model_dir, cfg)
        try:
            yield model
        finally:
            model.close()
    finally:
        os.chdir(here)
    assert not ray.is_initialized()


def _inputs(seed, batch=2):
    rng = np.random.default_rng(seed)
    return {"text": [f"item {i}" for i in range(batch)],
            "image": rng.integers(0, 256, (batch, 40, 52, 3), dtype=np.uint8),
            "audio": rng.standard_normal((batch, 9000)).astype(np.float32)}


def test_ray_results_equal_local(ray_model, model_dir):
    local = MultiModalModel.from_pretrained(model_dir)
    assert set(map(str, ray_model.remote_modalities)) == {"image", "audio"}
    for seed in range(3):
        x = _inputs(seed, batch=1 + seed)
        got, want = ray_model.infer(x), local.infer(x)
        np.testing.assert_allclose(got.fused, want.fused, rtol=1e-5, atol=1e-5)
        for m in want.embeddings:
            np.testing.assert_allclose(got.embeddings[m], want.embeddings[m], rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_array_equal(got.masks[m], want.masks[m])
        assert "remote:image" in got.stats and "remote:audio" in got.stats


def test_ray_actors_place_by_custom_resources(ray_model):
    backend = ray_model.distributed
    assert len(backend.actors[next(m for m in backend.actors if str(m) == "image")]) == 2
    total = ray.cluster_resources()
    assert total.get("mmcore_vision") == 2.0
    assert total.get("mmcore_audio") == 1.0


def test_ray_request_errors_keep_their_class(ray_model):
    with pytest.raises(ShapeError):
        ray_model.infer({"image": np.zeros((1, 4, 4), np.float64)})
    # the actors are still serving
    assert ray_model.infer(_inputs(7)).fused.shape == (2, 64)


def test_ray_survives_a_killed_actor(ray_model):
    backend = ray_model.distributed
    image = next(m for m in backend.actors if str(m) == "image")
    victim = backend.actors[image][0]
    ray.kill(victim.handle)
    for seed in range(4):
        assert ray_model.infer(_inputs(seed)).fused.shape == (2, 64)
    assert not victim.healthy or victim.outstanding == 0


def test_ray_backend_needs_a_model_directory():
    cfg = DistributedConfig(backend="ray",
                            sharding_strategy=ShardingStrategy.modality_specific({"text": 1}))
    with pytest.raises(ConfigError, match="model directory"):
        mmcore.distributed.attach(default_model(), cfg)
    with pytest.warns(DeprecationWarning):
        loader = MultiModalLoader(default_model().config).with_distributed(cfg)
    with pytest.raises(ConfigError, match="model directory"):
        loader.load()


def test_ray_backend_refuses_a_shadowing_source_tree(model_dir, tmp_path, monkeypatch):
    fake = tmp_path / "mmcore"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = DistributedConfig(backend="ray",
                            sharding_strategy=ShardingStrategy.modality_specific({"text": 1}))
    with pytest.raises(ConfigError, match="source tree"):
        mmcore.distributed.load(model_dir, cfg)
