"""Reading ``preprocessor_config.json``: a local file or folder, or a hub id in the local cache."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Tuple

from .._files import open_regular
from ..errors import ConfigError

__all__ = ["CONFIG_NAME", "load_config"]

CONFIG_NAME = "preprocessor_config.json"
#: A config file larger than this is refused (Whisper's, with its mel filters, is ~185 KiB).
MAX_CONFIG_BYTES = 16 << 20


def _from_hub_cache(op: str, repo_id: str, cache_dir: Any, revision: Optional[str]) -> str:
    """The cached ``preprocessor_config.json`` of ``repo_id``; never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise ConfigError(f"[{op}] {repo_id!r} is not a file or folder, and huggingface_hub is "
                          "not installed to look it up in the Hugging Face cache") from None
    try:
        found = try_to_load_from_cache(repo_id, CONFIG_NAME, cache_dir=cache_dir,
                                       revision=revision)
    except Exception as exc:        # an id huggingface_hub refuses (HFValidationError, ...)
        raise ConfigError(f"[{op}] {repo_id!r} is not a file or folder, nor a valid hub id: "
                          f"{exc}") from None
    if not isinstance(found, str):
        raise ConfigError(f"[{op}] {repo_id!r} is not a file or folder, and the Hugging Face "
                          f"cache holds no {CONFIG_NAME} for it (mmcore does not download; "
                          "fetch it with huggingface_hub or transformers first)")
    return found


def resolve_config_path(op: str, path: Any, *, cache_dir: Any = None,
                        revision: Optional[str] = None) -> str:
    """The config file ``path`` names: a file, ``folder/preprocessor_config.json`` or the
    cached file of a hub id."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"[{op}] path must be a str or os.PathLike, got {type(path).__name__}")
    p = os.fspath(path)
    if os.path.isdir(p):
        f = os.path.join(p, CONFIG_NAME)
        if not os.path.exists(f):
            raise ConfigError(f"[{op}] {f!r} does not exist (no {CONFIG_NAME} in the folder)")
        return f
    if os.path.exists(p):
        return p
    if isinstance(path, str) and path.count("/") <= 1 and not path.startswith((".", "/", "~")):
        return _from_hub_cache(op, path, cache_dir, revision)
    raise ConfigError(f"[{op}] {p!r} does not exist")


def load_config(op: str, path: Any, *, cache_dir: Any = None,
                revision: Optional[str] = None) -> Tuple[Dict[str, Any], str]:
    """``(config dict, file path)`` of a ``preprocessor_config.json``; ConfigError naming the
    path when it is missing, unreadable, too large, not JSON or not a JSON object."""
    f = resolve_config_path(op, path, cache_dir=cache_dir, revision=revision)
    with open_regular(f, what="preprocessor config", error=ConfigError, op=op) as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"[{op}] {f!r} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"[{op}] {f!r} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"[{op}] {f!r} must hold a JSON object, got {type(cfg).__name__}")
    return cfg, f
