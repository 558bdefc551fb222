"""Public kernels. Each op validates its arguments, picks a backend and calls it."""

from .attention import attention

__all__ = ["attention"]
