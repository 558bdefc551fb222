"""The native kernel never materializes the (Lq x Lk) matrix when weights are not asked for.

The peak resident size (``ru_maxrss``) of a process only ever grows, so it says nothing about one
call once earlier tests have pushed it up: the call is measured in a fresh child process that
does nothing else (it imports numpy and mmcore, makes the inputs, then makes the call).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import numpy as np

from reference import attention_ref

# Lq x Lk = 2**33 float32 would be 32 GiB, more than the machines this runs on have. The inputs
# are 1.75 MiB and the outputs 0.75 MiB; the call may grow the peak by a small multiple of that
# (the kernel's per-thread scratch), far below even 1/256 of the full matrix (128 MiB).
LQ, LK = 2 ** 16, 2 ** 17
BOUND_MIB = 64

_CHILD = """
import json, resource, sys
import numpy as np
from mmcore.ops import attention

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

Lq, Lk, rows, path = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 1, Lq, 1), dtype=np.float32)
k = rng.standard_normal((1, 1, Lk, 1), dtype=np.float32)
v = rng.standard_normal((1, 1, Lk, 2), dtype=np.float32)
before = peak_kib()
out, lse = attention(q, k, v, return_lse=True)
grown = peak_kib() - before
np.savez(path, out=out[:, :, rows], lse=lse[:, :, rows])
print(json.dumps({"grown_mib": grown / 1024, "out_shape": list(out.shape),
                  "lse_shape": list(lse.shape),
                  "finite": bool(np.isfinite(out).all() and np.isfinite(lse).all())}))
"""


def _inputs():
    """The child's inputs, drawn the same way (same generator, seed and order)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, LQ, 1), dtype=np.float32)
    k = rng.standard_normal((1, 1, LK, 1), dtype=np.float32)
    v = rng.standard_normal((1, 1, LK, 2), dtype=np.float32)
    return q, k, v


def test_no_lq_by_lk_matrix_is_allocated(tmp_path):
    rows = [0, 1, LQ // 2, LQ - 1]
    path = str(tmp_path / "rows.npz")
    # The child runs outside the checkout so that it imports the installed package.
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([LQ, LK, rows, path])],
                          cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["grown_mib"] < BOUND_MIB, f"peak memory grew by {result['grown_mib']:.0f} MiB"
    assert result["out_shape"] == [1, 1, LQ, 2] and result["lse_shape"] == [1, 1, LQ]
    assert result["finite"]
    got = np.load(path)
    q, k, v = _inputs()
    r_out, _, r_lse = attention_ref(q[:, :, rows], k, v)
    np.testing.assert_allclose(got["out"], r_out, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(got["lse"], r_lse, atol=1e-4, rtol=1e-5)
