"""Torch-free test helpers: fast-compiling jit and random parameters without model.init.

XLA:CPU's LLVM backend optimizations and its fusion emitters dominate the compile time of the tiny
test models (measured on the 2-core CPU: a forward+backward compile of the test MoE takes ~20 s
by default, ~3.5 s with both off) and buy nothing at these sizes; the maths is unchanged.
"""

from __future__ import annotations

import threading
import time

import jax
import numpy as np

from r1jax import model



def _accepted_options(options: dict) -> dict:
  """The options this jaxlib and backend know (XLA renames and drops flags between releases:
  jax 0.11 no longer has `xla_cpu_use_fusion_emitters`, and a GPU has no `xla_cpu_*`)."""
  kept = {}
  for name, value in options.items():
    try:
      jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(np.float32(0)).compile()
      kept[name] = value
    except Exception:  # an unknown option: leave it out, the maths is the same
      pass
  return kept


FAST_COMPILE = _accepted_options(
    {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False})


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


def in_thread(fn, join_s: float = 60.0):
  """fn() on a new (non-main) thread: (its result, wall seconds); fails if the thread is still
  running after join_s (a call that hangs off the main thread)."""
  box = {}

  def work():
    start = time.monotonic()
    box["result"] = fn()
    box["seconds"] = time.monotonic() - start

  thread = threading.Thread(target=work)
  thread.start()
  thread.join(join_s)
  assert not thread.is_alive() and "result" in box, "the call hung off the main thread"
  return box["result"], box["seconds"]
