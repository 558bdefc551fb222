"""The ``mmcore`` command line.

``mmcore info`` prints the version, the backends (ISA level of the native kernels, threads,
CUDA devices or why there are none, numba) and runs a small attention self-check against NumPy.

``mmcore demo`` runs the default model end to end on generated text, image, audio and video,
prints per-stage latencies and output shapes, and writes attention heatmaps and a mel
spectrogram as PNG files (see :mod:`mmcore.demo`).

``mmcore run`` runs a saved model (``--model DIR``) or the default model on files given on the
command line (each of ``--text``, ``--image``, ``--audio``, ``--video`` may be repeated: item i
of every option is example i of one batch); ``mmcore init-model DIR`` saves the default model
to a directory (one that is not empty only with ``--force``). ``mmcore --version`` prints the
version.

``mmcore features {audio,image,video} INPUTS... -o OUT.safetensors`` preprocesses many files
into one safetensors file, skipping and listing the files it cannot read (exit status 1 when
there are any; see :mod:`mmcore.features`).

Examples
--------
>>> from mmcore.cli import main
>>> main(["info", "--json"]) == 0  # doctest: +ELLIPSIS
{...
True
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import List, Optional

import numpy as np

from . import __version__
from ._backend import backends, set_num_threads


def _self_check() -> float:
    """Max abs difference between ops.attention and a NumPy float64 softmax attention."""
    from .ops import attention

    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4, 7, 32), dtype=np.float32)
    k = rng.standard_normal((2, 4, 19, 32), dtype=np.float32)
    v = rng.standard_normal((2, 4, 19, 24), dtype=np.float32)
    out = attention(q, k, v)
    s = q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2) / np.sqrt(32)
    e = np.exp(s - s.max(-1, keepdims=True))
    ref = (e / e.sum(-1, keepdims=True)) @ v.astype(np.float64)
    return float(np.abs(out - ref).max())


def _info(args) -> int:
    if args.threads is not None:
        set_num_threads(args.threads)
    info = {
        "version": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "backends": backends(),
    }
    err = _self_check()
    info["attention_self_check_max_abs_err"] = err
    ok = err < 1e-4
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0 if ok else 1
    nat, cuda, nb = info["backends"]["native"], info["backends"]["cuda"], info["backends"]["numba"]
    print(f"mmcore {__version__} (Python {info['python']}, NumPy {info['numpy']}, "
          f"{info['machine']})")
    print(f"  native : ISA {nat['isa']} (compiled: {', '.join(nat['compiled_isas'])}; "
          f"CPU: {', '.join(nat['cpu_features']) or 'no AVX'}), threads {nat['threads']}")
    if cuda["available"]:
        devs = "; ".join(f"{d.get('index')}: {d.get('name')} (sm {d.get('compute_capability')})"
                         for d in cuda["devices"])
        print(f"  cuda   : available, devices {devs}")
    else:
        print(f"  cuda   : absent ({cuda.get('reason')})")
    if nb["available"]:
        print(f"  numba  : available (numba {nb['version']})")
    else:
        print(f"  numba  : absent ({nb.get('reason')})")
    print(f"  attention self-check vs NumPy float64: max abs err {err:.2e} "
          f"({'ok' if ok else 'FAILED'})")
    return 0 if ok else 1


def _fail(message: str, code: int = 1) -> int:
    print(f"mmcore: error: {message}", file=sys.stderr)
    return code


def _demo(args) -> int:
    from .demo import format_report, run_demo

    if args.threads is not None:
        set_num_threads(args.threads)
    rep = run_demo(args.out, batch=args.batch, seed=args.seed, warmup=args.warmup,
                   repeat=args.repeat)
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
    else:
        print(format_report(rep))
    return 0


def _load_model(model_dir: Optional[str], seed: int):
    """``MultiModalModel.from_pretrained(model_dir)`` or ``default_model(seed)``."""
    from .model import MultiModalModel, default_model

    if model_dir is None:
        return default_model(seed=seed)
    loader = getattr(MultiModalModel, "from_pretrained", None)
    if loader is None:
        raise _CliError("this mmcore version cannot load saved models "
                        "(MultiModalModel.from_pretrained is not available); omit --model to "
                        "run the built-in default model")
    if not os.path.isdir(model_dir):
        raise _CliError(f"--model {model_dir!r} is not a directory")
    return loader(model_dir)


class _CliError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""


def _vector_stats(x: np.ndarray) -> dict:
    x64 = np.asarray(x, np.float64)
    return {"shape": list(x.shape), "mean": float(x64.mean()), "std": float(x64.std()),
            "min": float(x64.min()), "max": float(x64.max()),
            "l2_norm_per_row": [float(v) for v in np.linalg.norm(x64.reshape(x.shape[0], -1),
                                                                  axis=1)],
            "finite": bool(np.isfinite(x64).all())}


def _truncation_notes(model, inputs: dict) -> List[str]:
    """What of ``inputs`` the model will cut (text beyond its token limit, audio beyond its
    length limit), one line each naming the input, its length and the limit; the model cuts
    silently, so ``mmcore run`` says so on stderr. Inputs that cannot be measured (a file
    that does not decode) are left to :meth:`~mmcore.model.MultiModalModel.infer` to report."""

    notes: List[str] = []
    mods = model.config.modalities
    for text in inputs.get("text") or []:
        notes += _text_note(model, mods, text)
    for path in inputs.get("audio") or []:
        notes += _audio_note(mods, path)
    return notes


def _text_note(model, mods, text: str) -> List[str]:
    from .modality import Modality

    notes: List[str] = []
    m = Modality("text")
    if m in mods and mods[m].enabled:
        pre = model.preprocessors.get(m)
        limit = getattr(pre, "max_length", None)
        if limit is not None and getattr(pre, "truncation", False):
            try:
                n = len(pre.tokenizer.encode(text, add_eos=pre.add_eos, max_length=None))
            except Exception:       # the model reports what it cannot tokenize
                n = 0
            if n > limit:
                notes.append(f"--text has {n} tokens ({len(text)} characters), more than the "
                             f"model's text limit of {limit} tokens (max_length={limit}): it "
                             f"is cut to its first {limit} tokens")
    return notes


def _audio_note(mods, path: str) -> List[str]:
    from .modality import Modality

    notes: List[str] = []
    m = Modality("audio")
    if m in mods and mods[m].enabled and mods[m].preprocessing:
        pc = mods[m].preprocessing
        limits = []
        if pc.truncation and pc.max_samples is not None:
            limits.append((pc.max_samples, f"max_length_s={pc.max_length_s:g}"))
        if pc.truncation and pc.padding == "max_length" and pc.target_length is not None:
            src = ("chunk_length_s" if pc.chunk_length_s is not None else "max_length_s")
            limits.append((pc.target_length, f"{src}={getattr(pc, src):g}"))
        if limits:
            limit, why = min(limits)
            try:
                import soundfile
                info = soundfile.info(path)     # the header only (a regular file, checked)
                frames, rate = int(info.frames), int(info.samplerate)
            except Exception:       # the model reports what it cannot decode
                frames, rate = 0, 0
            if rate > 0 and frames * pc.sample_rate / rate > limit:
                notes.append(f"--audio {path!r} lasts {frames / rate:.2f} s, longer than the "
                             f"model's audio limit of {limit / pc.sample_rate:.2f} s ({why}): "
                             f"only its first {limit / pc.sample_rate:.2f} s are used")
    return notes


def _run(args) -> int:
    from ._files import check_regular
    from .errors import MMCoreError

    inputs: dict = {}
    if args.text is not None:
        inputs["text"] = list(args.text)
    for name in ("image", "audio", "video"):
        paths = getattr(args, name)
        if paths is None:
            continue
        for path in paths:
            if not os.path.exists(path):
                return _fail(f"--{name} {path!r}: no such file")
            try:                    # a directory, FIFO or device: refused without blocking
                check_regular(path, what="file", error=MMCoreError, op=f"--{name}")
            except MMCoreError as exc:
                return _fail(str(exc))
        inputs[name] = [os.fspath(p) for p in paths]
    counts = {name: len(v) for name, v in inputs.items()}
    if len(set(counts.values())) > 1:
        given = ", ".join(f"{n} --{name}" for name, n in counts.items())
        return _fail(f"each input option makes one batch, so they must be repeated the same "
                     f"number of times (item i of every option is one example); got {given}")
    if args.threads is not None:
        set_num_threads(args.threads)
    try:
        model = _load_model(args.model, args.seed)
        for note in _truncation_notes(model, inputs):
            print(f"mmcore run: note: {note}", file=sys.stderr)
        out = model.infer(inputs)
    except _CliError as exc:
        return _fail(str(exc))
    except (MMCoreError, OSError, ImportError) as exc:
        return _fail(f"{type(exc).__name__}: {exc}")
    stats = _vector_stats(out.fused)
    model_desc = "model " + args.model if args.model else "default_model(seed=%d)" % args.seed
    print(f"mmcore run: {model_desc}, inputs: {', '.join(inputs)} "
          f"(batch {out.fused.shape[0]})")
    print(f"  fused  {tuple(out.fused.shape)}  mean {stats['mean']:+.4f}  std {stats['std']:.4f}  "
          f"min {stats['min']:+.4f}  max {stats['max']:+.4f}  "
          f"L2 {', '.join(f'{v:.4f}' for v in stats['l2_norm_per_row'])}")
    head = ", ".join(f"{v:+.4f}" for v in out.fused[0, :6])
    print(f"  fused[0, :6] = [{head}{', ...' if out.fused.shape[1] > 6 else ''}]")
    for m, v in out.pooled.items():
        emb = out.embeddings.get(m)
        toks = f"  tokens {tuple(emb.shape)}" if emb is not None else ""
        print(f"  pooled:{str(m):<8} {tuple(v.shape)}{toks}")
    print("  stages (ms): " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in out.stats.items()))
    if args.json:
        doc = {"fused": out.fused.tolist(),
               "pooled": {str(m): v.tolist() for m, v in out.pooled.items()},
               "stats": dict(out.stats),
               "fused_stats": stats}
        with open(args.json, "w") as f:
            json.dump(doc, f)
        print(f"  wrote {args.json}")
    return 0


def _init_model(args) -> int:
    from .model import default_model

    target = args.dir
    if os.path.exists(target) and not os.path.isdir(target):
        return _fail(f"{target!r} exists and is not a directory")
    if os.path.isdir(target) and os.listdir(target) and not args.force:
        return _fail(f"{target!r} is not empty; pass --force to replace the model directory "
                     "there (a directory holding anything but a model is never replaced)")
    model = default_model(seed=args.seed)
    save = getattr(model, "save", None)
    if save is None:
        return _fail("this mmcore version cannot save models (MultiModalModel.save is not "
                     "available)")
    try:
        save(args.dir)
    except Exception as exc:
        return _fail(f"saving to {args.dir!r} failed: {type(exc).__name__}: {exc}")
    print(f"wrote default_model(seed={args.seed}) to {args.dir}")
    return 0


def _features(args) -> int:
    from .errors import ConfigError, ModalityError, ModelFormatError
    from .features import extract_features

    changes = {}
    if args.preset is not None:
        changes["preset"] = None if args.preset.lower() == "none" else args.preset
    for opt, field in (("size", "size"), ("num_frames", "num_frames"), ("n_mels", "n_mels")):
        value = getattr(args, opt)
        if value is not None:
            changes[field] = value
    if args.threads is not None:
        set_num_threads(args.threads)
    try:
        rep = extract_features(args.modality, args.inputs, args.output, model=args.model,
                               preprocessing=changes or None, batch_size=args.batch_size,
                               progress=not args.quiet)
    except (ConfigError, ModalityError, ModelFormatError) as exc:
        return _fail(str(exc), 2)
    except (OSError, ImportError) as exc:
        return _fail(f"{type(exc).__name__}: {exc}")
    print(f"mmcore features: wrote {rep.num_ok} {args.modality} tensor(s) to {rep.output} "
          f"({rep.seconds:.2f} s)")
    if rep.failed:
        print(f"mmcore features: {rep.num_failed} of {len(args.inputs)} file(s) failed:",
              file=sys.stderr)
        for path, reason in rep.failed:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def _node(args) -> int:
    import logging

    from .distributed.node import run_node
    from .errors import ConfigError, ModalityError, ModelFormatError
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    if args.threads is not None:
        set_num_threads(args.threads)
    try:
        return run_node(args.model, args.modality, host=args.host, port=args.port,
                        token_file=args.token_file, certfile=args.certfile,
                        keyfile=args.keyfile, drain_timeout_s=args.drain_timeout,
                        max_inflight_bytes=args.max_inflight_bytes)
    except (ConfigError, ModalityError, ModelFormatError, OSError) as exc:
        print(f"mmcore node: {exc}", file=sys.stderr)
        return 2


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``mmcore`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="mmcore", description="mmcore command line")
    parser.add_argument("--version", action="version", version=f"mmcore {__version__}")
    sub = parser.add_subparsers(dest="command")
    p_info = sub.add_parser("info", help="version, backends, ISA, threads, CUDA devices")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_info.add_argument("--threads", type=int, default=None,
                        help="thread count for the native kernels")

    p_demo = sub.add_parser("demo", help="run the default model on generated inputs, print "
                                         "timings and write pictures")
    p_demo.add_argument("--out", default="mmcore-demo",
                        help="folder for the PNG files (default: %(default)s)")
    p_demo.add_argument("--batch", type=_positive_int, default=1, help="batch size (default: 1)")
    p_demo.add_argument("--seed", type=int, default=0, help="model seed (default: 0)")
    p_demo.add_argument("--repeat", type=_positive_int, default=10,
                        help="timed calls after the warm-up (default: %(default)s)")
    p_demo.add_argument("--warmup", type=int, default=2, help="warm-up calls (default: 2)")
    p_demo.add_argument("--threads", type=_positive_int, default=None,
                        help="thread count for the native kernels")
    p_demo.add_argument("--json", action="store_true", help="print machine-readable JSON")

    p_run = sub.add_parser("run", help="run a model on a text, image, audio and/or video file")
    p_run.add_argument("--model", default=None, metavar="DIR",
                       help="a saved model directory (default: the built-in default model)")
    p_run.add_argument("--text", action="append", default=None,
                       help="input text (repeat for a batch)")
    p_run.add_argument("--image", action="append", default=None, metavar="PATH",
                       help="image file (repeat for a batch)")
    p_run.add_argument("--audio", action="append", default=None, metavar="PATH",
                       help="audio file (repeat for a batch)")
    p_run.add_argument("--video", action="append", default=None, metavar="PATH",
                       help="video file, needs the 'video' extra (repeat for a batch)")
    p_run.add_argument("--seed", type=int, default=0, help="seed of the default model")
    p_run.add_argument("--threads", type=_positive_int, default=None,
                       help="thread count for the native kernels")
    p_run.add_argument("--json", default=None, metavar="OUT.json",
                       help="also write fused, pooled and stats as JSON")

    p_init = sub.add_parser("init-model", help="save the default model to a directory")
    p_init.add_argument("dir", metavar="DIR")
    p_init.add_argument("--seed", type=int, default=0, help="model seed (default: 0)")
    p_init.add_argument("--force", action="store_true",
                        help="replace the model directory already at DIR")

    p_feat = sub.add_parser("features", help="preprocess many audio, image or video files into "
                                             "one safetensors file")
    p_feat.add_argument("modality", choices=["audio", "image", "video"])
    p_feat.add_argument("inputs", nargs="+", metavar="INPUT", help="input files")
    p_feat.add_argument("-o", "--output", required=True, metavar="OUT.safetensors",
                        help="the safetensors file to write")
    p_feat.add_argument("--model", default=None, metavar="DIR",
                        help="use the preprocessing of a saved model (default: the default "
                             "model's)")
    p_feat.add_argument("--preset", default=None,
                        help="preprocessing preset (audio: whisper, fbank, none; image/video: "
                             "clip, siglip, imagenet, none)")
    p_feat.add_argument("--size", type=_positive_int, default=None,
                        help="image/video output resolution")
    p_feat.add_argument("--num-frames", type=_positive_int, default=None,
                        help="video frames sampled per file")
    p_feat.add_argument("--n-mels", type=_positive_int, default=None, help="audio mel bands")
    p_feat.add_argument("--batch-size", type=_positive_int, default=16,
                        help="files per batch (default: %(default)s)")
    p_feat.add_argument("--threads", type=_positive_int, default=None,
                        help="thread count for the native kernels")
    p_feat.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p_node = sub.add_parser("node", help="serve some modalities of a model directory to a "
                                         "coordinator (see mmcore.distributed)")
    p_node.add_argument("--model", required=True, metavar="DIR", help="the model directory")
    p_node.add_argument("--modality", action="append", required=True,
                        help="a modality to serve (repeat for several)")
    p_node.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s)")
    p_node.add_argument("--port", type=int, default=0, help="port (default: 0, a free one)")
    p_node.add_argument("--token-file", default=None, metavar="F",
                        help="file holding the cluster token (default: $MMCORE_CLUSTER_TOKEN)")
    p_node.add_argument("--certfile", default=None, help="TLS certificate chain (PEM)")
    p_node.add_argument("--keyfile", default=None, help="TLS private key (PEM)")
    p_node.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds to finish requests in flight on SIGTERM")
    p_node.add_argument("--max-inflight-bytes", type=_positive_int, default=2 << 30,
                        metavar="N", help="bytes of request frames held at once, node-wide "
                                          "(default: %(default)s); a request beyond it gets "
                                          "an error")
    p_node.add_argument("--threads", type=_positive_int, default=None,
                        help="thread count for the native kernels")
    p_node.add_argument("--log-level", default="WARNING", help="logging level")

    args = parser.parse_args(argv)
    if args.command == "node":
        return _node(args)
    if args.command == "info":
        return _info(args)
    if args.command == "demo":
        return _demo(args)
    if args.command == "run":
        if args.text is None and args.image is None and args.audio is None and args.video is None:
            p_run.error("give at least one input: --text, --image, --audio or --video")
        return _run(args)
    if args.command == "init-model":
        return _init_model(args)
    if args.command == "features":
        return _features(args)
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
