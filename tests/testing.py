"""Torch-free test helpers: fast-compiling jit and random parameters without model.init.

XLA:CPU's LLVM backend optimizations and its fusion emitters dominate the compile time of the tiny
test models (measured on the 2-core CPU: a forward+backward compile of the test MoE takes ~20 s
by default, ~3.5 s with both off) and buy nothing at these sizes; the maths is unchanged.
"""

from __future__ import annotations

import jax
import numpy as np

from r1jax import model

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def jit(fn, **kw):
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kw)


def random_params(cfg, seed: int = 0, std: float = 0.1):
  """Random params of `cfg` in numpy (no per-leaf XLA compiles, unlike model.init): norms
  1 + std*randn, router biases uniform [0, std), everything else std*randn."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten_with_path(model.abstract(cfg))

  def make(path, s):
    name = jax.tree_util.keystr(path)
    x = rng.standard_normal(s.shape, dtype=np.float32)
    if "norm" in name:
      x = 1 + std * x
    elif "router_bias" in name:
      x = std * rng.random(s.shape, dtype=np.float32)
    else:
      x = std * x
    return jax.numpy.asarray(x, s.dtype)

  return jax.tree.unflatten(treedef, [make(p, s) for p, s in leaves])
