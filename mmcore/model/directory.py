"""Model directories: the stored config and tensors, checked before anything is built.

Helpers of :meth:`MultiModalModel.save` / :meth:`~MultiModalModel.from_pretrained` and of
:class:`~mmcore.model.loader.MultiModalLoader`: the config read from ``mmcore.json``, files a
directory uses (tokenizers, ONNX graphs) kept inside it and under its checksums, and a model
built without trusting the sizes its config states (:class:`WeightBudget` refuses to draw
more weights than the directory stores, before allocating them).
:func:`save_model` and :func:`load_pretrained` are what ``save`` and ``from_pretrained`` run.

Examples
--------
>>> import os, tempfile
>>> from mmcore.model import MultiModalModel, default_model
>>> from mmcore.model.directory import load_pretrained, save_model
>>> d = os.path.join(tempfile.mkdtemp(), "m")
>>> meta = save_model(default_model(seed=0), d)
>>> meta["modalities"], load_pretrained(MultiModalModel, d).output_dim
(['text', 'image', 'audio', 'video'], 64)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple, Type

import numpy as np

from ..config import MultiModalConfig
from ..errors import ConfigError, ModalityError, ModelFormatError, ShapeError
from ..modality import Modality
from .io import load_model_dir, resolve_dir_file, save_model_dir, stored_weight_counts

if TYPE_CHECKING:  # pragma: no cover
    from .model import MultiModalModel

__all__ = ["TOKENIZER_FILE", "config_from_dir", "bundle_files", "WeightBudget", "build_model",
           "check_layer_counts", "check_state_modalities", "restrict_config",
           "served_externally", "save_model", "load_pretrained"]

#: The name of a model directory's tokenizer file.
TOKENIZER_FILE = "tokenizer.json"


def config_from_dir(cfg_dict: Mapping[str, Any], path, meta: Mapping[str, Any], *,
                     op: str = "MultiModalModel.from_pretrained") -> MultiModalConfig:
    """The :class:`MultiModalConfig` stored in a model directory (ModelFormatError if invalid).

    The files the config names -- a text modality's ``preprocessing.tokenizer`` (other than
    ``"byte"``), a modality's ``encoder_config.extra["onnx_path"]`` or ``extra["onnx_path"]``
    -- are taken relative to the directory (never the working directory) and must be files of
    the directory listed in ``mmcore.json`` (see :func:`~mmcore.model.io.resolve_dir_file`);
    the config returned names them by absolute path.
    """
    root = os.fspath(path)
    data = dict(cfg_dict)
    if isinstance(data.get("modalities"), Mapping):
        mods = {}
        for key, mcfg in data["modalities"].items():
            if isinstance(mcfg, Mapping):
                mcfg = dict(mcfg)
                pre = mcfg.get("preprocessing")
                tok = pre.get("tokenizer") if isinstance(pre, Mapping) else None
                if (isinstance(pre, Mapping) and tok is not None
                        and not (isinstance(tok, str) and tok.lower() == "byte")):
                    tok = resolve_dir_file(root, tok, meta=meta, op=op,
                                           field=f"modalities.{key}.preprocessing.tokenizer",
                                           default_name=TOKENIZER_FILE)
                    mcfg["preprocessing"] = dict(pre, tokenizer=tok)
                for where in ("encoder_config", None):
                    holder = mcfg.get(where) if where else mcfg
                    extra = holder.get("extra") if isinstance(holder, Mapping) else None
                    if (not isinstance(holder, Mapping) or not isinstance(extra, Mapping)
                            or extra.get(_ONNX_KEY) is None):
                        continue
                    field = (f"modalities.{key}.{where + '.' if where else ''}"
                             f"extra[{_ONNX_KEY!r}]")
                    onnx = resolve_dir_file(root, extra[_ONNX_KEY], meta=meta, op=op,
                                            field=field, default_name=_ONNX_FILE)
                    _check_onnx_external(root, onnx, meta, field, op)
                    extra = dict(extra, **{_ONNX_KEY: onnx})
                    if where:
                        mcfg[where] = dict(holder, extra=extra)
                    else:
                        mcfg["extra"] = extra
            mods[key] = mcfg
        data["modalities"] = mods
    try:
        return MultiModalConfig.from_dict(data)
    except (ConfigError, ModalityError, ShapeError, TypeError, KeyError) as exc:
        raise ModelFormatError(f"[{op}] {root}: the config in mmcore.json is invalid: "
                               f"{exc}") from None
    except RecursionError:
        raise ModelFormatError(f"[{op}] {root}: the config in mmcore.json is nested too "
                               "deeply") from None


_ONNX_KEY = "onnx_path"
_ONNX_FILE = "model.onnx"


def _check_onnx_external(root: str, graph: str, meta: Mapping[str, Any], field: str,
                         op: str) -> None:
    """The external-data files of the ONNX graph ``graph`` (a file of the model directory
    ``root``) must be files of the directory too (skipped without the ``onnx`` package)."""
    from .onnx_encoder import onnx_external_files
    real_root = os.path.realpath(root)
    for loc in onnx_external_files(graph) or ():
        rel = os.path.relpath(os.path.join(os.path.dirname(graph), loc), real_root)
        if os.path.isabs(loc):
            rel = loc
        resolve_dir_file(root, rel, meta=meta, op=op,
                         field=f"{field} (external data {loc!r} of {os.path.basename(graph)})")


def _safe_file_part(key: str) -> str:
    """A modality key as part of a plain file name (``custom:7`` -> ``custom-7``)."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in str(key))


def bundle_files(model: "MultiModalModel", cfg: Dict[str, Any], extra: Dict[str, str]) -> None:
    """Add to ``extra`` (file name -> source) the tokenizer and ONNX files ``model`` uses, and
    point ``cfg`` (a ``to_dict()`` copy, edited in place) at the copies."""
    mods = cfg.get("modalities")
    if not isinstance(mods, dict):
        return
    for key, mcfg in mods.items():
        if not isinstance(mcfg, dict):
            continue
        m = Modality(key)
        pre = mcfg.get("preprocessing")
        tok = pre.get("tokenizer") if isinstance(pre, dict) else None
        if (isinstance(pre, dict) and isinstance(tok, str) and tok.lower() != "byte"
                and tok not in extra):
            used = getattr(getattr(model.preprocessors.get(m), "tokenizer", None), "path", None)
            src = used if isinstance(used, str) else tok
            fname = (TOKENIZER_FILE if TOKENIZER_FILE not in extra
                     else f"tokenizer.{_safe_file_part(key)}.json")
            extra[fname] = src
            pre["tokenizer"] = fname
        if mcfg.get("encoder") != "onnx":
            continue
        holders = [h for h in (mcfg.get("encoder_config"), mcfg)
                   if isinstance(h, dict) and isinstance(h.get("extra"), dict)
                   and isinstance(h["extra"].get(_ONNX_KEY), str)]
        if not holders:
            continue
        used = getattr(model.external_encoders.get(m), "path", None)
        if isinstance(used, str):
            src = used
        else:
            from .onnx_encoder import onnx_file
            src = onnx_file(holders[0]["extra"][_ONNX_KEY], "MultiModalModel.save")
        fname = f"encoder.{_safe_file_part(key)}.onnx"
        extra[fname] = src
        for h in holders:
            h["extra"][_ONNX_KEY] = fname
        from .onnx_encoder import onnx_external_files
        for loc in onnx_external_files(src) or ():  # copied under the same names
            data = os.path.join(os.path.dirname(src), loc)
            if extra.get(loc, data) != data:
                raise ModelFormatError(f"[MultiModalModel.save] the ONNX graphs of two "
                                       f"modalities keep different external data under the "
                                       f"same name {loc!r}")
            extra[loc] = data


class WeightBudget(np.random.Generator):
    """The generator a model is built with when its weights come from a model directory.

    It draws exactly what ``numpy.random.default_rng(seed)`` draws, but refuses -- before
    anything is allocated -- a draw that would take the tensors or values drawn past what the
    directory stores. The built-in modules draw every weight matrix, embedding table and
    position table from the generator they are given (biases and norm scales, drawn from
    nothing, follow a drawn matrix of the same width), and every module they build must then
    be loaded from the stored tensors, so a config whose sizes (``num_layers``,
    ``vocab_size``, ``max_positions``, widths) exceed the stored weights fails at the first
    draw that does not fit: quickly, and with little memory.
    """

    def __init__(self, seed: Any, tensors: int, values: int, *, where: str, op: str):
        super().__init__(np.random.PCG64(seed))
        self._tensors_left = int(tensors)
        self._values_left = int(values)
        self._stored = (int(tensors), int(values))
        self._where = where
        self._op = op

    def _charge(self, size: Any) -> None:
        if size is None:
            n = 1
            shape: Tuple[int, ...] = ()
        else:
            shape = tuple(int(d) for d in np.atleast_1d(np.asarray(size, dtype=object)))
            n = 1
            for d in shape:
                n *= max(d, 0)
        self._tensors_left -= 1
        self._values_left -= n
        if self._tensors_left < 0 or self._values_left < 0:
            t, v = self._stored
            raise ModelFormatError(
                f"[{self._op}] {self._where}: the config in mmcore.json implies more weights "
                f"than model.safetensors holds ({t} tensors, {v} values): a tensor of shape "
                f"{shape} does not fit; check its sizes (num_layers, vocab_size, "
                f"max_positions, hidden_dim, embed_dim, mlp_ratio, patch sizes)")

    def uniform(self, low=0.0, high=1.0, size=None):
        self._charge(size)
        return super().uniform(low, high, size)

    def normal(self, loc=0.0, scale=1.0, size=None):
        self._charge(size)
        return super().normal(loc, scale, size)

    def standard_normal(self, size=None, dtype=np.float64, out=None):
        self._charge(size if out is None else np.shape(out))
        return super().standard_normal(size, dtype=dtype, out=out)

    def random(self, size=None, dtype=np.float64, out=None):
        self._charge(size if out is None else np.shape(out))
        return super().random(size, dtype=dtype, out=out)


def build_model(cls: Type["MultiModalModel"], config: MultiModalConfig, budget: "WeightBudget",
                encoders: Optional[Mapping[Any, Any]], where: str, op: str) -> "MultiModalModel":
    """``cls(config, rng=budget, encoders=encoders)``; MemoryError becomes ModelFormatError."""
    try:
        return cls(config, rng=budget, encoders=encoders)
    except MemoryError:
        raise ModelFormatError(f"[{op}] {where}: the config in mmcore.json implies more memory "
                               "than is available; check its sizes (num_layers, vocab_size, "
                               "max_positions, widths)") from None


def check_layer_counts(config: MultiModalConfig, state: Mapping[str, Any], skip, where: str,
                        op: str) -> None:
    """ModelFormatError naming ``encoder_config.num_layers`` of a built-in encoder whose
    stored tensors hold another number of layers (checked before anything is built)."""
    layers: Dict[str, set] = {}
    present: set = set()
    for key in state:
        if not key.startswith("encoders."):
            continue
        for m in config.modalities:
            prefix = f"encoders.{m}."
            if key.startswith(prefix):
                present.add(str(m))
                rest = key[len(prefix):].split(".")
                if len(rest) > 2 and rest[0] == "encoder" and rest[1] == "layers":
                    layers.setdefault(str(m), set()).add(rest[2])
    for m, mc in config.modalities.items():
        if mc.encoder != "builtin" or m in skip or str(m) not in present:
            continue
        n = len(layers.get(str(m), ()))
        if mc.encoder_config.num_layers != n:
            raise ModelFormatError(f"[{op}] {where}: modalities.{m}.encoder_config.num_layers = "
                                   f"{mc.encoder_config.num_layers}, but model.safetensors holds "
                                   f"{n} layers of that encoder")


def check_state_modalities(state: Mapping[str, Any], config: MultiModalConfig,
                            where: str) -> None:
    """ModelFormatError for encoder tensors of a modality the config does not have."""
    known = {str(m) for m in config.modalities}
    for key in state:
        if key.startswith("encoders."):
            rest = key[len("encoders."):]
            m = next((k for k in known if rest.startswith(k + ".")), None)
            if m is None:
                raise ModelFormatError(f"{where}: tensor {key!r} belongs to a modality that the "
                                       f"config does not have (configured: "
                                       f"{', '.join(sorted(known))})")


def restrict_config(config: MultiModalConfig, modalities: Any, where: str):
    """``(config, kept modalities)``: ``config`` cut down to ``modalities`` (late concat fusion)."""
    from ..config import LateFusion
    if isinstance(modalities, (str, Modality)):
        modalities = [modalities]
    keep = []
    for key in modalities:
        m = Modality(key)
        if m not in config.modalities:
            raise ModalityError(f"[MultiModalModel] {where} has no modality {str(m)!r} "
                                f"(it has {', '.join(map(str, config.modalities))})")
        if m not in keep:
            keep.append(m)
    if not keep:
        raise ModalityError("[MultiModalModel] modalities is empty; name at least one")
    mcs = []
    for m in keep:
        mc = config.modalities[m]
        mcs.append(mc if mc.enabled else type(mc).from_dict(dict(mc.to_dict(), enabled=True)))
    sub = MultiModalConfig(mcs, fusion=LateFusion("concat"), cache=config.cache,
                           name=config.name, version=config.version)
    return sub, keep


def served_externally(key: str, external: Mapping[Modality, Any]) -> bool:
    """Whether the tensor ``key`` belongs to a modality served by an ``external`` encoder."""
    return any(key.startswith(f"encoders.{m}.") for m in external)


def save_model(model: "MultiModalModel", path: Any, *, name: Optional[str] = None,
               version: Optional[str] = None, tokenizer: Any = None) -> Dict[str, Any]:
    """Write ``model`` to a model directory: what :meth:`MultiModalModel.save` does (see there
    for the parameters); returns the metadata written to ``mmcore.json``."""
    config = model.config
    cfg = config.to_dict()
    rules: Dict[str, Optional[str]] = {}
    for m, mc in config.modalities.items():
        if mc.quantization is not None:
            rules[f"encoders.{m}."] = mc.quantization
    extra: Dict[str, str] = {}
    if tokenizer is not None:
        tok = os.fspath(tokenizer)
        if os.path.isdir(tok):
            tok = os.path.join(tok, TOKENIZER_FILE)
        extra[TOKENIZER_FILE] = tok
        for mcfg in cfg.get("modalities", {}).values():
            pre = mcfg.get("preprocessing") if isinstance(mcfg, dict) else None
            if (isinstance(pre, dict) and pre.get("modality") == "text"
                    and pre.get("tokenizer") not in (None, "byte")):
                pre["tokenizer"] = TOKENIZER_FILE
    bundle_files(model, cfg, extra)
    return save_model_dir(path, config=cfg, state=model.state_dict(),
                          name=name if name is not None else config.name,
                          version=version if version is not None else config.version,
                          quantization=rules or None, extra_files=extra or None)


def load_pretrained(cls: Type["MultiModalModel"], path: Any, *, verify: bool = True,
                    encoders: Optional[Mapping[Any, Any]] = None, modalities: Any = None,
                    op: str = "MultiModalModel.from_pretrained") -> "MultiModalModel":
    """An instance of ``cls`` loaded from the model directory ``path``: what
    :meth:`MultiModalModel.from_pretrained` does without ``distributed`` (see there for the
    parameters and errors); ``op`` prefixes the error messages."""
    cfg_dict, state, meta = load_model_dir(path, verify=verify, keep_quantized=True)
    config = config_from_dir(cfg_dict, path, meta, op=op)
    check_state_modalities(state, config, os.fspath(path))
    keep = None
    if modalities is not None:
        config, keep = restrict_config(config, modalities, os.fspath(path))
        state = {k: v for k, v in state.items()
                 if any(k.startswith(f"encoders.{m}.") for m in keep)}
    given = {Modality(k) for k in (encoders or {})}
    check_layer_counts(config, state, given, os.fspath(path), op)
    budget = WeightBudget(0, *stored_weight_counts(meta), where=os.fspath(path), op=op)
    model = build_model(cls, config, budget, encoders, os.fspath(path), op)
    state = {k: v for k, v in state.items()
             if not served_externally(k, model.external_encoders)}
    if keep is not None:       # the substitute fusion layer keeps its own parameters
        state = dict(state, **{k: v for k, v in model.state_dict().items()
                               if k.startswith("fusion.")})
    try:
        model.load_state_dict(state, strict=True)
    except ModelFormatError as exc:
        raise ModelFormatError(f"[{op}] {os.fspath(path)}: {exc}") from None
    return model
