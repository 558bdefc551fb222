"""The on-disk model directory: ``mmcore.json`` + ``model.safetensors`` [+ extra files].

A model directory holds

* ``mmcore.json`` -- the config and the metadata: format version, name, version, the mmcore
  version that wrote it, the configured modalities and their widths, the creation time (UTC,
  ISO 8601), the size and SHA-256 of every other file, and one entry per tensor (the dtype it
  is stored in, its shape, its quantization);
* ``model.safetensors`` -- the tensors, written with the ``safetensors`` library (its
  ``__metadata__`` repeats the name and version);
* any extra files given to :func:`save_model_dir` (``tokenizer.json``, say), copied verbatim.

This module knows nothing about the model class: :func:`save_model_dir` takes a config
dictionary and a state dictionary of NumPy arrays, :func:`load_model_dir` gives them back.

Writing is atomic. Everything is written into a temporary directory next to the target (on the
same file system), each file is flushed to disk, and the directory is then renamed into place.
An existing model directory is renamed aside first, the new one renamed in, and the old one
removed, so a failure at any point leaves either the previous directory or the new one at the
target, never a half-written one. (Should the process die in the instant between the two
renames, the previous directory survives under ``.<name>.old-*`` next to the target.)

A save killed before it finished (SIGKILL, power loss) leaves ``.<name>.tmp-*`` or
``.<name>.old-*`` next to the target; the next save to the same target removes them. Each
save holds a ``flock`` on the directories it is writing or replacing, so a save running
in another process or thread is never touched (see :func:`_claim_stale`).

Quantization (weight-only) is described in :mod:`mmcore.model.tensor_io`, which encodes and
decodes the tensors; this module writes and reads the directory.

Examples
--------
>>> import numpy as np, tempfile, os
>>> from mmcore.model.io import save_model_dir, load_model_dir
>>> state = {"proj.weight": np.ones((4, 3), np.float32), "proj.bias": np.zeros(4, np.float32)}
>>> d = os.path.join(tempfile.mkdtemp(), "m")
>>> meta = save_model_dir(d, config={"fused_dim": 4}, state=state, name="demo", version="1",
...                       quantization={"": "int8"})
>>> meta["tensors"]["proj.weight"]["dtype"], meta["tensors"]["proj.bias"]["dtype"]
('int8', 'float32')
>>> config, loaded, meta = load_model_dir(d)
>>> float(abs(loaded["proj.weight"] - 1).max()), loaded["proj.bias"].dtype
(0.0, dtype('float32'))
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from .._files import check_regular, open_regular
from .._version import __version__ as _MMCORE_VERSION
from ..errors import ConfigError, ModelFormatError
from .tensor_io import (
    LOGICAL_DTYPES,
    MAX_JSON_DEPTH,
    QUANTIZATIONS,
    bfloat16_bits_to_float32,
    check_state,
    decode_tensor,
    dequantize_int8,
    encode_tensor,
    float32_to_bfloat16_bits,
    json_depth,
    mode_for,
    normalize_quantization,
    quantize_int8,
    read_safetensors_header,
    state_nbytes,
)
from .tensor_io import MAX_HEADER_BYTES as MAX_HEADER_BYTES  # noqa: F401  (former home)

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE", "QUANTIZATIONS",
           "MAX_JSON_DEPTH", "MAX_CONFIG_BYTES", "save_model_dir", "load_model_dir",
           "resolve_dir_file", "stored_weight_counts", "state_nbytes", "dir_nbytes",
           # defined in mmcore.model.tensor_io (where they moved from here)
           "quantize_int8", "dequantize_int8", "float32_to_bfloat16_bits",
           "bfloat16_bits_to_float32"]

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_NAME = "mmcore-model"
FORMAT_VERSION = 1
CONFIG_FILE = "mmcore.json"
WEIGHTS_FILE = "model.safetensors"

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
#: The largest ``mmcore.json`` read (bytes); a larger one is refused before it is read.
MAX_CONFIG_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------
# small helpers

def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    """Flush a directory entry (the renames in it); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _check_plain_name(name: Any, what: str) -> str:
    """A bare file name (no directory part, no '..'), as kept inside a model directory."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\x00" in name or os.path.basename(name) != name):
        raise ModelFormatError(f"{what} must be a plain file name inside the model directory, "
                               f"got {name!r}")
    return name




def dir_nbytes(path: PathLike) -> int:
    """Total size in bytes of the regular files under ``path`` (recursively)."""
    total = 0
    for root, _dirs, files in os.walk(os.fspath(path)):
        for fn in files:
            p = os.path.join(root, fn)
            if os.path.isfile(p) and not os.path.islink(p):
                total += os.path.getsize(p)
    return total
















# --------------------------------------------------------------------------------------------
# saving

def _summarize_config(config: Mapping[str, Any]) -> Tuple[List[str], Dict[str, Any]]:
    """(modality names, widths) from a MultiModalConfig-style dictionary (best effort)."""
    mods = config.get("modalities") if isinstance(config, Mapping) else None
    names: List[str] = []
    dims: Dict[str, Any] = {}
    if isinstance(mods, Mapping):
        for k, v in mods.items():
            names.append(str(k))
            if isinstance(v, Mapping) and "embed_dim" in v:
                dims[str(k)] = v["embed_dim"]
    elif isinstance(mods, (list, tuple)):
        for v in mods:
            if isinstance(v, Mapping) and "modality" in v:
                names.append(str(v["modality"]))
                if "embed_dim" in v:
                    dims[str(v["modality"])] = v["embed_dim"]
    if isinstance(config, Mapping) and "fused_dim" in config:
        dims["fused_dim"] = config.get("fused_dim")
    try:  # the fused width, when the dictionary is a valid MultiModalConfig
        from ..config import MultiModalConfig
        dims["output_dim"] = MultiModalConfig.from_dict(config).output_dim
    except Exception:
        pass
    return names, dims




def _jsonable_config(config: Any) -> Dict[str, Any]:
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a dict (e.g. MultiModalConfig.to_dict()), got "
                          f"{type(config).__name__}")
    try:
        return json.loads(json.dumps(dict(config)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config must hold only JSON values: {exc}") from None


def save_model_dir(path: PathLike, *, config: Any, state: Mapping[str, Any], name: str,
                   version: str, quantization: Optional[Mapping[str, Optional[str]]] = None,
                   extra_files: Optional[Mapping[str, PathLike]] = None) -> Dict[str, Any]:
    """Write a model directory atomically and return the metadata written to ``mmcore.json``.

    Parameters
    ----------
    path : path-like
        The model directory. Its parent is created if needed. An existing directory is replaced
        only if it is empty or is a model directory (holds ``mmcore.json``).
    config : dict
        A JSON-serializable config, typically ``MultiModalConfig.to_dict()`` (a config object
        with ``to_dict`` is accepted too).
    state : dict of str -> numpy array
        The tensors; every array is stored as float32 unless quantized.
    name, version : str
        Recorded in ``mmcore.json`` and in the safetensors ``__metadata__``.
    quantization : dict of key prefix -> None | "float16" | "bfloat16" | "int8", optional
        Weight-only quantization by key prefix (longest prefix wins; ``""`` matches all);
        a mode string applies to every key. See the module notes for the tolerances.
    extra_files : dict of file name -> source path, optional
        Files copied into the directory (``{"tokenizer.json": "path/to/tokenizer.json"}``),
        listed with their checksum.

    Raises
    ------
    ShapeError
        A bad state (non-string key, non-numeric array, a value that cannot be quantized).
    ConfigError
        A bad config, quantization or name.
    ModelFormatError
        The target is a file or an unrelated non-empty directory, or an extra file is missing
        or not a regular file.
    OSError
        The write itself failed (the previous directory, if any, is left as it was);
        TimeoutError when another save in the same folder held the folder's lock for over
        two minutes.

    Notes
    -----
    Leftovers of saves to the same target that were killed before they finished
    (``.<name>.tmp-*``, ``.<name>.old-*``) are removed, unless a live save holds them.
    """
    target = os.path.abspath(os.fspath(path))
    for what, value in (("name", name), ("version", version)):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{what} must be a non-empty string, got {value!r}")
    cfg = _jsonable_config(config)
    tensors_in = check_state(state)
    rules = normalize_quantization(quantization)
    extras: Dict[str, str] = {}
    for fname, src in (extra_files or {}).items():
        _check_plain_name(fname, "extra_files key")
        if fname in (CONFIG_FILE, WEIGHTS_FILE):
            raise ModelFormatError(f"extra_files cannot replace {fname!r}")
        src = os.fspath(src)
        if not os.path.isfile(src):
            raise ModelFormatError(f"extra file {fname!r}: source {src!r} does not exist or is "
                                   "not a file")
        extras[fname] = src

    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise ModelFormatError(f"{target}: exists and is not a directory; refusing to "
                                   "replace it")
        if os.listdir(target) and not os.path.isfile(os.path.join(target, CONFIG_FILE)):
            raise ModelFormatError(f"{target}: is a non-empty directory without "
                                   f"{CONFIG_FILE}; refusing to replace it")

    stored: Dict[str, np.ndarray] = {}
    entries: Dict[str, Any] = {}
    for key in sorted(tensors_in):
        arrays, entry = encode_tensor(key, tensors_in[key], mode_for(key, rules))
        stored.update(arrays)
        entries[key] = entry

    modalities, dims = _summarize_config(cfg)
    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(target)
    with _parent_lock(parent) as locked:
        stale = _claim_stale(parent, base, olds=os.path.isdir(target)) if locked else []
        tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
        tmp_lock = _hold(tmp)  # marks the save as live until the directory is renamed in
    _remove_claimed(stale)
    try:
        from safetensors.numpy import save_file

        weights = os.path.join(tmp, WEIGHTS_FILE)
        save_file(stored, weights, metadata={"format": FORMAT_NAME, "name": name,
                                             "version": version,
                                             "mmcore_version": _MMCORE_VERSION})
        _fsync_file(weights)
        files = {WEIGHTS_FILE: {"sha256": _file_sha256(weights),
                                "size": os.path.getsize(weights)}}
        for fname, src in extras.items():
            dst = os.path.join(tmp, fname)
            with open_regular(src, what=f"extra file {fname!r}", error=ModelFormatError,
                              op="save_model_dir") as fin, open(dst, "wb") as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
            _fsync_file(dst)
            files[fname] = {"sha256": _file_sha256(dst), "size": os.path.getsize(dst)}

        metadata: Dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": version,
            "mmcore_version": _MMCORE_VERSION,
            "created": created,
            "modalities": modalities,
            "dims": dims,
            "quantization": rules,
            "files": files,
            "tensors": entries,
            "config": cfg,
        }
        meta_path = os.path.join(tmp, CONFIG_FILE)
        with open(meta_path, "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        with _parent_lock(parent) as locked:
            old, old_lock = _move_into_place(tmp, target, tmp_lock)
            tmp_lock = None  # closed by _move_into_place
            stale = _claim_stale(parent, base, olds=True) if locked else []
        _remove_claimed(stale)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _release(old_lock)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _release(tmp_lock)
        raise
    return metadata


def _move_into_place(tmp: str, target: str, tmp_lock: Optional[int]
                     ) -> Tuple[Optional[str], Optional[int]]:
    """Rename the finished ``tmp`` directory to ``target``, replacing an existing one safely.

    Returns the previous directory's new name (``.<name>.old-*``, still to be removed) and
    the lock that keeps it live until then, or ``(None, None)`` when there was none. Called
    with the parent directory locked; ``tmp_lock`` is released once ``tmp`` is in place.
    """
    parent = os.path.dirname(target)
    if not os.path.lexists(target):
        os.rename(tmp, target)
        _release(tmp_lock)
        _fsync_dir(parent)
        return None, None
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
    os.rmdir(old)  # only the unique name is wanted
    old_lock = _hold(target)  # the lock follows the directory to its new name
    try:
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)  # put the previous directory back
            raise
    except BaseException:
        _release(old_lock)
        raise
    _release(tmp_lock)
    _fsync_dir(parent)
    return old, old_lock


# --------------------------------------------------------------------------------------------
# leftovers of interrupted saves
#
# A save killed (SIGKILL, power loss) before it finished leaves ``.<name>.tmp-*`` (the
# directory being written) or ``.<name>.old-*`` (the previous directory, renamed aside) next to
# the target. Every save holds an exclusive ``flock`` on the directory it writes and on the
# previous directory while it renames and removes it; the kernel drops the lock when the
# process dies. The next save to the same target removes the leftovers whose lock it can take
# (no live save holds them) -- ``.old-*`` only when a model directory is at the target, so
# the previous model survives a save killed between its two renames until a save completes.
# Creating, locking, renaming and claiming happen under a ``flock`` on the parent directory,
# so a save never claims a directory that another one has just created and not yet locked.
# Where ``fcntl`` is unavailable (Windows) or a file system refuses locks (the parent folder's
# lock included), nothing is removed.
# Saves of older mmcore versions take no lock: one running concurrently in the same folder is
# not recognised as live.

try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]  # no fcntl here: every use checks for None

#: How long a save waits for another save in the same folder to finish renaming (seconds).
_PARENT_LOCK_WAIT_S = 120.0
_DIR_FLAGS = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
              | getattr(os, "O_CLOEXEC", 0))


@contextlib.contextmanager
def _parent_lock(parent: str):
    """An exclusive ``flock`` on the directory ``parent`` (symlinks resolved) for the duration
    of the block; the block gets True when the lock is held, False where locks are unavailable
    (then nothing may be claimed as stale). TimeoutError after :data:`_PARENT_LOCK_WAIT_S`."""
    fd = None
    locked = False
    if _fcntl is not None:
        try:
            fd = os.open(os.path.realpath(parent), _DIR_FLAGS)
        except OSError:
            fd = None
    try:
        if fd is not None:
            deadline = time.monotonic() + _PARENT_LOCK_WAIT_S
            while True:
                try:
                    _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                    locked = True
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"[save_model_dir] {parent}: another process has "
                                           f"held the folder's lock for over "
                                           f"{_PARENT_LOCK_WAIT_S:.0f} s") from None
                    time.sleep(0.01)
                except OSError:  # the file system refuses locks: proceed without
                    break
        yield locked
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _hold(path: str) -> Optional[int]:
    """A descriptor holding an exclusive ``flock`` on the directory ``path``, or None when it
    is locked elsewhere, is not a directory, or locks are unavailable."""
    if _fcntl is None:
        return None
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return None
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _release(fd: Optional[int]) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:  # pragma: no cover
            pass


def _claim_stale(parent: str, base: str, *, olds: bool) -> List[Tuple[str, int]]:
    """Lock the leftovers of dead saves to ``parent/base``: ``[(path, lock descriptor)]``.

    Candidates are real directories named ``.<base>.tmp-<suffix>`` (and, with ``olds``,
    ``.<base>.old-<suffix>``) whose lock can be taken, i.e. that no live save holds.
    """
    if _fcntl is None:
        return []
    kinds = "tmp|old" if olds else "tmp"
    pattern = re.compile(r"\.%s\.(?:%s)-[A-Za-z0-9_]{1,64}\Z" % (re.escape(base), kinds))
    claimed: List[Tuple[str, int]] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return claimed
    for name in names:
        if not pattern.match(name):
            continue
        p = os.path.join(parent, name)
        try:
            if not stat.S_ISDIR(os.lstat(p).st_mode):
                continue
        except OSError:
            continue
        fd = _hold(p)
        if fd is not None:
            claimed.append((p, fd))
    return claimed


def _remove_claimed(claimed: List[Tuple[str, int]]) -> None:
    for p, fd in claimed:
        try:
            shutil.rmtree(p, ignore_errors=True)
        finally:
            _release(fd)


# --------------------------------------------------------------------------------------------
# loading





def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise ModelFormatError(msg)


def _check_metadata(meta: Any, where: str) -> None:
    _expect(isinstance(meta, dict), f"{where}: must hold a JSON object")
    _expect(meta.get("format") == FORMAT_NAME,
            f"{where}: 'format' must be {FORMAT_NAME!r}, got {meta.get('format')!r}")
    fv = meta.get("format_version")
    _expect(isinstance(fv, int) and not isinstance(fv, bool) and fv >= 1,
            f"{where}: 'format_version' must be an integer >= 1, got {fv!r}")
    _expect(fv <= FORMAT_VERSION, f"{where}: format_version {fv} is newer than this mmcore "
            f"({_MMCORE_VERSION}) reads (<= {FORMAT_VERSION}); upgrade mmcore")
    for k in ("name", "version"):
        _expect(isinstance(meta.get(k), str), f"{where}: {k!r} must be a string")
    _expect(isinstance(meta.get("config"), dict), f"{where}: 'config' must be a JSON object")
    files = meta.get("files")
    _expect(isinstance(files, dict) and WEIGHTS_FILE in files,
            f"{where}: 'files' must be an object listing {WEIGHTS_FILE!r}")
    for fname, info in files.items():
        _check_plain_name(fname, f"{where}: 'files' entry")
        _expect(fname != CONFIG_FILE, f"{where}: 'files' cannot list {CONFIG_FILE}")
        _expect(isinstance(info, dict) and isinstance(info.get("sha256"), str)
                and bool(_SHA256_RE.match(info["sha256"]))
                and isinstance(info.get("size"), int) and not isinstance(info["size"], bool)
                and info["size"] >= 0,
                f"{where}: files[{fname!r}] must hold a sha256 (64 hex digits) and a size")
    tensors = meta.get("tensors")
    _expect(isinstance(tensors, dict), f"{where}: 'tensors' must be a JSON object")
    for key, e in tensors.items():
        label = f"{where}: tensor {key!r}"
        _expect(isinstance(e, dict), f"{label}: entry must be an object")
        q = e.get("quantization")
        _expect(q in QUANTIZATIONS, f"{label}: unknown quantization {q!r} (known: None, "
                "'float16', 'bfloat16', 'int8')")
        d = e.get("dtype")
        _expect(d in LOGICAL_DTYPES, f"{label}: unknown dtype {d!r}")
        _expect(d == (q or "float32"), f"{label}: dtype {d!r} does not match quantization {q!r}")
        shape = e.get("shape")
        _expect(isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool)
                                                and s >= 0 for s in shape),
                f"{label}: shape must be a list of non-negative integers, got {shape!r}")
        _expect(q is None or len(shape) >= 2,
                f"{label}: quantization {q!r} needs a tensor of rank >= 2, shape is {shape}")




def _inside(real_root: str, path: str) -> bool:
    """Whether ``path`` (already resolved) is ``real_root`` or lies under it."""
    try:
        return os.path.commonpath([real_root, path]) == real_root
    except ValueError:  # different drives (Windows)
        return False


def _dir_member(root: str, real_root: str, fname: str, what: str) -> str:
    """The path of ``fname`` in the model directory, refused when (through a symbolic link) it
    resolves outside the directory."""
    fpath = os.path.join(root, fname)
    if not _inside(real_root, os.path.realpath(fpath)):
        raise ModelFormatError(f"{fpath}: {what} is a link to {os.path.realpath(fpath)!r}, "
                               "outside the model directory; the files a model directory "
                               "uses must lie inside it")
    return fpath


def _read_member(fpath: str, what: str, op: str, expect_size: Optional[int] = None,
                 keep: bool = True, digest: bool = False, max_size: Optional[int] = None
                 ) -> Tuple[Optional[bytes], Optional[str]]:
    """Read (or hash) a regular file of a model directory: ``(bytes or None, sha256 or None)``.

    FIFOs, devices and directories are refused without blocking; with ``expect_size`` (or
    ``max_size``) the size of the opened file is checked before anything is read.
    """
    with open_regular(fpath, what=what, error=ModelFormatError, op=op) as f:
        size = os.fstat(f.fileno()).st_size
        if max_size is not None and size > max_size:
            raise ModelFormatError(f"{fpath}: {size} bytes, more than the {max_size} a "
                                   f"{what} may hold")
        if expect_size is not None:
            if size != expect_size:
                raise ModelFormatError(f"{fpath}: size {size} bytes does not match "
                                       f"{expect_size} recorded in {CONFIG_FILE} (truncated or "
                                       "replaced)")
        try:
            if keep:
                data = f.read()
                return data, hashlib.sha256(data).hexdigest() if digest else None
            h = hashlib.sha256()
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
            return None, h.hexdigest()
        except OSError as exc:
            raise ModelFormatError(f"{fpath}: cannot be read ({exc.strerror or exc})") from None


def stored_weight_counts(meta: Mapping[str, Any]) -> Tuple[int, int]:
    """``(tensors, values)`` that the ``"tensors"`` entries of ``mmcore.json`` record (logical
    shapes), for bounding what a config may allocate before it is checked against them."""
    count = 0
    values = 0
    for e in meta.get("tensors", {}).values():
        n = 1
        for s in e.get("shape", ()):
            n *= int(s)
        count += 1
        values += n
    return count, values


def resolve_dir_file(path: PathLike, value: Any, *, field: str, meta: Mapping[str, Any],
                     op: str, default_name: Optional[str] = None) -> str:
    """The absolute path of the file that ``value`` -- a path found in the config of the model
    directory ``path`` -- names, checked to be one of the directory's own files.

    ``value`` is taken relative to the model directory (never to the working directory); an
    absolute path, a path that leaves the directory (``..``, or a symbolic link that resolves
    outside it), a file not listed (with its checksum) in ``mmcore.json``, or anything but a
    regular file is refused. When ``value`` names a directory, ``default_name`` inside it is
    meant (``tokenizer.json``, ``model.onnx``).

    Raises
    ------
    ModelFormatError
        ``[op] <dir>: <field> ...``, naming the field and the value.
    """
    root = os.fspath(path)
    head = f"[{op}] {root}: {field}"
    if not isinstance(value, str) or not value or "\x00" in value:
        raise ModelFormatError(f"{head} must be a file name inside the model directory, got "
                               f"{value!r}")
    if os.path.isabs(value) or os.path.splitdrive(value)[0]:
        raise ModelFormatError(f"{head} = {value!r} is an absolute path; the files a model "
                               "directory uses must lie inside it (give a name relative to the "
                               "directory)")
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, value))
    if target != real_root and not _inside(real_root, target):
        raise ModelFormatError(f"{head} = {value!r} resolves to {target!r}, outside the model "
                               "directory; the files a model directory uses must lie inside it")
    if default_name is not None and os.path.isdir(target):
        target = os.path.realpath(os.path.join(target, default_name))
        if not _inside(real_root, target):
            raise ModelFormatError(f"{head} = {value!r} resolves to {target!r}, outside the "
                                   "model directory; the files a model directory uses must lie "
                                   "inside it")
    rel = os.path.relpath(target, real_root)
    files = meta.get("files") if isinstance(meta, Mapping) else None
    if not isinstance(files, Mapping) or rel.replace(os.sep, "/") not in files:
        raise ModelFormatError(f"{head} = {value!r} names {rel!r}, which {CONFIG_FILE} does not "
                               "list with a checksum; a model directory may use only the files "
                               "it lists")
    check_regular(target, what=f"{field} file", error=ModelFormatError, op=op)
    return target


def load_model_dir(path: PathLike, *, verify: bool = True, keep_quantized: bool = False
                   ) -> Tuple[Dict[str, Any], Dict[str, np.ndarray], Dict[str, Any]]:
    """Read a model directory: ``(config, state, metadata)``.

    ``state`` maps every tensor recorded in ``mmcore.json`` to a float32 array (quantized
    tensors are dequantized; with ``keep_quantized``, quantized 2-D tensors come back as
    :class:`~mmcore.ops.linear.QuantizedTensor`, which the layers that multiply by them keep
    as they are); ``metadata`` is the whole ``mmcore.json`` (``config`` is its ``"config"``
    entry).

    With ``verify`` (the default) the SHA-256 of every file listed in ``mmcore.json`` is
    checked; sizes are always checked. Every tensor listed must be present with the recorded
    shape and storage dtype, and the weights file may hold no tensor that is not listed.

    Every file read must be a regular file inside the directory: a FIFO, a device or a
    symbolic link that resolves outside the directory is refused (without blocking), and so
    is JSON nested deeper than :data:`MAX_JSON_DEPTH`.

    Raises
    ------
    ModelFormatError
        ``[load_model_dir] ...``, naming the file or tensor at fault: a missing directory or
        file, unreadable or invalid ``mmcore.json``, an unsupported format version, a size or
        checksum mismatch, a truncated or corrupt safetensors file, a missing, extra or
        misshapen tensor, an unknown quantization. Nothing is returned in that case (no partly
        loaded state).
    """
    try:
        return _load_model_dir(path, verify=verify, keep_quantized=keep_quantized)
    except ModelFormatError as exc:
        msg = str(exc)
        if msg.startswith("["):
            raise
        raise ModelFormatError(f"[load_model_dir] {msg}") from None


def _load_model_dir(path: PathLike, *, verify: bool, keep_quantized: bool):
    op = "load_model_dir"
    try:
        root = os.fspath(path)
    except TypeError:
        raise ModelFormatError(f"the model directory must be a path, got "
                               f"{type(path).__name__}") from None
    if not os.path.isdir(root):
        raise ModelFormatError(f"{root}: model directory does not exist or is not a directory")
    real_root = os.path.realpath(root)
    meta_path = _dir_member(root, real_root, CONFIG_FILE, CONFIG_FILE)
    if not os.path.lexists(meta_path):
        raise ModelFormatError(f"{meta_path}: missing ({CONFIG_FILE} describes the model)")
    text, _ = _read_member(meta_path, f"model config ({CONFIG_FILE})", op,
                           max_size=MAX_CONFIG_BYTES)
    assert text is not None                 # read with keep=True: the bytes
    try:
        meta = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelFormatError(f"{meta_path}: is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{meta_path}: is not valid JSON (line {exc.lineno}, column "
                               f"{exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise ModelFormatError(f"{meta_path}: is not valid JSON (nested deeper than "
                               f"{MAX_JSON_DEPTH} levels)") from None
    if json_depth(meta) > MAX_JSON_DEPTH:
        raise ModelFormatError(f"{meta_path}: is not valid JSON (nested deeper than "
                               f"{MAX_JSON_DEPTH} levels)")
    _check_metadata(meta, meta_path)

    weights_path = os.path.join(root, WEIGHTS_FILE)
    weights: Optional[bytes] = None
    for fname, info in meta["files"].items():
        fpath = _dir_member(root, real_root, fname, f"{fname} (listed in {CONFIG_FILE})")
        if not os.path.lexists(fpath):
            raise ModelFormatError(f"{fpath}: missing (listed in {CONFIG_FILE})")
        if fname == WEIGHTS_FILE:  # read once: the bytes checked are the bytes parsed
            weights, digest = _read_member(fpath, f"weights file ({fname})", op,
                                           expect_size=info["size"], digest=verify)
        elif verify:
            _, digest = _read_member(fpath, f"file {fname!r} of the model", op,
                                     expect_size=info["size"], keep=False)
        else:
            _check_size(fpath, fname, info["size"], op)
            digest = None
        if verify and digest != info["sha256"]:
            raise ModelFormatError(f"{fpath}: checksum mismatch (sha256 {digest}, "
                                   f"{CONFIG_FILE} records {info['sha256']}); the file is "
                                   "corrupt or was modified")
    assert weights is not None

    header = read_safetensors_header(weights, weights_path)
    st_meta = header.get("__metadata__") or {}
    for k in ("name", "version"):
        if isinstance(st_meta, dict) and k in st_meta and st_meta[k] != meta[k]:
            raise ModelFormatError(f"{weights_path}: __metadata__ {k} {st_meta[k]!r} does not "
                                   f"match {CONFIG_FILE} ({meta[k]!r})")
    try:
        from safetensors.numpy import load as _st_load
        raw = _st_load(weights)
    except Exception as exc:  # safetensors raises its own error type for corrupt data
        raise ModelFormatError(f"{weights_path}: corrupt or truncated safetensors file "
                               f"({exc})") from None
    del weights

    used: set = set()
    state: Dict[str, np.ndarray] = {}
    for key, e in meta["tensors"].items():
        state[key] = decode_tensor(key, e, raw, used, weights_path, keep_quantized)
    extra = sorted(set(raw) - used)
    if extra:
        shown = ", ".join(repr(k) for k in extra[:5]) + (" ..." if len(extra) > 5 else "")
        raise ModelFormatError(f"{weights_path}: holds tensor(s) not listed in {CONFIG_FILE}: "
                               f"{shown}")
    return meta["config"], state, meta


def _check_size(fpath: str, fname: str, size: int, op: str) -> None:
    """Without reading it: ``fpath`` is a regular file of the recorded size."""
    check_regular(fpath, what=f"file {fname!r} of the model", error=ModelFormatError, op=op)
    have = os.path.getsize(fpath)
    if have != size:
        raise ModelFormatError(f"{fpath}: size {have} bytes does not match {size} recorded in "
                               f"{CONFIG_FILE} (truncated or replaced)")
