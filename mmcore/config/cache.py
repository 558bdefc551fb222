"""Cache configs: the policy of one modality (:class:`CachePolicy`) and the tensor cache as a
whole (:class:`CacheConfig`)."""

from __future__ import annotations

from dataclasses import field
from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

from ..modality import Modality
from .base import ConfigBase, config_dataclass
from .checks import (
    check_any_int,
    check_bool,
    check_choice,
    check_int,
    check_modality,
    check_nested,
    check_opt_int,
    check_positive_float,
    fail,
)
from .mapping import ModalityMap

__all__ = ["CachePolicy", "CacheConfig"]


@config_dataclass
class CachePolicy(ConfigBase):
    """How the encoder outputs of one modality are cached.

    Used as :attr:`CacheConfig.default`, as the entries of :attr:`CacheConfig.per_modality`,
    and as :attr:`ModalityConfig.cache` (the same entry written next to the modality).

    Parameters
    ----------
    policy : {"lru", "lfu", "fifo", "ttl"}, default "lru"
        Eviction order within this modality's share: least recently used, least frequently
        used, oldest first, or expiry by age (``ttl_s``, oldest first when over budget).
    budget_bytes : int or None, default None
        Bytes this modality may hold (>= 1); None: it shares the global budget with the
        other modalities that have no budget of their own.
    ttl_s : float or None, default None
        Entries older than this many seconds are dropped (> 0). Required by ``"ttl"``;
        with the other policies it is an additional age limit.
    priority : int, default 0
        When the global budget is exceeded, modalities with lower priority are evicted first.
    dtype : {"float32", "float16", "bfloat16"} or None, default None
        Storage dtype of cached tensors; None: as computed (float32). Lower precision halves
        the bytes at the cost of a rounding on the way in.
    enabled : bool, default True
        False: this modality is never cached.

    Examples
    --------
    >>> from mmcore.config import CachePolicy
    >>> CachePolicy(policy="ttl", ttl_s=60).ttl_s
    60.0
    >>> CachePolicy(policy="ttl")
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: CachePolicy.ttl_s must be set for policy='ttl', got None
    """

    policy: str = "lru"
    budget_bytes: Optional[int] = None
    ttl_s: Optional[float] = None
    priority: int = 0
    dtype: Optional[str] = None
    enabled: bool = True

    POLICIES: ClassVar[Tuple[str, ...]] = ("lru", "lfu", "fifo", "ttl")
    DTYPES: ClassVar[Tuple[str, ...]] = ("float32", "float16", "bfloat16")
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("budget_bytes", "ttl_s", "dtype")

    def validate(self) -> None:
        owner = self._owner()
        self._set("policy", check_choice(owner, "policy", self.policy, self.POLICIES))
        self._set("budget_bytes", check_opt_int(owner, "budget_bytes", self.budget_bytes))
        self._set("ttl_s", check_positive_float(owner, "ttl_s", self.ttl_s, optional=True))
        self._set("priority", check_any_int(owner, "priority", self.priority))
        self._set("dtype", check_choice(owner, "dtype", self.dtype, self.DTYPES + (None,)))
        self._set("enabled", check_bool(owner, "enabled", self.enabled))
        if self.policy == "ttl" and self.ttl_s is None:
            raise fail(owner, "ttl_s", "must be set for policy='ttl'", self.ttl_s)


@config_dataclass
class CacheConfig(ConfigBase):
    """The tensor cache: a global byte budget and a policy per modality.

    Parameters
    ----------
    enabled : bool, default True
        False: nothing is cached.
    global_budget_bytes : int, default 512 MiB
        Bytes the whole cache may hold (>= 1); it must cover the sum of the per-modality
        budgets.
    default : CachePolicy, default CachePolicy()
        The policy of every modality without an entry of its own.
    per_modality : dict of Modality -> CachePolicy, default {}
        Per-modality entries (keys may be string forms; stored as a :class:`ModalityMap`).
        In a :class:`MultiModalConfig` a modality's entry may instead be written as
        :attr:`ModalityConfig.cache`, not both.

    Examples
    --------
    >>> from mmcore.config import CacheConfig, CachePolicy
    >>> cfg = CacheConfig(global_budget_bytes=2**30,
    ...                   per_modality={"image": CachePolicy(budget_bytes=2**28)})
    >>> cfg.policy_for("image").budget_bytes, cfg.policy_for("text") == cfg.default
    (268435456, True)
    """

    enabled: bool = True
    global_budget_bytes: int = 512 * 2**20
    default: CachePolicy = field(default_factory=CachePolicy)
    per_modality: Mapping[Modality, CachePolicy] = field(default_factory=dict)

    _NESTED: ClassVar[Dict[str, Tuple[str, Any]]] = {
        "default": ("one", CachePolicy), "per_modality": ("map", CachePolicy)}

    def validate(self) -> None:
        owner = self._owner()
        self._set("enabled", check_bool(owner, "enabled", self.enabled))
        self._set("global_budget_bytes", check_int(owner, "global_budget_bytes",
                                                   self.global_budget_bytes))
        self._set("default", check_nested(owner, "default", self.default, CachePolicy))
        if not isinstance(self.per_modality, Mapping):
            raise fail(owner, "per_modality", "must be a dict of Modality -> CachePolicy",
                       self.per_modality)
        items = []
        seen = set()
        for key, value in self.per_modality.items():
            m = check_modality(owner, "per_modality", key)
            if m in seen:
                raise fail(owner, "per_modality", f"has modality {str(m)!r} twice", key)
            seen.add(m)
            items.append((m, check_nested(owner, f"per_modality[{str(m)!r}]", value, CachePolicy)))
        self._set("per_modality", ModalityMap(items))
        limit = self.global_budget_bytes
        named = [("default", self.default)] + [(f"per_modality[{str(m)!r}]", p)
                                               for m, p in self.per_modality.items()]
        for where, pol in named:
            if pol.budget_bytes is not None and pol.budget_bytes > limit:
                raise fail(owner, f"{where}.budget_bytes",
                           f"must be <= global_budget_bytes={limit}", pol.budget_bytes)
        total = sum(p.budget_bytes or 0 for p in self.per_modality.values())
        if total > limit:
            raise fail(owner, "global_budget_bytes",
                       f"must be >= the sum of the per-modality budgets ({total})", limit)

    def policy_for(self, modality: Any) -> CachePolicy:
        """The policy of ``modality``: its entry in :attr:`per_modality`, else :attr:`default`."""
        m = Modality(modality)
        return self.per_modality[m] if m in self.per_modality else self.default
