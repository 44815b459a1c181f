"""A/B: skipping the key blocks a packed row's mask allows nothing of (the keys of the segments
before a query block's own), against the causal skip alone (the blocks past each query block).

    python benchmarks/packed_skip.py   # prints a table, writes results/packed_skip.json

Rows of `--length` tokens packed with equal segments of `--segments` lengths (an SFT batch of
short samples). Two rows per segment length: the attention core alone (forward + backward of
one [B, T, H, d] call with the packed-segment mask), and the tiny MoE's SFT loss and gradient
(`benchmarks/rollout.py`'s model, MLA + MoE) with `attn_chunk` = `attn_key_chunk`. The A side
runs `layers.attend_key_blocks(skip_masked=False)`, the code before. Each pair is timed
round-robin (`--rounds` rounds of one call each, after a compile call) on the idle machine; the
table gives medians, the (query block, key block) pairs each side runs, and the largest
difference between the two sides' outputs and gradients.
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import ab, provenance  # noqa: E402
from benchmarks.rollout import tiny_config  # noqa: E402
from r1jax import model  # noqa: E402
from r1jax.model import layers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "packed_skip.json"
KEY_BLOCKS = layers.attend_key_blocks
SIDES = ("causal skip only", "causal + mask skip")


def packed(T: int, segment: int):
  seg = jnp.asarray((np.arange(T) // segment + 1)[None], jnp.int32)
  return seg, layers.default_positions(seg, seg)


def pairs_run(T: int, chunk: int, segment: int) -> dict[str, int]:
  """(query block, key block) pairs each side runs in a row of equal segments."""
  n = -(-T // chunk)
  qi, kj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  causal = kj * chunk <= qi * chunk + chunk - 1
  # a key block holds some key of a query block's segments iff it ends at or after the start
  # of the segment of the block's first query
  seen = kj * chunk + chunk - 1 >= (qi * chunk // segment) * segment
  return {SIDES[0]: int(causal.sum()), SIDES[1]: int((causal & seen).sum()), "every": n * n}


def switched(side, fn):
  """fn traced with attend_key_blocks' mask test on or off."""
  def call(*a):
    layers.attend_key_blocks = (KEY_BLOCKS if side == SIDES[1]
                                else functools.partial(KEY_BLOCKS, skip_masked=False))
    try:
      return fn(*a)
    finally:
      layers.attend_key_blocks = KEY_BLOCKS
  return call


def core_fns(B, T, H, d, chunk, segment):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, d)), jnp.float32) for _ in range(3))
  seg, pos = packed(T, segment)
  mask = layers.attention_mask(seg, seg, pos, pos)

  def make(side):
    loss = lambda q, k, v: jnp.sum(jnp.sin(layers.attend(q, k, v, mask, d ** -0.5, chunk=chunk,
                                                         key_chunk=chunk, causal=True)))
    f = jax.jit(switched(side, jax.value_and_grad(loss, argnums=(0, 1, 2))))
    return lambda: f(q, k, v)
  return make


def model_fns(T, chunk, segment):
  cfg = tiny_config().replace(num_nextn_predict_layers=0, attn_chunk=chunk, attn_key_chunk=chunk)
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (1, T)), jnp.int32)
  seg, pos = packed(T, segment)

  def make(side):
    def loss(p):
      logits = model.forward(p, tokens, cfg, segment_ids=seg, positions=pos)
      lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
      return -jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()
    f = jax.jit(switched(side, jax.value_and_grad(loss)))
    return lambda: f(params)
  return make


def main():
  ap = ab.parser(__doc__, RESULTS)
  ap.add_argument("--length", type=int, default=4096)
  ap.add_argument("--segments", default="512,1024")
  args = ap.parse_args()

  T, rows = args.length, []
  for segment in (int(s) for s in args.segments.split(",")):
    for name, make in (("attention core, B 1 x H 8 x d 64", core_fns(1, T, 8, 64, args.chunk,
                                                                     segment)),
                       ("tiny MoE SFT loss + grad, B 1", model_fns(T, args.chunk, segment))):
      calls = {side: make(side) for side in SIDES}
      outs, times, med = ab.round_robin(calls, args.rounds)
      rows.append({"what": name, "T": T, "segment": segment, "chunk": args.chunk,
                   "seconds": med, "runs_s": times, "speedup": med[SIDES[0]] / med[SIDES[1]],
                   "block_pairs": pairs_run(T, args.chunk, segment),
                   "max_abs_diff": ab.max_diff(outs[SIDES[0]], outs[SIDES[1]])})

  print(f"packed rows of {T} tokens, chunk = key chunk = {args.chunk}, medians of {args.rounds} "
        f"round-robin calls, jax {jax.__version__}")
  print(f"{'what':34s} {'segment':>7s} {'causal only s':>14s} {'+ mask s':>9s} {'speed-up':>9s} "
        f"{'block pairs':>13s} {'max |diff|':>11s}")
  for r in rows:
    p = r["block_pairs"]
    print(f"{r['what']:34s} {r['segment']:7d} {r['seconds'][SIDES[0]]:14.3f} "
          f"{r['seconds'][SIDES[1]]:9.3f} {r['speedup']:8.2f}x "
          f"{p[SIDES[0]]:>6d} -> {p[SIDES[1]]:<4d} {r['max_abs_diff']:11.2e}")
  out = {"benchmark": "packed_skip", "rounds": args.rounds, "jax": jax.__version__, "rows": rows}
  provenance.write_result(args.out, out)


if __name__ == "__main__":
  main()
