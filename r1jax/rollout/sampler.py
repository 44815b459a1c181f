"""Batched generation with a KV cache: prefill, then a jitted `lax.while_loop` decode.

    out = sampler.generate(params, cfg, prompts, max_new_tokens=128, rng=jax.random.key(0),
                           temperature=1.0, top_p=1.0, eos_id=cfg.eos_token_id)
    out.completion, out.logprobs, out.completion_mask, out.lengths, out.truncated

Prompts are left-padded to a bucketed length (the longest prompt rounded up to a multiple of
`PROMPT_BUCKET`, so prompt-length jitter does not recompile); positions start at 0 at each row's
first real token, so a row's logits equal those of its unpadded sequence. A row stops at EOS or
any of `stop_ids` (the stop token is part of the completion); the loop ends when every row has
stopped or `max_new_tokens` is reached. The jitted core is cached per (cfg, shapes, sampling
settings) by `jax.jit` static arguments.

`logprobs` are log p(token) under the model's *untempered* distribution (temperature 1, no top-k
or top-p), whatever the sampling settings: they are GRPO's old log-probs when rollouts sample at
temperature 1 without truncation. At other settings they are not the sampling distribution's
log-probs (recompute them with the policy if the loss needs those).

Sharding: called inside `with jax.set_mesh(mesh)`, the batch is split over the mesh's batch
axes (when it divides) and the MoE dispatches experts with `shard_map`; the sampled tokens do not
depend on the sharding (JAX's partitionable threefry RNG).

Stop strings are applied after decoding, on the text: `truncate_at_stop_strings`. Token-level
outputs (completion, mask, logprobs) are not cut by them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from r1jax.config import ModelConfig
from r1jax.model import decode

PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Static sampling settings: changing one recompiles the core."""
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0  # 0 = off
  greedy: bool = False
  stop_ids: tuple[int, ...] = ()  # EOS and other stop tokens
  pad_id: int = 0


@dataclasses.dataclass
class Rollout:
  """Numpy outputs of `generate`. P is the bucketed prompt length, N = max_new_tokens."""
  tokens: np.ndarray  # int32 [B, P + N]: left-padded prompt, then the completion
  completion: np.ndarray  # int32 [B, N], pad_id after the stop token
  logprobs: np.ndarray  # float32 [B, N], untempered log p of each sampled token; 0 past the end
  completion_mask: np.ndarray  # bool [B, N], True for the `lengths` generated tokens
  lengths: np.ndarray  # int32 [B], completion lengths including the stop token
  truncated: np.ndarray  # bool [B], no stop token within N
  prompt_lengths: np.ndarray  # int32 [B]


def filter_logits(logits_BV, params: SamplingParams):
  """Temperature, then top-k, then top-p (nucleus) masking, as in HF's default order."""
  logits = logits_BV / params.temperature
  if params.top_k:
    kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if params.top_p < 1.0:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # keep the smallest prefix whose mass reaches top_p (the top token always stays)
    n_keep = jnp.maximum(jnp.sum(mass_before < params.top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(sorted_desc, n_keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def sample_token(logits_BV, key, params: SamplingParams):
  """Next tokens [B] int32 and their untempered log-probs [B] fp32."""
  if params.greedy:
    token = jnp.argmax(logits_BV, axis=-1)
  else:
    token = jax.random.categorical(key, filter_logits(logits_BV, params), axis=-1)
  token = token.astype(jnp.int32)
  logprob = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), token[:, None], -1)[:, 0]
  return token, logprob


def _batch_constraint(x):
  """Split dim 0 over the context mesh's batch axes when it divides; no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  from r1jax.parallel.mesh import batch_axes
  axes = batch_axes(mesh)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  spec = PartitionSpec(axes, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling"))
def _generate_core(params, prompt_BP, pad_B, rng, *, cfg: ModelConfig, max_new_tokens: int,
                   sampling: SamplingParams):
  """Prefill + while-loop decode. Returns completion [B, N], logprobs [B, N], lengths [B],
  stopped [B]."""
  B, P = prompt_BP.shape
  N = max_new_tokens
  prompt_BP, pad_B = _batch_constraint(prompt_BP), _batch_constraint(pad_B)
  prompt_len_B = P - pad_B
  cache = jax.tree.map(_batch_constraint, decode.init_cache(cfg, B, P + N))
  positions = jnp.maximum(jnp.arange(P, dtype=jnp.int32)[None, :] - pad_B[:, None], 0)
  logits, cache = decode.forward_cached(params, prompt_BP, positions, cache, 0, pad_B, cfg)
  stop_ids = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)

  def emit(state, logits_BV, i):
    """Sample token i for the rows still running and record it."""
    out, logprobs, lengths, stopped = state
    token, logprob = sample_token(logits_BV, jax.random.fold_in(rng, i), sampling)
    token = jnp.where(stopped, sampling.pad_id, token)
    logprob = jnp.where(stopped, 0.0, logprob)
    lengths = lengths + (~stopped).astype(jnp.int32)
    stopped = stopped | jnp.isin(token, stop_ids)
    return (out.at[:, i].set(token), logprobs.at[:, i].set(logprob), lengths, stopped)

  state = (jnp.full((B, N), sampling.pad_id, jnp.int32), jnp.zeros((B, N), jnp.float32),
           jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))
  state = jax.tree.map(_batch_constraint, emit(state, logits[:, -1], 0))

  def cond(carry):
    i, _, state = carry
    return (i < N) & ~jnp.all(state[3])

  def body(carry):
    i, cache, state = carry
    prev = state[0][:, i - 1][:, None]
    logits, cache = decode.forward_cached(params, prev, (prompt_len_B + i - 1)[:, None], cache,
                                          P + i - 1, pad_B, cfg)
    return i + 1, cache, emit(state, logits[:, 0], i)

  _, _, state = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, state))
  return state


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
  """Left-padded int32 [B, P] with P = the longest prompt rounded up to `bucket`, and the pad
  lengths [B]."""
  lens = np.asarray([len(p) for p in prompts], np.int32)
  if len(prompts) == 0 or lens.min() == 0:
    raise ValueError("generate: every prompt needs at least one token")
  P = -(-int(lens.max()) // bucket) * bucket
  out = np.full((len(prompts), P), pad_id, np.int32)
  for row, p in enumerate(prompts):
    out[row, P - len(p):] = p
  return out, P - lens


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             greedy: bool = False, eos_id: int | None, stop_ids: Sequence[int] = (),
             pad_id: int = 0) -> Rollout:
  """Sample up to `max_new_tokens` tokens after each prompt (lists of token ids)."""
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  if not greedy and temperature <= 0:
    raise ValueError(f"generate: temperature={temperature} must be > 0 (or use greedy=True)")
  if not 0 < top_p <= 1:
    raise ValueError(f"generate: top_p={top_p} must be in (0, 1]")
  stops = tuple(sorted({int(s) for s in stop_ids} | ({int(eos_id)} if eos_id is not None else set())))
  sampling = SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                            greedy=bool(greedy), stop_ids=stops, pad_id=int(pad_id))
  prompt_BP, pad_B = left_pad(prompts, pad_id)
  if max(map(len, prompts)) + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"generate: longest prompt {max(map(len, prompts))} + max_new_tokens="
                     f"{max_new_tokens} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  out = _generate_core(params, jnp.asarray(prompt_BP), jnp.asarray(pad_B), rng, cfg=cfg,
                       max_new_tokens=int(max_new_tokens), sampling=sampling)
  completion, logprobs, lengths, stopped = jax.tree.map(np.asarray, out)
  return Rollout(tokens=np.concatenate([prompt_BP, completion], axis=1), completion=completion,
                 logprobs=logprobs,
                 completion_mask=np.arange(max_new_tokens)[None, :] < lengths[:, None],
                 lengths=lengths, truncated=~stopped,
                 prompt_lengths=(prompt_BP.shape[1] - pad_B).astype(np.int32))


def truncate_at_stop_strings(texts: Sequence[str], stops: Sequence[str], *,
                             include_stop: bool = True) -> list[str]:
  """Cut each text at the earliest occurrence of any stop string (kept if include_stop)."""
  out = []
  for text in texts:
    hits = [(i, s) for s in stops if s and (i := text.find(s)) >= 0]
    if not hits:
      out.append(text)
      continue
    i, s = min(hits, key=lambda h: (h[0], -len(h[1])))
    out.append(text[:i + len(s)] if include_stop else text[:i])
  return out
