"""Opening files named by callers and model directories: regular files only.

A FIFO, a character device (``/dev/zero``, ``/dev/stdin``), a socket or a directory given where
a file is expected would block a reader forever or feed it without end. Every path that mmcore
opens on a caller's behalf goes through :func:`open_regular` (or is checked first with
:func:`check_regular`), which refuses anything but a regular file without blocking: the file is
opened with ``O_NONBLOCK`` (so opening a FIFO with no writer returns at once) and checked with
``fstat`` on the opened descriptor, so the check and the read see the same file.

Examples
--------
>>> import os, tempfile
>>> from mmcore._files import open_regular
>>> from mmcore.errors import ImageDecodeError
>>> d = tempfile.mkdtemp(); p = os.path.join(d, "x.bin")
>>> _ = open(p, "wb").write(b"abc")
>>> with open_regular(p, what="image file", error=ImageDecodeError, op="load_image") as fh:
...     fh.read()
b'abc'
>>> os.mkfifo(os.path.join(d, "fifo"))
>>> open_regular(os.path.join(d, "fifo"), what="image file", error=ImageDecodeError,
...              op="load_image")
Traceback (most recent call last):
...
mmcore.errors.ImageDecodeError: [load_image] image file '.../fifo' is a FIFO, not a regular file
"""

from __future__ import annotations

import os
import stat
from typing import Any, BinaryIO, Type

from .errors import MMCoreError

__all__ = ["open_regular", "check_regular", "file_kind"]


def file_kind(mode: int) -> str:
    """A short name for the kind of file ``mode`` (from ``os.stat``) describes."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _fail(error: Type[MMCoreError], op: str, what: str, path: str, why: str) -> MMCoreError:
    return error(f"[{op}] {what} {path!r} {why}")


def check_regular(path: Any, *, what: str, error: Type[MMCoreError], op: str) -> str:
    """``os.fspath(path)`` after checking (without opening it) that it names an existing
    regular file; ``error`` otherwise, naming ``what`` and the path.

    Use :func:`open_regular` where mmcore reads the file itself; this is for libraries that
    must be given a path.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise _fail(error, op, what, p, "does not exist") from None
    except OSError as exc:
        raise _fail(error, op, what, p, f"cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(error, op, what, p, f"is {file_kind(st.st_mode)}, not a regular file")
    return p


def open_regular(path: Any, *, what: str, error: Type[MMCoreError], op: str) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file; ``error`` otherwise.

    Never blocks on a FIFO or device: the open uses ``O_NONBLOCK`` and the kind of file is
    taken from ``fstat`` of the opened descriptor. The returned file object is blocking.

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        How the message names the file ("image file", "model config"...).
    error : type
        The :class:`~mmcore.errors.MMCoreError` subclass to raise.
    op : str
        The operation that names itself in the message prefix.
    """
    p = os.fspath(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise _fail(error, op, what, p, "does not exist") from None
    except IsADirectoryError:
        raise _fail(error, op, what, p, "is a directory, not a regular file") from None
    except OSError as exc:
        raise _fail(error, op, what, p, f"cannot be read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _fail(error, op, what, p, f"is {file_kind(st.st_mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
