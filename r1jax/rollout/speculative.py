"""Speculative sampling with the model's own MTP module as the draft (DeepSeek-V3's use of MTP).

    out = sampler.generate(params, cfg, prompts, max_new_tokens=32, rng=key, eos_id=eos,
                           draft="mtp")
    out.draft_accepted / out.draft_proposed  # the acceptance rate

Every decode step feeds the main model two tokens: the last emitted one, x_n, and a draft of
the next, d ~ q, that the MTP module proposed from the main model's hidden state at n - 1 and
x_n. One forward over both gives the main model's distributions p_n (for token n + 1) and
p_{n+1} (for token n + 2, given d). The draft is accepted with probability min(1, p_n(d) / q(d));
then token n + 1 is d and token n + 2 is drawn from p_{n+1}: two tokens for one step. Rejected,
token n + 1 is drawn from the residual max(p_n - q, 0) (normalized): one token. This is the
speculative sampling of Leviathan et al. and Chen et al. (2023): every emitted token is
distributed exactly as the main model's sampling distribution (tempered, top-k/top-p filtered
as `sampler.sample_token`), whatever the draft. Greedy: the draft is accepted when it is the
main model's argmax, and the tokens are those of greedy decoding. So the draft changes the
speed, never what is sampled; the log-probs returned are the main model's, as without it.

Cache layout: step j writes its two tokens at the slots [P + 2j, P + 2j + 2), the same for every
row; a rejected draft's slot becomes a hole (`kv_valid` False), so rows that accepted different
numbers of drafts share one slot index while their positions (RoPE) advance by one or two. The
cache holds P + 2N slots. The MTP module has a one-layer cache of its own over the same slots:
the entry at position i reads the main model's hidden state h_i and token i + 1
(`decoder.mtp_cached`), and is written once token i + 1 is known, so a step runs the MTP layer
on its two slots after the verification.

The cost per step is the main model on two tokens and one MTP layer on two, against the main
model on one token. It pays where a decode step costs about the same for two tokens as for one
(memory- or latency-bound decoding: small batches, large models) and the draft is often
accepted (DeepSeek-V3 reports 85-90 % for its second token).

Only the first MTP module drafts (one token ahead), the model must have one
(`num_nextn_predict_layers` >= 1), and routing is not recorded (routing replay needs the
experts of the tokens as the update sees them; a rejected draft's routing would be in the
middle of a row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig
from r1jax.model import decoder
from r1jax.rollout import sampler
from r1jax.rollout.sampler import _batch_constraint, gumbel_noise, sample_token, sampling_logits


def step_noise(key, rows: int, vocab: int) -> dict:
  """The random numbers of one decode step: the verification's uniform [B] and residual
  sample's Gumbel noise [B, V], the bonus token's and the next draft's Gumbel noise [B, V]."""
  u_key, residual_key, bonus_key, draft_key = jax.random.split(key, 4)
  return {"u": jax.random.uniform(u_key, (rows,), jnp.float32),
          "residual": gumbel_noise(residual_key, (rows, vocab)),
          "bonus": gumbel_noise(bonus_key, (rows, vocab)),
          "draft": gumbel_noise(draft_key, (rows, vocab))}


def draw(logits_BV, noise_BV, knobs, filtered: bool):
  """A draft token [B] from the draft model's logits: a sample of its sampling distribution
  (with the Gumbel noise noise_BV), or its argmax when greedy."""
  allowed, _, scaled = sampling_logits(logits_BV, knobs, filtered)
  sampled = jnp.argmax(scaled + noise_BV, axis=-1)
  return jnp.where(knobs["greedy"], jnp.argmax(allowed, axis=-1), sampled).astype(jnp.int32)


def verify(p_logits_BV, q_logits_BV, draft_B, u_B, noise_BV, knobs, filtered: bool):
  """One draft's verification: (token [B] int32, accepted [B] bool).

  p: the main model's logits for the position, q: the draft model's (which `draft_B` was drawn
  from by `draw`). Accepted with probability min(1, p(d) / q(d)); the token is then the draft,
  else a sample of max(p - q, 0), normalized. The token is distributed as p's sampling
  distribution. u_B: uniform [0, 1) numbers, noise_BV: Gumbel noise for the residual's sample.
  Greedy: accepted iff the draft is p's argmax, and the token is that argmax."""
  allowed_p, _, scaled_p = sampling_logits(p_logits_BV, knobs, filtered)
  _, _, scaled_q = sampling_logits(q_logits_BV, knobs, filtered)
  p = jax.nn.softmax(scaled_p, axis=-1)
  q = jax.nn.softmax(scaled_q, axis=-1)
  p_d = jnp.take_along_axis(p, draft_B[:, None], -1)[:, 0]
  q_d = jnp.take_along_axis(q, draft_B[:, None], -1)[:, 0]
  accepted = u_B * q_d < p_d
  residual = jnp.maximum(p - q, 0.0)
  log_residual = jnp.where(residual > 0, jnp.log(jnp.where(residual > 0, residual, 1.0)), -jnp.inf)
  resampled = jnp.argmax(log_residual + noise_BV, axis=-1)
  top = jnp.argmax(allowed_p, axis=-1)
  accepted = jnp.where(knobs["greedy"], draft_B == top, accepted)
  token = jnp.where(accepted, draft_B, jnp.where(knobs["greedy"], top, resampled))
  return token.astype(jnp.int32), accepted


def _logprob(logits_BV, token_B, knobs):
  """log p(token) under softmax(logits / temperature), before top-k/top-p (`sample_token`'s)."""
  _, tempered, _ = sampling_logits(logits_BV, knobs, False)
  return jnp.take_along_axis(jax.nn.log_softmax(tempered, axis=-1), token_B[:, None], -1)[:, 0]


def _write(buffer_BN, rows, column_B, value_B, keep_B):
  """buffer[b, column[b]] = value[b] where keep[b] (the other rows are left as they are)."""
  N = buffer_BN.shape[1]
  return buffer_BN.at[rows, jnp.where(keep_B, column_B, N)].set(value_B, mode="drop")


def noise_first(rows: int, max_new_tokens: int, vocab: int) -> bool:
  """Whether `generate_core` draws every step's random numbers before its loop: when they take
  at most `sampler.NOISE_BYTES` (three [B, V] float32 arrays per step)."""
  return max_new_tokens * rows * vocab * 12 <= sampler.NOISE_BYTES


def generate_core(params, prompt_BP, pad_B, rng, knobs, *, cfg: ModelConfig,
                  max_new_tokens: int, filtered: bool, groups: int = 1,
                  noise_first: bool = True):
  """Prefill + speculative while-loop decode (module docstring). Returns completion [B, N],
  logprobs [B, N], lengths [B], stopped [B] (a stop token was emitted), and the draft
  statistics {"accepted", "proposed", "steps"} (int32 scalars: drafts accepted and verified
  over the running rows, decode steps run). noise_first: draw every step's random numbers
  before the loop (the same numbers as drawing them step by step)."""
  B, P = prompt_BP.shape
  N = max_new_tokens
  S = P + 2 * N
  rows = jnp.arange(B)
  prompt_BP, pad_B = _batch_constraint(prompt_BP), _batch_constraint(pad_B)
  prompt_UP, pad_U = (prompt_BP[::groups], pad_B[::groups]) if groups > 1 else (prompt_BP, pad_B)
  U = prompt_UP.shape[0]
  cache = jax.tree.map(lambda c: _batch_constraint(c, 1), decoder.init_cache(cfg, U, S))
  positions_UP = jnp.maximum(jnp.arange(P, dtype=jnp.int32)[None, :] - pad_U[:, None], 0)
  logits, cache, _, hidden = decoder.forward_cached(params, prompt_UP, positions_UP, cache, 0,
                                                    pad_U, cfg, last_only=True,
                                                    return_hidden=True)
  if groups > 1:
    cache = jax.tree.map(lambda c: _batch_constraint(jnp.repeat(c, groups, axis=1), 1), cache)
    logits, hidden = jnp.repeat(logits, groups, axis=0), jnp.repeat(hidden, groups, axis=0)
  V = logits.shape[-1]
  keys = jax.random.split(rng, N)
  first_key, draft_key = jax.random.split(keys[0])
  # every step's random numbers drawn before the loop when they are small (as the plain
  # sampler's `noise_first`: threefry inside the loop is a chain of small ops every step)
  noise = jax.vmap(lambda k: step_noise(k, B, V))(keys) if noise_first else None
  token, logprob = sample_token(logits[:, -1], first_key, knobs, filtered)
  stop = jnp.isin(token, knobs["stop_ids"])
  out = jnp.full((B, N), knobs["pad_id"], jnp.int32).at[:, 0].set(token)
  logprobs = jnp.zeros((B, N), jnp.float32).at[:, 0].set(logprob)
  lengths = jnp.ones((B,), jnp.int32)
  # the MTP module over the prompt: position i reads h_i and token i + 1. Slots [0, P - 1)
  # depend on the prompt alone (one row per distinct prompt, as the main prefill); the last
  # reads the row's first sampled token, and its logits draft token P + 1. The prompt pass
  # runs over all P slots (a placeholder token at the last, rewritten per row below): on a
  # context mesh, XLA's partitioner failed its own verifier on the P - 1 positions' gather
  slots = jnp.arange(S, dtype=jnp.int32)
  kv_valid = (slots[None, :] >= pad_B[:, None]) & (slots[None, :] < P)
  hidden_U = hidden[::groups] if groups > 1 else hidden
  mtp_cache = decoder.init_mtp_cache(cfg, U, S)
  next_UP = jnp.concatenate([prompt_UP[:, 1:], prompt_UP[:, -1:]], axis=1)
  _, mtp_cache = decoder.mtp_cached(params, hidden_U, next_UP, positions_UP, mtp_cache, 0,
                                    pad_U, cfg, last_only=True)
  if groups > 1:
    mtp_cache = jax.tree.map(lambda c: jnp.repeat(c, groups, axis=1), mtp_cache)
  mtp_cache = jax.tree.map(lambda c: _batch_constraint(c, 1), mtp_cache)
  q_logits, mtp_cache = decoder.mtp_cached(params, hidden[:, -1:], token[:, None],
                                           (P - 1 - pad_B)[:, None], mtp_cache, P - 1, kv_valid,
                                           cfg)
  q_logits = q_logits[:, 0]
  draft = draw(q_logits, gumbel_noise(draft_key, (B, V)), knobs, filtered)
  zero = jnp.int32(0)
  state = dict(out=out, logprobs=logprobs, lengths=lengths, stop=stop, done=stop | (N <= 1),
               last=token, position=P - pad_B, draft=draft, q_logits=q_logits,
               kv_valid=kv_valid, accepted=zero, proposed=zero)

  def cond(carry):
    i, _, _, state = carry
    return (i < N) & ~jnp.all(state["done"])

  def body(carry):
    i, cache, mtp_cache, st = carry
    slot = P + 2 * (i - 1)
    # both new slots count as real while the main model and the MTP module run on them
    kv_valid = jax.lax.dynamic_update_slice(st["kv_valid"], jnp.ones((B, 2), bool), (0, slot))
    tokens = jnp.stack([st["last"], st["draft"]], axis=1)
    positions = jnp.stack([st["position"], st["position"] + 1], axis=1)
    logits, cache, _, hidden = decoder.forward_cached(params, tokens, positions, cache, slot,
                                                      kv_valid, cfg, return_hidden=True)
    z = (step_noise(keys[i], B, V) if noise is None
         else jax.tree.map(lambda a: a[i], noise))
    first, accepted = verify(logits[:, 0], st["q_logits"], st["draft"], z["u"], z["residual"],
                             knobs, filtered)
    second, second_lp = sample_token(logits[:, 1], None, knobs, filtered, z["bonus"])
    running = ~st["done"]
    first_stops = jnp.isin(first, knobs["stop_ids"])
    keep_second = running & accepted & ~first_stops & (st["lengths"] + 1 < N)
    out = _write(st["out"], rows, st["lengths"], first, running)
    out = _write(out, rows, st["lengths"] + 1, second, keep_second)
    lps = _write(st["logprobs"], rows, st["lengths"], _logprob(logits[:, 0], first, knobs),
                 running)
    lps = _write(lps, rows, st["lengths"] + 1, second_lp, keep_second)
    lengths = st["lengths"] + running.astype(jnp.int32) + keep_second.astype(jnp.int32)
    stop = (st["stop"] | (running & first_stops)
            | (keep_second & jnp.isin(second, knobs["stop_ids"])))
    # the MTP module on the two slots: (h_n, token n + 1) and (h_{n+1}, token n + 2); the
    # second entry is a hole where the draft was rejected
    q_both, mtp_cache = decoder.mtp_cached(params, hidden, jnp.stack([first, second], axis=1),
                                           positions, mtp_cache, slot, kv_valid, cfg)
    q_logits = jnp.where(accepted[:, None], q_both[:, 1], q_both[:, 0])
    kv_valid = jax.lax.dynamic_update_slice(kv_valid, accepted[:, None], (0, slot + 1))
    st = dict(out=out, logprobs=lps, lengths=lengths, stop=stop,
              done=st["done"] | stop | (lengths >= N),
              last=jnp.where(accepted, second, first),
              position=st["position"] + 1 + accepted.astype(jnp.int32),
              draft=draw(q_logits, z["draft"], knobs, filtered), q_logits=q_logits,
              kv_valid=kv_valid,
              accepted=st["accepted"] + jnp.sum(running & accepted, dtype=jnp.int32),
              proposed=st["proposed"] + jnp.sum(running, dtype=jnp.int32))
    return i + 1, cache, mtp_cache, st

  steps, _, _, st = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, mtp_cache, state))
  stats = {"accepted": st["accepted"], "proposed": st["proposed"], "steps": steps - 1}
  return st["out"], st["logprobs"], st["lengths"], st["stop"], stats
