"""``MultiModalModel.prometheus_collector``: the stage statistics as Prometheus metrics."""

from __future__ import annotations

import sys

import numpy as np
import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from mmcore.errors import ConfigError  # noqa: E402
from mmcore.model import default_model  # noqa: E402


def _inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    return {"text": [f"item {i}" for i in range(batch)],
            "image": rng.integers(0, 256, (batch, 40, 48, 3)).astype(np.uint8)}


def _scrape(registry):
    """{family name: (type, {(sample name, frozenset(labels)): value})} of one scrape."""
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = (fam.type, {(s.name, frozenset(s.labels.items())): s.value
                                    for s in fam.samples})
    return text, out


def _sample(fams, family, name, **labels):
    return fams[family][1][(name, frozenset(labels.items()))]


@pytest.fixture
def model():
    return default_model(seed=0, cache=False)


def test_counts_sums_and_items_after_two_calls(model):
    registry = CollectorRegistry()
    registry.register(model.prometheus_collector())
    model.infer(_inputs(2))
    model.infer({"text": ["only text"]})
    text, fams = _scrape(registry)
    stats = model.stats()

    assert fams["mmcore_model_stage_seconds"][0] == "summary"
    assert fams["mmcore_model_stage_items"][0] == "counter"
    expected = {"total": (2, 3), "fusion": (2, 3), "preprocess:text": (2, 3),
                "encode:text": (2, 3), "preprocess:image": (1, 2), "encode:image": (1, 2)}
    assert set(stats) == set(expected)
    for stage, (count, items) in expected.items():
        assert _sample(fams, "mmcore_model_stage_seconds", "mmcore_model_stage_seconds_count",
                       stage=stage) == count
        total = _sample(fams, "mmcore_model_stage_seconds", "mmcore_model_stage_seconds_sum",
                        stage=stage)
        assert total == pytest.approx(stats[stage]["total_s"]) and total > 0
        assert _sample(fams, "mmcore_model_stage_items", "mmcore_model_stage_items_total",
                       stage=stage) == items
        for q, key in (("0.5", "p50_s"), ("0.95", "p95_s")):
            assert _sample(fams, "mmcore_model_stage_seconds", "mmcore_model_stage_seconds",
                           stage=stage, quantile=q) == pytest.approx(stats[stage][key])
    assert 'mmcore_model_stage_seconds_count{stage="encode:image"} 1.0' in text
    assert 'mmcore_model_stage_items_total{stage="total"} 3.0' in text


def test_scrapes_follow_the_model_and_reset(model):
    registry = CollectorRegistry()
    registry.register(model.prometheus_collector(prefix="mm"))
    _, fams = _scrape(registry)
    assert fams["mm_stage_seconds"][1] == {} and fams["mm_stage_items"][1] == {}
    model.infer({"text": ["a", "b", "c"]})
    _, fams = _scrape(registry)
    assert _sample(fams, "mm_stage_seconds", "mm_stage_seconds_count", stage="total") == 1
    assert _sample(fams, "mm_stage_items", "mm_stage_items_total", stage="total") == 3
    model.infer({"text": ["d"]})
    _, fams = _scrape(registry)
    assert _sample(fams, "mm_stage_seconds", "mm_stage_seconds_count", stage="total") == 2
    assert _sample(fams, "mm_stage_items", "mm_stage_items_total", stage="total") == 4
    model.reset_stats()
    _, fams = _scrape(registry)
    assert fams["mm_stage_seconds"][1] == {}


def test_with_the_cache_on():
    model = default_model(seed=0)
    registry = CollectorRegistry()
    registry.register(model.prometheus_collector())
    for _ in range(3):
        model.infer({"text": ["same", "items"]})
    _, fams = _scrape(registry)
    for stage in ("total", "encode:text", "preprocess:text", "fusion"):
        assert _sample(fams, "mmcore_model_stage_seconds", "mmcore_model_stage_seconds_count",
                       stage=stage) == 3
        assert _sample(fams, "mmcore_model_stage_items", "mmcore_model_stage_items_total",
                       stage=stage) == 6


def test_two_models_need_distinct_prefixes(model):
    registry = CollectorRegistry()
    registry.register(model.prometheus_collector(prefix="a"))
    other = default_model(seed=1, cache=False)
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(other.prometheus_collector(prefix="a"))
    registry.register(other.prometheus_collector(prefix="b"))
    model.infer({"text": ["x"]})
    other.infer({"text": ["y", "z"]})
    _, fams = _scrape(registry)
    assert _sample(fams, "a_stage_items", "a_stage_items_total", stage="total") == 1
    assert _sample(fams, "b_stage_items", "b_stage_items_total", stage="total") == 2


@pytest.mark.parametrize("prefix", ["", "has-dash", "9starts_with_digit", 3])
def test_bad_prefix(model, prefix):
    with pytest.raises(ConfigError, match=r"\[MultiModalModel.prometheus_collector\] prefix"):
        model.prometheus_collector(prefix=prefix)


def test_missing_prometheus_client(model, monkeypatch):
    for name in list(sys.modules):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="prometheus_client"):
        model.prometheus_collector()
