"""The decoder of every family: embeddings, the layer stacks scanned run by run in layer order
(`cfg.layer_runs`: one stack "layers" for a dense model; "dense_layers" and "moe_layers" for a
MoE), final norm, head, MTP; and the same for generation on a KV cache.

Training and scoring: `forward_with_aux`. Generation: one function serves prefill (t = prompt
length) and decode (t = 1):

    cache = decoder.init_cache(cfg, batch, max_len)
    logits, cache, expert_ids = decoder.forward_cached(params, tokens, positions, cache, index,
                                                       kv_valid, cfg)

The t new tokens are written at cache slots [index, index + t) (the same for every row) and
attend over slots [0, index + t). Rows are left-padded: slot s of a row holds a real token iff
`kv_valid[b, s]`. Causality is by slot (a query at slot index + j sees slots <= index + j), which
equals causality by position because positions grow with the slot inside a row's valid span.

Caches are stacked like the layer params, {stack: {name: [L, B, S, ...]}}, and run under
`lax.scan` with the whole stack in the carry: each layer writes its new entries in place. (A cache
passed as scan xs/ys would be sliced out and restacked, i.e. copied, on every decode step.)
What a layer caches is its attention family's (`families.ATTENTION[cfg.attention].cache_shapes`):
- MLA (DeepSeek), the absorbed form: the normed latent [B, S, kv_lora_rank] and the rotated
  shared rope key k_pe [B, S, qk_rope_head_dim]. kv_b's key half is folded into the query and its
  value half applied after attention, so per-head keys and values are never materialized.
- GQA (Qwen2/Qwen3/Llama, Qwen3-MoE): rotated k and v [B, S, kv_heads, head_dim].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig
from r1jax.model import layers as L
from r1jax.model.block import decoder_block
from r1jax.model.families import ATTENTION
from r1jax.model.layers import embed, head


def _scan_layers(stacked, x, cos, sin, mask, cfg: ModelConfig, token_mask=None, routing=None,
                 zigzag: bool = False):
  """Run a stack of same-shaped layers (lax.scan or a loop, `_layer_scan`); returns x and
  per-layer MoE stats.
  routing [L, B, T, k]: each layer's replayed expert ids (R3), or None."""
  def body(carry, inputs):
    layer_params, replay_ids = inputs
    out, stats, _ = decoder_block(layer_params, carry, cos, sin, mask, cfg, token_mask=token_mask,
                                  replay_ids=replay_ids, zigzag=zigzag)
    return out, stats

  return _layer_scan(cfg)(L.maybe_remat(body, cfg.remat), x, (stacked, routing))


def _layer_scan(cfg: ModelConfig):
  """How the training/scoring forward steps through a layer stack: lax.scan, or with
  cfg.scan_layers=False the same function unrolled as a Python loop (`_loop`)."""
  return jax.lax.scan if cfg.scan_layers else _loop


def _unstack(a):
  """a's slices along axis 0 by one `lax.split`: its gradient is one concatenate of the slices'
  gradients. Indexing a[i] per layer would make it a sum of L zero-padded copies of the whole
  stack (XLA:CPU's pad_add fusions: 0.74 s of a 5.6 s SmolLM2-135M training step)."""
  return [x[0] for x in jax.lax.split(a, (1,) * a.shape[0], axis=0)]


def _loop(body, carry, xs):
  """lax.scan's result, computed as a Python loop over the leading axis of `xs` (unstacked
  per-iteration outputs, stacked once at the end)."""
  n = jax.tree.leaves(xs)[0].shape[0]
  slices = jax.tree.map(_unstack, xs)
  outs = []
  for i in range(n):
    carry, out = body(carry, jax.tree.map(lambda s: s[i], slices,
                                          is_leaf=lambda s: isinstance(s, list)))
    outs.append(out)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def run_slice(stacked, start: int, count: int):
  """Layers [start, start + count) of a stacked tree (the whole stack as it is if that is all)."""
  n = jax.tree.leaves(stacked)[0].shape[0]
  if start == 0 and count == n:
    return stacked
  return jax.tree.map(lambda a: a[start:start + count], stacked)


def forward_hidden(params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None,
                   token_mask=None, routing=None, prefix=None):
  """Tokens [B, T] -> (last hidden before the final norm [B, T, D], aux dict, rope/mask ctx).
  routing [B, T, L_moe, k]: expert ids to replay in the MoE layers (R3), or None.
  prefix: a shared prefix (`forward_hidden_prefix`), or None."""
  if prefix is not None:
    assert routing is None, "routing replay runs on whole rows, not on a shared prefix"
    valid = segment_ids > 0 if segment_ids is not None else jnp.ones(tokens.shape, bool)
    x, aux = forward_hidden_prefix(params, *prefix, tokens, positions, valid, cfg)
    return x, aux, None
  if positions is None:
    positions = L.default_positions(tokens, segment_ids)
  if segment_ids is None:
    segment_ids = jnp.zeros_like(tokens)
  cos, sin = L.rope_cos_sin(cfg, positions)
  mask = L.attention_mask(segment_ids, segment_ids, positions, positions)
  ctx = (cos, sin, mask, token_mask)  # position order, for the MTP modules
  # context parallelism: the layers run on the positions in zigzag order, which balances the
  # causal attention's work over the devices; the result is put back in order
  zigzag = cfg.context_order == "zigzag" and L.zigzag_applies(tokens.shape[1])
  if zigzag:
    tokens, segment_ids, positions = map(L.to_zigzag, (tokens, segment_ids, positions))
    token_mask = None if token_mask is None else L.to_zigzag(token_mask)
    routing = None if routing is None else L.to_zigzag(routing)
    cos, sin = L.rope_cos_sin(cfg, positions)
    mask = L.attention_mask(segment_ids, segment_ids, positions, positions)
  x = L.constrain_positions(L.embed_split(embed(params, tokens, cfg)))
  aux = {}
  replay = None if routing is None else jnp.moveaxis(routing, 2, 0)  # [L_moe, B, T, k]
  moe_stats = []
  for stack, start, count in cfg.layer_runs:
    layers = run_slice(params[stack], start, count)
    if stack == "moe_layers":
      ids = None if replay is None else replay[start:start + count]
      x, stats = _scan_layers(layers, x, cos, sin, mask, cfg, token_mask, ids, zigzag)
      moe_stats.append(stats)
    else:
      x, _ = _scan_layers(layers, x, cos, sin, mask, cfg, zigzag=zigzag)
  if zigzag:
    x = L.to_zigzag(x, inverse=True)
  if moe_stats:
    stats = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *moe_stats)
    aux["expert_counts"] = stats["counts"]  # [L_moe, E]
    ids = stats["ids"]  # [L_moe, B, T, k]
    aux["expert_ids"] = L.to_zigzag(ids, axis=2, inverse=True) if zigzag else ids
    aux["balance"] = stats["balance"].sum()
    aux["dropped"] = stats["dropped"].sum()
    aux["moe_rounds"] = stats["rounds"].sum()  # exchanges one after another, over MoE layers
  return x, aux, ctx


def forward_hidden_prefix(params, prefix_tokens, prefix_positions, prefix_valid, tokens,
                          positions, valid, cfg: ModelConfig):
  """The last hidden [B, t, D] of rows that are a shared prefix followed by their own tokens,
  with the prefix computed once per group (a GRPO group's prompt and its G completions).

  prefix_tokens / prefix_positions [Bp, Lp] int, prefix_valid [Bp, Lp] bool (left padding is
  False): one prefix per group of G = B // Bp consecutive rows. tokens / positions [B, t],
  valid [B, t] bool. Row b is prefix b // G then tokens[b]; the result is the hidden of its t
  tokens, the same as the whole row's forward (`forward_hidden`) to float rounding.

  Two passes over the layers, through each attention family's cached form (what the sampler
  runs): the prefixes [Bp, Lp] write their keys/values (per-layer outputs of the scan); then the
  rows [B, t] attend over their group's prefix entries, repeated G times, and their own causal
  entries. The gradient flows back through the shared entries, summed over the group. The work
  of the prefix positions is done Bp times instead of B times. aux holds the MoE expert counts,
  balance and dropped assignments of both passes (prefix tokens counted once)."""
  Bp, Lp = prefix_tokens.shape
  B, t = tokens.shape
  assert B % Bp == 0, (B, Bp)
  G = B // Bp
  per_token = ATTENTION[cfg.attention].cache_shapes(cfg)
  dtype = cfg.jnp_dtype
  stats_of = ([], [])  # each pass's MoE stats, run by run

  def empty(rows, length):
    return {n: jnp.zeros((1, rows, length, *shape), dtype) for n, shape in per_token.items()}

  # pass 1: the prefixes, causal over their valid slots; each layer's cache entries are kept
  slots = jnp.arange(Lp, dtype=jnp.int32)
  mask = (prefix_valid[:, None, :] & (slots[None, :] <= slots[:, None])[None])[:, None]
  cos, sin = L.rope_cos_sin(cfg, prefix_positions)
  x = embed(params, prefix_tokens, cfg)
  entries = []
  for stack, start, count in cfg.layer_runs:
    def first(x, p):
      x, stats, c = decoder_block(p, x, cos, sin, mask, cfg, cache=(empty(Bp, Lp), 0, 0),
                                  token_mask=prefix_valid)
      return x, ({n: v[0] for n, v in c.items()}, stats)
    x, (kv, stats) = _layer_scan(cfg)(L.maybe_remat(first, cfg.remat), x,
                                      run_slice(params[stack], start, count))
    entries.append(kv)
    if stack == "moe_layers":
      stats_of[0].append(stats)

  # pass 2: the rows, over [their group's prefix | their own tokens]
  kv_valid = jnp.concatenate([jnp.repeat(prefix_valid, G, axis=0), valid], axis=1)  # [B, S]
  slots = jnp.arange(Lp + t, dtype=jnp.int32)
  causal = slots[None, :] <= (Lp + jnp.arange(t, dtype=jnp.int32))[:, None]
  mask = (kv_valid[:, None, :] & causal[None])[:, None]
  cos, sin = L.rope_cos_sin(cfg, positions)
  x = embed(params, tokens, cfg)
  for (stack, start, count), kv in zip(cfg.layer_runs, entries):
    def second(x, inputs):
      p, kv_layer = inputs
      c = {n: jnp.concatenate([jnp.repeat(kv_layer[n], G, axis=0), empty(B, t)[n][0]],
                              axis=1)[None] for n in per_token}
      x, stats, _ = decoder_block(p, x, cos, sin, mask, cfg, cache=(c, 0, Lp), token_mask=valid)
      return x, stats
    x, stats = _layer_scan(cfg)(L.maybe_remat(second, cfg.remat), x,
                                (run_slice(params[stack], start, count), kv))
    if stack == "moe_layers":
      stats_of[1].append(stats)
  aux = {}
  if stats_of[0]:
    passes = [jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *runs) for runs in stats_of]
    aux["expert_counts"] = passes[0]["counts"] + passes[1]["counts"]  # [L_moe, E]
    aux["balance"] = passes[0]["balance"].sum() + passes[1]["balance"].sum()
    aux["dropped"] = passes[0]["dropped"].sum() + passes[1]["dropped"].sum()
    aux["moe_rounds"] = (passes[0]["rounds"].sum() + passes[1]["rounds"].sum()) / 2  # per pass
  return x, aux


def _mtp_input(p, e, h, cfg: ModelConfig):
  """An MTP module's layer input: eh_proj[RMSNorm(e); RMSNorm(h)], from the embedding of the
  next token e and the previous depth's hidden state h (the main model's for depth 1)."""
  e = L.rms_norm(e, p["enorm"], cfg.rms_norm_eps)
  hn = L.rms_norm(h, p["hnorm"], cfg.rms_norm_eps)
  return L.dense(jnp.concatenate([e, hn], axis=-1), p["eh_proj"], cfg.jnp_dtype)


def mtp_logits(params, tokens, h, ctx, cfg: ModelConfig, targets=None, temperature: float = 1.0):
  """Multi-token prediction, depth k = 1..D: position i of module k predicts token i + k + 1.

  h_k = Layer_k(eh_proj[RMSNorm(Emb(t_{i+k})); RMSNorm(h_{k-1})]); logits = head(norm_k(h_k)).
  The embeddings of the shifted tokens beyond the sequence end are of token 0; those positions
  have no target and are masked by the loss. Returns ([D, B, T, V] fp32 logits, aux).

  targets [B, T] (the main head's, targets[i] = tokens[i + 1]): return instead module k's
  log p(targets[i + k]) [D, B, T] (k = 1..D; token 0 past the end), its head run
  `cfg.logits_chunk` positions at a time as the main head's (`_head_logprobs`): no [B, T, V]
  logits; at `temperature`, of softmax(logits / temperature)."""
  cos, sin, mask, token_mask = ctx
  T = tokens.shape[1]

  def body(carry, inputs):
    h_prev, shifted = carry
    p, target_BT = inputs
    # a shift along the positions: under context parallelism its result keeps their split
    shifted = L.constrain_positions(
        jnp.concatenate([shifted[:, 1:], jnp.zeros_like(shifted[:, :1])], axis=1))
    e = L.constrain_positions(L.embed_split(embed(params, shifted, cfg)))
    x = _mtp_input(p, e, h_prev, cfg)
    x, stats, _ = decoder_block(p["layer"], x, cos, sin, mask, cfg, token_mask=token_mask)
    normed = L.rms_norm(x, p["norm"], cfg.rms_norm_eps)
    out = (head(params, normed, cfg) if target_BT is None
           else _head_logprobs(params, normed, target_BT, cfg, entropy=False,
                               temperature=temperature)[0])
    return (x, shifted), (out, stats)

  assert T >= 1
  D = jax.tree.leaves(params["mtp"])[0].shape[0]
  shifted_targets = None
  if targets is not None:  # module k (1-based) predicts targets[i + k]
    shifted_targets = jnp.stack([
        L.constrain_positions(jnp.pad(targets[:, k:], ((0, 0), (0, min(k, T))))[:, :T])
        for k in range(1, D + 1)])
  _, (logits, stats) = _layer_scan(cfg)(L.maybe_remat(body, cfg.remat), (h, tokens),
                                        (params["mtp"], shifted_targets))
  aux = {}
  if stats is not None:
    aux = {"mtp_expert_counts": stats["counts"], "mtp_balance": stats["balance"].sum()}
  return logits, aux


def _head_logprobs(params, h_BTD, targets_BT, cfg: ModelConfig, entropy: bool,
                   temperature: float = 1.0):
  """log p(targets) and the entropy per position, fp32 [B, T], from final-normed hidden states,
  under softmax(logits / temperature).
  The head and its softmax run on `cfg.logits_chunk` positions of every row at a time (the batch
  axis stays whole, so its sharding over the mesh's batch axes is kept), each chunk recomputed in
  the backward pass (jax.checkpoint): at most [B, chunk, V] logits exist at once."""
  def one(h_c, t_c):
    logp = jax.nn.log_softmax(_tempered(head(params, h_c, cfg), temperature), axis=-1)
    picked = jnp.take_along_axis(logp, t_c[..., None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.exp(logp) * logp, -1) if entropy else jnp.zeros_like(picked)
    return picked, ent

  picked, ent = map_position_chunks(one, (h_BTD, targets_BT), cfg.logits_chunk)
  return picked, (ent if entropy else None)


def map_position_chunks(fn, arrays, chunk: int):
  """fn over `chunk` positions of every row at a time: arrays [B, T, ...] -> fn's outputs
  [B, T, ...] (a pytree). One chunk at a time (`lax.map`), each recomputed in the backward pass
  (jax.checkpoint), so what fn forms per position (the [B, chunk, V] logits of an LM head)
  exists for one chunk at once. The batch axis stays whole, keeping its sharding; with
  context parallelism the chunks are cut within each device's positions (`layers._blocks`)."""
  T = arrays[0].shape[1]
  shards = L.position_shards(T)
  chunk = min(chunk, T // shards)
  out = jax.lax.map(lambda a: jax.checkpoint(fn)(*a),
                    tuple(L._blocks(x, 1, chunk, shards) for x in arrays))
  return jax.tree.map(lambda x: L._unblocks(x, 1, T, shards), out)


def _tempered(logits, temperature: float):
  """fp32 logits / temperature; at temperature 1 the logits themselves (no division)."""
  logits = logits.astype(jnp.float32)
  return logits if temperature == 1.0 else logits / temperature


def logits_logprobs(logits_BTV, targets_BT, entropy: bool, temperature: float = 1.0):
  """(log p(targets) fp32 [B, T], entropy [B, T] or None) from full logits, under
  softmax(logits / temperature)."""
  logits_BTV = _tempered(logits_BTV, temperature)
  logp = jax.nn.log_softmax(logits_BTV, axis=-1)
  picked = jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]
  if not entropy:
    return picked, None
  probs = jax.nn.softmax(logits_BTV.astype(jnp.float32), -1)
  return picked, -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), -1)


def _mtp_detached(params, h, detach: bool):
  """The params and trunk hidden states the MTP modules run on. detach: the MTP modules' own
  weights keep their gradient, while the trunk's hidden states and the weights shared with the
  main model (embedding, LM head) pass none back: a draft trained beside a policy whose gradient
  stays the policy loss's (GRPO's `draft_weight`)."""
  if not detach:
    return params, h
  return dict(jax.lax.stop_gradient(params), mtp=params["mtp"]), jax.lax.stop_gradient(h)


def chunked_target_logprobs(params, tokens, targets, cfg: ModelConfig, *, segment_ids=None,
                            positions=None, mtp: bool = False, token_mask=None, routing=None,
                            entropy: bool = False, temperature: float = 1.0, prefix=None,
                            mtp_detach: bool = False):
  """`forward_with_aux` + `logits_logprobs` with the head run `cfg.logits_chunk` positions at a
  time (`_head_logprobs`): (log p(targets), entropy or None, aux), no [B, T, V] logits. With
  mtp, aux["mtp_logprobs"] [D, B, T] are at `temperature` too."""
  x, aux, ctx = forward_hidden(params, tokens, cfg, segment_ids=segment_ids, positions=positions,
                               token_mask=token_mask, routing=routing, prefix=prefix)
  picked, ent = _head_logprobs(params, L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps),
                               targets, cfg, entropy, temperature)
  if mtp and "mtp" in params:
    mtp_params, h = _mtp_detached(params, x, mtp_detach)
    aux["mtp_logprobs"], mtp_aux = mtp_logits(mtp_params, tokens, h, ctx, cfg, targets=targets,
                                              temperature=temperature)
    aux.update(mtp_aux)
  return picked, ent, aux


def forward_with_aux(params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None,
                     mtp: bool = False, token_mask=None, routing=None, prefix=None,
                     mtp_detach: bool = False):
  x, aux, ctx = forward_hidden(params, tokens, cfg, segment_ids=segment_ids, positions=positions,
                               token_mask=token_mask, routing=routing, prefix=prefix)
  logits = head(params, L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cfg)
  if mtp and "mtp" in params:
    mtp_params, h = _mtp_detached(params, x, mtp_detach)
    aux["mtp_logits"], mtp_aux = mtp_logits(mtp_params, tokens, h, ctx, cfg)
    aux.update(mtp_aux)
  return logits, aux


# ------------------------------------------------------------------ generation (KV cache)
def _stacks(cfg: ModelConfig) -> dict[str, int]:
  """Layer stacks of the param tree and their depths (the cache mirrors them)."""
  if not cfg.is_moe:
    return {"layers": cfg.num_hidden_layers}
  stacks = {"dense_layers": cfg.num_dense_layers, "moe_layers": cfg.num_moe_layers}
  return {k: n for k, n in stacks.items() if n}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """Zeroed cache, {stack: {name: [L, B, S, ...]}}; dtype defaults to the compute dtype."""
  dtype = jnp.dtype(dtype or cfg.jnp_dtype)
  per_token = ATTENTION[cfg.attention].cache_shapes(cfg)
  return {stack: {name: jnp.zeros((n, batch, max_len, *shape), dtype)
                  for name, shape in per_token.items()}
          for stack, n in _stacks(cfg).items()}


def _cache_masks(kv_valid, S: int, index, t: int):
  """The attention mask [B, 1, t, S] of t new tokens at cache slots [index, index + t), and
  which of them are real tokens [B, t] (`forward_cached`'s kv_valid: bool [B, S] or int pad
  lengths [B])."""
  slots = jnp.arange(S, dtype=jnp.int32)
  if kv_valid.ndim == 1:
    kv_valid = slots[None, :] >= kv_valid[:, None]
  query_slot = index + jnp.arange(t, dtype=jnp.int32)
  causal = slots[None, :] <= query_slot[:, None]  # [t, S]; also hides slots >= index + t
  mask = (kv_valid[:, None, :] & causal[None])[:, None]  # [B, 1, t, S]
  token_mask = jnp.take(kv_valid, jnp.minimum(query_slot, S - 1), axis=1)  # [B, t] real tokens
  return mask, token_mask


def forward_cached(params, tokens, positions, cache, index, kv_valid, cfg: ModelConfig, *,
                   last_only: bool = False, return_hidden: bool = False):
  """Logits [B, t, V] fp32 of `tokens` [B, t] at `positions` [B, t], the updated cache, and
  the expert ids each MoE layer chose, [L_moe, B, t, k] (None for a dense model).
  last_only: the logits of the last position only, [B, 1, V] (a prefill needs no others: the
  head over every prompt position cost P times its FLOPs, and on an FSDP mesh whose devices
  outnumber the prompts every device held all of those logits, 10 GiB for 16 x 512 positions
  of a 152k vocabulary).

  index: int scalar (may be traced), the cache slot of tokens[:, 0] for every row.
  kv_valid: bool [B, S], which cache slots hold real tokens, or int pad lengths [B] (slots
  [0, pad) of each row are left padding).
  return_hidden: also return the last hidden state before the final norm, [B, t, D] (what the
  MTP module reads: `mtp_cached`), as a fourth result.
  """
  B, t = tokens.shape
  S = jax.tree.leaves(cache)[0].shape[2]
  mask, token_mask = _cache_masks(kv_valid, S, index, t)
  cos, sin = L.rope_cos_sin(cfg, positions)
  x = embed(params, tokens, cfg)
  cache, moe_ids = dict(cache), []
  for stack, start, count in cfg.layer_runs:  # the layers in order, run by run
    def body(carry, layer_in):
      (x, c), (p, layer) = carry, layer_in
      x, stats, c = decoder_block(p, x, cos, sin, mask, cfg, cache=(c, layer, index),
                                  token_mask=token_mask)
      return (x, c), (None if stats is None else stats["ids"])
    (x, cache[stack]), ids = jax.lax.scan(
        body, (x, cache[stack]),
        (run_slice(params[stack], start, count), start + jnp.arange(count)))
    if stack == "moe_layers":
      moe_ids.append(ids)
  expert_ids = jnp.concatenate(moe_ids, axis=0) if moe_ids else None
  hidden = x
  if last_only:
    x = x[:, -1:]
  logits = head(params, L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps), cfg)
  if return_hidden:
    return logits, cache, expert_ids, hidden
  return logits, cache, expert_ids


def init_mtp_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """Zeroed cache of one MTP module's attention, {name: [1, B, S, ...]} (`mtp_cached`)."""
  dtype = jnp.dtype(dtype or cfg.jnp_dtype)
  return {name: jnp.zeros((1, batch, max_len, *shape), dtype)
          for name, shape in ATTENTION[cfg.attention].cache_shapes(cfg).items()}


def mtp_cached(params, hidden, next_tokens, positions, cache, index, kv_valid, cfg: ModelConfig,
               *, last_only: bool = False, depth: int = 0):
  """MTP module `depth` (0-based) on its own KV cache, as `mtp_logits` computes it in training:
  the entry at position i reads the main model's last hidden h_i [B, t, D] (before the final
  norm: `forward_cached(return_hidden=True)`) and the token after it, next_tokens [B, t], and
  its logits predict the token after that. Slots, positions and kv_valid as `forward_cached`;
  `cache` from `init_mtp_cache`. Returns (logits [B, t, V] fp32, or [B, 1, V] with last_only;
  the updated cache). The speculative sampler drafts with it (`rollout.speculative`)."""
  p = jax.tree.map(lambda a: a[depth], params["mtp"])
  S = jax.tree.leaves(cache)[0].shape[2]
  mask, token_mask = _cache_masks(kv_valid, S, index, next_tokens.shape[1])
  cos, sin = L.rope_cos_sin(cfg, positions)
  x = _mtp_input(p, embed(params, next_tokens, cfg), hidden, cfg)
  x, _, cache = decoder_block(p["layer"], x, cos, sin, mask, cfg, cache=(cache, 0, index),
                              token_mask=token_mask)
  if last_only:
    x = x[:, -1:]
  return head(params, L.rms_norm(x, p["norm"], cfg.rms_norm_eps), cfg), cache
