"""Synthetic inputs and the end-to-end demo behind ``mmcore demo``.

Everything here is generated in memory with NumPy (no files, no network, no optional
dependencies): a caption, a 480 x 640 RGB image (a colour gradient with a few shapes), a 2 s
16 kHz linear chirp and an 8-frame 64 x 64 clip of a square moving across a dark background.
:func:`run_demo` runs :func:`mmcore.model.default_model` on them, times the stages and writes
PNG pictures of the attention weights and of the chirp's log-mel spectrogram.

Examples
--------
>>> from mmcore.demo import demo_inputs
>>> x = demo_inputs(batch=2)
>>> x["image"].shape, x["audio"].shape, x["video"].shape
((2, 480, 640, 3), (2, 32000), (2, 8, 64, 64, 3))
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List

import numpy as np

__all__ = ["DEMO_TEXT", "synthetic_image", "tone_sweep", "moving_square_video", "demo_inputs",
           "run_demo", "format_report"]

DEMO_TEXT = "a red circle and a blue square on a gradient"
SAMPLE_RATE = 16000


def synthetic_image(height: int = 480, width: int = 640, *, seed: int = 0) -> np.ndarray:
    """uint8 (height, width, 3): a diagonal colour gradient with a disc, a box and a stripe."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 40 + 160 * x + 0 * y
    img[..., 1] = 60 + 140 * y + 0 * x
    img[..., 2] = 200 - 120 * (0.5 * x + 0.5 * y)
    yy, xx = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.2, 0.4) * width
    r = 0.18 * min(height, width)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (220, 30, 40)            # red disc
    top, left = int(0.25 * height), int(0.6 * width)
    img[top:top + height // 3, left:left + width // 4] = (30, 60, 220)       # blue box
    img[np.abs((yy - 0.85 * height) - 0.3 * (xx - 0.5 * width)) < 6] = (250, 250, 250)
    img += rng.normal(0.0, 3.0, img.shape).astype(np.float32)               # a little grain
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def tone_sweep(seconds: float = 2.0, *, sr: int = SAMPLE_RATE, f0: float = 200.0,
               f1: float = 4000.0, amplitude: float = 0.5) -> np.ndarray:
    """float32 (seconds * sr,): a linear chirp from ``f0`` to ``f1`` Hz with 10 ms fades."""
    n = int(round(seconds * sr))
    t = np.arange(n, dtype=np.float64) / sr
    phase = 2.0 * np.pi * (f0 * t + 0.5 * (f1 - f0) / seconds * t * t)
    x = amplitude * np.sin(phase)
    fade = min(n // 2, int(0.01 * sr))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        x[:fade] *= ramp
        x[n - fade:] *= ramp[::-1]
    return x.astype(np.float32)


def moving_square_video(frames: int = 8, size: int = 64, *, square: int = 16) -> np.ndarray:
    """uint8 (frames, size, size, 3): a yellow square moving diagonally over a dark background."""
    clip = np.full((frames, size, size, 3), 24, np.uint8)
    travel = size - square
    for i in range(frames):
        p = int(round(travel * i / max(frames - 1, 1)))
        clip[i, p:p + square, p:p + square] = (240, 200, 40)
    return clip


def demo_inputs(batch: int = 1, *, seed: int = 0) -> Dict[str, Any]:
    """Raw inputs for all four modalities of the default model, batch ``batch``."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    text = [DEMO_TEXT if i == 0 else f"{DEMO_TEXT} (variant {i})" for i in range(batch)]
    image = np.stack([synthetic_image(seed=seed + i) for i in range(batch)])
    audio = np.stack([tone_sweep(f1=4000.0 - 250.0 * (i % 8)) for i in range(batch)])
    video = np.stack([moving_square_video()] * batch)
    return {"text": text, "image": image, "audio": audio, "video": video}


# ----------------------------------------------------------------------------------------------


def _byte_labels(text: str, n: int) -> List[str]:
    """Labels for the first ``n`` tokens of ``text`` under the byte tokenizer (plus eos):
    ``"3: c"``, with a space shown as ``"␣"``."""
    data = text.encode("utf-8")
    labels = []
    for i in range(n):
        if i < len(data):
            ch = chr(data[i]) if 32 < data[i] < 127 else ("␣" if data[i] == 32 else "?")
        else:
            ch = "</s>" if i == len(data) else "<pad>"
        labels.append(f"{i}: {ch}")
    return labels


def _model_view(image: np.ndarray, size: int) -> np.ndarray:
    """The part of ``image`` that the CLIP-style preprocessing keeps (shortest edge resized to
    ``size``, then the centre ``size`` x ``size`` crop), at the image's own resolution."""
    H, W = image.shape[:2]
    rh, rw = (int(size * H / W), size) if W <= H else (size, int(size * W / H))
    top, left = (rh - size) // 2, (rw - size) // 2
    y0, y1 = round(top * H / rh), round((top + size) * H / rh)
    x0, x1 = round(left * W / rw), round((left + size) * W / rw)
    return image[y0:y1, x0:x1]


def _summary(key: str, w: np.ndarray, full_shape: Any, summaries: Dict[str, Any]) -> None:
    from . import viz

    s = viz.attention_summary(w)
    summaries[key] = {"shape": list(full_shape),
                      "mean_normalized_entropy": s["mean_normalized_entropy"],
                      "max_weight": s["max_weight"]}


def _weights_pictures(weights: Dict[Any, np.ndarray], text: str, image: np.ndarray,
                      image_size: int, out_dir: str, figures: bool) -> Dict[str, Any]:
    """Write the cross-attention and fusion pooling weights of batch item 0.

    With ``figures`` (matplotlib installed) as labelled figures, otherwise as plain pixel maps.
    """
    from . import viz

    files: List[str] = []
    summaries: Dict[str, Any] = {}
    n_text = len(text.encode("utf-8")) + 1              # bytes and eos; the rest is padding
    pooling: Dict[str, np.ndarray] = {}
    for key, w in weights.items():
        w = np.asarray(w, np.float64)
        if isinstance(key, tuple) and len(key) == 2:
            q, c = (str(k) for k in key)
            m = w[0][:n_text] if q == "text" else w[0]      # (L_q, L_c)
            qlabels = _byte_labels(text, m.shape[0]) if q == "text" else None
            path = os.path.join(out_dir, f"attention_{q}_to_{c}.png")
            title = f"cross-attention {q} → {c} (mean over heads)"
            if figures:
                shown = _model_view(image, image_size) if c == "image" else None
                viz.attention_overlay_figure(m, shown, query_labels=qlabels, path=path,
                                             title=title, query_name=f"{q} token",
                                             key_name=f"{c} patch" if c == "image" else
                                             f"{c} token")
            else:                        # Pillow's default font: ASCII only
                plain = ([s.split(": ", 1)[1].replace("\u2423", "_") for s in qlabels]
                         if qlabels else None)
                viz.attention_heatmap(m, query_labels=plain, cell=12, path=path,
                                      title=title.replace("\u2192", "->"))
            files.append(path)
            _summary(f"{q}->{c}", m, w.shape, summaries)
        else:
            row = w.reshape(w.shape[0], -1)[0]
            pooling[str(key)] = row[:n_text] if str(key) == "text" else row
            summaries[f"pool:{key}"] = {"shape": list(w.shape),
                                        "max_weight": float(row.max()) if row.size else 0.0}
    if pooling:
        path = os.path.join(out_dir, "fusion_weights.png")
        if figures:
            viz.fusion_weights_figure(pooling, path=path)
        else:
            grid = np.zeros((len(pooling), max(v.size for v in pooling.values())))
            for i, v in enumerate(pooling.values()):
                grid[i, :v.size] = v
            viz.attention_heatmap(grid, query_labels=list(pooling), cell=12, path=path,
                                  title="fusion pooling: one softmax over all tokens (rows: "
                                        "modalities, padded with 0)")
        files.append(path)
    return {"files": files, "summaries": summaries}


def run_demo(out_dir: str = "mmcore-demo", *, batch: int = 1, seed: int = 0, warmup: int = 2,
             repeat: int = 10) -> Dict[str, Any]:
    """Run the default model on synthetic inputs, time it and write pictures into ``out_dir``.

    Returns a JSON-ready dict: ``stages`` (per stage ``p50_ms``, ``p95_ms``, ``mean_ms`` over
    ``repeat`` timed calls), ``shapes`` (``fused``, ``pooled`` and ``embeddings`` per modality),
    ``attention`` (a few numbers per weight map), ``files`` (the PNGs written) and the settings.
    """
    from . import viz
    from .model import default_model
    from .ops import log_mel_spectrogram

    t_start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    model = default_model(seed=seed)
    inputs = demo_inputs(batch, seed=seed)
    out = None
    for _ in range(max(warmup, 0)):
        out = model.infer(inputs, return_weights=True)
    model.reset_stats()
    for _ in range(max(repeat, 1)):
        out = model.infer(inputs, return_weights=True)
    assert out is not None  # the timed loop runs at least once
    snap = model.stats()
    order = ([k for k in snap if k.startswith("preprocess:")]
             + [k for k in snap if k.startswith("encode:")]
             + [k for k in snap if not k.startswith(("preprocess:", "encode:"))
                and k != "total"] + (["total"] if "total" in snap else []))
    stages = {k: {"p50_ms": snap[k]["p50_s"] * 1e3, "p95_ms": snap[k]["p95_s"] * 1e3,
                  "mean_ms": snap[k]["mean_s"] * 1e3} for k in order}

    figures = viz.matplotlib_available()
    image_size = int(getattr(model.config.modalities["image"].preprocessing, "size", 64) or 64)
    pics = _weights_pictures(out.attention_weights or {}, inputs["text"][0], inputs["image"][0],
                             image_size, out_dir, figures)
    mel = log_mel_spectrogram(inputs["audio"][0], n_mels=80)
    mel_path = os.path.join(out_dir, "mel_spectrogram.png")
    if figures:
        viz.spectrogram_figure(mel, sample_rate=SAMPLE_RATE, hop_length=160, path=mel_path,
                               title="log-mel spectrogram of the demo audio: a 200 → 4000 Hz "
                                     "linear chirp over 2 s",
                               value_label="log-mel (Whisper scaling)")
    else:
        viz.spectrogram_image(mel, path=mel_path, height=160)
    files = pics["files"] + [mel_path]

    return {
        "batch": batch,
        "seed": seed,
        "warmup": warmup,
        "repeat": repeat,
        "inputs": {"text": inputs["text"][0], "image": list(inputs["image"].shape),
                   "audio": list(inputs["audio"].shape), "audio_sr": SAMPLE_RATE,
                   "video": list(inputs["video"].shape)},
        "stages": stages,
        "shapes": {"fused": list(out.fused.shape),
                   "pooled": {str(m): list(v.shape) for m, v in out.pooled.items()},
                   "embeddings": {str(m): list(v.shape) for m, v in out.embeddings.items()}},
        "mel_spectrogram": list(mel.shape),
        "attention": pics["summaries"],
        "files": [os.path.abspath(f) for f in files],
        "pictures": "figures" if figures else "plain",
        "pictures_note": None if figures else (
            "matplotlib is not installed: the PNGs are plain pixel maps without axes or "
            f"labels; labelled figures need the viz extra: {viz.VIZ_EXTRA}"),
        "out_dir": os.path.abspath(out_dir),
        "wall_s": time.perf_counter() - t_start,
    }


def format_report(rep: Dict[str, Any]) -> str:
    """The human-readable form of :func:`run_demo`'s result."""
    lines = [f"mmcore demo: default_model(seed={rep['seed']}), batch {rep['batch']}, "
             f"{rep['warmup']} warm-up + {rep['repeat']} timed infer(return_weights=True) calls",
             f"  inputs: text {rep['inputs']['text']!r}; "
             f"image uint8 {tuple(rep['inputs']['image'])}; "
             f"audio chirp {tuple(rep['inputs']['audio'])} at {rep['inputs']['audio_sr']} Hz; "
             f"video uint8 {tuple(rep['inputs']['video'])}",
             ""]
    w = max(len(k) for k in rep["stages"]) if rep["stages"] else 5
    lines.append(f"  {'stage':<{w}}  {'p50 ms':>9}  {'p95 ms':>9}")
    lines.append(f"  {'-' * w}  {'-' * 9}  {'-' * 9}")
    for k, v in rep["stages"].items():
        lines.append(f"  {k:<{w}}  {v['p50_ms']:>9.3f}  {v['p95_ms']:>9.3f}")
    lines.append("")
    sh = rep["shapes"]
    lines.append(f"  {'output':<16}  shape")
    lines.append(f"  {'fused':<16}  {tuple(sh['fused'])}")
    for m, s in sh["pooled"].items():
        emb = sh["embeddings"].get(m)
        extra = f"   (tokens {tuple(emb)})" if emb else ""
        lines.append(f"  {'pooled:' + m:<16}  {tuple(s)}{extra}")
    if rep["attention"]:
        lines.append("")
        for k, s in rep["attention"].items():
            ent = s.get("mean_normalized_entropy")
            ent_s = f", normalized entropy {ent:.3f}" if ent is not None else ""
            lines.append(f"  weights {k:<14} {tuple(s['shape'])}, max {s['max_weight']:.3f}{ent_s}")
    lines.append("")
    kind = "figures" if rep.get("pictures", "figures") == "figures" else "plain pixel maps"
    lines.append(f"  wrote {len(rep['files'])} PNG {kind} to {rep['out_dir']}:")
    for f in rep["files"]:
        lines.append(f"    {os.path.basename(f)}")
    if rep.get("pictures_note"):
        lines.append(f"  note: {rep['pictures_note']}")
    lines.append(f"  done in {rep['wall_s']:.2f} s")
    return "\n".join(lines)
