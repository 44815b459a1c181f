"""Batched generation with a KV cache: prefill, then a jitted `lax.while_loop` decode.

    out = sampler.generate(params, cfg, prompts, max_new_tokens=128, rng=jax.random.key(0),
                           temperature=1.0, top_p=1.0, eos_id=cfg.eos_token_id)
    out.completion, out.logprobs, out.completion_mask, out.lengths, out.truncated

Prompts are left-padded to a bucketed length (the longest prompt rounded up to a multiple of
`PROMPT_BUCKET`, so prompt-length jitter does not recompile); positions start at 0 at each row's
first real token, so a row's logits equal those of its unpadded sequence. A row stops at EOS or
any of `stop_ids` (the stop token is part of the completion); the loop ends when every row has
stopped or `max_new_tokens` is reached. When the rows are runs of G identical prompts (GRPO's
groups, pass@k's samples), each prompt is prefilled once and its cache copied to its G rows
(`share_prefill`, on by default). The jitted core is cached by `jax.jit` per (cfg, shapes,
whether top-k/top-p filtering is on); temperature, top-k, top-p, greedy and the stop ids are
traced, so changing them does not recompile.

`logprobs` are log p(token) under softmax(logits / temperature), before top-k or top-p (greedy:
temperature 1). They are GRPO's old log-probs: its loss scores the same tempered distribution
(`model.target_logprobs(temperature=...)`, as TRL and verl do), so without top-k/top-p they are
the sampling distribution's log-probs. With top-k or top-p they are not (the truncation is not
in them), and the loss does not model it either.

Sharding: called inside `with jax.set_mesh(mesh)`, the batch is split over the mesh's batch
axes and `context` (when they divide) and the MoE dispatches experts with `shard_map`; the
sampled tokens do not depend on the sharding (JAX's partitionable threefry RNG).

Stop strings are applied after decoding, on the text: `truncate_at_stop_strings`. Token-level
outputs (completion, mask, logprobs) are not cut by them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from r1jax.axes import batch_axes, splitting, token_axes
from r1jax.model.config import ModelConfig
from r1jax.model import decoder
from r1jax.parallel.rules import to_host

PROMPT_BUCKET = 16


@dataclasses.dataclass
class Rollout:
  """Numpy outputs of `generate`. P is the bucketed prompt length, N = max_new_tokens."""
  tokens: np.ndarray  # int32 [B, P + N]: left-padded prompt, then the completion
  completion: np.ndarray  # int32 [B, N], pad_id after the stop token
  # float32 [B, N], log p of each sampled token under softmax(logits / temperature); 0 past the end
  logprobs: np.ndarray
  completion_mask: np.ndarray  # bool [B, N], True for the `lengths` generated tokens
  lengths: np.ndarray  # int32 [B], completion lengths including the stop token
  truncated: np.ndarray  # bool [B], no stop token within N
  prompt_lengths: np.ndarray  # int32 [B]
  # int16 [B, P + N, L_moe, k]: the experts each MoE layer chose for the token at each slot
  # (record_routing=True, MoE models; routing replay, R3), else None
  routing: np.ndarray | None = None
  prefill_rows: int | None = None  # rows the prefill ran on: B / G with a shared prefill
  # draft="mtp" (`rollout.speculative`): drafts accepted, drafts verified (both over the running
  # rows) and decode steps run; else None
  draft_accepted: int | None = None
  draft_proposed: int | None = None
  decode_steps: int | None = None


# Rollout fields that describe the whole generate call, not one row each
CALL_FIELDS = ("prefill_rows", "draft_accepted", "draft_proposed", "decode_steps")


def row_fields(rollout: Rollout) -> list[str]:
  """The names of the rollout's per-row arrays that are set (not None)."""
  return [f.name for f in dataclasses.fields(rollout)
          if f.name not in CALL_FIELDS and getattr(rollout, f.name) is not None]


def filter_logits(logits_BV, temperature, top_k, top_p):
  """Temperature, then top-k, then top-p (nucleus) masking, HF's order. All three may be traced:
  top_k = 0 is off, top_p = 1 is off. One descending sort serves both filters."""
  V = logits_BV.shape[-1]
  logits = logits_BV / temperature
  sorted_desc = -jnp.sort(-logits, axis=-1)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
  in_top_k = jnp.arange(V) < k
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  # keep the smallest prefix whose mass reaches top_p; the top token always stays
  n_keep = jnp.sum((mass_before < top_p) & in_top_k, axis=-1, keepdims=True)
  cutoff = jnp.take_along_axis(sorted_desc, jnp.maximum(n_keep, 1) - 1, axis=-1)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def gumbel_noise(key, shape):
  """The Gumbel noise `jax.random.categorical(key, logits)` adds to float32 logits of `shape`
  before its argmax: sampling with it gives categorical's very tokens."""
  return jax.random.gumbel(key, shape, jnp.float32)


def sampling_logits(logits_BV, knobs, filtered: bool):
  """(the logits with ids past the tokenizer's vocabulary (padded embedding rows) at -inf,
  which greedy decoding takes the argmax of; the fp32 logits / temperature, whose softmax the
  log-probs are of; the sampling distribution's logits: tempered and in the vocabulary, and
  with `filtered` top-k/top-p masked)."""
  in_vocab = jnp.arange(logits_BV.shape[-1]) < knobs["vocab_limit"]
  allowed = jnp.where(in_vocab, logits_BV, -jnp.inf)
  tempered = logits_BV.astype(jnp.float32) / knobs["temperature"]  # x / 1.0 == x exactly
  scaled = (filter_logits(allowed, knobs["temperature"], knobs["top_k"], knobs["top_p"])
            if filtered else jnp.where(in_vocab, tempered, -jnp.inf))
  return allowed, tempered, scaled


def sample_token(logits_BV, key, knobs, filtered: bool, noise_BV=None):
  """Next tokens [B] int32 and their log-probs [B] fp32 under softmax(logits / temperature),
  before top-k/top-p. `knobs` holds the traced settings (temperature, top_k, top_p, greedy);
  `filtered` (static) compiles top-k/top-p in. noise_BV: `gumbel_noise(key, [B, V])` drawn
  beforehand (the same tokens as drawing it here)."""
  allowed, tempered, scaled = sampling_logits(logits_BV, knobs, filtered)
  assert scaled.dtype == jnp.float32, scaled.dtype  # what gumbel_noise draws
  if noise_BV is None:
    noise_BV = gumbel_noise(key, scaled.shape)
  # jax.random.categorical's sampling: argmax(logits + Gumbel noise)
  token = jnp.where(knobs["greedy"], jnp.argmax(allowed, axis=-1),
                    jnp.argmax(scaled + noise_BV, axis=-1)).astype(jnp.int32)
  logprob = jnp.take_along_axis(jax.nn.log_softmax(tempered, axis=-1), token[:, None], -1)[:, 0]
  return token, logprob


def _batch_constraint(x, axis: int = 0):
  """Split the rows (`axis`) over the context mesh's batch axes and `context` (a decode step has
  no positions to split, so the context devices take rows too) when they divide, else over the
  batch axes alone when those divide; no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  axes = splitting(mesh, x.shape[axis], token_axes(mesh), batch_axes(mesh))
  if not axes:
    return x
  spec = [None] * x.ndim
  spec[axis] = axes
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


# the most sampling noise (N x B x V float32) drawn before the decode loop (`noise_first`);
# beyond it, each decode step draws its own
NOISE_BYTES = 16 << 20
ROUTING_DTYPE = jnp.int16  # expert ids (< 32768 experts); 2 bytes per token, layer and choice


def _generate_core(params, prompt_BP, pad_B, rng, knobs, *, cfg: ModelConfig,
                   max_new_tokens: int, filtered: bool, record_routing: bool = False,
                   groups: int = 1, noise_first: bool = False):
  """Prefill + while-loop decode. Returns completion [B, N], logprobs [B, N], lengths [B],
  stopped [B], and with record_routing the expert ids [B, P + N, L_moe, k] of every input
  slot (else None). `knobs`: traced sampling settings and stop ids (changing them does not
  recompile). groups = G > 1: the rows are runs of G identical prompts; each is prefilled once
  and its cache and last logits are copied to the G rows of its run. noise_first: draw every
  step's sampling noise before the loop (the same tokens as drawing it step by step)."""
  B, P = prompt_BP.shape
  N = max_new_tokens
  prompt_BP, pad_B = _batch_constraint(prompt_BP), _batch_constraint(pad_B)
  prompt_len_B = P - pad_B
  # the prefill: one row per distinct prompt (U = B / G), every row when groups == 1
  prompt_UP, pad_U = (prompt_BP[::groups], pad_B[::groups]) if groups > 1 else (prompt_BP, pad_B)
  U = prompt_UP.shape[0]
  # cache leaves are [L, rows, S, ...]
  cache = jax.tree.map(lambda c: _batch_constraint(c, 1), decoder.init_cache(cfg, U, P + N))
  positions = jnp.maximum(jnp.arange(P, dtype=jnp.int32)[None, :] - pad_U[:, None], 0)
  logits, cache, ids = decoder.forward_cached(params, prompt_UP, positions, cache, 0, pad_U, cfg,
                                              last_only=True)
  if groups > 1:  # cache leaves are [L, U, S, ...]; logits [U, 1, V]; expert ids [L_moe, U, P, k]
    cache = jax.tree.map(lambda c: _batch_constraint(jnp.repeat(c, groups, axis=1), 1), cache)
    logits = jnp.repeat(logits, groups, axis=0)
    ids = None if ids is None else jnp.repeat(ids, groups, axis=1)
  routing = None
  if record_routing and ids is not None:
    L_moe, _, _, k = ids.shape
    routing = jnp.zeros((B, P + N, L_moe, k), ROUTING_DTYPE)
    routing = routing.at[:, :P].set(jnp.moveaxis(ids, 0, 2).astype(ROUTING_DTYPE))
  # one key per step, drawn before the loop (keys[i] == fold_in(rng, i) with JAX's default
  # partitionable threefry); a fold_in inside the loop runs threefry's rolled loop every step
  keys = jax.random.split(rng, N)
  # noise_first: the sampling noise of all N steps at once (drawing it in the loop runs
  # threefry's rolled loop, a chain of small ops, in every decode step)
  noise = (jax.vmap(lambda key: gumbel_noise(key, (B, logits.shape[-1])))(keys)
           if noise_first else None)

  def emit(state, logits_BV, i):
    """Sample token i for the rows still running and record it."""
    out, logprobs, lengths, stopped = state
    token, logprob = sample_token(logits_BV, keys[i], knobs, filtered,
                                  None if noise is None else noise[i])
    token = jnp.where(stopped, knobs["pad_id"], token)
    logprob = jnp.where(stopped, 0.0, logprob)
    lengths = lengths + (~stopped).astype(jnp.int32)
    stopped = stopped | jnp.isin(token, knobs["stop_ids"])
    return (out.at[:, i].set(token), logprobs.at[:, i].set(logprob), lengths, stopped)

  state = (jnp.full((B, N), knobs["pad_id"], jnp.int32), jnp.zeros((B, N), jnp.float32),
           jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))
  state = jax.tree.map(_batch_constraint, emit(state, logits[:, -1], 0))

  def cond(carry):
    i, _, state, _ = carry
    return (i < N) & ~jnp.all(state[3])

  def body(carry):
    i, cache, state, routing = carry
    prev = state[0][:, i - 1][:, None]
    logits, cache, ids = decoder.forward_cached(params, prev, (prompt_len_B + i - 1)[:, None],
                                               cache, P + i - 1, pad_B, cfg)
    if routing is not None:  # the token at slot P + i - 1 went to these experts
      routing = jax.lax.dynamic_update_slice(
          routing, jnp.moveaxis(ids, 0, 2).astype(ROUTING_DTYPE), (0, P + i - 1, 0, 0))
    return i + 1, cache, emit(state, logits[:, 0], i), routing

  _, _, state, routing = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, state, routing))
  return state + (routing,)


@functools.lru_cache(maxsize=None)
def _jitted_core(compiler_options: tuple = ()):
  """The jitted core, one per set of XLA compiler options; jax.jit caches the compiles per
  (cfg, shapes, filtered)."""
  return jax.jit(_generate_core,
                 static_argnames=("cfg", "max_new_tokens", "filtered", "record_routing",
                                  "groups", "noise_first"),
                 compiler_options=dict(compiler_options) or None)


@functools.lru_cache(maxsize=None)
def _jitted_speculative(compiler_options: tuple = ()):
  """The speculative core (`rollout.speculative`), jitted as `_jitted_core`."""
  from r1jax.rollout import speculative
  return jax.jit(speculative.generate_core,
                 static_argnames=("cfg", "max_new_tokens", "filtered", "groups", "noise_first"),
                 compiler_options=dict(compiler_options) or None)


DRAFTS = ("", "mtp")  # generate's `draft`: none, or the model's first MTP module


def check_draft(draft: str, cfg: ModelConfig, *, record_routing: bool = False) -> None:
  """Raise ValueError when `generate(draft=...)` cannot run on this model."""
  if draft not in DRAFTS:
    raise ValueError(f"generate: draft={draft!r} must be one of {DRAFTS}")
  if draft == "mtp" and not cfg.num_nextn_predict_layers:  # (only DeepSeek models have any)
    raise ValueError(f"generate: draft='mtp' needs a model with an MTP module "
                     f"(num_nextn_predict_layers >= 1); {cfg.model_type} with "
                     f"num_nextn_predict_layers={cfg.num_nextn_predict_layers} has none")
  if draft and record_routing:
    raise ValueError("generate: draft='mtp' does not record routing (routing replay)")


def prompt_groups(prompts: Sequence[Sequence[int]]) -> int:
  """G when the rows are runs of G identical prompts (GRPO's groups, pass@k's samples: what
  `engine.rollout` builds with repeats=G), else 1."""
  B, first = len(prompts), list(prompts[0])
  G = 1
  while G < B and list(prompts[G]) == first:
    G += 1
  if G == 1 or B % G:
    return 1
  for start in range(G, B, G):
    run = prompts[start:start + G]
    if any(list(p) != list(run[0]) for p in run[1:]):
      return 1
  return G


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


def policy_config(cfg: ModelConfig) -> ModelConfig:
  """The config of the policy: what generation runs and what the RL update must score with, so
  that the tokens are scored by the policy that sampled them. The MoE never drops an expert
  assignment (a dropped assignment changes a token's output depending on the other tokens in
  the batch, which differ between a decode step and a training forward): a capacity-buffer
  config runs the blocked dropless path instead (`moe.experts_blocked`, plain XLA, the CPU fast
  path; XLA:CPU expands ragged_dot into a dense dot over all experts)."""
  if cfg.is_moe and cfg.moe_impl == "capacity":
    return cfg.replace(moe_impl="blocked", capacity_factor=None)
  if cfg.is_moe:
    return cfg.replace(capacity_factor=None)
  return cfg



def _knobs(cfg: ModelConfig, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           greedy: bool = False, stop_ids: Sequence[int] = (), pad_id: int = 0,
           vocab_limit: int | None = None) -> dict:
  """The jitted core's traced settings (changing them does not recompile)."""
  return {"temperature": np.float32(temperature), "top_k": np.int32(top_k),
          "top_p": np.float32(top_p), "greedy": np.bool_(greedy),
          "stop_ids": np.asarray(list(stop_ids) or [-1], np.int32), "pad_id": np.int32(pad_id),
          "vocab_limit": np.int32(vocab_limit or cfg.vocab_size)}


def _core(cfg: ModelConfig, rows: int, max_new_tokens: int, *, groups: int, filtered: bool,
          record_routing: bool, draft: str, compiler_options: tuple = ()):
  """(the jitted core of a call of `rows` prompts, its static arguments): `_generate_core`, or
  with `draft` the speculative one (`rollout.speculative`)."""
  check_draft(draft, cfg, record_routing=record_routing)
  statics = dict(cfg=policy_config(cfg), max_new_tokens=int(max_new_tokens), filtered=filtered,
                 groups=groups)
  if draft:
    from r1jax.rollout import speculative
    return _jitted_speculative(compiler_options), dict(
        statics, noise_first=speculative.noise_first(rows, max_new_tokens, cfg.vocab_size))
  return _jitted_core(compiler_options), dict(
      statics, record_routing=bool(record_routing and cfg.is_moe),
      noise_first=max_new_tokens * rows * cfg.vocab_size * 4 <= NOISE_BYTES)


def lower(params, cfg: ModelConfig, *, rows: int, prompt_len: int, max_new_tokens: int,
          groups: int = 1, filtered: bool = False, record_routing: bool = False,
          draft: str = ""):
  """The jitted core of a `generate` call, lowered on abstract inputs: `rows` prompts padded to
  `prompt_len` tokens, in runs of `groups` identical ones that share a prefill (with `draft`,
  the speculative core). params may be ShapeDtypeStructs with shardings. `--dry_run` compiles
  it for a GRPO stage's rollout; call it inside `with jax.set_mesh(mesh)`, as `generate`."""
  core, statics = _core(cfg, rows, max_new_tokens, groups=groups, filtered=filtered,
                        record_routing=record_routing, draft=draft)
  return core.lower(
      params, jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32),
      jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((2,), jnp.uint32),
      _knobs(cfg), **statics)


def generate(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             greedy: bool = False, eos_id: int | None, stop_ids: Sequence[int] = (),
             pad_id: int = 0, vocab_limit: int | None = None, record_routing: bool = False,
             share_prefill: bool = True, compiler_options: dict | None = None,
             fetch: bool = True, draft: str = ""):
  """Sample up to `max_new_tokens` tokens after each prompt (lists of token ids).

  share_prefill: when the rows are runs of G identical prompts (`prompt_groups`), prefill each
  prompt once and give its cache to its G rows: the prefill costs 1/G. The sampled tokens are
  those of the unshared prefill up to float rounding (a different batch size can round a matmul
  differently); `Rollout.prefill_rows` says how many rows were prefilled.

  record_routing: also return the experts every MoE layer chose for every token
  (`Rollout.routing`), for routing replay in the update.
  vocab_limit: sample only ids below it (the tokenizer's vocabulary when the model's embedding
  is padded); log-probs stay those of the model's full distribution.
  compiler_options: XLA options for the jitted core (tests pass fast-compile options on CPU).
  fetch: False returns a `Pending` at once, with the generation dispatched (JAX's asynchronous
  dispatch) and not yet waited for; its `result()` is the Rollout. Asynchronous GRPO
  (`staleness` >= 1) samples the next batch while the current update runs.
  draft: "mtp" decodes speculatively, the model's MTP module drafting one token ahead
  (`rollout.speculative`): the same sampling distribution (greedy: the same tokens, to float
  rounding), up to two tokens per step; `Rollout.draft_accepted / draft_proposed` is the
  acceptance rate.
  """
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1")
  if not greedy and temperature <= 0:
    raise ValueError(f"generate: temperature={temperature} must be > 0 (or use greedy=True)")
  if not 0 < top_p <= 1:
    raise ValueError(f"generate: top_p={top_p} must be in (0, 1]")
  stops = sorted({int(s) for s in stop_ids} | ({int(eos_id)} if eos_id is not None else set()))
  knobs = _knobs(cfg, temperature=1.0 if greedy else temperature, top_k=top_k, top_p=top_p,
                 greedy=greedy, stop_ids=stops, pad_id=pad_id, vocab_limit=vocab_limit)
  prompt_BP, pad_B = left_pad(prompts, pad_id)
  groups = prompt_groups(prompts) if share_prefill else 1
  if max(map(len, prompts)) + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"generate: longest prompt {max(map(len, prompts))} + max_new_tokens="
                     f"{max_new_tokens} exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}")
  core, statics = _core(cfg, len(prompts), max_new_tokens, groups=groups,
                        filtered=not greedy and (top_k > 0 or top_p < 1),
                        record_routing=record_routing, draft=draft,
                        compiler_options=tuple(sorted((compiler_options or {}).items())))
  out = core(params, prompt_BP, pad_B.astype(np.int32), rng, knobs, **statics)

  def result() -> Rollout:
    # every process gets every row (gathered when the batch spans several processes), so all
    # of them score the same completions and make the same decisions
    completion, logprobs, lengths, stopped, extra = to_host(out)
    routing, stats = (None, extra) if draft else (extra, {})
    return Rollout(tokens=np.concatenate([prompt_BP, completion], axis=1),
                   completion=completion, logprobs=logprobs,
                   completion_mask=np.arange(max_new_tokens)[None, :] < lengths[:, None],
                   lengths=lengths, truncated=~stopped,
                   prompt_lengths=(prompt_BP.shape[1] - pad_B).astype(np.int32),
                   routing=routing, prefill_rows=len(prompts) // groups,
                   **({"draft_accepted": int(stats["accepted"]),
                       "draft_proposed": int(stats["proposed"]),
                       "decode_steps": int(stats["steps"])} if draft else {}))

  return result() if fetch else Pending(result)


@dataclasses.dataclass
class Pending:
  """A dispatched computation whose host result is not fetched yet (`generate(fetch=False)`,
  `engine.start_rollout`): `result()` waits for the devices and builds it, once."""
  _finish: Callable[[], object]
  _value: object = None
  _done: bool = False

  def result(self):
    if not self._done:
      self._value, self._done, self._finish = self._finish(), True, None
    return self._value


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
