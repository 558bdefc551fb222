"""torch in, torch out: what handing mmcore's ops torch tensors costs.

For each op, the same data is passed as NumPy arrays and as CPU torch tensors sharing that
memory (``torch.from_numpy``); the two calls are timed interleaved and the table gives the
time per call, the difference (the wrapper's cost), and whether the tensors crossed without a
copy: the input's data pointer is the one the kernel read (checked through
``mmcore.ops._torch.from_torch``) and the returned tensor shares the result's memory.

    python bench/bench_torch_io.py [--threads N] [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np

import _timing as T


def cases(rng):
    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    yield "fuse mean 1x512 x2", "fuse", ([f32(1, 512), f32(1, 512)],), {"strategy": "mean"}
    yield "layer_norm 4x384", "layer_norm", (f32(4, 384), f32(384), f32(384)), {}
    yield "linear 197x384x1536", "linear", (f32(197, 384), f32(1536, 384), f32(1536)), {}
    yield "attention 1x8x77x577x64", "attention", (f32(1, 8, 77, 64), f32(1, 8, 577, 64),
                                                   f32(1, 8, 577, 64)), {}
    yield "log_mel 1 s", "log_mel_spectrogram", (f32(16000) * 0.1,), {}
    yield ("preprocess_image 480x640", "preprocess_image",
           (rng.integers(0, 256, (1, 480, 640, 3), dtype=np.uint8),), {})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    T.add_common_args(parser, backends=("native",))
    args = parser.parse_args(argv)
    torch = T.optional_import("torch")
    if torch is None:
        print("torch is not installed: nothing to measure")
        return 0
    from mmcore import ops
    from mmcore.ops._torch import from_torch

    threads = T.configure_threads(args.threads, torch)
    tkw = (dict(warmup=1, repeat=7, min_time=0.0) if args.quick
           else dict(warmup=3, repeat=15, min_time=0.5, max_repeat=2000))
    T.print_header("mmcore ops with NumPy arrays vs torch tensors (CPU)", threads_info=threads,
                   torch=torch, extra={"timing": f"median of >= {tkw['repeat']} interleaved "
                                                 "rounds (numpy, torch)"})
    T.machine_ceilings(repeat=3 if args.quick else 5)
    print()
    rng = np.random.default_rng(0)
    rows = []
    for label, name, np_args, kw in cases(rng):
        fn = getattr(ops, name)
        t_args = tuple([torch.from_numpy(v) for v in a] if isinstance(a, list)
                       else torch.from_numpy(a) for a in np_args)
        first = t_args[0][0] if isinstance(t_args[0], list) else t_args[0]
        np_first = np_args[0][0] if isinstance(np_args[0], list) else np_args[0]
        in_view = (from_torch(first, torch).__array_interface__["data"][0]
                   == np_first.__array_interface__["data"][0] == first.data_ptr())
        out_t = fn(*t_args, **kw)
        out_np = fn(*np_args, **kw)
        same = np.array_equal(out_t.numpy(), out_np)
        t = T.interleaved({"numpy": lambda f=fn, a=np_args, k=kw: f(*a, **k),
                           "torch": lambda f=fn, a=t_args, k=kw: f(*a, **k)}, **tkw)
        a, b = t["numpy"].median, t["torch"].median
        rows.append([label, T.fmt(a * 1e6, ".1f"), T.fmt(b * 1e6, ".1f"),
                     T.fmt((b - a) * 1e6, "+.2f"), f"{b / a:.3f}",
                     "yes" if in_view else "NO", type(out_t).__name__,
                     "equal" if same else "DIFFERENT"])
    print("time per call (median us); torch - numpy = the cost of the tensor wrapper")
    T.print_table(["op", "numpy us", "torch us", "torch - numpy", "ratio", "input not copied",
                   "returns", "result"], rows)
    print()
    print("input not copied: the array the kernel reads has the tensor's data pointer; the "
          "returned tensor is torch.from_numpy of the result (shares its memory)")
    T.print_footer()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
