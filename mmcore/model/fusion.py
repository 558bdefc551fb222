"""The fusion layer: one implementation per :class:`~mmcore.config.FusionStrategy`.

:class:`FusionLayer` takes the per-modality embeddings ``{Modality: (tokens (B, L_m, D_m),
mask (B, L_m) bool, pooled (B, D_m))}`` and returns ``{"fused": (B, output_dim), ...}``.

=============  =================================================================================
strategy       what runs
=============  =================================================================================
early          tokens (the embedder outputs) projected to ``common_dim`` where widths differ,
               plus a learned modality-type embedding, concatenated in modality order and
               encoded by a joint :class:`~mmcore.model.TransformerEncoder` (depth: the
               deepest modality encoder); fused = masked mean over the real joint tokens.
middle         as early, on the hidden states after ``fusion_layer`` blocks of each modality
               encoder; the joint encoder has the remaining ``max(num_layers) - fusion_layer``
               blocks (and its final norm).
late           pooled embeddings projected to ``fused_dim`` (when set and different), reduced
               with :func:`mmcore.ops.fuse` (``LateFusion.reduce``) over the configured
               modalities in modality order; missing ones are marked absent ("concat": zeros).
attention      cross-modal attention (``MultiModalConfig.cross_attention`` pairs, residual)
               between the token sequences, then a learned query of width ``attention_dim``
               attends to every modality's tokens (projected to ``attention_dim``); the result
               is projected to ``common_dim``.
custom         ``fn({modality: pooled (B, common_dim)}, **options)`` over the present modalities.
=============  =================================================================================

Joint encoders (early, middle) are ``common_dim`` wide with the ``num_heads`` of the first
configured modality (lowered to the largest divisor of ``common_dim``), its ``mlp_ratio``,
``activation`` and ``norm_eps``.

A modality is *missing* for a row when it is absent from the dict or every token of the row is
padding; the fusion then runs over the present ones (a row with none fuses to zeros).

Examples
--------
>>> import numpy as np
>>> from mmcore.config import MultiModalConfig, ModalityConfig, LateFusion
>>> from mmcore.model import FusionLayer
>>> from mmcore.modality import Modality
>>> cfg = MultiModalConfig([ModalityConfig("text", embed_dim=8),
...                         ModalityConfig("image", embed_dim=8)], fusion=LateFusion("mean"))
>>> fl = FusionLayer.from_config(cfg, rng=0)
>>> t = np.ones((2, 3, 8), np.float32)
>>> out = fl({Modality.TEXT: (t, np.ones((2, 3), bool), np.ones((2, 8), np.float32))})
>>> out["fused"].shape, float(out["fused"][0, 0])
((2, 8), 1.0)
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, cast

import numpy as np

from ..config import (
    AttentionFusion,
    CustomFusion,
    EarlyFusion,
    LateFusion,
    MiddleFusion,
    MultiModalConfig,
)
from ..errors import ConfigError, ModalityError, ShapeError
from ..modality import Modality
from ..ops import fuse, masked_mean
from .encoders import TransformerEncoder, normal_init, sub_rng
from .layers import CrossModalAttention
from .nn import Linear, Module, RngLike, as_float_input, as_generator

__all__ = ["FusionLayer"]


class _Dict(Module):
    """Child modules keyed by modality name (state-dict keys ``text.weight``, ...)."""

    def __init__(self):
        super().__init__()

    def has(self, key: str) -> bool:
        return key in self._modules

    def get(self, key: str):
        return self._modules[key]


def _common_dim(config: MultiModalConfig, owner: str) -> int:
    """The common width of ``config``, which every strategy but concat has (the config checks
    this)."""
    D = config.common_dim
    if D is None:  # pragma: no cover - the config validates the widths
        raise ConfigError(f"[{owner}] {type(config.fusion).__name__} needs one common width: "
                          "set fused_dim or give every modality the same embed_dim")
    return D


def _heads_for(dim: int, wanted: int) -> int:
    h = max(1, min(wanted, dim))
    while dim % h:
        h -= 1
    return h


class FusionLayer(Module):
    """Fuse per-modality embeddings into one vector per row (see the module docstring).

    Build it with :meth:`from_config`. State-dict keys (as they apply): ``input_proj.<m>.*``
    (per-modality projection to ``common_dim``), ``type_embedding`` (M, common_dim),
    ``joint.*`` (the joint encoder), ``weights`` (M,) (late "weighted" without fixed weights),
    ``query`` (late "attention": (common_dim,); attention fusion: (attention_dim,)),
    ``cross_attn.<q>-><c>.*``, ``token_proj.<m>.*``, ``pool_attn.*``, ``out_proj.*``.
    ``<m>`` is the modality's string form (``"text"``, ``"custom:7"``).
    """

    def __init__(self, config: MultiModalConfig, *, rng: RngLike = None):
        super().__init__()
        owner = type(self).__name__
        if not isinstance(config, MultiModalConfig):
            raise ConfigError(f"[{owner}] config must be a MultiModalConfig, got "
                              f"{type(config).__name__}")
        self.config = config
        self.strategy = config.fusion
        self.modalities: Tuple[Modality, ...] = tuple(config.modalities)
        self.output_dim = config.output_dim
        self.common_dim = config.common_dim
        gen = as_generator(rng)
        sub = sub_rng(gen)
        mods = config.modalities
        s = self.strategy
        first = mods[self.modalities[0]].encoder_config

        def widths(token_level_hidden: bool) -> Dict[Modality, int]:
            out = {}
            for m, mc in mods.items():
                ec = mc.encoder_config
                hid = ec.hidden_dim if ec.hidden_dim is not None else mc.embed_dim
                out[m] = hid if token_level_hidden else mc.embed_dim
            return out

        def add_input_proj(w: Dict[Modality, int], target: int) -> None:
            projs = _Dict()
            for m in self.modalities:
                if w[m] != target:
                    projs.add_module(str(m), Linear(w[m], target, rng=sub))
            self.add_module("input_proj", projs)

        if isinstance(s, (EarlyFusion, MiddleFusion)):
            D = _common_dim(config, owner)
            self.in_widths = widths(True)
            add_input_proj(self.in_widths, D)
            self.register_parameter("type_embedding",
                                    normal_init(gen, (len(self.modalities), D), 0.02))
            deepest = max(mc.encoder_config.num_layers for mc in mods.values())
            depth = max(1, deepest) if isinstance(s, EarlyFusion) else deepest - s.fusion_layer
            self.add_module("joint", TransformerEncoder(
                D, depth, _heads_for(D, first.num_heads), mlp_ratio=first.mlp_ratio,
                activation=first.activation, layer_norm_eps=first.norm_eps, rng=sub))
        elif isinstance(s, LateFusion):
            self.in_widths = widths(False)
            if config.fused_dim is not None:
                add_input_proj(self.in_widths, config.fused_dim)
            else:
                self.add_module("input_proj", _Dict())
            if s.reduce == "weighted" and s.weights is None:
                self.register_parameter("weights", np.ones(len(self.modalities), np.float32))
            if s.reduce == "attention":
                self.register_parameter("query", normal_init(gen, (self.common_dim,), 0.02))
        elif isinstance(s, AttentionFusion):
            self.in_widths = widths(False)
            ca = config.cross_attention
            cross = _Dict()
            for q, c in config.cross_attention_pairs(enabled_only=False):
                assert ca is not None   # there are pairs only with a cross-attention config
                E, Dc = mods[q].embed_dim, mods[c].embed_dim
                inner = ca.inner_dim(E)
                if inner != E:
                    raise ConfigError(f"[{owner}] cross_attention num_heads * head_dim = {inner} "
                                      f"must equal the embed_dim of query modality {str(q)!r} "
                                      f"({E})")
                temp = ca.temperature
                if ca.scale is not None:
                    temp = temp / (ca.scale * np.sqrt(E // ca.num_heads))
                cross.add_module(f"{q}->{c}", CrossModalAttention(
                    E, ca.num_heads, kdim=Dc, vdim=Dc, temperature=float(temp), rng=sub))
            self.add_module("cross_attn", cross)
            A = s.attention_dim
            tp = _Dict()
            for m in self.modalities:
                if self.in_widths[m] != A:
                    tp.add_module(str(m), Linear(self.in_widths[m], A, rng=sub))
            self.add_module("token_proj", tp)
            self.register_parameter("query", normal_init(gen, (A,), 0.02))
            self.add_module("pool_attn", CrossModalAttention(A, s.num_heads, rng=sub))
            self.add_module("out_proj", Linear(A, _common_dim(config, owner), rng=sub))
        elif isinstance(s, CustomFusion):
            self.in_widths = widths(False)
            if config.fused_dim is not None:
                add_input_proj(self.in_widths, config.fused_dim)
            else:
                self.add_module("input_proj", _Dict())
            self._fn = s.resolve()
        else:  # pragma: no cover - the config validates the strategy
            raise ConfigError(f"[{owner}] unsupported fusion strategy {s!r}")

    @classmethod
    def from_config(cls, config: MultiModalConfig, *, rng: RngLike = None) -> "FusionLayer":
        """The fusion layer of ``config`` (weights drawn from ``rng``)."""
        return cls(config, rng=rng)

    # -- helpers --------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The strategy's type tag: "early", "middle", "late", "attention" or "custom"."""
        return self.strategy.TYPE

    def _project(self, m: Modality, x: np.ndarray) -> np.ndarray:
        projs = self._modules.get("input_proj")
        if projs is not None and projs.has(str(m)):
            return projs.get(str(m))(x)
        return x

    def _check(self, embeddings: Mapping, *, tokens: bool):
        """Validated ``[(index, modality, tokens, mask, pooled)]`` of the configured ones given."""
        owner = type(self).__name__
        if not isinstance(embeddings, Mapping):
            raise ShapeError(f"[{owner}] embeddings must be a dict of Modality -> "
                             "(tokens, mask, pooled)")
        given = {}
        for key, value in embeddings.items():
            m = Modality(key)
            if m not in self.modalities:
                raise ModalityError(f"[{owner}] modality {str(m)!r} is not configured "
                                    f"(configured: {', '.join(map(str, self.modalities))})")
            given[m] = value
        out = []
        B = None
        for i, m in enumerate(self.modalities):
            if m not in given or given[m] is None:
                continue
            v = given[m]
            if not isinstance(v, (tuple, list)) or len(v) not in (2, 3):
                raise ShapeError(f"[{owner}] embeddings[{str(m)!r}] must be (tokens, mask, "
                                 "pooled) or (tokens, mask)")
            t, mask = v[0], v[1]
            pooled = v[2] if len(v) == 3 else None
            width = self.in_widths[m]
            if tokens or pooled is None:
                t = as_float_input(owner, f"embeddings[{str(m)!r}] tokens", t, ndim=3,
                                   dims="(B, L, D)", last=width, last_name="width")
                b, L = t.shape[:2]
                mask = (np.ones((b, L), np.bool_) if mask is None
                        else np.asarray(mask).astype(np.bool_))
                if mask.shape != (b, L):
                    raise ShapeError(f"[{owner}] embeddings[{str(m)!r}] mask has shape "
                                     f"{tuple(mask.shape)}, expected ({b}, {L})")
            else:
                mask = None if mask is None else np.asarray(mask).astype(np.bool_)
            if pooled is not None:
                pooled = as_float_input(owner, f"embeddings[{str(m)!r}] pooled", pooled, ndim=2,
                                        dims="(B, D)", last=self.in_widths[m], last_name="width")
                b = pooled.shape[0]
            elif not tokens:
                pooled = masked_mean(t, mask)
            if B is None:
                B = b
            elif b != B:
                raise ShapeError(f"[{owner}] embeddings[{str(m)!r}] has batch size {b}, "
                                 f"expected {B}")
            out.append((i, m, t, mask, pooled))
        return out

    # -- strategies -----------------------------------------------------------------------------

    def __call__(self, embeddings: Mapping, *, return_weights: bool = False) -> Dict[str, object]:
        """Fuse ``{Modality: (tokens, mask, pooled)}``.

        Returns
        -------
        dict
            ``"fused"``: float32 (B, output_dim). With ``return_weights``: ``"attention_weights"``,
            a dict keyed by Modality (fusion weights: (B,) per modality for late "weighted" and
            "attention"; (B, L_m) per modality for attention fusion) and by ``(query, context)``
            pairs (cross-attention weights (B, L_q, L_c)). Early and middle also return
            ``"tokens"`` (B, sum L_m, common_dim) and ``"mask"`` of the joint sequence.

        Raises
        ------
        ModalityError
            ``embeddings`` names a modality that is not configured, or has none at all.
        """
        kind = self.kind
        if kind in ("early", "middle"):
            return self.joint(embeddings, return_weights=return_weights)
        if kind == "late":
            return self._late(embeddings, return_weights)
        if kind == "attention":
            return self._attention(embeddings, return_weights)
        return self._custom(embeddings, return_weights)

    def _none_given(self):
        return ModalityError(f"[{type(self).__name__}] no embeddings given (configured: "
                             f"{', '.join(map(str, self.modalities))})")

    def joint(self, embeddings: Mapping, *, return_weights: bool = False) -> Dict[str, object]:
        """Early / middle fusion: ``{Modality: (tokens, mask[, pooled])}`` -> joint encoding.

        For early fusion pass the embedder outputs (``ModalityEncoder.embed``); for middle
        fusion the hidden states after ``fusion_layer`` blocks
        (``ModalityEncoder.encode(x, mask, end_layer=fusion_layer)``). Widths are the encoders'
        ``hidden_dim``.
        """
        if "joint" not in self._modules:
            raise ConfigError(f"[{type(self).__name__}] joint() needs early or middle fusion "
                              f"(this is {self.kind!r})")
        items = self._check(embeddings, tokens=True)
        if not items:
            raise self._none_given()
        xs, ms = [], []
        for i, m, t, mask, _ in items:
            xs.append(self._project(m, t) + self.type_embedding[i])
            ms.append(mask)
        x = np.concatenate(xs, axis=1)
        mask = np.concatenate(ms, axis=1)
        h = self.joint_encoder(x, attention_mask=mask)
        out = {"fused": masked_mean(h, mask), "tokens": h, "mask": mask}
        if return_weights:
            out["attention_weights"] = {}
        return out

    @property
    def joint_encoder(self) -> TransformerEncoder:
        return self._modules["joint"]

    def _pooled_list(self, items):
        """Pooled (B, D) per configured modality (zeros when missing) and present (B, M)."""
        B = items[0][4].shape[0]
        M = len(self.modalities)
        present = np.zeros((B, M), np.bool_)
        vecs: List[Optional[np.ndarray]] = [None] * M
        for i, m, _, mask, pooled in items:
            vecs[i] = self._project(m, pooled)
            present[:, i] = True if mask is None else mask.any(axis=1)
        for i, m in enumerate(self.modalities):
            if vecs[i] is None:
                w = self.in_widths[m]
                if self.config.fused_dim is not None:
                    w = self.config.fused_dim
                vecs[i] = np.zeros((B, w), np.float32)
        return cast(List[np.ndarray], vecs), present     # every slot is filled now

    def _late(self, embeddings, return_weights):
        s = cast(LateFusion, self.strategy)
        items = self._check(embeddings, tokens=False)
        if not items:
            raise self._none_given()
        vecs, present = self._pooled_list(items)
        reduce = s.reduce
        w = None
        if reduce == "concat":
            fused = fuse(vecs, strategy="concat", present=present)
        elif reduce == "weighted":
            if s.weights is not None:
                weights = np.array([s.weights.get(m, 0.0) for m in self.modalities], np.float32)
            else:
                weights = self.weights
            fused, w = fuse(vecs, strategy="weighted", weights=weights, present=present,
                            return_weights=True)
        elif reduce == "attention":
            fused, w = fuse(vecs, strategy="attention", query=self.query, present=present)
        else:
            fused = fuse(vecs, strategy=reduce, present=present)
        out: Dict[str, Any] = {"fused": np.asarray(fused, np.float32)}
        if return_weights:
            out["attention_weights"] = ({} if w is None else
                                        {m: w[:, i] for i, m in enumerate(self.modalities)})
        return out

    def cross_attend(self, embeddings: Mapping, *, return_weights: bool = False
                     ) -> Tuple[Dict[Modality, Tuple[np.ndarray, np.ndarray]],
                                Dict[Tuple[Modality, Modality], np.ndarray]]:
        """Apply the configured cross-modal attention (residual) between present modalities.

        Returns ``({Modality: (tokens, mask)}, {(query, context): weights})``. Each pair reads
        the tokens as they were before any pair ran.
        """
        items = self._check(embeddings, tokens=True)
        toks = {m: (t, mask) for _, m, t, mask, _ in items}
        new = {m: t for m, (t, _) in toks.items()}
        weights: Dict[Tuple[Modality, Modality], Any] = {}
        cross = self._modules.get("cross_attn")
        if cross is not None:
            for key, layer in cross.named_children():
                q, c = (Modality(p) for p in key.split("->"))
                if q not in toks or c not in toks:
                    continue
                cmask = toks[c][1]
                res = layer(toks[q][0], toks[c][0], context_mask=cmask,
                            return_weights=return_weights)
                a, wts = res if return_weights else (res, None)
                new[q] = new[q] + a
                if return_weights:
                    weights[(q, c)] = wts
        return {m: (new[m], toks[m][1]) for m in toks}, weights

    def _attention(self, embeddings, return_weights):
        if not embeddings:
            raise self._none_given()
        toks, cross_w = self.cross_attend(embeddings, return_weights=return_weights)
        if not toks:
            raise self._none_given()
        order = [m for m in self.modalities if m in toks]
        xs, ms, lens = [], [], []
        for m in order:
            t, mask = toks[m]
            tp = self.token_proj
            xs.append(tp.get(str(m))(t) if tp.has(str(m)) else t)
            ms.append(mask)
            lens.append(t.shape[1])
        x = np.concatenate(xs, axis=1)
        mask = np.concatenate(ms, axis=1)
        # Real tokens first in every row (in their order), padding after: a row's result
        # then depends on its own tokens only, not on how much padding the batch around it
        # put between its modalities.
        perm = None
        if not mask.all():
            perm = np.argsort(~mask, axis=1, kind="stable")
            x = np.take_along_axis(x, perm[:, :, None], axis=1)
            mask = np.take_along_axis(mask, perm, axis=1)
        B = x.shape[0]
        A = cast(AttentionFusion, self.strategy).attention_dim
        q = np.broadcast_to(self.query, (B, 1, A))
        res = self.pool_attn(q, x, context_mask=mask, return_weights=return_weights)
        pooled, w = res if return_weights else (res, None)
        if w is not None and perm is not None:
            unpacked = np.empty_like(w)
            np.put_along_axis(unpacked, perm[:, None, :], w, axis=2)
            w = unpacked
        empty = ~mask.any(axis=1)
        fused = self.out_proj(pooled[:, 0])
        if empty.any():
            fused[empty] = 0.0
        out: Dict[str, Any] = {"fused": fused}
        if return_weights:
            assert w is not None        # the pooling attention returned its weights
            aw: Dict[Any, np.ndarray] = dict(cross_w)
            off = 0
            for m, L in zip(order, lens):
                aw[m] = w[:, 0, off:off + L]
                off += L
            out["attention_weights"] = aw
        return out

    def _custom(self, embeddings, return_weights):
        owner = type(self).__name__
        items = self._check(embeddings, tokens=False)
        if not items:
            raise self._none_given()
        pooled = {}
        for _, m, _, mask, p in items:
            if mask is not None and not mask.any():
                continue
            pooled[m] = self._project(m, p)
        fused = self._fn(pooled, **cast(CustomFusion, self.strategy).options)
        fused = np.asarray(fused)
        B = items[0][4].shape[0]
        if fused.ndim != 2 or fused.shape[0] != B:
            raise ShapeError(f"[{owner}] the custom fusion function returned shape "
                             f"{tuple(fused.shape)}, expected ({B}, D_out)")
        out: Dict[str, Any] = {"fused": fused.astype(np.float32, copy=False)}
        if return_weights:
            out["attention_weights"] = {}
        return out

    def extra_repr(self) -> str:
        return (f"strategy={self.kind!r}, modalities={[str(m) for m in self.modalities]}, "
                f"output_dim={self.output_dim}")
