"""The Mosaic GPU FP8 wgmma kernel (pallas_kernels/_mosaic_gpu.py) on a CPU-only machine.

Neither XLA:CPU nor the Pallas interpreters run wgmma, so this checks what can be checked here:
1. the kernel lowers for CUDA through Mosaic GPU down to wgmma instruction selection (the same
   code path that rejects, e.g., an FP8 B operand that is not K-major), at ragged shapes and for
   each tile configuration;
2. the padded grouped layout and the dense/grouped wrappers, with a jnp model of the kernel
   over the same layout, equal the FP8 references;
3. with R1JAX_MOSAIC_GPU=1 on a GPU backend, fp8.matmul and gmm_fp8 route to the kernel.
Numerics of the compiled kernel are checked by benchmarks/pallas_kernels_bench.py on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common as C
from pallas_kernels import _mosaic_gpu as MG
from pallas_kernels import fp8, gmm

E4M3 = jnp.float8_e4m3fn
S = jax.ShapeDtypeStruct


def _lower_cuda(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _dense_shapes(m, k, n):
  kb = -(-k // 128)
  return S((m, k), E4M3), S((m, kb), jnp.float32), S((k, n), E4M3), S((kb, n), jnp.float32)


@pytest.mark.parametrize("bm,bn", [(64, 128), (128, 128), (64, 256)])
@pytest.mark.parametrize("mkn", [(256, 512, 384), (200, 300, 260)])
def test_dense_kernel_lowers_to_mosaic_gpu(bm, bn, mkn):
  bs = MG.GpuBlockSizes(bm=bm, bn=bn)
  text = _lower_cuda(lambda *a: MG.dense(*a, out_dtype=jnp.bfloat16, block_sizes=bs),
                     *_dense_shapes(*mkn))
  assert "mosaic_gpu" in text


def test_grouped_kernel_lowers_to_mosaic_gpu():
  m, k, n, g = 300, 384, 256, 5
  text = _lower_cuda(
      lambda *a: MG.grouped(*a, out_dtype=jnp.bfloat16),
      S((m, k), E4M3), S((m, k // 128), jnp.float32), S((g, k, n), E4M3),
      S((g, k // 128, n), jnp.float32), S((g,), jnp.int32))
  assert "mosaic_gpu" in text


def test_lowering_rejects_fp8_operand_that_is_not_k_major():
  """The lowering check has teeth: wgmma on 8-bit types needs B K-major; an [K, N] tile fed
  straight in (what a bf16 kernel may do) fails at lowering, so the tests above would catch a
  kernel that broke the FP8 layout rule."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu

  def body(x_gmem, w_gmem, o_gmem):
    def step(_, x_smem, w_smem, acc):
      def mma(acc_ref):
        plgpu.wgmma(acc_ref, x_smem, w_smem)
        return acc_ref[...]
      return acc + pl.run_scoped(mma, plgpu.ACC((64, 128), jnp.float32))

    acc = plgpu.emit_pipeline(
        step, grid=(2,),
        in_specs=[plgpu.BlockSpec((64, 128), lambda kb: (0, kb)),
                  plgpu.BlockSpec((128, 128), lambda kb: (kb, 0))],
        init_carry=jnp.zeros((64, 128), jnp.float32))(x_gmem, w_gmem)
    o_gmem[...] = acc

  kernel = plgpu.kernel(body, out_type=S((64, 128), jnp.float32), compiler_params=
                        plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  with pytest.raises(Exception, match="transpose"):
    _lower_cuda(kernel, S((64, 256), E4M3), S((256, 128), E4M3))


def _quantized(m, k, n, seed=0):
  x = jax.random.normal(jax.random.key(seed), (m, k))
  w = jax.random.normal(jax.random.key(seed + 1), (k, n)) * k ** -0.5
  return (*fp8.quantize_activations(x), *fp8.quantize_weights(w))


@pytest.mark.parametrize("bm", [64, 128])
def test_dense_layout_matches_reference(bm):
  xq, xs, wq, ws = _quantized(200, 300, 260)
  ref = fp8.matmul_reference(xq, xs, wq, ws, out_dtype=jnp.float32)
  dense = jax.jit(functools.partial(MG.dense, out_dtype=jnp.float32, impl=MG.gemm_padded_emulated,
                                    block_sizes=MG.GpuBlockSizes(bm=bm)))
  y = dense(xq, xs, wq, fp8._column_scales(ws, 260))
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [[70, 0, 3, 64, 40], [0, 0, 200, 0, 0], [1, 1, 1, 1, 1]])
def test_grouped_layout_matches_reference(sizes):
  """Empty groups, one group taking every row, and mostly spare rows (past sum(sizes): zeros)."""
  m, k, n = 200, 300, 260
  xq, xs, _, _ = _quantized(m, k, n)
  rq, rs = fp8.quantize_weights(jax.random.normal(jax.random.key(5), (5, k, n)) * k ** -0.5)
  sizes = jnp.array(sizes, jnp.int32)
  ref = gmm.gmm_fp8_reference(xq, xs, rq, rs, sizes, out_dtype=jnp.float32)
  grouped = jax.jit(functools.partial(MG.grouped, out_dtype=jnp.float32,
                                      impl=MG.gemm_padded_emulated))
  y = grouped(xq, xs, rq, jnp.repeat(rs, 128, axis=-1)[..., :n], sizes)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  assert not bool(jnp.any(y[int(sizes.sum()):]))


def test_padded_layout_tables():
  sizes = jnp.array([70, 0, 3, 64], jnp.int32)
  dest, tile_group = jax.jit(lambda s: MG.grouped_padded_layout(s, 150, 64)[:2])(sizes)
  mp = (3 + 4) * 64  # ceil(150 / 64) + G tiles
  # Groups start on tile boundaries: group 0 -> tiles 0-1, group 2 -> tile 2, group 3 -> tile 3.
  np.testing.assert_array_equal(tile_group, [0, 0, 2, 3, -1, -1, -1])
  np.testing.assert_array_equal(dest[:70], np.arange(70))
  np.testing.assert_array_equal(dest[70:73], 128 + np.arange(3))
  np.testing.assert_array_equal(dest[73:137], 192 + np.arange(64))
  assert bool(jnp.all(dest[137:] >= mp - 64))  # spare rows go to the tile no group reaches


def test_routing_to_the_kernel_on_gpu(monkeypatch):
  """With R1JAX_MOSAIC_GPU=1 and a GPU backend, the public FP8 entry points lower to the Mosaic
  GPU kernel; without the switch they use the XLA fallback (no Mosaic custom call)."""
  monkeypatch.setattr(C, "backend", lambda: "gpu")
  shapes = _dense_shapes(256, 512, 384)
  jax.clear_caches()
  monkeypatch.setenv("R1JAX_MOSAIC_GPU", "0")
  assert "mosaic_gpu" not in _lower_cuda(
      lambda *a: fp8.matmul(*a, interpret=False), *shapes)
  monkeypatch.setenv("R1JAX_MOSAIC_GPU", "1")
  jax.clear_caches()
  assert "mosaic_gpu" in _lower_cuda(lambda *a: fp8.matmul(*a, interpret=False), *shapes)
  g = 4
  assert "mosaic_gpu" in _lower_cuda(
      lambda *a: gmm.gmm_fp8(*a, interpret=False),
      S((256, 512), E4M3), S((256, 4), jnp.float32), S((g, 512, 384), E4M3),
      S((g, 4, 3), jnp.float32), S((g,), jnp.int32))
  jax.clear_caches()
