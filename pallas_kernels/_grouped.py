"""Grouped-matmul Pallas kernels shared by `gmm` (many groups) and `fp8.matmul` (one group).

Rows of `lhs` are sorted by group; group g owns rows [offsets[g], offsets[g+1]). The rows are cut
into tiles of `tm`. A tile may straddle groups, so the grid walks *work items* = (row tile, group)
pairs that overlap, in tile-major order (at most num_tiles + G - 1 of them, a static bound).
Scalar prefetch hands the item tables to the BlockSpec index maps, so each step DMAs exactly the
lhs tile and the expert's rhs block it needs. Empty groups produce no items.

  gmm:  out[M, N]     = lhs[M, K] @ rhs[group(row), K, N]      grid (N/tn, items, K/tk)
  tgmm: out[G, K, N]  = lhs[rows_g, K]^T @ dout[rows_g, N]       grid (K/tk, N/tn, items)

Optional FP8 scaling (gmm only): lhs_scale per row and 128-wide K block, rhs_scale per K block and
output column; the fp32 partial product of every 128-wide K block is scaled before accumulation,
as the DeepSeek-V3 recipe prescribes.

`grouped_matmul_xla` and `transposed_grouped_matmul_xla` walk the same work items in plain XLA
(the gmm and tgmm fallbacks off TPU): every item is one masked tile product, read back by its
rows (gmm) or summed into its group (tgmm), at a cost of ~(M + G*tm)*K*N rather than the
G*M*K*N of XLA's dense expansion of `ragged_dot` over groups.

Tested in interpret mode on CPU only. The layout choices (scales with a leading K-block axis and
a trailing unit axis, so block shapes satisfy Mosaic's (8, 128) rule) target Mosaic TPU but have
not been compiled there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common as C


def group_metadata(group_sizes: jax.Array, m_pad: int, tm: int):
  """Work-item tables for row tiles of size tm over m_pad rows.

  Returns offsets [G+1], item_group [W], item_tile [W], item_valid [W] (int32), with
  W = m_pad // tm + G - 1. Items past the real count repeat the last real item with valid=0, so
  they revisit the same output block and change nothing.
  """
  num_groups = group_sizes.shape[0]
  num_tiles = m_pad // tm
  ends = jnp.cumsum(group_sizes.astype(jnp.int32))
  starts = ends - group_sizes.astype(jnp.int32)
  tile_lo = jnp.arange(num_tiles, dtype=jnp.int32)[:, None] * tm
  overlap_TG = jnp.minimum(ends[None, :], tile_lo + tm) > jnp.maximum(starts[None, :], tile_lo)
  num_items = num_tiles + num_groups - 1
  count = overlap_TG.sum()
  (flat_idx,) = jnp.nonzero(overlap_TG.ravel(), size=num_items, fill_value=0)
  valid = jnp.arange(num_items) < count
  flat_idx = jnp.where(valid, flat_idx, flat_idx[jnp.maximum(count - 1, 0)])
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
  return (offsets, (flat_idx % num_groups).astype(jnp.int32),
          (flat_idx // num_groups).astype(jnp.int32), valid.astype(jnp.int32))


def _row_mask(offsets_ref, g, tile, tm):
  rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
  return (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])


def _dot(a, b, upcast_fp8):
  if upcast_fp8 and a.dtype == C.FP8_DTYPE:
    # e4m3 is exactly representable in bf16; TPUs before v7 have no FP8 MXU path.
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)


def _gmm_kernel(offsets_ref, group_ref, tile_ref, valid_ref, *refs, tm, scaled, upcast_fp8):
  if scaled:
    lhs_ref, ls_ref, rhs_ref, rs_ref, out_ref, acc_ref = refs
  else:
    lhs_ref, rhs_ref, out_ref, acc_ref = refs
  w, k = pl.program_id(1), pl.program_id(2)

  @pl.when(k == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(valid_ref[w] == 1)
  def _():
    if not scaled:
      acc_ref[...] += _dot(lhs_ref[...], rhs_ref[...], upcast_fp8)
      return
    # One fp32 partial per 128-wide K block, scaled before it joins the accumulator.
    for j in range(ls_ref.shape[0]):
      ks = slice(j * C.QUANT_TILE, (j + 1) * C.QUANT_TILE)
      part_MN = _dot(lhs_ref[:, ks], rhs_ref[ks, :], upcast_fp8)
      acc_ref[...] += part_MN * ls_ref[j] * rs_ref[j]  # [tm,1] and [1,tn] scales

  @pl.when(k == pl.num_programs(2) - 1)
  def _():
    # Rows of other groups in this tile belong to neighbouring items: keep what is there.
    mask = _row_mask(offsets_ref, group_ref[w], tile_ref[w], tm) & (valid_ref[w] == 1)
    out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(
        out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tm", "tk", "tn", "interpret"))
def grouped_matmul(lhs, rhs, group_sizes, lhs_scale=None, rhs_scale=None, *, out_dtype, tm, tk,
                   tn, interpret):
  """lhs [M, K], rhs [G, K, N], group_sizes [G] -> [M, N] (rows past sum(group_sizes) are 0).

  With scales: lhs_scale [M, ceil(K/128)], rhs_scale [G, ceil(K/128), N] (per output column;
  callers expand 128x128 block scales). tk must then be a multiple of 128.
  """
  m, k = lhs.shape
  num_groups, _, n = rhs.shape
  scaled = lhs_scale is not None
  tm, tn = C.fit_tile(tm, m, 32), C.fit_tile(tn, n, 128)
  tk = C.fit_tile(tk, k, 128)
  m_pad, k_pad, n_pad = C.round_up(m, tm), C.round_up(k, tk), C.round_up(n, tn)
  lhs = C.pad_axis(C.pad_axis(lhs, 0, m_pad), 1, k_pad)
  rhs = C.pad_axis(C.pad_axis(rhs, 1, k_pad), 2, n_pad)
  meta = group_metadata(group_sizes, m_pad, tm)
  num_items = meta[1].shape[0]

  lhs_spec = pl.BlockSpec((tm, tk), lambda n_, w, k_, off, grp, til, val: (til[w], k_))
  rhs_spec = pl.BlockSpec((pl.Squeezed(), tk, tn),
                          lambda n_, w, k_, off, grp, til, val: (grp[w], k_, n_))
  in_specs, operands = [lhs_spec, rhs_spec], [lhs, rhs]
  if scaled:
    kb, kb_pad, sub = lhs_scale.shape[1], k_pad // C.QUANT_TILE, tk // C.QUANT_TILE
    assert rhs_scale.shape == (num_groups, kb, n), (rhs_scale.shape, kb, n)
    # Leading K-block axis: the kernel indexes it dynamically-free (static j), and the trailing
    # unit axis keeps the last two block dims legal on Mosaic TPU.
    ls = C.pad_axis(C.pad_axis(lhs_scale.astype(jnp.float32), 0, m_pad), 1, kb_pad).T[..., None]
    rs = C.pad_axis(C.pad_axis(rhs_scale.astype(jnp.float32), 1, kb_pad), 2, n_pad)[:, :, None]
    ls_spec = pl.BlockSpec((sub, tm, 1), lambda n_, w, k_, off, grp, til, val: (k_, til[w], 0))
    rs_spec = pl.BlockSpec((pl.Squeezed(), sub, 1, tn),
                           lambda n_, w, k_, off, grp, til, val: (grp[w], k_, 0, n_))
    in_specs, operands = [lhs_spec, ls_spec, rhs_spec, rs_spec], [lhs, ls, rhs, rs]

  out = pl.pallas_call(
      functools.partial(_gmm_kernel, tm=tm, scaled=scaled, upcast_fp8=C.backend() == "tpu"),
      out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(n_pad // tn, num_items, k_pad // tk),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((tm, tn), lambda n_, w, k_, off, grp, til, val: (til[w], n_)),
          scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
  )(*meta, *operands)
  # Tiles (or rows) that no group covers were never written: define them as ragged_dot does.
  rows = jnp.arange(m)[:, None]
  return jnp.where(rows < meta[0][-1], out[:m, :n], 0).astype(out_dtype)


def _tgmm_kernel(offsets_ref, group_ref, tile_ref, valid_ref, lhs_ref, dout_ref, out_ref,
                 acc_ref, *, tm):
  w, last_w = pl.program_id(2), pl.num_programs(2) - 1
  g, valid = group_ref[w], valid_ref[w] == 1
  prev_w, next_w = jnp.maximum(w - 1, 0), jnp.minimum(w + 1, last_w)
  is_first = valid & ((w == 0) | (group_ref[prev_w] != g))
  is_last = valid & ((w == last_w) | (group_ref[next_w] != g) | (valid_ref[next_w] == 0))

  @pl.when(is_first)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(valid)
  def _():
    mask = _row_mask(offsets_ref, g, tile_ref[w], tm)
    lhs = jnp.where(mask, lhs_ref[...], jnp.zeros((), lhs_ref.dtype))
    precision = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
    acc_ref[...] += jax.lax.dot_general(lhs, dout_ref[...], (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32, precision=precision)

  @pl.when(is_last)
  def _():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tm", "tk", "tn", "interpret"))
def transposed_grouped_matmul(lhs, dout, group_sizes, *, out_dtype, tm, tk, tn, interpret):
  """lhs [M, K], dout [M, N], group_sizes [G] -> [G, K, N]; empty groups give zeros."""
  m, k = lhs.shape
  n = dout.shape[1]
  num_groups = group_sizes.shape[0]
  tm, tk, tn = C.fit_tile(tm, m, 32), C.fit_tile(tk, k, 128), C.fit_tile(tn, n, 128)
  m_pad, k_pad, n_pad = C.round_up(m, tm), C.round_up(k, tk), C.round_up(n, tn)
  lhs = C.pad_axis(C.pad_axis(lhs, 0, m_pad), 1, k_pad)
  dout = C.pad_axis(C.pad_axis(dout, 0, m_pad), 1, n_pad)
  meta = group_metadata(group_sizes, m_pad, tm)
  num_items = meta[1].shape[0]

  out = pl.pallas_call(
      functools.partial(_tgmm_kernel, tm=tm),
      out_shape=jax.ShapeDtypeStruct((num_groups, k_pad, n_pad), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(k_pad // tk, n_pad // tn, num_items),
          in_specs=[
              pl.BlockSpec((tm, tk), lambda k_, n_, w, off, grp, til, val: (til[w], k_)),
              pl.BlockSpec((tm, tn), lambda k_, n_, w, off, grp, til, val: (til[w], n_)),
          ],
          out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn),
                                 lambda k_, n_, w, off, grp, til, val: (grp[w], k_, n_)),
          scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(*meta, lhs, dout)
  # Empty groups own no work item, so their blocks were never written.
  return jnp.where(group_sizes[:, None, None] > 0, out[:, :k, :n], 0).astype(out_dtype)


def xla_row_tile(m: int, num_groups: int) -> int:
  """Row tile of `transposed_grouped_matmul_xla`: about half the mean group, so the static item
  bound (m/tm + G - 1 tiles of tm rows) costs ~1.5 m rows of work, and the per-item products
  (~3G of [K, N]) stay a small multiple of the [G, K, N] output."""
  return C.round_up(C.cdiv(max(m, 1), 2 * max(num_groups, 1)), 8)


def _xla_work_items(lhs, group_sizes, tm):
  """The work items of the plain-XLA fallbacks: (tm, m_pad, offsets, group_W, tile_W, valid_W,
  lhs_Wtk), lhs_Wtk [W, tm, K] holding each item's tile with other groups' rows zeroed."""
  m, k = lhs.shape
  tm = tm or xla_row_tile(m, group_sizes.shape[0])
  m_pad = C.round_up(m, tm)
  offsets, group_W, tile_W, valid_W = group_metadata(group_sizes, m_pad, tm)
  rows_Wt = tile_W[:, None] * tm + jnp.arange(tm, dtype=jnp.int32)
  member_Wt = ((rows_Wt >= offsets[group_W][:, None]) & (rows_Wt < offsets[group_W + 1][:, None])
               & (valid_W[:, None] == 1))
  lhs_Wtk = C.pad_axis(lhs, 0, m_pad).reshape(m_pad // tm, tm, k)[tile_W]
  lhs_Wtk = jnp.where(member_Wt[..., None], lhs_Wtk, jnp.zeros((), lhs.dtype))
  return tm, m_pad, offsets, group_W, tile_W, valid_W, lhs_Wtk


@functools.partial(jax.jit, static_argnames=("out_dtype", "tm"))
def grouped_matmul_xla(lhs, rhs, group_sizes, *, out_dtype, tm=None):
  """gmm in plain XLA: lhs [M, K] (rows sorted by group), rhs [G, K, N], group_sizes [G] ->
  [M, N]; rows past sum(group_sizes) are zero.

  XLA's own `ragged_dot` on CPU and GPU expands over all G groups (G times the FLOPs and a
  [G, M, N]-sized temporary; measured with cost_analysis, and the H200 run's 23 TFLOP/s). Here
  every work item (row tile, group) multiplies its tile, rows of other groups zeroed, by its
  group's rhs: FLOPs 2*W*tm*K*N ~ 2*(M + G*tm)*K*N with W = M/tm + G - 1, independent of G at
  tm = xla_row_tile(M, G). Each row then reads its own item's product (a gather, so the result is
  the same on every run, unlike a scatter-add)."""
  m = lhs.shape[0]
  num_groups = rhs.shape[0]
  tm, _, offsets, group_W, tile_W, valid_W, lhs_Wtk = _xla_work_items(lhs, group_sizes, tm)
  precision = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
  out_Wtn = jnp.einsum("wtk,wkn->wtn", lhs_Wtk, rhs[group_W], precision=precision,
                       preferred_element_type=jnp.float32)
  # row r's item: the (tile, group) key, found among the items' keys (sorted, tile-major)
  rows = jnp.arange(m, dtype=jnp.int32)
  group_r = jnp.searchsorted(offsets[1:], rows, side="right").astype(jnp.int32)
  key_W = jnp.where(valid_W == 1, tile_W * num_groups + group_W, jnp.iinfo(jnp.int32).max)
  item_r = jnp.searchsorted(key_W, (rows // tm) * num_groups + group_r, side="left")
  item_r = jnp.minimum(item_r, key_W.shape[0] - 1)
  out = out_Wtn[item_r, rows % tm]
  return jnp.where((rows < offsets[-1])[:, None], out, 0).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tm"))
def transposed_grouped_matmul_xla(lhs, dout, group_sizes, *, out_dtype, tm=None):
  """tgmm in plain XLA: lhs [M, K], dout [M, N], group_sizes [G] -> [G, K, N].

  Work item w = (row tile, group) pair from `group_metadata` (W = M/tm + G - 1 static): its
  tile's rows of the group (the rest zeroed) give lhs_w^T @ dout_w [K, N] in fp32, and the items
  are summed per group. Rows past sum(group_sizes) and empty groups belong to no item: zeros.
  FLOPs 2*W*tm*K*N ~ 2*(M + G*tm)*K*N, which does not grow with G at tm = xla_row_tile(M, G).
  """
  n = dout.shape[1]
  num_groups = group_sizes.shape[0]
  tm, m_pad, _, group_W, tile_W, _, lhs_Wtk = _xla_work_items(lhs, group_sizes, tm)
  dout_Wtn = C.pad_axis(dout, 0, m_pad).reshape(m_pad // tm, tm, n)[tile_W]
  precision = jax.lax.Precision.HIGHEST if lhs.dtype == jnp.float32 else None
  part_Wkn = jnp.einsum("wtk,wtn->wkn", lhs_Wtk, dout_Wtn, precision=precision,
                        preferred_element_type=jnp.float32)
  # items are sorted by group (tile-major over rows sorted by group)
  out = jax.ops.segment_sum(part_Wkn, group_W, num_segments=num_groups, indices_are_sorted=True)
  return out.astype(out_dtype)
