"""Local expert compute: the routed experts of one device, every implementation (`cfg.moe_impl`).

Expert compute paths (`cfg.moe_impl`), all dropless unless `cfg.capacity_factor` is set:
- "ragged_dot": sort assignments by expert, grouped matmul with `jax.lax.ragged_dot`
  (the fast path on GPU/TPU);
- "pallas": the same with the Pallas grouped matmul (`pallas_kernels.gmm`; interpreted on CPU);
- "capacity": sort + per-expert buffers [E, C, D] + batched einsum (the fast path on CPU, where
  XLA expands ragged_dot densely); C = ceil(N*k/E * capacity_factor), or N (dropless) if None
  (with `dropless_fast_factor`, dropless runs C = ceil(N*k/E * that) whenever no expert's load
  exceeds it, and N otherwise);
- "dense": every expert on every token, weighted by the (mostly zero) combine matrix; a
  reference for tests, never fast.
Shapes: N tokens, D width, E experts, k experts per token, I expert width, C capacity.

`cfg.fp8` runs every expert matmul as an FP8 GEMM (DeepSeek-V3 recipe): the grouped paths through
`pallas_kernels.gmm.gmm(fp8=True)`, "capacity" and "dense" through `layers.dense(fp8=True)` mapped
over the experts. Only "pallas" runs the Pallas interpreter on CPU; the others keep the FP8 GEMMs
compiled (the Mosaic kernels on TPU, XLA on dequantized operands on CPU and GPU).
Every path computes the one SwiGLU of `layers.swiglu`, with its own matmul.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig
from r1jax.model import layers as L


def _expert_ffn_sorted(p, xs, group_sizes, dtype, matmul):
  return L.swiglu(xs, p, lambda a, w: matmul(a, w.astype(dtype), group_sizes))


def _ragged_dot(x, w, group_sizes):
  """jax.lax.ragged_dot on TPU, where XLA runs it as a grouped matmul. XLA:CPU and XLA:GPU
  expand it over every expert (E times the FLOPs, and [E, rows, out] temporaries: the H200's
  step ran out of memory), so there it is pallas_kernels.gmm's plain-XLA work-item fallback."""
  if jax.default_backend() == "tpu":
    return jax.lax.ragged_dot(x, w, group_sizes,
                              preferred_element_type=jnp.float32).astype(x.dtype)
  return _pallas_gmm(x, w, group_sizes, interpret=False)


def _pallas_gmm(x, w, group_sizes, fp8: bool = False, interpret: bool | None = None):
  """pallas_kernels.gmm: rows past sum(group_sizes) (ids of other devices' experts) give 0."""
  from pallas_kernels import gmm
  return gmm.gmm(x, w, group_sizes, fp8=fp8, interpret=interpret)


def _expert_matmul(buf_E, w_E, dtype, fp8: bool):
  """Per-expert x [E, ..., in] @ w [E, in, out] with `layers.dense` (FP8 GEMMs when fp8)."""
  in_axes = (None if buf_E.ndim == 2 else 0, 0)  # [N, D] tokens shared by every expert
  # interpret=False: a vmapped kernel interprets ~10x slower than XLA runs the same FP8 maths
  dense = functools.partial(L.dense, dtype=dtype, fp8=fp8, interpret=False)
  return jax.vmap(dense, in_axes)(buf_E, w_E)


def sorted_rows(x_ND, order, k: int):
  """x's row for each of the N*k assignments in `order`'s sorted order, [N*k, D]. x is repeated
  k times and then permuted: the gradient adds each row once (a permutation, then a sum over k
  in a fixed order), where indexing x by token ids would add k rows into one with a scatter,
  which a GPU does with atomic adds in a varying order, so its rounding varies run to run."""
  return jnp.take(jnp.repeat(x_ND, k, axis=0), order, axis=0, unique_indices=True,
                  mode="clip")


def combine_sorted(y_AD, order, N: int, k: int):
  """Each token's k assignment rows (in `order`'s sorted order) summed in a fixed order, [N, D]:
  the rows are unsorted by a gather with the inverse permutation, then summed over k. Both
  directions are deterministic on every backend (see `sorted_rows`)."""
  inverse = jnp.zeros_like(order).at[order].set(
      jnp.arange(order.shape[0], dtype=order.dtype), unique_indices=True)
  return jnp.take(y_AD, inverse, axis=0, unique_indices=True, mode="clip").reshape(
      N, k, -1).sum(1)


def _sort_assignments(ids_Nk, E):
  """Stable sort of the N*k assignments by expert: (order, group sizes)."""
  flat = ids_Nk.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
  return order, group_sizes


def experts_grouped(p, x_ND, weights_Nk, ids_Nk, cfg: ModelConfig, matmul):
  dtype = cfg.jnp_dtype
  N, D = x_ND.shape
  # ids >= E (experts owned by other devices) sort last and fall outside every group:
  # ragged_dot gives zeros for those rows
  k = ids_Nk.shape[1]
  order, group_sizes = _sort_assignments(ids_Nk, p["gate"].shape[0])
  y = _expert_ffn_sorted(p, sorted_rows(x_ND, order, k).astype(dtype), group_sizes, dtype, matmul)
  y = y.astype(jnp.float32) * weights_Nk.reshape(-1)[order][:, None]
  return combine_sorted(y, order, N, k), jnp.zeros((), jnp.float32)


def capacity(cfg: ModelConfig, num_tokens: int) -> int:
  """Buffer slots per expert for `num_tokens` tokens routed over all n_routed_experts."""
  if cfg.capacity_factor is None:
    return num_tokens  # an expert receives a token at most once: never drops
  per_expert = num_tokens * cfg.num_experts_per_tok / cfg.n_routed_experts
  return min(num_tokens, max(1, math.ceil(per_expert * cfg.capacity_factor)))


def experts_capacity(p, x_ND, weights_Nk, ids_Nk, cfg: ModelConfig):
  N = x_ND.shape[0]
  E = p["gate"].shape[0]  # local experts; ids >= E belong to other devices
  C = capacity(cfg, N)
  order, group_sizes = _sort_assignments(ids_Nk, E)
  run = functools.partial(_capacity_buffers, p, x_ND, weights_Nk, ids_Nk, order, group_sizes,
                          cfg=cfg)
  if cfg.capacity_factor is None and cfg.dropless_fast_factor:
    # dropless with small buffers in the common case: C = N wastes E/k of the expert FLOPs
    # (a 128-row decode step of the tiny MoE spends most of its time there)
    C_fast = capacity(cfg.replace(capacity_factor=cfg.dropless_fast_factor), N)
    if C_fast < N:
      return jax.lax.cond(jnp.max(group_sizes) <= C_fast, functools.partial(run, C=C_fast),
                          functools.partial(run, C=N))
  return run(C=C)


def _capacity_buffers(p, x_ND, weights_Nk, ids_Nk, order, group_sizes, *, C,
                      cfg: ModelConfig):
  """The capacity path with C slots per expert: (y [N, D] fp32, dropped assignments)."""
  dtype = cfg.jnp_dtype
  N, D = x_ND.shape
  E = p["gate"].shape[0]
  expert = ids_Nk.reshape(-1)[order]
  starts = jnp.cumsum(group_sizes) - group_sizes
  rank = jnp.arange(order.shape[0]) - starts[expert]  # slot within the expert's buffer
  k = ids_Nk.shape[1]
  buf = jnp.zeros((E, C, D), dtype).at[expert, rank].set(
      sorted_rows(x_ND, order, k).astype(dtype), mode="drop")
  out = L.swiglu(buf, p, lambda a, w: _expert_matmul(a, w, dtype, cfg.fp8)).astype(jnp.float32)
  y = out.at[expert, rank].get(mode="fill", fill_value=0)  # dropped slots read zeros
  y = y * weights_Nk.reshape(-1)[order][:, None]
  dropped = jnp.sum((rank >= C) & (expert < E)).astype(jnp.float32)
  return combine_sorted(y, order, N, k), dropped


def block_rows(num_assignments: int, num_experts: int) -> int:
  """Rows per block of the blocked path: about a quarter of the mean rows per expert, a power
  of two in [8, 128], so padding (< one block per expert) stays small beside the real rows."""
  mean = max(num_assignments // (4 * max(num_experts, 1)), 1)
  return int(min(128, max(8, 2 ** math.floor(math.log2(mean)))))


def experts_blocked(p, x_ND, weights_Nk, ids_Nk, cfg: ModelConfig):
  """Dropless expert compute in plain XLA at a cost of ~ N*k + E*block rows: assignments sorted
  by expert, each expert's rows padded to a multiple of `block_rows`, every block multiplied by
  its expert's weights (a batched matmul over blocks). The buffer size is a static bound
  (N*k + E*(block-1) rows), never a function of the routing, so nothing is ever dropped and
  the cost does not grow with E the way all-N capacity buffers do."""
  dtype = cfg.jnp_dtype
  N, D = x_ND.shape
  E = p["gate"].shape[0]  # local experts; ids >= E belong to other devices
  A = ids_Nk.size
  b = block_rows(A, E)
  nb = -(-(A + E * (b - 1)) // b)  # blocks: enough for any routing
  k = ids_Nk.shape[1]
  order, group_sizes = _sort_assignments(ids_Nk, E)
  expert = ids_Nk.reshape(-1)[order]
  padded = -(-group_sizes // b) * b
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  starts = jnp.cumsum(group_sizes) - group_sizes
  valid = expert < E
  e = jnp.minimum(expert, E - 1)
  slot = jnp.where(valid, padded_start[e] + jnp.arange(A) - starts[e], nb * b)  # row in blocks
  rows = jnp.zeros((nb * b, D), dtype).at[slot].set(
      sorted_rows(x_ND, order, k).astype(dtype), mode="drop")
  # the expert of each block (blocks past the last expert's rows hold zeros: any expert will do)
  # (compare_all: one [nb, E] comparison; the default "scan" method is a rolled while loop of
  # log2(E) trips, a chain of small ops in every layer of every decode step)
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(nb) * b, side="right",
                                              method="compare_all"), E - 1)
  xb = rows.reshape(nb, b, D)

  def mm(x, w):
    return jax.vmap(functools.partial(L.dense, dtype=dtype, fp8=cfg.fp8, interpret=False))(
        x, w[block_expert])

  out = L.swiglu(xb, p, mm).reshape(nb * b, D).astype(jnp.float32)
  y = out.at[slot].get(mode="fill", fill_value=0) * weights_Nk.reshape(-1)[order][:, None]
  return combine_sorted(y, order, N, k), jnp.zeros((), jnp.float32)


def experts_dense(p, x_ND, weights_Nk, ids_Nk, cfg: ModelConfig):
  dtype = cfg.jnp_dtype
  N = x_ND.shape[0]
  combine = jnp.zeros((N, p["gate"].shape[0]), jnp.float32)
  combine = combine.at[jnp.arange(N)[:, None], ids_Nk].add(weights_Nk, mode="drop")
  x = x_ND.astype(dtype)
  y = L.swiglu(x, p, lambda a, w: _expert_matmul(a, w, dtype, cfg.fp8)).astype(jnp.float32)
  return jnp.einsum("end,ne->nd", y, combine), jnp.zeros((), jnp.float32)


def routed_experts(p, x_ND, weights_Nk, ids_Nk, cfg: ModelConfig):
  """Weighted sum of each token's k experts, [N, D] fp32, and the number of dropped
  assignments. `p` holds the experts [E_local, ...]; ids >= E_local contribute nothing."""
  if cfg.moe_impl == "ragged_dot":
    matmul = (functools.partial(_pallas_gmm, fp8=True, interpret=False) if cfg.fp8
              else _ragged_dot)
    return experts_grouped(p, x_ND, weights_Nk, ids_Nk, cfg, matmul)
  if cfg.moe_impl == "pallas":
    return experts_grouped(p, x_ND, weights_Nk, ids_Nk, cfg,
                           functools.partial(_pallas_gmm, fp8=cfg.fp8))
  if cfg.moe_impl == "capacity":
    return experts_capacity(p, x_ND, weights_Nk, ids_Nk, cfg)
  if cfg.moe_impl == "blocked":
    return experts_blocked(p, x_ND, weights_Nk, ids_Nk, cfg)
  return experts_dense(p, x_ND, weights_Nk, ids_Nk, cfg)
