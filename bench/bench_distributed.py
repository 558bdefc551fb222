"""Benchmark of mmcore.distributed on loopback: framing throughput, request overhead, scaling.

1. Transfer: one frame of a float32 array (4 MB to 256 MB) sent with ``send_frame`` and
   received with ``recv_frame`` between two threads over a loopback TCP connection, in GB/s of
   payload, beside a plain ``sendall`` / ``recv_into`` of the same bytes (the loopback
   ceiling) and the machine's memory copy bandwidth. Target: >= 1 GB/s for large arrays.
2. Round trip: ``encode_modality`` of one request in this process vs the same request through
   a shard node (a subprocess on loopback, one node, warm connection): a short text (small
   arrays) and a 4 MB waveform (1 M float32 samples at 16 kHz, about 62 s of audio, whose
   features are small) and a 4 MB uint8 image. The overhead is remote minus local.
3. Scaling: requests per second of ``infer`` on a batch of 4 images + 4 audio clips through a
   LocalCluster with 1 and with 2 nodes per modality, 4 client threads, each node with one
   kernel thread; plus the same model in-process with one client thread for reference.

Run: ``python bench/bench_distributed.py [--quick]``
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402
import mmcore  # noqa: E402
import mmcore.distributed  # noqa: E402
from mmcore.distributed import LocalCluster  # noqa: E402
from mmcore.distributed.protocol import MsgType, recv_frame, send_frame  # noqa: E402
from mmcore.model import MultiModalModel, default_model  # noqa: E402

TRANSFER_TARGET_GBPS = 1.0


def _socket_pair():
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    srv.close()
    for s in (cli, conn):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(60)
    return cli, conn


def _transfer(nbytes: int, repeat: int):
    """(framed GB/s, raw GB/s) for one message of ``nbytes`` over loopback."""
    a = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    raw = memoryview(a).cast("B")
    sink = bytearray(nbytes)
    cli, conn = _socket_pair()
    try:
        def framed():
            t = threading.Thread(target=send_frame, args=(cli, MsgType.RESULT, {"id": 1}, [a]))
            t.start()
            f = recv_frame(conn)
            t.join()
            assert f.arrays[0].nbytes == nbytes

        def plain():
            t = threading.Thread(target=cli.sendall, args=(raw,))
            t.start()
            view = memoryview(sink)
            got = 0
            while got < nbytes:
                got += conn.recv_into(view[got:], nbytes - got)
            t.join()

        t = T.interleaved({"framed": framed, "plain": plain}, warmup=1, repeat=repeat)
        tf, tp = t["framed"], t["plain"]
    finally:
        cli.close()
        conn.close()
    return nbytes / tf.median / 1e9, nbytes / tp.median / 1e9


def bench_transfer(quick: bool, ceil) -> bool:
    print("\n1. transfer: one frame over loopback TCP (payload GB/s, median)")
    sizes = [4, 64] if quick else [4, 64, 256]
    rows, ok = [], True
    for mb in sizes:
        framed, plain = _transfer(mb << 20, 3 if quick else 7)
        rows.append([f"{mb} MB", T.fmt(framed), T.fmt(plain), f"{100 * framed / plain:.0f}%",
                     T.fmt(ceil.copy_gbps / 2)])
        if mb >= 64:
            ok = ok and framed >= TRANSFER_TARGET_GBPS
    T.print_table(["array", "framed GB/s", "raw socket GB/s*", "framed/raw",
                   "memcpy GB/s (one way)"], rows)
    print("   * plain sendall / recv_into of the same bytes into a buffer reused across runs")
    return ok


def bench_round_trip(model_dir: str, quick: bool) -> None:
    print("\n2. round trip of one request: in-process encode_modality vs one shard node "
          "(subprocess, loopback, warm connection)")
    rng = np.random.default_rng(1)
    cases = [("text", "short text", ["a photo of a cat"]),
             ("audio", "4 MB waveform", rng.standard_normal(1 << 20).astype(np.float32)),
             ("image", "4 MB uint8 image", rng.integers(0, 256, (1024, 1366, 3), np.uint8))]
    local = MultiModalModel.from_pretrained(model_dir)
    local.clear_cache()
    rows = []
    with LocalCluster(model_dir, {"text": 1, "audio": 1, "image": 1},
                      threads_per_node=T.default_threads()) as cluster:
        remote = mmcore.distributed.load(model_dir, cluster.config())
        try:
            coord = remote.distributed
            for mod, label, x in cases:
                enc = remote._remote[mmcore.Modality(mod)]

                # the timed functions bind this case's mod, x, enc and it (timed right here)
                def run_local(mod=mod, x=x):
                    local.clear_cache()
                    return local.encode_modality(mod, x)

                def health(mod=mod):
                    coord.check_health(coord.nodes[mmcore.Modality(mod)][0])

                # node-side cache: every remote call sends new bytes (made before timing)
                rep = 5 if quick else 15
                if isinstance(x, list):
                    fresh = [[f"{x[0]} {i}"] for i in range(rep + 4)]
                else:
                    fresh = []
                    for i in range(rep + 4):
                        y = x.copy()
                        y.reshape(-1)[0] = (i + 1) % 251
                        fresh.append(y)
                it = iter(fresh)

                def run_remote_fresh(enc=enc, it=it):
                    return enc.submit(next(it), is_raw=True, attention_mask=None).result()

                # exactly rep rounds (no min_time): run_remote_fresh has rep + 4 inputs
                t = T.interleaved({"local": run_local, "remote": run_remote_fresh,
                                   "health": health}, warmup=2, repeat=rep)
                tl, tr, th = t["local"], t["remote"], t["health"]
                rows.append([label, mod, T.fmt(tl.median * 1e3), T.fmt(tr.median * 1e3),
                             T.fmt((tr.median - tl.median) * 1e3),
                             T.fmt(th.median * 1e3, ".3f")])
        finally:
            remote.close()
    T.print_table(["request", "modality", "local ms", "remote ms", "overhead ms",
                   "health ping ms"], rows)
    print("   (local: cache cleared before each call; remote: a new input each call, so the "
          "node's cache never hits)")


def _throughput(model, batches, threads: int, seconds: float) -> float:
    stop = time.monotonic() + seconds
    count = [0]
    lock = threading.Lock()

    def worker(i):
        j = i
        while time.monotonic() < stop:
            b = batches[j % len(batches)]
            img = b["image"].copy()
            img.reshape(-1)[:4] = np.frombuffer(np.uint32(j).tobytes(), np.uint8)
            aud = b["audio"].copy()
            aud[:, 0] = np.float32(j) * np.float32(1e-6)
            model.infer({"image": img, "audio": aud})
            j += threads
            with lock:
                count[0] += 1

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return count[0] / (time.monotonic() - t0)


def bench_scaling(model_dir: str, quick: bool) -> None:
    print("\n3. throughput: infer of batch 4 (image + audio) through a LocalCluster, 4 client "
          "threads, 1 kernel thread per node; every batch is new (no cache hits anywhere)")
    rng = np.random.default_rng(2)
    batches = [{"image": rng.integers(0, 256, (4, 224, 224, 3), np.uint8),
                "audio": rng.standard_normal((4, 32000)).astype(np.float32)}
               for _ in range(64)]
    secs = 3.0 if quick else 8.0
    rows = []
    local = MultiModalModel.from_pretrained(model_dir)
    with mmcore.use_backend("native"):
        mmcore.set_num_threads(1)
        local.clear_cache()
        rps = _throughput(local, batches, 1, secs)
        rows.append(["in-process, 1 thread", "-", T.fmt(rps), "1.00x"])
        mmcore.set_num_threads(T.default_threads())
    base = rps
    for n in (1, 2):
        with LocalCluster(model_dir, {"image": n, "audio": n}, threads_per_node=1) as cluster:
            model = mmcore.distributed.load(model_dir, cluster.config())
            try:
                model.infer(batches[0])
                rps = _throughput(model, batches, 4, secs)
            finally:
                model.close()
        rows.append([f"LocalCluster {n} node(s)/modality", str(2 * n), T.fmt(rps),
                     f"{rps / base:.2f}x"])
    T.print_table(["setup", "node processes", "batches/s", "vs in-process"], rows)
    print(f"   ({T.default_threads()} usable CPUs on this machine)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = parser.parse_args(argv)
    T.print_header("mmcore.distributed: loopback transfer, request overhead, LocalCluster scaling")
    ceil = T.machine_ceilings()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        default_model(seed=0).save(model_dir)
        ok = bench_transfer(args.quick, ceil)
        bench_round_trip(model_dir, args.quick)
        bench_scaling(model_dir, args.quick)
    print(f"\ntarget: framed transfer >= {TRANSFER_TARGET_GBPS} GB/s for arrays >= 64 MB: "
          f"{'MET' if ok else 'NOT MET'}")
    T.print_footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
