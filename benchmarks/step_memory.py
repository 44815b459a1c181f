"""Compiled memory of one SFT step (XLA's memory analysis; nothing runs, so any backend answers).

  python benchmarks/step_memory.py        # writes benchmarks/results/step_memory.json

The H200 run (benchmarks/results/h200/) found the step of a ~0.5B dense model out of memory at
8 x 1024 tokens. This prints the step's temporary bytes for benchmarks/accelerator_steps.py's
models at that shape, with the settings that change it, so the cause shows without a device:
- remat "none" vs "full" (activations kept vs recomputed);
- a small vocabulary (the logits and the cross-entropy's share);
- 1 and 2 layers (the per-layer share);
- `logits_chunk` (the LM head and its softmax a chunk of positions at a time) and `attn_chunk`.
`--moe_impls ragged_dot,blocked` compares the MoE model's expert paths instead
(benchmarks/results/step_memory_moe.json).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from benchmarks import accelerator_steps as steps  # noqa: E402
from r1jax import model, train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "step_memory.json"
VARIANTS = (("remat none (the H200 run)", {"remat": "none"}), ("remat full", {"remat": "full"}),
            ("remat none, vocab 1024", {"remat": "none", "vocab_size": 1024}),
            ("remat none, 1 layer", {"remat": "none", "num_hidden_layers": 1}),
            ("remat none, 2 layers", {"remat": "none", "num_hidden_layers": 2}),
            ("remat none, logits_chunk 128", {"remat": "none", "logits_chunk": 128}),
            ("remat full, logits_chunk 128", {"remat": "full", "logits_chunk": 128}),
            ("remat full, logits_chunk 128, attn_chunk 256",
             {"remat": "full", "logits_chunk": 128, "attn_chunk": 256}))


def step_memory(fields: dict, batch: int, seq_len: int, moe_impl: str = "blocked",
                **over) -> dict:
  cfg = steps.model_config(fields, **over)
  if cfg.is_moe:
    cfg = cfg.replace(moe_impl=moe_impl)
  tx, lr_of = train.make_optimizer(steps.optim_config(1e-5), total_steps=1000)
  state = jax.eval_shape(lambda p: train.create(p, tx, seed=0), model.abstract(cfg))
  i32 = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  f32 = jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)
  b = {"tokens": i32, "targets": i32, "loss_mask": f32, "segment_ids": i32, "positions": i32}
  t0 = time.perf_counter()
  compiled = train.make_step(train.sft_loss(cfg), tx, lr_of).lower(state, b).compile()
  m = compiled.memory_analysis()
  return {"temp_gib": m.temp_size_in_bytes / 2**30, "args_gib": m.argument_size_in_bytes / 2**30,
          "compile_s": time.perf_counter() - t0}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="dense")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=1024)
  ap.add_argument("--moe_impls", default="",
                  help="instead of the variants: the MoE model at remat full and logits_chunk "
                       "128 with each of these moe_impl values (ragged_dot,blocked,pallas)")
  ap.add_argument("--out", default=str(RESULTS))
  a = ap.parse_args()
  rows = []
  print(f"SFT step at {a.batch} x {a.seq_len} tokens, backend {jax.default_backend()}")
  print(f"{'model':6s} {'variant':46s} {'temp GiB':>9s} {'args GiB':>9s}")
  for m in (["moe"] if a.moe_impls else a.models.split(",")):
    fields = steps.MOE if m == "moe" else steps.DENSE
    variants = ([(f"moe_impl {i}, remat full, logits_chunk 128",
                  {"moe_impl": i, "remat": "full", "logits_chunk": 128})
                 for i in a.moe_impls.split(",")] if a.moe_impls else VARIANTS)
    for name, over in variants:
      row = {"model": m, "variant": name, "overrides": over,
             **step_memory(fields, a.batch, a.seq_len, **over)}
      rows.append(row)
      print(f"{m:6s} {name:46s} {row['temp_gib']:9.2f} {row['args_gib']:9.2f}", flush=True)
  out = pathlib.Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"batch": a.batch, "seq_len": a.seq_len, "jax": jax.__version__,
                             "backend": jax.default_backend(), "rows": rows,
                             **provenance.code()}, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
