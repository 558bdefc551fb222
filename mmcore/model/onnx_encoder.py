"""Encoders stored as ONNX graphs, run with onnxruntime (``pip install "mmcore[onnx]"``).

A modality with ``encoder="onnx"`` is encoded by :class:`OnnxEncoder`: the preprocessed batch
(``input_ids``, ``pixel_values``, ``input_features`` or ``features``, as the built-in encoders
get it) goes to the graph's first input, and the attention mask to its second input when the
graph has one. The graph returns token embeddings ``(B, L, D)``; optionally a second output
``(B, L)`` mask and a third ``(B, D)`` pooled embedding; a single 2-D output ``(B, D)`` is taken
as one pooled token per row -- the same contract, checks and pooling (masked mean) as an
encoder callable given to :meth:`MultiModalLoader.with_encoder`.

Where the graph comes from (``ONNX_FILE`` is ``"model.onnx"``):

* ``MultiModalLoader(config).with_modality_path(modality, directory)``: the directory holds
  ``model.onnx``; the loader records its path in the modality's
  ``encoder_config.extra["onnx_path"]``;
* ``encoder_config.extra["onnx_path"]`` or the modality's ``extra["onnx_path"]`` in the config:
  a ``.onnx`` file, or a directory holding ``model.onnx``. In a config built in code a relative
  path is relative to the working directory. In the config of a model directory it is relative
  to that directory and must name one of its own files, listed with its checksum in
  ``mmcore.json`` (an absolute path, a ``..`` or a symbolic link leading outside, or an unlisted
  file is refused with :class:`~mmcore.errors.ModelFormatError`); :meth:`MultiModalModel.save`
  copies the graph into the directory (``encoder.<modality>.onnx``) and names it so. The same
  holds for the external-data files a graph refers to, where the ``onnx`` package (which reads
  them) is installed; onnxruntime itself refuses external data outside the graph's folder.

The session runs on the CPU with ``intra_op_num_threads`` = :func:`mmcore.get_num_threads` at
the time it is created. ``ModalityConfig.quantization`` does not apply (quantize the graph
itself). Early and middle fusion need built-in encoders.

Examples
--------
>>> import os, tempfile
>>> import numpy as np
>>> import onnx
>>> from onnx import TensorProto, helper, numpy_helper
>>> from mmcore.model.onnx_encoder import OnnxEncoder
>>> w = np.full((4, 8), 0.5, np.float32)
>>> graph = helper.make_graph(
...     [helper.make_node("MatMul", ["x", "w"], ["tokens"])], "enc",
...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "L", 4])],
...     [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["B", "L", 8])],
...     [numpy_helper.from_array(w, "w")])
>>> d = tempfile.mkdtemp()
>>> onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
...           os.path.join(d, "model.onnx"))
>>> enc = OnnxEncoder(d, modality="custom:1", embed_dim=8)
>>> tokens, mask, pooled = enc(np.ones((2, 3, 4), np.float32))
>>> tokens.shape, bool(mask.all()), float(pooled[0, 0])
((2, 3, 8), True, 2.0)
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .._files import check_regular, open_regular
from ..config import ModalityConfig
from ..errors import ConfigError, ModelFormatError, ShapeError
from ..modality import Modality
from .external import ExternalEncoder

__all__ = ["OnnxEncoder", "ONNX_FILE", "onnx_file", "onnx_path_of", "onnx_external_files"]

ONNX_FILE = "model.onnx"
_PATH_KEY = "onnx_path"

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError("[OnnxEncoder] encoder='onnx' needs onnxruntime, which is not "
                          "installed: pip install \"mmcore[onnx]\"") from exc
    return onnxruntime


def onnx_file(path: Any, what: str = "OnnxEncoder") -> str:
    """The ONNX file at ``path``: ``path`` itself if it is a file, else ``path/model.onnx``.

    Raises
    ------
    ModelFormatError
        Neither exists (the message names the file that was looked for).
    """
    try:
        root = os.fsdecode(os.fspath(path))
    except TypeError:
        raise ModelFormatError(f"[{what}] the ONNX path must be a path to a {ONNX_FILE} file "
                               f"or to a directory holding one, got {type(path).__name__}"
                               ) from None
    if os.path.isfile(root):
        return root
    if os.path.exists(root) and not os.path.isdir(root):  # a FIFO, a device: refused, not read
        check_regular(root, what="ONNX file", error=ModelFormatError, op=what)
    if not os.path.isdir(root):
        raise ModelFormatError(f"[{what}] {root!r} does not exist (expected a directory holding "
                               f"{ONNX_FILE}, or an ONNX file)")
    file = os.path.join(root, ONNX_FILE)
    if os.path.exists(file) and not os.path.isfile(file):
        check_regular(file, what="ONNX file", error=ModelFormatError, op=what)
    if not os.path.isfile(file):
        raise ModelFormatError(f"[{what}] {file!r} does not exist: the directory {root!r} has no "
                               f"{ONNX_FILE}")
    return file


def onnx_external_files(path: str) -> Optional[List[str]]:
    """The external-data files (``location``, relative to the graph's folder) that the ONNX
    graph at ``path`` refers to, in order of first use; None when the ``onnx`` package, which
    reads them, is not installed.

    Raises
    ------
    ModelFormatError
        The file is not an ONNX model the ``onnx`` package can parse.
    """
    try:
        import onnx
        from onnx import external_data_helper as edh
    except ImportError:
        return None
    try:
        with open_regular(path, what="ONNX file", error=ModelFormatError,
                          op="OnnxEncoder") as f:
            model = onnx.load_model_from_string(f.read())
    except ModelFormatError:
        raise
    except Exception as exc:  # protobuf DecodeError and the like
        raise ModelFormatError(f"[OnnxEncoder] {path!r} is not a loadable ONNX model: "
                               f"{type(exc).__name__}: {exc}") from None
    tensors = getattr(edh, "_get_all_tensors", None)
    found: List[str] = []
    for t in (tensors(model) if tensors is not None else model.graph.initializer):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc is not None and loc not in found:
                found.append(loc)
    return found


def onnx_path_of(mc: ModalityConfig) -> Optional[str]:
    """The ``onnx_path`` of a modality config (``encoder_config.extra`` or ``extra``), or None.

    Raises
    ------
    ConfigError
        Both are set and differ, or the value is not a string.
    """
    owner = f"ModalityConfig({str(mc.modality)!r})"
    a = mc.encoder_config.extra.get(_PATH_KEY)
    b = mc.extra.get(_PATH_KEY)
    for name, v in (("encoder_config.extra", a), ("extra", b)):
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"[{owner}] {name}[{_PATH_KEY!r}] must be a path string, got "
                              f"{type(v).__name__}")
    if a is not None and b is not None and a != b:
        raise ConfigError(f"[{owner}] encoder_config.extra[{_PATH_KEY!r}]={a!r} and "
                          f"extra[{_PATH_KEY!r}]={b!r} disagree; set one")
    return a if a is not None else b


class OnnxEncoder:
    """An encoder that runs an ONNX graph with onnxruntime.

    Parameters
    ----------
    path : path-like
        An ONNX file, or a directory holding ``model.onnx``.
    modality : Modality or str, keyword-only
        The modality it encodes (named in error messages).
    embed_dim : int, keyword-only
        The width ``D`` of the embeddings the graph must return.
    num_threads : int, optional, keyword-only
        onnxruntime's ``intra_op_num_threads``; default :func:`mmcore.get_num_threads`.

    Call
    ----
    ``encoder(x, attention_mask=None) -> (tokens float32 (B, L, D), mask bool (B, L),
    pooled float32 (B, D))``. ``x`` is cast to the dtype of the graph's first input. A graph
    with two inputs gets the mask as its second input, cast to that input's dtype; when
    ``attention_mask`` is None it gets ones of shape ``x.shape[:k]``, ``k`` the rank the graph
    declares (2 when undeclared). The outputs are checked and completed as for
    :meth:`MultiModalLoader.with_encoder` callables (the mask defaults to all True, the pooled
    embedding to the masked mean of the tokens).

    Raises
    ------
    ImportError
        onnxruntime is not installed (``pip install "mmcore[onnx]"``).
    ModelFormatError
        The file is missing, is not a loadable ONNX model, or has no input or more than two.
    ShapeError
        (When called) the graph fails on the input, or returns outputs of the wrong shape,
        count or width, or non-finite values.

    Examples
    --------
    See :mod:`mmcore.model.onnx_encoder`.
    """

    def __init__(self, path: Any, *, modality: Any, embed_dim: int,
                 num_threads: Optional[int] = None):
        self.modality = Modality(modality)
        if (isinstance(embed_dim, bool) or not isinstance(embed_dim, (int, np.integer))
                or embed_dim < 1):
            raise ConfigError(f"[OnnxEncoder] embed_dim must be an integer >= 1, got "
                              f"{embed_dim!r}")
        self.path = onnx_file(path)
        ort = _import_onnxruntime()
        if num_threads is None:
            from .._backend import get_num_threads
            num_threads = get_num_threads()
        if (isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer))
                or num_threads < 1):
            raise ConfigError(f"[OnnxEncoder] num_threads must be an integer >= 1, got "
                              f"{num_threads!r}")
        self.num_threads = int(num_threads)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.num_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(self.path, sess_options=opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail...)
            raise ModelFormatError(f"[OnnxEncoder] {self.path!r} is not a loadable ONNX model: "
                                   f"{type(exc).__name__}: {exc}") from None
        inputs = self.session.get_inputs()
        if not 1 <= len(inputs) <= 2:
            raise ModelFormatError(f"[OnnxEncoder] {self.path!r} has {len(inputs)} inputs, "
                                   "expected 1 (features) or 2 (features, attention mask)")
        self._inputs = [(i.name, _ORT_DTYPES.get(i.type), i.shape) for i in inputs]
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._adapter = _OnnxAdapter(self.modality, self._run, embed_dim, self.path)
        self.embed_dim = self._adapter.embed_dim

    @classmethod
    def from_modality_config(cls, mc: ModalityConfig, *,
                             num_threads: Optional[int] = None) -> "OnnxEncoder":
        """The encoder of a modality with ``encoder="onnx"`` and an ``onnx_path`` (see
        :func:`onnx_path_of`); ConfigError when it has no path."""
        if mc.encoder != "onnx":
            raise ConfigError(f"[OnnxEncoder] modality {str(mc.modality)!r} has encoder="
                              f"{mc.encoder!r}, expected 'onnx'")
        path = onnx_path_of(mc)
        if path is None:
            raise ConfigError(f"[OnnxEncoder] modality {str(mc.modality)!r} uses encoder='onnx' "
                              f"but names no ONNX file: give its directory with "
                              f"MultiModalLoader(config).with_modality_path, or set "
                              f"encoder_config.extra[{_PATH_KEY!r}]")
        return cls(path, modality=mc.modality, embed_dim=mc.embed_dim, num_threads=num_threads)

    @property
    def input_names(self) -> Sequence[str]:
        return [n for n, _, _ in self._inputs]

    @property
    def output_names(self) -> Sequence[str]:
        return list(self._outputs)

    def _cast(self, a: Any, dtype: Any, what: str) -> np.ndarray:
        arr = np.asarray(a)
        if dtype is None:
            return np.ascontiguousarray(arr)
        if arr.dtype != dtype and np.issubdtype(arr.dtype, np.floating) and not (
                np.issubdtype(dtype, np.floating)):
            raise ShapeError(f"[OnnxEncoder] {what} of modality {str(self.modality)!r} is "
                             f"{arr.dtype}, but {self.path!r} expects {np.dtype(dtype)}")
        return np.ascontiguousarray(arr, dtype=dtype)

    def _run(self, x, attention_mask=None):
        (name, dtype, _), *rest = self._inputs
        feed: Dict[str, np.ndarray] = {name: self._cast(x, dtype, "input")}
        if rest:
            mname, mdtype, mshape = rest[0]
            if attention_mask is None:
                rank = len(mshape) if mshape else 2
                attention_mask = np.ones(feed[name].shape[:rank], np.bool_)
            feed[mname] = self._cast(attention_mask, mdtype, "attention_mask")
        try:
            outs = self.session.run(None, feed)
        except Exception as exc:  # onnxruntime's InvalidArgument, RuntimeException...
            shapes = ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in feed.items())
            raise ShapeError(f"[OnnxEncoder] {self.path!r} failed on {shapes}: "
                             f"{type(exc).__name__}: {exc}") from None
        if len(outs) == 1:
            return outs[0]
        if len(outs) > 3:
            raise ShapeError(f"[OnnxEncoder] {self.path!r} has {len(outs)} outputs, expected "
                             "tokens, (tokens, mask) or (tokens, mask, pooled)")
        return tuple(outs)

    def __call__(self, x, attention_mask=None):
        return self._adapter(x, attention_mask=attention_mask)

    def __repr__(self) -> str:
        return (f"OnnxEncoder({self.path!r}, modality={str(self.modality)!r}, "
                f"embed_dim={self.embed_dim}, num_threads={self.num_threads})")


class _OnnxAdapter(ExternalEncoder):
    """The output checks of :class:`~mmcore.model.external.ExternalEncoder`, with messages
    naming the ONNX file."""

    def __init__(self, modality, fn, embed_dim, path):
        super().__init__(modality, fn, embed_dim)
        self.path = path

    def _fail(self, msg: str) -> ShapeError:
        return ShapeError(f"[OnnxEncoder] {self.path!r} (modality {str(self.modality)!r}) "
                          f"{msg}")
