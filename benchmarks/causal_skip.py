"""A/B: causal key-block skipping in the attention core (`layers.attend(..., causal=True)` with
`key_chunk`), against the same blocks all computed (causal=False, the behaviour before it).

    python benchmarks/causal_skip.py   # prints a table, writes results/causal_skip.json

Two rows per length: the attention core alone (forward + backward of one [B, T, H, d] call),
and the tiny MoE's SFT loss and gradient (`benchmarks/rollout.py`'s model, MLA + MoE) at that
row length with `attn_chunk` = `attn_key_chunk`. Each pair is timed round-robin (`--rounds`
rounds of one call each, after a compile call) on the idle machine; the table gives medians,
the speed-up, the FLOPs a causal row's attention avoids (the blocks above the diagonal), and
the largest difference between the two sides' outputs and gradients.
"""

from __future__ import annotations

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

RESULTS = ROOT / "benchmarks" / "results" / "causal_skip.json"
ATTEND = layers.attend


def skipped_fraction(T: int, chunk: int) -> float:
  """Share of the (query block, key block) pairs that causal skipping leaves out."""
  n = -(-T // chunk)
  return 1 - (n * (n + 1) / 2) / (n * n)


def core_fns(B, T, H, d, chunk):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, d)), jnp.float32) for _ in range(3))
  seg = jnp.ones((B, T), jnp.int32)
  pos = layers.default_positions(seg, seg)
  mask = layers.attention_mask(seg, seg, pos, pos)

  def make(causal):
    loss = lambda q, k, v: jnp.sum(jnp.sin(ATTEND(q, k, v, mask, d ** -0.5, chunk=chunk,
                                                  key_chunk=chunk, causal=causal)))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return lambda: f(q, k, v)
  return make


def model_fns(T, chunk):
  cfg = tiny_config().replace(num_nextn_predict_layers=0, attn_chunk=chunk, attn_key_chunk=chunk)
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, cfg.vocab_size, (1, T)), jnp.int32)

  def make(causal):
    def attend(*a, causal=True, **kw):  # the model passes causal=True; the A side overrides it
      return ATTEND(*a, causal=causal_flag, **kw)
    causal_flag = causal

    def loss(p):
      layers.attend = attend  # traced once under jit, so the patch only lives while tracing
      try:
        logits = model.forward(p, tokens, cfg)
      finally:
        layers.attend = ATTEND
      lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
      return -jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()
    f = jax.jit(jax.value_and_grad(loss))
    return lambda: f(params)
  return make


def main():
  ap = ab.parser(__doc__, RESULTS)
  ap.add_argument("--lengths", default="2048,4096")
  args = ap.parse_args()

  rows = []
  for T in (int(t) for t in args.lengths.split(",")):
    for name, make in (("attention core, B 1 x H 8 x d 64", core_fns(1, T, 8, 64, args.chunk)),
                       ("tiny MoE SFT loss + grad, B 1", model_fns(T, args.chunk))):
      calls = {"all blocks": make(False), "causal skip": make(True)}
      outs, times, med = ab.round_robin(calls, args.rounds)
      rows.append({"what": name, "T": T, "chunk": args.chunk, "seconds": med, "runs_s": times,
                   "speedup": med["all blocks"] / med["causal skip"],
                   "skipped_block_fraction": skipped_fraction(T, args.chunk),
                   "max_abs_diff": ab.max_diff(outs["all blocks"], outs["causal skip"])})

  print(f"causal key-block skipping, chunk = key chunk = {args.chunk}, medians of {args.rounds} "
        f"round-robin calls, jax {jax.__version__}")
  print(f"{'what':36s} {'T':>5s} {'all blocks s':>13s} {'skip s':>8s} {'speed-up':>9s} "
        f"{'blocks skipped':>15s} {'max |diff|':>11s}")
  for r in rows:
    print(f"{r['what']:36s} {r['T']:5d} {r['seconds']['all blocks']:13.3f} "
          f"{r['seconds']['causal skip']:8.3f} {r['speedup']:8.2f}x "
          f"{r['skipped_block_fraction']:14.0%} {r['max_abs_diff']:11.2e}")
  out = {"benchmark": "causal_skip", "rounds": args.rounds, "jax": jax.__version__, "rows": rows}
  provenance.write_result(args.out, out)


if __name__ == "__main__":
  main()
