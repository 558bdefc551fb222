"""End-to-end latency of ``MultiModalModel.infer`` per stage, and a ViT-S encoder vs ORT / torch.

The model is :func:`mmcore.model.default_model` (untrained, all four modalities, text -> image
cross-attention and attention fusion), with its per-item cache off so that every call runs
every stage (``bench/bench_cache.py`` measures the cache). The inputs are generated (see
:mod:`mmcore.demo`): a caption, a 480 x 640 RGB image, a 2 s 16 kHz chirp and an 8-frame
64 x 64 clip per batch item. For batch 1 and batch 8 the script measures two variants:

* ``raw``: the raw inputs, so ``infer`` runs the preprocessors (tokenizer, image resize /
  crop / normalize, log-mel, frame sampling) and then the encoders and the fusion;
* ``pre``: the same inputs preprocessed once up front (the dicts the preprocessors return),
  so ``infer`` only encodes and fuses.

It prints, per variant, the p50 of every stage reported by ``model.stats()``
(``preprocess:<m>``, ``encode:<m>``, ``fusion``, ``total``), the median wall time of the whole
call measured from outside, and where the time goes: one more series of calls runs under
``cProfile`` and each function's own time is attributed to

* ``kernels``: the native functions of ``mmcore._C`` (and ``mmcore._cuda``);
* ``ops``: the Python wrappers in ``mmcore/ops`` and backend dispatch (argument checks,
  dtype / layout conversion);
* ``numpy``: NumPy functions and methods called as functions;
* ``glue``: everything else -- the model, layers, encoders and preprocessors in Python,
  including NumPy arithmetic written as operators inside them (``x @ w``, ``x * s``), which the
  profiler cannot separate from the calling function.

The profiler adds overhead to every Python call, so the ``glue`` share is an upper bound and
the ``kernels`` share a lower bound; the per-stage times come from unprofiled calls.

A second section times a ViT-S encoder (embed 384, 6 heads, 6 layers, MLP 1536, exact GELU,
pre-norm, sequence 197, batch 1 and 8) with random weights (fixed seed, N(0, 0.02)):

* mmcore: a stack of :func:`mmcore.ops.encoder_layer` calls in float32, with
  ``precision="int8"`` and ``"bf16"`` when the op takes that option, and with bfloat16 /
  float16 :class:`~mmcore.ops.linear.QuantizedTensor` weights (ratios against float32);
* torch: ``nn.TransformerEncoder(norm_first=True, batch_first=True, activation="gelu")`` in
  eval mode holding the same weights;
* ONNX Runtime float32: that module exported with ``torch.onnx.export(dynamo=False)`` (a
  hand-built graph of the same ops when the exporter is unavailable), checked against mmcore
  before timing; ONNX Runtime int8: the same model through
  ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights, per channel), after rewriting
  its ``Gemm`` nodes as MatMul + Add so that every linear layer is quantized;
* the GFLOP/s of mmcore float32 as a % of the GEMM ceiling, and an error table (max abs and
  relative RMS error against a float64 evaluation of the same weights and inputs).

Every column that cannot run prints ``n/a`` with its reason.

Usage::

    python bench/bench_model.py [--quick] [--threads N] [--backend native|numba]
                                [--sections all|model|vit]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import inspect
import os
import pstats
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Set

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _ort  # noqa: E402
import _timing as T  # noqa: E402

try:
    import mmcore  # noqa: E402
    from mmcore import preprocess as P  # noqa: E402
    from mmcore.demo import demo_inputs  # noqa: E402
    from mmcore.model import default_model  # noqa: E402
    from mmcore.ops import encoder_layer  # noqa: E402
    from mmcore.ops.linear import QuantizedTensor  # noqa: E402
except ImportError as _exc:  # pragma: no cover - not installed
    raise SystemExit(f"mmcore is not importable ({_exc}); build and install it first: "
                     "pip install --no-build-isolation -Cbuild-dir=build -e .") from _exc

BATCHES = (1, 8)
VARIANTS = ("raw", "pre")  # with preprocessing / preprocessed up front
SEED = 0
_OPS_DIR = os.path.join(os.path.dirname(os.path.abspath(mmcore.__file__)), "ops") + os.sep
_BACKEND_FILE = os.path.join(os.path.dirname(os.path.abspath(mmcore.__file__)), "_backend.py")
CATEGORIES = ("kernels", "ops", "numpy", "glue")


def preprocess_inputs(model, raw: Dict[str, object]) -> Dict[str, dict]:
    """Run each modality's preprocessor (built from the model's config) once."""
    out = {}
    for name, value in raw.items():
        pre = model.config.modalities[mmcore.Modality(name)].preprocessing
        if name == "text":
            proc = P.TextPreprocessor.from_config(pre)
        elif name == "image":
            proc = P.ImagePreprocessor(pre)
        elif name == "audio":
            proc = P.AudioPreprocessor(pre)
        else:
            proc = P.VideoPreprocessor(pre.replace(patch_size=None)
                                       if pre.patch_size is not None else pre)
        if name == "video":       # one clip per call; same frame count, so a plain stack
            out[name] = {"pixel_values": np.stack([proc(c)["pixel_values"] for c in value])}
        else:
            out[name] = dict(proc(value))
    return out


def categorize(key) -> str:
    filename, _, func = key
    if filename == "~":
        if "mmcore._C." in func or "mmcore._cuda." in func:
            return "kernels"
        if "numpy" in func:
            return "numpy"
        return "glue"
    if filename.startswith(_OPS_DIR) or filename == _BACKEND_FILE:
        return "ops"
    if os.sep + "numpy" + os.sep in filename:
        return "numpy"
    return "glue"


def profile_shares(fn, calls: int) -> Dict[str, float]:
    """Seconds of own time per category over ``calls`` profiled calls of ``fn``."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    shares = dict.fromkeys(CATEGORIES, 0.0)
    for key, (_cc, _nc, tottime, _ct, _callers) in pstats.Stats(prof).stats.items():
        shares[categorize(key)] += tottime
    return shares


class Result(NamedTuple):
    batch: int
    variant: str
    stages: Dict[str, float]      # stage -> p50 seconds
    wall: T.Timing
    shares: Dict[str, float]      # category -> seconds (profiled)


def run_batch(batch: int, args, tkw, profile_calls: int) -> List[Result]:
    """Both variants of one batch size, timed interleaved (raw, pre, raw, pre, ...)."""
    raw = demo_inputs(batch, seed=SEED)
    models, calls = {}, {}
    for variant in VARIANTS:
        # every call computes (the cache is measured by bench_cache.py); one model per variant
        # keeps each variant's per-stage statistics apart
        model = default_model(seed=SEED, cache=False, embed_dim=args.embed_dim,
                              num_layers=args.layers, num_heads=args.heads)
        inputs = raw if variant == "raw" else preprocess_inputs(model, raw)
        models[variant] = model
        calls[variant] = functools.partial(model.infer, inputs)
    with mmcore.use_backend(args.backend):
        for variant in VARIANTS:
            for _ in range(tkw["warmup"]):
                calls[variant]()
            models[variant].reset_stats()
        walls = T.interleaved(calls, **dict(tkw, warmup=0))
        results = []
        for variant in VARIANTS:
            snap = models[variant].stats()
            shares = profile_shares(calls[variant], profile_calls)
            stages = {k: v["p50_s"] for k, v in snap.items()}
            results.append(Result(batch, variant, stages, walls[variant], shares))
    return results


def stage_order(results: List[Result]) -> List[str]:
    keys: List[str] = []
    for r in results:
        for k in r.stages:
            if k not in keys:
                keys.append(k)
    pre = [k for k in keys if k.startswith("preprocess:")]
    enc = [k for k in keys if k.startswith("encode:")]
    rest = [k for k in keys if k not in pre and k not in enc and k != "total"]
    return pre + enc + rest + (["total"] if "total" in keys else [])



# --------------------------------------------------------------------------------------------
# ViT-S encoder: mmcore.ops.encoder_layer stack vs ONNX Runtime (fp32, int8) and torch

class ViT(NamedTuple):
    embed: int = 384
    heads: int = 6
    layers: int = 6
    mlp: int = 1536
    seq: int = 197

    def flops(self, batch: int) -> float:
        """Multiply-adds x 2 of the four linears and the two attention products."""
        E, F, L = self.embed, self.mlp, self.seq
        per_layer = L * 2.0 * (4 * E * E + 2 * E * F) + 4.0 * L * L * E
        return batch * self.layers * per_layer


VIT = ViT()
VIT_BATCHES = (1, 8)
VIT_ATOL = 1e-3     # ORT fp32 against mmcore fp32 (outputs ~ N(0, 1)): a working stack is ~1e-5
WEIGHT_KEYS = ("in_proj_weight", "out_proj_weight", "linear1_weight", "linear2_weight")

# column keys
MM32, MM32P, ORT32, TH32, MM8, MM8RAW, ORT8, MMBF, MMBFW, MMF16W = (
    "mm_fp32", "mm_fp32_packed", "ort_fp32", "torch_fp32", "mm_int8", "mm_int8_raw", "ort_int8",
    "mm_bf16", "mm_bf16_w", "mm_f16_w")
VIT_LABELS = {MM32: "mmcore fp32", MM32P: "mmcore fp32 packed", ORT32: "ORT fp32",
              TH32: "torch fp32", MM8: "mmcore int8", MM8RAW: "mmcore int8 unpacked",
              ORT8: "ORT int8", MMBF: "mmcore bf16", MMBFW: "mmcore bf16 weights",
              MMF16W: "mmcore f16 weights"}


def vit_weights(cfg: ViT, seed: int) -> List[Dict[str, np.ndarray]]:
    """Random float32 weights scaled like trained ones: N(0, 0.02) weights and biases,
    layer-norm weights 1 + N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    E, F = cfg.embed, cfg.mlp

    def w(*shape: int, std: float = 0.02, mean: float = 0.0) -> np.ndarray:
        return (mean + std * rng.standard_normal(shape)).astype(np.float32)

    return [dict(in_proj_weight=w(3 * E, E), in_proj_bias=w(3 * E),
                 out_proj_weight=w(E, E), out_proj_bias=w(E),
                 linear1_weight=w(F, E), linear1_bias=w(F),
                 linear2_weight=w(E, F), linear2_bias=w(E),
                 norm1_weight=w(E, std=0.1, mean=1.0), norm1_bias=w(E),
                 norm2_weight=w(E, std=0.1, mean=1.0), norm2_bias=w(E))
            for _ in range(cfg.layers)]


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def encoder_f64(x: np.ndarray, layers: List[Dict[str, np.ndarray]], num_heads: int,
                eps: float = 1e-5) -> np.ndarray:
    """The encoder stack in float64 NumPy (the error reference), from the float32 weights."""
    try:
        from scipy.special import erf
    except ImportError:
        import math
        erf = np.vectorize(math.erf, otypes=[np.float64])

    def ln(v, g, b):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + eps) * g + b

    y = x.astype(np.float64)
    B, L, E = y.shape
    H, D = num_heads, E // num_heads
    for p32 in layers:
        p = {k: v.astype(np.float64) for k, v in p32.items()}
        h = ln(y, p["norm1_weight"], p["norm1_bias"])
        qkv = h @ p["in_proj_weight"].T + p["in_proj_bias"]
        q, k, v = (qkv[..., i * E:(i + 1) * E].reshape(B, L, H, D).transpose(0, 2, 1, 3)
                   for i in range(3))
        s = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(D)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(B, L, E)
        y = y + a @ p["out_proj_weight"].T + p["out_proj_bias"]
        h = ln(y, p["norm2_weight"], p["norm2_bias"])
        f = h @ p["linear1_weight"].T + p["linear1_bias"]
        f = 0.5 * f * (1.0 + erf(f / np.sqrt(2.0)))
        y = y + f @ p["linear2_weight"].T + p["linear2_bias"]
    return y


def torch_encoder(torch, cfg: ViT, layers: List[Dict[str, np.ndarray]]):
    """``nn.TransformerEncoder`` (pre-norm, batch first, exact GELU, eval) holding ``layers``."""
    nn = torch.nn
    layer = nn.TransformerEncoderLayer(cfg.embed, cfg.heads, cfg.mlp, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
    enc = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False).eval()
    with torch.no_grad():
        for mod, p in zip(enc.layers, layers):
            for name, t in (("self_attn.in_proj_weight", "in_proj_weight"),
                            ("self_attn.in_proj_bias", "in_proj_bias"),
                            ("self_attn.out_proj.weight", "out_proj_weight"),
                            ("self_attn.out_proj.bias", "out_proj_bias"),
                            ("linear1.weight", "linear1_weight"), ("linear1.bias", "linear1_bias"),
                            ("linear2.weight", "linear2_weight"), ("linear2.bias", "linear2_bias"),
                            ("norm1.weight", "norm1_weight"), ("norm1.bias", "norm1_bias"),
                            ("norm2.weight", "norm2_weight"), ("norm2.bias", "norm2_bias")):
                mod.get_parameter(name).copy_(torch.from_numpy(p[t]))
    return enc


def onnx_encoder(torch, enc, cfg: ViT, layers: List[Dict[str, np.ndarray]]):
    """(ModelProto, how): ``torch.onnx.export`` of ``enc`` (TorchScript exporter, dynamic
    batch), or the same stack built by hand when the exporter (or torch) is unavailable."""
    import io

    import onnx

    why = "torch is not installed"
    if torch is not None and enc is not None:
        buf = io.BytesIO()
        x = torch.zeros(1, cfg.seq, cfg.embed)
        try:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(enc, (x,), buf, dynamo=False, opset_version=17,
                                  input_names=["x"], output_names=["y"],
                                  dynamic_axes={"x": {0: "B"}, "y": {0: "B"}})
            return (onnx.load_from_string(buf.getvalue()),
                    "torch.onnx.export(dynamo=False), opset 17")
        except Exception as exc:
            why = _ort.first_line(exc)
            if "onnxscript" in why:
                why = f"the exporter needs onnxscript, which is not installed ({why})"
    return (_ort.encoder_model(layers, num_heads=cfg.heads),
            f"hand-built MatMul/Add/LayerNormalization/Softmax/Erf graph (export failed: {why})")


def precision_reason() -> str:
    """Empty when ``mmcore.ops.encoder_layer`` takes ``precision=``, else why not."""
    try:
        params = inspect.signature(encoder_layer).parameters
    except (TypeError, ValueError) as exc:
        return f"signature unavailable ({exc})"
    if "precision" not in params:
        return "mmcore.ops.encoder_layer has no precision= option in this build"
    return ""


class VitRow(NamedTuple):
    batch: int
    times: Dict[str, Optional[T.Timing]]


def run_vit(args, torch, quick: bool, ceil_gemm: float) -> int:
    """The ViT-S section: timing tables, error table; returns 1 if ORT fp32 disagrees."""
    cfg = VIT
    onnx, ort, ort_reason = _ort.load()
    layers = vit_weights(cfg, SEED)
    prec = precision_reason()
    why: Dict[str, str] = {}
    backend = args.backend

    def stack(weights: List[Dict[str, Any]], **kw) -> Callable[[np.ndarray], np.ndarray]:
        def run(x: np.ndarray) -> np.ndarray:
            for p in weights:
                x = encoder_layer(x, num_heads=cfg.heads, activation="gelu", backend=backend,
                                  **p, **kw)
            return x
        return run

    def cast_weights(kind: str) -> List[Dict[str, Any]]:
        out = []
        for p in layers:
            q = dict(p)
            for k in WEIGHT_KEYS:
                bits = bf16_bits(p[k]) if kind == "bfloat16" else p[k].astype(np.float16)
                # read-only, as a model keeps its quantized weights: packed once, then cached
                bits.flags.writeable = False
                q[k] = QuantizedTensor(bits, kind)
            out.append(q)
        return out

    # "highest" named explicitly where the option exists, so a process-wide default cannot leak in
    exact: Dict[str, Any] = {} if prec else {"precision": "highest"}
    runners: Dict[str, Callable[[np.ndarray], Any]] = {MM32: stack(layers, **exact)}
    probe = np.random.default_rng(SEED + 1).standard_normal((1, cfg.seq, cfg.embed)).astype(
        np.float32)
    for key, fn in ((MMBFW, lambda: stack(cast_weights("bfloat16"), **exact)),
                    (MMF16W, lambda: stack(cast_weights("float16"), **exact))):
        r, err = _ort.optional(fn)
        if r is not None:
            _, err = _ort.optional(r, probe)
        if err:
            why[key] = err
        else:
            runners[key] = r
    # packed weights (mmcore.ops.pack_weight: packed once here, as ORT packs its initializers
    # when a session is made); without it int8 / bf16 take the float32 arrays
    pack = getattr(mmcore.ops, "pack_weight", None)
    packed_keys: Set[str] = set()

    def packed_layers(p: str) -> List[Dict[str, Any]]:
        return [dict(d, **{k: pack(d[k], precision=p) for k in WEIGHT_KEYS}) for d in layers]

    for key, p, want_pack in ((MM32P, "highest", True), (MM8, "int8", True),
                              (MMBF, "bf16", True), (MM8RAW, "int8", False)):
        if prec and key != MM32P:
            why[key] = prec
            continue
        if pack is None:
            if key == MM32P:
                why[key] = "mmcore.ops has no pack_weight in this build"
                continue
            if key == MM8RAW:
                why[key] = "no pack_weight: mmcore int8 takes the float32 arrays already"
                continue
            want_pack = False
        weights: Optional[List[Dict[str, Any]]] = layers
        if want_pack:
            weights, err = _ort.optional(packed_layers, p)
            if weights is None:
                why[key] = f"pack_weight failed: {err}"
                continue
        r = stack(weights, **({} if prec else {"precision": p}))
        _, err = _ort.optional(r, probe)
        if err:
            why[key] = err
            continue
        runners[key] = r
        if want_pack:
            packed_keys.add(key)

    # torch, ONNX export, ORT fp32 and int8 sessions
    enc = None
    if torch is None:
        why[TH32] = "torch is not installed"
    else:
        enc, err = _ort.optional(torch_encoder, torch, cfg, layers)
        if enc is None:
            why[TH32] = err
        else:
            def run_torch(x: np.ndarray, enc=enc):
                with torch.inference_mode():
                    return enc(torch.from_numpy(x)).numpy()

            runners[TH32] = run_torch
    how = quant_how = ""
    built, err = (None, f"onnxruntime unavailable ({ort_reason})") if ort is None else \
        _ort.optional(onnx_encoder, torch, enc, cfg, layers)
    if built is None:
        why[ORT32] = why[ORT8] = err
    else:
        model, how = built
        sess, err = _ort.optional(_ort.session, model, args.threads)
        if sess is not None:
            runners[ORT32] = lambda x, s=sess: s.run(None, {"x": x})[0]
        else:
            why[ORT32] = err
        rewritten, err = _ort.optional(_ort.gemm_to_matmul, model)
        if err:
            quant_how = f"Gemm -> MatMul+Add rewrite failed ({err}); "
        qmodel = None
        for per_channel in (True, False):
            res, err = _ort.optional(_ort.quantize_dynamic, model, per_channel=per_channel)
            if res is not None:
                qmodel, counts = res
                quant_how += (f"quantize_dynamic(weight_type=QInt8, per_channel={per_channel}): "
                             f"{counts.get('MatMulInteger', 0)} MatMulInteger, "
                             f"{counts.get('DynamicQuantizeMatMul', 0)} DynamicQuantizeMatMul, "
                             f"{counts.get('MatMul', 0)} float MatMul (the attention products) "
                             f"after {rewritten or 0} Gemm -> MatMul+Add rewrites")
                break
            quant_how += f"per_channel={per_channel} failed: {err}; "
        if qmodel is None:
            why[ORT8] = quant_how
        else:
            sess, err = _ort.optional(_ort.session, qmodel, args.threads)
            if sess is not None:
                runners[ORT8] = lambda x, s=sess: s.run(None, {"x": x})[0]
            else:
                why[ORT8] = err
    print(f"ViT-S encoder: embed {cfg.embed}, {cfg.heads} heads, {cfg.layers} layers, MLP "
          f"{cfg.mlp}, exact GELU, pre-norm, sequence {cfg.seq}; weights N(0, 0.02), layer-norm "
          "weights 1 + N(0, 0.1), x ~ N(0, 1)")
    print(f"  mmcore : a stack of mmcore.ops.encoder_layer calls ({backend}); precision=: "
          + ("available" if not prec else f"n/a ({prec})") + "; weights packed once with "
          "mmcore.ops.pack_weight for: " + (", ".join(VIT_LABELS[k] for k in VIT_LABELS
                                                     if k in packed_keys) or "none"))
    print("  torch  : nn.TransformerEncoder(norm_first=True, batch_first=True, activation='gelu')"
          " in eval / inference_mode" if torch is not None else "  torch  : n/a")
    if ort is not None:
        print(f"  ORT    : onnxruntime {ort.__version__}, onnx {onnx.__version__}; "
              f"fp32 model: {how or why.get(ORT32)}")
        print(f"           int8 model: {quant_how or 'n/a'}")
    print()

    # verify before timing: ORT fp32 (and torch) against mmcore fp32
    failed = False
    x1 = probe
    ref32 = runners[MM32](x1)
    checks = []
    for key in (ORT32, TH32):
        if key in runners:
            d = float(np.max(np.abs(np.asarray(runners[key](x1), np.float64) - ref32)))
            bad = not d <= VIT_ATOL
            failed |= bad and key == ORT32
            checks.append(f"{VIT_LABELS[key]} {d:.2e}" + (" (!)" if bad else ""))
    print("  check before timing, max abs diff vs mmcore fp32 (batch 1): "
          + ("; ".join(checks) if checks else "n/a (no anchor)"))
    print()

    batches = VIT_BATCHES[:1] if quick else VIT_BATCHES
    rows: List[VitRow] = []
    rng = np.random.default_rng(SEED + 2)
    for batch in batches:
        x = rng.standard_normal((batch, cfg.seq, cfg.embed)).astype(np.float32)
        print(f"  measuring ViT-S batch {batch}: {', '.join(VIT_LABELS[k] for k in runners)}",
              file=sys.stderr, flush=True)
        fns = {k: functools.partial(fn, x) for k, fn in runners.items()}
        if quick:
            kw: Dict[str, Any] = dict(warmup=1, repeat=3, min_time=0.0)
        elif batch == 1:
            kw = dict(warmup=2, repeat=9, min_time=1.0, max_repeat=50)
        else:
            kw = dict(warmup=1, repeat=7, min_time=0.0)
        t = T.interleaved(fns, **kw)
        rows.append(VitRow(batch, {k: t.get(k) for k in VIT_LABELS}))

    notes: List[str] = []

    def cell(row: VitRow, key: str) -> str:
        t = row.times.get(key)
        if t is not None:
            return T.fmt(t.median * 1e3, ".2f")
        reason = why.get(key, "not measured")
        if reason not in notes:
            notes.append(reason)
        return f"n/a [{notes.index(reason) + 1}]"

    def ratio(a: Optional[T.Timing], b: Optional[T.Timing]) -> str:
        return (T.fmt(a.median / b.median, ".2f") + "x") if a is not None and b is not None \
            else "n/a"

    # mmcore's weights packed once, as ORT packs its initializers and the model's layers do
    main = MM32P if all(r.times.get(MM32P) is not None for r in rows) else MM32
    print("ViT-S encoder time per call (median ms); ratios anchor / mmcore (> 1: mmcore faster); "
          f"mmcore fp32 = {VIT_LABELS[main]!r}")
    headers = ["batch", "mmcore fp32", "GFLOP/s", "%GEMM", "ORT fp32", "ORT/mmcore",
               "torch fp32", "torch/mmcore", "mmcore int8", "ORT int8", "ORT/mmcore int8"]
    table = []
    for r in rows:
        t = r.times
        gf = cfg.flops(r.batch) / t[main].median / 1e9 if t[main] is not None else None
        table.append([r.batch, cell(r, main), T.fmt(gf, ".1f"),
                      T.fmt(None if gf is None else 100.0 * gf / ceil_gemm, ".1f"),
                      cell(r, ORT32), ratio(t[ORT32], t[main]), cell(r, TH32),
                      ratio(t[TH32], t[main]), cell(r, MM8), cell(r, ORT8),
                      ratio(t[ORT8], t[MM8])])
    T.print_table(headers, table)
    print()
    print("mmcore variants vs mmcore fp32 (median ms; ratio = fp32 ms / variant ms, > 1: variant "
          "faster)")
    variants = ((MM32P, "fp32 packed"), (MMBF, "bf16"), (MM8, "int8"), (MM8RAW, "int8 unpacked"),
                (MMBFW, "bf16 weights"), (MMF16W, "f16 weights"))
    headers = ["batch", "mmcore fp32"]
    for _, name in variants:
        headers += [name, "ratio"]
    table = []
    for r in rows:
        line = [r.batch, cell(r, MM32)]
        for key, _ in variants:
            line += [cell(r, key), ratio(r.times[MM32], r.times[key])]
        table.append(line)
    T.print_table(headers, table)
    for i, n in enumerate(notes):
        print(f"  [{i + 1}] {n}")
    print()
    print(f"GFLOP/s = {cfg.flops(1) / 1e9:.3f} GFLOP per item (2 x multiply-adds of the linears "
          "and both attention products) / median time; %GEMM against the numpy float32 GEMM "
          f"ceiling {ceil_gemm:.1f} GFLOP/s.")
    print("fp32 packed / bf16 / int8 = precision 'highest' / 'bf16' / 'int8' with weights packed "
          "once by mmcore.ops.pack_weight when it exists; int8 unpacked = the float32 arrays, "
          "quantized in every call;")
    print("bf16 / f16 weights = QuantizedTensor weights at precision 'highest'. ORT int8 = "
          "quantize_dynamic's model (weights quantized once, activations per call).")
    print()

    # errors against the float64 reference, same weights and inputs
    eb = batches[-1]
    x = np.random.default_rng(SEED + 3).standard_normal((eb, cfg.seq, cfg.embed)).astype(
        np.float32)
    ref = encoder_f64(x, layers, cfg.heads)
    rms_ref = float(np.sqrt(np.mean(ref ** 2)))
    print(f"errors vs the float64 evaluation of the same float32 weights and inputs (batch {eb}; "
          f"output RMS {rms_ref:.3f})")
    table = []
    for key in (MM32, MM32P, ORT32, TH32, MM8, MM8RAW, ORT8, MMBF, MMBFW, MMF16W):
        if key not in runners:
            table.append([VIT_LABELS[key], "n/a", "n/a"])
            continue
        e = np.asarray(runners[key](x), np.float64) - ref
        table.append([VIT_LABELS[key], f"{float(np.max(np.abs(e))):.3e}",
                      f"{float(np.sqrt(np.mean(e ** 2))) / rms_ref:.3e}"])
    T.print_table(["implementation", "max abs error", "relative RMS error"], table)
    print()
    if failed:
        print(f"  CORRECTNESS CHECK FAILED: ORT fp32 differs from mmcore fp32 by more than "
              f"{VIT_ATOL:g}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    T.add_common_args(parser)
    parser.add_argument("--embed-dim", type=int, default=64,
                        help="encoder width of the default model (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2,
                        help="encoder layers per modality (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4,
                        help="attention heads (default: %(default)s)")
    parser.add_argument("--sections", choices=("all", "model", "vit"), default="all",
                        help="model = the default model's per-stage latency, vit = the ViT-S "
                             "encoder against ONNX Runtime and torch (default: %(default)s)")
    args = parser.parse_args(argv)

    torch = T.optional_import("torch") if args.sections != "model" else None
    threads = T.configure_threads(args.threads, torch)
    if args.sections != "model":
        threads["onnxruntime"] = f"{args.threads} (intra-op, no spin-wait; inter-op 1)"
    tkw = (dict(warmup=2, repeat=5, min_time=0.0) if args.quick
           else dict(warmup=5, repeat=30, min_time=0.5, max_repeat=500))
    profile_calls = 3 if args.quick else 20
    extra = {}
    if args.sections != "vit":
        extra["timing"] = (f"p50 of >= {tkw['repeat']} calls after {tkw['warmup']} "
                           "warm-up(s), raw and pre interleaved per batch; "
                           f">= {tkw['min_time']} s per measurement; "
                           f"shares from {profile_calls} cProfile'd calls"
                           + (" (--quick)" if args.quick else ""))
        extra["inputs"] = ("text + uint8 480x640x3 image + 2 s 16 kHz chirp + "
                           "8x64x64x3 clip per item; raw = with preprocessing, "
                           "pre = preprocessed up front")
    if args.sections != "model":
        extra["ViT-S"] = ("median of >= "
                          + ("3 interleaved rounds after 1 warm-up (--quick: batch 1 only)"
                             if args.quick else
                             "9 interleaved rounds after 2 warm-ups and >= 1 s (batch 1), "
                             ">= 7 rounds after 1 warm-up (batch 8)")
                          + " of every column")
    title = {"all": f"MultiModalModel.infer on default_model (embed_dim {args.embed_dim}, "
                    f"{args.layers} layers, {args.heads} heads): per-stage latency; ViT-S "
                    "encoder vs ONNX Runtime and torch (CPU)",
             "model": f"MultiModalModel.infer on default_model (embed_dim {args.embed_dim}, "
                      f"{args.layers} layers, {args.heads} heads): per-stage latency "
                      "(float32, CPU)",
             "vit": "ViT-S encoder: mmcore.ops.encoder_layer vs ONNX Runtime and torch (CPU)"}
    T.print_header(title[args.sections], threads_info=threads, torch=torch,
                   backend=args.backend, extra=extra)
    ceil = T.machine_ceilings(repeat=3 if args.quick else 5)
    print()

    status = 0
    if args.sections != "vit":
        run_pipeline(args, tkw, profile_calls, ceil)
    if args.sections != "model":
        status = run_vit(args, torch, args.quick, ceil.gemm_gflops)
    T.print_footer()
    return status


def run_pipeline(args, tkw, profile_calls: int, ceil: T.Ceilings) -> None:
    """The default model's per-stage latency and where its time goes."""
    results: List[Result] = []
    for batch in BATCHES:
        print(f"  measuring batch {batch} {' and '.join(VARIANTS)}", file=sys.stderr, flush=True)
        results.extend(run_batch(batch, args, tkw, profile_calls))

    print("per-stage p50 (ms)")
    stages = stage_order(results)
    headers = ["stage"] + [f"B={r.batch} {r.variant}" for r in results]
    rows = [[s] + [T.fmt(r.stages[s] * 1e3 if s in r.stages else None, ".3f") for r in results]
            for s in stages]
    rows.append(["wall (outside)"] + [T.fmt(r.wall.median * 1e3, ".3f") for r in results])
    rows.append(["ms per item"] + [T.fmt(r.wall.median * 1e3 / r.batch, ".3f") for r in results])
    T.print_table(headers, rows)
    print()

    print("where the time goes (own time under cProfile, % of the profiled total)")
    headers = ["category"] + [f"B={r.batch} {r.variant}" for r in results]
    rows = []
    for c in CATEGORIES:
        rows.append([c] + [T.fmt(100.0 * r.shares[c] / max(sum(r.shares.values()), 1e-12), ".1f")
                           for r in results])
    rows.append(["kernels+ops"] + [T.fmt(100.0 * (r.shares["kernels"] + r.shares["ops"])
                                         / max(sum(r.shares.values()), 1e-12), ".1f")
                                   for r in results])
    T.print_table(headers, rows)
    print()
    print("kernels = mmcore._C native functions; ops = mmcore/ops Python wrappers and backend "
          "dispatch; numpy = NumPy functions;")
    print("glue = model / layers / preprocessors in Python, including NumPy operators inline "
          "(x @ w). Profiling inflates glue.")
    print()

    print("summary")
    for r in results:
        tot = sum(r.shares.values()) or 1e-12
        total_ms = r.stages.get('total', float('nan')) * 1e3
        print(f"  batch {r.batch} {r.variant}: total p50 {total_ms:.3f} ms "
              f"({r.wall.median * 1e3 / r.batch:.3f} ms/item); inside mmcore kernels "
              f"{100.0 * r.shares['kernels'] / tot:.1f}% (+ops wrappers "
              f"{100.0 * r.shares['ops'] / tot:.1f}%), Python glue and NumPy "
              f"{100.0 * (r.shares['glue'] + r.shares['numpy']) / tot:.1f}%")
    for r in results:
        if r.variant == "raw" and r.stages.get("total"):
            pre_s = sum(v for k, v in r.stages.items() if k.startswith("preprocess:"))
            print(f"  preprocessing share of the raw total at batch {r.batch}: "
                  f"{100.0 * pre_s / r.stages['total']:.1f}% (sum of per-stage p50s)")
    print(f"  machine: float32 GEMM {ceil.gemm_gflops:.1f} GFLOP/s")
    print()


if __name__ == "__main__":
    sys.exit(main())
