"""Kernel benchmarks: FP8 GEMM vs bf16 jnp.dot, Pallas gmm vs jax.lax.ragged_dot.

  python benchmarks/kernels.py            # writes benchmarks/results/kernels.json

On GPU/TPU: compiled timings (median of several runs after warmup) in TFLOP/s at DeepSeek-V3
shapes. On CPU: interpret-mode correctness on small shapes only (timings need an accelerator).
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
from pallas_kernels import fp8, gmm  # noqa: E402

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


def bench_gemm(m, k, n):
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
  w = (jax.random.normal(keys[1], (k, n)) * k ** -0.5).astype(jnp.bfloat16)
  xq, xs = fp8.quantize_activations(x)
  wq, ws = fp8.quantize_weights(w)
  flops = 2 * m * k * n
  return [
      _timed(f"bf16 jnp.dot {m}x{k}x{n}", flops,
             lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype), x, w),
      _timed(f"fp8 matmul (prequantized) {m}x{k}x{n}", flops,
             lambda *a: fp8.matmul(*a, out_dtype=jnp.bfloat16), xq, xs, wq, ws),
      _timed(f"fp8 linear (quantize + matmul) {m}x{k}x{n}", flops, fp8.linear, x, w),
  ]


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
  return [
      _timed(f"ragged_dot bf16 {shape}", flops,
             lambda a, b, s: jax.lax.ragged_dot(a, b, s, preferred_element_type=jnp.float32)
             .astype(a.dtype), lhs, rhs, sizes),
      _timed(f"gmm bf16 {shape}", flops, gmm.gmm, lhs, rhs, sizes),
      _timed(f"gmm fp8 (on the fly) {shape}", flops,
             lambda a, b, s: gmm.gmm(a, b, s, fp8=True), lhs, rhs, sizes),
  ]


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
  RESULTS.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {RESULTS}")


if __name__ == "__main__":
  main()
