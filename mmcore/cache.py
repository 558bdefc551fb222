"""Byte-budgeted tensor caches and content keys.

This module knows no model: it stores arrays (and tuples / dicts of arrays) under keys and
evicts them by a policy, and it derives content keys from the bytes of an input together with
everything that decides what the cached result is.

``TensorCache(capacity_bytes, policy="lru", ttl_s=None)``
    A thread-safe cache that accounts the real bytes of what it stores. Policies:

    * ``"lru"``  -- evict the least recently used entry (a hit or a put is a use);
    * ``"lfu"``  -- evict the least frequently used entry (uses = the put plus every hit;
      ties go to the least recently used);
    * ``"fifo"`` -- evict the oldest inserted entry; hits do not change the order;
    * ``"ttl"``  -- entries expire ``ttl_s`` seconds after they were put; under byte pressure
      the oldest inserted entry goes first (as ``"fifo"``).

    With ``"lru"``, ``"lfu"`` and ``"fifo"`` a ``ttl_s`` is an additional age limit. A ``put``
    of a key that is present replaces the entry as if it were new (new age, one use).
    An entry whose age ``clock() - put_time`` is ``>= ttl_s`` is expired: it is never returned
    and is dropped the next time the cache looks at it (counted in ``stats().expired``, not
    in ``evictions``).

``content_key(data, *, modality, dtype..., config, model, item_id)``
    A domain-separated, length-prefixed digest (BLAKE3 when the ``blake3`` package is
    installed, else BLAKE2b-256) of the modality, the dtype and shape and bytes of every array,
    the preprocessing configuration and the model identity.

``CacheManager(cache_config)``
    One :class:`TensorCache` per modality (budget, policy, priority and storage dtype from its
    :class:`~mmcore.config.CachePolicy`), a cross-modal attention cache and a fusion cache under
    one global byte budget; under pressure the lowest-priority cache is evicted first.

Examples
--------
>>> import numpy as np
>>> from mmcore.cache import TensorCache, content_key
>>> cache = TensorCache(1 << 20, policy="lru")
>>> x = np.arange(6, dtype=np.float32).reshape(2, 3)
>>> key = content_key(x, modality="image", model="clip-vit-b32")
>>> cache.put(key, x * 2)
>>> hit = cache.get(key)
>>> hit.flags.writeable, float(hit.sum())
(False, 30.0)
>>> s = cache.stats()
>>> (s.hits, s.misses, s.items, s.bytes)
(1, 0, 1, 24)
>>> content_key(x, modality="image") == content_key(x.reshape(3, 2), modality="image")
False
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import struct
import threading
import time
import types
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Tuple

import numpy as np

from .errors import MMCoreError

__all__ = ["TensorCache", "CacheStats", "CacheItemTooLarge", "content_key", "digest_bytes",
           "digest_file", "new_hasher", "hash_field",
           "HASH_ALGORITHM", "CacheManager", "POLICIES", "STORAGE_DTYPES", "nbytes_of"]

POLICIES = ("lru", "lfu", "fifo", "ttl")
STORAGE_DTYPES = ("float32", "float16", "bfloat16")

_MISSING = object()


class CacheItemTooLarge(MMCoreError, ValueError):
    """An item is larger than the whole capacity of the cache it was put into."""


# --------------------------------------------------------------------------------------------
# hashing

try:  # pragma: no cover - depends on the environment
    import blake3 as _blake3_mod
except Exception:  # ImportError or a broken install
    _blake3_mod = None  # type: ignore[assignment]  # blake3 is optional: uses check for None

#: ``"blake3"`` when the ``blake3`` package is installed, else ``"blake2b"``.
HASH_ALGORITHM = "blake3" if _blake3_mod is not None else "blake2b"

_DOMAIN = b"mmcore.cache.content_key.v1"


def new_hasher(algorithm: Optional[str] = None) -> Any:
    """A fresh hasher (``update`` / ``hexdigest``) of the cache's keys, seeded with their domain.

    ``algorithm``: ``"blake3"`` or ``"blake2b"`` (None: :data:`HASH_ALGORITHM`); it is hashed
    first, so the digests of the two never coincide. Feed it :func:`hash_field` records, as
    :func:`content_key` does. ValueError for an unknown algorithm (or blake3 not installed).

    >>> from mmcore.cache import hash_field, new_hasher
    >>> h = new_hasher("blake2b"); hash_field(h, b"name", b"weights"); len(h.hexdigest())
    64
    """
    algo = algorithm or HASH_ALGORITHM
    h: Any
    if algo == "blake3":
        if _blake3_mod is None:
            raise ValueError("[content_key] algorithm 'blake3' needs the blake3 package")
        h = _blake3_mod.blake3(max_threads=1)
    elif algo == "blake2b":
        h = hashlib.blake2b(digest_size=32)
    else:
        raise ValueError(f"[content_key] algorithm must be 'blake3' or 'blake2b', got {algo!r}")
    # the algorithm name is part of the domain, so keys of the two never coincide
    h.update(_DOMAIN + b"/" + algo.encode() + b"\x00")
    return h


def hash_field(h: Any, tag: bytes, payload: bytes) -> None:
    """Write one tagged, length-prefixed field into the hasher ``h`` (see :func:`new_hasher`)."""
    h.update(struct.pack("<B", len(tag)) + tag + struct.pack("<Q", len(payload)))
    h.update(payload)


_new_hasher, _field = new_hasher, hash_field    # the names these had before they were public


def _as_byte_view(arr: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(arr)
    return a.reshape(-1).view(np.uint8)


def _hash_data(h, data: Any, depth: int = 0) -> None:
    if depth > 32:
        raise ValueError("[content_key] data is nested more than 32 levels deep")
    if isinstance(data, (bytes, bytearray, memoryview)):
        b = memoryview(data).cast("B") if isinstance(data, memoryview) else data
        h.update(b"\x05bytes" + struct.pack("<Q", len(b)))
        h.update(b)
        return
    if isinstance(data, str):
        hash_field(h, b"str", data.encode("utf-8", "surrogatepass"))
        return
    if isinstance(data, Mapping):
        keys = sorted(data, key=lambda k: (type(k).__name__, str(k)))
        hash_field(h, b"map", struct.pack("<Q", len(keys)))
        for k in keys:
            hash_field(h, b"mkey", f"{type(k).__name__}:{k}".encode())
            _hash_data(h, data[k], depth + 1)
        return
    if isinstance(data, (list, tuple)):
        hash_field(h, b"seq", struct.pack("<Q", len(data)))
        for item in data:
            _hash_data(h, item, depth + 1)
        return
    if data is None:
        hash_field(h, b"none", b"")
        return
    arr = np.asarray(data)
    if arr.dtype.hasobject:
        raise TypeError(f"[content_key] cannot hash an array of dtype {arr.dtype} "
                        f"(from {type(data).__name__}); pass numeric arrays, bytes or str")
    hash_field(h, b"dtype", arr.dtype.str.encode())
    hash_field(h, b"shape", struct.pack(f"<Q{arr.ndim}q", arr.ndim, *arr.shape))
    view = _as_byte_view(arr)
    h.update(b"\x05array" + struct.pack("<Q", view.nbytes))
    h.update(view)


def _canonical(obj: Any) -> bytes:
    """Canonical bytes of a configuration / model identity (not Python's hash())."""
    if obj is None:
        return b"\x00none"
    if isinstance(obj, bytes):
        return b"\x01" + obj
    if isinstance(obj, str):
        return b"\x02" + obj.encode("utf-8", "surrogatepass")
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        obj = {"__type__": type(obj).__name__, **to_dict()}
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {"__type__": type(obj).__name__, **dataclasses.asdict(obj)}

    def default(o):
        if isinstance(o, np.ndarray):
            return {"__array__": o.dtype.str, "shape": list(o.shape),
                    "digest": digest_bytes(_as_byte_view(o))}
        if isinstance(o, (np.integer, np.floating, np.bool_)):
            return o.item()
        return f"{type(o).__name__}:{o}"

    return b"\x03" + json.dumps(obj, sort_keys=True, separators=(",", ":"), default=default,
                                ensure_ascii=False).encode("utf-8", "surrogatepass")


def digest_bytes(data: Any, *, algorithm: Optional[str] = None) -> str:
    """Hex digest of a plain bytes-like object (no domain fields; for benchmarks and helpers)."""
    h = new_hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def digest_file(fh: Any, *, algorithm: Optional[str] = None, chunk_bytes: int = 1 << 20) -> str:
    """Hex digest of everything left in a binary file object, read ``chunk_bytes`` at a time
    (memory stays bounded whatever the file's size). Equal to :func:`digest_bytes` of the
    same bytes.

    Examples
    --------
    >>> import io
    >>> from mmcore.cache import digest_bytes, digest_file
    >>> digest_file(io.BytesIO(b"abc" * 1000), chunk_bytes=7) == digest_bytes(b"abc" * 1000)
    True
    """
    h = new_hasher(algorithm)
    buf = bytearray(max(1, int(chunk_bytes)))
    view = memoryview(buf)
    while True:
        n = fh.readinto(buf)
        if not n:
            return h.hexdigest()
        h.update(view[:n])


def content_key(data: Any, *, modality: Any, config: Any = None, model: Any = None,
                item_id: Optional[Any] = None, algorithm: Optional[str] = None) -> str:
    """Content key of one cache input: a 64-character hex digest.

    The digest covers, each as its own tagged, length-prefixed field after a domain tag
    (``mmcore.cache.content_key.v1/<algorithm>``):

    * the modality (its string form, e.g. ``"image"``);
    * the preprocessing configuration (anything with ``to_dict()``, a dataclass, a mapping,
      a string; serialized as canonical JSON) and the model identity (a name, a version, a
      weights digest...), each possibly None;
    * the item id, if given: a caller's own id is namespaced by all the fields above and is
      never the only key -- the data bytes are still hashed;
    * the data: for every array its dtype (with byte order), its shape and its bytes in C
      order, so that equal bytes with different shapes or dtypes give different keys; bytes
      and str (UTF-8) with their type; lists, tuples and dicts element by element.

    Python's ``hash()`` is never used. The algorithm is BLAKE3 when the ``blake3`` package is
    installed, else BLAKE2b with a 32-byte digest (``algorithm=`` forces one); keys from the
    two never coincide.

    Parameters
    ----------
    data : array_like, bytes, str, or a list / tuple / dict of those
    modality : Modality or str
    config, model : optional
    item_id : optional
        The caller's id of the item (str, int or bytes).
    algorithm : {"blake3", "blake2b"}, optional

    Returns
    -------
    str

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros(4, np.float32)
    >>> content_key(a, modality="audio") == content_key(a.view(np.int32), modality="audio")
    False
    >>> len(content_key(b"hello", modality="text", model="bert-base"))
    64
    """
    h = new_hasher(algorithm)
    hash_field(h, b"modality", str(modality).encode("utf-8"))
    hash_field(h, b"config", _canonical(config))
    hash_field(h, b"model", _canonical(model))
    if item_id is not None:
        hash_field(h, b"item_id", _canonical(item_id if isinstance(item_id, (str, bytes))
                                         else f"{type(item_id).__name__}:{item_id}"))
    else:
        hash_field(h, b"no_item_id", b"")
    hash_field(h, b"data", b"")
    _hash_data(h, data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# stored values

class _Encoded:
    """An array stored in a lower-precision dtype; decoded back on ``get``."""

    __slots__ = ("data", "dtype", "kind")

    def __init__(self, data: np.ndarray, dtype: np.dtype, kind: str):
        self.data = data
        self.dtype = dtype
        self.kind = kind

    def decode(self) -> np.ndarray:
        if self.kind == "bfloat16":
            out = (self.data.astype(np.uint32) << 16).view(np.float32)
            return out.astype(self.dtype, copy=False)
        return self.data.astype(self.dtype)


def _readonly_copy(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous copy whose memory belongs to an immutable ``bytes`` object, so that
    nobody can make it writeable again."""
    if arr.dtype.hasobject:
        raise TypeError(f"TensorCache cannot store arrays of dtype {arr.dtype}")
    out = np.frombuffer(np.ascontiguousarray(arr).tobytes(), dtype=arr.dtype)
    return out.reshape(arr.shape)


def _to_bfloat16(a: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def _encode_array(arr: np.ndarray, storage: Optional[str]) -> Tuple[Any, bool]:
    """(stored object, needs decoding)."""
    if storage is None or arr.dtype.kind != "f":
        return _readonly_copy(arr), False
    if storage == "float32":
        if arr.dtype.itemsize <= 4:
            return _readonly_copy(arr), False
        enc = arr.astype(np.float32)
    elif storage == "float16":
        if arr.dtype.itemsize <= 2:
            return _readonly_copy(arr), False
        finite = np.isfinite(arr)
        if np.any(np.abs(arr[finite]) > np.finfo(np.float16).max):
            # would overflow to inf: keep the array as it is rather than corrupt it
            return _readonly_copy(arr), False
        enc = arr.astype(np.float16)
    else:  # bfloat16
        if arr.dtype.itemsize <= 2:
            return _readonly_copy(arr), False
        enc = _to_bfloat16(arr)
    return _Encoded(_readonly_copy(enc), arr.dtype, storage), True


def _freeze(value: Any, storage: Optional[str], depth: int = 0) -> Tuple[Any, int, bool]:
    """(frozen value, bytes held, needs decoding)."""
    if depth > 32:
        raise ValueError("TensorCache values may be nested at most 32 levels deep")
    if isinstance(value, np.ndarray):
        stored, enc = _encode_array(value, storage)
        nb = stored.data.nbytes if enc else stored.nbytes
        return stored, int(nb), enc
    if isinstance(value, (tuple, list)):
        parts = [_freeze(v, storage, depth + 1) for v in value]
        return (tuple(p[0] for p in parts), sum(p[1] for p in parts),
                any(p[2] for p in parts))
    if isinstance(value, Mapping):
        out = {}
        nb = 0
        enc = False
        for k, v in value.items():
            fv, n, e = _freeze(v, storage, depth + 1)
            out[k] = fv
            nb += n
            enc = enc or e
        return types.MappingProxyType(out), nb, enc
    if isinstance(value, np.generic):
        if value.dtype.hasobject:
            raise TypeError("TensorCache cannot store NumPy object scalars")
        return value, int(value.nbytes), False
    if value is None or isinstance(value, bool):
        return value, 0, False
    if isinstance(value, (int, float)):
        return value, 8, False
    if isinstance(value, complex):
        return value, 16, False
    if isinstance(value, (bytes, str)):
        return value, len(value), False
    raise TypeError(f"TensorCache stores NumPy arrays, scalars, bytes, str and tuples / lists / "
                    f"dicts of them, got {type(value).__name__}")


def _thaw(value: Any) -> Any:
    if isinstance(value, _Encoded):
        return value.decode()
    if isinstance(value, tuple):
        return tuple(_thaw(v) for v in value)
    if isinstance(value, types.MappingProxyType):
        return types.MappingProxyType({k: _thaw(v) for k, v in value.items()})
    return value


def nbytes_of(value: Any) -> int:
    """Bytes :class:`TensorCache` accounts for ``value`` (stored as it is)."""
    return _freeze_size(value)


def _freeze_size(value: Any, depth: int = 0) -> int:
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(_freeze_size(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return sum(_freeze_size(v, depth + 1) for v in value.values())
    return _freeze(value, None, depth)[1]


# --------------------------------------------------------------------------------------------
# the cache

@dataclasses.dataclass(frozen=True)
class CacheStats:
    """Counters and occupancy of a :class:`TensorCache` (a snapshot)."""

    hits: int
    misses: int
    evictions: int
    expired: int
    rejected: int
    bytes: int
    items: int
    capacity_bytes: int

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class _Entry:
    __slots__ = ("value", "nbytes", "encoded", "put_time", "uses", "last_use")

    def __init__(self, value, nbytes, encoded, put_time, tick):
        self.value = value
        self.nbytes = nbytes
        self.encoded = encoded
        self.put_time = put_time
        self.uses = 1
        self.last_use = tick


class _Pending:
    __slots__ = ("event", "value", "error")

    def __init__(self):
        self.event = threading.Event()
        self.value = _MISSING
        self.error: Optional[BaseException] = None


class TensorCache:
    """A thread-safe, byte-budgeted cache of arrays.

    Parameters
    ----------
    capacity_bytes : int
        Bytes the cache may hold (>= 0). An item larger than this is refused.
    policy : {"lru", "lfu", "fifo", "ttl"}, default "lru"
        Eviction order (see the module docstring).
    ttl_s : float, optional
        Age limit in seconds; required by ``"ttl"``, optional with the others.
    storage_dtype : {"float32", "float16", "bfloat16"}, optional
        Floating arrays wider than this are stored in it and converted back to their own dtype
        on ``get``. ``"float16"`` halves the bytes of float32 embeddings; a value comes back
        as ``float32(float16(x))``: round to nearest even, relative error <= 2**-11 for
        ``|x|`` in float16's normal range (>= 6.1e-5), absolute error <= 2**-25 below it
        (subnormals), NaN / inf kept. An array with a finite value beyond float16's range
        (65504) is stored unconverted instead of overflowing. ``"bfloat16"``: relative error
        <= 2**-8, the full float32 range. Integer and bool arrays are never converted. None
        (default): stored exactly as given.
    clock : callable, optional
        Returns the current time in seconds; default ``time.monotonic``. Tests inject a fake.

    Notes
    -----
    Values are copied on ``put`` into read-only memory that cannot be made writeable again;
    ``get`` returns them without a copy (lists come back as tuples, dicts as read-only
    mappings). With a ``storage_dtype`` the decoded arrays are fresh, writeable copies.
    """

    def __init__(self, capacity_bytes: int, policy: str = "lru", ttl_s: Optional[float] = None,
                 *, storage_dtype: Optional[str] = None,
                 clock: Optional[Callable[[], float]] = None, name: str = ""):
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, (int, np.integer)) \
                or capacity_bytes < 0:
            raise ValueError(f"TensorCache capacity_bytes must be an integer >= 0, "
                             f"got {capacity_bytes!r}")
        pol = policy.lower() if isinstance(policy, str) else policy
        if pol not in POLICIES:
            raise ValueError(f"TensorCache policy must be one of {' | '.join(map(repr, POLICIES))}"
                             f", got {policy!r}")
        if ttl_s is not None:
            if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or \
                    not math.isfinite(ttl_s) or ttl_s <= 0:
                raise ValueError(f"TensorCache ttl_s must be a finite number > 0, got {ttl_s!r}")
            ttl_s = float(ttl_s)
        if pol == "ttl" and ttl_s is None:
            raise ValueError("TensorCache ttl_s must be set for policy='ttl'")
        if storage_dtype is not None and storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"TensorCache storage_dtype must be one of {STORAGE_DTYPES} or None,"
                             f" got {storage_dtype!r}")
        self.capacity_bytes = int(capacity_bytes)
        self.policy = pol
        self.ttl_s = ttl_s
        self.storage_dtype = storage_dtype
        self.name = name
        self._clock = clock or time.monotonic
        self._lock = threading.RLock()
        self._entries: "collections.OrderedDict[Hashable, _Entry]" = collections.OrderedDict()
        self._pending: Dict[Hashable, _Pending] = {}
        self._bytes = 0
        self._tick = 0
        self._hits = self._misses = self._evictions = self._expired = self._rejected = 0

    # ---- introspection -------------------------------------------------------------------

    def __repr__(self) -> str:
        return (f"TensorCache(capacity_bytes={self.capacity_bytes}, policy={self.policy!r}, "
                f"ttl_s={self.ttl_s}, items={len(self._entries)}, bytes={self._bytes})")

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            e = self._entries.get(key)
            return e is not None and not self._is_expired(e, self._clock())

    @property
    def bytes(self) -> int:
        """Bytes currently held."""
        return self._bytes

    def keys(self) -> List[Hashable]:
        """The keys held (expired ones included until they are dropped), in eviction order for
        ``"lru"``, ``"fifo"`` and ``"ttl"``."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, self._expired,
                              self._rejected, self._bytes, len(self._entries),
                              self.capacity_bytes)

    def reset_stats(self) -> None:
        """Set the hit / miss / eviction / expiry / rejection counters to zero."""
        with self._lock:
            self._hits = self._misses = self._evictions = self._expired = self._rejected = 0

    # ---- internals (lock held) -----------------------------------------------------------

    def _is_expired(self, e: _Entry, now: float) -> bool:
        return self.ttl_s is not None and now - e.put_time >= self.ttl_s

    def _remove(self, key: Hashable) -> _Entry:
        e = self._entries.pop(key)
        self._bytes -= e.nbytes
        return e

    def _purge_expired(self, now: float) -> None:
        if self.ttl_s is None:
            return
        if self.policy in ("fifo", "ttl"):  # insertion order == age order
            while self._entries:
                key, e = next(iter(self._entries.items()))
                if not self._is_expired(e, now):
                    break
                self._remove(key)
                self._expired += 1
            return
        dead = [k for k, e in self._entries.items() if self._is_expired(e, now)]
        for k in dead:
            self._remove(k)
            self._expired += 1

    def _victim(self) -> Hashable:
        if self.policy == "lfu":
            return min(self._entries.items(), key=lambda kv: (kv[1].uses, kv[1].last_use))[0]
        return next(iter(self._entries))

    def _evict_one(self) -> int:
        key = self._victim()
        e = self._remove(key)
        self._evictions += 1
        return e.nbytes

    def _lookup(self, key: Hashable) -> Any:
        e = self._entries.get(key)
        if e is None:
            return _MISSING
        if self.ttl_s is not None and self._is_expired(e, self._clock()):
            self._remove(key)
            self._expired += 1
            return _MISSING
        self._tick += 1
        e.uses += 1
        e.last_use = self._tick
        if self.policy == "lru":
            self._entries.move_to_end(key)
        return e

    def _store(self, key: Hashable, frozen: Any, nbytes: int, encoded: bool) -> None:
        if key in self._entries:
            self._remove(key)
        now = self._clock()
        self._purge_expired(now)
        while self._bytes + nbytes > self.capacity_bytes and self._entries:
            self._evict_one()
        self._tick += 1
        self._entries[key] = _Entry(frozen, nbytes, encoded, now, self._tick)
        self._bytes += nbytes

    def _prepare(self, value: Any) -> Tuple[Any, int, bool]:
        frozen, nbytes, encoded = _freeze(value, self.storage_dtype)
        return frozen, nbytes, encoded

    # ---- public operations ---------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value under ``key``, or ``default`` (a miss)."""
        with self._lock:
            e = self._lookup(key)
            if e is _MISSING:
                self._misses += 1
                return default
            self._hits += 1
            value, encoded = e.value, e.encoded
        return _thaw(value) if encoded else value

    def peek(self, key: Hashable, default: Any = None) -> Any:
        """The value under ``key`` without counting a hit or a use."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or self._is_expired(e, self._clock()):
                return default
            value, encoded = e.value, e.encoded
        return _thaw(value) if encoded else value

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value`` under ``key`` (replacing an entry), evicting by the policy.

        Raises
        ------
        CacheItemTooLarge
            The value holds more bytes than ``capacity_bytes``; the cache is left unchanged.
        TypeError
            The value is not an array, scalar, bytes, str or a tuple / list / dict of them.
        """
        hash(key)
        frozen, nbytes, encoded = self._prepare(value)
        with self._lock:
            if nbytes > self.capacity_bytes:
                self._rejected += 1
                raise CacheItemTooLarge(
                    f"TensorCache{f' {self.name!r}' if self.name else ''}: an item of {nbytes} "
                    f"bytes does not fit in capacity_bytes={self.capacity_bytes}")
            self._store(key, frozen, nbytes, encoded)

    def get_or_compute(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """The value under ``key``; on a miss ``fn()`` is called, stored and returned.

        Concurrent callers of one missing key call ``fn`` once: the others wait for its
        result (or its exception, which they all receive). A result larger than the capacity
        is returned without being stored.
        """
        with self._lock:
            e = self._lookup(key)
            if e is not _MISSING:
                self._hits += 1
                value, encoded = e.value, e.encoded
                return _thaw(value) if encoded else value
            self._misses += 1
            pending = self._pending.get(key)
            leader = pending is None
            if pending is None:
                pending = self._pending[key] = _Pending()
        if not leader:
            pending.event.wait()
            if pending.error is not None:
                raise pending.error
            return pending.value
        try:
            value = fn()
            frozen, nbytes, encoded = self._prepare(value)
            result = _thaw(frozen) if encoded else frozen
            with self._lock:
                if nbytes > self.capacity_bytes:
                    self._rejected += 1
                    result = value
                else:
                    self._store(key, frozen, nbytes, encoded)
            pending.value = result
            return result
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                self._pending.pop(key, None)
            pending.event.set()

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove ``key`` and return its value (``default`` if absent)."""
        with self._lock:
            if key not in self._entries:
                return default
            e = self._remove(key)
        return _thaw(e.value) if e.encoded else e.value

    def evict_bytes(self, nbytes: int) -> int:
        """Evict entries by the policy (expired ones first) until at least ``nbytes`` bytes
        are freed or the cache is empty; returns the bytes freed."""
        with self._lock:
            before = self._bytes
            self._purge_expired(self._clock())
            while before - self._bytes < nbytes and self._entries:
                self._evict_one()
            return before - self._bytes

    def expire(self) -> int:
        """Drop every expired entry now; returns how many were dropped."""
        with self._lock:
            n = self._expired
            self._purge_expired(self._clock())
            return self._expired - n

    def clear(self) -> None:
        """Remove every entry (the counters are kept; see :meth:`reset_stats`)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0


# --------------------------------------------------------------------------------------------
# the manager

def _probe_available_fraction() -> Optional[float]:
    """Available / total system memory through psutil; None when psutil is absent."""
    try:
        import psutil  # optional
    except Exception:
        return None
    vm = psutil.virtual_memory()
    return vm.available / vm.total if vm.total else None


class CacheManager:
    """The caches of a multi-modal pipeline under one global byte budget.

    Parameters
    ----------
    config : CacheConfig
        Global budget, default policy and per-modality policies.
    policies : mapping of modality -> CachePolicy, optional
        Overrides of ``config.policy_for`` (e.g. the ``ModalityConfig.cache`` entries, see
        :meth:`from_multimodal_config`).
    attention_policy, fusion_policy : CachePolicy, optional
        Policies of the cross-modal attention cache and of the fusion result cache; default
        ``config.default``.
    low_memory_fraction : float, default 0.05
        When the system's available memory falls below this fraction of the total (checked
        through ``psutil`` when installed, at most once per ``memory_check_interval_s``), the
        caches shed half of their bytes, lowest priority first.
    memory_probe : callable, optional
        Returns the available memory fraction (or None); default uses ``psutil``.
    clock : callable, optional
        Shared by all caches (TTL) and the memory check interval.

    Every modality cache has its policy's budget (or the global budget when it has none), its
    eviction policy, ``ttl_s`` and storage ``dtype``. After every store the total over all
    caches is brought back under ``config.global_budget_bytes`` by evicting from the cache
    with the lowest priority that holds anything (ties: the cache holding the most bytes).
    The attention and fusion caches take part with their policies' priorities.
    """

    ATTENTION = "cross_attention"
    FUSION = "fusion"

    def __init__(self, config: Any = None, *, policies: Optional[Mapping[Any, Any]] = None,
                 attention_policy: Any = None, fusion_policy: Any = None,
                 low_memory_fraction: float = 0.05, memory_check_interval_s: float = 1.0,
                 memory_probe: Optional[Callable[[], Optional[float]]] = None,
                 clock: Optional[Callable[[], float]] = None):
        from .config import CacheConfig, CachePolicy
        from .modality import Modality

        self._Modality = Modality
        self.config = config if config is not None else CacheConfig()
        if not isinstance(self.config, CacheConfig):
            raise TypeError(f"CacheManager config must be a CacheConfig, got "
                            f"{type(self.config).__name__}")
        self._overrides = {Modality(k): v for k, v in (policies or {}).items()}
        for v in self._overrides.values():
            if not isinstance(v, CachePolicy):
                raise TypeError(f"CacheManager policies must map to CachePolicy, got {v!r}")
        self.global_budget_bytes = self.config.global_budget_bytes
        self.low_memory_fraction = float(low_memory_fraction)
        self.memory_check_interval_s = float(memory_check_interval_s)
        self._probe = memory_probe or _probe_available_fraction
        self._clock = clock or time.monotonic
        self._last_memory_check = -math.inf
        self._lock = threading.RLock()
        self._caches: Dict[Any, TensorCache] = {}
        self._policies: Dict[Any, Any] = {}
        self._low_memory_events = 0
        self.attention = self._make(self.ATTENTION, attention_policy or self.config.default)
        self.fusion = self._make(self.FUSION, fusion_policy or self.config.default)

    @classmethod
    def from_multimodal_config(cls, mm_config: Any, **kwargs: Any) -> "CacheManager":
        """A manager for a :class:`~mmcore.config.MultiModalConfig`: its ``cache`` config and
        each modality's :meth:`~mmcore.config.MultiModalConfig.cache_policy`."""
        policies = {m: mm_config.cache_policy(m) for m in mm_config.modalities}
        return cls(mm_config.cache, policies=policies, **kwargs)

    # ---- caches --------------------------------------------------------------------------

    def _make(self, name: Any, pol: Any) -> TensorCache:
        cap = pol.budget_bytes if pol.budget_bytes is not None else self.global_budget_bytes
        cache = TensorCache(min(cap, self.global_budget_bytes), pol.policy, pol.ttl_s,
                            storage_dtype=pol.dtype, clock=self._clock, name=str(name))
        self._caches[name] = cache
        self._policies[name] = pol
        return cache

    def policy_for(self, modality: Any) -> Any:
        m = self._Modality(modality)
        return self._overrides.get(m) or self.config.policy_for(m)

    def enabled_for(self, modality: Any) -> bool:
        """Whether values of ``modality`` (or of ``CacheManager.ATTENTION`` /
        ``CacheManager.FUSION``) are cached."""
        if modality in (self.ATTENTION, self.FUSION):
            return bool(self.config.enabled and self._policies[modality].enabled)
        return bool(self.config.enabled and self.policy_for(modality).enabled)

    def cache_for(self, modality: Any) -> TensorCache:
        """The cache of ``modality`` (created on first use)."""
        m = self._Modality(modality)
        with self._lock:
            c = self._caches.get(m)
            if c is None:
                c = self._make(m, self.policy_for(m))
            return c

    def caches(self) -> Dict[str, TensorCache]:
        with self._lock:
            return {str(k): c for k, c in self._caches.items()}

    # ---- keys ----------------------------------------------------------------------------

    @staticmethod
    def key(data: Any, *, modality: Any, config: Any = None, model: Any = None,
            item_id: Any = None) -> str:
        """:func:`content_key` of one input."""
        return content_key(data, modality=modality, config=config, model=model, item_id=item_id)

    @staticmethod
    def attention_key(query_digest: str, context_digest: str, layer: Any, *,
                      query_modality: Any = None, context_modality: Any = None,
                      model: Any = None) -> str:
        """Key of a cross-modal attention result: both sides' content digests, their
        modalities, the layer and the model identity (the order of the sides matters)."""
        h = new_hasher()
        hash_field(h, b"kind", b"cross_attention")
        hash_field(h, b"query_modality", str(query_modality).encode())
        hash_field(h, b"query", str(query_digest).encode())
        hash_field(h, b"context_modality", str(context_modality).encode())
        hash_field(h, b"context", str(context_digest).encode())
        hash_field(h, b"layer", _canonical(layer if isinstance(layer, str) else repr(layer)))
        hash_field(h, b"model", _canonical(model))
        return h.hexdigest()

    @staticmethod
    def fusion_key(digests: Mapping[Any, str], *, strategy: Any = None, model: Any = None) -> str:
        """Key of a fusion result: the content digest of each modality, the fusion strategy
        (a config or name) and the model identity."""
        h = new_hasher()
        hash_field(h, b"kind", b"fusion")
        items = sorted((str(m), str(d)) for m, d in digests.items())
        hash_field(h, b"count", struct.pack("<Q", len(items)))
        for m, d in items:
            hash_field(h, b"modality", m.encode())
            hash_field(h, b"digest", d.encode())
        hash_field(h, b"strategy", _canonical(strategy))
        hash_field(h, b"model", _canonical(model))
        return h.hexdigest()

    # ---- operations ----------------------------------------------------------------------

    def _target(self, modality: Any) -> Tuple[Optional[TensorCache], Any]:
        if modality in (self.ATTENTION, self.FUSION):
            c = self._caches[modality]
            ok = self.config.enabled and self._policies[modality].enabled
            return (c if ok else None), modality
        if not self.enabled_for(modality):
            return None, modality
        return self.cache_for(modality), modality

    def get(self, modality: Any, key: Hashable, default: Any = None) -> Any:
        cache, _ = self._target(modality)
        return default if cache is None else cache.get(key, default)

    def put(self, modality: Any, key: Hashable, value: Any) -> bool:
        """Store a value; returns False when caching is disabled for it or it is too large
        for its cache."""
        cache, _ = self._target(modality)
        if cache is None:
            return False
        try:
            cache.put(key, value)
        except CacheItemTooLarge:
            return False
        self.enforce()
        return True

    def get_or_compute(self, modality: Any, key: Hashable, fn: Callable[[], Any]) -> Any:
        cache, _ = self._target(modality)
        if cache is None:
            return fn()
        before = cache.bytes
        value = cache.get_or_compute(key, fn)
        if cache.bytes != before:
            self.enforce()
        return value

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(c.bytes for c in self._caches.values())

    def _priority(self, name: Any) -> int:
        return self._policies[name].priority

    def _shed(self, target_total: int) -> int:
        """Evict lowest priority first until the total is <= target_total; bytes freed."""
        freed = 0
        while True:
            total = sum(c.bytes for c in self._caches.values())
            if total <= target_total:
                return freed
            holding = [(self._priority(n), -c.bytes, i, c)
                       for i, (n, c) in enumerate(self._caches.items()) if c.bytes > 0]
            if not holding:
                return freed
            _, _, _, victim = min(holding, key=lambda t: t[:3])
            got = victim.evict_bytes(min(total - target_total, victim.bytes))
            if got <= 0:
                return freed
            freed += got

    def _low_memory(self) -> bool:
        now = self._clock()
        if now - self._last_memory_check < self.memory_check_interval_s:
            return False
        self._last_memory_check = now
        try:
            frac = self._probe()
        except Exception:
            return False
        return frac is not None and frac < self.low_memory_fraction

    def enforce(self) -> int:
        """Bring the caches under the global budget (and shed half their bytes under low
        system memory); returns the bytes freed."""
        with self._lock:
            freed = self._shed(self.global_budget_bytes)
            if self._low_memory():
                self._low_memory_events += 1
                freed += self._shed(self.bytes // 2)
            return freed

    def stats(self) -> Dict[str, Any]:
        """Per-cache :class:`CacheStats` as dicts, plus ``"total"`` and the budget."""
        with self._lock:
            per = {str(n): c.stats().to_dict() for n, c in self._caches.items()}
        total = {k: sum(s[k] for s in per.values())
                 for k in ("hits", "misses", "evictions", "expired", "rejected", "bytes",
                           "items")}
        total["global_budget_bytes"] = self.global_budget_bytes
        total["low_memory_events"] = self._low_memory_events
        return {"caches": per, "total": total}

    def clear(self) -> None:
        with self._lock:
            for c in self._caches.values():
                c.clear()
