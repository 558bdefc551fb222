"""Assemble a :class:`~mmcore.model.MultiModalModel` from a config, model directories and callables.

:class:`MultiModalLoader` is a builder: every ``with_*`` method checks its arguments at once
(an unknown modality raises :class:`~mmcore.errors.ModalityError`, a missing directory
:class:`~mmcore.errors.ModelFormatError`) and returns the loader, so calls chain;
:meth:`MultiModalLoader.load` reads the files and builds the model, all or nothing.

Weights are resolved in this order, later sources replacing earlier ones:

1. the built-in initialisation (``load_options["seed"]``, default 0);
2. :meth:`~MultiModalLoader.with_weights` -- a whole model directory (every tensor of the
   model must be in it);
3. :meth:`~MultiModalLoader.with_modality_path` -- one modality's encoder tensors
   (``encoders.<m>.*``) from a model directory whose config has that modality with the same
   widths; for a modality with ``encoder="onnx"``, a directory holding ``model.onnx``
   (:class:`~mmcore.model.onnx_encoder.OnnxEncoder`).

Modalities given an encoder with :meth:`~MultiModalLoader.with_encoder` use it instead of a
built-in one; tensors of such a modality in a model directory are ignored.

:meth:`~MultiModalLoader.with_distributed` is deprecated: load the model, then attach it with
``mmcore.distributed.attach(model, config, model_dir=...)`` (shard nodes or Ray actors encode
the modalities the config names).

Examples
--------
>>> import os, tempfile
>>> import numpy as np
>>> from mmcore.model import MultiModalLoader, default_model
>>> d = os.path.join(tempfile.mkdtemp(), "m")
>>> _ = default_model(seed=1).save(d)
>>> model = MultiModalLoader().with_weights(d).load()
>>> model.infer({"text": ["hi"]}).fused.shape
(1, 64)
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

from .._files import check_regular
from ..config import MultiModalConfig
from ..errors import ConfigError, ModelFormatError, NodeUnavailableError
from ..modality import Modality
from .directory import (
    WeightBudget,
    build_model,
    check_layer_counts,
    check_state_modalities,
    config_from_dir,
    served_externally,
)
from .external import ExternalEncoder
from .io import CONFIG_FILE, load_model_dir, stored_weight_counts
from .model import MultiModalModel, attach_remote
from .nn import Module

__all__ = ["MultiModalLoader"]

#: The former name of :class:`~mmcore.model.external.ExternalEncoder`.
_ExternalEncoder = ExternalEncoder

_OP = "MultiModalLoader"
_LOAD_OPTIONS = ("verify", "seed")
# ModalityConfig fields that decide the shapes of an encoder's tensors
_SHAPE_FIELDS = ("embed_dim", "encoder_config")


def _check_dir(path: Any, what: str) -> str:
    try:
        root = os.fspath(path)
    except TypeError:
        raise ModelFormatError(f"{what} must be a path to a model directory, got "
                               f"{type(path).__name__}") from None
    if not os.path.isdir(root):
        raise ModelFormatError(f"{what}: {root!r} does not exist or is not a directory")
    meta = os.path.join(root, CONFIG_FILE)
    if os.path.lexists(meta) and not os.path.isfile(meta):  # a FIFO, a device: refused
        check_regular(meta, what=f"model config ({CONFIG_FILE})", error=ModelFormatError,
                      op=f"MultiModalLoader.{what}")
    if not os.path.isfile(meta):
        hint = (" (it holds model.onnx: for a modality with encoder='onnx', give the config "
                "to MultiModalLoader(config) first)"
                if os.path.isfile(os.path.join(root, "model.onnx")) else "")
        raise ModelFormatError(f"{what}: {root!r} has no {CONFIG_FILE}; it is not a model "
                               f"directory{hint}")
    return root


class MultiModalLoader:
    """Builds a :class:`MultiModalModel` from a config, model directories and encoders.

    Parameters
    ----------
    config : MultiModalConfig, mapping or None
        The model's config. None: taken from the directory given to :meth:`with_weights`.
    load_options : dict, optional
        ``"verify"`` (bool, default True): check the SHA-256 of every file read;
        ``"seed"`` (int, default 0): initialisation of weights that no directory provides.

    Raises
    ------
    ConfigError
        A bad config or load option.

    Examples
    --------
    >>> import numpy as np
    >>> from mmcore.model import MultiModalLoader, default_config
    >>> enc = lambda x: np.ones((len(x), 64), np.float32)      # pooled (B, D)
    >>> model = (MultiModalLoader(default_config(), {"seed": 3})
    ...          .with_encoder("audio", enc).load())
    >>> model.infer({"audio": np.zeros((2, 16000), np.float32)}).fused.shape
    (2, 64)
    """

    def __init__(self, config: Any = None, load_options: Optional[Mapping[str, Any]] = None):
        if config is not None and not isinstance(config, MultiModalConfig):
            if isinstance(config, Mapping):
                config = MultiModalConfig.from_dict(config)
            else:
                raise ConfigError("[MultiModalLoader] config must be a MultiModalConfig, a "
                                  f"mapping or None, got {type(config).__name__}")
        opts = dict(load_options or {})
        if load_options is not None and not isinstance(load_options, Mapping):
            raise ConfigError("[MultiModalLoader] load_options must be a dict, got "
                              f"{type(load_options).__name__}")
        for key in opts:
            if key not in _LOAD_OPTIONS:
                raise ConfigError(f"[MultiModalLoader] unknown load option {key!r} (known: "
                                  f"{', '.join(_LOAD_OPTIONS)})")
        verify = opts.get("verify", True)
        if not isinstance(verify, bool):
            raise ConfigError(f"[MultiModalLoader] load_options['verify'] must be a bool, got "
                              f"{verify!r}")
        seed = opts.get("seed", 0)
        if seed is not None and (isinstance(seed, bool)
                                 or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ConfigError(f"[MultiModalLoader] load_options['seed'] must be an integer >= 0 "
                              f"or None, got {seed!r}")
        self._config: Optional[MultiModalConfig] = config
        self._verify = verify
        self._seed: Optional[int] = None if seed is None else int(seed)
        self._weights: Optional[str] = None
        self._modality_paths: Dict[Modality, str] = {}
        self._encoders: Dict[Modality, Callable] = {}
        self._distributed: Any = None

    # -- builder --------------------------------------------------------------------------------

    def _modality(self, modality: Any) -> Modality:
        m = Modality(modality)  # ModalityError for names that are not modalities
        if self._config is not None:
            self._config.modality_config(m)  # ModalityError if not configured
        return m

    def with_weights(self, path: Any) -> "MultiModalLoader":
        """Load every tensor from the model directory ``path`` (and its config, when the loader
        has none)."""
        self._weights = _check_dir(path, "with_weights")
        return self

    def with_modality_path(self, modality: Any, path: Any) -> "MultiModalLoader":
        """Take ``modality``'s encoder weights (``encoders.<m>.*``) from the model directory
        ``path``; its config must have the modality with the same ``embed_dim`` and
        ``encoder_config``.

        For a modality with ``encoder="onnx"`` (the config must be given to the loader),
        ``path`` is a directory holding ``model.onnx`` (or the ONNX file itself): it is
        recorded as the modality's ``encoder_config.extra["onnx_path"]`` (absolute) and
        :meth:`load` runs it with :class:`~mmcore.model.onnx_encoder.OnnxEncoder`.
        """
        m = self._modality(modality)
        what = f"with_modality_path({str(m)!r})"
        if self._config is not None and self._config.modalities[m].encoder == "onnx":
            from .onnx_encoder import onnx_file
            if m in self._encoders:
                raise ConfigError(f"[MultiModalLoader] modality {str(m)!r} has both an encoder "
                                  "callable and an ONNX directory; give one")
            file = os.path.abspath(onnx_file(path, f"MultiModalLoader.{what}"))
            mc = self._config.modalities[m]
            ec = mc.encoder_config
            mods = dict(self._config.modalities)
            mods[m] = mc.replace(encoder_config=ec.replace(extra=dict(ec.extra, onnx_path=file)))
            self._config = self._config.replace(modalities=mods)
            self._modality_paths.pop(m, None)
            return self
        self._modality_paths[m] = _check_dir(path, what)
        return self

    def with_encoder(self, modality: Any, encoder: Callable) -> "MultiModalLoader":
        """Encode ``modality`` with ``encoder`` instead of a built-in encoder.

        ``encoder(batch)`` or ``encoder(batch, attention_mask)`` gets the preprocessed batch
        (and its (B, L) mask, True = real, or None) and returns token embeddings ``(B, L, D)``,
        ``(tokens, mask)``, ``(tokens, mask, pooled)`` or a pooled ``(B, D)`` embedding, with
        ``D`` the modality's ``embed_dim``. A :class:`~mmcore.model.Module` is used as it is
        (it must follow the built-in encoder protocol) and its weights join the state dict.
        """
        m = self._modality(modality)
        if not callable(encoder):
            raise ConfigError(f"[MultiModalLoader] encoder for modality {str(m)!r} must be "
                              f"callable, got {type(encoder).__name__}")
        self._encoders[m] = encoder
        return self

    def with_distributed(self, distributed_config: Any) -> "MultiModalLoader":
        """Deprecated: load the model, then call ``mmcore.distributed.attach(model, config,
        model_dir=...)``.

        Serve the modalities named by a :class:`mmcore.distributed.DistributedConfig`
        remotely: :meth:`load` attaches the model to shard nodes (or Ray actors), which
        preprocess and encode those modalities; cross-modal attention and fusion stay local.
        The Ray backend also needs :meth:`with_weights` (its actors load that directory).
        :meth:`load` calls the config's ``attach(model, model_dir=...)`` (see
        :class:`~mmcore.model.model.RemoteAttacher`).
        """
        warnings.warn("[MultiModalLoader] with_distributed is deprecated; load the model, then "
                      "call mmcore.distributed.attach(model, config, model_dir=...)",
                      DeprecationWarning, stacklevel=2)
        if distributed_config is None:
            raise ConfigError("[MultiModalLoader] with_distributed needs a distributed config, "
                              "got None")
        self._distributed = distributed_config
        return self

    # -- loading --------------------------------------------------------------------------------

    def load(self) -> MultiModalModel:
        """Read the directories and build the model (nothing is returned on any error).

        Raises
        ------
        ConfigError
            No config (neither given nor from :meth:`with_weights`); an ``external`` modality
            without an encoder.
        ModalityError
            A modality given to the builder is not in the config.
        ModelFormatError
            A directory is missing or corrupt, a modality directory lacks the modality or has
            other widths, or a tensor is missing, unknown or misshapen (the message names it).
        """
        state: Optional[Dict[str, np.ndarray]] = None
        config = self._config
        stored = [0, 0]  # tensors and values of the directories read
        if self._weights is not None:
            cfg_dict, state, meta = load_model_dir(self._weights, verify=self._verify,
                                                   keep_quantized=True)
            if config is None:
                config = config_from_dir(cfg_dict, self._weights, meta, op=_OP)
            check_state_modalities(state, config, self._weights)
            stored = [a + b for a, b in zip(stored, stored_weight_counts(meta))]
        if config is None:
            raise ConfigError("[MultiModalLoader] no config: pass one to MultiModalLoader or "
                              "give a model directory with with_weights")
        for m in list(self._modality_paths) + list(self._encoders):
            config.modality_config(m)  # ModalityError when the config lacks it

        pieces: Dict[Modality, Dict[str, np.ndarray]] = {}
        for m, path in self._modality_paths.items():
            pieces[m], counts = self._modality_state(config, m, path)
            stored = [a + b for a, b in zip(stored, counts)]

        encoders = {}
        for m, fn in self._encoders.items():
            if isinstance(fn, Module):
                encoders[m] = fn
            else:
                encoders[m] = ExternalEncoder(m, fn, config.modalities[m].embed_dim)
        if state is None:  # the caller's own config: built as it says
            model = MultiModalModel(config, seed=self._seed, encoders=encoders)
        else:  # every built-in module must come from the directories: build no more
            weights = self._weights
            assert weights is not None      # the state came from there
            merged = dict(state)
            for m, piece in pieces.items():
                merged = {k: v for k, v in merged.items() if not k.startswith(f"encoders.{m}.")}
                merged.update(piece)
            check_layer_counts(config, merged, set(encoders), weights, _OP)
            seed = self._seed if self._seed is not None else np.random.SeedSequence()
            model = build_model(MultiModalModel, config,
                                WeightBudget(seed, *stored, where=weights, op=_OP),
                                encoders, weights, _OP)

        full = model.state_dict() if state is None else {
            k: v for k, v in state.items() if not served_externally(k, model.external_encoders)}
        for m, piece in pieces.items():
            prefix = f"encoders.{m}."
            want = {k for k in model.state_dict() if k.startswith(prefix)}
            have = set(piece)
            missing = sorted(want - have)
            if missing:
                raise ModelFormatError(f"{self._modality_paths[m]}: tensor {missing[0]!r} of "
                                       f"modality {str(m)!r} is missing")
            extra = sorted(have - want)
            if extra:
                raise ModelFormatError(f"{self._modality_paths[m]}: tensor {extra[0]!r} does not "
                                       f"belong to the encoder of modality {str(m)!r}")
            full = {k: v for k, v in full.items() if not k.startswith(prefix)}
            full.update(piece)
        try:
            model.load_state_dict(full, strict=True)
        except ModelFormatError as exc:
            where = self._weights or "MultiModalLoader"
            raise ModelFormatError(f"{where}: {exc}") from None
        if self._distributed is not None:
            attach_remote(model, self._distributed, model_dir=self._weights, op=_OP)
        return model

    def _modality_state(self, config: MultiModalConfig, m: Modality, path: str):
        """The ``encoders.<m>.*`` tensors of the model directory ``path``, checked, and the
        ``(tensors, values)`` the directory stores."""
        mc = config.modalities[m]
        if m in self._encoders and not isinstance(self._encoders[m], Module):
            raise ConfigError(f"[MultiModalLoader] modality {str(m)!r} has both an encoder "
                              "callable and a weights directory; give one")
        if mc.encoder == "onnx" and m not in self._encoders:
            raise ConfigError(f"[MultiModalLoader] modality {str(m)!r} uses encoder='onnx'; "
                              "give the config to MultiModalLoader(config) before "
                              "with_modality_path, so that the directory is read as an ONNX "
                              "encoder (or set encoder_config.extra['onnx_path'])")
        if mc.encoder != "builtin" and m not in self._encoders:
            raise ConfigError(f"[MultiModalLoader] modality {str(m)!r} uses encoder="
                              f"{mc.encoder!r}; with_modality_path loads built-in encoder "
                              "weights, or an ONNX encoder for encoder='onnx'")
        cfg_dict, state, meta = load_model_dir(path, verify=self._verify, keep_quantized=True)
        other = config_from_dir(cfg_dict, path, meta, op=_OP)
        if m not in other.modalities:
            raise ModelFormatError(f"{path}: has no modality {str(m)!r} (it has "
                                   f"{', '.join(str(k) for k in other.modalities)})")
        theirs = other.modalities[m]
        for fname in _SHAPE_FIELDS:
            a, b = getattr(mc, fname), getattr(theirs, fname)
            if hasattr(a, "to_dict"):
                a, b = a.to_dict(), b.to_dict()
            if a != b:
                raise ModelFormatError(f"{path}: modality {str(m)!r} has {fname}={b!r}, but the "
                                       f"config being loaded has {fname}={a!r}")
        prefix = f"encoders.{m}."
        return ({k: v for k, v in state.items() if k.startswith(prefix)},
                stored_weight_counts(meta))


def distributed_unavailable_error(stacklevel: int) -> type:
    """The retired DistributedUnavailableError: NodeUnavailableError, after a
    DeprecationWarning pointing ``stacklevel`` frames above the caller (what the modules'
    ``__getattr__`` returns for the old name)."""
    warnings.warn("[mmcore.model] DistributedUnavailableError is deprecated and never raised "
                  "(mmcore.distributed is part of the package); it is now an alias of "
                  "mmcore.errors.NodeUnavailableError, what an unavailable distributed encoder "
                  "raises", DeprecationWarning, stacklevel=stacklevel + 1)
    return NodeUnavailableError


_distributed_unavailable_error = distributed_unavailable_error  # the former private name


def __getattr__(name: str) -> Any:
    if name == "DistributedUnavailableError":
        return distributed_unavailable_error(2)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
