"""FP8 quantization, block-scaled GEMM and fp8.linear against their references (interpret mode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8

E4M3_HALF_ULP = 2.0**-4  # 3 mantissa bits: round-to-nearest relative error <= 2^-4
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10  # absolute, in units of the scale (subnormal step 2^-9)
# Relative Frobenius error of an FP8 GEMM on normal data: both operands carry ~2-2.5% RMS
# rounding error (uniform relative error up to 2^-4 over the mantissa range), which adds in
# quadrature to ~3.5% (measured 3.3-3.8%); 6% leaves room without admitting a broken scale.
FP8_GEMM_REL_BOUND = 0.06


def _normal(key, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("pow2_scale", [False, True])
@pytest.mark.parametrize("shape", [(4, 256), (3, 200)])
def test_quantize_activations_round_trip(shape, pow2_scale):
  x = _normal(0, shape, 3.0)
  xq, xs = fp8.quantize_activations(x, pow2_scale=pow2_scale)
  assert xq.dtype == jnp.float8_e4m3fn and xq.shape == shape
  assert xs.shape == (shape[0], -(-shape[1] // 128))
  err = jnp.abs(fp8.dequantize_activations(xq, xs) - x)
  scale = jnp.repeat(xs, 128, axis=-1)[:, :shape[1]]
  bound = E4M3_HALF_ULP * jnp.abs(x) + E4M3_SUBNORMAL_HALF_STEP * scale
  assert bool(jnp.all(err <= bound * (1 + 1e-6)))
  # The largest element of every tile maps to (nearly) 448: the full e4m3 range is used.
  amax_q = jnp.abs(xq.astype(jnp.float32)).max(-1)
  assert float(amax_q.min()) >= (224 if pow2_scale else 416)
  if pow2_scale:
    assert bool(jnp.all(jnp.log2(xs) == jnp.round(jnp.log2(xs))))


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (2, 128, 256)])
def test_quantize_weights_round_trip(shape):
  w = _normal(1, shape, 0.02)
  wq, ws = fp8.quantize_weights(w)
  assert ws.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
  w_back = fp8.dequantize_weights(wq, ws)
  scale = jnp.repeat(jnp.repeat(ws, 128, -2), 128, -1)[..., :shape[-2], :shape[-1]]
  bound = E4M3_HALF_ULP * jnp.abs(w) + E4M3_SUBNORMAL_HALF_STEP * scale
  assert bool(jnp.all(jnp.abs(w_back - w) <= bound * (1 + 1e-6)))


def test_no_nan_above_448():
  assert bool(jnp.isnan(jnp.float32(1000.0).astype(jnp.float8_e4m3fn)))  # why we clip
  x = _normal(2, (8, 256), 1e3).at[0, 5].set(1e6).at[3, 200].set(-5e4)
  for xq, xs, back in [(*fp8.quantize_activations(x), fp8.dequantize_activations),
                       (*fp8.quantize_weights(x), fp8.dequantize_weights)]:
    assert not bool(jnp.isnan(xq.astype(jnp.float32)).any())
    x_back = back(xq, xs)
    assert abs(float(x_back[0, 5]) - 1e6) <= E4M3_HALF_ULP * 1e6
    assert abs(float(x_back[3, 200]) + 5e4) <= E4M3_HALF_ULP * 5e4


def test_zero_tile_is_finite():
  xq, xs = fp8.quantize_activations(jnp.zeros((2, 128)))
  assert float(xs.min()) == pytest.approx(1e-4 / 448)
  assert float(jnp.abs(xq.astype(jnp.float32)).max()) == 0.0


# Shapes repeat across tests on purpose: each new shape costs ~2 s of interpreter compilation.
ALIGNED, RAGGED = (256, 384, 256), (96, 200, 130)  # (M, K, N)


@pytest.mark.parametrize("x_shape,n", [((256, 384), 256), ((2, 48, 200), 130)])
def test_matmul_matches_reference(x_shape, n):
  xq, xs = fp8.quantize_activations(_normal(3, x_shape))
  wq, ws = fp8.quantize_weights(_normal(4, (x_shape[-1], n), x_shape[-1] ** -0.5))
  y = fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.float32, interpret=True)
  y_ref = fp8.matmul_reference(xq, xs, wq, ws, out_dtype=jnp.float32)
  assert y.shape == (*x_shape[:-1], n)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_matmul_rejects_mismatched_scales():
  xq, xs = fp8.quantize_activations(_normal(5, (64, 256)))
  wq, ws = fp8.quantize_weights(_normal(6, (256, 128)))
  with pytest.raises(ValueError, match="scales"):
    fp8.matmul(xq, xs[:, :1], wq, ws)
  with pytest.raises(ValueError, match="contraction"):
    fp8.matmul(xq[:, :128], xs[:, :1], wq, ws)


@functools.lru_cache(maxsize=None)
def _linear_outputs(m, k, n, dtype, pow2_scale):
  """(x, w, cotangent, kernel (y, dx, dw), reference (y, dx, dw)) from one vjp each.

  Cached: every interpreted kernel shape costs ~2 s to compile, so tests share these runs.
  """
  x, w = _normal(7, (m, k)).astype(dtype), _normal(8, (k, n), k ** -0.5)
  dy = _normal(13, (m, n)).astype(dtype)
  results = []
  for fn in (lambda x, w: fp8.linear(x, w, pow2_scale=pow2_scale, interpret=True),
             lambda x, w: fp8.linear_reference(x, w, pow2_scale=pow2_scale)):
    y, vjp = jax.vjp(fn, x, w)
    results.append((y, *vjp(dy)))
  return x, w, dy, results[0], results[1]


@pytest.mark.parametrize("shape,dtype", [(ALIGNED, jnp.float32), (RAGGED, jnp.bfloat16)])
def test_linear_matches_reference_values_and_grads(shape, dtype):
  x, w, _, kernel, reference = _linear_outputs(*shape, dtype, False)
  assert [a.dtype for a in kernel] == [dtype, dtype, jnp.float32]
  assert [a.shape for a in kernel] == [a.shape for a in reference] == [
      (shape[0], shape[2]), x.shape, w.shape]
  # Same FP8 operands on both sides; only fp32 summation order (and the bf16 cast) differ.
  rtol = 1e-5 if dtype == jnp.float32 else 2.0**-7
  for a, b in zip(kernel, reference):
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(jnp.abs(b).max()))


def test_linear_error_vs_float32():
  x, w, dy, kernel, _ = _linear_outputs(*ALIGNED, jnp.float32, False)
  exact_fn = lambda x, w: jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
  y, vjp = jax.vjp(exact_fn, x, w)
  exact = (y, *vjp(dy))
  errors = [_rel(a, b) for a, b in zip(kernel, exact)]
  # Above 1% shows the operands really went through e4m3 (bf16 alone would give ~0.3%).
  assert all(0.01 < e < FP8_GEMM_REL_BOUND for e in errors), errors
  # Power-of-two scales use at least half of the e4m3 range, so the bound still holds. Checked on
  # the reference GEMM: the kernel == reference equivalence above does not depend on the scales.
  y2, vjp2 = jax.vjp(lambda x, w: fp8.linear_reference(x, w, pow2_scale=True), x, w)
  errors = [_rel(a, b) for a, b in zip((y2, *vjp2(dy)), exact)]
  assert all(0.01 < e < FP8_GEMM_REL_BOUND for e in errors), errors
