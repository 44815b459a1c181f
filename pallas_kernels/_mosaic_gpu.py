"""FP8 block-scaled GEMM for Hopper GPUs in Pallas Mosaic GPU (TMA pipeline + wgmma).

One kernel serves the dense FP8 GEMM (`fp8.matmul`) and the grouped one (`gmm_fp8`):

  out[t*bm:(t+1)*bm, :] = sum_kb (x_tile[:, kb] @ w[group(t)][kb]) * xs[rows, kb] * ws[kb, cols]

Layout (what wgmma needs for 8-bit operands: both K-major in shared memory):
  x      [Mp, K]      e4m3, rows sorted by group, every group padded to a multiple of bm
  xs_T   [Kb, Mp]     fp32 activation scales, one per row and 128-wide K block (transposed, so a
                      tile's scales for one K block are one contiguous TMA row)
  w      [G, N, K]    e4m3, each expert's weight stored transposed (K contiguous): the "B operand
                      K-major" layout; `plgpu.transpose_ref` presents it to wgmma as [K, N]
  ws     [G, Kb, N]   fp32 weight scales per K block and output column (a 128x128 block scale
                      repeated over its 128 columns; per-column scales as wgrad needs also fit)
  tile_group [Mp/bm]  int32 expert of each row tile, -1 for tiles past the last group

Each 128-wide K step issues one wgmma into a fresh accumulator, waits for it, and adds it to the
fp32 register accumulator scaled by the outer product of the two scale vectors: the DeepSeek-V3
recipe's per-block promotion (REFERENCE.md section 4), which also sidesteps the tensor cores'
limited-precision FP8 accumulation. Operand tiles stream through `plgpu.emit_pipeline`
(`max_concurrent_steps` TMA stages in flight). The grid is persistent: `ctas_per_sm` CTAs per SM
walk the (row tile, column tile) pairs in a snake order for L2 reuse.

`grouped_padded_layout` moves expert-sorted rows into the padded layout and back (plain jnp
gathers); `gemm_padded_emulated` is a jnp model of the kernel over the same layout, which the CPU
tests use to check the layout code, since neither the interpreter nor XLA:CPU can run wgmma.

Status: the kernel lowers through Mosaic GPU down to wgmma instructions on a CPU-only jaxlib
(tests/test_kernels_mosaic_gpu.py checks this). It has not been executed on a GPU yet;
benchmarks/pallas_kernels_bench.py checks it against the reference and times it when one is present.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _common as C


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
  """bm x bn output tile per CTA (one warpgroup: bm is 64 or 128, registers hold two bm x bn
  fp32 tiles), `stages` TMA pipeline stages, `ctas_per_sm` CTAs resident per SM. The K step is
  fixed at 128, the scaling block."""
  bm: int = 64
  bn: int = 128
  stages: int = 4
  ctas_per_sm: int = 2


def _num_sms(num_sms: int | None) -> int:
  if num_sms is not None:
    return num_sms
  device = jax.devices()[0]
  return getattr(device, "core_count", None) or 132  # H100/H200 SXM have 132 SMs


def gemm_padded(x, xs_T, w_GNK, ws_GKbN, tile_group, *, out_dtype=jnp.bfloat16,
                block_sizes: GpuBlockSizes = GpuBlockSizes(), num_sms: int | None = None):
  """The Mosaic GPU kernel over the padded layout (module docstring) -> [Mp, N] out_dtype."""
  from jax.experimental.pallas import mosaic_gpu as plgpu

  bs = block_sizes
  mp, k = x.shape
  num_groups, n, _ = w_GNK.shape
  tk = C.QUANT_TILE
  if mp % bs.bm or n % bs.bn or k % tk:
    raise ValueError(f"padded layout needs M % {bs.bm}, N % {bs.bn}, K % {tk} == 0; got "
                     f"x {x.shape}, w {w_GNK.shape}")
  if xs_T.shape != (k // tk, mp) or ws_GKbN.shape != (num_groups, k // tk, n):
    raise ValueError(f"scales xs_T {xs_T.shape} / ws {ws_GKbN.shape} do not match x {x.shape} "
                     f"/ w {w_GNK.shape}")
  grid_m, grid_n, k_steps = mp // bs.bm, n // bs.bn, k // tk
  tile_shape = (bs.bm, bs.bn)

  def body(x_gmem, xs_gmem, w_gmem, ws_gmem, group_gmem, o_gmem):
    @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
    def _tile(loop_info):
      mi, ni = plgpu.planar_snake(loop_info.index[0], (grid_m, grid_n), 1, 1)
      group = group_gmem[mi]

      @pl.when(group >= 0)
      def _():
        def k_step(_, x_smem, w_smem, xs_smem, ws_smem, acc):
          def mma(acc_ref):
            plgpu.wgmma(acc_ref, x_smem, plgpu.transpose_ref(w_smem, (1, 0)))
            return acc_ref[...]

          part = pl.run_scoped(mma, plgpu.ACC(tile_shape, jnp.float32))
          scale = (lax.broadcast_in_dim(xs_smem[0, :], tile_shape, [0])
                   * lax.broadcast_in_dim(ws_smem[0, :], tile_shape, [1]))
          return acc + part * scale

        acc = plgpu.emit_pipeline(
            k_step,
            grid=(k_steps,),
            in_specs=[
                plgpu.BlockSpec((bs.bm, tk), lambda kb: (mi, kb)),
                plgpu.BlockSpec((bs.bn, tk), lambda kb: (ni, kb)),
                plgpu.BlockSpec((1, bs.bm), lambda kb: (kb, mi)),
                plgpu.BlockSpec((1, bs.bn), lambda kb: (kb, ni)),
            ],
            max_concurrent_steps=min(bs.stages, k_steps),
            init_carry=jnp.zeros(tile_shape, jnp.float32),
        )(x_gmem, w_gmem.at[group], xs_gmem, ws_gmem.at[group])

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM(tile_shape, out_dtype))
        def _store(o_smem):
          o_smem[...] = acc.astype(out_dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(
              o_smem, o_gmem.at[pl.ds(mi * bs.bm, bs.bm), pl.ds(ni * bs.bn, bs.bn)])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((mp, n), out_dtype),
      grid=(_num_sms(num_sms) * bs.ctas_per_sm,),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )
  return kernel(x, xs_T, w_GNK, ws_GKbN, tile_group)


def gemm_padded_emulated(x, xs_T, w_GNK, ws_GKbN, tile_group, *, out_dtype=jnp.bfloat16,
                         block_sizes: GpuBlockSizes = GpuBlockSizes(), num_sms=None):
  """jnp model of `gemm_padded`: same layout, same per-K-block scaling; tiles with group -1
  come out as zeros (the kernel leaves them unwritten; callers never read them)."""
  del num_sms
  bm, tk = block_sizes.bm, C.QUANT_TILE
  mp, k = x.shape
  t, kb = mp // bm, k // tk
  g = jnp.maximum(tile_group, 0)
  w = w_GNK[g].astype(jnp.float32).reshape(t, -1, kb, tk)  # [T, N, Kb, tk]
  xb = x.astype(jnp.float32).reshape(t, bm, kb, tk)
  part = jnp.einsum("tmbk,tnbk->tbmn", xb, w, precision=lax.Precision.HIGHEST)
  scale = xs_T.reshape(kb, t, bm).transpose(1, 0, 2)[..., None] * ws_GKbN[g][:, :, None, :]
  y = (part * scale).sum(1).reshape(mp, -1)
  valid = jnp.repeat(tile_group >= 0, bm)
  return jnp.where(valid[:, None], y, 0).astype(out_dtype)


def grouped_padded_layout(group_sizes, m: int, bm: int):
  """Row maps between expert-sorted rows [m] and the padded layout (each group's rows start on a
  multiple of bm). Returns (dest [m] int32: padded row of each sorted row, tile_group [T], mp)
  with T = ceil(m / bm) + G, a static bound on the padded tile count. Rows past
  sum(group_sizes) map into the last tile, which no group reaches (its group is -1); callers
  zero those rows of the output.
  """
  num_groups = group_sizes.shape[0]
  num_tiles = C.cdiv(m, bm) + num_groups
  mp = num_tiles * bm
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  padded = (sizes + bm - 1) // bm * bm
  padded_ends = jnp.cumsum(padded)
  padded_starts = padded_ends - padded
  rows = jnp.arange(m, dtype=jnp.int32)
  row_group = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)  # G for spare rows
  in_group = row_group < num_groups
  g = jnp.minimum(row_group, num_groups - 1)
  # Spare rows (past the last group) land in the final tile, which no group reaches: the groups
  # fill at most ceil(m / bm) + G - 1 tiles.
  dest = jnp.where(in_group, padded_starts[g] + rows - starts[g], mp - bm + rows % bm)
  tile_start = jnp.arange(num_tiles, dtype=jnp.int32) * bm
  tile_group = jnp.searchsorted(padded_ends, tile_start, side="right").astype(jnp.int32)
  tile_group = jnp.where(tile_group < num_groups, tile_group, -1)
  return dest.astype(jnp.int32), tile_group, mp


def _pad_to(a, axis, multiple):
  return C.pad_axis(a, axis, C.round_up(a.shape[axis], multiple))


def dense(xq, xs, wq, ws_KN, *, out_dtype, block_sizes: GpuBlockSizes = GpuBlockSizes(),
          impl=gemm_padded):
  """xq [M, K] e4m3, xs [M, Kb], wq [K, N] e4m3, per-column scales ws_KN [Kb, N] -> [M, N].

  Zero-pads M, N and K to the tiles (zero rows/columns add nothing); the weight is passed
  transposed ([N, K], K-major), which XLA fuses into the producer when wq is quantized in the
  same jit.
  """
  m, k = xq.shape
  n = wq.shape[1]
  bs = block_sizes
  x = _pad_to(_pad_to(xq, 0, bs.bm), 1, C.QUANT_TILE)
  xs_T = _pad_to(xs, 0, bs.bm).T
  w_NK = _pad_to(_pad_to(wq.T, 0, bs.bn), 1, C.QUANT_TILE)
  ws = _pad_to(ws_KN, 1, bs.bn)
  tile_group = jnp.zeros((x.shape[0] // bs.bm,), jnp.int32)
  y = impl(x, xs_T, w_NK[None], ws[None], tile_group, out_dtype=out_dtype, block_sizes=bs)
  return y[:m, :n]


def grouped(xq, xs, wq_GKN, ws_GKbN, group_sizes, *, out_dtype,
            block_sizes: GpuBlockSizes = GpuBlockSizes(), impl=gemm_padded):
  """Grouped FP8 GEMM (the ragged_dot contract): xq [M, K] e4m3 sorted by group with xs [M, Kb];
  wq [G, K, N] e4m3 with per-column scales [G, Kb, N] -> [M, N]; rows past sum(group_sizes)
  are zeros."""
  m, k = xq.shape
  n = wq_GKN.shape[2]
  bs = block_sizes
  dest, tile_group, mp = grouped_padded_layout(group_sizes, m, bs.bm)
  kp = C.round_up(k, C.QUANT_TILE)
  x = jnp.zeros((mp, kp), xq.dtype).at[dest, :k].set(xq)
  xs_T = jnp.zeros((mp, xs.shape[1]), xs.dtype).at[dest].set(xs).T
  w_GNK = _pad_to(_pad_to(jnp.swapaxes(wq_GKN, 1, 2), 1, bs.bn), 2, C.QUANT_TILE)
  ws = _pad_to(ws_GKbN, 2, bs.bn)
  y = impl(x, xs_T, w_GNK, ws, tile_group, out_dtype=out_dtype, block_sizes=bs)
  in_group = jnp.arange(m) < jnp.sum(group_sizes)
  return jnp.where(in_group[:, None], y[dest, :n], 0).astype(out_dtype)
