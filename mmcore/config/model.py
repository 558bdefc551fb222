"""Model configs: the encoder of one modality (:class:`EncoderConfig`), one modality
(:class:`ModalityConfig`), cross-modal attention (:class:`CrossModalAttentionConfig`) and the
whole model (:class:`MultiModalConfig`)."""

from __future__ import annotations

from dataclasses import field
from typing import Any, ClassVar, Dict, Iterable, List, Mapping, Optional, Tuple

from .._precision import PRECISIONS
from ..errors import ConfigError, ModalityError
from ..modality import Modality
from .base import ConfigBase, config_dataclass
from .cache import CacheConfig, CachePolicy
from .checks import (
    check_any_int,
    check_bool,
    check_choice,
    check_extra,
    check_fraction,
    check_int,
    check_modality,
    check_nested,
    check_opt_int,
    check_positive_float,
    check_text,
    fail,
    modality_names,
)
from .fusion import FusionStrategy, LateFusion, MiddleFusion
from .mapping import ModalityMap
from .preprocessing import MODALITY_DEFAULT, PreprocessingConfig

__all__ = ["EncoderConfig", "ModalityConfig", "CrossModalAttentionConfig", "MultiModalConfig"]


# --------------------------------------------------------------------------------------------
# encoders

@config_dataclass
class EncoderConfig(ConfigBase):
    """Hyperparameters of the encoder of one modality.

    Read by the built-in encoders of :mod:`mmcore.model` (a pre-norm transformer stack of
    ``num_layers`` blocks); encoders of other kinds (``"external"``, ``"onnx"``, ``"remote"``)
    ignore everything here except what their owner chooses to read (``extra``, say).

    Parameters
    ----------
    num_layers : int, default 4
        Transformer blocks (>= 0; 0: the encoder is its input embedding alone).
        :class:`MiddleFusion` fuses after block ``fusion_layer``, which must be <= this.
    num_heads : int, default 8
        Self-attention heads; they divide the encoder width (``hidden_dim``, or the modality's
        ``embed_dim`` when ``hidden_dim`` is None; checked by :class:`ModalityConfig` for
        built-in encoders).
    hidden_dim : int or None, default None
        Width of the blocks; None: the modality's ``embed_dim``. When it differs, a final
        linear projection maps it to ``embed_dim``.
    mlp_ratio : float, default 4.0
        Width of the feed-forward layer relative to the block width (> 0).
    max_positions : int or None, default None
        Length of the learned position table; None: derived from the preprocessing (longest
        sequence it can produce).
    patch_size : int or None, default None
        Patch edge of the patch embedding (image and video; audio spectrogram patches).
        Not for text. When the preprocessing patchifies (``preprocessing.patch_size``), both
        must agree.
    vocab_size : int or None, default None
        Token vocabulary (text and custom modalities only); None: the tokenizer's.
    activation : {"gelu", "gelu_tanh", "quick_gelu", "relu"}, default "gelu"
        The feed-forward activation (``mmcore.model.nn.get_activation`` names; "quick_gelu"
        is CLIP's).
    norm_eps : float, default 1e-5
        Epsilon of the layer norms (> 0).
    pooling : {"mean", "cls", "max"}, default "mean"
        How a token sequence becomes the modality's pooled embedding: masked mean, a learned
        class token (position 0), or masked max.
    extra : dict, default {}
        Free-form, JSON-friendly options for a particular encoder.

    Examples
    --------
    >>> from mmcore.config import EncoderConfig
    >>> EncoderConfig(num_layers=12, num_heads=12, patch_size=16).patch_size
    16
    >>> EncoderConfig(num_heads=0)
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: EncoderConfig.num_heads must be an integer >= 1, got 0
    """

    num_layers: int = 4
    num_heads: int = 8
    hidden_dim: Optional[int] = None
    mlp_ratio: float = 4.0
    max_positions: Optional[int] = None
    patch_size: Optional[int] = None
    vocab_size: Optional[int] = None
    activation: str = "gelu"
    norm_eps: float = 1e-5
    pooling: str = "mean"
    extra: Dict[str, Any] = field(default_factory=dict)

    ACTIVATIONS: ClassVar[Tuple[str, ...]] = ("gelu", "gelu_tanh", "quick_gelu", "relu")
    POOLINGS: ClassVar[Tuple[str, ...]] = ("mean", "cls", "max")
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = (
        "hidden_dim", "max_positions", "patch_size", "vocab_size")

    def validate(self) -> None:
        owner = self._owner()
        self._set("num_layers", check_int(owner, "num_layers", self.num_layers, minimum=0))
        self._set("num_heads", check_int(owner, "num_heads", self.num_heads))
        for name in self._OPTIONAL_FIELDS:
            self._set(name, check_opt_int(owner, name, getattr(self, name)))
        self._set("mlp_ratio", check_positive_float(owner, "mlp_ratio", self.mlp_ratio))
        self._set("activation", check_choice(owner, "activation", self.activation,
                                             self.ACTIVATIONS))
        self._set("norm_eps", check_positive_float(owner, "norm_eps", self.norm_eps))
        self._set("pooling", check_choice(owner, "pooling", self.pooling, self.POOLINGS))
        self._set("extra", check_extra(owner, "extra", self.extra))
        if self.hidden_dim is not None and self.hidden_dim % self.num_heads:
            raise fail(owner, "hidden_dim", f"must be divisible by num_heads={self.num_heads}",
                       self.hidden_dim)



# --------------------------------------------------------------------------------------------
# one modality

@config_dataclass
class ModalityConfig(ConfigBase):
    """Everything about one modality of a :class:`MultiModalConfig`.

    Parameters
    ----------
    modality : Modality or str
        Which modality (stored as a :class:`~mmcore.modality.Modality`).
    enabled : bool, default True
        Whether the model encodes this modality. Disabled modalities stay configured (their
        weights loaded) and can be switched on again at run time
        (:meth:`MultiModalConfig.with_enabled`); inputs given for them are ignored.
    required : bool, default False
        Whether every request must carry this modality. A required modality cannot be
        disabled.
    preprocessing : PreprocessingConfig, mapping or None, default: the modality's defaults
        How raw inputs become features. For a built-in modality it must be a
        :class:`PreprocessingConfig` of that modality (a mapping may leave out ``modality``);
        by default it is ``PreprocessingConfig(modality=...)``. A custom modality has no
        preprocessing by default, but may borrow any of the four preprocessors (its mapping
        then names the ``modality`` of the preprocessor). None: inputs arrive as features.
    encoder : {"builtin", "external", "onnx", "remote"}, default "builtin"
        What encodes the features: an encoder of :mod:`mmcore.model` built from
        ``encoder_config``; a Python callable handed to the loader
        (``MultiModalLoader.with_encoder``); an ONNX file (its path from
        ``MultiModalLoader.with_modality_path`` or ``extra``); or an encoder on a shard node of
        :mod:`mmcore.distributed`.
    embed_dim : int, default 512
        Width of the embeddings this modality's encoder produces (tokens and pooled).
    encoder_config : EncoderConfig or mapping, default EncoderConfig()
        Hyperparameters of a built-in encoder.
    priority : int, default 0
        Importance of the modality: higher priorities are encoded first and placed first by
        the shard coordinator; ties follow the modality order.
    quantization : {None, "float16", "bfloat16", "int8"}, default None
        Storage of the encoder weights: None keeps float32; "float16"/"bfloat16" store half
        precision; "int8" is weight-only (per-output-channel scales, activations stay
        float32). On disk and, for the matrices of the linear layers and attention
        projections, in memory too; compute is float32 unless ``matmul_precision`` says
        otherwise. Packed forms come on top, once used: float16 / bfloat16 matrices are widened
        to a float32 pack once (so they are as fast as float32 ones), int8 ones are read in
        place under "highest" (small, widened per call) and packed for "bf16" / "int8". Not for ``encoder="external"`` (a
        callable mmcore does not own).
    cache : CachePolicy, mapping or None, default None
        This modality's cache entry; None: :attr:`CacheConfig.per_modality` or
        :attr:`CacheConfig.default` decides (see :meth:`MultiModalConfig.cache_policy`).
    extra : dict, default {}
        Free-form, JSON-friendly options.
    matmul_precision : {None, "highest", "bf16", "int8"}, default None
        The arithmetic of the matrix products while the model encodes this modality (see
        :func:`mmcore.set_matmul_precision`): ``"highest"`` is exact float32 (quantized
        weights give the bits of their float32 values); ``"bf16"`` rounds both operands to
        bfloat16 and accumulates in float32; ``"int8"`` quantizes the activations per row
        (dynamic, as ONNX Runtime) and the weights per output row (int8 weights as stored) and
        accumulates exactly in int32. None: whatever the thread or the process has set (by
        default ``"highest"``). The model encodes the modality under
        ``mmcore.matmul_precision(...)`` when it is set, and its per-item cache keys carry the
        precision in effect, so results of one precision are never served for another. Not
        for ``encoder="onnx"`` (the ONNX runtime decides its own arithmetic). Left out of
        :meth:`to_dict` (so of files and :meth:`digest`) while None: configs without it keep
        the files and digests they had.

    Examples
    --------
    >>> from mmcore.config import ModalityConfig
    >>> from mmcore.modality import Modality
    >>> img = ModalityConfig(Modality.IMAGE, embed_dim=768,
    ...                      encoder_config={"num_layers": 12, "num_heads": 12})
    >>> img.modality, img.preprocessing.preset, img.encoder_config.num_layers
    (Modality.IMAGE, 'clip', 12)
    >>> ModalityConfig("custom:7", encoder="external").preprocessing is None
    True
    >>> ModalityConfig("text", quantization="int4")
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: ModalityConfig.quantization must be one of 'float16' | 'bfloat16' | 'int8' | None, got 'int4'
    >>> fast = ModalityConfig("text", matmul_precision="INT8")
    >>> fast.matmul_precision, fast.to_dict()["matmul_precision"]
    ('int8', 'int8')
    >>> "matmul_precision" in ModalityConfig("text").to_dict()
    False
    >>> ModalityConfig("text", matmul_precision="fp16")
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: ModalityConfig.matmul_precision must be one of 'highest' | 'bf16' | 'int8' | None, got 'fp16'
    """  # noqa: E501

    modality: Modality
    enabled: bool = True
    required: bool = False
    preprocessing: Optional[PreprocessingConfig] = MODALITY_DEFAULT
    encoder: str = "builtin"
    embed_dim: int = 512
    encoder_config: EncoderConfig = field(default_factory=EncoderConfig)
    priority: int = 0
    quantization: Optional[str] = None
    cache: Optional[CachePolicy] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    matmul_precision: Optional[str] = None

    ENCODERS: ClassVar[Tuple[str, ...]] = ("builtin", "external", "onnx", "remote")
    QUANTIZATIONS: ClassVar[Tuple[str, ...]] = ("float16", "bfloat16", "int8")
    MATMUL_PRECISIONS: ClassVar[Tuple[str, ...]] = PRECISIONS
    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("preprocessing", "quantization", "cache",
                                                   "matmul_precision")
    # left out of to_dict while None (the files and digests of configs without them are kept)
    _OMIT_WHEN_NONE: ClassVar[Tuple[str, ...]] = ("matmul_precision",)
    _NESTED: ClassVar[Dict[str, Tuple[str, Any]]] = {
        "preprocessing": ("one", PreprocessingConfig), "encoder_config": ("one", EncoderConfig),
        "cache": ("one", CachePolicy)}

    def validate(self) -> None:
        owner = self._owner()
        m = check_modality(owner, "modality", self.modality)
        self._set("modality", m)
        self._set("enabled", check_bool(owner, "enabled", self.enabled))
        self._set("required", check_bool(owner, "required", self.required))
        if self.required and not self.enabled:
            raise fail(owner, "enabled", f"cannot be False for modality {str(m)!r}, which is "
                       "required (required=True)", self.enabled)
        self._set("encoder", check_choice(owner, "encoder", self.encoder, self.ENCODERS))
        self._set("embed_dim", check_int(owner, "embed_dim", self.embed_dim))
        self._set("encoder_config", check_nested(owner, "encoder_config", self.encoder_config,
                                                 EncoderConfig))
        self._set("priority", check_any_int(owner, "priority", self.priority))
        self._set("quantization", check_choice(owner, "quantization", self.quantization,
                                               self.QUANTIZATIONS + (None,)))
        if self.quantization is not None and self.encoder == "external":
            raise fail(owner, "quantization", "applies to 'builtin', 'onnx' and 'remote' "
                       "encoders, not encoder='external'", self.quantization)
        self._set("cache", check_nested(owner, "cache", self.cache, CachePolicy, optional=True))
        self._set("extra", check_extra(owner, "extra", self.extra))
        self._set("matmul_precision", check_choice(owner, "matmul_precision",
                                                   self.matmul_precision,
                                                   self.MATMUL_PRECISIONS + (None,)))
        if self.matmul_precision is not None and self.encoder == "onnx":
            raise fail(owner, "matmul_precision", "applies to 'builtin', 'external' and "
                       "'remote' encoders, not encoder='onnx' (the ONNX runtime decides its "
                       "own arithmetic)", self.matmul_precision)
        self._validate_preprocessing(m)

        ec = self.encoder_config
        if self.encoder == "builtin":
            width = ec.hidden_dim if ec.hidden_dim is not None else self.embed_dim
            if width % ec.num_heads:
                raise fail(owner, "encoder_config.num_heads", f"must divide the encoder width "
                           f"{width} (encoder_config.hidden_dim, else embed_dim)", ec.num_heads)
        if ec.vocab_size is not None and m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO):
            raise fail(owner, "encoder_config.vocab_size", "applies to text and custom "
                       f"modalities only (this is {str(m)!r})", ec.vocab_size)
        if ec.patch_size is not None and m == Modality.TEXT:
            raise fail(owner, "encoder_config.patch_size", "does not apply to text",
                       ec.patch_size)
        pre = self.preprocessing
        if (pre is not None and pre.modality in ("image", "video") and ec.patch_size is not None
                and pre.patch_size is not None and pre.patch_size != ec.patch_size):
            raise fail(owner, "encoder_config.patch_size", "must equal preprocessing."
                       f"patch_size={pre.patch_size} (the inputs arrive patchified)",
                       ec.patch_size)

    def _validate_preprocessing(self, m: Modality) -> None:
        owner = self._owner()
        pre = self.preprocessing
        if pre is MODALITY_DEFAULT:
            pre = None if m.is_custom else PreprocessingConfig(modality=str(m))
        elif isinstance(pre, Mapping) and "modality" not in pre:
            if m.is_custom:
                raise fail(owner, "preprocessing", f"of custom modality {str(m)!r} must name "
                           "the preprocessor it borrows ('modality': 'audio', 'image', "
                           "'video' or 'text')", dict(pre))
            pre = dict(pre, modality=str(m))
        pre = check_nested(owner, "preprocessing", pre, PreprocessingConfig, optional=True)
        if pre is not None and not m.is_custom and pre.modality != str(m):
            raise fail(owner, "preprocessing", f"must be for modality {str(m)!r}, it is for "
                       f"{pre.modality!r}", pre.modality)
        self._set("preprocessing", pre)

    def to_dict(self) -> Dict[str, Any]:
        """A plain, JSON-serializable dictionary of the fields (nested configs as dicts);
        ``matmul_precision`` only when set, so configs without it keep their files and
        digests."""
        out = super().to_dict()
        for name in self._OMIT_WHEN_NONE:
            if out.get(name, 0) is None:
                del out[name]
        return out



# --------------------------------------------------------------------------------------------
# cross-modal attention

@config_dataclass
class CrossModalAttentionConfig(ConfigBase):
    """Cross-modal attention between the token sequences of the modalities.

    For each pair ``(query, context)`` the tokens of the query modality attend to the tokens
    of the context modality (``mmcore.ops.attention`` with the query modality's tokens as
    ``q`` and the context modality's as ``k`` and ``v``; padded context tokens are masked),
    and the result is added to the query tokens. The query width is projected to
    ``num_heads * head_dim`` and back.

    Parameters
    ----------
    num_heads : int, default 8
    head_dim : int or None, default None
        Width of one head; None: the query modality's ``embed_dim / num_heads`` (which must
        then be an integer; :class:`MultiModalConfig` checks it).
    dropout : float in [0, 1), default 0.0
        Attention dropout. Kept so that configs written for training load and round-trip;
        it is inactive at inference (mmcore never applies it when running a model).
    temperature : float, default 1.0
        Scores are divided by it (> 0): ``softmax(q . k * scale / temperature)``.
    pairs : "all" or list of (query, context), default "all"
        Which modalities attend to which. Each pair is two distinct modalities (Modality
        objects or string forms; ``"text->image"`` is accepted too); no pair may repeat.
        ``"all"``: every ordered pair of distinct enabled modalities, in modality order.
        Pairs that involve a disabled modality are skipped at run time.
    return_weights : bool, default False
        Return the attention weights (materializes an ``(Lq, Lk)`` matrix per pair and head).
    scale : float or None, default None
        Score scale (> 0); None: ``1 / sqrt(head_dim)``.

    Examples
    --------
    >>> from mmcore.config import CrossModalAttentionConfig
    >>> ca = CrossModalAttentionConfig(num_heads=4, pairs=[("text", "image"), "audio->text"])
    >>> [(str(q), str(c)) for q, c in ca.pairs]
    [('text', 'image'), ('audio', 'text')]
    >>> CrossModalAttentionConfig(pairs=[("text", "text")])
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: CrossModalAttentionConfig.pairs[0] must pair two different modalities, got ('text', 'text')
    """  # noqa: E501

    num_heads: int = 8
    head_dim: Optional[int] = None
    dropout: float = 0.0
    temperature: float = 1.0
    pairs: Any = "all"
    return_weights: bool = False
    scale: Optional[float] = None

    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("head_dim", "scale")

    def validate(self) -> None:
        owner = self._owner()
        self._set("num_heads", check_int(owner, "num_heads", self.num_heads))
        self._set("head_dim", check_opt_int(owner, "head_dim", self.head_dim))
        self._set("dropout", check_fraction(owner, "dropout", self.dropout))
        self._set("temperature", check_positive_float(owner, "temperature", self.temperature))
        self._set("scale", check_positive_float(owner, "scale", self.scale, optional=True))
        self._set("return_weights", check_bool(owner, "return_weights", self.return_weights))
        self._set("pairs", self._check_pairs(self.pairs))

    def _check_pairs(self, pairs: Any) -> Any:
        owner = self._owner()
        expected = "must be 'all' or a list of (query, context) modality pairs"
        if isinstance(pairs, str):
            if pairs.strip().lower() == "all":
                return "all"
            raise fail(owner, "pairs", expected, pairs)
        if not isinstance(pairs, (list, tuple)):
            raise fail(owner, "pairs", expected, pairs)
        if not pairs:
            raise fail(owner, "pairs", "must hold at least one (query, context) pair, or be "
                       "'all'", pairs)
        out: List[Tuple[Modality, Modality]] = []
        for i, pair in enumerate(pairs):
            where = f"pairs[{i}]"
            if isinstance(pair, str) and "->" in pair:
                items: Any = [p.strip() for p in pair.split("->")]
            else:
                items = pair
            if isinstance(items, str) or not isinstance(items, (list, tuple)) or len(items) != 2:
                raise fail(owner, where, "must be a (query, context) pair of modalities or "
                           "'query->context'", pair)
            q = check_modality(owner, where, items[0])
            c = check_modality(owner, where, items[1])
            if q == c:
                raise fail(owner, where, "must pair two different modalities",
                           (str(q), str(c)))
            if (q, c) in out:
                raise fail(owner, where, "repeats an earlier pair", (str(q), str(c)))
            out.append((q, c))
        return tuple(out)

    def resolve_pairs(self, modalities: Iterable[Any]) -> Tuple[Tuple[Modality, Modality], ...]:
        """The pairs among ``modalities``: "all" expanded, explicit pairs filtered.

        Examples
        --------
        >>> from mmcore.config import CrossModalAttentionConfig
        >>> pairs = CrossModalAttentionConfig().resolve_pairs(["image", "text"])
        >>> [(str(q), str(c)) for q, c in pairs]
        [('text', 'image'), ('image', 'text')]
        """
        ms = sorted({Modality(m) for m in modalities})
        if self.pairs == "all":
            return tuple((q, c) for q in ms for c in ms if q != c)
        present = set(ms)
        return tuple(p for p in self.pairs if p[0] in present and p[1] in present)

    def inner_dim(self, query_dim: int) -> int:
        """``num_heads * head_dim`` for a query modality of width ``query_dim``."""
        head = self.head_dim if self.head_dim is not None else query_dim // self.num_heads
        return self.num_heads * head




# --------------------------------------------------------------------------------------------
# the whole model

@config_dataclass
class MultiModalConfig(ConfigBase):
    """The configuration of a multi-modal model.

    Parameters
    ----------
    modalities : dict of Modality -> ModalityConfig, or list of ModalityConfig
        The configured modalities (at least one enabled; none twice). Dictionary keys may be
        string forms and values mappings of :class:`ModalityConfig` fields (the key supplies
        ``modality``). Stored as a :class:`ModalityMap` in modality order.
    fusion : FusionStrategy, mapping or str, default LateFusion()
        A strategy, its tagged mapping (``{"type": "late", "reduce": "max"}``), or a type tag
        whose defaults suffice (``"early"``, ``"late"``, ``"attention"``).
    cross_attention : CrossModalAttentionConfig, mapping or None, default None
        Cross-modal attention between the token sequences before fusion; None: none.
    fused_dim : int or None, default None
        The common width modality embeddings are projected to before fusion (a learned linear
        map per modality whose ``embed_dim`` differs). None: no projection, so all modalities
        must share one ``embed_dim``, except with ``LateFusion(reduce="concat")``, which joins
        the embeddings as they are.
    cache : CacheConfig or mapping, default CacheConfig()
        The tensor cache (its per-modality entries must name configured modalities).
    name : str, default "multimodal"
    version : str, default "1.0"
        Name and version of the model (free-form, written to and read from files).
    extra : dict, default {}
        Free-form, JSON-friendly options.

    Notes
    -----
    Cross-field checks (ConfigError naming the field): at least one enabled modality;
    cross-attention pairs, late-fusion weights and cache entries name configured modalities;
    with ``head_dim=None`` the cross-attention heads divide the ``embed_dim`` of every query
    modality; ``MiddleFusion.fusion_layer`` is at most every modality's encoder depth (and
    every encoder is built-in); differing ``embed_dim`` need ``fused_dim`` (but for concat);
    a modality's cache entry is set in one place; the per-modality cache budgets fit the
    global one. All checks but the first cover every configured modality, enabled or not, so
    switching modalities on and off at run time never makes a valid config invalid.

    Files: :meth:`to_dict` writes ``modalities`` as a table keyed by string form (``"text"``,
    ``"custom:7"``) without the inner ``modality`` key; :meth:`to_json` / :meth:`to_toml`
    write files that :meth:`from_json` / :meth:`from_toml` read back.

    Examples
    --------
    >>> from mmcore.config import (MultiModalConfig, ModalityConfig, CrossModalAttentionConfig,
    ...                            AttentionFusion)
    >>> from mmcore.modality import Modality
    >>> cfg = MultiModalConfig(
    ...     {Modality.TEXT: ModalityConfig(Modality.TEXT, embed_dim=512),
    ...      "image": {"embed_dim": 768, "encoder_config": {"num_heads": 12}}},
    ...     fusion=AttentionFusion(attention_dim=256),
    ...     cross_attention=CrossModalAttentionConfig(pairs=[("text", "image")]),
    ...     fused_dim=512)
    >>> cfg.output_dim, [str(m) for m in cfg.enabled_modalities()]
    (512, ['text', 'image'])
    >>> off = cfg.with_enabled(Modality.IMAGE, False)
    >>> [str(m) for m in off.enabled_modalities()], off.cross_attention_pairs()
    (['text'], ())
    >>> MultiModalConfig([ModalityConfig("text"), ModalityConfig("image", embed_dim=768)])
    Traceback (most recent call last):
    ...
    mmcore.errors.ConfigError: MultiModalConfig.fused_dim must be set when the modality embed dims differ ('text'=512, 'image'=768): each modality is projected to fused_dim before fusion, got None
    """  # noqa: E501

    modalities: Any
    fusion: FusionStrategy = field(default_factory=lambda: LateFusion())
    cross_attention: Optional[CrossModalAttentionConfig] = None
    fused_dim: Optional[int] = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    name: str = "multimodal"
    version: str = "1.0"
    extra: Dict[str, Any] = field(default_factory=dict)

    _OPTIONAL_FIELDS: ClassVar[Tuple[str, ...]] = ("cross_attention", "fused_dim")
    _NESTED: ClassVar[Dict[str, Tuple[str, Any]]] = {
        "modalities": ("map", ModalityConfig), "fusion": ("one", FusionStrategy),
        "cross_attention": ("one", CrossModalAttentionConfig), "cache": ("one", CacheConfig)}

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        owner = self._owner()
        self._set("modalities", self._check_modalities(self.modalities))
        fusion = self.fusion
        if isinstance(fusion, str):
            try:
                fusion = FusionStrategy.from_name(fusion)
            except ConfigError as exc:
                raise ConfigError(f"{owner}.fusion: {exc}") from None
        self._set("fusion", check_nested(owner, "fusion", fusion, FusionStrategy))
        self._set("cross_attention", check_nested(owner, "cross_attention", self.cross_attention,
                                                  CrossModalAttentionConfig, optional=True))
        self._set("fused_dim", check_opt_int(owner, "fused_dim", self.fused_dim))
        self._set("cache", check_nested(owner, "cache", self.cache, CacheConfig))
        self._set("name", check_text(owner, "name", self.name))
        self._set("version", check_text(owner, "version", self.version))
        self._set("extra", check_extra(owner, "extra", self.extra))
        self._check_cross_fields()

    def _check_modalities(self, mods: Any) -> ModalityMap:
        owner = self._owner()
        items: List[Tuple[Modality, ModalityConfig]] = []
        if isinstance(mods, Mapping):
            for key, value in mods.items():
                m = check_modality(owner, "modalities", key)
                where = f"modalities[{str(m)!r}]"
                if isinstance(value, Mapping):
                    given = value.get("modality", m)
                    try:
                        given_m = Modality(given)
                    except ModalityError:
                        given_m = None
                    if given_m != m:
                        raise fail(owner, f"{where}.modality", f"must be {str(m)!r} (its key)",
                                   given)
                    value = dict(value, modality=m)
                mc = check_nested(owner, where, value, ModalityConfig)
                if mc.modality != m:
                    raise fail(owner, f"{where}.modality", f"must be {str(m)!r} (its key)",
                               str(mc.modality))
                items.append((m, mc))
        elif isinstance(mods, (list, tuple)):
            for i, value in enumerate(mods):
                mc = check_nested(owner, f"modalities[{i}]", value, ModalityConfig)
                items.append((mc.modality, mc))
        else:
            raise fail(owner, "modalities", "must be a dict of Modality -> ModalityConfig or "
                       "a list of ModalityConfig", mods)
        if not items:
            raise fail(owner, "modalities", "must configure at least one modality", mods)
        seen = set()
        for m, _ in items:
            if m in seen:
                raise fail(owner, "modalities", f"configures modality {str(m)!r} more than "
                           "once", [str(x) for x, _ in items])
            seen.add(m)
        return ModalityMap(items)

    def _check_cross_fields(self) -> None:
        owner = self._owner()
        mods: ModalityMap = self.modalities
        configured = modality_names(mods)
        if not any(mc.enabled for mc in mods.values()):
            raise fail(owner, "modalities", "must have at least one enabled modality",
                       {str(m): "disabled" for m in mods})

        ca = self.cross_attention
        if ca is not None:
            if ca.pairs != "all":
                for q, c in ca.pairs:
                    for m in (q, c):
                        if m not in mods:
                            raise fail(owner, "cross_attention.pairs", f"must name configured "
                                       f"modalities ({configured}); {str(m)!r} is not",
                                       (str(q), str(c)))
            if ca.head_dim is None:
                for q, _ in ca.resolve_pairs(mods):
                    d = mods[q].embed_dim
                    if d % ca.num_heads:
                        raise fail(owner, "cross_attention.num_heads", "must divide the "
                                   f"embed_dim of query modality {str(q)!r} ({d}) when "
                                   "head_dim is None", ca.num_heads)

        fusion = self.fusion
        if isinstance(fusion, MiddleFusion):
            for m, mc in mods.items():
                if mc.encoder != "builtin":
                    raise fail(owner, "fusion", "MiddleFusion needs built-in encoders "
                               f"(modality {str(m)!r} uses encoder={mc.encoder!r})",
                               fusion)
                if fusion.fusion_layer > mc.encoder_config.num_layers:
                    raise fail(owner, "fusion.fusion_layer", "must be <= the encoder layers "
                               f"of every modality ({str(m)!r} has encoder_config.num_layers="
                               f"{mc.encoder_config.num_layers})", fusion.fusion_layer)
        if isinstance(fusion, LateFusion) and fusion.weights is not None:
            for m in fusion.weights:
                if m not in mods:
                    raise fail(owner, "fusion.weights", f"must name configured modalities "
                               f"({configured}); {str(m)!r} is not", str(m))
        if self.fused_dim is None and not self._is_concat():
            dims = {mc.embed_dim for mc in mods.values()}
            if len(dims) > 1:
                shown = ", ".join(f"{str(m)!r}={mc.embed_dim}" for m, mc in mods.items())
                raise fail(owner, "fused_dim", f"must be set when the modality embed dims "
                           f"differ ({shown}): each modality is projected to fused_dim "
                           "before fusion", None)

        cache = self.cache
        for m in cache.per_modality:
            if m not in mods:
                raise fail(owner, "cache.per_modality", f"must name configured modalities "
                           f"({configured}); {str(m)!r} is not", str(m))
        total = 0
        for m, mc in mods.items():
            pol = cache.policy_for(m) if m in cache.per_modality else mc.cache
            if mc.cache is not None:
                if m in cache.per_modality:
                    raise fail(owner, f"modalities[{str(m)!r}].cache", "conflicts with "
                               f"cache.per_modality[{str(m)!r}]; set the policy in one place",
                               mc.cache)
                if (mc.cache.budget_bytes is not None
                        and mc.cache.budget_bytes > cache.global_budget_bytes):
                    raise fail(owner, f"modalities[{str(m)!r}].cache.budget_bytes",
                               f"must be <= cache.global_budget_bytes="
                               f"{cache.global_budget_bytes}", mc.cache.budget_bytes)
            if pol is not None and pol.budget_bytes is not None:
                total += pol.budget_bytes
        if total > cache.global_budget_bytes:
            raise fail(owner, "cache.global_budget_bytes", "must be >= the sum of the "
                       f"per-modality budgets ({total})", cache.global_budget_bytes)

    def _is_concat(self) -> bool:
        return isinstance(self.fusion, LateFusion) and self.fusion.reduce == "concat"

    # -- conversion ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        out = super().to_dict()
        out["modalities"] = {
            str(m): {k: v for k, v in mc.to_dict().items() if k != "modality"}
            for m, mc in self.modalities.items()}
        return out

    # -- queries -----------------------------------------------------------------------------------
    def modality_config(self, modality: Any) -> ModalityConfig:
        """The :class:`ModalityConfig` of ``modality`` (ModalityError if not configured)."""
        m = Modality(modality)
        if m not in self.modalities:
            raise ModalityError(f"modality {str(m)!r} is not configured (configured: "
                                f"{modality_names(self.modalities)})")
        return self.modalities[m]

    def enabled_modalities(self) -> Tuple[Modality, ...]:
        """The enabled modalities, in modality order."""
        return tuple(m for m, mc in self.modalities.items() if mc.enabled)

    def is_enabled(self, modality: Any) -> bool:
        """Whether ``modality`` is configured and enabled."""
        try:
            m = Modality(modality)
        except ModalityError:
            return False
        return m in self.modalities and self.modalities[m].enabled

    def with_enabled(self, modality: Any, enabled: bool = True) -> "MultiModalConfig":
        """A copy with ``modality`` switched on or off (validated again).

        Raises
        ------
        ModalityError
            If ``modality`` is not configured.
        ConfigError
            If the switch leaves no enabled modality, or disables a required one.
        """
        mc = self.modality_config(modality)
        mods = dict(self.modalities)
        mods[mc.modality] = mc.replace(enabled=enabled)
        return self.replace(modalities=mods)

    def cache_policy(self, modality: Any) -> CachePolicy:
        """The cache policy of ``modality``: ``ModalityConfig.cache``, else
        ``cache.per_modality``, else ``cache.default``."""
        mc = self.modality_config(modality)
        return mc.cache if mc.cache is not None else self.cache.policy_for(mc.modality)

    def cross_attention_pairs(self, *, enabled_only: bool = True
                              ) -> Tuple[Tuple[Modality, Modality], ...]:
        """The (query, context) pairs that run: among the enabled (or all configured)
        modalities; empty without cross-attention."""
        if self.cross_attention is None:
            return ()
        mods = self.enabled_modalities() if enabled_only else tuple(self.modalities)
        return self.cross_attention.resolve_pairs(mods)

    @property
    def common_dim(self) -> Optional[int]:
        """The width every modality embedding is brought to before fusion: ``fused_dim``, else
        the shared ``embed_dim``; None for concat over differing widths."""
        if self.fused_dim is not None:
            return self.fused_dim
        dims = {mc.embed_dim for mc in self.modalities.values()}
        return dims.pop() if len(dims) == 1 else None

    @property
    def output_dim(self) -> int:
        """Width of the fused embedding: the sum over configured modalities for concat, else
        :attr:`common_dim` (a :class:`CustomFusion` function is expected to keep it)."""
        if self._is_concat():
            return sum(self.fused_dim if self.fused_dim is not None else mc.embed_dim
                       for mc in self.modalities.values())
        return self.common_dim  # type: ignore[return-value]
