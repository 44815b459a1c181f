"""Grouped matmul over expert-sorted tokens (the `jax.lax.ragged_dot` contract), with a custom VJP.

  out = gmm(lhs, rhs, group_sizes)     # lhs [M, K] sorted by group, rhs [G, K, N] -> [M, N]
  drhs = tgmm(lhs, dout, group_sizes)  # [G, K, N]: per group lhs_g^T @ dout_g (weight gradient)

Rows past sum(group_sizes) give zeros, as in ragged_dot; empty groups are skipped (their tgmm
block is zero). Gradients: dlhs = gmm(dout, rhs^T), drhs = tgmm(lhs, dout).

Precision: bf16 or f32 inputs, fp32 accumulation, output in `preferred_element_type` (default
lhs.dtype). FP8: `gmm(..., fp8=True)` quantizes on the fly (lhs in 1x128 tiles, each expert's
weight in 128x128 blocks, see `fp8`) for the forward and the dgrad GEMM; the weight gradient
(tgmm) stays in the input precision, since its 1x128 tiles along tokens would straddle expert
boundaries. `gmm_fp8` takes operands quantized in advance.

Backends: Pallas kernels of `_grouped.py` on TPU (Mosaic, scalar prefetch) and in the
interpreter (CPU; the only mode tested numerically in CI). Compiled on GPU (or CPU with
interpret=False), gmm walks the kernel's (row tile, group) work items in plain XLA
(`_grouped.grouped_matmul_xla`; FP8 operands dequantized first), not `jax.lax.ragged_dot`,
which XLA:CPU and XLA:GPU expand over every group. The FP8 GEMMs with R1JAX_MOSAIC_GPU=1 run
the Mosaic GPU wgmma kernel of `_mosaic_gpu.py` instead, over a layout that pads every group to
a multiple of the row tile (lowered in CI; compiled on an H200 it matched its reference to
1.3e-4, standalone, not yet inside a model step). tgmm there walks the kernel's work items in plain XLA
(`_grouped.transposed_grouped_matmul_xla`): ~1.5x the grouped weight-gradient FLOPs whatever G,
where ragged_dot_general's ragged-contracting mode (expanded densely over groups by XLA:CPU)
and `tgmm_reference` cost G times them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as C
from pallas_kernels import _grouped
from pallas_kernels import _mosaic_gpu
from pallas_kernels import fp8 as fp8_lib


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Row tile tm (tokens), contraction step tk (multiple of 128 for FP8), output tile tn."""
  tm: int = 128
  tk: int = 512
  tn: int = 256

  @classmethod
  def default(cls, backend: str | None = None) -> "BlockSizes":
    backend = backend or C.backend()
    if backend == "tpu":
      return cls(tm=128, tk=512, tn=512)  # megablox-like; tm small to waste little per group
    if backend == "gpu":  # the FP8 wgmma kernel: one warpgroup per CTA, tk fixed at 128
      return cls(tm=64, tk=128, tn=128)
    return cls()


def _check(lhs, rhs, group_sizes):
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"gmm expects lhs [M, K] and rhs [G, K, N]; got {lhs.shape}, {rhs.shape}")
  if group_sizes.shape != (rhs.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be int [{rhs.shape[0]}]; got {group_sizes.dtype}"
                     f"{list(group_sizes.shape)}")


def _kernel_gmm(lhs, rhs, group_sizes, lhs_scale, rhs_scale, out_dtype, bs, interpret):
  """Dispatch to the Pallas kernel, the Mosaic GPU FP8 kernel, or the plain-XLA work-item
  fallback (`_grouped.grouped_matmul_xla`)."""
  if C.use_pallas(interpret):
    return _grouped.grouped_matmul(lhs, rhs, group_sizes, lhs_scale, rhs_scale,
                                   out_dtype=out_dtype, tm=bs.tm, tk=bs.tk, tn=bs.tn,
                                   interpret=interpret)
  if lhs_scale is not None and C.use_mosaic_gpu(interpret):
    return _mosaic_gpu.grouped(lhs, lhs_scale, rhs, rhs_scale, group_sizes, out_dtype=out_dtype,
                               block_sizes=_mosaic_gpu.GpuBlockSizes(bm=bs.tm, bn=bs.tn))
  if lhs_scale is not None:
    dt = fp8_lib.fallback_dtype(out_dtype)
    lhs = fp8_lib.dequantize_activations(lhs, lhs_scale).astype(dt)
    rhs = jax.vmap(fp8_lib.dequantize_weights_by_column)(rhs, rhs_scale).astype(dt)
  # not jax.lax.ragged_dot: XLA:CPU and XLA:GPU expand it over all groups (G x the FLOPs)
  return _grouped.grouped_matmul_xla(lhs, rhs, group_sizes, out_dtype=out_dtype)


def _quantize(lhs, rhs, pow2_scale):
  lq, ls = fp8_lib.quantize_activations(lhs, pow2_scale=pow2_scale)
  rq, rs_blocks = fp8_lib.quantize_weights(rhs, pow2_scale=pow2_scale)
  return lq, ls, rq, rs_blocks


def _column_scales(rs_blocks, n):
  return jnp.repeat(rs_blocks, C.QUANT_TILE, axis=-1)[..., :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, static):
  return _gmm_fwd(lhs, rhs, group_sizes, static)[0]


def _gmm_fwd(lhs, rhs, group_sizes, static):
  out_dtype, fp8, pow2_scale, bs, interpret = static
  if fp8:
    lq, ls, rq, rs_blocks = _quantize(lhs, rhs, pow2_scale)
    out = _kernel_gmm(lq, rq, group_sizes, ls, _column_scales(rs_blocks, rhs.shape[2]),
                      out_dtype, bs, interpret)
    return out, (lhs, (rq, rs_blocks), group_sizes, jnp.zeros((0,), rhs.dtype))
  out = _kernel_gmm(lhs, rhs, group_sizes, None, None, out_dtype, bs, interpret)
  return out, (lhs, rhs, group_sizes, jnp.zeros((0,), rhs.dtype))


def _gmm_bwd(static, res, dout):
  _, fp8, pow2_scale, bs, interpret = static
  lhs, rhs_res, group_sizes, rhs_dtype = res
  if fp8:
    # dgrad in FP8: dout in 1x128 tiles along N; rhs^T blocks are rhs blocks transposed.
    rq, rs_blocks = rhs_res
    dq, ds = fp8_lib.quantize_activations(dout, pow2_scale=pow2_scale)
    rq_t, rs_t = rq.transpose(0, 2, 1), rs_blocks.transpose(0, 2, 1)
    dlhs = _kernel_gmm(dq, rq_t, group_sizes, ds, _column_scales(rs_t, rq.shape[1]), lhs.dtype,
                       bs, interpret)
  else:
    dlhs = _kernel_gmm(dout, rhs_res.transpose(0, 2, 1), group_sizes, None, None, lhs.dtype, bs,
                       interpret)
  drhs = tgmm(lhs, dout.astype(lhs.dtype), group_sizes, preferred_element_type=rhs_dtype.dtype,
              block_sizes=bs, interpret=interpret)
  return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.jit, static_argnames=(
    "preferred_element_type", "fp8", "pow2_scale", "block_sizes", "interpret"))
def gmm(lhs, rhs, group_sizes, *, preferred_element_type=None, fp8: bool = False,
        pow2_scale: bool = False, block_sizes: BlockSizes | None = None,
        interpret: bool | None = None):
  """lhs [M, K] (rows sorted by group), rhs [G, K, N], group_sizes [G] int -> [M, N].

  Differentiable in lhs and rhs. `fp8=True` runs forward and dgrad as FP8 GEMMs (see module doc).
  """
  _check(lhs, rhs, group_sizes)
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  static = (out_dtype, fp8, pow2_scale, block_sizes or BlockSizes.default(),
            C.resolve_interpret(interpret))
  return _gmm(lhs, rhs, group_sizes.astype(jnp.int32), static)


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_sizes", "interpret"))
def gmm_fp8(lhs_q, lhs_scale, rhs_q, rhs_scale, group_sizes, *, out_dtype=jnp.bfloat16,
            block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """Pre-quantized FP8 gmm (not differentiable).

  lhs_q [M, K] e4m3 with lhs_scale [M, ceil(K/128)] (fp8.quantize_activations); rhs_q [G, K, N]
  e4m3 with rhs_scale [G, ceil(K/128), ceil(N/128)] (fp8.quantize_weights) -> [M, N].
  """
  _check(lhs_q, rhs_q, group_sizes)
  kb, nb = C.cdiv(rhs_q.shape[1], C.QUANT_TILE), C.cdiv(rhs_q.shape[2], C.QUANT_TILE)
  if lhs_scale.shape != (lhs_q.shape[0], kb) or rhs_scale.shape != (rhs_q.shape[0], kb, nb):
    raise ValueError(f"scales {lhs_scale.shape}, {rhs_scale.shape} do not match 128-tiles of "
                     f"{lhs_q.shape}, {rhs_q.shape}")
  return _kernel_gmm(lhs_q, rhs_q, group_sizes.astype(jnp.int32), lhs_scale,
                     _column_scales(rhs_scale, rhs_q.shape[2]), jnp.dtype(out_dtype),
                     block_sizes or BlockSizes.default(), C.resolve_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("preferred_element_type", "block_sizes", "interpret"))
def tgmm(lhs, dout, group_sizes, *, preferred_element_type=None,
         block_sizes: BlockSizes | None = None, interpret: bool | None = None):
  """lhs [M, K], dout [M, N] (rows sorted by group), group_sizes [G] -> [G, K, N]."""
  if lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]:
    raise ValueError(f"tgmm expects lhs [M, K] and dout [M, N]; got {lhs.shape}, {dout.shape}")
  out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
  interpret = C.resolve_interpret(interpret)
  if not C.use_pallas(interpret):
    # not ragged_dot_general's ragged-contracting mode: XLA:CPU, and XLA's RaggedDotRewriter
    # wherever no cuDNN fusion takes it, expand it densely over all G groups (G times the FLOPs)
    return _grouped.transposed_grouped_matmul_xla(lhs, dout, group_sizes.astype(jnp.int32),
                                                  out_dtype=out_dtype)
  bs = block_sizes or BlockSizes.default()
  return _grouped.transposed_grouped_matmul(lhs, dout, group_sizes.astype(jnp.int32),
                                            out_dtype=out_dtype, tm=bs.tm, tk=bs.tk, tn=bs.tn,
                                            interpret=interpret)


@functools.partial(jax.jit, static_argnames=("preferred_element_type",))
def gmm_reference(lhs, rhs, group_sizes, *, preferred_element_type=None):
  """Plain-XLA oracle: jax.lax.ragged_dot at full precision."""
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
  return out.astype(preferred_element_type or lhs.dtype)


@jax.jit
def tgmm_reference(lhs, dout, group_sizes):
  """Oracle for tgmm: a one-hot group mask over rows, then a batched contraction. fp32 out."""
  ends = jnp.cumsum(group_sizes)
  rows = jnp.arange(lhs.shape[0])
  member_GM = (rows[None, :] >= (ends - group_sizes)[:, None]) & (rows[None, :] < ends[:, None])
  return jnp.einsum("gm,mk,mn->gkn", member_GM.astype(jnp.float32), lhs.astype(jnp.float32),
                    dout.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def gmm_fp8_reference(lhs_q, lhs_scale, rhs_q, rhs_scale, group_sizes, *,
                      out_dtype=jnp.bfloat16):
  """Oracle for gmm_fp8: dequantize to fp32, then gmm_reference."""
  lhs = fp8_lib.dequantize_activations(lhs_q, lhs_scale)
  rhs = fp8_lib.dequantize_weights(rhs_q, rhs_scale)
  return gmm_reference(lhs, rhs, group_sizes, preferred_element_type=out_dtype)
