"""Benchmark mmcore's CLIP image preprocessing against Pillow, OpenCV, torchvision and Hugging
Face, load_video's seeking against decoding every frame with PyAV, and CLIP preprocessing from
encoded JPEG bytes against Pillow, OpenCV and simplejpeg.

Image cases (a decoded 640 x 480 RGB photo-like image: smooth shading, edges, texture and sensor
noise, JPEG-encoded and decoded with ``mmcore.preprocess.load_image``):

* ``mmcore.ops.preprocess_image(img, preset="clip")`` -> float32 (3, 224, 224);
* Pillow pipeline: ``Image.fromarray(img).resize((298, 224), Image.BICUBIC)`` (shortest edge
  to 224, ``int(224 * 640 / 480) = 298``), center crop 224 (``left = 37``), then NumPy
  ``(x / 255 - mean) / std`` with the OpenAI CLIP mean/std and a transpose to CHW, float32;
* OpenCV pipeline: ``cv2.resize(img, (298, 224), interpolation=cv2.INTER_AREA)``, the same
  crop and NumPy normalization;
* torchvision (if importable): ``transforms.v2`` ``Resize(224, bicubic, antialias=True)``,
  ``CenterCrop(224)``, ``ToDtype(float32, scale=True)``, ``Normalize`` on a uint8 CHW tensor;
* Hugging Face (if importable): ``CLIPImageProcessor`` (``CLIPImageProcessorPil`` when
  transformers provides it without torchvision), ``return_tensors="np"``.

and the batch of 32 such images as a ``(32, 480, 640, 3)`` array: mmcore in one call (with 1 and
with 2 threads), the anchors looping over the images. Printed: times, speedups (anchor time /
mmcore time; targets: >= 4x the Pillow pipeline and >= 1.5x OpenCV per image), the batch time
per image against the single-image time for 1 and 2 mmcore threads, and the max abs difference
from the Pillow pipeline in normalized units and in uint8 levels (normalized difference times
``255 * std`` of its channel); the script exits with status 1 when mmcore differs from the
Pillow pipeline by more than one uint8 level.

Video cases: a 10 s 854 x 480 clip at 30 fps (H.264 with a key frame every ``--gop`` frames,
30 and 60 by default, one clip each; MPEG-4 Part 2 when PyAV has no libx264), written once
into a temporary directory; 8 and 32
frames sampled uniformly (``sample_frame_indices``) are read with ``mmcore.preprocess.
load_video`` (seeking) and by decoding every frame with PyAV and keeping the needed ones
(converted to RGB the same way), with 2 decoder threads each.

From encoded bytes (section ``decode``): the photos shipped with scikit-image (astronaut,
chelsea, coffee; three ``photo_like`` images without it) cropped to the aspect ratio and scaled
with Lanczos to 640 x 480, 1920 x 1080 and 4000 x 3000, mirrored every other round, with
Gaussian noise (sigma 3 levels), saved in memory as JPEG quality 90 4:2:0 with an EXIF block
saying "upright"; batch 1 and batch 32 (batch 8 at 4000 x 3000). Every path turns the list of
bytes into CLIP ``pixel_values`` (N, 3, 224, 224):

* ``ImagePreprocessor(PreprocessingConfig(modality="image"))(list_of_bytes)`` (exact decode),
  and the same with ``decode_scale="auto"`` (reduced-size JPEG decode), with its max and mean
  difference from the exact path in uint8 levels;
* Pillow: ``Image.open`` + ``ImageOps.exif_transpose`` + ``convert("RGB")`` per image, then one
  ``mmcore.ops.preprocess_image(list, preset="clip")`` call, and the share of its time spent
  decoding;
* OpenCV: ``cv2.imdecode`` + ``cvtColor`` BGR->RGB + ``resize`` INTER_AREA (shortest edge 224)
  + center crop + NumPy normalization per image (``cv2.setNumThreads(2)``);
* simplejpeg (libjpeg-turbo) ``decode_jpeg`` per image + one ``preprocess_image`` call.

Before timing it checks, on every image, that ``load_image(bytes)`` equals Pillow's decode and
that mmcore's exact path equals Pillow decode + mmcore's kernels bit for bit (exit status 1
otherwise).

Usage::

    python bench/bench_image.py [--quick] [--threads N] [--backend native|numba]
                                [--gop G [G ...]] [--no-video]
                                [--sections all|arrays|video|decode [...]]

``--sections decode`` runs the from-bytes table alone. Any anchor that is not installed prints
``n/a`` and the rest still runs.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

try:
    import mmcore  # noqa: E402
    from mmcore.ops import preprocess_image  # noqa: E402
    from mmcore.preprocess import load_image, load_video, sample_frame_indices  # noqa: E402
except ImportError as _exc:  # pragma: no cover - not installed or ops missing
    raise SystemExit(f"mmcore (with its image ops) is not importable ({_exc}); build and install "
                     "it first: pip install --no-build-isolation -Cbuild-dir=build -e .") from _exc

H_IMG, W_IMG = 480, 640
SIZE = 224
RESIZED_W = int(SIZE * W_IMG / H_IMG)          # 298
LEFT = (RESIZED_W - SIZE) // 2                 # 37
BATCH = 32
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
TARGET_PILLOW = 4.0
TARGET_OPENCV = 1.5
FAIL_LEVELS = 1.0 + 1e-3   # resize matches Pillow within one uint8 level; exit status 1 beyond
DEFAULT_THREADS = 2
SEED = 7
SECTIONS = ("all", "arrays", "video", "decode")

VIDEO_W, VIDEO_H, VIDEO_FPS, VIDEO_S = 854, 480, 30, 10
VIDEO_SAMPLES = (8, 32)
DECODER_THREADS = 2


# --------------------------------------------------------------------------------------------
# inputs

def photo_like(rng: np.random.Generator, h: int = H_IMG, w: int = W_IMG) -> np.ndarray:
    """A photo-like uint8 RGB image: sky-to-ground shading, a few soft-edged objects, fine
    texture and sensor noise, passed through JPEG (quality 90) and decoded."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = yy / h
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 90 + 120 * t + 10 * np.sin(xx / 37.0)
    img[..., 1] = 140 + 60 * t + 8 * np.cos(yy / 23.0)
    img[..., 2] = 220 - 150 * t
    for _ in range(7):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(30, 140)
        color = rng.uniform(0, 255, 3).astype(np.float32)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        a = np.clip((r - d) / 3.0, 0, 1)[..., None]          # soft edge
        shade = 1.0 - 0.35 * np.clip((yy - cy) / r, -1, 1)[..., None]
        img = img * (1 - a) + color * shade * a
    img += 12 * np.sin(xx / 3.1 + yy / 5.3)[..., None]         # texture
    img += rng.normal(0, 4, img.shape).astype(np.float32)      # noise
    u8 = np.clip(img, 0, 255).astype(np.uint8)
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=90)
    buf.seek(0)
    return load_image(buf)


# --------------------------------------------------------------------------------------------
# image anchors (each returns float32 (3, 224, 224))

def _normalize_hwc(crop_u8: np.ndarray) -> np.ndarray:
    x = crop_u8.astype(np.float32) / np.float32(255.0)
    x = (x - CLIP_MEAN) / CLIP_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def pillow_anchor(Image) -> Callable[[np.ndarray], np.ndarray]:
    def run(img: np.ndarray) -> np.ndarray:
        im = Image.fromarray(img).resize((RESIZED_W, SIZE), Image.BICUBIC)
        a = np.asarray(im)[:, LEFT:LEFT + SIZE]
        return _normalize_hwc(a)
    return run


def opencv_anchor(cv2) -> Callable[[np.ndarray], np.ndarray]:
    def run(img: np.ndarray) -> np.ndarray:
        a = cv2.resize(img, (RESIZED_W, SIZE), interpolation=cv2.INTER_AREA)[:, LEFT:LEFT + SIZE]
        return _normalize_hwc(a)
    return run


def torchvision_anchor(torch, tv2) -> Callable[[np.ndarray], np.ndarray]:
    pipe = tv2.Compose([
        tv2.Resize(SIZE, interpolation=tv2.InterpolationMode.BICUBIC, antialias=True),
        tv2.CenterCrop(SIZE),
        tv2.ToDtype(torch.float32, scale=True),
        tv2.Normalize(mean=CLIP_MEAN.tolist(), std=CLIP_STD.tolist()),
    ])

    def run(img: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return pipe(torch.from_numpy(img).permute(2, 0, 1)).numpy()
    return run


def hf_anchor(transformers_mod) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    cls = getattr(transformers_mod, "CLIPImageProcessorPil", None)
    if cls is None:
        cls = getattr(transformers_mod, "CLIPImageProcessor", None)
    if cls is None:
        return None
    proc = cls()    # the OpenAI CLIP defaults: shortest edge 224, bicubic, crop 224

    def run(img: np.ndarray) -> np.ndarray:
        return proc(images=img, return_tensors="np")["pixel_values"][0]
    return run


def load_anchors() -> Dict[str, Optional[Callable[[np.ndarray], np.ndarray]]]:
    anchors: Dict[str, Optional[Callable[[np.ndarray], np.ndarray]]] = {}
    pil = T.optional_import("PIL.Image")
    anchors["pillow"] = pillow_anchor(pil) if pil is not None else None
    cv2 = T.optional_import("cv2")
    anchors["opencv"] = opencv_anchor(cv2) if cv2 is not None else None
    tv2 = T.optional_import("torchvision.transforms.v2")
    torch = T.optional_import("torch") if tv2 is not None else None
    anchors["torchvision"] = torchvision_anchor(torch, tv2) if tv2 is not None else None
    tf = T.optional_import("transformers")
    fn = None
    if tf is not None:
        import logging
        import warnings
        logging.getLogger("transformers").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fn = hf_anchor(tf)
            except Exception as exc:  # an install without the image processors
                print(f"[skip] anchor 'transformers' CLIPImageProcessor failed ({exc})")
    anchors["hf clip"] = fn
    return anchors


# --------------------------------------------------------------------------------------------
# image runs

def diffs_vs(ref: Optional[np.ndarray], out: np.ndarray):
    """(max abs diff normalized, max abs diff in uint8 levels) of out vs ref, both (.., 3, h, w)."""
    if ref is None:
        return None, None
    if ref.shape != out.shape:
        return float("inf"), float("inf")
    d = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    levels = d * (255.0 * CLIP_STD.astype(np.float64))[:, None, None]
    return float(d.max()), float(levels.max())


def _ms(t: Optional[T.Timing], per: int = 1) -> str:
    return T.fmt(None if t is None else t.median * 1e3 / per, ".3f")


def _x(v: Optional[float]) -> str:
    return T.fmt(v, ".2f") + ("x" if v is not None else "")


def _ratio(a: Optional[T.Timing], b: T.Timing) -> Optional[float]:
    return None if a is None else a.median / b.median


# --------------------------------------------------------------------------------------------
# video

def write_clip(path: str, av, gop: int) -> str:
    """A 10 s 854x480 30 fps clip with motion (a drifting scene and moving objects)."""
    codec = "libx264"
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        codec = "mpeg4"
    rng = np.random.default_rng(SEED)
    h, w = VIDEO_H, VIDEO_W
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    texture = (20 * np.sin(xx / 6.0 + yy / 9.0) + rng.normal(0, 3, (h, w))).astype(np.float32)
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=VIDEO_FPS)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        if codec == "libx264":
            s.options = {"keyint": str(gop), "min-keyint": str(gop), "scenecut": "0",
                         "preset": "veryfast", "crf": "23"}
        else:
            s.options = {"g": str(gop), "qscale": "4"}
        s.codec_context.thread_count = 2
        for i in range(VIDEO_FPS * VIDEO_S):
            shift = 2.0 * i
            base = np.empty((h, w, 3), np.float32)
            base[..., 0] = 100 + 80 * np.sin((xx + shift) / 120.0)
            base[..., 1] = 120 + 60 * np.cos((yy - shift / 2) / 90.0)
            base[..., 2] = 140 + 50 * np.sin((xx + yy + shift) / 200.0)
            base += texture[..., None]
            cx, cy = (50 + 7 * i) % w, h / 2 + 120 * np.sin(i / 20.0)
            box = (np.abs(xx - cx) < 60) & (np.abs(yy - cy) < 45)
            base[box] = (230, 40, 40)
            frame = av.VideoFrame.from_ndarray(np.clip(base, 0, 255).astype(np.uint8),
                                               format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return codec


def pyav_decode_all(av, path: str, indices: np.ndarray) -> np.ndarray:
    """Decode every frame in order with PyAV and keep (as RGB) the ones at ``indices``."""
    want = set(int(i) for i in indices)
    out = np.empty((len(indices), VIDEO_H, VIDEO_W, 3), np.uint8)
    pos = {int(i): k for k, i in enumerate(indices)}
    with av.open(path) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        st.codec_context.thread_count = DECODER_THREADS
        for n, frame in enumerate(c.decode(st)):
            if n in want:
                out[pos[n]] = frame.to_ndarray(format="rgb24")
    return out


def run_video(av, tkw, gop: int) -> None:
    from mmcore.preprocess.video import _VideoReader
    tmp = tempfile.mkdtemp(prefix="mmcore_bench_video_")
    try:
        path = os.path.join(tmp, "clip_480p.mp4")
        print(f"  writing the {VIDEO_S} s {VIDEO_W}x{VIDEO_H} test clip", file=sys.stderr,
              flush=True)
        codec = write_clip(path, av, gop)
        n_frames = VIDEO_FPS * VIDEO_S
        rows = []
        for n in VIDEO_SAMPLES:
            idx = sample_frame_indices(n_frames, n=n)
            mm_frames, _ = load_video(path, n=n, max_threads=DECODER_THREADS)
            ref = pyav_decode_all(av, path, idx)
            diff = int(np.abs(mm_frames.astype(np.int16) - ref.astype(np.int16)).max())
            with _VideoReader(path, max_threads=DECODER_THREADS, op="bench") as r:
                r.read(idx)
                stats = f"{r.frames_decoded} decoded, {r.seeks} seek(s)"
            # the timed callables bind this iteration's n and idx (timed right here)
            t = T.interleaved({
                "mm": lambda n=n: load_video(path, n=n, max_threads=DECODER_THREADS),
                "all": lambda idx=idx: pyav_decode_all(av, path, idx)}, **tkw)
            t_mm, t_all = t["mm"], t["all"]
            rows.append([f"{n} frames (uniform)", _ms(t_mm), _ms(t_all), _x(_ratio(t_all, t_mm)),
                         stats, str(diff)])
        print(f"load_video on a {VIDEO_S} s {VIDEO_W}x{VIDEO_H} {VIDEO_FPS} fps {codec} clip, "
              f"key frame every {gop} frames ({n_frames} frames), {DECODER_THREADS} decoder "
              "threads")
        T.print_table(["sampled", "load_video ms", "PyAV decode-all ms", "speedup",
                       "load_video work", "max|d| vs decode-all"], rows)
        print()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# from encoded bytes: JPEG decode + CLIP preprocessing

DECODE_CASES = ((640, 480, 32), (1920, 1080, 32), (4000, 3000, 8))   # width, height, batch
JPEG_QUALITY = 90
NOISE_SIGMA = 3.0          # sensor-like noise added to the upscaled photos, in uint8 levels
OPENCV_THREADS = 2
PHOTOS = ("astronaut", "chelsea", "coffee")

BytesPath = Callable[[Sequence[bytes]], np.ndarray]


def photo_sources() -> List[np.ndarray]:
    """The photos shipped with scikit-image, else three :func:`photo_like` images."""
    data = T.optional_import("skimage.data", purpose="photo source")
    if data is None:
        rng = np.random.default_rng(SEED)
        return [photo_like(rng) for _ in PHOTOS]
    return [np.ascontiguousarray(getattr(data, n)()[..., :3]) for n in PHOTOS]


def encode_photos(sources: Sequence[np.ndarray], w: int, h: int, n: int,
                  rng: np.random.Generator) -> List[bytes]:
    """``n`` JPEG files (quality 90, 4:2:0, an EXIF block saying "upright" as cameras write) of
    ``w x h``: the sources cropped to the aspect ratio and scaled with Lanczos, every other
    round mirrored, each with its own Gaussian noise."""
    from PIL import Image, ImageOps
    bases = [np.asarray(ImageOps.fit(Image.fromarray(s), (w, h), Image.Resampling.LANCZOS))
             for s in sources]
    exif = Image.Exif()
    exif[0x0112] = 1
    out = []
    for i in range(n):
        a = bases[i % len(bases)]
        if (i // len(bases)) % 2:
            a = a[:, ::-1]
        noisy = a + rng.standard_normal(a.shape, dtype=np.float32) * np.float32(NOISE_SIGMA)
        u8 = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0",
                                 exif=exif)
        out.append(buf.getvalue())
    return out


def pillow_decoder(Image, ImageOps) -> Callable[[bytes], np.ndarray]:
    """What most Python code does: ``Image.open`` + ``exif_transpose`` + ``convert("RGB")``."""
    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return decode


def simplejpeg_decoder(sj) -> Callable[[bytes], np.ndarray]:
    """libjpeg-turbo through simplejpeg (no EXIF orientation: the test files are upright)."""
    def decode(data: bytes) -> np.ndarray:
        return sj.decode_jpeg(data, colorspace="RGB")
    return decode


def with_mmcore_kernels(decode: Callable[[bytes], np.ndarray], shares: List[float]) -> BytesPath:
    """Decode every image, then one ``preprocess_image`` call on the list; appends the decode
    share of each call's time to ``shares``."""
    def run(batch: Sequence[bytes]) -> np.ndarray:
        t0 = time.perf_counter()
        imgs = [decode(b) for b in batch]
        t1 = time.perf_counter()
        out = preprocess_image(imgs, preset="clip")
        shares.append((t1 - t0) / (time.perf_counter() - t0))
        return out
    return run


def opencv_from_bytes(cv2) -> BytesPath:
    """``imdecode`` + BGR->RGB + INTER_AREA to shortest edge 224 + center crop + NumPy normalize,
    looping over the batch."""
    def one(data: bytes) -> np.ndarray:
        a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        a = cv2.cvtColor(a, cv2.COLOR_BGR2RGB)
        h, w = a.shape[:2]
        nw, nh = (int(SIZE * w / h), SIZE) if h <= w else (SIZE, int(SIZE * h / w))
        r = cv2.resize(a, (nw, nh), interpolation=cv2.INTER_AREA)
        top, left = (nh - SIZE) // 2, (nw - SIZE) // 2
        return _normalize_hwc(r[top:top + SIZE, left:left + SIZE])

    def run(batch: Sequence[bytes]) -> np.ndarray:
        return np.stack([one(b) for b in batch])
    return run


def mmcore_from_bytes(decode_scale: str) -> Optional[BytesPath]:
    """``ImagePreprocessor(PreprocessingConfig(modality="image"), decode_scale=...)`` on the
    list of bytes, or None (printed) when this mmcore cannot take it."""
    from mmcore.config import PreprocessingConfig
    from mmcore.preprocess import ImagePreprocessor
    try:
        pre = ImagePreprocessor(PreprocessingConfig(modality="image"), decode_scale=decode_scale)
    except TypeError as exc:
        print(f"[skip] mmcore ImagePreprocessor(decode_scale={decode_scale!r}): {exc}")
        return None

    def run(batch: Sequence[bytes]) -> np.ndarray:
        return pre(list(batch))["pixel_values"]
    return run


def level_diff(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Tuple[float, float]:
    """(max, mean) abs difference of two CLIP-normalized (N, 3, h, w) outputs in uint8 levels
    (the difference times ``255 * std`` of its channel); nan when one is missing."""
    if a is None or b is None:
        return float("nan"), float("nan")
    if a.shape != b.shape:
        return float("inf"), float("inf")
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    d *= (255.0 * CLIP_STD.astype(np.float64))[:, None, None]
    return float(d.max()), float(d.mean())


def _same(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[bool]:
    if a is None or b is None:
        return None
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))


def _yes(flags: Sequence[Optional[bool]]) -> str:
    if any(f is None for f in flags):
        return "n/a"
    return "identical" if all(flags) else f"DIFFERS ({sum(not f for f in flags)}/{len(flags)})"


def run_decode(args, quick: bool) -> int:
    """The "from encoded bytes" table; returns 1 when mmcore's exact path is not bit-identical
    to Pillow decode + mmcore's kernels."""
    pil = T.optional_import("PIL.Image")
    if pil is None:
        print("from encoded bytes: n/a (Pillow is not installed)")
        return 0
    from PIL import Image, ImageOps
    cv2 = T.optional_import("cv2")
    if cv2 is not None:
        cv2.setNumThreads(OPENCV_THREADS)
    sj = T.optional_import("simplejpeg")
    tkw1: Dict[str, Any] = (dict(warmup=1, repeat=3, min_time=0.0) if quick
                            else dict(warmup=2, repeat=9, min_time=0.5, max_repeat=200))
    tkwb: Dict[str, Any] = (dict(warmup=1, repeat=3, min_time=0.0) if quick
                            else dict(warmup=1, repeat=7, min_time=1.0, max_repeat=30))

    pil_decode = pillow_decoder(Image, ImageOps)
    shares: Dict[str, List[float]] = {"pillow": [], "simplejpeg": []}
    paths: Dict[str, Optional[BytesPath]] = {
        "exact": mmcore_from_bytes("exact"),
        "auto": mmcore_from_bytes("auto"),
        "pillow": with_mmcore_kernels(pil_decode, shares["pillow"]),
        "opencv": opencv_from_bytes(cv2) if cv2 is not None else None,
        "simplejpeg": (with_mmcore_kernels(simplejpeg_decoder(sj), shares["simplejpeg"])
                       if sj is not None else None),
    }
    live = {k: v for k, v in paths.items() if v is not None}

    sources = photo_sources()
    rng = np.random.default_rng(SEED)
    cols: List[str] = []
    kb: List[str] = []
    auto_size: List[str] = []
    sizes: List[str] = []
    checks: Dict[str, List[str]] = {k: [] for k in ("load", "exact", "sj", "auto", "cv")}
    times: Dict[str, List[Optional[T.Timing]]] = {k: [] for k in paths}
    share_cells: Dict[str, List[str]] = {k: [] for k in shares}
    batches: List[int] = []
    status = 0
    for w, h, nb in DECODE_CASES:
        print(f"  encoding {nb} {w}x{h} JPEGs", file=sys.stderr, flush=True)
        files = encode_photos(sources, w, h, nb, rng)
        sizes.append(f"{w}x{h}")
        kb.append(T.fmt(float(np.mean([len(f) for f in files])) / 1024, ".0f"))

        # correctness, before timing: every image of the batch
        ref_dec = [pil_decode(f) for f in files]
        try:
            mm_dec: List[Optional[np.ndarray]] = [load_image(f) for f in files]
            shape = load_image(files[0], draft=2 * SIZE).shape
            auto_size.append(f"{shape[1]}x{shape[0]}")
        except Exception as exc:  # an mmcore without load_image(bytes) / draft
            print(f"[skip] mmcore load_image(bytes): {type(exc).__name__}: {exc}")
            mm_dec = [None] * len(files)
            auto_size.append("n/a")
        checks["load"].append(_yes([_same(m, r) for m, r in zip(mm_dec, ref_dec)]))
        if sj is not None:
            sj_flags = [_same(simplejpeg_decoder(sj)(f), r) for f, r in zip(files, ref_dec)]
            checks["sj"].append(_yes(sj_flags))
        else:
            checks["sj"].append("n/a")
        outs = {k: (None if fn is None else np.asarray(fn(files))) for k, fn in paths.items()}
        same = _same(outs["exact"], outs["pillow"])
        if same is False:
            status = 1
        checks["exact"].append(_yes([same]))
        for key, other in (("auto", "auto"), ("cv", "opencv")):
            mx, mean = level_diff(outs[other], outs["exact"] if key == "auto" else outs["pillow"])
            checks[key].append(f"{T.fmt(mx, '.2f')} / {T.fmt(mean, '.3f')}")

        for batch in (1, nb):
            data = files[:batch]
            cols.append(f"{w}x{h} b{batch}")
            batches.append(batch)
            for v in shares.values():
                v.clear()
            print(f"  measuring {w}x{h}, batch {batch}: {', '.join(live)}", file=sys.stderr,
                  flush=True)
            t = T.interleaved({k: functools.partial(fn, data) for k, fn in live.items()},
                              **(tkw1 if batch == 1 else tkwb))
            for k in paths:
                times[k].append(t.get(k))
            for k, v in shares.items():
                share_cells[k].append(T.fmt(100.0 * statistics.median(v), ".0f") + "%"
                                      if v else "n/a")

    def twice(cells: List[str]) -> List[str]:
        return [c for c in cells for _ in (0, 1)]

    def ms_row(label: str, key: str) -> List[str]:
        return [label] + [_ms(tm, b) for tm, b in zip(times[key], batches)]

    def ratio_row(label: str, num: str, den: str) -> List[str]:
        return [label] + [_x(None if a is None or b is None else a.median / b.median)
                          for a, b in zip(times[num], times[den])]

    rows = [
        ["JPEG size (KB, mean)"] + twice(kb),
        ms_row("mmcore ImagePreprocessor from bytes (exact)", "exact"),
        ms_row('mmcore decode_scale="auto" (approximate)', "auto"),
        ["  auto: decoded at (draft=448)"] + twice(auto_size),
        ["  auto vs exact: max / mean |d| (uint8 levels)"] + twice(checks["auto"]),
        ms_row("Pillow decode + mmcore.ops.preprocess_image", "pillow"),
        ["  share of it spent decoding"] + share_cells["pillow"],
        ms_row(f"OpenCV imdecode + INTER_AREA + NumPy ({OPENCV_THREADS} thr)", "opencv"),
        ms_row("simplejpeg decode + mmcore.ops.preprocess_image", "simplejpeg"),
        ["  share of it spent decoding"] + share_cells["simplejpeg"],
        ratio_row("Pillow path / mmcore exact", "pillow", "exact"),
        ratio_row("OpenCV path / mmcore exact", "opencv", "exact"),
        ratio_row("simplejpeg path / mmcore exact", "simplejpeg", "exact"),
        ratio_row("mmcore exact / mmcore auto", "exact", "auto"),
    ]
    print("correctness (before timing, every image of each batch)")
    T.print_table(["check"] + sizes, [
        ["load_image(bytes) == Pillow open+exif_transpose+RGB"] + checks["load"],
        ["mmcore exact == Pillow decode + mmcore kernels"] + checks["exact"],
        ["simplejpeg decode == Pillow decode"] + checks["sj"],
        ["OpenCV vs Pillow path: max / mean |d| levels"] + checks["cv"],
    ])
    print()
    print(f"path (CLIP preprocessing from JPEG, quality {JPEG_QUALITY}), ms per image (median "
          f"call time / batch); ratios > 1: mmcore faster; mmcore with {args.threads} thread(s)")
    T.print_table(["path"] + cols, rows)
    print()
    return status


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser)
    parser.set_defaults(threads=DEFAULT_THREADS)
    parser.add_argument("--gop", type=int, nargs="+", default=[30, 60],
                        help="key-frame interval(s) of the test video, one clip each "
                             "(default: %(default)s)")
    parser.add_argument("--no-video", action="store_true", help="skip the load_video part")
    parser.add_argument("--sections", choices=SECTIONS, nargs="+", default=["all"],
                        help="arrays = preprocess_image on decoded arrays (and thread scaling), "
                             "video = load_video, decode = from encoded JPEG bytes "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    sections = set(SECTIONS[1:]) if "all" in args.sections else set(args.sections)
    if args.no_video:
        sections.discard("video")

    anchors = load_anchors() if "arrays" in sections else {}
    av = T.optional_import("av") if "video" in sections else None
    if "decode" in sections:
        for name in ("PIL", "cv2", "simplejpeg", "skimage"):
            T.optional_import(name, purpose="decode anchor or photo source")
    torch = sys.modules.get("torch")
    threads = T.configure_threads(args.threads, torch)
    tkw = (dict(warmup=1, repeat=3, min_time=0.0) if args.quick
           else dict(warmup=2, repeat=9, min_time=0.5, max_repeat=300))
    tkw_batch = (dict(warmup=1, repeat=3, min_time=0.0) if args.quick
                 else dict(warmup=1, repeat=7, min_time=1.0, max_repeat=50))
    versions = []
    for name in ("PIL", "cv2", "simplejpeg", "torchvision", "transformers", "av"):
        mod = sys.modules.get(name)
        if mod is not None or name in ("PIL", "cv2"):
            versions.append(f"{name} {getattr(mod, '__version__', '?') if mod else 'n/a'}")
    parts = {"arrays": "mmcore CLIP image preprocessing vs Pillow / OpenCV / torchvision / "
                       "Hugging Face",
             "video": "load_video vs PyAV",
             "decode": "CLIP preprocessing from encoded JPEG bytes vs Pillow / OpenCV / "
                       "simplejpeg"}
    extra = {"anchors": "; ".join(versions),
             "timing": f"median of >= {tkw['repeat']} interleaved rounds (mmcore and its "
                       f"anchors) after {tkw['warmup']} warm-up(s); batches >= "
                       f"{tkw_batch['repeat']} rounds" + (" (--quick)" if args.quick else "")}
    if "decode" in sections:
        extra["decode"] = (
            f"JPEG quality {JPEG_QUALITY} 4:2:0 in memory: skimage.data "
            f"{'/'.join(PHOTOS)} cropped and scaled (Lanczos) to each size, mirrored every "
            f"other round, + noise sigma {NOISE_SIGMA:g}; batches "
            + ", ".join(f"{b} at {w}x{h}" for w, h, b in DECODE_CASES)
            + " (4000x3000: batch 8, not 32, to bound memory and run time); "
            f"OpenCV {OPENCV_THREADS} threads, Pillow / simplejpeg decode on one thread")
    T.print_header("; ".join(parts[s] for s in SECTIONS[1:] if s in sections) + " (CPU)",
                   threads_info=threads, torch=torch, backend=args.backend, extra=extra)
    T.machine_ceilings(repeat=3 if args.quick else 5)
    print()

    status = 0
    if "arrays" in sections:
        status |= run_arrays(args, anchors, tkw, tkw_batch)
    if "video" in sections:
        if av is None:
            print("load_video: n/a (PyAV is not installed)")
            print()
        else:
            vkw = (dict(warmup=1, repeat=3, min_time=0.0) if args.quick
                   else dict(warmup=1, repeat=7, min_time=1.0, max_repeat=30))
            for gop in args.gop:
                run_video(av, vkw, gop)
    if "decode" in sections:
        with mmcore.use_backend(args.backend):
            status |= run_decode(args, args.quick)
    T.print_footer()
    return status


def run_arrays(args, anchors: Dict[str, Optional[Callable[[np.ndarray], np.ndarray]]],
               tkw, tkw_batch) -> int:
    """The tables of ``preprocess_image`` on decoded arrays; 1 when mmcore differs from the
    Pillow pipeline by more than one uint8 level."""
    rng = np.random.default_rng(SEED)
    img = photo_like(rng)
    batch = np.stack([img] + [photo_like(rng) for _ in range(BATCH - 1)])

    def mm_single():
        return preprocess_image(img, preset="clip")

    def mm_batch():
        return preprocess_image(batch, preset="clip")

    # anchors: their outputs now; they are timed interleaved with mmcore at --threads below
    ref_single: Dict[str, Optional[np.ndarray]] = {}
    ref_batch: Dict[str, Optional[np.ndarray]] = {}
    anchor_single: Dict[str, Callable[[], object]] = {}
    anchor_batch: Dict[str, Callable[[], object]] = {}
    for name, fn in anchors.items():
        if fn is None:
            ref_single[name] = ref_batch[name] = None
            continue
        ref_single[name] = np.asarray(fn(img), np.float32)
        ref_batch[name] = np.stack([np.asarray(fn(x), np.float32) for x in batch])
        # the timed callables bind this anchor's fn
        anchor_single[name] = lambda fn=fn: fn(img)
        anchor_batch[name] = lambda fn=fn: [fn(x) for x in batch]

    try:
        with mmcore.use_backend(args.backend):
            out1 = mm_single()
            outb = mm_batch()
            t_single: Dict[int, T.Timing] = {}
            t_batch: Dict[int, T.Timing] = {}
            for nt in sorted({1, 2, args.threads}):
                mmcore.set_num_threads(nt)
                # at --threads mmcore runs interleaved with every anchor; the other thread
                # counts are mmcore alone, for the scaling table
                others_single = anchor_single if nt == args.threads else {}
                others_batch = anchor_batch if nt == args.threads else {}
                print(f"  measuring one image, {nt} thread(s)"
                      + (" with the anchors" if others_single else ""), file=sys.stderr,
                      flush=True)
                ts = T.interleaved({"mmcore": mm_single, **others_single}, **tkw)
                print(f"  measuring the batch of {BATCH}, {nt} thread(s)"
                      + (" with the anchors" if others_batch else ""), file=sys.stderr,
                      flush=True)
                tb = T.interleaved({"mmcore": mm_batch, **others_batch}, **tkw_batch)
                t_single[nt], t_batch[nt] = ts.pop("mmcore"), tb.pop("mmcore")
                if nt == args.threads:
                    times_single: Dict[str, Optional[T.Timing]] = {
                        n: ts.get(n) for n in anchors}
                    times_batch: Dict[str, Optional[T.Timing]] = {
                        n: tb.get(n) for n in anchors}
            mmcore.set_num_threads(args.threads)
    except mmcore.errors.BackendError as exc:
        print(f"backend {args.backend!r} cannot run preprocess_image: {exc}")
        print()
        return 2

    mm1 = t_single[args.threads]
    mmb = t_batch[args.threads]
    names = list(anchors)
    headers = (["case", "mmcore ms/img"] + [f"{n} ms/img" for n in names]
               + [f"vs {n}" for n in names])
    rows = [
        ["1 image 640x480"] + [_ms(mm1)] + [_ms(times_single[n]) for n in names]
        + [_x(_ratio(times_single[n], mm1)) for n in names],
        [f"batch {BATCH} (one call)"] + [_ms(mmb, BATCH)]
        + [_ms(times_batch[n], BATCH) for n in names]
        + [_x(_ratio(times_batch[n], mmb)) for n in names],
    ]
    print(f"CLIP preprocessing (shortest edge 224 -> 224x298, center crop 224, bicubic, CLIP "
          f"mean/std), mmcore with {args.threads} thread(s)")
    T.print_table(headers, rows)
    print()

    print("max abs difference from the Pillow pipeline (normalized units / uint8 levels)")
    drows = []
    pil1, pilb = ref_single.get("pillow"), ref_batch.get("pillow")
    for label, o1, ob in [("mmcore", out1, outb)] + [
            (n, ref_single[n], ref_batch[n]) for n in names if n != "pillow"]:
        if o1 is None:
            drows.append([label, "n/a", "n/a", "n/a", "n/a"])
            continue
        d1, l1 = diffs_vs(pil1, np.asarray(o1))
        db, lb = diffs_vs(pilb, np.asarray(ob))
        drows.append([label, T.fmt(d1, ".2e"), T.fmt(l1, ".2f"), T.fmt(db, ".2e"),
                      T.fmt(lb, ".2f")])
    T.print_table(["output", "1 image", "levels", f"batch {BATCH}", "levels"], drows)
    print()

    print("mmcore thread scaling (ms per image)")
    srows = []
    for nt in sorted(t_single):
        per_img = t_batch[nt].median / BATCH
        srows.append([f"{nt} thread(s)", _ms(t_single[nt]), _ms(t_batch[nt], BATCH),
                      T.fmt(t_single[nt].median / per_img, ".2f")])
    T.print_table(["threads", "single image", f"batch {BATCH} per image",
                   "single / batch-per-image"], srows)
    if 1 in t_batch and 2 in t_batch:
        print(f"batch speedup from 1 to 2 threads: "
              f"{t_batch[1].median / t_batch[2].median:.2f}x; single image: "
              f"{t_single[1].median / t_single[2].median:.2f}x")
    print()

    status = 0
    if pil1 is not None:
        _, l1 = diffs_vs(pil1, out1)
        _, lb = diffs_vs(pilb, outb)
        if not max(l1, lb) <= FAIL_LEVELS:
            print(f"ERROR: mmcore differs from the Pillow pipeline by {max(l1, lb):.2f} uint8 "
                  f"levels (more than {FAIL_LEVELS:g})")
            status = 1
    print("summary (targets per image, mmcore with "
          f"{args.threads} thread(s))")
    for name, target in (("pillow", TARGET_PILLOW), ("opencv", TARGET_OPENCV)):
        r1 = _ratio(times_single.get(name), mm1)
        rb = _ratio(times_batch.get(name), mmb)
        if r1 is None:
            print(f"  vs {name:<8}: n/a (not installed)")
            continue
        ok = "met" if min(r1, rb) >= target else "NOT met"
        print(f"  vs {name:<8}: {r1:.2f}x single, {rb:.2f}x batch (target >= {target:g}x: {ok})")
    print()
    return status


if __name__ == "__main__":
    sys.exit(main())
