"""Small helpers shared by the kernel modules: backend choice, padding, tile sizes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

# FP8 recipe constants (REFERENCE.md section 4).
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0
QUANT_TILE = 128


def backend() -> str:
  return jax.default_backend()


def resolve_interpret(interpret: bool | None) -> bool:
  """None means: interpret on CPU (no Pallas compiler there), compile elsewhere."""
  if interpret is None:
    return backend() == "cpu"
  return bool(interpret)


def use_pallas(interpret: bool) -> bool:
  """Whether the Pallas (Mosaic TPU / interpreter) kernels serve this call.

  The grouped kernels use scalar prefetch and a sequential reduction grid axis, which only the
  Mosaic TPU compiler and the interpreter support. Compiled on GPU, callers fall back to XLA
  (see the module docstrings).
  """
  return interpret or backend() == "tpu"


def use_mosaic_gpu(interpret: bool) -> bool:
  """Whether the FP8 GEMMs run the Mosaic GPU wgmma kernel (`_mosaic_gpu.py`).

  Opt-in with R1JAX_MOSAIC_GPU=1: on an H200 the kernels matched their references but ran at
  0.73-0.94x of bf16 dots, and they have not run inside a model step on a GPU yet; otherwise
  compiled GPU calls use the XLA fallback. Read when a function is traced: set it before the
  first call (or `jax.clear_caches()` after changing it).
  """
  return (not interpret and backend() == "gpu"
          and os.environ.get("R1JAX_MOSAIC_GPU", "0") == "1")


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def cdiv(n: int, m: int) -> int:
  return -(-n // m)


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `axis` of x up to `size` (no-op when already that size)."""
  extra = size - x.shape[axis]
  assert extra >= 0, (x.shape, axis, size)
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def fit_tile(tile: int, dim: int, align: int) -> int:
  """Shrinks `tile` for small dims so tiny problems are not padded to a full tile."""
  return min(tile, round_up(dim, align))
