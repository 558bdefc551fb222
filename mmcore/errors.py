"""The exception hierarchy of mmcore.

Every error raised on purpose by mmcore derives from :class:`MMCoreError`, so a caller can catch
them all at once. Errors about argument shapes and values also derive from :class:`ValueError`,
so code written against NumPy or PyTorch conventions keeps working.

Examples
--------
>>> from mmcore.errors import MMCoreError, ShapeError
>>> issubclass(ShapeError, ValueError) and issubclass(ShapeError, MMCoreError)
True
"""

__all__ = [
    "MMCoreError",
    "ConfigError",
    "ShapeError",
    "ArgumentError",
    "ModalityError",
    "BackendError",
    "ModelFormatError",
    "ProtocolError",
    "AuthError",
    "NodeUnavailableError",
    "AudioDecodeError",
    "ImageDecodeError",
    "VideoDecodeError",
]


class MMCoreError(Exception):
    """Base class of every error mmcore raises on purpose."""


class ConfigError(MMCoreError, ValueError):
    """A configuration value is invalid; the message names the field."""


class ShapeError(MMCoreError, ValueError):
    """An array argument has the wrong rank, shape, dtype or value range; the message names it."""


class ArgumentError(MMCoreError, TypeError, ValueError):
    """An argument that is not a shape problem: the wrong type, an unknown name or preset, or
    a scalar out of range (for example not finite in float32); the message names the argument.

    It derives from both :class:`TypeError` and :class:`ValueError`, so code that catches the
    built-in error NumPy or PyTorch would raise for the same mistake keeps working.
    """


class ModalityError(MMCoreError, ValueError):
    """An unknown, disabled or inconsistent modality was used."""


class BackendError(MMCoreError, RuntimeError):
    """A requested backend is unknown, unavailable, or cannot take the given arrays."""


class ModelFormatError(MMCoreError, ValueError):
    """A model directory or weight file is malformed or incomplete."""


class ProtocolError(MMCoreError):
    """A frame of the shard protocol is malformed, truncated or too large."""


class AuthError(MMCoreError):
    """A peer failed authentication."""


class NodeUnavailableError(MMCoreError, ConnectionError):
    """A shard node cannot be reached or stopped answering."""


class AudioDecodeError(MMCoreError, ValueError):
    """An audio file is missing, unreadable, corrupt, truncated or in an unsupported format.

    The message names the file.
    """


class ImageDecodeError(MMCoreError, ValueError):
    """An image file is missing, unreadable, corrupt, truncated, not an image, or too large.

    The message names the file.
    """


class VideoDecodeError(MMCoreError, ValueError):
    """A video file is missing, unreadable, corrupt, has no video stream or no frames.

    The message names the file.
    """
