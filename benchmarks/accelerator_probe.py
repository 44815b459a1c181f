"""Probe of the FP8 round trip on an accelerator against the host CPU (issue 13 follow-up).

  python benchmarks/accelerator_probe.py

The first H200 run found the FP8 policy's sampler and scorer 0.2 nats apart on the GPU, the size
of the gap when the sampler does not round at all. This checks whether XLA on the device rounds
`dequantize(quantize(x))` (e4m3 in 1x128 tiles) as the CPU does, in one fused program and as two
programs, and how many elements are left unrounded. Prints one line per case.
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pallas_kernels import fp8  # noqa: E402


def main():
  x = (np.random.default_rng(0).standard_normal((64, 1024)) * 3).astype(np.float32)
  cpu, dev = jax.devices("cpu")[0], jax.devices()[0]
  round_trip = jax.jit(lambda x: fp8.dequantize_activations(*fp8.quantize_activations(x)))
  ref = np.asarray(round_trip(jax.device_put(x, cpu)))
  fused = np.asarray(round_trip(jax.device_put(x, dev)))
  q, s = fp8.quantize_activations(jax.device_put(x, dev))
  two = np.asarray(jax.jit(fp8.dequantize_activations)(q, s))
  for name, y in (("fused round trip", fused), ("quantize, then dequantize", two)):
    print(f"{dev.platform} {name}: {np.mean(y != ref):.4%} differ from the CPU's, "
          f"{np.mean(y == x):.4%} unrounded (CPU {np.mean(ref == x):.4%}), "
          f"max |diff| {np.abs(y - ref).max():.3g}", flush=True)
  # the sampler's form: a round trip inside a larger fused program (here a matmul after it)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((1024, 256)).astype(np.float32))
  f = jax.jit(lambda x, w: jnp.dot(round_trip(x), w, precision="highest"))
  a = np.asarray(f(jax.device_put(x, dev), jax.device_put(w, dev)))
  b = np.asarray(f(jax.device_put(x, cpu), jax.device_put(w, cpu)))
  c = np.asarray(jnp.dot(jax.device_put(x, cpu), jax.device_put(w, cpu), precision="highest"))
  print(f"{dev.platform} round trip then matmul: max |dev - cpu| {np.abs(a - b).max():.3g}, "
        f"max |cpu unrounded - cpu| {np.abs(c - b).max():.3g}", flush=True)


if __name__ == "__main__":
  main()
