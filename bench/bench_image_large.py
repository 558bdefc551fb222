"""CLIP preprocessing of large decoded images against the time of copying them.

``mmcore.ops.preprocess_image(img[None], preset="clip")`` (shortest edge to 224 with Pillow's
antialiased bicubic, center crop, normalize; bit-identical to Pillow) on decoded uint8 RGB
photos of 4000 x 3000, 1920 x 1080 and 640 x 480 pixels and a batch of 32 at 640 x 480, timed
interleaved with ``np.copyto`` of the same input bytes (the floor any pass over the image pays)
and with OpenCV's ``resize(INTER_AREA)`` + crop + NumPy normalize (not Pillow-exact) when
OpenCV is installed. The target of the large case is at most 3x the copy time.

    python bench/bench_image_large.py [--threads N] [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np

import _timing as T

CASES = (("4000x3000", 3000, 4000, 1), ("1920x1080", 1080, 1920, 1), ("640x480", 480, 640, 1),
         ("640x480 x32", 480, 640, 32))

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like uint8 image: smooth shading, a few edges and mild noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    img = np.empty((h, w, 3), np.float32)
    img[..., 0] = 40 + 160 * x + 30 * np.sin(9 * y)
    img[..., 1] = 60 + 120 * y + 20 * np.cos(7 * x)
    img[..., 2] = 128 + 90 * np.sin(5 * (x + y))
    img[(x > 0.3) & (x < 0.55) & (y > 0.2) & (y < 0.7)] = (200, 40, 30)
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def opencv_clip(cv2, batch: np.ndarray) -> np.ndarray:
    out = []
    for img in batch:
        h, w = img.shape[:2]
        s = 224 / min(h, w)
        nw, nh = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
        r = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
        top, left = (nh - 224) // 2, (nw - 224) // 2
        c = r[top:top + 224, left:left + 224].astype(np.float32) / 255.0
        out.append(((c - MEAN) / STD).transpose(2, 0, 1))
    return np.stack(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    T.add_common_args(parser, backends=("native",))
    args = parser.parse_args(argv)
    from mmcore import ops

    cv2 = T.optional_import("cv2")
    if cv2 is not None:
        cv2.setNumThreads(args.threads)
    threads = T.configure_threads(args.threads)
    tkw = (dict(warmup=1, repeat=7, min_time=0.0) if args.quick
           else dict(warmup=2, repeat=15, min_time=1.0, max_repeat=200))
    T.print_header("preprocess_image on large decoded images vs copying them (CPU)",
                   threads_info=threads,
                   extra={"timing": f"median of >= {tkw['repeat']} interleaved rounds"})
    T.machine_ceilings(repeat=3 if args.quick else 5)
    print()
    rows = []
    for label, h, w, n in CASES:
        batch = np.stack([photo(h, w, i) for i in range(n)])
        dst = np.empty_like(batch)
        fns = {"mmcore": lambda b=batch: ops.preprocess_image(b, preset="clip"),
               "copy": lambda b=batch, d=dst: np.copyto(d, b)}
        if cv2 is not None:
            fns["opencv"] = lambda b=batch: opencv_clip(cv2, b)
        t = T.interleaved(fns, **tkw)
        mm, cp = t["mmcore"].median, t["copy"].median
        cvt = t["opencv"].median if "opencv" in t else None
        rows.append([label, f"{batch.nbytes / 1e6:.1f}", T.fmt(mm * 1e3), T.fmt(cp * 1e3),
                     f"{mm / cp:.2f}", T.fmt(cvt * 1e3 if cvt else None),
                     T.fmt(cvt / mm if cvt else None, ".2f")])
    print("median ms per call (the whole batch); mmcore / copy: the target is <= 3 for 4000x3000")
    T.print_table(["case", "input MB", "mmcore ms", "copy ms", "mmcore / copy", "opencv ms",
                   "opencv / mmcore"], rows)
    print()
    print("copy = np.copyto of the uint8 input into a preallocated array (reads and writes "
          "its bytes once); opencv = resize INTER_AREA + crop + NumPy normalize, not "
          "Pillow-exact")
    T.print_footer()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
