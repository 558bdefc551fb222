"""The native kernel never materializes the (Lq x Lk) matrix when weights are not asked for."""

from __future__ import annotations

import resource

import numpy as np

from mmcore.ops import attention

from reference import attention_ref


def test_no_lq_by_lk_matrix_is_allocated():
    # Lq x Lk = 2**33 float32 would be 32 GiB, more than the machines this runs on have; the
    # call must stay within a small multiple of its inputs and outputs.
    rng = np.random.default_rng(0)
    Lq, Lk = 2 ** 16, 2 ** 17
    q = rng.standard_normal((1, 1, Lq, 1), dtype=np.float32)
    k = rng.standard_normal((1, 1, Lk, 1), dtype=np.float32)
    v = rng.standard_normal((1, 1, Lk, 2), dtype=np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out, lse = attention(q, k, v, return_lse=True)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 256, f"peak memory grew by {grown_mib:.0f} MiB"
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    rows = [0, 1, Lq // 2, Lq - 1]
    r_out, _, r_lse = attention_ref(q[:, :, rows], k, v)
    np.testing.assert_allclose(out[:, :, rows], r_out, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse[:, :, rows], r_lse, atol=1e-4, rtol=1e-5)
