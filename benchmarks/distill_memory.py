"""Compiled memory of the logit-distillation loss and gradient, with the whole [B, T, V] logits
against the heads run a chunk of positions at a time (`train.distill_loss` with the student's
`logits_chunk`).

    python benchmarks/distill_memory.py   # prints a table, writes results/distill_memory.json

Teacher: the tiny MoE; student: the tiny dense Qwen2-style model; both with a real tokenizer's
vocabulary (default 49,152, SmolLM2's). Nothing runs: each variant is compiled for XLA:CPU and
its `memory_analysis()` read (temporaries: activations, logits, gradients in flight). Both
variants compute the same loss (`tests/test_losses.py` checks the values).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from r1jax import model, run_config, train  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "distill_memory.json"
GIB = 2 ** 30


def temporaries(s_cfg, t_cfg, B, T, kind):
  loss_fn = train.distill_loss(s_cfg, t_cfg, kind=kind, temperature=1.0, ce_weight=0.5)
  student = jax.eval_shape(lambda k: model.init(s_cfg, k), jax.random.key(0))
  teacher = jax.eval_shape(lambda k: model.init(t_cfg, k), jax.random.key(0))
  i32, f32 = jax.ShapeDtypeStruct((B, T), jnp.int32), jax.ShapeDtypeStruct((B, T), jnp.float32)
  batch = {"tokens": i32, "targets": i32, "loss_mask": f32, "segment_ids": i32, "positions": i32}
  step = jax.jit(jax.value_and_grad(lambda p, b, t: loss_fn(p, b, None, t), has_aux=True))
  mem = step.lower(student, batch, teacher).compile().memory_analysis()
  return mem.temp_size_in_bytes


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--vocab", type=int, default=49152)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq_len", type=int, default=512)
  ap.add_argument("--chunks", default="256,64")
  ap.add_argument("--kind", default="forward_kl")
  ap.add_argument("--out", default=str(RESULTS))
  args = ap.parse_args()

  t_cfg = ModelConfig.from_config(run_config.tiny_moe_fields(vocab_size=args.vocab))
  s_cfg = ModelConfig.from_config(run_config.tiny_student_fields(vocab_size=args.vocab))
  B, T, V = args.batch, args.seq_len, args.vocab
  rows = [{"logits_chunk": None,
           "temp_bytes": temporaries(s_cfg, t_cfg, B, T, args.kind)}]
  for c in (int(c) for c in args.chunks.split(",")):
    rows.append({"logits_chunk": c,
                 "temp_bytes": temporaries(s_cfg.replace(logits_chunk=c), t_cfg, B, T, args.kind)})
  logits_gib = B * T * V * 4 / GIB
  print(f"logit distillation ({args.kind}, ce_weight 0.5), loss + student gradient, "
        f"B {B} x T {T}, vocab {V}: one fp32 [B, T, V] array is {logits_gib:.2f} GiB; "
        f"XLA:CPU compiled temporaries, jax {jax.__version__}")
  print(f"{'logits_chunk':>12s} {'temporaries GiB':>16s} {'vs whole':>9s}")
  for r in rows:
    r["temp_gib"] = r["temp_bytes"] / GIB
    r["fraction_of_whole"] = r["temp_bytes"] / rows[0]["temp_bytes"]
    print(f"{str(r['logits_chunk']):>12s} {r['temp_gib']:16.2f} {r['fraction_of_whole']:8.2f}x")
  out = {"benchmark": "distill_memory", "kind": args.kind, "batch": B, "seq_len": T, "vocab": V,
         "fp32_logits_gib": logits_gib, "jax": jax.__version__, "rows": rows}
  provenance.write_result(args.out, out)


if __name__ == "__main__":
  main()
