"""ONNX Runtime anchors for the benchmark scripts in ``bench/``: sessions and small graphs.

``load()``
    ``(onnx, onnxruntime)`` if both are installed, else ``(None, None)`` and a reason.
``session(model, threads)``
    A CPU ``InferenceSession`` with ``intra_op_num_threads = threads`` and
    ``inter_op_num_threads = 1`` (the same thread count mmcore and torch get), full graph
    optimizations, and no spin-waiting of its threads between runs.
``mha_model(...)`` / ``attention23_model(...)``
    One-node graphs: the ``com.microsoft.MultiHeadAttention`` contrib op over (B, L, H*D)
    inputs, and the ONNX opset-23 ``Attention`` op over (B, H, L, D) inputs.
``encoder_model(layers, ...)``
    A pre-norm transformer encoder stack built by hand from MatMul / Add / LayerNormalization
    / Softmax / Erf nodes (the fallback when ``torch.onnx.export`` is unavailable).
``gemm_to_matmul(model)`` / ``quantize_dynamic(model, per_channel)``
    ``quantize_dynamic`` (weights QInt8, activations dynamic uint8) leaves ``Gemm`` nodes in
    float32, so ``Gemm(transB=1)`` with constant weights is first rewritten as MatMul + Add:
    every linear layer is then quantized, as in mmcore's ``precision="int8"``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["load", "session", "mha_model", "attention23_model", "encoder_model",
           "gemm_to_matmul", "quantize_dynamic", "to_blh", "from_blh", "first_line", "optional"]


def load() -> Tuple[Any, Any, str]:
    """``(onnx, onnxruntime, reason)``: the modules, or None each and why."""
    try:
        import onnx
        import onnxruntime
    except Exception as exc:  # ImportError, or a broken install raising something else
        return None, None, f"{type(exc).__name__}: {exc}"
    return onnx, onnxruntime, ""


def session(model, threads: int):
    """A CPU session of ``model`` (ModelProto or serialized bytes) on ``threads`` intra-op
    threads and one inter-op thread, with all graph optimizations."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # ORT's pool spins after each run by default; in interleaved rounds on few cores the spinning
    # threads take the CPUs from whichever library is timed next (measured: mmcore 77x577
    # attention 1.9 ms alone, 5.0 ms right after a spinning session, 1.8 ms after a passive one)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    data = model if isinstance(model, (bytes, bytearray)) else model.SerializeToString()
    return ort.InferenceSession(bytes(data), so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# attention graphs

def to_blh(a: np.ndarray) -> np.ndarray:
    """(B, H, L, D) -> contiguous (B, L, H*D), the layout of MultiHeadAttention."""
    B, H, L, D = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1, 3).reshape(B, L, H * D))


def from_blh(a: np.ndarray, H: int) -> np.ndarray:
    """(B, L, H*D) -> (B, H, L, D) (a view)."""
    B, L, HD = a.shape
    return a.reshape(B, L, H, HD // H).transpose(0, 2, 1, 3)


def _qkv_inputs(shapes: Sequence[Sequence[int]]):
    from onnx import TensorProto, helper

    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s))
            for n, s in zip("qkv", shapes)]


def mha_model(B: int, H: int, Lq: int, Lk: int, D: int):
    """``com.microsoft.MultiHeadAttention(query, key, value, num_heads=H)`` over (B, L, H*D)
    float32 inputs named q, k, v; output ``o`` (B, Lq, H*D); scale the default 1/sqrt(D)."""
    from onnx import TensorProto, helper

    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"],
                            domain="com.microsoft", num_heads=H)
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [B, Lq, H * D])
    graph = helper.make_graph([node], "mha", _qkv_inputs([(B, Lq, H * D), (B, Lk, H * D),
                                                          (B, Lk, H * D)]), [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def attention23_model(B: int, H: int, Lq: int, Lk: int, D: int):
    """The ONNX opset-23 ``Attention(Q, K, V)`` over (B, H, L, D) float32 inputs named q, k, v;
    output ``o`` (B, H, Lq, D); scale the default 1/sqrt(D)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Attention", ["q", "k", "v"], ["o"])
    out = helper.make_tensor_value_info("o", TensorProto.FLOAT, [B, H, Lq, D])
    graph = helper.make_graph([node], "attention23", _qkv_inputs([(B, H, Lq, D), (B, H, Lk, D),
                                                                  (B, H, Lk, D)]), [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model


# --------------------------------------------------------------------------------------------
# a hand-built encoder stack

def encoder_model(layers: Sequence[Dict[str, np.ndarray]], *, num_heads: int,
                  eps: float = 1e-5):
    """A stack of pre-norm encoder layers (``nn.TransformerEncoderLayer(norm_first=True,
    batch_first=True, activation="gelu")``) over input ``x`` (B, L, E), output ``y``.

    ``layers`` holds per layer the arrays of mmcore.ops.encoder_layer's keywords
    (``in_proj_weight`` (3E, E), ..., ``norm2_bias`` (E,)). Linear weights are stored
    transposed, (in, out), for MatMul; exact GELU as ``0.5 x (1 + erf(x / sqrt 2))``.
    """
    from onnx import TensorProto, helper, numpy_helper

    E = int(layers[0]["in_proj_weight"].shape[1])
    H = num_heads
    D = E // H
    nodes: List[Any] = []
    inits: List[Any] = []

    def const(name: str, a) -> str:
        inits.append(numpy_helper.from_array(np.asarray(a), name))
        return name

    def node(op: str, ins: Sequence[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, list(ins), [out], **attrs))
        return out

    heads = const("heads_shape", np.array([0, 0, H, D], np.int64))
    merged = const("merged_shape", np.array([0, 0, E], np.int64))
    split = const("qkv_split", np.array([E, E, E], np.int64))
    scale = const("scale", np.array(1.0 / math.sqrt(D), np.float32))
    half = const("half", np.array(0.5, np.float32))
    one = const("one", np.array(1.0, np.float32))
    rsqrt2 = const("rsqrt2", np.array(1.0 / math.sqrt(2.0), np.float32))

    x = "x"
    for i, p in enumerate(layers):
        pre = f"l{i}_"

        def w(name: str, pre: str = pre, p: Dict[str, np.ndarray] = p) -> str:
            return const(pre + name, np.ascontiguousarray(p[name].T, dtype=np.float32))

        def b(name: str, pre: str = pre, p: Dict[str, np.ndarray] = p) -> str:
            return const(pre + name, np.asarray(p[name], np.float32))

        def linear(inp: str, wn: str, bn: str, out: str) -> str:
            return node("Add", [node("MatMul", [inp, w(wn)], out + "_mm"), b(bn)], out)

        h = node("LayerNormalization", [x, b("norm1_weight"), b("norm1_bias")], pre + "ln1",
                 axis=-1, epsilon=eps)
        qkv = linear(h, "in_proj_weight", "in_proj_bias", pre + "qkv")
        nodes.append(helper.make_node("Split", [qkv, split], [pre + "q", pre + "k", pre + "v"],
                                      axis=-1))
        q, k, v = (node("Reshape", [pre + n, heads], pre + n + "_h") for n in "qkv")
        q = node("Transpose", [q], pre + "qt", perm=[0, 2, 1, 3])
        k = node("Transpose", [k], pre + "kt", perm=[0, 2, 3, 1])
        v = node("Transpose", [v], pre + "vt", perm=[0, 2, 1, 3])
        s = node("Mul", [node("MatMul", [q, k], pre + "qk"), scale], pre + "s")
        a = node("MatMul", [node("Softmax", [s], pre + "p", axis=-1), v], pre + "pv")
        a = node("Reshape", [node("Transpose", [a], pre + "pvt", perm=[0, 2, 1, 3]), merged],
                 pre + "attn")
        y = node("Add", [x, linear(a, "out_proj_weight", "out_proj_bias", pre + "o")],
                 pre + "y1")
        h = node("LayerNormalization", [y, b("norm2_weight"), b("norm2_bias")], pre + "ln2",
                 axis=-1, epsilon=eps)
        f = linear(h, "linear1_weight", "linear1_bias", pre + "f1")
        g = node("Add", [node("Erf", [node("Mul", [f, rsqrt2], pre + "fs")], pre + "erf"), one],
                 pre + "erf1")
        g = node("Mul", [node("Mul", [f, half], pre + "fh"), g], pre + "gelu")
        x = node("Add", [y, linear(g, "linear2_weight", "linear2_bias", pre + "f2")],
                 pre + "out")
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "L", E])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "L", E])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 8)
    return model


# --------------------------------------------------------------------------------------------
# dynamic quantization

def gemm_to_matmul(model) -> int:
    """Rewrite, in place, every ``Gemm(A, B[, C])`` with ``transA = 0``, ``alpha = beta = 1``
    and a constant B as ``MatMul(A, B or B^T) [+ C]``; returns how many were rewritten."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes = []
    count = 0
    for n in g.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            new_nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        if attrs.get("transB", 0):
            w = np.ascontiguousarray(w.T)
        wname = n.input[1] + "_matmul"
        g.initializer.append(numpy_helper.from_array(w, wname))
        out = n.output[0]
        has_c = len(n.input) > 2 and n.input[2] != ""
        mm_out = out + "_mm" if has_c else out
        new_nodes.append(helper.make_node("MatMul", [n.input[0], wname], [mm_out],
                                          name=(n.name or out) + "_matmul"))
        if has_c:
            new_nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [out],
                                              name=(n.name or out) + "_add"))
        count += 1
    if count:
        del g.node[:]
        g.node.extend(new_nodes)
        used = {i for node in g.node for i in node.input}
        keep = [t for t in g.initializer if t.name in used]
        del g.initializer[:]
        g.initializer.extend(keep)
    return count


def quantize_dynamic(model, *, per_channel: bool) -> Tuple[bytes, Dict[str, int]]:
    """``onnxruntime.quantization.quantize_dynamic`` of ``model`` (weights QInt8, per output
    channel if ``per_channel``); returns the serialized model and its op counts."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as qd

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)   # "consider pre-processing before quantization"
    try:
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "model.onnx"), os.path.join(d, "model.int8.onnx")
            onnx.save(model, src)
            qd(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel)
            with open(dst, "rb") as f:
                data = f.read()
    finally:
        root.setLevel(level)
    counts: Dict[str, int] = {}
    for n in onnx.load_from_string(data).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return data, counts


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` of an exception on one line, cut to ``limit`` characters."""
    msg = " ".join(str(exc).split())
    s = f"{type(exc).__name__}: {msg}"
    return s if len(s) <= limit else s[:limit - 3] + "..."


def optional(fn, *args, **kwargs) -> Tuple[Optional[Any], str]:
    """``(fn(*args, **kwargs), "")``, or ``(None, reason)`` when it raises."""
    try:
        return fn(*args, **kwargs), ""
    except Exception as exc:
        return None, first_line(exc)
