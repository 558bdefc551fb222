"""Benchmark ``mmcore.preprocess.load_video`` (a packet index + exact seeking) against a plain
PyAV decode of every frame, decord and torchcodec, on MP4, MPEG-TS and variable-frame-rate
files, and check that its frames are the ones a plain decode gives.

Files (written once into a temporary directory with PyAV): 10 s of 320 x 240 video with motion
(a drifting textured background and moving blocks), H.264 with B-frames (libx264 ``bframes=3``,
a key frame every 60 frames; MPEG-4 Part 2 when PyAV has no libx264):

* ``mp4``: 30 fps in MP4;
* ``ts``: the same stream settings in MPEG-TS (which starts at a non-zero time);
* ``vfr-mp4``: 300 frames at irregular times (steps of 1, 2 or 3 thirtieths of a second) in MP4.

Cases: 8, 16 and 32 frames sampled uniformly (``sample_frame_indices(N, n=...)``, index-based)
and every frame (dense). Each path returns uint8 RGB ``(T, H, W, 3)`` frames and opens the file
on every call:

* mmcore: ``load_video(path, indices=idx, max_threads=2)`` (the index made from the packets,
  then seeking to the key frame before each needed frame);
* PyAV decode-all: decode every frame in order (2 threads) and convert the ones in ``idx`` to
  RGB with ``frame.to_ndarray(format="rgb24")`` (as plain PyAV code does; mmcore keeps one
  swscale converter per read, same bits); the reference: frame ``i`` is the ``i``-th decoded
  frame;
* decord: ``VideoReader(path, num_threads=2).get_batch(idx).asnumpy()``;
* torchcodec (when installed): ``VideoDecoder(path).get_frames_at(idx)``, as HWC uint8.

Timing: the paths of a case interleaved (median of >= 9 rounds after 2 warm-ups, >= 0.5 s per
measurement). The ``mmcore exact`` column says whether mmcore's frames equal the decode-all
frames bit for bit (the script exits with status 1 otherwise); the decord and torchcodec
columns give their max abs difference from them in uint8 levels (their own RGB conversion may
differ slightly; a large value means another frame).

Usage::

    python bench/bench_video.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402
from mmcore.preprocess import load_video, sample_frame_indices  # noqa: E402

W, H = 320, 240
FPS = 30
SECONDS = 10
GOP = 60
DECODER_THREADS = 2
SAMPLES = (8, 16, 32)
SEED = 0


def scene(i: int, bg: np.ndarray) -> np.ndarray:
    """Frame ``i``: the background drifting by two pixels a frame, with two moving blocks."""
    a = np.roll(bg, 2 * i, axis=1)
    x = (7 * i) % (W - 40)
    y = (3 * i) % (H - 40)
    a[y:y + 40, x:x + 40] = (200, 60, 30)
    a[H - 40 - y:H - y, W - 40 - x:W - x] = (30, 200, 90)
    return a


def write(path: str, av, fmt: Optional[str], pts: Optional[List[int]] = None) -> str:
    codec = "libx264" if "libx264" in av.codec.codecs_available else "mpeg4"
    rng = np.random.default_rng(SEED)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    tex = 60 * np.sin(xx / 9.0) * np.cos(yy / 7.0) + rng.normal(0, 6, (H, W))
    bg = np.clip(np.stack([tex + 110, tex + 90, 140 - tex], -1), 0, 255).astype(np.uint8)
    tb = Fraction(1, 90000)
    n = FPS * SECONDS
    with av.open(path, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.gop_size = GOP
        if pts is not None:
            s.codec_context.time_base = tb
        if codec == "libx264":
            s.options = {"x264-params": f"keyint={GOP}:min-keyint={GOP}:scenecut=0:bframes=3",
                         "crf": "20", "preset": "fast"}
        for i in range(n):
            f = av.VideoFrame.from_ndarray(scene(i, bg), format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[i], tb
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return codec


def vfr_times(n: int) -> List[int]:
    rng = np.random.default_rng(SEED + 1)
    steps = rng.choice([1, 2, 3], n) * 3000            # 1/30 s = 3000 ticks of 1/90000
    return [int(x) for x in np.concatenate([[0], np.cumsum(steps[:-1])])]


def decode_all(av, path: str, idx: np.ndarray) -> np.ndarray:
    """Decode every frame in order with PyAV and keep (as RGB) the ones at ``idx``."""
    pos: Dict[int, List[int]] = {}
    for k, i in enumerate(idx):
        pos.setdefault(int(i), []).append(k)
    last = int(idx.max())
    out: Optional[np.ndarray] = None
    with av.open(path) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        st.codec_context.thread_count = DECODER_THREADS
        for n, frame in enumerate(c.decode(st)):
            if n in pos:
                img = frame.to_ndarray(format="rgb24")
                if out is None:
                    out = np.empty((len(idx),) + img.shape, np.uint8)
                for k in pos[n]:
                    out[k] = img
            if n == last:
                break
    assert out is not None
    return out


def count_frames(av, path: str) -> int:
    with av.open(path) as c:
        return sum(1 for _ in c.decode(c.streams.video[0]))


def decord_reader(decord) -> Callable[[str, np.ndarray], np.ndarray]:
    def run(path: str, idx: np.ndarray) -> np.ndarray:
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=DECODER_THREADS)
        return vr.get_batch(idx.tolist()).asnumpy()
    return run


def torchcodec_reader(tc) -> Callable[[str, np.ndarray], np.ndarray]:
    from torchcodec.decoders import VideoDecoder

    def run(path: str, idx: np.ndarray) -> np.ndarray:
        dec = VideoDecoder(path, num_ffmpeg_threads=DECODER_THREADS)
        return dec.get_frames_at(idx.tolist()).data.permute(0, 2, 3, 1).numpy()
    return run


def _maxdiff(a: Optional[np.ndarray], ref: np.ndarray) -> str:
    if a is None:
        return "n/a"
    if a.shape != ref.shape:
        return f"shape {a.shape}"
    return str(int(np.abs(a.astype(np.int16) - ref.astype(np.int16)).max()))


def _ms(t: Optional[T.Timing]) -> str:
    return T.fmt(None if t is None else t.median * 1e3, ".1f")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser)
    args = parser.parse_args(argv)
    av = T.optional_import("av")
    if av is None:
        print("PyAV is not installed: nothing to measure")
        return 2
    decord = T.optional_import("decord")
    torchcodec = T.optional_import("torchcodec")
    threads = T.configure_threads(args.threads)
    tkw = (dict(warmup=1, repeat=3, min_time=0.0) if args.quick
           else dict(warmup=2, repeat=9, min_time=0.5, max_repeat=100))
    versions = "; ".join(f"{name} {getattr(mod, '__version__', '?') if mod else 'not installed'}"
                         for name, mod in (("av", av), ("decord", decord),
                                           ("torchcodec", torchcodec)))
    T.print_header("mmcore load_video (packet index + exact seeking) vs PyAV decode-all / "
                   "decord / torchcodec", threads_info=threads,
                   extra={"anchors": versions,
                          "decoding": f"{DECODER_THREADS} decoder threads in every path; the "
                                      "file is opened on every call",
                          "timing": f"median of >= {tkw['repeat']} interleaved rounds after "
                                    f"{tkw['warmup']} warm-up(s), >= {tkw['min_time']} s per "
                                    "measurement" + (" (--quick)" if args.quick else "")})
    T.machine_ceilings(repeat=3 if args.quick else 5)
    print()

    readers: Dict[str, Callable[[str, np.ndarray], Any]] = {
        "mmcore": lambda p, idx: load_video(p, indices=idx, max_threads=DECODER_THREADS)[0],
        "decode-all": lambda p, idx: decode_all(av, p, idx)}
    if decord is not None:
        readers["decord"] = decord_reader(decord)
    if torchcodec is not None:
        readers["torchcodec"] = torchcodec_reader(torchcodec)

    def usable(name: str, path: str) -> bool:
        try:
            readers[name](path, np.array([0, 1]))
        except Exception as exc:  # an anchor whose API differs from the one used here
            print(f"[skip] {name}: {type(exc).__name__}: {exc}; its columns print n/a")
            return False
        return True

    tmp = tempfile.mkdtemp(prefix="mmcore_bench_video_")
    failed: List[str] = []
    rows = []
    try:
        files = {"mp4": (os.path.join(tmp, "clip.mp4"), None, None),
                 "ts": (os.path.join(tmp, "clip.ts"), "mpegts", None),
                 "vfr-mp4": (os.path.join(tmp, "vfr.mp4"), None, vfr_times(FPS * SECONDS))}
        codec = ""
        for name, (path, fmt, pts) in files.items():
            print(f"  writing {name}", file=sys.stderr, flush=True)
            codec = write(path, av, fmt, pts)
        first = files["mp4"][0]
        for name in [k for k in readers if k in ("decord", "torchcodec")]:
            if not usable(name, first):
                del readers[name]
        for name, (path, _, _) in files.items():
            n_frames = count_frames(av, path)
            cases = [(f"n={n}", sample_frame_indices(n_frames, n=n)) for n in SAMPLES]
            cases.append((f"all {n_frames}", np.arange(n_frames)))
            for label, idx in cases:
                print(f"  measuring {name} {label}", file=sys.stderr, flush=True)
                ref = readers["decode-all"](path, idx)
                out = {k: fn(path, idx) for k, fn in readers.items() if k != "decode-all"}
                exact = out["mmcore"].shape == ref.shape and bool(np.array_equal(out["mmcore"],
                                                                                 ref))
                if not exact:
                    failed.append(f"{name} {label}")
                t = T.interleaved({k: (lambda fn=fn, idx=idx, path=path: fn(path, idx))
                                   for k, fn in readers.items()}, **tkw)
                rows.append([name, label, _ms(t["mmcore"]), _ms(t["decode-all"]),
                             _ms(t.get("decord")), _ms(t.get("torchcodec")),
                             "yes" if exact else "NO",
                             _maxdiff(out.get("decord"), ref),
                             _maxdiff(out.get("torchcodec"), ref)])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{SECONDS} s {W}x{H} {codec} (B-frames, key frame every {GOP}), uint8 RGB frames, "
          "median ms per call")
    T.print_table(["file", "frames", "mmcore ms", "PyAV decode-all ms", "decord ms",
                   "torchcodec ms", "mmcore exact", "decord max|d|", "torchcodec max|d|"], rows)
    if failed:
        print("CORRECTNESS CHECK FAILED (mmcore frames differ from a plain decode) on: "
              + ", ".join(failed))
    T.print_footer()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
