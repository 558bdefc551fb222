"""Latency statistics of a model's stages, and their export as Prometheus metrics.

:class:`LatencyStats` counts, per stage (``"preprocess:<m>"``, ``"encode:<m>"``,
``"fusion"``, ``"total"``...), the calls, the seconds and the rows processed, with a bounded
window of recent samples for the percentiles; :func:`prometheus_collector` exposes such
statistics to ``prometheus_client``. :class:`~mmcore.model.MultiModalModel` keeps one
:class:`LatencyStats` (:meth:`~mmcore.model.MultiModalModel.stats`).

Examples
--------
>>> from mmcore.model.stats import LatencyStats
>>> s = LatencyStats(window=8)
>>> s.record_many({"fusion": 0.5, "total": 1.0}, items=4)
>>> s.snapshot()["total"]["items"]
4
"""

from __future__ import annotations

import collections
import re
import threading
from typing import Any, Callable, Dict, List, Mapping

import numpy as np

from ..errors import ConfigError

__all__ = ["LatencyStats", "prometheus_collector"]


class LatencyStats:
    """Thread-safe per-stage latency counters with a bounded window of recent samples.

    ``record(stage, seconds, items)`` adds one sample; :meth:`snapshot` returns, per stage,
    ``count``, ``total_s``, ``mean_s``, ``p50_s``, ``p95_s`` (over the last ``window``
    samples) and ``items`` (rows processed).

    Examples
    --------
    >>> from mmcore.model.model import LatencyStats
    >>> s = LatencyStats(window=4)
    >>> for t in (1.0, 2.0, 3.0, 4.0, 5.0):
    ...     s.record("fusion", t, items=2)
    >>> snap = s.snapshot()["fusion"]
    >>> snap["count"], snap["items"], snap["p50_s"]
    (5, 10, 3.5)
    """

    def __init__(self, window: int = 1024):
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ConfigError(f"LatencyStats.window must be an integer >= 1, got {window!r}")
        self.window = int(window)
        self._lock = threading.Lock()
        self._stages: Dict[str, list] = {}

    def record(self, stage: str, seconds: float, items: int = 0) -> None:
        """Add one sample of ``stage``: ``seconds`` spent on ``items`` rows."""
        with self._lock:
            st = self._stages.get(stage)
            if st is None:
                st = [0, 0.0, 0, collections.deque(maxlen=self.window)]
                self._stages[stage] = st
            st[0] += 1
            st[1] += float(seconds)
            st[2] += int(items)
            st[3].append(float(seconds))

    def record_many(self, timings: Mapping[str, float], items: int = 0) -> None:
        """:meth:`record` every ``stage -> seconds`` of ``timings``, each with ``items``."""
        for stage, secs in timings.items():
            self.record(stage, secs, items)

    def snapshot(self) -> Dict[str, Dict[str, float]]:
        """Per stage: ``count``, ``total_s``, ``mean_s``, ``p50_s``, ``p95_s``, ``items``."""
        with self._lock:
            data = {k: (v[0], v[1], v[2], np.array(v[3], np.float64))
                    for k, v in self._stages.items()}
        out = {}
        for stage, (count, total, items, recent) in data.items():
            p50, p95 = (np.percentile(recent, [50, 95]).tolist() if recent.size
                        else (0.0, 0.0))
            out[stage] = {"count": count, "total_s": total,
                          "mean_s": total / count if count else 0.0,
                          "p50_s": float(p50), "p95_s": float(p95), "items": items}
        return out

    def reset(self) -> None:
        """Forget every sample."""
        with self._lock:
            self._stages.clear()


def prometheus_collector(snapshot: Callable[[], Mapping[str, Mapping[str, float]]], *,
                         prefix: str = "mmcore_model", op: str = "prometheus_collector") -> Any:
    """A ``prometheus_client`` collector exposing the statistics ``snapshot()`` returns.

    ``snapshot`` returns what :meth:`LatencyStats.snapshot` does; it is called at every
    scrape. Exposes ``<prefix>_stage_seconds`` (a summary: ``_count``, ``_sum`` and the
    recent-window quantiles ``quantile="0.5"`` / ``"0.95"``) and
    ``<prefix>_stage_items_total`` (rows processed), labelled by ``stage``. The collector
    describes its metric names, so a registry refuses a second collector with the same
    ``prefix``.

    Raises
    ------
    ConfigError
        ``prefix`` is not a valid Prometheus metric name (the message starts with ``[op]``).
    ImportError
        prometheus_client is not installed.

    Examples
    --------
    >>> from mmcore.model.stats import LatencyStats, prometheus_collector
    >>> stats = LatencyStats()
    >>> collector = prometheus_collector(stats.snapshot, prefix="demo")
    >>> [family.name for family in collector.describe()]
    ['demo_stage_seconds', 'demo_stage_items']
    """
    if not isinstance(prefix, str) or not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", prefix):
        raise ConfigError(f"[{op}] prefix must be a Prometheus metric name "
                          f"([a-zA-Z_:][a-zA-Z0-9_:]*), got {prefix!r}")
    try:
        from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily
        from prometheus_client.samples import Sample
    except ImportError as exc:
        raise ImportError(f"[{op}] needs the prometheus_client package "
                          "(pip install prometheus-client)") from exc
    name = f"{prefix}_stage_seconds"

    def families(snap: Mapping[str, Mapping[str, float]]) -> List[Any]:
        lat = SummaryMetricFamily(name, "Latency of model stages", labels=["stage"])
        items = CounterMetricFamily(f"{prefix}_stage_items",
                                    "Rows processed by model stages", labels=["stage"])
        for stage, s in snap.items():
            lat.add_metric([stage], int(s["count"]), s["total_s"])
            for q, key in (("0.5", "p50_s"), ("0.95", "p95_s")):
                lat.samples.append(Sample(name, {"stage": stage, "quantile": q}, s[key]))
            items.add_metric([stage], s["items"])
        return [lat, items]

    class _Collector:
        def describe(self):
            return families({})

        def collect(self):
            return families(snapshot())

    return _Collector()
