"""Grouped matmul (gmm / tgmm / FP8 gmm) against jax.lax.ragged_dot references (interpret mode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _grouped, fp8, gmm

FP8_GEMM_REL_BOUND = 0.06  # see test_kernels_fp8.py
# (M, K, N, group_sizes): empty groups in the middle and last, K and N not multiples of 128, a
# group straddling row tiles, and 12 rows past sum(group_sizes), which ragged_dot defines as zero.
# One case only: every interpreted kernel shape costs seconds of compilation.
CASES = {
    "ragged": (192, 200, 160, (40, 0, 90, 0, 50, 0)),
}


def _inputs(case, dtype=jnp.float32):
  m, k, n, sizes = CASES[case]
  keys = jax.random.split(jax.random.key(0), 3)
  lhs = jax.random.normal(keys[0], (m, k)).astype(dtype)
  rhs = (jax.random.normal(keys[1], (len(sizes), k, n)) * k ** -0.5).astype(dtype)
  dout = jax.random.normal(keys[2], (m, n)).astype(dtype)
  return lhs, rhs, jnp.array(sizes, jnp.int32), dout


@functools.lru_cache(maxsize=None)
def _vjp_outputs(case, dtype, fp8_on):
  """Kernel and reference (out, dlhs, drhs); cached since interpreted kernels compile slowly."""
  lhs, rhs, sizes, dout = _inputs(case, dtype)
  results = []
  for fn in (lambda a, b: gmm.gmm(a, b, sizes, fp8=fp8_on, interpret=True),
             lambda a, b: gmm.gmm_reference(a, b, sizes)):
    out, vjp = jax.vjp(fn, lhs, rhs)
    results.append((out, *vjp(dout)))
  return results


@pytest.mark.parametrize("case", list(CASES))
def test_gmm_values_and_grads_match_ragged_dot(case):
  kernel, reference = _vjp_outputs(case, jnp.float32, False)
  for a, b in zip(kernel, reference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
  m, _, _, sizes = CASES[case]
  if sum(sizes) < m:  # rows nobody owns stay zero in the output and the lhs gradient
    assert float(jnp.abs(kernel[0][sum(sizes):]).max()) == 0.0
    assert float(jnp.abs(kernel[1][sum(sizes):]).max()) == 0.0
  empty = [g for g, s in enumerate(sizes) if s == 0]
  assert float(jnp.abs(kernel[2][jnp.array(empty)]).max()) == 0.0


def test_gmm_bf16():
  kernel, reference = _vjp_outputs("ragged", jnp.bfloat16, False)
  for a, b in zip(kernel, reference):
    assert a.dtype == jnp.bfloat16
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    np.testing.assert_allclose(a, b, rtol=2**-7, atol=2**-7 * float(jnp.abs(b).max()))


def test_tgmm_matches_reference():
  lhs, _, sizes, dout = _inputs("ragged")
  out = gmm.tgmm(lhs, dout, sizes, interpret=True)
  assert out.shape == (len(CASES["ragged"][3]), lhs.shape[1], dout.shape[1])
  np.testing.assert_allclose(out, gmm.tgmm_reference(lhs, dout, sizes), rtol=1e-5, atol=1e-4)


# (M, group_sizes): ragged with empty groups and rows past the end, all empty, one group, sizes
# that straddle and match the plain-XLA row tile, a tiny group beside a huge one
TGMM_XLA_CASES = [(192, (40, 0, 90, 0, 50, 0)), (64, (0, 0)), (40, (5, 5, 5, 5, 5)),
                  (64, (64,)), (256, (3, 0, 200, 1))]


@pytest.mark.parametrize("m,sizes", TGMM_XLA_CASES)
def test_tgmm_xla_fallback_matches_reference(m, sizes):
  """interpret=False on CPU takes the compiled (non-Pallas) path, as on GPU."""
  keys = jax.random.split(jax.random.key(1), 2)
  lhs, dout = jax.random.normal(keys[0], (m, 200)), jax.random.normal(keys[1], (m, 160))
  sizes = jnp.array(sizes, jnp.int32)
  out = gmm.tgmm(lhs, dout, sizes, interpret=False)
  ref = gmm.tgmm_reference(lhs, dout, sizes)
  assert out.shape == ref.shape == (len(sizes), 200, 160)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
  empty = np.asarray(sizes) == 0
  if empty.any():
    assert float(jnp.abs(out[empty]).max()) == 0.0


def test_gmm_compiled_fallback_grads_match_ragged_dot():
  lhs, rhs, sizes, dout = _inputs("ragged")
  got = jax.vjp(lambda a, b: gmm.gmm(a, b, sizes, interpret=False), lhs, rhs)
  want = jax.vjp(lambda a, b: gmm.gmm_reference(a, b, sizes), lhs, rhs)
  for a, b in zip((got[0], *got[1](dout)), (want[0], *want[1](dout))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_tgmm_xla_fallback_flops_do_not_grow_with_groups():
  """The weight gradient costs ~2*M*K*N whatever the number of groups (experts): from XLA's
  cost analysis of the compiled fallback, at fixed M rows split into 8 and then 64 groups. The
  one-hot reference (like ragged_dot_general's ragged-contracting mode on XLA:CPU) costs G times
  that, which the check must be able to see."""
  m, k, n = 1024, 256, 128
  lhs, dout = jnp.ones((m, k)), jnp.ones((m, n))
  tgmm = lambda a, b, s: gmm.tgmm(a, b, s, interpret=False)
  new, ref = {}, {}
  for g in (8, 64):
    sizes = jnp.full((g,), m // g, jnp.int32)
    new[g], ref[g] = _flops(tgmm, lhs, dout, sizes), _flops(gmm.tgmm_reference, lhs, dout, sizes)
  ideal = 2 * m * k * n
  assert ref[64] > 6 * ref[8] and ref[64] > 30 * ideal  # the cost analysis counts the waste
  assert new[64] <= 1.5 * new[8]
  assert all(ideal <= new[g] <= 2 * ideal for g in new), (new, ideal)


def test_gmm_xla_fallback_flops_do_not_grow_with_groups():
  """The forward and input gradient of the compiled fallback off TPU (a GPU, or interpret=False
  on a CPU) cost ~2*M*K*N whatever the number of groups. jax.lax.ragged_dot on XLA:CPU (and, by
  the H200's 23 TFLOP/s, on XLA:GPU) costs G times that: the check sees it in the same cost
  analysis. Values equal ragged_dot's, rows past sum(group_sizes) zero."""
  m, k, n = 1024, 256, 128
  lhs = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), jnp.float32)
  fwd = lambda a, b, s: gmm.gmm(a, b, s, interpret=False)
  new, ref = {}, {}
  for g in (8, 64):
    rhs = jnp.asarray(np.random.default_rng(g).standard_normal((g, k, n)), jnp.float32)
    sizes = jnp.full((g,), m // g, jnp.int32).at[0].add(-5)  # 5 rows past the last group
    new[g] = _flops(fwd, lhs, rhs, sizes)
    ref[g] = _flops(lambda a, b, s: jax.lax.ragged_dot(a, b, s), lhs, rhs, sizes)
    want = gmm.gmm_reference(lhs, rhs, sizes)
    np.testing.assert_allclose(fwd(lhs, rhs, sizes), want, rtol=1e-5, atol=1e-4)
    assert float(jnp.abs(want[-5:]).max()) == 0
  ideal = 2 * m * k * n
  assert ref[64] > 6 * ref[8] and ref[64] > 30 * ideal
  assert new[64] <= 1.5 * new[8]
  assert all(ideal <= new[g] <= 2 * ideal for g in new), (new, ideal)


def test_gmm_fp8_prequantized_matches_reference():
  lhs, rhs, sizes, _ = _inputs("ragged")
  lq, ls = fp8.quantize_activations(lhs)
  rq, rs = fp8.quantize_weights(rhs)
  out = gmm.gmm_fp8(lq, ls, rq, rs, sizes, out_dtype=jnp.float32, interpret=True)
  ref = gmm.gmm_fp8_reference(lq, ls, rq, rs, sizes, out_dtype=jnp.float32)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_gmm_fp8_on_the_fly_error_bound():
  (out, dlhs, drhs), (ref, dlhs_ref, drhs_ref) = _vjp_outputs("ragged", jnp.float32, True)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert 0.01 < rel(out, ref) < FP8_GEMM_REL_BOUND   # FP8 forward
  assert 0.01 < rel(dlhs, dlhs_ref) < FP8_GEMM_REL_BOUND  # FP8 dgrad
  assert rel(drhs, drhs_ref) < 1e-5  # wgrad stays in the input precision


@pytest.mark.parametrize("sizes,m,tm", [((40, 0, 90, 0, 62, 0), 256, 64), ((0, 0), 128, 32),
                                        ((5, 5, 5, 5, 5), 64, 32)])
def test_group_metadata_covers_each_overlap_once(sizes, m, tm):
  offsets, group, tile, valid = map(np.asarray, _grouped.group_metadata(jnp.array(sizes), m, tm))
  items = {(int(t), int(g)) for t, g, v in zip(tile, group, valid) if v}
  expected = {(t, g) for t in range(m // tm) for g in range(len(sizes))
              if sizes[g] and min(offsets[g + 1], (t + 1) * tm) > max(offsets[g], t * tm)}
  assert items == expected and int(valid.sum()) == len(expected)
  assert list(tile[valid == 1]) == sorted(tile[valid == 1])  # tile-major: output blocks revisit
  # consecutively, which the accumulator scheme relies on


def test_gmm_rejects_bad_shapes():
  lhs, rhs, sizes, _ = _inputs("ragged")
  with pytest.raises(ValueError, match="lhs"):
    gmm.gmm(lhs[:, :100], rhs, sizes)
  with pytest.raises(ValueError, match="group_sizes"):
    gmm.gmm(lhs, rhs, sizes[:2])
