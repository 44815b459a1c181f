"""Partial rollouts (Kimi k1.5, slime): a GRPO step decodes at most `segment` tokens per row per
generate call; rows still running are carried to the next call, and to the next step, and a
step's update takes the oldest `groups` groups all of whose rows have finished.

A long completion then costs one segment per call instead of holding up a whole batch until it
ends: every call runs `rows` rows (the unfinished ones carried, then new groups from the prompt
iterator), and finished groups wait in the buffer until a step takes them, oldest first.

A carried row continues from its prompt and the tokens it has so far (the sampler prefills them
again: no KV cache is kept across calls), with the policy of the step that continues it. Its
log-probs are each token's under the policy that sampled it, so the update's clipped ratio (or
its importance correction) sees the policy lag of the tokens sampled at earlier steps, as in
asynchronous GRPO; `stale_token_frac` logs their share of the update's completion tokens.

The buffer (groups in flight and the records drawn but not started) is JSON (`state`,
`set_state`): the stage checkpoints it with its prompt iterator, so a resumed run continues the
same rows.

    buffer = partial.PartialRollouts(group_size=8, segment=256, max_new_tokens=4096)
    scored, stats = buffer.next_batch(params, cfg, draw=lambda: next(prompts), groups=32,
                                      rows=256, rng=key, tokenizer=tok, mesh=mesh,
                                      template="r1", sampling=engine.Sampling(4096),
                                      reward_weights={"accuracy": 1.0})
"""

from __future__ import annotations

import copy
import json
from typing import Callable, Mapping

import jax
import numpy as np

from r1jax.model.config import ModelConfig
from r1jax.rollout import engine, sampler


class PartialRollouts:
  """GRPO groups in flight across generate calls and steps.

  Each group is {"record", "prompt": prompt token ids, "rows": [G rows]}, each row
  {"tokens", "logprobs", "done", "truncated", "before"} where `before` counts the tokens it had
  when the current step began. `queue` holds records drawn from the prompt iterator and not yet
  started."""

  def __init__(self, group_size: int, segment: int, max_new_tokens: int):
    assert 1 <= segment < max_new_tokens, (segment, max_new_tokens)
    self.G, self.segment, self.N = group_size, segment, max_new_tokens
    self.groups: list[dict] = []
    self.queue: list[dict] = []

  # ---------------------------------------------------------------- checkpointed state
  def state(self) -> dict:
    return {"groups": self.groups, "queue": self.queue}

  def set_state(self, state: Mapping) -> None:
    state = copy.deepcopy(state)  # the rows grow in place; the caller's state stays as it was
    self.groups, self.queue = list(state["groups"]), list(state["queue"])

  # ---------------------------------------------------------------- bookkeeping
  def _complete(self) -> list[int]:
    return [i for i, g in enumerate(self.groups) if all(r["done"] for r in g["rows"])]

  def _running(self) -> list[tuple[int, int]]:
    """(group, row) of every unfinished row, oldest group first."""
    return [(i, j) for i, g in enumerate(self.groups) for j, r in enumerate(g["rows"])
            if not r["done"]]

  def _start_group(self, record: Mapping, tokenizer, template: str) -> None:
    prompt = engine.format_prompts([record], template, tokenizer)[0]
    self.groups.append({
        "record": json.loads(json.dumps(record)),  # what a checkpoint restores, exactly
        "prompt": [int(t) for t in tokenizer.encode(prompt)],
        "rows": [{"tokens": [], "logprobs": [], "done": False, "truncated": False, "before": 0}
                 for _ in range(self.G)]})

  def _append(self, row: dict, out: sampler.Rollout, b: int) -> None:
    """Row `row` continued by generate output row b: the new tokens up to the row's budget of
    N completion tokens; done at a stop token or at N tokens (truncated)."""
    n = int(out.lengths[b])
    room = self.N - len(row["tokens"])
    take = min(n, room)
    row["tokens"] += [int(t) for t in out.completion[b, :take]]
    row["logprobs"] += [float(x) for x in out.logprobs[b, :take]]
    stopped = not bool(out.truncated[b]) and take == n  # its stop token is among those kept
    if stopped:
      row["done"] = True
    elif len(row["tokens"]) >= self.N:
      row["done"], row["truncated"] = True, True

  # ---------------------------------------------------------------- one step
  def next_batch(self, params, cfg: ModelConfig, *, draw: Callable[[], list], groups: int,
                 rows: int, rng, tokenizer, mesh, template: str, sampling: engine.Sampling,
                 reward_weights: Mapping[str, float]):
    """Generate segments until `groups` groups are complete; return (ScoredRollout of the
    oldest `groups` complete groups, in the layout `engine.rollout` gives them, stats).
    draw() -> a list of prompt records (the stage's next prompt batch); rows: the rows of
    every generate call (carried rows first, then new groups of G)."""
    assert rows >= self.G, (rows, self.G)
    for g in self.groups:
      for r in g["rows"]:
        r["before"] = len(r["tokens"])
    kw = engine.generate_kwargs(sampling, tokenizer, max_new_tokens=self.segment)
    cost, drafts, calls = 0.0, np.zeros(2, np.int64), 0
    while len(self._complete()) < groups:
      running = self._running()
      while len(running) + self.G <= rows:  # fill the call with new groups
        if not self.queue:
          self.queue = [json.loads(json.dumps(r)) for r in draw()]
        self._start_group(self.queue.pop(0), tokenizer, template)
        i = len(self.groups) - 1
        running += [(i, j) for j in range(self.G)]
      prompts = [self.groups[i]["prompt"] + self.groups[i]["rows"][j]["tokens"]
                 for i, j in running]
      prompts += [prompts[-1]] * (rows - len(prompts))  # pad: one compiled row count
      with jax.set_mesh(mesh):
        out = sampler.generate(params, cfg, prompts, rng=jax.random.fold_in(rng, calls), **kw)
      calls += 1
      cost += engine.generation_flops(cfg, out)
      if out.draft_proposed is not None:
        drafts += (out.draft_accepted, out.draft_proposed)
      for b, (i, j) in enumerate(running):
        self._append(self.groups[i]["rows"][j], out, b)
    taken = set(self._complete()[:groups])
    batch = [g for i, g in enumerate(self.groups) if i in taken]
    self.groups = [g for i, g in enumerate(self.groups) if i not in taken]
    scored = self._scored(batch, tokenizer, template, reward_weights, cost, drafts)
    completion_tokens = sum(len(r["tokens"]) for g in batch for r in g["rows"])
    stale = sum(r["before"] for g in batch for r in g["rows"])
    stats = {"partial_calls": float(calls),
             "partial_carried_rows": float(len(self._running())),
             "partial_waiting_groups": float(len(self._complete())),
             "stale_token_frac": stale / max(completion_tokens, 1)}
    return scored, stats

  def _scored(self, batch, tokenizer, template, reward_weights, cost, drafts):
    """The groups as one ScoredRollout: rows in group order, prompts left-padded as the
    sampler pads them, completions padded to N (what `grpo_batch` takes)."""
    records = [g["record"] for g in batch for _ in range(self.G)]
    rows = [r for g in batch for r in g["rows"]]
    left, pad = sampler.left_pad([g["prompt"] for g in batch for _ in range(self.G)],
                                 tokenizer.pad_id)
    B = len(rows)
    completion = np.full((B, self.N), tokenizer.pad_id, np.int32)
    logprobs = np.zeros((B, self.N), np.float32)
    lengths = np.asarray([len(r["tokens"]) for r in rows], np.int32)
    for b, r in enumerate(rows):
      completion[b, :lengths[b]] = r["tokens"]
      logprobs[b, :lengths[b]] = r["logprobs"]
    rollout = sampler.Rollout(
        tokens=np.concatenate([left, completion], axis=1), completion=completion,
        logprobs=logprobs, completion_mask=np.arange(self.N)[None] < lengths[:, None],
        lengths=lengths, truncated=np.asarray([r["truncated"] for r in rows]),
        prompt_lengths=(left.shape[1] - pad).astype(np.int32))
    texts = [tokenizer.decode(r["tokens"], skip_special=True) for r in rows]
    prompts = engine.format_prompts(records, template, tokenizer)
    total, per_fn, errors = engine.score(records, prompts, texts, reward_weights,
                                         completion_lengths=lengths.tolist())
    return engine.ScoredRollout(records=records, prompts=prompts, completions=texts,
                                rollout=rollout, rewards=total, per_reward=per_fn,
                                reward_errors=errors, flops=cost,
                                drafts=tuple(int(d) for d in drafts))
