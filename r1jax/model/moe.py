"""DeepSeekMoE: router (sigmoid + correction bias + group-limited top-k) and expert compute.

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
`cfg.router_impl = "pallas"` selects experts with the fused router kernel
(`pallas_kernels.routing`); the router itself stays fp32. Both routers give the experts of
dropped groups the selection score `cfg.router_group_fill` (-inf as DeepSeek, or 0.0 as
transformers' DeepseekV2).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.model import layers as L


def _scores(logits_NE, cfg: ModelConfig):
  if cfg.scoring_func == "sigmoid":
    return jax.nn.sigmoid(logits_NE)
  return jax.nn.softmax(logits_NE, axis=-1)


def route(logits_NE, bias_E, cfg: ModelConfig):
  """Top-k routing. Returns weights [N,k] fp32, expert ids [N,k] int32, scores [N,E] fp32."""
  N, E = logits_NE.shape
  G = cfg.n_group
  scores = _scores(logits_NE, cfg)
  # the correction bias steers selection only; gate weights come from the unbiased scores
  choice = scores + jax.lax.stop_gradient(bias_E) if cfg.topk_method == "noaux_tc" else scores
  if G > 1:
    grouped = choice.reshape(N, G, E // G)
    if cfg.topk_method == "noaux_tc":
      group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
    else:
      group_score = grouped.max(-1)
    _, keep = jax.lax.top_k(group_score, cfg.topk_group)
    group_mask = jnp.zeros((N, G), bool).at[jnp.arange(N)[:, None], keep].set(True)
    # Dropped groups' experts: -inf never wins (DeepSeek-V3's inference/model.py; transformers'
    # DeepseekV3 since huggingface/transformers#45441); 0.0 beats every kept expert whose
    # bias-corrected score went negative (transformers' DeepseekV3 before that fix). The softmax
    # "group_limited_greedy" path (V2) takes the same fill: DeepSeek-V2's modeling code and
    # transformers' DeepseekV2 fill 0.0, but softmax scores are > 0, so the fills differ only
    # on ties with scores that underflowed to exactly 0 (torch's top-k tie order is unspecified
    # there anyway; a dropped group's expert picked on such a tie weighs 0 in V2, its unmasked
    # score here).
    fill = -jnp.inf if cfg.router_group_fill == "neg_inf" else 0.0
    choice = jnp.where(jnp.repeat(group_mask, E // G, axis=1), choice, fill)
  _, ids = jax.lax.top_k(choice, cfg.num_experts_per_tok)
  weights = jnp.take_along_axis(scores, ids, axis=1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor, ids.astype(jnp.int32), scores


def route_replay(logits_NE, ids_Nk, cfg: ModelConfig):
  """Routing replay (R3): the given experts ids [N, k] instead of a top-k; their gate weights
  come from the current router's scores (normalized and scaled as in `route`), so the router
  still gets its gradient through them. Returns (weights [N, k], ids [N, k], scores [N, E])."""
  scores = _scores(logits_NE, cfg)
  ids = ids_Nk.astype(jnp.int32)
  weights = jnp.take_along_axis(scores, jnp.minimum(ids, logits_NE.shape[1] - 1), axis=1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * cfg.routed_scaling_factor, ids, scores


def route_pallas(logits_NE, bias_E, cfg: ModelConfig):
  """`route` through the fused Pallas router; same outputs, differentiable in the logits."""
  from pallas_kernels import routing
  # the kernel scores groups by their top-2 experts iff sigmoid; `route` iff noaux_tc
  if cfg.n_group > 1 and (cfg.scoring_func == "sigmoid") != (cfg.topk_method == "noaux_tc"):
    raise ValueError(f"router_impl='pallas' supports group-limited routing with sigmoid+noaux_tc "
                     f"or softmax+greedy; got scoring_func={cfg.scoring_func!r}, "
                     f"topk_method={cfg.topk_method!r}")
  bias = jax.lax.stop_gradient(bias_E) if cfg.topk_method == "noaux_tc" else None
  weights, ids = routing.route(
      logits_NE, bias, top_k=cfg.num_experts_per_tok, n_group=cfg.n_group,
      topk_group=cfg.topk_group, scoring_func=cfg.scoring_func,
      norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
      group_fill=cfg.router_group_fill)[:2]
  return weights, ids, _scores(logits_NE, cfg)


def _expert_ffn_sorted(p, xs, group_sizes, dtype, matmul):
  h = jax.nn.silu(matmul(xs, p["gate"].astype(dtype), group_sizes)) * \
      matmul(xs, p["up"].astype(dtype), group_sizes)
  return matmul(h, p["down"].astype(dtype), group_sizes)


def _ragged_dot(x, w, group_sizes):
  return jax.lax.ragged_dot(x, w, group_sizes,
                            preferred_element_type=jnp.float32).astype(x.dtype)


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


def _sort_assignments(ids_Nk, E):
  """Stable sort of the N*k assignments by expert: (order, token index, group sizes)."""
  flat = ids_Nk.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
  return order, order // ids_Nk.shape[1], group_sizes


def experts_grouped(p, x_ND, weights_Nk, ids_Nk, cfg: ModelConfig, matmul):
  dtype = cfg.jnp_dtype
  N, D = x_ND.shape
  # ids >= E (experts owned by other devices) sort last and fall outside every group:
  # ragged_dot gives zeros for those rows
  order, token, group_sizes = _sort_assignments(ids_Nk, p["gate"].shape[0])
  y = _expert_ffn_sorted(p, x_ND[token].astype(dtype), group_sizes, dtype, matmul)
  y = y.astype(jnp.float32) * weights_Nk.reshape(-1)[order][:, None]
  return jnp.zeros((N, D), jnp.float32).at[token].add(y), jnp.zeros((), jnp.float32)


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
  order, token, group_sizes = _sort_assignments(ids_Nk, E)
  run = functools.partial(_capacity_buffers, p, x_ND, weights_Nk, ids_Nk, order, token,
                          group_sizes, cfg=cfg)
  if cfg.capacity_factor is None and cfg.dropless_fast_factor:
    # dropless with small buffers in the common case: C = N wastes E/k of the expert FLOPs
    # (a 128-row decode step of the tiny MoE spends most of its time there)
    C_fast = capacity(cfg.replace(capacity_factor=cfg.dropless_fast_factor), N)
    if C_fast < N:
      return jax.lax.cond(jnp.max(group_sizes) <= C_fast, functools.partial(run, C=C_fast),
                          functools.partial(run, C=N))
  return run(C=C)


def _capacity_buffers(p, x_ND, weights_Nk, ids_Nk, order, token, group_sizes, *, C,
                      cfg: ModelConfig):
  """The capacity path with C slots per expert: (y [N, D] fp32, dropped assignments)."""
  dtype = cfg.jnp_dtype
  N, D = x_ND.shape
  E = p["gate"].shape[0]
  expert = ids_Nk.reshape(-1)[order]
  starts = jnp.cumsum(group_sizes) - group_sizes
  rank = jnp.arange(order.shape[0]) - starts[expert]  # slot within the expert's buffer
  buf = jnp.zeros((E, C, D), dtype).at[expert, rank].set(x_ND[token].astype(dtype), mode="drop")
  h = jax.nn.silu(_expert_matmul(buf, p["gate"], dtype, cfg.fp8)) * \
      _expert_matmul(buf, p["up"], dtype, cfg.fp8)
  out = _expert_matmul(h, p["down"], dtype, cfg.fp8).astype(jnp.float32)
  y = out.at[expert, rank].get(mode="fill", fill_value=0)  # dropped slots read zeros
  y = y * weights_Nk.reshape(-1)[order][:, None]
  dropped = jnp.sum((rank >= C) & (expert < E)).astype(jnp.float32)
  return jnp.zeros((N, D), jnp.float32).at[token].add(y), dropped


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
  order, token, group_sizes = _sort_assignments(ids_Nk, E)
  expert = ids_Nk.reshape(-1)[order]
  padded = -(-group_sizes // b) * b
  padded_end = jnp.cumsum(padded)
  padded_start = padded_end - padded
  starts = jnp.cumsum(group_sizes) - group_sizes
  valid = expert < E
  e = jnp.minimum(expert, E - 1)
  slot = jnp.where(valid, padded_start[e] + jnp.arange(A) - starts[e], nb * b)  # row in blocks
  rows = jnp.zeros((nb * b, D), dtype).at[slot].set(x_ND[token].astype(dtype), mode="drop")
  # the expert of each block (blocks past the last expert's rows hold zeros: any expert will do)
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(nb) * b, side="right"),
                             E - 1)
  xb = rows.reshape(nb, b, D)

  def mm(x, w):
    return jax.vmap(functools.partial(L.dense, dtype=dtype, fp8=cfg.fp8, interpret=False))(
        x, w[block_expert])

  h = jax.nn.silu(mm(xb, p["gate"])) * mm(xb, p["up"])
  out = mm(h, p["down"]).reshape(nb * b, D).astype(jnp.float32)
  y = out.at[slot].get(mode="fill", fill_value=0) * weights_Nk.reshape(-1)[order][:, None]
  return jnp.zeros((N, D), jnp.float32).at[token].add(y), jnp.zeros((), jnp.float32)


def experts_dense(p, x_ND, weights_Nk, ids_Nk, cfg: ModelConfig):
  dtype = cfg.jnp_dtype
  N = x_ND.shape[0]
  combine = jnp.zeros((N, p["gate"].shape[0]), jnp.float32)
  combine = combine.at[jnp.arange(N)[:, None], ids_Nk].add(weights_Nk, mode="drop")
  x = x_ND.astype(dtype)
  h = jax.nn.silu(_expert_matmul(x, p["gate"], dtype, cfg.fp8)) * \
      _expert_matmul(x, p["up"], dtype, cfg.fp8)
  y = _expert_matmul(h, p["down"], dtype, cfg.fp8).astype(jnp.float32)
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


def sequence_balance(scores_BTE, ids_BTk, cfg: ModelConfig):
  """DeepSeek-V3 sequence-wise balance statistic sum_i f_i * P_i, averaged over sequences.

  f_i = E / (k T) * (assignments to expert i in the sequence), P_i = mean over the sequence's
  tokens of the normalized affinity s_i / sum_j s_j. Multiply by alpha for the loss.
  """
  B, T, E = scores_BTE.shape
  k = cfg.num_experts_per_tok
  counts = jax.nn.one_hot(ids_BTk, E, dtype=jnp.float32).sum(axis=(1, 2))  # [B, E]
  f = jax.lax.stop_gradient(counts) * E / (k * T)
  P = (scores_BTE / scores_BTE.sum(-1, keepdims=True)).mean(axis=1)
  return (f * P).sum(-1).mean()


def moe_block(p, x_BTD, cfg: ModelConfig, token_mask=None, replay_ids=None):
  """Routed + shared experts. Returns [B, T, D] and stats {counts [E], balance, dropped,
  ids [B, T, k] (the chosen experts; E for padding)}. Tokens where token_mask [B, T] is False
  go to no routed expert (padding). replay_ids [B, T, k]: use these experts (R3,
  `route_replay`) instead of the router's top-k."""
  dtype = cfg.jnp_dtype
  B, T, D = x_BTD.shape
  x = x_BTD.reshape(B * T, D)
  logits = jnp.dot(x.astype(jnp.float32), p["router"].astype(jnp.float32))
  if replay_ids is not None:
    weights, ids, scores = route_replay(logits, replay_ids.reshape(B * T, -1), cfg)
  else:
    router = route_pallas if cfg.router_impl == "pallas" else route
    weights, ids, scores = router(logits, p["router_bias"], cfg)
  if token_mask is not None:
    live = token_mask.reshape(-1, 1)
    ids = jnp.where(live, ids, cfg.n_routed_experts)  # id E: no expert, no capacity, no count
    weights = jnp.where(live, weights, 0.0)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    from r1jax.parallel import expert
    y, dropped = expert.dispatch(p, x, weights, ids, cfg, mesh)
  else:
    y, dropped = routed_experts(p, x, weights, ids, cfg)
  y = y.astype(dtype).reshape(B, T, D)
  if "shared" in p:
    y = y + L.swiglu_mlp(p["shared"], x_BTD, dtype, cfg.fp8)
  stats = {"counts": jnp.bincount(ids.reshape(-1), length=cfg.n_routed_experts
                                  ).astype(jnp.float32),
           "balance": sequence_balance(scores.reshape(B, T, -1),
                                       ids.reshape(B, T, -1), cfg),
           "dropped": dropped, "ids": ids.reshape(B, T, -1)}
  return y, stats
