"""Side-by-side timing for the A/B benchmark scripts (`causal_skip.py`, `context_zigzag.py`,
`packed_skip.py`): every side called in turn, one call each per round, so the machine's drift
within a minute falls on all sides alike."""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


def round_robin(calls: dict, rounds: int):
  """calls {side: fn()}: each called once (the compile), then `rounds` rounds of one call of
  each in turn. Returns (the first outputs, the seconds of each timed call, their medians), each
  by side."""
  outs = {side: jax.block_until_ready(call()) for side, call in calls.items()}
  times = {side: [] for side in calls}
  for _ in range(rounds):
    for side, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(call())
      times[side].append(time.perf_counter() - t0)
  return outs, times, {side: statistics.median(t) for side, t in times.items()}


def max_diff(a, b) -> float:
  """The largest absolute difference between two pytrees of arrays."""
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def parser(doc: str, out) -> argparse.ArgumentParser:
  """The A/B scripts' shared flags: --chunk (query chunk = key block), --rounds, --out (the
  JSON); each script adds its own."""
  ap = argparse.ArgumentParser(description=doc.splitlines()[0])
  ap.add_argument("--chunk", type=int, default=256)
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--out", default=str(out))
  return ap
