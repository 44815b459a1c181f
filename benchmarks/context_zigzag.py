"""A/B: context parallelism with each row's positions in order against the zigzag order
(`model.context_order`), on a host mesh of two CPU devices (`context` 2), one per core.

    python benchmarks/context_zigzag.py   # prints a table, writes results/context_zigzag.json

Both sides run causal attention per device (`layers._attend_causal`): each device skips the
key blocks past its own queries. In position order device 0 holds the first half of every row
and device 1 the second, so device 1 runs about three times the blocks of device 0 and sets the
step's time; in the zigzag order each device holds an early and a late quarter and runs half.

Rows: the attention core alone (forward + backward of one [B, T, H, d] call, q, k and v put in
zigzag order and the output back inside the timed call), and the tiny MoE's SFT loss and
gradient (`benchmarks/rollout.py`'s model, MLA + MoE) with `attn_chunk` = `attn_key_chunk`, the
model putting its positions in order itself. A third side runs the same call on one device
(no mesh; XLA:CPU's threads use both cores) for scale. Each row's sides are timed round-robin
(`--rounds` rounds of one call each, after a compile call) on the idle machine; the table gives
medians, the key blocks each device runs (from `layers.causal_blocks`), and the largest
difference between the sides' outputs and gradients.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2")

import pathlib  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import ab, provenance  # noqa: E402
from benchmarks.rollout import tiny_config  # noqa: E402
from r1jax import model, parallel  # noqa: E402
from r1jax.model import layers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "context_zigzag.json"
SIDES = ("one device", "context 2, in order", "context 2, zigzag")


def blocks_per_device(T: int, chunk: int, zigzag: bool) -> list[int]:
  """(query block, key block) pairs each of the 2 devices runs."""
  _, last, (first, _) = layers.causal_blocks(T, 2, chunk, chunk, zigzag)
  return [int((first[None, :] <= last[d][:, None]).sum()) for d in range(2)]


def core_fns(B, T, H, d, chunk, mesh):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((B, T, H, d)), jnp.float32) for _ in range(3))
  seg = jnp.ones((B, T), jnp.int32)
  pos = layers.default_positions(seg, seg)

  def make(side):
    zigzag = side.endswith("zigzag")
    order = layers.to_zigzag if zigzag else (lambda a: a)

    def loss(q, k, v):
      s, p = order(seg), order(pos)
      out = layers.attend(order(q), order(k), order(v), layers.attention_mask(s, s, p, p),
                          d ** -0.5, chunk=chunk, key_chunk=chunk, causal=True, zigzag=zigzag)
      return jnp.sum(jnp.sin(layers.to_zigzag(out, inverse=True) if zigzag else out))
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    if side == "one device":
      return lambda: f(q, k, v)
    args = jax.device_put((q, k, v), NamedSharding(mesh, P(None, "context")))

    def call():
      with jax.set_mesh(mesh):
        return f(*args)
    return call
  return make


def model_fns(T, chunk, mesh):
  base = tiny_config().replace(num_nextn_predict_layers=0, attn_chunk=chunk,
                               attn_key_chunk=chunk)
  params = jax.jit(model.init, static_argnums=0)(base, jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, base.vocab_size, (1, T)), jnp.int32)

  def make(side):
    cfg = base.replace(context_order="zigzag" if side.endswith("zigzag") else "contiguous")

    def loss(p, tokens):
      logits = model.forward(p, tokens, cfg)
      lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
      return -jnp.take_along_axis(lp, tokens[:, 1:, None], -1).mean()
    f = jax.jit(jax.value_and_grad(loss))
    if side == "one device":
      return lambda: f(params, tokens)
    args = (parallel.shard_params(params, cfg, mesh),
            jax.device_put(tokens, NamedSharding(mesh, P(None, "context"))))

    def call():
      with jax.set_mesh(mesh):
        return f(*args)
    return call
  return make


def main():
  ap = ab.parser(__doc__, RESULTS)
  ap.add_argument("--lengths", default="2048,4096")
  args = ap.parse_args()
  assert jax.device_count() == 2, jax.devices()
  mesh = parallel.make_mesh(dict(context=2))

  rows = []
  for T in (int(t) for t in args.lengths.split(",")):
    for name, make in (("attention core, B 1 x H 8 x d 64", core_fns(1, T, 8, 64, args.chunk, mesh)),
                       ("tiny MoE SFT loss + grad, B 1", model_fns(T, args.chunk, mesh))):
      calls = {side: make(side) for side in SIDES}
      outs, times, med = ab.round_robin(calls, args.rounds)
      rows.append({"what": name, "T": T, "chunk": args.chunk, "seconds": med, "runs_s": times,
                   "zigzag_speedup": med[SIDES[1]] / med[SIDES[2]],
                   "blocks_per_device": {"in order": blocks_per_device(T, args.chunk, False),
                                         "zigzag": blocks_per_device(T, args.chunk, True),
                                         "every block": (-(-T // args.chunk)) ** 2 // 2},
                   "max_abs_diff": {side: ab.max_diff(outs[SIDES[0]], outs[side])
                                    for side in SIDES[1:]}})

  print(f"context parallelism on 2 CPU devices, in order vs zigzag; chunk = key chunk = "
        f"{args.chunk}, medians of {args.rounds} round-robin calls, jax {jax.__version__}")
  print(f"{'what':34s} {'T':>5s} {'1 device s':>11s} {'in order s':>11s} {'zigzag s':>9s} "
        f"{'speed-up':>9s} {'blocks/device in order':>23s} {'zigzag':>10s} {'max |diff|':>10s}")
  for r in rows:
    b = r["blocks_per_device"]
    print(f"{r['what']:34s} {r['T']:5d} {r['seconds'][SIDES[0]]:11.3f} "
          f"{r['seconds'][SIDES[1]]:11.3f} {r['seconds'][SIDES[2]]:9.3f} "
          f"{r['zigzag_speedup']:8.2f}x {str(b['in order']):>23s} {str(b['zigzag']):>10s} "
          f"{max(r['max_abs_diff'].values()):10.2e}")
  out = {"benchmark": "context_zigzag", "rounds": args.rounds, "jax": jax.__version__,
         "devices": 2, "rows": rows}
  provenance.write_result(args.out, out)


if __name__ == "__main__":
  main()
