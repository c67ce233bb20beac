"""The batch-1 kernels equal dense math: float32 accumulation within 1e-4 of the largest output (against
float64 math on the weights each layout holds), int8 x int8 bit for bit, over drawn shapes, block sizes,
patterns and sparsities, on the AVX-512 and the AVX2 N:M paths (the generic kernels: see the slow test
that compiles them for an AVX2-only CPU)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.compress.encodings import decode, encode_nm
from prunekit.quant.rounding import quantize_activation, quantize_int8
from prunekit.runtime import gemv_formats as fmt
from prunekit.runtime import gemv_kernels as K
from prunekit.runtime.cpu import features

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EMPTY = np.zeros(0, np.float32)
ISAS = [isa for isa, on in (("avx512", features().avx512), ("avx2", features().avx2)) if on]
VALUES = st.sampled_from(fmt.VALUE_TYPES)


def close(y: np.ndarray, ref: np.ndarray) -> bool:
    scale = max(np.abs(ref).max(), 1e-30) if ref.size else 1.0
    return y.shape == ref.shape and (
        np.abs(y.astype(np.float64) - ref).max() <= 1e-4 * scale if ref.size else True
    )


def reference(p: fmt.GemvWeight, x: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """float64 ``W x + b`` on the dense weight the layout represents."""
    y = p.effective.numpy().astype(np.float64) @ x.astype(np.float64)
    return y if bias is None else y + bias


def block_sparse(out: int, inn: int, rows: int, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    keep = torch.rand(-(-out // rows), inn, generator=g) >= sparsity
    return w * keep.repeat_interleave(rows, 0)[:out]


def n_of_m(out: int, inn: int, m: int, seed: int, fewer: bool = True) -> torch.Tensor:
    """At most m/2 non-zeros in every group of m inputs (some groups with fewer when ``fewer``)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g).reshape(-1, m)
    order = torch.rand(w.shape, generator=g).argsort(dim=1)
    w.scatter_(1, order[:, m // 2 :], 0.0)
    if fewer:
        w[torch.rand(w.shape, generator=g) < 0.1] = 0.0
    return w.reshape(out, inn)


def unstructured(out: int, inn: int, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g)
    w[torch.rand(out, inn, generator=g) < sparsity] = 0.0
    if out > 2:
        w[out // 2] = 0.0  # an empty row
    return w


def vector(inn: int, seed: int) -> np.ndarray:
    return torch.randn(inn, generator=torch.Generator().manual_seed(seed + 1)).numpy()


@SETTINGS
@given(
    out=st.integers(1, 40),
    inn=st.integers(1, 300),
    values=VALUES,
    seed=st.integers(0, 99),
    bias=st.booleans(),
)
def test_dense_kernel_equals_dense_math(out, inn, values, seed, bias):
    p = fmt.pack_dense(torch.randn(out, inn, generator=torch.Generator().manual_seed(seed)), values)
    x, b = vector(inn, seed), np.arange(out, dtype=np.float32) if bias else EMPTY
    y = np.full(p.rows, np.nan, np.float32)
    K.dense_gemv(p.arrays["w"], p.scale, x, b, y, 0, p.rows)
    assert close(y, reference(p, x, b if bias else None))


@SETTINGS
@given(
    out=st.integers(1, 70),
    inn=st.integers(1, 200),
    rows=st.sampled_from(fmt.BLOCK_ROWS),
    sparsity=st.sampled_from([0.0, 0.5, 0.7, 0.9, 1.0]),
    values=VALUES,
    seed=st.integers(0, 99),
)
def test_block_kernel_equals_dense_math(out, inn, rows, sparsity, values, seed):
    w = block_sparse(out, inn, rows, sparsity, seed)
    p = fmt.pack_block(w, rows, values)
    assert p.rows % rows == 0 and p.arrays["ptr"][-1] == p.arrays["idx"].size
    if values == "float32":  # every non-zero stored, in blocks that are not all zero
        assert int((p.arrays["vals"] != 0).sum()) == int((w != 0).sum())
    x = vector(inn, seed)
    bias = np.linspace(-1, 1, p.rows).astype(np.float32)
    y = np.full(p.rows, np.nan, np.float32)
    half = p.rows // rows // 2  # two calls, as two threads split a layer
    K.block_gemv(p.arrays["ptr"], p.arrays["idx"], p.arrays["vals"], p.scale, x, bias, y, rows, 0, half)
    K.block_gemv(
        p.arrays["ptr"], p.arrays["idx"], p.arrays["vals"], p.scale, x, bias, y, rows, half, p.rows // rows
    )
    assert close(y[:out], reference(p, x, bias[:out]))
    assert np.array_equal(y[out:], bias[out:])  # padding rows: zero weights


@pytest.mark.parametrize("isa", ISAS)
@SETTINGS
@given(
    groups=st.integers(1, 5),
    chunks=st.integers(1, 6),
    m=st.sampled_from(fmt.NM_PATTERNS),
    values=VALUES,
    seed=st.integers(0, 99),
    extra_rows=st.integers(0, 7),
)
def test_nm_kernel_equals_dense_math(isa, groups, chunks, m, values, seed, extra_rows):
    out, inn = groups * fmt.ROW_GROUP - (extra_rows if groups > 1 else 0), chunks * fmt.nm_chunk(isa)[1]
    w = n_of_m(out, inn, m, seed)
    p = fmt.pack_nm(w, m, isa, values)
    assert p.arrays["vals"].size == p.rows * inn // 2
    assert p.bytes_per_weight == pytest.approx(
        p.rows / out * (p.arrays["vals"].itemsize + fmt.nm_meta_bits(m) / 8) / 2 + p.scale.nbytes / w.numel()
    )
    x = vector(inn, seed)
    y = np.full(p.rows, np.nan, np.float32)
    kernel = K.nm_gemv_avx512 if isa == "avx512" else K.nm_gemv_avx2
    kernel(p.arrays["meta"], p.arrays["vals"], p.scale, x, EMPTY, y, m, 0, p.rows // fmt.ROW_GROUP)
    assert close(y[:out], reference(p, x))


def test_nm_slots_are_the_compressed_formats():
    """The kernel's 2:4 slots and values are the ones ``compress`` writes (positions, order, fill rule)."""
    w = n_of_m(8, 64, 4, seed=3)
    enc = encode_nm(w, 2, 4)
    p = fmt.pack_nm(w, 4, "avx2")
    slots, inputs = fmt.nm_chunk("avx2")
    vals = p.arrays["vals"].reshape(1, 64 // inputs, 8, slots).transpose(0, 2, 1, 3).reshape(8, 32)
    assert np.array_equal(vals.reshape(-1), enc.parts["values"].numpy())
    assert torch.equal(decode(enc, (8, 64), torch.float32), torch.from_numpy(p.effective.numpy()))


def test_nm_rejects_what_is_not_n_of_m():
    w = torch.ones(8, 32)
    with pytest.raises(Exception, match="not 2:4"):
        fmt.pack_nm(w, 4, "avx2")


@SETTINGS
@given(
    out=st.integers(1, 40),
    inn=st.integers(1, 300),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    values=VALUES,
    seed=st.integers(0, 99),
)
def test_csr4_kernel_equals_dense_math(out, inn, sparsity, values, seed):
    w = unstructured(out, inn, sparsity, seed)
    p = fmt.pack_csr4(w, values)
    counts = np.diff(p.arrays["ptr"])
    assert (counts % 4 == 0).all()
    if values == "float32":
        assert np.array_equal(counts, ((w != 0).sum(1).numpy() + 3) // 4 * 4)
    x = vector(inn, seed)
    bias = np.ones(out, np.float32)
    y = np.full(p.rows, np.nan, np.float32)
    K.csr4_gemv(p.arrays["ptr"], p.arrays["idx"], p.arrays["vals"], p.scale, x, bias, y, 0, out)
    assert close(y, reference(p, x, bias))


@SETTINGS
@given(
    out=st.integers(1, 70),
    inn=st.integers(1, 200),
    rows=st.sampled_from(fmt.BLOCK_ROWS),
    sparsity=st.sampled_from([0.0, 0.5, 0.8, 1.0]),
    seed=st.integers(0, 99),
)
def test_int8_block_kernels_sum_exactly(out, inn, rows, sparsity, seed):
    """int8 weights x int8 activations: the int32 sums equal int64 ``q_w @ q_x`` bit for bit, on the generic
    kernel and (where the CPU has it) the VNNI one."""
    w = block_sparse(out, inn, rows, sparsity, seed)
    q, _ = quantize_int8(w)
    x = vector(inn, seed) * 3
    xq, xu = np.zeros(inn, np.int8), np.zeros(inn, np.uint8)
    s = K.quantize_activation(x, xq, xu)
    want_q, want_s = quantize_activation(torch.from_numpy(x))
    assert np.array_equal(xq, want_q.numpy()) and np.float32(s) == want_s.numpy()
    assert np.array_equal(xu.astype(np.int16) - 128, xq)
    exact = q.to(torch.int64) @ want_q.to(torch.int64)
    p = fmt.pack_block(w, rows, "int8")
    acc = np.full(p.rows, -1, np.int32)
    K.block_q_gemv(p.arrays["ptr"], p.arrays["idx"], p.arrays["vals"], xq, acc, rows, 0, p.rows // rows)
    assert np.array_equal(acc[:out], exact.numpy()) and not acc[out:].any()
    if features().vnni:
        v = fmt.pack_block_vnni(w, rows)
        acc = np.full(v.rows, -1, np.int32)
        a = v.arrays
        K.block_vnni_gemv(a["gptr"], a["idx"], a["vals"], xu, a["wsum128"], acc, rows, 0, v.rows // rows)
        assert np.array_equal(acc[:out], exact.numpy()) and not acc[out:].any()


def test_activation_rounding_ties_go_to_even():
    x = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 0.0], np.float32)  # scale 1: the ties stay ties
    xq, xu = np.zeros(7, np.int8), np.zeros(7, np.uint8)
    assert K.quantize_activation(x, xq, xu) == 1.0
    assert xq.tolist() == [127, 0, 2, 2, 0, -2, 0]
    zero = np.zeros(5, np.float32)
    assert K.quantize_activation(zero, xq[:5], xu[:5]) == 1.0 and not xq[:5].any()


def test_finish_int8_is_one_product_then_one_sum():
    acc = np.array([3, -7, 2**20 + 1], np.int32)
    scale = np.array([0.1, 0.3, 1e-3], np.float32)
    bias = np.array([0.5, -0.25, 1.0], np.float32)
    y = np.zeros(3, np.float32)
    K.finish_int8(acc, np.float32(0.7), scale, bias, y, 0, 3)
    want = acc.astype(np.float32) * (np.float32(0.7) * scale) + bias
    assert np.array_equal(y, want)


def test_bytes_per_weight_follow_the_formulas():
    w = block_sparse(64, 256, 8, 0.75, seed=0)
    blocks = int((w.reshape(8, 8, 256) != 0).any(dim=1).sum())
    p = fmt.pack_block(w, 8, "bfloat16")
    assert p.nbytes == blocks * (8 * 2 + 2) + (8 + 1) * 8
    q = fmt.pack_block(w, 8, "int8")
    assert q.nbytes == blocks * (8 + 2) + 9 * 8 + 64 * 4
    d = fmt.pack_dense(w, "float32")
    assert d.bytes_per_weight == 4.0


@pytest.mark.slow
def test_the_generic_kernels_compiled_for_an_avx2_cpu_equal_dense_math(tmp_path):
    """numba compiles the target-independent kernels for the host; here for a Haswell (AVX2 + FMA only),
    with the AVX2 view of the CPU, in a fresh process."""
    script = Path(__file__).with_name("gemv_avx2_check.py")
    env = dict(
        os.environ, NUMBA_CPU_NAME="haswell", PRUNEKIT_CPU_FEATURES="avx2,fma", PRUNEKIT_NUMBA_CACHE="0"
    )
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2] / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all equal" in done.stdout
