"""Batch feature extraction: many audio, image or video files to one safetensors file.

:func:`extract_features` runs the preprocessor of one modality (the model-ready tensors:
``input_features`` of :class:`~mmcore.preprocess.AudioPreprocessor`, ``pixel_values`` of
:class:`~mmcore.preprocess.ImagePreprocessor` and :class:`~mmcore.preprocess.VideoPreprocessor`)
over a list of files, in batches, and writes one tensor per file that could be read. Files that
cannot be decoded (corrupt, truncated, missing, not a file of that kind) are skipped and listed in
the returned :class:`FeatureReport` and in the output's metadata; the others are still extracted.

The command line front end is ``mmcore features {audio,image,video} INPUTS... -o OUT``.

Examples
--------
>>> import os, tempfile, wave
>>> import numpy as np
>>> from mmcore.features import extract_features
>>> d = tempfile.mkdtemp()
>>> with wave.open(os.path.join(d, "a.wav"), "wb") as w:
...     w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
...     w.writeframes(np.zeros(8000, np.int16).tobytes())
>>> rep = extract_features("audio", [os.path.join(d, "a.wav"), os.path.join(d, "gone.wav")],
...                        os.path.join(d, "f.safetensors"), progress=False)
>>> list(rep.keys), [p for p, _ in rep.failed] == [os.path.join(d, "gone.wav")]
(['0000_a.wav'], True)
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ._files import check_regular, file_kind
from ._version import __version__
from .config import PreprocessingConfig
from .errors import ConfigError, MMCoreError, ModalityError, ShapeError, VideoDecodeError
from .modality import Modality

__all__ = ["extract_features", "FeatureReport", "FEATURE_MODALITIES", "METADATA_FORMAT"]

#: The modalities :func:`extract_features` handles.
FEATURE_MODALITIES = ("audio", "image", "video")
#: The ``format`` entry of the output's metadata.
METADATA_FORMAT = "mmcore-features"

_OP = "extract_features"
# what a single bad file may raise; anything else (ImportError, MemoryError, ...) stops the run
_ITEM_ERRORS = (MMCoreError, OSError, ValueError, EOFError)
_OUTPUT_KEY = {"audio": "input_features", "image": "pixel_values", "video": "pixel_values"}

PathLike = Union[str, "os.PathLike[str]"]


@dataclasses.dataclass
class FeatureReport:
    """What :func:`extract_features` did.

    Attributes
    ----------
    modality : str
        ``"audio"``, ``"image"`` or ``"video"``.
    output : str or None
        The safetensors file written (None when ``output=None``).
    keys : dict of str -> str
        Tensor name -> source path, in input order, for every file that was extracted.
    failed : list of (str, str)
        ``(source path, "ErrorType: message")`` of every file that was skipped, in input order.
    features : dict of str -> numpy.ndarray
        The tensors by name (filled only when ``output=None``; empty otherwise, so that a
        large run does not keep them in memory twice).
    config : PreprocessingConfig
        The preprocessing that produced the tensors.
    seconds : float
        Wall time of the run.
    """

    modality: str
    output: Optional[str]
    keys: Dict[str, str]
    failed: List[Tuple[str, str]]
    features: Dict[str, np.ndarray]
    config: PreprocessingConfig
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every input was extracted."""
        return not self.failed

    @property
    def num_ok(self) -> int:
        return len(self.keys)

    @property
    def num_failed(self) -> int:
        return len(self.failed)


class _Progress:
    """A one-line progress bar on a text stream (redrawn in place on a terminal; on a pipe or
    file, a line at most every few seconds and one at the end)."""

    def __init__(self, total: int, label: str, stream: Any, *, interval_s: float = 5.0):
        self.total, self.label, self.stream = total, label, stream
        self.done = self.failed = 0
        self.t0 = self._last = time.monotonic()
        self.interval_s = interval_s
        isatty = getattr(stream, "isatty", None)
        try:
            self.tty = bool(isatty and isatty())
        except (OSError, ValueError):
            self.tty = False

    def _line(self) -> str:
        width = 24
        frac = self.done / self.total if self.total else 1.0
        fill = int(round(frac * width))
        rate = self.done / max(time.monotonic() - self.t0, 1e-9)
        fails = f", {self.failed} failed" if self.failed else ""
        return (f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                f"files{fails} ({rate:.1f} files/s)")

    def update(self, done: int, failed: int) -> None:
        self.done, self.failed = done, failed
        now = time.monotonic()
        final = self.done >= self.total
        try:
            if self.tty:
                self.stream.write("\r" + self._line() + ("\n" if final else ""))
                self.stream.flush()
            elif final or now - self._last >= self.interval_s:
                self.stream.write(self._line() + "\n")
                self.stream.flush()
                self._last = now
        except (OSError, ValueError):  # a closed or broken stream must not stop the run
            pass


def _modality_name(modality: Any) -> str:
    try:
        m = Modality(modality)
    except (ModalityError, ValueError, TypeError):
        m = None
    name = str(m) if m is not None else repr(modality)
    if m is None or name not in FEATURE_MODALITIES:
        raise ModalityError(f"[{_OP}] modality must be one of "
                            f"{', '.join(map(repr, FEATURE_MODALITIES))}, got {name}")
    return name


def _base_config(name: str, model: Any) -> PreprocessingConfig:
    """The preprocessing config of modality ``name`` in ``model`` (or the default model)."""
    from .model import MultiModalModel, default_config

    if model is None:
        config = default_config()
        where = "the default model"
    else:
        if isinstance(model, (str, bytes, os.PathLike)):
            where = f"model {os.fsdecode(model)!r}"
            # from_pretrained takes str paths (a bytes path fails in os.path.join)
            model = MultiModalModel.from_pretrained(
                os.fsdecode(model) if isinstance(model, bytes) else model)
        elif isinstance(model, MultiModalModel):
            where = "model"
        else:
            raise ConfigError(f"[{_OP}] model must be None, a MultiModalModel or a model "
                              f"directory, got {type(model).__name__}")
        config = model.config
    m = Modality(name)
    if m not in config.modalities:
        raise ModalityError(f"[{_OP}] {where} has no modality {name!r} (it has "
                            f"{', '.join(str(k) for k in config.modalities)})")
    pre = config.modalities[m].preprocessing
    if pre is None:
        raise ModalityError(f"[{_OP}] modality {name!r} of {where} has no preprocessing")
    return pre


def _resolve_config(name: str, model: Any, preprocessing: Any) -> PreprocessingConfig:
    if isinstance(preprocessing, PreprocessingConfig):
        if model is not None:
            raise ConfigError(f"[{_OP}] give model or a full PreprocessingConfig as "
                              "preprocessing, not both (a mapping of changes may go with model)")
        if preprocessing.modality != name:
            raise ConfigError(f"[{_OP}] preprocessing is for modality "
                              f"{preprocessing.modality!r}, expected {name!r}")
        return preprocessing
    base = _base_config(name, model)
    if preprocessing is None:
        return base
    if not isinstance(preprocessing, Mapping):
        raise ConfigError(f"[{_OP}] preprocessing must be None, a PreprocessingConfig or a "
                          f"mapping of field changes, got {type(preprocessing).__name__}")
    changes = dict(preprocessing)
    if "modality" in changes and changes["modality"] != name:
        raise ConfigError(f"[{_OP}] preprocessing['modality'] must be {name!r}, got "
                          f"{changes['modality']!r}")
    fields = PreprocessingConfig.field_names()  # of every modality
    unknown = sorted(k for k in changes if k not in fields)
    if unknown:
        raise ConfigError(f"[{_OP}] preprocessing has unknown field {unknown[0]!r}")
    try:
        return base.replace(**changes)
    except ConfigError as exc:
        raise ConfigError(f"[{_OP}] preprocessing: {exc}") from None


def _preprocessor(pre: PreprocessingConfig):
    from . import preprocess as P

    if pre.modality == "audio":
        return P.AudioPreprocessor(pre)
    if pre.modality == "image":
        return P.ImagePreprocessor(pre)
    return P.VideoPreprocessor(pre)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


_ENCODED = (bytes, bytearray, memoryview)


def _is_input(x: Any) -> bool:
    """A path, encoded data (bytes-like) or a binary file object."""
    return isinstance(x, (str, os.PathLike) + _ENCODED) or hasattr(x, "read")


def _source(x: Any) -> str:
    """How reports and metadata name an input: its path, or what the data was."""
    if isinstance(x, (str, os.PathLike)):
        return os.fsdecode(os.fspath(x))
    if isinstance(x, _ENCODED):
        return f"<{memoryview(x).nbytes} encoded bytes>"
    name = getattr(x, "name", None)
    return os.fsdecode(name) if isinstance(name, (str, bytes)) else f"<{type(x).__name__}>"


def _read_file_object(x: Any, name: str) -> Any:
    """A file object's bytes (read once: decoders may need them more than once), from its
    start for images and audio (as load_image / load_audio read one), from its current
    position for video (as load_video)."""
    if isinstance(x, (str, os.PathLike) + _ENCODED):
        return x
    if name != "video":
        try:
            x.seek(0)
        except (AttributeError, OSError, ValueError):
            pass    # a stream that cannot seek: what is left of it
    data = x.read()
    if not isinstance(data, (bytes, bytearray)):
        raise ConfigError(f"[{_OP}] {_source(x)}: read() gave {type(data).__name__}, not "
                          "bytes (open the file in binary mode)")
    return bytes(data)


def _check_paths(paths: Any, name: str) -> List[Any]:
    if _is_input(paths):
        return [paths]
    try:
        items = list(paths)
    except TypeError:
        raise ConfigError(f"[{_OP}] paths must be a path, encoded bytes or a sequence of "
                          f"them, got {type(paths).__name__}") from None
    if not items:
        raise ConfigError(f"[{_OP}] paths is empty; give at least one file")
    for i, p in enumerate(items):
        if not _is_input(p):
            raise ConfigError(f"[{_OP}] paths[{i}] must be a path (str, os.PathLike), encoded "
                              "bytes (bytes, bytearray, memoryview) or a binary file object, "
                              f"got {type(p).__name__}")
    return [_read_file_object(p, name) for p in items]


def _check_output(output: Any) -> Optional[str]:
    if output is None:
        return None
    try:
        out = os.fsdecode(os.fspath(output))
    except TypeError:
        raise ConfigError(f"[{_OP}] output must be a path or None, got "
                          f"{type(output).__name__}") from None
    if os.path.isdir(out):
        raise ConfigError(f"[{_OP}] output {out!r} is a directory; give a file name")
    try:
        st = os.stat(out)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        # the output replaces the path it names: never a FIFO or a device (/dev/stdout)
        raise ConfigError(f"[{_OP}] output {out!r} is {file_kind(st.st_mode)}, not a regular "
                          "file; give a file name")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConfigError(f"[{_OP}] output {out!r}: folder {parent!r} does not exist")
    return out


def _key(i: int, path: Any, width: int) -> str:
    if not isinstance(path, (str, os.PathLike)):
        return f"{i:0{width}d}_bytes"
    base = os.path.basename(os.fsdecode(os.fspath(path)).rstrip("/\\")) or "input"
    return f"{i:0{width}d}_{base}"


class _Runner:
    """Decode and compute functions of one modality (decode: per file; compute: per batch
    when the results do not depend on the batch, else per item)."""

    def __init__(self, pre: PreprocessingConfig):
        self.config = pre
        self.pre = _preprocessor(pre)
        self.name = pre.modality
        # audio padded to the longest item of a batch would depend on its neighbours
        self.batchable = self.name == "image" or (self.name == "audio"
                                                  and pre.padding == "max_length")

    def decode(self, path: Any) -> Any:
        from . import preprocess as P

        if self.name == "audio":
            x = P.load_audio(path, sr=self.config.sample_rate, mono=self.config.mono)
            if x.ndim == 2:
                if x.shape[0] != 1:
                    raise ShapeError(f"[{_OP}] {_source(path)!r} has "
                                     f"{x.shape[0]} channels and the preprocessing has "
                                     "mono=False; features are computed per 1-D waveform")
                x = x[0]
            return x
        if self.name == "image":
            return P.load_image(path, max_pixels=self.pre.max_pixels)
        # video decodes in compute; fail early here (a FIFO or device: without reading it)
        if isinstance(path, (str, os.PathLike)):
            check_regular(os.fsdecode(os.fspath(path)), what="video file",
                          error=VideoDecodeError, op=_OP)
        return path

    def compute(self, items: List[Any]) -> List[Tuple[np.ndarray, Dict[str, Any]]]:
        """Per-item tensors (and metadata) of ``items``, in one preprocessor call."""
        key = _OUTPUT_KEY[self.name]
        if self.name == "video":
            assert len(items) == 1
            out = self.pre(items[0])
            return [(np.ascontiguousarray(out[key], np.float32),
                     {"frame_indices": np.asarray(out["frame_indices"]).tolist()})]
        out = self.pre(items if len(items) > 1 else items[0])
        feats = np.asarray(out[key], np.float32)
        res = []
        for j in range(len(items)):
            info: Dict[str, Any] = {}
            if self.name == "audio":
                info["real_frames"] = int(np.asarray(out["attention_mask"][j]).sum())
            res.append((np.ascontiguousarray(feats[j]), info))
        return res


def extract_features(modality: Any, paths: Any, output: Optional[PathLike], *,
                     model: Any = None, preprocessing: Any = None, batch_size: int = 16,
                     progress: Union[bool, Any] = True) -> FeatureReport:
    """Preprocess many files of one modality and save one tensor per file.

    Parameters
    ----------
    modality : {"audio", "image", "video"} or Modality
    paths : path, encoded input or sequence of them
        The inputs: file names (``str`` / ``os.PathLike``), encoded files held in memory
        (``bytes`` / ``bytearray`` / ``memoryview``, e.g. a JPEG received by a server) or
        binary file objects (read once); a single one is one input. The same file may
        appear twice. Encoded inputs are keyed ``"<index>_bytes"`` and reported as
        ``"<N encoded bytes>"``. (Up to mmcore 0.1.0, ``bytes`` were a file name.)
    output : path or None
        The safetensors file to write (atomically: a partial file never replaces it). None: do
        not write; the tensors are returned in :attr:`FeatureReport.features`.
    model : None, MultiModalModel or path, keyword-only
        Whose preprocessing to use: a model, a saved model directory
        (:meth:`MultiModalModel.from_pretrained`), or None for
        :func:`mmcore.model.default_config`.
    preprocessing : None, mapping or PreprocessingConfig, keyword-only
        A mapping of :class:`~mmcore.config.PreprocessingConfig` fields to change in the
        model's preprocessing (``{"preset": "fbank"}``, ``{"size": 224}``), or a whole config
        of this modality (then without ``model``).
    batch_size : int, default 16, keyword-only
        Files decoded and preprocessed per batch. Images, and audio padded to a fixed
        ``chunk_length_s`` (``padding="max_length"``), go through one preprocessor call per
        batch; audio with ``"longest"`` / ``"none"`` padding and videos are preprocessed one
        file at a time, so that a file's tensor never depends on the other files in its batch.
    progress : bool or text stream, default True, keyword-only
        Show a progress bar on ``sys.stderr`` (True), on the given stream, or not (False).

    Returns
    -------
    FeatureReport
        Tensor names and sources, and the files that failed with the reason.

    Output format
    -------------
    A safetensors file with one float32 tensor per extracted file, named
    ``"<index>_<basename>"`` (``index``: the file's position in ``paths``, zero-padded to at
    least 4 digits, so names are unique and sort in input order). Tensors are the
    preprocessor's output for the file alone, without the batch axis: audio
    ``input_features[0]`` (``(n_mels, frames)``, fbank ``(frames, n_mels)``), image
    ``pixel_values[0]`` (``(3, S, S)`` or patches), video ``pixel_values`` (``(T, 3, S, S)``).
    Its ``__metadata__`` (strings) holds ``format`` (``"mmcore-features"``), ``version``,
    ``modality``, ``preprocessing`` (the config as JSON), and as JSON: ``sources`` (every
    input path, in order), ``items`` (per tensor: ``key``, ``source``, ``shape`` and, for
    audio, ``real_frames``; for video ``frame_indices``) and ``failed`` (``[path, reason]``
    pairs).

    Raises
    ------
    ModalityError
        ``modality`` is not audio, image or video, or the model lacks it.
    ConfigError
        A bad argument (named in the message): empty ``paths``, an invalid preprocessing
        change, ``batch_size`` < 1, ``output`` a directory or in a missing folder.
    ModelFormatError
        ``model`` is a directory that is not a valid saved model.

    A file that cannot be read never raises: it is listed in :attr:`FeatureReport.failed`.
    That includes inputs that are not regular files (a FIFO, a device such as ``/dev/zero``
    or ``/dev/stdin``, a directory): they are refused without being read, so they cannot
    block the run. Files larger than the loaders' default limits (``max_duration_s`` and
    ``max_samples`` of :func:`~mmcore.preprocess.load_audio`, ``max_pixels`` and ``max_bytes``
    of :func:`~mmcore.preprocess.load_video`, ``max_pixels`` of
    :func:`~mmcore.preprocess.load_image`) are listed the same way.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from PIL import Image
    >>> from safetensors.numpy import load_file
    >>> from mmcore.features import extract_features
    >>> d = tempfile.mkdtemp()
    >>> Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(os.path.join(d, "x.png"))
    >>> out = os.path.join(d, "img.safetensors")
    >>> rep = extract_features("image", [os.path.join(d, "x.png")], out, progress=False)
    >>> rep.ok, {k: v.shape for k, v in load_file(out).items()}
    (True, {'0000_x.png': (3, 64, 64)})
    """
    t_start = time.perf_counter()
    name = _modality_name(modality)
    items = _check_paths(paths, name)
    if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1):
        raise ConfigError(f"[{_OP}] batch_size must be an integer >= 1, got {batch_size!r}")
    out_path = _check_output(output)
    pre = _resolve_config(name, model, preprocessing)
    runner = _Runner(pre)

    stream = None
    if progress is True:
        stream = sys.stderr
    elif progress not in (False, None):
        if not hasattr(progress, "write"):
            raise ConfigError(f"[{_OP}] progress must be a bool or a text stream, got "
                              f"{type(progress).__name__}")
        stream = progress
    bar = _Progress(len(items), f"mmcore features {name}", stream) if stream else None

    width = max(4, len(str(len(items) - 1)))
    tensors: Dict[str, np.ndarray] = {}
    keys: Dict[str, str] = {}
    infos: Dict[str, Dict[str, Any]] = {}
    failures: Dict[int, str] = {}
    step = int(batch_size)
    for start in range(0, len(items), step):
        decoded: List[Tuple[int, Any]] = []
        for i in range(start, min(start + step, len(items))):
            try:
                decoded.append((i, runner.decode(items[i])))
            except _ITEM_ERRORS as exc:
                failures[i] = _describe(exc)
        results: Dict[int, Tuple[np.ndarray, Dict[str, Any]]] = {}
        if runner.batchable and len(decoded) > 1:
            try:
                got = runner.compute([x for _, x in decoded])
                results = {i: r for (i, _), r in zip(decoded, got)}
            except _ITEM_ERRORS:
                results = {}  # find the culprit(s) one file at a time
        for i, x in decoded:
            if i in results:
                continue
            try:
                results[i] = runner.compute([x])[0]
            except _ITEM_ERRORS as exc:
                failures[i] = _describe(exc)
        for i, _ in decoded:
            if i in results:
                k = _key(i, items[i], width)
                tensors[k], infos[k] = results[i]
                keys[k] = _source(items[i])
        if bar is not None:
            bar.update(min(start + step, len(items)), len(failures))

    order = sorted(keys)  # names sort in input order
    keys = {k: keys[k] for k in order}
    failed = [(_source(items[i]), failures[i]) for i in sorted(failures)]
    if out_path is not None:
        meta = {
            "format": METADATA_FORMAT,
            "version": __version__,
            "modality": name,
            "preprocessing": json.dumps(pre.to_dict(), default=str),
            "sources": json.dumps([_source(p) for p in items]),
            "items": json.dumps([dict({"key": k, "source": keys[k],
                                       "shape": list(tensors[k].shape)}, **infos[k])
                                 for k in order]),
            "failed": json.dumps([list(f) for f in failed]),
        }
        _write(out_path, {k: tensors[k] for k in order}, meta)
        features: Dict[str, np.ndarray] = {}
    else:
        features = {k: tensors[k] for k in order}
    return FeatureReport(modality=name, output=out_path, keys=keys, failed=failed,
                         features=features, config=pre,
                         seconds=time.perf_counter() - t_start)


def _write(path: str, tensors: Dict[str, np.ndarray], meta: Dict[str, str]) -> None:
    from safetensors.numpy import save_file

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".features-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
