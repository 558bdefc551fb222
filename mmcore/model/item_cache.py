"""The per-item cache of a model: encoder outputs and fused vectors, keyed item by item.

:class:`ItemCache` owns what :class:`~mmcore.model.MultiModalModel` needs to cache results
item by item: the :class:`~mmcore.cache.CacheManager` (or none), the model identity (a digest
of the weights, see :meth:`ItemCache.identity_and_version`), the digests of configs
(:meth:`ItemCache.config_key`), the cache keys of batch items and the lookups of encoder
outputs (:meth:`ItemCache.encoded`) and fused vectors (:meth:`ItemCache.fused`). It knows
nothing about the model class: the model hands it the callables that preprocess, encode and
fuse, and its own weights.

Keys: an item's key is :func:`~mmcore.cache.content_key` of its data (raw input bytes --
file bytes for paths -- or its preprocessed row and mask), the modality's config key, the
matmul precision the modality is encoded under (:func:`modality_precision`) and the model
identity; a fused vector's key is :meth:`~mmcore.cache.CacheManager.fusion_key` of the item
keys of its modalities, the fusion config key, the matmul precision of the fusion (the
caller's, :func:`mmcore.get_matmul_precision`) and the model identity. So a result computed
under one precision is never served for another. Results computed while the weights changed
(another thread replacing a parameter) are returned but never stored.

Examples
--------
>>> import numpy as np
>>> from mmcore.model import default_model
>>> from mmcore.model.item_cache import ItemCache
>>> model = default_model(seed=0)
>>> isinstance(model.item_cache, ItemCache), model.item_cache.enabled
(True, True)
>>> ident, version = model.item_cache.identity_and_version(model, {})
>>> ident == model.identity
True
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .._precision import get_matmul_precision, matmul_precision
from ..cache import CacheManager, content_key, hash_field, new_hasher
from ..config import CacheConfig, ModalityConfig, MultiModalConfig, config_digest
from ..errors import ConfigError, ShapeError
from ..modality import Modality
from .inputs import MultiModalInput, item_data, kind_of, raw_items, raw_subset
from .nn import Module, weights_clock

__all__ = ["ItemCache", "make_cache_manager", "KEYS_VERSIONS", "modality_precision",
           "precision_block"]

#: Where ``item_keys`` (the per-request record of item cache keys that :meth:`ItemCache.encoded`
#: fills and :meth:`ItemCache.fused` reads) notes the weights versions the keys were computed at.
KEYS_VERSIONS = "__weights_versions__"

#: ``(identity, weights_version)`` of a model's weights as they are now.
WeightsFn = Callable[[], Tuple[str, int]]
#: What preprocesses one modality: ``prepare(m, mc, value, is_raw, mask) -> (x, mask)``.
PrepareFn = Callable[[Modality, ModalityConfig, Any, bool, Optional[np.ndarray]], Tuple[Any, Any]]


def make_cache_manager(config: MultiModalConfig, cache: Any, owner: str
                       ) -> Optional[CacheManager]:
    """The :class:`~mmcore.cache.CacheManager` a model's ``cache=`` option asks for (None
    when caching is off): None or True, from ``config.cache``; False, none; a
    :class:`~mmcore.config.CacheConfig`, built from it; a CacheManager, itself.

    Raises
    ------
    ConfigError
        ``cache`` is none of these (the message starts with ``[owner]``).
    """
    if cache is False:
        return None
    if isinstance(cache, CacheManager):
        mgr = cache
    elif cache is None or cache is True:
        mgr = CacheManager.from_multimodal_config(config)
    elif isinstance(cache, CacheConfig):
        policies = {m: (mc.cache if mc.cache is not None else cache.policy_for(m))
                    for m, mc in config.modalities.items()}
        mgr = CacheManager(cache, policies=policies)
    else:
        raise ConfigError(f"[{owner}] cache must be None, a bool, a CacheConfig or a "
                          f"CacheManager, got {type(cache).__name__}")
    return mgr if mgr.config.enabled else None


def modality_precision(mc: ModalityConfig) -> str:
    """The matmul precision modality ``mc`` is encoded under in the calling thread: its
    :attr:`~mmcore.config.ModalityConfig.matmul_precision` when set, else the thread's or the
    process's (:func:`mmcore.get_matmul_precision`).

    Examples
    --------
    >>> import mmcore
    >>> from mmcore.config import ModalityConfig
    >>> from mmcore.model.item_cache import modality_precision
    >>> with mmcore.matmul_precision("bf16"):
    ...     modality_precision(ModalityConfig("text")), modality_precision(
    ...         ModalityConfig("text", matmul_precision="int8"))
    ('bf16', 'int8')
    """
    return mc.matmul_precision if mc.matmul_precision is not None else get_matmul_precision()


def precision_block(mc: ModalityConfig) -> ContextManager[Any]:
    """The ``with`` block that encodes modality ``mc``: ``mmcore.matmul_precision(p)`` when its
    config sets ``matmul_precision`` to ``p``, else a block that changes nothing (the thread's
    or process's precision applies)."""
    if mc.matmul_precision is None:
        return contextlib.nullcontext()
    return matmul_precision(mc.matmul_precision)


def _with_precision(key: str, precision: str) -> str:
    """A config key extended with the matmul precision of the values it keys."""
    return f"{key};matmul_precision={precision}"


def _real_length(row: np.ndarray) -> Optional[int]:
    """Length of the True prefix of a mask row (None if the row is not right-padded)."""
    n = int(row.sum())
    if not row[:n].all():
        return None
    return n


class ItemCache:
    """Cache keys, model identity and lookups of one model's per-item cache.

    Parameters
    ----------
    manager : CacheManager or None
        Where the entries live; None: caching is off (the identity and config keys still
        work).
    owner : str, keyword-only
        Prefix of error messages (the model's class name).

    See the module docstring for the keys. Thread-safe as the manager is: concurrent
    lookups of the same item may both compute it and store equal results.
    """

    def __init__(self, manager: Optional[CacheManager], *, owner: str = "MultiModalModel"):
        self.manager = manager
        self.owner = owner
        self._config_keys: Dict[int, Tuple[Any, str]] = {}
        # (id of the model, weights clock, weights version, identity) of the last computation
        self._identity_state: Optional[Tuple[int, int, int, str]] = None

    @classmethod
    def for_config(cls, config: MultiModalConfig, cache: Any = None, *,
                   owner: str = "MultiModalModel") -> "ItemCache":
        """The item cache of a model built for ``config`` with the ``cache=`` option ``cache``
        (see :func:`make_cache_manager`)."""
        return cls(make_cache_manager(config, cache, owner), owner=owner)

    @property
    def enabled(self) -> bool:
        """Whether there is a cache at all."""
        return self.manager is not None

    def enabled_for(self, name: Any) -> bool:
        """Whether the cache of a modality (or of :attr:`CacheManager.FUSION`) is on."""
        return self.manager is not None and self.manager.enabled_for(name)

    # -- model identity -------------------------------------------------------------------------

    def identity_and_version(self, model: Module, external: Mapping[Modality, Any]
                             ) -> Tuple[str, int]:
        """``(identity, weights_version)`` of ``model`` as it is now.

        ``external`` maps modalities to the model's encoders that are plain callables (not
        modules), identified by object. O(1) while no module anywhere has changed (the
        weights clock); else the tree's version is compared and the digest of every parameter
        recomputed only when a parameter of this model was replaced. The version lets a
        caller check that the weights did not change while it computed a result it is about
        to cache.
        """
        clock = weights_clock()                 # read first: a later change is seen next time
        state = self._identity_state
        if state is not None and state[0] == id(model) and state[1] == clock:
            return state[3], state[2]
        version = model.weights_version
        if state is not None and state[0] == id(model) and state[2] == version:
            ident = state[3]
        else:
            ident = self.compute_identity(model, external)
        self._identity_state = (id(model), clock, version, ident)
        return ident, version

    @staticmethod
    def compute_identity(model: Module, external: Mapping[Modality, Any]) -> str:
        """The digest of ``model``'s class name, parameters (names, dtypes, shapes, values) and
        of its ``external`` encoders (by modality, type and object id)."""
        h = new_hasher()
        hash_field(h, b"class", type(model).__name__.encode())
        for name, arr in sorted(model.named_parameters()):
            a = np.ascontiguousarray(arr)
            hash_field(h, b"name", name.encode())
            hash_field(h, b"meta", f"{a.dtype.str}{a.shape}".encode())
            h.update(a.reshape(-1).view(np.uint8))
        for m, fn in sorted(external.items(), key=lambda kv: str(kv[0])):
            hash_field(h, b"external", f"{m}:{type(fn).__qualname__}:{id(fn)}".encode())
        return h.hexdigest()

    # -- config keys ----------------------------------------------------------------------------

    def config_key(self, cfg: Any) -> str:
        """A digest of what, in a ModalityConfig (preprocessing and encoder) or a
        MultiModalConfig (fusion and cross-attention), decides the cached values; computed
        once per config object (configs are replaced, never changed, by enable / disable).

        The matmul precision is not part of it: the keys of :meth:`encoded` and :meth:`fused`
        add the precision in effect (which a ``ModalityConfig.matmul_precision`` of None
        leaves to the thread or the process)."""
        memo = self._config_keys
        hit = memo.get(id(cfg))
        if hit is not None and hit[0] is cfg:
            return hit[1]
        fields: Dict[str, Any]
        if isinstance(cfg, ModalityConfig):
            fields = {"modality": cfg.modality, "preprocessing": cfg.preprocessing,
                      "encoder": cfg.encoder, "embed_dim": cfg.embed_dim,
                      "encoder_config": cfg.encoder_config,
                      "quantization": cfg.quantization, "extra": cfg.extra}
        else:
            fields = {"fusion": cfg.fusion, "fused_dim": cfg.fused_dim,
                      "cross_attention": cfg.cross_attention}
        key = "config:" + config_digest(fields)
        if len(memo) > 64:
            memo.clear()
        memo[id(cfg)] = (cfg, key)
        return key

    # -- lookups --------------------------------------------------------------------------------

    def encoded(self, m: Modality, mc: ModalityConfig, inputs: MultiModalInput, *,
                prepare: PrepareFn, encoder: Callable[[Modality], Callable],
                weights: WeightsFn, timings: Dict[str, float],
                item_keys: Optional[Dict[Any, Any]] = None
                ) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(tokens, mask, pooled)`` of one modality through the cache, or None when the input
        cannot be cached item by item (the caller then takes the uncached path).

        Only the items not found are preprocessed (``prepare``) and encoded
        (``encoder(m)(x, attention_mask=mask)``, inside :func:`precision_block` of ``mc``), as
        one sub-batch; the batch is then put back together with the padding the uncached path
        gives. The keys carry :func:`modality_precision` of ``mc``. ``weights`` gives the
        model's ``(identity, weights_version)``. ``timings`` receives
        ``preprocess:<m>`` / ``encode:<m>``; ``item_keys`` (when given) receives the items'
        keys under ``m`` and the weights version under :data:`KEYS_VERSIONS`.
        """
        owner = self.owner
        manager = self.manager
        assert manager is not None and inputs.batch_size is not None  # (see enabled_for)
        value = inputs.modality_inputs[m]
        is_raw = inputs.raw[m] and not isinstance(value, Mapping)
        n_items = int(inputs.batch_size)
        pre = mc.preprocessing
        pkind = kind_of(m, pre)
        if pre is not None and pkind == "text" and pre.padding_side == "left":
            return None
        t_pre = 0.0
        t0 = time.perf_counter()
        x: Any = None           # the preprocessed batch and its mask (given preprocessed)
        mask: Any = None
        if is_raw:
            items = raw_items(pkind, value, n_items)
            if items is None:
                return None
            datas: List[Tuple[Any, ...]] = [("raw", item_data(pkind, it)) for it in items]
            # text and audio configs pad to a fixed length with padding="max_length"
            fixed = (pre is not None and pkind in ("text", "audio")
                     and pre.padding == "max_length")
        else:
            x, mask = prepare(m, mc, value, False, (inputs.attention_masks or {}).get(m))
            x = np.asarray(x)
            if x.ndim < 1 or x.shape[0] != n_items:
                return None
            if mask is not None:
                mask = np.asarray(mask)
            datas = [("pre", x[i], None if mask is None else mask[i].astype(np.bool_))
                     for i in range(n_items)]
            fixed = True
        identity, wversion = weights()
        cfg = _with_precision(self.config_key(mc), modality_precision(mc))
        keys = [content_key(d, modality=m, config=cfg, model=identity) for d in datas]
        t_pre += time.perf_counter() - t0

        entries: Dict[str, Any] = {}
        for k in keys:
            if k not in entries:
                hit = manager.get(m, k)
                if hit is not None:
                    entries[k] = hit
        missing = []
        seen = set()
        for i, k in enumerate(keys):
            if k not in entries and k not in seen:
                seen.add(k)
                missing.append(i)

        t_enc = 0.0
        if missing:
            t0 = time.perf_counter()
            if is_raw:
                xs, ms = prepare(m, mc, raw_subset(value, n_items, missing), True, None)
            else:
                idx = np.asarray(missing, np.intp)
                xs = x[idx]
                ms = None if mask is None else mask[idx]
            t_pre += time.perf_counter() - t0
            if int(np.shape(xs)[0]) != len(missing):
                raise ShapeError(f"[{owner}] modality {str(m)!r} has batch size "
                                 f"{int(np.shape(xs)[0])} after preprocessing, expected "
                                 f"{len(missing)}")
            t0 = time.perf_counter()
            with precision_block(mc):
                tokens, tmask, pool = encoder(m)(xs, attention_mask=ms)
            tokens = np.asarray(tokens, np.float32)
            tmask = np.asarray(tmask).astype(np.bool_)
            pool = np.asarray(pool, np.float32)
            L_sub = int(tokens.shape[1])
            fresh = {}
            for j, i in enumerate(missing):
                n = _real_length(tmask[j])
                if n is None:
                    return None
                fresh[keys[i]] = (np.ascontiguousarray(tokens[j, :n]), pool[j],
                                  np.int64(L_sub if fixed else n))
            # weights replaced meanwhile (another thread): return the results, cache nothing
            if weights()[1] == wversion:
                for k, e in fresh.items():
                    manager.put(m, k, e)
            entries.update(fresh)
            t_enc = time.perf_counter() - t0

        t0 = time.perf_counter()
        rows = [entries[k] for k in keys]
        L = max(int(e[2]) for e in rows)
        D = int(rows[0][1].shape[-1])
        out_tokens = np.zeros((n_items, L, D), np.float32)
        out_mask = np.zeros((n_items, L), np.bool_)
        for i, e in enumerate(rows):
            n = int(e[0].shape[0])
            out_tokens[i, :n] = e[0]
            out_mask[i, :n] = True
        out_pool = np.stack([np.asarray(e[1], np.float32) for e in rows])
        t_enc += time.perf_counter() - t0
        timings[f"preprocess:{m}"] = t_pre
        timings[f"encode:{m}"] = t_enc
        if item_keys is not None:
            item_keys[m] = keys
            item_keys.setdefault(KEYS_VERSIONS, set()).add(wversion)
        return out_tokens, out_mask, out_pool

    def fused(self, config: MultiModalConfig, present: List[Modality],
              fusion_in: Mapping[Modality, Tuple[np.ndarray, ...]],
              item_keys: Mapping[Any, Any], batch: int, *,
              fuse: Callable[[Dict[Modality, Tuple[np.ndarray, ...]]], Mapping[str, Any]],
              weights: WeightsFn) -> Optional[Dict[str, np.ndarray]]:
        """``{"fused": ...}`` through the fused-vector cache (late and attention fusion: every
        row is fused on its own), or None when that cache is off.

        Only the rows not found are fused (``fuse(sub_batch)["fused"]``), with the batch's
        padding; ``item_keys`` is what :meth:`encoded` recorded for ``present``. The fusion
        runs under the caller's matmul precision, which the keys carry.
        """
        cache = self.manager
        if cache is None or not cache.enabled_for(CacheManager.FUSION):
            return None
        strategy = _with_precision(self.config_key(config), get_matmul_precision())
        identity, wversion = weights()
        keys = [CacheManager.fusion_key({m: item_keys[m][i] for m in present},
                                        strategy=strategy, model=identity)
                for i in range(batch)]
        rows: Dict[int, np.ndarray] = {}
        for i, k in enumerate(keys):
            hit = cache.get(CacheManager.FUSION, k)
            if hit is not None:
                rows[i] = hit
        missing = [i for i in range(batch) if i not in rows]
        if missing:
            idx = np.asarray(missing, np.intp)
            sub = {m: tuple(np.ascontiguousarray(a[idx]) for a in fusion_in[m])
                   for m in fusion_in}
            fused = np.asarray(fuse(sub)["fused"], np.float32)
            # cache only when the item keys, the fusion key and the fused rows all come from
            # the same weights (none replaced meanwhile by another thread)
            store = (weights()[1] == wversion
                     and item_keys.get(KEYS_VERSIONS, {wversion}) == {wversion})
            for j, i in enumerate(missing):
                rows[i] = fused[j]
                if store:
                    cache.put(CacheManager.FUSION, keys[i], np.ascontiguousarray(fused[j]))
        return {"fused": np.stack([np.asarray(rows[i], np.float32) for i in range(batch)])}

    # -- management -----------------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """:meth:`CacheManager.stats`, plus ``"enabled"`` (False, and zero counts, when off)."""
        if self.manager is None:
            return {"enabled": False, "caches": {},
                    "total": {k: 0 for k in ("hits", "misses", "evictions", "expired",
                                             "rejected", "bytes", "items")}}
        st = self.manager.stats()
        st["enabled"] = bool(self.manager.config.enabled)
        return st

    def clear(self) -> None:
        """Drop every cached entry (the counters are kept)."""
        if self.manager is not None:
            self.manager.clear()
