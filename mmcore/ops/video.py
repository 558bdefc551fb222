"""Frame sampling for video models (``mmcore.ops.sample_frame_indices``, ``temporal_windows``).

Pure index arithmetic on NumPy: which frames of a video a model sees. Decoding lives in
:mod:`mmcore.preprocess.video`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ..errors import ArgumentError
from ._checks import check_int, check_optional_int, check_rate

__all__ = ["sample_frame_indices", "temporal_windows"]

STRATEGIES = ("uniform", "fps")


# --------------------------------------------------------------------------------------------
# argument checks

#: The largest frame count accepted for ``num_frames`` (the int32 range: 2**31 - 1 frames are
#: 2 years at 30 fps) and for the other counts (``n``, ``window``, ``stride``, the limits):
#: 2**24. Within them every index is computed exactly in int64.
MAX_NUM_FRAMES = (1 << 31) - 1
MAX_COUNT = 1 << 24
#: The most indices :func:`temporal_windows` returns (num_windows x window): 2**27, 1 GiB.
MAX_WINDOW_INDICES = 1 << 27


def _strategy_arg(op: str, strategy: Any, n: Optional[int], fps: Optional[float]) -> str:
    if strategy is None:
        return "fps" if fps is not None else "uniform"
    if not isinstance(strategy, str) or strategy.lower() not in STRATEGIES:
        raise ArgumentError(f"[{op}] strategy must be 'uniform', 'fps' or None, got {strategy!r}")
    return strategy.lower()


# --------------------------------------------------------------------------------------------
# frame indices

def sample_frame_indices(num_frames: int, *, n: Optional[int] = None,
                         fps: Optional[float] = None, video_fps: Optional[float] = None,
                         strategy: Optional[str] = None, min_frames: int = 4,
                         max_frames: int = 768, temporal_patch: int = 2) -> np.ndarray:
    """Indices of the frames to sample from a video of ``num_frames`` frames.

    Parameters
    ----------
    num_frames : int
        Frames in the video (>= 1).
    n : int, optional
        Frames to take with ``strategy="uniform"``.
    fps : float, optional
        Target frame rate of ``strategy="fps"``.
    video_fps : float, optional
        The video's frame rate; required by ``strategy="fps"``.
    strategy : {"uniform", "fps", None}, default None
        None picks ``"fps"`` when ``fps`` is given, else ``"uniform"``.
    min_frames, max_frames : int, default 4 and 768
        Limits on the count of ``"fps"`` (Qwen2-VL's ``FPS_MIN_FRAMES`` / ``FPS_MAX_FRAMES``).
    temporal_patch : int, default 2
        ``"fps"`` rounds its count to a multiple of this (Qwen2-VL's ``FRAME_FACTOR``).

    Returns
    -------
    int64 ndarray (count,), non-decreasing, every value in ``[0, num_frames - 1]``

    Notes
    -----
    ``"uniform"``: the video is cut into ``n`` equal segments and the centre frame of each is
    taken, ``index_i = floor((i + 0.5) * num_frames / n)`` for ``i = 0 .. n - 1`` (computed
    exactly in integers as ``(2 i + 1) * num_frames // (2 n)``). ``n > num_frames`` is allowed
    and repeats frames. ``min_frames``, ``max_frames`` and ``temporal_patch`` do not apply.

    ``"fps"``, step by step:

    1. ``count = round_half_up(num_frames / video_fps * fps)``, the frames at ``fps``;
    2. clamped: ``count = min(max(count, min_frames), max_frames, num_frames)``;
    3. rounded to a multiple of ``temporal_patch``: ``round_half_up(count / tp) * tp``, or the
       multiple below when that exceeds ``min(max_frames, num_frames)``, and at least ``tp``
       (a video shorter than ``tp`` frames then repeats frames);
    4. spread evenly: ``np.round(np.linspace(0, num_frames - 1, count))`` (NumPy's
       round-half-to-even, the same as Qwen2-VL's ``torch.linspace(...).round()``), so the
       first and the last frame are always included.

    With the defaults this is Qwen2-VL's ``smart_nframes`` + ``linspace`` sampling, except that
    step 1 rounds where Qwen2-VL floors (the floor is applied at step 3 there), and short
    videos repeat frames where Qwen2-VL raises.

    Raises
    ------
    ArgumentError
        Naming the argument: ``num_frames``, ``n``, ``fps``, ``video_fps``, ``min_frames``,
        ``max_frames`` or ``temporal_patch`` of the wrong type or out of range (counts are
        ints, ``num_frames <= MAX_NUM_FRAMES = 2**31 - 1``, the others ``<= MAX_COUNT =
        2**24``; rates finite and > 0), or missing for the strategy; ``n`` with
        ``strategy="fps"`` or ``fps`` with ``"uniform"``.

    Examples
    --------
    >>> from mmcore.preprocess import sample_frame_indices
    >>> sample_frame_indices(100, n=4).tolist()                  # segment centres
    [12, 37, 62, 87]
    >>> sample_frame_indices(300, fps=1.0, video_fps=30.0).tolist()   # 10 s at 1 fps
    [0, 33, 66, 100, 133, 166, 199, 233, 266, 299]
    """
    op = "sample_frame_indices"
    num_frames = check_int("num_frames", num_frames, op=op, lo=1, hi=MAX_NUM_FRAMES)
    n = check_optional_int("n", n, op=op, lo=1, hi=MAX_COUNT)
    fps = check_rate(op, "fps", fps, optional=True)
    video_fps = check_rate(op, "video_fps", video_fps, optional=True)
    strategy = _strategy_arg(op, strategy, n, fps)
    min_frames = check_int("min_frames", min_frames, op=op, lo=1, hi=MAX_COUNT)
    max_frames = check_int("max_frames", max_frames, op=op, lo=1, hi=MAX_COUNT)
    tp = check_int("temporal_patch", temporal_patch, op=op, lo=1, hi=MAX_COUNT)
    if max_frames < min_frames:
        raise ArgumentError(f"[{op}] max_frames must be >= min_frames={min_frames}, "
                            f"got {max_frames}")

    if strategy == "uniform":
        if fps is not None:
            raise ArgumentError(f"[{op}] fps is used by strategy='fps' only; with "
                                "strategy='uniform' give n")
        if n is None:
            raise ArgumentError(f"[{op}] n is required for strategy='uniform' (or give fps and "
                                "video_fps for strategy='fps')")
        i = np.arange(n, dtype=np.int64)
        return (2 * i + 1) * num_frames // (2 * n)

    if n is not None:
        raise ArgumentError(f"[{op}] n is used by strategy='uniform' only; with strategy='fps' the "
                            "count follows from fps, video_fps and the limits")
    if fps is None:
        raise ArgumentError(f"[{op}] fps is required for strategy='fps'")
    if video_fps is None:
        raise ArgumentError(f"[{op}] video_fps is required for strategy='fps'")
    frames_at_fps = num_frames / video_fps * fps
    # an overflow to inf (fps=1e308, video_fps=1e-308) is clamped to max_frames below
    count = math.floor(frames_at_fps + 0.5) if math.isfinite(frames_at_fps) else max_frames
    count = min(max(count, min_frames), max_frames, num_frames)
    cap = min(max_frames, num_frames)
    rounded = math.floor(count / tp + 0.5) * tp
    if rounded > cap:
        rounded = (cap // tp) * tp
    count = max(rounded, tp)
    idx = np.round(np.linspace(0, num_frames - 1, count))
    return idx.astype(np.int64)


def temporal_windows(num_frames: int, *, window: int, stride: int) -> np.ndarray:
    """Frame indices of fixed-length clips for clip-based video models.

    Windows start at frame 0 and every ``stride`` frames after it, as long as they fit. When
    the last of them does not end on the last frame (``(num_frames - window) % stride != 0``),
    one more window is added that ends exactly on it (starting at ``num_frames - window``), so
    every frame is covered (with ``stride <= window``) and no window runs past the end. A video
    shorter than ``window`` gives one window: all its frames, then the last index repeated.

    Parameters
    ----------
    num_frames : int
        Frames in the video (>= 1).
    window : int
        Frames per window (>= 1).
    stride : int
        Frames between the starts of consecutive windows (>= 1; ``stride > window`` skips
        frames between windows).

    Returns
    -------
    int64 ndarray (num_windows, window)

    Raises
    ------
    ArgumentError
        Naming ``num_frames``, ``window`` or ``stride`` when it is not an integer >= 1 (or
        beyond ``MAX_NUM_FRAMES`` / ``MAX_COUNT``).

    Examples
    --------
    >>> from mmcore.preprocess import temporal_windows
    >>> temporal_windows(10, window=4, stride=4).tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7], [6, 7, 8, 9]]
    >>> temporal_windows(3, window=5, stride=2).tolist()
    [[0, 1, 2, 2, 2]]
    """
    op = "temporal_windows"
    num_frames = check_int("num_frames", num_frames, op=op, lo=1, hi=MAX_NUM_FRAMES)
    window = check_int("window", window, op=op, lo=1, hi=MAX_COUNT)
    stride = check_int("stride", stride, op=op, lo=1, hi=MAX_COUNT)
    if num_frames < window:
        row = np.minimum(np.arange(window, dtype=np.int64), num_frames - 1)
        return row[None, :]
    last = num_frames - window
    n_windows = last // stride + 1 + (last % stride != 0)
    if n_windows * window > MAX_WINDOW_INDICES:
        raise ArgumentError(f"[{op}] num_frames = {num_frames} with window = {window} and stride = "
                            f"{stride} gives {n_windows} windows, {n_windows * window} indices; "
                            f"at most {MAX_WINDOW_INDICES} are returned (use a larger stride)")
    s = np.arange(0, last + 1, stride, dtype=np.int64)
    if s[-1] != last:
        s = np.append(s, np.int64(last))
    return s[:, None] + np.arange(window, dtype=np.int64)[None, :]
