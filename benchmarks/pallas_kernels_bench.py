"""Kernel benchmarks: FP8 GEMM vs bf16 jnp.dot, Pallas gmm vs jax.lax.ragged_dot.

  python benchmarks/pallas_kernels_bench.py            # writes benchmarks/results/kernels.json

On GPU/TPU: compiled kernels (interpret=False) checked against their references at ragged
shapes, then timings (median of several runs after warmup) in TFLOP/s at DeepSeek-V3 shapes. On a
GPU the Mosaic wgmma FP8 kernel is timed directly for a few tile configurations; with
R1JAX_MOSAIC_GPU=1 the default `fp8.matmul`/`gmm` paths use it too (else they fall back to
XLA). On CPU: interpret-mode correctness on small shapes only (timings need an accelerator).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import provenance  # noqa: E402
from pallas_kernels import _mosaic_gpu, fp8, gmm  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "kernels.json"


def _median_seconds(fn, *args, warmup=3, runs=10):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _timed(name, flops, fn, *args):
  try:
    seconds = _median_seconds(jax.jit(fn), *args)
    return {"name": name, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12}
  except Exception as e:  # a kernel that does not compile here is a result too
    return {"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


# Mosaic GPU tile configurations tried on a GPU: (bm, bn, stages, ctas_per_sm).
GPU_CONFIGS = [(64, 128, 4, 2), (64, 256, 4, 1), (128, 128, 4, 1), (64, 128, 6, 1)]


def _operands(m, k, n, key=0):
  keys = jax.random.split(jax.random.key(key), 2)
  x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  w = (jax.random.normal(keys[1], (k, n)) * k ** -0.5).astype(jnp.bfloat16)
  return x, w


def bench_gemm(m, k, n):
  x, w = _operands(m, k, n)
  xq, xs = fp8.quantize_activations(x)
  wq, ws = fp8.quantize_weights(w)
  flops = 2 * m * k * n
  rows = [
      _timed(f"bf16 jnp.dot {m}x{k}x{n}", flops,
             lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype), x, w),
      _timed(f"fp8 matmul, default path {m}x{k}x{n}", flops,
             lambda *a: fp8.matmul(*a, out_dtype=jnp.bfloat16), xq, xs, wq, ws),
  ]
  if jax.default_backend() == "gpu":
    # The kernel on operands already in its layout (w K-major, scales transposed): the GEMM alone.
    ws_cols = jnp.repeat(ws, 128, axis=1)[:, :n]
    w_NK, xs_T = wq.T[None], xs.T
    for bm, bn, stages, ctas in GPU_CONFIGS:
      bs = _mosaic_gpu.GpuBlockSizes(bm=bm, bn=bn, stages=stages, ctas_per_sm=ctas)
      if m % bm or n % bn or k % 128:
        continue
      rows.append(_timed(
          f"fp8 mosaic wgmma bm{bm} bn{bn} s{stages} c{ctas} {m}x{k}x{n}", flops,
          lambda a, b, c, d, bs=bs: _mosaic_gpu.gemm_padded(
              a, b, c, d, jnp.zeros((m // bs.bm,), jnp.int32), block_sizes=bs),
          xq, xs_T, w_NK, ws_cols[None]))
  rows.append(_timed(f"fp8 linear (quantize + matmul) {m}x{k}x{n}", flops, fp8.linear, x, w))
  return rows


def bench_gmm(num_groups, m, k, n):
  keys = jax.random.split(jax.random.key(1), 3)
  lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  rhs = (jax.random.normal(keys[1], (num_groups, k, n)) * k ** -0.5).astype(jnp.bfloat16)
  # Uneven but dropless expert loads that sum to m.
  weights = jax.random.uniform(keys[2], (num_groups,), minval=0.5, maxval=1.5)
  sizes = jnp.floor(weights / weights.sum() * m).astype(jnp.int32)
  sizes = sizes.at[0].add(m - sizes.sum())
  flops = 2 * m * k * n
  shape = f"G={num_groups} {m}x{k}x{n}"
  lq, ls = fp8.quantize_activations(lhs)
  rq, rs = fp8.quantize_weights(rhs)
  return [
      _timed(f"ragged_dot bf16 {shape}", flops,
             lambda a, b, s: jax.lax.ragged_dot(a, b, s, preferred_element_type=jnp.float32)
             .astype(a.dtype), lhs, rhs, sizes),
      _timed(f"gmm bf16 {shape}", flops, gmm.gmm, lhs, rhs, sizes),
      _timed(f"gmm_fp8 (prequantized) {shape}", flops,
             lambda *a: gmm.gmm_fp8(*a, out_dtype=jnp.bfloat16), lq, ls, rq, rs, sizes),
      _timed(f"gmm fp8 (on the fly) {shape}", flops,
             lambda a, b, s: gmm.gmm(a, b, s, fp8=True), lhs, rhs, sizes),
  ]


def check_compiled_correctness():
  """On a GPU/TPU: the compiled kernels (interpret=False) against their jnp references, at
  shapes with ragged edges (M, K, N not multiples of the tiles) and empty groups."""
  rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32))
                           / jnp.linalg.norm(b.astype(jnp.float32)))
  out = {}
  x, w = _operands(1000, 1100, 700, key=3)
  xq, xs = fp8.quantize_activations(x)
  wq, ws = fp8.quantize_weights(w)
  ref = fp8.matmul_reference(xq, xs, wq, ws, out_dtype=jnp.float32)
  out["fp8_matmul_rel_err"] = rel(fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.float32), ref)
  if jax.default_backend() == "gpu":
    for bm, bn, stages, ctas in GPU_CONFIGS:
      bs = _mosaic_gpu.GpuBlockSizes(bm=bm, bn=bn, stages=stages, ctas_per_sm=ctas)
      out[f"mosaic_dense_bm{bm}_bn{bn}_rel_err"] = _attempt(lambda bs=bs: rel(_mosaic_gpu.dense(
          xq, xs, wq, fp8._column_scales(ws, 700), out_dtype=jnp.float32, block_sizes=bs), ref))
  rhs = jnp.stack([w, -w, 2 * w, w * 0.5])
  sizes = jnp.array([300, 0, 650, 40], jnp.int32)  # 990 of 1000 rows: 10 spare rows
  rq, rs = fp8.quantize_weights(rhs)
  gref = gmm.gmm_fp8_reference(xq, xs, rq, rs, sizes, out_dtype=jnp.float32)
  out["gmm_fp8_rel_err"] = rel(gmm.gmm_fp8(xq, xs, rq, rs, sizes, out_dtype=jnp.float32), gref)
  if jax.default_backend() == "gpu":
    out["mosaic_grouped_rel_err"] = _attempt(lambda: rel(_mosaic_gpu.grouped(
        xq, xs, rq, jnp.repeat(rs, 128, axis=-1)[..., :700], sizes, out_dtype=jnp.float32),
        gref))
  out["gmm_bf16_rel_err"] = rel(gmm.gmm(x, rhs, sizes, preferred_element_type=jnp.float32),
                                gmm.gmm_reference(x, rhs, sizes,
                                                  preferred_element_type=jnp.float32))
  return out


def _attempt(fn):
  try:
    return fn()
  except Exception as e:  # a kernel that fails to compile is reported, not fatal
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def check_interpret_correctness():
  """Small-shape kernel-vs-reference errors in interpret mode (the CPU path)."""
  keys = jax.random.split(jax.random.key(2), 2)
  x = jax.random.normal(keys[0], (96, 200))
  w = jax.random.normal(keys[1], (200, 130)) * 200 ** -0.5
  xq, xs = fp8.quantize_activations(x)
  wq, ws = fp8.quantize_weights(w)
  y = fp8.matmul(xq, xs, wq, ws, out_dtype=jnp.float32)
  y_ref = fp8.matmul_reference(xq, xs, wq, ws, out_dtype=jnp.float32)
  exact = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
  rhs = jnp.stack([w, -w, 2 * w])
  sizes = jnp.array([30, 0, 66], jnp.int32)
  out = gmm.gmm(x, rhs, sizes)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  return {"fp8_matmul_vs_reference_max_abs": float(jnp.abs(y - y_ref).max()),
          "fp8_matmul_vs_float32_rel_frobenius": rel(y, exact),
          "gmm_vs_ragged_dot_max_abs": float(jnp.abs(out - gmm.gmm_reference(x, rhs, sizes)).max())}


def main():
  backend = jax.default_backend()
  report = {"backend": backend, "device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__}
  if backend == "cpu":
    report["interpret_correctness"] = check_interpret_correctness()
    print(json.dumps(report["interpret_correctness"], indent=2))
    print("CPU: kernels run in interpret mode; timings need a GPU or TPU.")
  else:
    report["compiled_correctness"] = check_compiled_correctness()
    print(json.dumps(report["compiled_correctness"], indent=2))
    rows = bench_gemm(4096, 7168, 2048) + bench_gemm(4096, 7168, 18432)
    rows += bench_gmm(32, 8192, 7168, 2048)
    report["results"] = rows
    print(f"{'benchmark':55s} {'ms':>9s} {'TFLOP/s':>9s}")
    for row in rows:
      if "error" in row:
        print(f"{row['name']:55s} error: {row['error']}")
      else:
        print(f"{row['name']:55s} {row['ms']:9.3f} {row['tflops']:9.1f}")
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  report.update(provenance.code())
  RESULTS.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
