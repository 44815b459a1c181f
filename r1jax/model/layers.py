"""Building blocks shared by every model family: norms, embedding and head, RoPE/YaRN, the
attention core, the SwiGLU MLP.

Shapes: B batch, T query length, S key length, H heads, K kv heads, D model width, d head width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.axes import CONTEXT, MODEL_DIM_AXES, batch_axes, context_size, dividing
from r1jax.errors import ConfigError
from r1jax.model.config import ModelConfig, yarn_mscale

NEG_INF = -1e30  # finite, so a fully masked row (padding) gives a uniform softmax, not NaN


def rms_norm(x, w, eps: float):
  """RMSNorm in fp32, cast back, then scaled (HF order: weight * x.to(input_dtype))."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return w.astype(x.dtype) * y.astype(x.dtype)


def dense(x, w, dtype, fp8: bool = False, *, interpret: bool | None = None):
  """x [..., in] @ w [in, *out] -> [..., *out] in the compute dtype, fp32 accumulation.

  The one projection helper: with fp8 the product is `pallas_kernels.fp8.linear` (DeepSeek-V3
  recipe: on-the-fly e4m3 quantization in 1x128 activation tiles and 128x128 weight blocks;
  forward, dgrad and wgrad are FP8 GEMMs). w is quantized from its master dtype, not from a
  compute-dtype copy, and its gradient comes back in that dtype. `interpret` goes to the kernel:
  None interprets it on CPU, False never does (XLA on dequantized operands where Pallas has no
  compiled path).
  """
  if fp8:
    from pallas_kernels import fp8 as fp8_lib  # lazy: the kernels load only when used
    y = fp8_lib.linear(x.astype(dtype), w.reshape(w.shape[0], -1), interpret=interpret)
    return y.reshape(*x.shape[:-1], *w.shape[1:])
  return jnp.tensordot(x.astype(dtype), w.astype(dtype), axes=1,
                       preferred_element_type=jnp.float32).astype(dtype)


def embed(params, tokens, cfg: ModelConfig):
  return params["embed"].astype(cfg.jnp_dtype)[tokens]


def require_lm_head(cfg: ModelConfig, what: str):
  """Refuse `what` (a use of the LM head) for a sequence classifier, which has none."""
  if cfg.num_labels:
    raise ConfigError(f"{what} needs an LM head, and model.num_labels={cfg.num_labels} makes a "
                      "sequence classifier (a `score` head instead): score it with "
                      "model.reward_scores")


def _project(h, w, cfg: ModelConfig):
  """A head's product: h [..., D] @ w [D, N] in the compute dtype, fp32 result."""
  return jnp.dot(h.astype(cfg.jnp_dtype), w.astype(cfg.jnp_dtype),
                 preferred_element_type=jnp.float32)


def head(params, h, cfg: ModelConfig):
  """Final-normed hidden [B, T, D] -> fp32 logits [B, T, V]."""
  require_lm_head(cfg, "the LM head (logits)")
  return _project(h, params["embed"].T if cfg.tie_word_embeddings else params["lm_head"], cfg)


def score_head(params, h, cfg: ModelConfig):
  """A sequence classifier's head: final-normed hidden [..., D] -> fp32 scores
  [..., num_labels]."""
  if not cfg.num_labels:
    raise ConfigError("scores need a sequence classifier: model.num_labels=0 is a causal LM "
                      "(set num_labels >= 1 for a `score` head)")
  return _project(h, params["score"], cfg)


def swiglu(x, p, matmul):
  """The SwiGLU FFN, down(silu(gate(x)) * up(x)), with `matmul(x, w)`: every dense MLP, shared
  expert and routed-expert implementation is this with its own matmul."""
  return matmul(jax.nn.silu(matmul(x, p["gate"])) * matmul(x, p["up"]), p["down"])


def swiglu_mlp(p, x, dtype, fp8: bool = False):
  return swiglu(x, p, lambda a, w: dense(a, w, dtype, fp8))


# ------------------------------------------------------------------ rope
def rope_dim(cfg: ModelConfig) -> int:
  return cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.dense_head_dim


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [dim/2] and the cos/sin scale (YaRN attention factor)."""
  dim, base = rope_dim(cfg), cfg.rope_theta
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
  inv_extra = 1.0 / pos_freqs
  if cfg.rope_type == "linear":  # position interpolation: every frequency / factor
    return (inv_extra / cfg.rope_factor).astype(np.float32), 1.0
  if cfg.rope_type == "llama3":
    return _llama3_inv_freq(inv_extra, cfg), 1.0
  if cfg.rope_type != "yarn":
    return inv_extra.astype(np.float32), 1.0
  factor = cfg.rope_factor
  inv_inter = 1.0 / (factor * pos_freqs)

  def correction_dim(rotations):
    return (dim * math.log(cfg.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(base)))

  low = max(math.floor(correction_dim(cfg.beta_fast)), 0)
  high = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extra_weight = 1 - ramp  # high-frequency dims keep their original frequency
  inv = inv_inter * (1 - extra_weight) + inv_extra * extra_weight
  if cfg.mscale and cfg.mscale_all_dim:
    attn_factor = yarn_mscale(factor, cfg.mscale) / yarn_mscale(factor, cfg.mscale_all_dim)
  else:
    attn_factor = yarn_mscale(factor, 1.0)
  return inv.astype(np.float32), float(attn_factor)


def _llama3_inv_freq(inv, cfg: ModelConfig) -> np.ndarray:
  """Llama 3.1's scaling: a wavelength 2 pi / f longer than original_max /
  rope_low_freq_factor gets f / factor, one shorter than original_max / rope_high_freq_factor
  keeps f, and the band between blends the two linearly in original_max / wavelength."""
  factor, original = cfg.rope_factor, cfg.original_max_position_embeddings
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelength = 2 * math.pi / inv
  smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
  return ((1 - smooth) * inv / factor + smooth * inv).astype(np.float32)


def softmax_scale(cfg: ModelConfig) -> float:
  if cfg.attention != "mla":
    return cfg.dense_head_dim ** -0.5
  scale = cfg.qk_head_dim ** -0.5
  if cfg.rope_type == "yarn" and cfg.mscale_all_dim:
    scale *= yarn_mscale(cfg.rope_factor, cfg.mscale_all_dim) ** 2
  return scale


def rope_cos_sin(cfg: ModelConfig, positions):
  """cos, sin [B, T, dim/2] in fp32 for int positions [B, T]."""
  inv, attn_factor = rope_inv_freq(cfg)
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
  return jnp.cos(freqs) * attn_factor, jnp.sin(freqs) * attn_factor


def apply_rope(x, cos, sin, interleave: bool):
  """Rotate x [B, T, H, dim] by cos/sin [B, T, dim/2].

  Interleaved (DeepSeek): pairs (x0, x1), (x2, x3), ... share a frequency. Non-interleaved
  (rotate-half): x_i pairs with x_{i+dim/2}. Output is laid out [rotated firsts | rotated
  seconds] in both cases; q and k get the same layout, so q.k is unchanged.
  """
  if interleave:
    x1, x2 = x[..., 0::2], x[..., 1::2]
  else:
    x1, x2 = jnp.split(x, 2, axis=-1)
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  x1f, x2f = x1.astype(jnp.float32), x2.astype(jnp.float32)
  out = jnp.concatenate([x1f * c - x2f * s, x2f * c + x1f * s], axis=-1)
  return out.astype(x.dtype)


# ------------------------------------------------------- context parallelism
def position_shards(length: int) -> int:
  """How many devices split a row's `length` positions: the context mesh's `context` axis
  where it divides length, else 1 (no mesh, no context axis, or a length it does not divide)."""
  mesh = jax.sharding.get_abstract_mesh()
  cp = 1 if mesh.empty else context_size(mesh)
  return cp if cp > 1 and length % cp == 0 else 1


def constrain_positions(x, axis: int = 1, split: bool = True):
  """x with its leading (row) axis over the batch axes (where they divide it; else left to
  XLA) and, with context parallelism, its positions `axis` over `context` (split) or whole on
  every device (not split: an all-gather over `context`). A no-op without a mesh.

  The rows are pinned with or without a context axis: left to itself, XLA's sharding
  propagation let the activations follow the weights' split of the model dimension over
  `fsdp`, and a device held the activations of far more rows than its own
  (r1_distill_qwen_1p5b on fsdp 64: 220 GiB per device, against 8 with the rows pinned)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  context = position_shards(x.shape[axis]) > 1
  rows = batch_axes(mesh)
  if rows and x.shape[0] % math.prod(mesh.shape[a] for a in rows):
    if not context:
      return x
    rows = jax.sharding.PartitionSpec.UNCONSTRAINED
  if not rows and not context:
    return x
  spec = [None] * x.ndim
  spec[0], spec[axis] = rows or None, (CONTEXT if split and context else None)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def embed_split(x):
  """The embedding lookup's output [B, T, D] with D split like the table's model dimension
  (but for `context`) and the rows over the other batch axes, the positions over `context`
  under context parallelism; the training forward then pins the rows (`constrain_positions`).
  So the backward pass moves the output's gradient from the rows' split to the table's with one
  exchange before the scatter-add into the table's gradient. Without it XLA's SPMD partitioner
  put the whole gradient on every device first ("involuntary full rematerialization",
  [64, 16384, 1536] for r1_distill_qwen_1p5b on data 8 x fsdp 8); with D split over `context`
  too it replicated whole activations under context parallelism (the 671B at 32k tokens:
  352 GiB per device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  context = position_shards(x.shape[1]) > 1
  model_dim = dividing(mesh, x.shape[-1],
                       tuple(a for a in MODEL_DIM_AXES if not (context and a == CONTEXT)))
  if not model_dim:
    return x
  rows = dividing(mesh, x.shape[0], tuple(a for a in batch_axes(mesh) if a not in model_dim))
  spec = ((rows or None, CONTEXT if context else None) + (None,) * (x.ndim - 3)
          + (model_dim,))
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def zigzag_applies(length: int) -> bool:
  """Whether a row of `length` positions can run in the zigzag order (`zigzag_slots`): split
  over context devices (`position_shards` > 1) into 2 * shards equal chunks."""
  shards = position_shards(length)
  return shards > 1 and length % (2 * shards) == 0


def zigzag_slots(length: int, shards: int, xp=np):
  """The zigzag order of `length` positions over `shards` context devices: the original index of
  each slot. The positions are cut into 2 * shards equal chunks, and device s holds chunks s and
  2 * shards - 1 - s, an early and a late one, so that under a causal mask every device's
  queries see about the same number of keys (with the positions in order, the device with the
  last positions sees them all). Iota arithmetic: with xp=jnp the program holds no [length]
  constant."""
  c = length // (2 * shards)
  j = xp.arange(length, dtype=xp.int32)
  s, r = j // (2 * c), j % (2 * c)
  return xp.where(r < c, s * c + r, (2 * shards - 1 - s) * c + r - c)


def to_zigzag(x, axis: int = 1, inverse: bool = False):
  """x with its positions `axis` (a row's, in order) put in the zigzag order of `zigzag_slots`,
  or (inverse) taken back from it: a static permutation of 2 * shards chunks. Rows [B, T, ...]
  (axis 1) keep their split over the mesh (`constrain_positions`)."""
  shards = position_shards(x.shape[axis])
  chunks = np.ravel([[s, 2 * shards - 1 - s] for s in range(shards)])
  if inverse:
    chunks = np.argsort(chunks)
  parts = x.reshape(x.shape[:axis] + (2 * shards, -1) + x.shape[axis + 1:])
  out = jnp.take(parts, chunks, axis=axis).reshape(x.shape)
  return constrain_positions(out) if axis == 1 else out


# ------------------------------------------------------------- attention
def attention_mask(segment_ids_q, segment_ids_k, positions_q, positions_k):
  """Causal + same-segment mask [B, 1, T, S] from segment ids and positions."""
  causal = positions_k[:, None, :] <= positions_q[:, :, None]
  same = segment_ids_k[:, None, :] == segment_ids_q[:, :, None]
  return (causal & same)[:, None]


# attn_impl -> jax.nn.dot_product_attention's implementation (a test maps it to "xla" on a CPU)
FUSED_IMPLEMENTATION = {"cudnn": "cudnn"}


def attend(q, k, v, mask, scale: float, chunk: int | None = None, impl: str = "xla",
           key_chunk: int | None = None, causal: bool = False, zigzag: bool = False,
           expand=None):
  """Softmax attention. q [B,T,H,d], k [B,S,K,d], v [B,S,K,e] with H a multiple of K (GQA);
  mask bool [B,1,T,S]. Scores and softmax in fp32. Returns [B,T,H,e].

  `expand` (fn, args): k and v are inputs that fn(k, v, *args) turns into the keys and values
  (MLA's latent and rope key, expanded by kv_b); with context parallelism each device runs it
  on the gathered inputs, so the gradient exchanged is that of the inputs, not of the keys.

  `chunk` splits the queries into blocks of that many, one block at a time under
  `jax.checkpoint`, so the [H, T, S] scores never exist at once (forward or backward): the same
  result, with score memory divided by T / chunk. Where chunk does not divide T (a GRPO row is
  a bucketed prompt + max_new_tokens - 1 columns), the queries are padded to a multiple of it;
  the padded queries attend to nothing and are dropped.

  `key_chunk` also splits the keys (`attend_key_blocks`: a running max and sum over key blocks,
  each under `jax.checkpoint`), so at most [H, chunk, key_chunk] scores exist at once: the same
  result to float rounding.

  `causal=True` (self-attention of a causal LM, T == S): no query sees a key at a later index,
  whatever the mask says; the mask is ANDed with that. Then, with `key_chunk`, a key block
  whose first key comes after a query block's last query is skipped (`lax.cond`, forward and
  backward): about half the score and value FLOPs for long rows. So is a block the mask allows
  no pair of (packed rows: the keys of the segments before a query block's own), tested on the
  data (`_attend_causal`). Every query that sees a key (each row of an `attention_mask` sees
  its own) gets the same values, since such a block would only add zeros; a query that sees no
  key at all averages only the key blocks that ran.

  With a `context` mesh axis that divides T (context parallelism), each device keeps its own
  queries and mask rows and gathers every key and value. Causal attention then runs per device
  (`_attend_causal`, a `shard_map` over `context`), so each device skips the key blocks past
  its own queries. `zigzag=True`: q, k, v and the mask are in `zigzag_slots` order (the
  decoder's `forward_hidden` puts them there), so every device skips about half the blocks;
  in position order the device with the last positions skips almost none, and sets the step's
  time.

  `impl="cudnn"` runs jax.nn.dot_product_attention's fused cuDNN kernel instead (GPU, bf16): the
  same mask and scale, with v zero-padded to q's head dim where they differ (MLA's 192 / 128) and
  the output sliced back."""
  T = q.shape[1]
  shards = position_shards(T) if T == k.shape[1] else 1  # context parallelism (self-attention)
  zigzag = zigzag and shards > 1
  if causal:
    assert T == k.shape[1], f"causal self-attention needs T == S: {T}, {k.shape[1]}"
    index = zigzag_slots(T, shards, jnp) if zigzag else jnp.arange(T)
    mask = mask & (index[None, :] <= index[:, None])
    return _attend_causal(q, k, v, mask, scale, chunk, key_chunk, zigzag, expand, shards, impl)
  if expand is not None:
    k, v = expand[0](k, v, *expand[1])
  if impl == "cudnn":
    return _attend_fused(q, k, v, mask, scale, impl)
  if shards > 1:  # each device: its own queries against every key (an all-gather of k and v)
    q, mask = constrain_positions(q), constrain_positions(mask, axis=2)
    k, v = constrain_positions(k, split=False), constrain_positions(v, split=False)
  if chunk is not None and chunk < T // shards:
    block = jax.checkpoint(lambda a: _attend_block(a[0], k, v, a[1], scale, key_chunk))
    out = jax.lax.map(block, (_blocks(q, 1, chunk, shards), _blocks(mask, 2, chunk, shards)))
    return _unblocks(out, 1, T, shards)  # out: [n, B, shards * chunk, H, e]
  return _attend_block(q, k, v, mask, scale, key_chunk)


def _attend_fused(q, k, v, mask, scale: float, impl: str):
  """jax.nn.dot_product_attention's fused kernel (`FUSED_IMPLEMENTATION[impl]`), with v
  zero-padded to q's head dim where they differ (MLA's 192 / 128) and the output sliced back."""
  e = v.shape[-1]
  if e != q.shape[-1]:
    v = jnp.pad(v, [(0, 0)] * 3 + [(0, q.shape[-1] - e)])
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                     implementation=FUSED_IMPLEMENTATION[impl])
  return out[..., :e]


def causal_blocks(T: int, shards: int, chunk: int, key_chunk: int | None, zigzag: bool):
  """The causal skip's tables: the smallest and largest query index of each query block on each
  device, [shards, blocks] each (each device's T / shards positions cut into blocks of chunk;
  shards 1 without context parallelism), and the smallest and largest key index of each key
  block, [key blocks] each (None without key blocks), in position or zigzag order. A device
  runs key block j for query block i iff k_first[j] <= q_last[d, i] and, where the mask allows
  no pair of the two blocks, k_last[j] >= q_first[d, i] (`attend_key_blocks`)."""
  local = T // shards
  n = -(-local // chunk)
  slots = zigzag_slots(T, shards) if zigzag else np.arange(T)
  per_device = slots.reshape(shards, local)
  pad = ((0, 0), (0, n * chunk - local))
  q_last = np.pad(per_device, pad, constant_values=-1).reshape(shards, n, chunk).max(-1)
  q_first = np.pad(per_device, pad, constant_values=T).reshape(shards, n, chunk).min(-1)
  if key_chunk is None or key_chunk >= T:
    return q_first, q_last, None
  nk = -(-T // key_chunk)
  k_first = np.pad(slots, (0, nk * key_chunk - T), constant_values=T).reshape(nk, -1).min(-1)
  k_last = np.pad(slots, (0, nk * key_chunk - T), constant_values=-1).reshape(nk, -1).max(-1)
  return q_first, q_last, (k_first, k_last)


def _attend_causal(q, k, v, mask, scale: float, chunk: int | None, key_chunk: int | None,
                   zigzag: bool, expand, shards: int, impl: str = "xla"):
  """Causal `attend` (the mask already ANDed with index causality), query blocks of `chunk`
  one at a time (`lax.map`, each under `jax.checkpoint`), each against the key blocks it needs
  (`causal_blocks`): those not past its last query, and of those only the ones its mask allows
  some pair of (or that overlap its own indices). The block bounds are known when tracing; the
  mask test is on the data (packed rows skip the keys of the segments before theirs).

  With context parallelism (shards > 1) this runs per device: a `shard_map` over `context`
  (the other mesh axes stay with XLA's sharding) in which each device runs its own queries and
  mask rows against every gathered key, with its own row of the tables (its place on the axis),
  so each device skips its own blocks. impl="cudnn": the fused kernel on each device's queries
  instead (the mask, no skipping)."""
  T = q.shape[1]
  local = T // shards
  chunk = local if chunk is None else min(chunk, local)
  n = -(-local // chunk)
  q_first, q_last, keys = causal_blocks(T, shards, chunk, key_chunk, zigzag)
  fn, args = expand if expand is not None else (None, ())
  whole_in = (k, v) + tuple(args)
  dtypes = [a.dtype for a in whole_in]

  def per_device(q, mask, q_first, q_last, *whole):
    k, v, *args = [a.astype(t) for a, t in zip(whole, dtypes)]
    if fn is not None:
      k, v = fn(k, v, *args)
    if impl == "cudnn":
      return _attend_fused(q, k, v, mask, scale, impl)
    if n == 1:
      return _attend_block(q, k, v, mask, scale, key_chunk, (q_first[0, 0], q_last[0, 0]), keys)
    block = jax.checkpoint(lambda a: _attend_block(a[0], k, v, a[1], scale, key_chunk,
                                                   (a[2], a[3]), keys))
    out = jax.lax.map(block, (_blocks(q, 1, chunk), _blocks(mask, 2, chunk), q_first[0],
                              q_last[0]))
    return _unblocks(out, 1, local)

  tables = (jnp.asarray(q_first, jnp.int32), jnp.asarray(q_last, jnp.int32))
  if shards == 1:
    return per_device(q, mask, *tables, *whole_in)
  q, mask = constrain_positions(q), constrain_positions(mask, axis=2)
  k, v = constrain_positions(k, split=False), constrain_positions(v, split=False)
  # XLA:CPU aborts compiling the bfloat16 sum of the gathered inputs' gradients that the
  # shard_map's transpose makes (its AllReducePromotion pass, jax 0.10.2): on a CPU they cross
  # the boundary as float32
  widen = jax.default_backend() == "cpu"
  whole_in = [a.astype(jnp.float32) if widen and a.dtype == jnp.bfloat16 else a
              for a in (k, v) + tuple(args)]
  P = jax.sharding.PartitionSpec
  split, whole = P(None, CONTEXT), P()
  return jax.shard_map(
      per_device, in_specs=(split, P(None, None, CONTEXT), P(CONTEXT), P(CONTEXT))
      + (whole,) * len(whole_in), out_specs=split, axis_names={CONTEXT}, check_vma=False,
  )(q, mask, *tables, *whole_in)


def _attend_block(q, k, v, mask, scale: float, key_chunk: int | None, queries=None, keys=None):
  """`attend` of one block of queries; with key blocks, `attend_key_blocks` with the causal
  skip's bounds (None: every block runs)."""
  if key_chunk is not None and key_chunk < k.shape[1]:
    return attend_key_blocks(q, k, v, mask, scale, key_chunk, queries, keys)
  B, T, H, _ = q.shape
  K = k.shape[2]
  qg = q.reshape(B, T, K, H // K, q.shape[-1])
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, :, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bske->btkge", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(B, T, H, v.shape[-1]).astype(v.dtype)


def _blocks(a, axis: int, size: int, shards: int = 1):
  """a's `axis` zero-padded to a multiple of size and cut into blocks of size, the blocks
  leading: [n, ..., size, ...].

  With shards > 1 (context parallelism: `axis` split over that many devices), each shard's
  part is cut the same way, and block i holds every shard's i-th block side by side:
  [n, ..., shards * size, ...]. So each block keeps the axis's split, and a loop over the
  blocks runs on every device at once, each on its own positions."""
  if shards > 1:
    parts = _blocks(a.reshape(a.shape[:axis] + (shards, -1) + a.shape[axis + 1:]), axis + 1, size)
    return parts.reshape(parts.shape[:axis + 1] + (shards * size,) + parts.shape[axis + 3:])
  n = -(-a.shape[axis] // size)
  a = jnp.pad(a, [(0, n * size - a.shape[axis]) if i == axis else (0, 0) for i in range(a.ndim)])
  return jnp.moveaxis(a.reshape(a.shape[:axis] + (n, size) + a.shape[axis + 1:]), axis, 0)


def _unblocks(out, axis: int, length: int, shards: int = 1):
  """The inverse of `_blocks` on a loop's outputs [n, ..., shards * size, ...]: [..., length,
  ...] (`axis` counted without the leading n), the padding dropped."""
  n, size = out.shape[0], out.shape[axis + 1] // shards
  out = out.reshape(out.shape[:axis + 1] + (shards, size) + out.shape[axis + 2:])
  out = jnp.moveaxis(out, 0, axis + 1)  # [..., shards, n, size, ...]
  out = out.reshape(out.shape[:axis] + (shards, n * size) + out.shape[axis + 3:])
  out = jax.lax.slice_in_dim(out, 0, length // shards, axis=axis + 1)
  return out.reshape(out.shape[:axis] + (length,) + out.shape[axis + 2:])


def attend_key_blocks(q, k, v, mask, scale: float, key_chunk: int, queries=None, keys=None,
                      skip_masked: bool = True):
  """`attend` over the keys in blocks of key_chunk (the last padded): each block updates a
  running max, softmax denominator and weighted sum of values (fp32), under `jax.checkpoint`, so
  the backward pass keeps those per block, not the [H, T, S] scores. Masked keys score NEG_INF
  as in `attend` (a fully masked row averages every real key); padded keys score -inf and weigh
  nothing.

  The causal skip. queries: (first, last) index of these queries (scalars, may be traced), where
  the mask is causal by index; keys: (first, last) index of each key block (static arrays
  [blocks]; None: the keys in order). A key block runs iff its first key is not past the last
  query and, with skip_masked, the mask allows some (query, key) pair of it or it overlaps the
  queries' indices (so every query keeps the blocks that hold its own index). For a query that
  sees a key, a fully masked block adds exp(NEG_INF - max) = 0 once a real score is the running
  max, and what it adds before that is scaled by exp(NEG_INF - real) = 0 when the first real
  score comes: skipping it changes none of the query's values. queries=None: every block runs."""
  B, T, H, d = q.shape
  S, K, e = k.shape[1], k.shape[2], v.shape[-1]
  G = H // K
  real = _blocks(jnp.ones((S,), bool), 0, key_chunk)  # False for the padded keys
  qg = q.reshape(B, T, K, G, d)

  def update(carry, k_b, v_b, mask_b, real_b):
    m, l, acc = carry  # running max and denominator [B, K, G, T]; sum of values [B, T, K, G, e]
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k_b, preferred_element_type=jnp.float32) * scale
    s = jnp.where(real_b, jnp.where(mask_b[:, :, None], s, NEG_INF), -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    acc = acc * jnp.moveaxis(rescale, 3, 1)[..., None] + jnp.einsum(
        "bkgts,bske->btkge", p.astype(v_b.dtype), v_b, preferred_element_type=jnp.float32)
    return m_new, l * rescale + p.sum(-1), acc

  @jax.checkpoint
  def step(carry, block):
    (k_first, k_last), *block = block
    if queries is None:
      return update(carry, *block), None
    q_first, q_last = queries
    run = k_first <= q_last
    if skip_masked:
      run &= (k_last >= q_first) | jnp.any(block[2])
    return jax.lax.cond(run, update, lambda c, *_: c, carry, *block), None

  init = (jnp.full((B, K, G, T), NEG_INF, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
          jnp.zeros((B, T, K, G, e), jnp.float32))
  if keys is None:
    first = np.arange(real.shape[0]) * key_chunk
    keys = first, np.minimum(first + key_chunk, S) - 1
  bounds = tuple(jnp.asarray(b, jnp.int32) for b in keys)
  (_, l, acc), _ = jax.lax.scan(step, init, (bounds, _blocks(k, 1, key_chunk),
                                             _blocks(v, 1, key_chunk), _blocks(mask, 3, key_chunk),
                                             real))
  return (acc / jnp.moveaxis(l, 3, 1)[..., None]).reshape(B, T, H, e).astype(v.dtype)


def default_positions(tokens, segment_ids):
  """Positions restart at 0 at every segment start (packed sequences)."""
  B, T = tokens.shape
  if segment_ids is None:
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  idx = jnp.arange(T, dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                           axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": None,
}


def maybe_remat(fn, policy: str):
  if policy == "none":
    return fn
  return jax.checkpoint(fn, policy=REMAT_POLICIES[policy])


# ------------------------------------------------------------------ KV cache
def cache_write(cache_LBS, new_Bt, layer, index):
  """Write new entries [B, t, ...] at layer `layer`, slot `index` of a stacked cache
  [L, B, S, ...], in place."""
  start = (layer, 0, index) + (0,) * (cache_LBS.ndim - 3)
  return jax.lax.dynamic_update_slice(cache_LBS, new_Bt[None].astype(cache_LBS.dtype), start)


def cache_read(cache_LBS, layer, dtype):
  """Layer `layer` of a stacked cache, [B, S, ...] in `dtype`."""
  return jax.lax.dynamic_index_in_dim(cache_LBS, layer, keepdims=False).astype(dtype)
