"""FP8 (e4m3) block-scaled GEMM and a differentiable FP8 linear layer (DeepSeek-V3 recipe).

  xq, xs = quantize_activations(x)   # x [..., K] -> e4m3 [..., K], fp32 scales [..., ceil(K/128)]
  wq, ws = quantize_weights(w)       # w [..., K, N] -> e4m3, scales [..., ceil(K/128), ceil(N/128)]
  y = matmul(xq, xs, wq, ws)         # [..., N] ~ x @ w, fp32 accumulation per 128-wide K block
  y = linear(x, w)                   # custom_vjp; forward, dgrad and wgrad are all FP8 GEMMs

Scale = max(amax, 1e-4) / 448 (optionally rounded up to a power of two); values are clipped to
+-448 before the cast because JAX's cast to float8_e4m3fn does not saturate (overflow -> NaN).
Shapes that are not multiples of 128 are zero-padded inside `matmul`; a partial tile gets the
scale of its valid elements.

Backends: the GEMM is the grouped Pallas kernel of `_grouped.py` with a single group (Mosaic TPU
or the interpreter; on TPU the FP8 tiles are widened to bf16 in VMEM since MXUs before v7 have no
FP8 path, which still halves HBM traffic). On GPU with R1JAX_MOSAIC_GPU=1 it is the Mosaic GPU
wgmma kernel of `_mosaic_gpu.py` (FP8 operands, B K-major, per-128-K-block promotion in fp32).
Compiled on an H200 it matched its reference (relative error 1.3e-4) and ran at 0.73-0.94x of a
bf16 `jnp.dot` (README, "On an H200"), so it stays opt-in; without the switch compiled GPU calls
use XLA (operands dequantized to bf16, fp32 accumulation: correct, not faster than bf16). Quantization is
plain jnp, which XLA fuses into the producer. Numerics are tested in interpret mode on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as C
from pallas_kernels import _grouped
from pallas_kernels import _mosaic_gpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Output tile tm x tn, K step tk (a multiple of 128: one scale per 128 of K)."""
  tm: int = 128
  tk: int = 512
  tn: int = 256

  @classmethod
  def default(cls, backend: str | None = None) -> "BlockSizes":
    backend = backend or C.backend()
    if backend == "tpu":
      return cls(tm=256, tk=512, tn=512)
    if backend == "gpu":  # one warpgroup per CTA; tk is fixed at the 128 scaling block
      return cls(tm=64, tk=128, tn=128)
    return cls()  # interpreter: large tiles mean few (slow) interpreted grid steps


def _scale_from_amax(amax, pow2_scale: bool):
  scale = jnp.maximum(amax, 1e-4) / C.FP8_MAX
  if pow2_scale:  # ue8m0-style scales: exact to apply, at most 2x coarser
    scale = jnp.exp2(jnp.ceil(jnp.log2(scale)))
  return scale


def _cast_fp8(x_scaled):
  # The barrier keeps the e4m3 values: XLA:GPU's excess-precision simplification (on by default)
  # otherwise folds a later convert back to fp32 into this one, so a fused round trip returns
  # the unrounded input (75 % of elements on the H200; benchmarks/accelerator_probe.py), and the
  # FP8 sampler and scorer drifted 0.2 nats apart.
  return jax.lax.optimization_barrier(
      jnp.clip(x_scaled, -C.FP8_MAX, C.FP8_MAX).astype(C.FP8_DTYPE))


@functools.partial(jax.jit, static_argnames=("pow2_scale",))
def quantize_activations(x: jax.Array, *, pow2_scale: bool = False):
  """x [..., K] -> (e4m3 [..., K], fp32 scales [..., ceil(K/128)]): one scale per 1x128 tile."""
  k = x.shape[-1]
  kb = C.cdiv(k, C.QUANT_TILE)
  x_bt = C.pad_axis(x.astype(jnp.float32), x.ndim - 1, kb * C.QUANT_TILE)
  x_bt = x_bt.reshape(*x.shape[:-1], kb, C.QUANT_TILE)
  scale = _scale_from_amax(jnp.abs(x_bt).max(-1), pow2_scale)
  xq = _cast_fp8(x_bt / scale[..., None]).reshape(*x.shape[:-1], kb * C.QUANT_TILE)
  return xq[..., :k], scale


@functools.partial(jax.jit, static_argnames=("pow2_scale",))
def quantize_weights(w: jax.Array, *, pow2_scale: bool = False):
  """w [..., K, N] -> (e4m3 [..., K, N], fp32 scales [..., ceil(K/128), ceil(N/128)])."""
  *batch, k, n = w.shape
  kb, nb, t = C.cdiv(k, C.QUANT_TILE), C.cdiv(n, C.QUANT_TILE), C.QUANT_TILE
  w_p = C.pad_axis(C.pad_axis(w.astype(jnp.float32), w.ndim - 2, kb * t), w.ndim - 1, nb * t)
  w_bkbn = w_p.reshape(*batch, kb, t, nb, t)
  scale = _scale_from_amax(jnp.abs(w_bkbn).max(axis=(-3, -1)), pow2_scale)
  wq = _cast_fp8(w_bkbn / scale[..., :, None, :, None]).reshape(*batch, kb * t, nb * t)
  return wq[..., :k, :n], scale


def dequantize_activations(xq, xs):
  """Inverse of quantize_activations (up to rounding), in fp32."""
  k = xq.shape[-1]
  return (xq.astype(jnp.float32) * jnp.repeat(xs, C.QUANT_TILE, axis=-1)[..., :k])


def dequantize_weights(wq, ws):
  """Inverse of quantize_weights (up to rounding), in fp32."""
  k, n = wq.shape[-2:]
  s = jnp.repeat(jnp.repeat(ws, C.QUANT_TILE, axis=-2), C.QUANT_TILE, axis=-1)
  return wq.astype(jnp.float32) * s[..., :k, :n]


def _column_scales(ws, n: int):
  """Block scales [Kb, ceil(N/128)] or column scales [Kb, N] -> column scales [Kb, N]."""
  if ws.shape[-1] == n:
    return ws
  if ws.shape[-1] != C.cdiv(n, C.QUANT_TILE):
    raise ValueError(f"weight scales {ws.shape} fit neither 128x128 blocks nor columns of N={n}")
  return jnp.repeat(ws, C.QUANT_TILE, axis=-1)[..., :n]


def _check_operands(xq, xs, wq, ws):
  k, n = wq.shape
  if xq.shape[-1] != k:
    raise ValueError(f"contraction mismatch: x {xq.shape} vs w {wq.shape}")
  kb = C.cdiv(k, C.QUANT_TILE)
  if xs.shape != (*xq.shape[:-1], kb) or ws.shape[0] != kb:
    raise ValueError(f"scales x {xs.shape} / w {ws.shape} do not match 128-wide K blocks of "
                     f"x {xq.shape} / w {wq.shape}")


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def matmul(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16, block_sizes: BlockSizes | None = None,
           interpret: bool | None = None):
  """FP8 GEMM: xq [..., K] e4m3 with xs [..., Kb]; wq [K, N] e4m3 with ws [Kb, Nb] (128x128
  blocks) or [Kb, N] (per column, as wgrad needs) -> [..., N] in out_dtype."""
  _check_operands(xq, xs, wq, ws)
  interpret = C.resolve_interpret(interpret)
  bs = block_sizes or BlockSizes.default()
  *batch, k = xq.shape
  n = wq.shape[1]
  x_MK, xs_MK = xq.reshape(-1, k), xs.reshape(-1, xs.shape[-1])
  ws_KN = _column_scales(ws, n)
  if C.use_mosaic_gpu(interpret):
    y = _mosaic_gpu.dense(x_MK, xs_MK, wq, ws_KN, out_dtype=out_dtype,
                          block_sizes=_mosaic_gpu.GpuBlockSizes(bm=bs.tm, bn=bs.tn))
  elif not C.use_pallas(interpret):
    dt = fallback_dtype(out_dtype)
    y = jnp.dot(dequantize_activations(x_MK, xs_MK).astype(dt),
                dequantize_weights_by_column(wq, ws_KN).astype(dt),
                preferred_element_type=jnp.float32)
  else:
    m = x_MK.shape[0]
    y = _grouped.grouped_matmul(
        x_MK, wq[None], jnp.array([m], jnp.int32), xs_MK, ws_KN[None], out_dtype=jnp.float32,
        tm=bs.tm, tk=bs.tk, tn=bs.tn, interpret=interpret)
  return y.astype(out_dtype).reshape(*batch, n)


def fallback_dtype(out_dtype):
  """The dtype of the dequantized operands in the XLA fallbacks (here and `gmm`): the caller's,
  bf16 at least. A bf16 cast of an fp32 model's operands made the first H200 run's FP8 training
  forward differ from the sampler, which rounds the same e4m3 values but keeps them in the
  model's dtype (mean |dlogp| 0.22)."""
  return jnp.promote_types(out_dtype, jnp.bfloat16)


def dequantize_weights_by_column(wq, ws_KN):
  """wq [K, N] e4m3 with column scales [Kb, N] -> fp32 [K, N]."""
  return wq.astype(jnp.float32) * jnp.repeat(ws_KN, C.QUANT_TILE, axis=0)[:wq.shape[0]]


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def matmul_reference(xq, xs, wq, ws, *, out_dtype=jnp.bfloat16):
  """Plain-jnp oracle for `matmul`: dequantize to fp32 and multiply at full precision."""
  _check_operands(xq, xs, wq, ws)
  w_KN = dequantize_weights_by_column(wq, _column_scales(ws, wq.shape[1]))
  y = jnp.dot(dequantize_activations(xq, xs), w_KN, precision=jax.lax.Precision.HIGHEST)
  return y.astype(out_dtype)


def _make_linear(matmul_fn):
  """FP8 linear y = x @ w with the recipe's FP8 backward, over a given GEMM (kernel or oracle).

  `static` = (pow2_scale, (("name", value), ...) extra GEMM keyword arguments), hashable.
  """

  def quantized_forward(x, w, static):
    pow2_scale, gemm_kwargs = static[0], dict(static[1])
    xq, xs = quantize_activations(x, pow2_scale=pow2_scale)
    wq, ws = quantize_weights(w, pow2_scale=pow2_scale)
    y = matmul_fn(xq, xs, wq, ws, out_dtype=x.dtype, **gemm_kwargs)
    # A zero-size array carries w's dtype to the backward pass (dw is returned in it).
    return y, (x, wq, ws, jnp.zeros((0,), w.dtype))

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def linear_fn(x, w, static):
    return quantized_forward(x, w, static)[0]

  def backward(static, res, dy):
    pow2_scale, gemm_kwargs = static[0], dict(static[1])
    x, wq, ws, w_dtype = res
    x_MK, dy_MN = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    # dgrad: dy in 1x128 tiles along N; w^T's 128x128 blocks are w's blocks transposed, so the
    # re-quantized w^T equals (wq^T, ws^T) exactly and is not recomputed.
    dyq, dys = quantize_activations(dy_MN, pow2_scale=pow2_scale)
    dx = matmul_fn(dyq, dys, wq.T, ws.T, out_dtype=x.dtype, **gemm_kwargs).reshape(x.shape)
    # wgrad: the contraction runs over tokens, so x^T and dy^T get 1x128 tiles along M; dy^T's
    # scales become per-column scales of the [M, N] right operand.
    xtq, xts = quantize_activations(x_MK.T, pow2_scale=pow2_scale)
    dytq, dyts = quantize_activations(dy_MN.T, pow2_scale=pow2_scale)
    dw = matmul_fn(xtq, xts, dytq.T, dyts.T, out_dtype=w_dtype.dtype, **gemm_kwargs)
    return dx, dw

  linear_fn.defvjp(quantized_forward, backward)
  return linear_fn


_linear_kernel = _make_linear(matmul)
_linear_reference = _make_linear(matmul_reference)


@functools.partial(jax.jit, static_argnames=("pow2_scale", "block_sizes", "interpret"))
def linear(x, w, *, pow2_scale: bool = False, block_sizes: BlockSizes | None = None,
           interpret: bool | None = None):
  """x [..., K] @ w [K, N] -> [..., N] in x.dtype, quantizing on the fly; differentiable.

  Forward, dgrad (dx = dy @ w^T) and wgrad (dw = x^T @ dy) are FP8 GEMMs with fp32 accumulation.
  The residuals are x and the quantized w.
  """
  gemm_kwargs = (("block_sizes", block_sizes), ("interpret", interpret))
  return _linear_kernel(x, w, (pow2_scale, gemm_kwargs))


@functools.partial(jax.jit, static_argnames=("pow2_scale",))
def linear_reference(x, w, *, pow2_scale: bool = False):
  """`linear` with `matmul_reference` in place of the kernel (same recipe, same gradients)."""
  return _linear_reference(x, w, (pow2_scale, ()))
