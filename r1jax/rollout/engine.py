"""The one rollout path: records -> prompts -> generation -> text -> rewards, as a typed record.

GRPO, rejection sampling and evaluation all call `rollout(...)`:

    scored = engine.rollout(params, cfg, records, tokenizer=tok, mesh=mesh, template="r1",
                            sampling=engine.Sampling(max_new_tokens=40), repeats=8, rng=key,
                            reward_weights={"accuracy": 1.0, "format": 0.2})
    scored.completions, scored.rewards, scored.per_reward, scored.rollout.logprobs

Rows are the records each repeated `repeats` times, in order (row r is records[r // repeats]),
so GRPO's groups are contiguous. Generation runs in calls of `batch_size` rows (the last one
padded with copies of its last row, so one compiled shape serves every call); with
batch_size=None all rows go in one call and `rollout` holds the token-level outputs (what a
GRPO update needs). Every process computes every row (`sampler.generate` gathers across
processes), so all processes score the same texts and reach the same decisions.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import numpy as np

from r1jax import flops
from r1jax.model.config import ModelConfig
from r1jax.data import template as template_lib
from r1jax.rollout import rewards as rewards_lib
from r1jax.rollout import sampler


@dataclasses.dataclass(frozen=True)
class Sampling:
  max_new_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  greedy: bool = False
  record_routing: bool = False
  draft: str = ""  # "mtp": speculative decoding with the model's MTP module (`rollout.speculative`)


@dataclasses.dataclass
class ScoredRollout:
  """Rows of one rollout (row r is `records[r]`, its prompt `prompts[r]`).

  Attributes:
    records: the problem record of each row (question, answer, bucket, ...).
    prompts: formatted prompt text per row.
    completions: decoded completion per row (pad/bos/eos dropped).
    rollout: token-level sampler outputs of all rows (one generate call), else None.
    rewards: float32 [rows] weighted total reward (None when no rewards were asked for).
    per_reward: {reward name: [score or None per row]}.
    reward_errors: {reward name: rows whose scorer failed}.
    flops: model FLOPs the generation cost (`r1jax.flops.generate_flops`).
    drafts: (accepted, proposed) drafts over all generate calls (speculative rollouts), else
      (0, 0).
  """
  records: list
  prompts: list
  completions: list
  rollout: sampler.Rollout | None
  rewards: np.ndarray | None
  per_reward: dict
  reward_errors: dict
  flops: float
  drafts: tuple = (0, 0)

  @property
  def size(self) -> int:
    return len(self.records)

  @property
  def draft_accept_rate(self) -> float | None:
    """The share of the drafts the policy accepted, or None without speculative decoding."""
    return self.drafts[0] / self.drafts[1] if self.drafts[1] else None

  def reward_means(self) -> dict:
    """reward_<fn> over all rows and reward_<fn>_<bucket> per data bucket (None counts 0)."""
    out = {f"reward_{k}": float(np.mean([v or 0.0 for v in vals]))
           for k, vals in self.per_reward.items()}
    out.update({f"reward_errors_{k}": float(v) for k, v in self.reward_errors.items() if v})
    for bucket in sorted({r.get("bucket") for r in self.records if r.get("bucket")}):
      rows = [i for i, r in enumerate(self.records) if r.get("bucket") == bucket]
      for k, vals in self.per_reward.items():
        out[f"reward_{k}_{bucket}"] = float(np.mean([vals[i] or 0.0 for i in rows]))
    return out


def format_prompts(records, template: str, tokenizer) -> list[str]:
  return [template_lib.format_prompt(r["question"], template, tokenizer.markers)
          for r in records]


def score(records, prompts, completions, reward_weights: Mapping[str, float],
          completion_lengths=None):
  """(total [rows] float32, {name: per-row scores}, {name: error count})."""
  total, per_fn, errors = rewards_lib.combine(
      dict(reward_weights), prompts, completions, answer=[r.get("answer") for r in records],
      completion_lengths=completion_lengths)
  return np.asarray(total, np.float32), per_fn, errors


def rollout(params, cfg: ModelConfig, records: Sequence[Mapping], *, tokenizer, mesh,
            template: str, sampling: Sampling, rng, repeats: int = 1,
            batch_size: int | None = None,
            reward_weights: Mapping[str, float] | None = None) -> ScoredRollout:
  """Generate `repeats` completions per record and score them (module docstring)."""
  return start_rollout(params, cfg, records, tokenizer=tokenizer, mesh=mesh, template=template,
                       sampling=sampling, rng=rng, repeats=repeats, batch_size=batch_size,
                       reward_weights=reward_weights).result()


def start_rollout(params, cfg: ModelConfig, records: Sequence[Mapping], *, tokenizer, mesh,
                  template: str, sampling: Sampling, rng, repeats: int = 1,
                  batch_size: int | None = None,
                  reward_weights: Mapping[str, float] | None = None) -> sampler.Pending:
  """`rollout`, with the generation dispatched and not waited for: `.result()` waits, decodes
  and scores, and returns the ScoredRollout. Asynchronous GRPO (`staleness` >= 1) starts the next
  batch's rollout before the current update and collects it after."""
  rows = [r for r in records for _ in range(repeats)]
  prompts = format_prompts(rows, template, tokenizer)
  ids = [tokenizer.encode(p) for p in prompts]
  kw = generate_kwargs(sampling, tokenizer)
  size = batch_size or len(ids)
  calls = []  # (real rows, pending generate call)
  for start in range(0, len(ids), size):
    chunk = ids[start:start + size]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (size - real)  # pad: keeps the compiled shape
    key = rng if batch_size is None else jax.random.fold_in(rng, start)
    with jax.set_mesh(mesh):
      calls.append((real, sampler.generate(params, cfg, chunk, rng=key, fetch=False, **kw)))

  def finish() -> ScoredRollout:
    completions, lengths, outs, cost, drafts = [], [], [], 0.0, np.zeros(2, np.int64)
    for real, call in calls:
      out = call.result()
      cost += generation_flops(cfg, out)
      if out.decode_steps is not None:
        drafts += (out.draft_accepted, out.draft_proposed)
      for b in range(real):
        completions.append(tokenizer.decode(out.completion[b, :int(out.lengths[b])].tolist(),
                                            skip_special=True))
        lengths.append(int(out.lengths[b]))
      outs.append(out)
    total, per_fn, errors = None, {}, {}
    if reward_weights:
      total, per_fn, errors = score(rows, prompts, completions, reward_weights,
                                    completion_lengths=lengths)
    return ScoredRollout(records=rows, prompts=prompts, completions=completions,
                         rollout=outs[0] if len(outs) == 1 else None, rewards=total,
                         per_reward=per_fn, reward_errors=errors, flops=cost,
                         drafts=tuple(int(d) for d in drafts))

  return sampler.Pending(finish)


def generate_kwargs(sampling: Sampling, tokenizer, max_new_tokens: int | None = None) -> dict:
  """`sampler.generate`'s sampling and token arguments for `sampling` (max_new_tokens: instead
  of sampling's)."""
  kw = dict(max_new_tokens=max_new_tokens or sampling.max_new_tokens, eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size,
            record_routing=sampling.record_routing, draft=sampling.draft)
  if sampling.greedy:
    kw["greedy"] = True
  else:
    kw.update(temperature=sampling.temperature, top_p=sampling.top_p)
  return kw


def generation_flops(cfg: ModelConfig, out: sampler.Rollout) -> float:
  """Model FLOPs of the generate call that returned `out`: plain decoding up to its longest
  row, or speculative (two tokens and the MTP layer per decode step)."""
  B, L = out.tokens.shape
  P = L - out.completion.shape[1]
  if out.decode_steps is not None:
    return flops.speculative_flops(cfg, B, P, out.decode_steps, prefill_rows=out.prefill_rows)
  return flops.generate_flops(cfg, B, P, int(np.max(out.lengths)),
                              prefill_rows=out.prefill_rows)


def refill_pairs(zero_var, candidate_zero_var) -> list[tuple[int, int]]:
  """DAPO dynamic sampling's swap: (slot, candidate) group pairs giving each zero-variance slot,
  in order, the next freshly sampled group whose rewards vary. Every mixed candidate is used
  while slots remain, so one refill batch fills as many slots as it has mixed groups."""
  slots = np.flatnonzero(np.asarray(zero_var))
  mixed = np.flatnonzero(~np.asarray(candidate_zero_var))
  return list(zip(slots.tolist(), mixed.tolist()))


# the call-level Rollout fields that add up over calls (the work of each); prefill_rows does not
_SUMMED_CALL_FIELDS = tuple(n for n in sampler.CALL_FIELDS if n != "prefill_rows")


def split_batches(scored: ScoredRollout, parts: int) -> list[ScoredRollout]:
  """One rollout's rows as `parts` equal consecutive batches (over-sampled refill candidates:
  asynchronous GRPO with dynamic sampling samples them in the batch's own call). The call's
  cost (FLOPs, drafts, decode steps) stays with the first batch, so that swapping groups in
  from the others (`swap_groups`) counts it once."""
  assert scored.rollout is not None and scored.size % parts == 0, (scored.size, parts)
  n = scored.size // parts
  out = []
  for i in range(parts):
    rows = slice(i * n, (i + 1) * n)
    calls = {} if i == 0 else {name: 0 for name in _SUMMED_CALL_FIELDS
                               if getattr(scored.rollout, name) is not None}
    rollout = dataclasses.replace(
        scored.rollout, **{name: np.asarray(getattr(scored.rollout, name))[rows]
                           for name in sampler.row_fields(scored.rollout)}, **calls)
    out.append(dataclasses.replace(
        scored, records=scored.records[rows], prompts=scored.prompts[rows],
        completions=scored.completions[rows], rollout=rollout,
        rewards=None if scored.rewards is None else scored.rewards[rows],
        per_reward={k: v[rows] for k, v in scored.per_reward.items()},
        reward_errors=dict(scored.reward_errors) if i == 0 else {},
        flops=scored.flops if i == 0 else 0.0,
        drafts=scored.drafts if i == 0 else (0, 0)))
  return out


def swap_groups(scored: ScoredRollout, fresh: ScoredRollout, pairs, group_size: int):
  """`scored` with group slot i replaced by `fresh`'s group j for each (i, j) in pairs (the
  token-level outputs included). Both must come from one generate call of the same shape."""
  assert scored.rollout is not None and fresh.rollout is not None
  assert scored.rollout.tokens.shape == fresh.rollout.tokens.shape
  out = dataclasses.replace(
      scored, records=list(scored.records), prompts=list(scored.prompts),
      completions=list(scored.completions), rewards=scored.rewards.copy(),
      per_reward={k: list(v) for k, v in scored.per_reward.items()},
      flops=scored.flops + fresh.flops,
      drafts=tuple(a + b for a, b in zip(scored.drafts, fresh.drafts)))
  arrays = {name: np.array(getattr(scored.rollout, name))
            for name in sampler.row_fields(scored.rollout)}
  for i, j in pairs:
    rows, src = slice(i * group_size, (i + 1) * group_size), slice(j * group_size,
                                                                  (j + 1) * group_size)
    for lst_out, lst_in in ((out.records, fresh.records), (out.prompts, fresh.prompts),
                            (out.completions, fresh.completions)):
      lst_out[rows] = lst_in[src]
    out.rewards[rows] = fresh.rewards[src]
    for k in out.per_reward:
      out.per_reward[k][rows] = fresh.per_reward[k][src]
    for name, a in arrays.items():
      a[rows] = np.asarray(getattr(fresh.rollout, name))[src]
  # the call-level fields: the first call's prefill; the draft counts of both calls' work
  calls = {"prefill_rows": scored.rollout.prefill_rows}
  for name in _SUMMED_CALL_FIELDS:
    if getattr(scored.rollout, name) is not None:
      calls[name] = getattr(scored.rollout, name) + getattr(fresh.rollout, name)
  out.rollout = dataclasses.replace(scored.rollout, **arrays, **calls)
  return out
