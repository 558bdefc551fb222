"""Fusion strategies (a tagged union on ``"type"``) and the registry of custom fusion
functions."""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

from ..errors import ConfigError, ModalityError
from ..modality import Modality
from .base import ConfigBase, config_dataclass, hash_part, to_plain
from .checks import check_choice, check_extra, check_int, check_modality, fail
from .mapping import ModalityMap

__all__ = ["FusionStrategy", "EarlyFusion", "MiddleFusion", "LateFusion", "AttentionFusion",
           "CustomFusion", "register_fusion", "unregister_fusion", "get_fusion",
           "registered_fusions", "registered_name"]


_FUSION_TYPES: Dict[str, Any] = {}
_FUSION_REGISTRY: Dict[str, Callable[..., Any]] = {}
_REGISTRY_LOCK = threading.Lock()


def register_fusion(name: str, fn: Optional[Callable[..., Any]] = None, *,
                    overwrite: bool = False) -> Any:
    """Register a fusion function under ``name`` for :class:`CustomFusion`.

    Registering is what lets a config that uses the function be saved (the name is written)
    and loaded again (the name is looked up). Usable as a decorator:
    ``@register_fusion("gated")``.

    Parameters
    ----------
    name : str
        Non-empty, no surrounding spaces.
    fn : callable, optional
        The function; omitted: returns a decorator.
    overwrite : bool, default False
        Replace a different function already registered under ``name`` (otherwise that
        raises :class:`ConfigError`). Registering the same function again is a no-op.

    Returns
    -------
    callable
        ``fn`` (or the decorator).

    Examples
    --------
    >>> from mmcore.config import CustomFusion, register_fusion, unregister_fusion
    >>> @register_fusion("first_modality")
    ... def first(embeddings, **options):
    ...     return next(iter(embeddings.values()))
    >>> CustomFusion(first).to_dict()
    {'type': 'custom', 'fn': 'first_modality', 'options': {}}
    >>> unregister_fusion("first_modality") is first
    True
    """
    if fn is None:
        def decorator(f: Callable[..., Any]) -> Callable[..., Any]:
            return register_fusion(name, f, overwrite=overwrite)
        return decorator
    if not isinstance(name, str) or not name or name != name.strip():
        raise ConfigError(f"register_fusion.name must be a non-empty string without "
                          f"surrounding spaces, got {name!r}")
    if not callable(fn):
        raise ConfigError(f"register_fusion.fn must be callable, got {fn!r}")
    with _REGISTRY_LOCK:
        old = _FUSION_REGISTRY.get(name)
        if old is not None and old is not fn and not overwrite:
            raise ConfigError(f"register_fusion.name {name!r} is already registered to "
                              f"{old!r} (pass overwrite=True to replace it)")
        _FUSION_REGISTRY[name] = fn
    return fn


def unregister_fusion(name: str) -> Callable[..., Any]:
    """Remove ``name`` from the fusion registry and return its function."""
    with _REGISTRY_LOCK:
        if name not in _FUSION_REGISTRY:
            raise ConfigError(f"unregister_fusion.name {name!r} is not registered")
        return _FUSION_REGISTRY.pop(name)


def get_fusion(name: str) -> Callable[..., Any]:
    """The function registered under ``name`` (:class:`ConfigError` if there is none)."""
    with _REGISTRY_LOCK:
        fn = _FUSION_REGISTRY.get(name) if isinstance(name, str) else None
        known = sorted(_FUSION_REGISTRY)
    if fn is None:
        raise ConfigError(f"fusion {name!r} is not registered (registered: "
                          f"{', '.join(map(repr, known)) or 'none'}); call "
                          "mmcore.config.register_fusion(name, fn) first")
    return fn


def registered_fusions() -> Tuple[str, ...]:
    """The registered fusion names, sorted."""
    with _REGISTRY_LOCK:
        return tuple(sorted(_FUSION_REGISTRY))


def registered_name(fn: Any) -> Optional[str]:
    """The name ``fn`` is registered under (compared by identity, then by ``==``), or None."""
    with _REGISTRY_LOCK:
        for name, f in _FUSION_REGISTRY.items():
            if f is fn:
                return name
        for name, f in _FUSION_REGISTRY.items():
            try:
                if f == fn:  # bound methods are new objects on every access
                    return name
            except Exception:  # pragma: no cover - an odd __eq__
                continue
    return None


class FusionStrategy(ConfigBase):
    """How the per-modality embeddings become one fused embedding (abstract).

    The strategies are :class:`EarlyFusion`, :class:`MiddleFusion`, :class:`LateFusion`,
    :class:`AttentionFusion` and :class:`CustomFusion`. Their dictionaries are tagged with a
    ``"type"`` key (``"early"``, ``"middle"``, ``"late"``, ``"attention"``, ``"custom"``);
    :meth:`FusionStrategy.from_dict` picks the class from it.

    Examples
    --------
    >>> from mmcore.config import FusionStrategy, MiddleFusion
    >>> MiddleFusion(fusion_layer=2).to_dict()
    {'type': 'middle', 'fusion_layer': 2}
    >>> FusionStrategy.from_dict({"type": "late", "reduce": "max"})
    LateFusion(reduce='max', weights=None)
    >>> FusionStrategy.from_name("early")
    EarlyFusion()
    """

    TYPE: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is FusionStrategy:
            raise TypeError("FusionStrategy is abstract: use EarlyFusion(), MiddleFusion(k), "
                            "LateFusion(reduce), AttentionFusion(attention_dim) or "
                            "CustomFusion(fn)")
        return super().__new__(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        tag = cls.__dict__.get("TYPE")
        if tag:
            _FUSION_TYPES[tag] = cls

    @classmethod
    def types(cls) -> Tuple[str, ...]:
        """The ``"type"`` tags, in definition order."""
        return tuple(_FUSION_TYPES)

    @classmethod
    def _lookup(cls, tag: Any, owner: str) -> Any:
        sub = _FUSION_TYPES.get(tag.strip().lower()) if isinstance(tag, str) else None
        if sub is None:
            shown = " | ".join(repr(t) for t in _FUSION_TYPES)
            raise ConfigError(f"{owner}.type must be one of {shown}, got {tag!r}")
        return sub

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"type": self.TYPE}
        out.update(super().to_dict())
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Build a strategy from its tagged dictionary (the tag is optional on a subclass)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict expects a mapping of field names, "
                              f"got {type(data).__name__}")
        data = dict(data)
        tag = data.pop("type", None)
        if cls is FusionStrategy:
            if tag is None:
                raise ConfigError("FusionStrategy.type is missing: a fusion mapping needs "
                                  f"'type' ({' | '.join(map(repr, _FUSION_TYPES))})")
            return cls._lookup(tag, "FusionStrategy").from_dict(data)
        if tag is not None and cls._lookup(tag, cls.__name__) is not cls:
            raise ConfigError(f"{cls.__name__}.type must be {cls.TYPE!r}, got {tag!r}")
        return super().from_dict(data)

    @classmethod
    def from_name(cls, tag: str) -> "FusionStrategy":
        """The strategy of type ``tag`` with its default settings."""
        sub = cls._lookup(tag, "FusionStrategy")
        try:
            return sub()
        except TypeError:
            raise ConfigError(f"FusionStrategy.type {tag!r} needs arguments "
                              f"({sub.__name__}); give a mapping or an instance") from None

    @classmethod
    def _toml_nones(cls, data: Mapping[str, Any], *, writing: bool) -> Dict[str, Any]:
        if cls is FusionStrategy:
            tag = data.get("type")
            sub = _FUSION_TYPES.get(tag.strip().lower()) if isinstance(tag, str) else None
            return sub._toml_nones(data, writing=writing) if sub else dict(data)
        return super()._toml_nones(data, writing=writing)


@config_dataclass
class EarlyFusion(FusionStrategy):
    """Fuse before encoding: the projected token sequences of all modalities are concatenated
    (in modality order) and encoded together.

    Examples
    --------
    >>> from mmcore.config import EarlyFusion
    >>> EarlyFusion().to_dict()
    {'type': 'early'}
    """

    TYPE: ClassVar[str] = "early"

    def validate(self) -> None:
        pass


@config_dataclass
class MiddleFusion(FusionStrategy):
    """Fuse inside the encoders: each modality runs ``fusion_layer`` blocks of its own encoder,
    then the token sequences are joined and the remaining blocks run on the joint sequence.

    Parameters
    ----------
    fusion_layer : int
        Blocks before fusing (>= 0); at most the ``encoder_config.num_layers`` of every
        modality. Only built-in encoders expose their blocks, so every modality of a
        :class:`MultiModalConfig` with middle fusion must use ``encoder="builtin"``.

    Examples
    --------
    >>> from mmcore.config import MiddleFusion
    >>> MiddleFusion(fusion_layer=-1)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: MiddleFusion.fusion_layer must be an integer >= 0, got -1
    """

    fusion_layer: int
    TYPE: ClassVar[str] = "middle"

    def validate(self) -> None:
        self._set("fusion_layer", check_int(self._owner(), "fusion_layer", self.fusion_layer,
                                            minimum=0))


@config_dataclass
class LateFusion(FusionStrategy):
    """Fuse after encoding: the pooled embeddings of the modalities are reduced into one
    (``mmcore.ops.fuse``).

    Parameters
    ----------
    reduce : {"mean", "sum", "max", "concat", "weighted", "attention"}, default "mean"
        The reduction over modalities. "concat" keeps every modality's width and joins them in
        modality order (a disabled or missing modality contributes zeros, so the width does
        not change at run time); the others need one common width (``fused_dim``).
        "attention" scores modalities with one learned query (softmax over modalities).
    weights : dict of Modality -> float or None, default None
        Fixed weights for ``reduce="weighted"`` (finite, >= 0, not all 0); None: the weights
        come from the model's weights file, or are uniform. Only with "weighted".

    Examples
    --------
    >>> from mmcore.config import LateFusion
    >>> LateFusion(reduce="weighted", weights={"text": 2, "image": 1}).to_dict()
    {'type': 'late', 'reduce': 'weighted', 'weights': {'text': 2.0, 'image': 1.0}}
    """

    reduce: str = "mean"
    weights: Optional[Mapping[Modality, float]] = None

    TYPE: ClassVar[str] = "late"
    REDUCTIONS: ClassVar[Tuple[str, ...]] = ("mean", "sum", "max", "concat", "weighted",
                                             "attention")
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("weights",)

    def validate(self) -> None:
        owner = self._owner()
        self._set("reduce", check_choice(owner, "reduce", self.reduce, self.REDUCTIONS))
        w = self.weights
        if w is None:
            return
        if self.reduce != "weighted":
            raise fail(owner, "weights", "applies to reduce='weighted' only (this is "
                        f"reduce={self.reduce!r})", w)
        if not isinstance(w, Mapping) or not w:
            raise fail(owner, "weights", "must be a non-empty dict of Modality -> weight", w)
        items: List[Tuple[Modality, float]] = []
        for key, value in w.items():
            m = check_modality(owner, "weights", key)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not math.isfinite(float(value)) or float(value) < 0):
                raise fail(owner, f"weights[{str(m)!r}]", "must be a finite number >= 0",
                           value)
            items.append((m, float(value)))
        try:
            wm = ModalityMap(items)
        except ModalityError as exc:
            raise fail(owner, "weights", f"has a modality twice ({exc})", dict(w)) from None
        if not any(v > 0 for v in wm.values()):
            raise fail(owner, "weights", "must have at least one weight > 0", dict(w))
        self._set("weights", wm)


@config_dataclass
class AttentionFusion(FusionStrategy):
    """Fuse by attention over the token sequences of all modalities: a learned query attends,
    with ``num_heads`` heads of total width ``attention_dim``, to the projected tokens of
    every enabled modality; the result is projected to the common width.

    Parameters
    ----------
    attention_dim : int, default 512
        Width of the attention (>= 1, divisible by ``num_heads``).
    num_heads : int, default 8

    Examples
    --------
    >>> from mmcore.config import AttentionFusion
    >>> AttentionFusion(attention_dim=500)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: AttentionFusion.attention_dim must be divisible by num_heads=8, got 500
    """  # noqa: E501

    attention_dim: int = 512
    num_heads: int = 8
    TYPE: ClassVar[str] = "attention"

    def validate(self) -> None:
        owner = self._owner()
        self._set("attention_dim", check_int(owner, "attention_dim", self.attention_dim))
        self._set("num_heads", check_int(owner, "num_heads", self.num_heads))
        if self.attention_dim % self.num_heads:
            raise fail(owner, "attention_dim", f"must be divisible by num_heads="
                       f"{self.num_heads}", self.attention_dim)


@config_dataclass
class CustomFusion(FusionStrategy):
    """Fuse with a function of your own.

    The model calls ``fn(embeddings, **options)`` with ``embeddings`` a dict of
    :class:`~mmcore.modality.Modality` -> pooled embedding ``(B, D)`` float32 array (enabled
    modalities that are present, in modality order; each already projected to the common
    width) and expects a ``(B, D_out)`` array back.

    Parameters
    ----------
    fn : callable or str
        The function, or the name it was registered under (:func:`register_fusion`). A
        registered function is stored by its name (so ``fn`` then holds the name;
        :meth:`resolve` gives the function). A function that is not registered works in
        memory, but the config cannot be saved (:meth:`to_dict` raises ConfigError).
        A name must be registered when the config is built.
    options : dict, default {}
        JSON-friendly keyword arguments passed to the function.

    Examples
    --------
    >>> from mmcore.config import CustomFusion, register_fusion, unregister_fusion
    >>> _ = register_fusion("pick_text", lambda e, **o: e["text"])
    >>> CustomFusion("pick_text", options={"scale": 2}).to_dict()
    {'type': 'custom', 'fn': 'pick_text', 'options': {'scale': 2}}
    >>> _ = unregister_fusion("pick_text")
    >>> CustomFusion("pick_text")
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: CustomFusion.fn: fusion 'pick_text' is not registered (registered: none); call mmcore.config.register_fusion(name, fn) first
    """  # noqa: E501

    fn: Any
    options: Dict[str, Any] = field(default_factory=dict)
    TYPE: ClassVar[str] = "custom"

    def validate(self) -> None:
        owner = self._owner()
        fn = self.fn
        if isinstance(fn, str):
            try:
                get_fusion(fn)
            except ConfigError as exc:
                raise ConfigError(f"{owner}.fn: {exc}") from None
        elif callable(fn):
            name = registered_name(fn)
            if name is not None:
                self._set("fn", name)
        else:
            raise fail(owner, "fn", "must be a callable or the name of a registered fusion",
                       fn)
        self._set("options", check_extra(owner, "options", self.options))

    @property
    def name(self) -> Optional[str]:
        """The registered name of the function, or None."""
        return self.fn if isinstance(self.fn, str) else registered_name(self.fn)

    def resolve(self) -> Callable[..., Any]:
        """The function itself (looked up in the registry when stored by name)."""
        if isinstance(self.fn, str):
            try:
                return get_fusion(self.fn)
            except ConfigError as exc:
                raise ConfigError(f"{self._owner()}.fn: {exc}") from None
        return self.fn

    def to_dict(self) -> Dict[str, Any]:
        name = self.name
        if name is None:
            raise ConfigError(f"{self._owner()}.fn: the callable {self.fn!r} is not registered, "
                              "so the config cannot be written; register it with "
                              "mmcore.config.register_fusion(name, fn)")
        return {"type": self.TYPE, "fn": name, "options": to_plain(self.options)}

    def _hash_key(self) -> Any:
        key = self.fn if isinstance(self.fn, str) else ("callable", hash_part(self.fn))
        return (key, hash_part(self.options))
