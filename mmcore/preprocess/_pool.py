"""The decode threads: one process-wide pool sized by ``mmcore.set_num_threads``.

Decoders (libjpeg-turbo, Pillow, PyAV) release the GIL while they decode, so a batch of
encoded inputs decodes on these threads in parallel. The pool is made on first use, remade
when the thread count changes, and dropped in a forked child (whose copy of the parent's
threads does not exist).

Examples
--------
>>> from mmcore.preprocess._pool import map_ordered
>>> list(map_ordered(lambda x: x * x, [1, 2, 3]))
[1, 4, 9]
"""

from __future__ import annotations

import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence

from .._backend import get_num_threads

__all__ = ["decode_pool", "map_ordered"]

_PREFIX = "mmcore-decode"
_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None
_size = 0


def _forget() -> None:  # pragma: no cover - runs in forked children
    global _pool, _size, _lock
    _pool, _size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)


def decode_pool() -> Optional[ThreadPoolExecutor]:
    """The shared pool (``mmcore.get_num_threads()`` threads), or None with one thread."""
    global _pool, _size
    n = get_num_threads()
    if n <= 1:
        return None
    with _lock:
        if _pool is None or _size != n:
            # the old pool is not shut down: a caller that has just been given it may still
            # submit to it; its threads end once the last reference to it is dropped
            _pool, _size = ThreadPoolExecutor(max_workers=n, thread_name_prefix=_PREFIX), n
        return _pool


def map_ordered(fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
    """``fn`` over ``items`` on the decode pool, results in order as they complete in order;
    serial with one thread or one item. An exception is raised when its result is reached,
    after the calls already started have finished."""
    pool = decode_pool() if len(items) > 1 else None
    if pool is None or threading.current_thread().name.startswith(_PREFIX):
        # serial: one thread, one item, or already on a decode thread (no nested waits)
        for x in items:
            yield fn(x)
        return
    # each task runs in a copy of the caller's context (backend choice, matmul precision)
    futures = [pool.submit(contextvars.copy_context().run, fn, x) for x in items]
    try:
        for f in futures:
            yield f.result()
    finally:
        for f in futures:
            f.cancel()
        for f in futures:
            if not f.cancelled():
                f.exception()   # wait: nothing keeps running after the caller has moved on
