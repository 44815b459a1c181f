"""Rollout throughput: r1jax's jitted KV-cache sampler vs transformers' `generate` on CPU.

  python benchmarks/rollout.py            # writes benchmarks/results/rollout.json

Both sides run the same tiny DeepSeek-V3 (configs/tiny_moe.py without its MTP module, ~1.8M parameters; our weights
written with r1jax.hf.save and read by transformers' from_pretrained, checked by a logits
comparison), batch 16, 16-token prompts, exactly 128 sampled new tokens per row (no stop token on
our side; min_new_tokens=128 on HF's), temperature 1, KV cache on, transformers' experts
implementation `--hf_experts` (default eager, its fastest on CPU here). Generation throughput is
new tokens (16 * 128) per second of wall time, median of 3 timed runs after a warm-up run
(which includes our compile).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from r1jax import hf, model  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402
from r1jax.rollout import sampler  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "rollout.json"


def tiny_config() -> ModelConfig:
  spec = importlib.util.spec_from_file_location("tiny_moe", ROOT / "configs" / "tiny_moe.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  # no MTP module: generation does not use it (transformers would skip its weights anyway)
  return ModelConfig.from_config(mod.get_config().model).replace(num_nextn_predict_layers=0)


def median_seconds(fn, runs: int):
  fn()  # warm-up (compiles ours)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--out", default=str(RESULTS))
  # transformers 5's MoE kernels; "eager" (a loop over the hit experts) is its fastest on CPU
  # for this model (measured: grouped_mm ~6x and batched_mm ~2x slower)
  ap.add_argument("--hf_experts", default="eager", choices=("eager", "batched_mm", "grouped_mm"))
  args = ap.parse_args()

  import torch
  import transformers

  cfg = tiny_config()
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (args.batch, args.prompt_len))
  B, N = args.batch, args.new_tokens

  with tempfile.TemporaryDirectory() as tmp:
    hf.save(tmp, cfg, params)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, dtype=torch.float32, experts_implementation=args.hf_experts).eval()
  with torch.no_grad():
    hf_logits = hf_model(torch.as_tensor(prompts)).logits.numpy()
  parity = float(np.abs(hf_logits - np.asarray(model.forward(params, jnp.asarray(prompts),
                                                             cfg))).max())
  assert parity < 1e-3, f"transformers and r1jax disagree on the same weights: {parity}"

  def ours():
    out = sampler.generate(params, cfg, prompts.tolist(), max_new_tokens=N,
                           rng=jax.random.key(0), temperature=1.0, eos_id=None)
    assert out.lengths.min() == N

  def theirs():
    with torch.no_grad():
      out = hf_model.generate(torch.as_tensor(prompts), attention_mask=torch.ones_like(
          torch.as_tensor(prompts)), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
          max_new_tokens=N, min_new_tokens=N, use_cache=True, pad_token_id=0)
    assert out.shape == (B, args.prompt_len + N), out.shape

  rows = []
  for name, fn in (("r1jax sampler (jit, while_loop)", ours),
                   ("transformers generate (use_cache)", theirs)):
    seconds, all_times = median_seconds(fn, args.runs)
    rows.append({"name": name, "seconds": seconds, "tokens_per_s": B * N / seconds,
                 "runs_s": all_times})
  ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]

  print(f"tiny DeepSeek-V3 ({n_params / 1e6:.2f}M params), batch {B} x {N} new tokens, "
        f"prompt {args.prompt_len}, CPU, jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; logits parity {parity:.1e}")
  print(f"{'':36s} {'median s':>9s} {'new tokens/s':>13s}")
  for r in rows:
    print(f"{r['name']:36s} {r['seconds']:9.3f} {r['tokens_per_s']:13.0f}")
  print(f"{'ratio (r1jax / transformers)':36s} {'':9s} {ratio:12.1f}x")

  result = {"model": "configs/tiny_moe.py", "params": n_params, "batch": B, "new_tokens": N,
            "prompt_len": args.prompt_len, "runs": args.runs, "logits_parity": parity,
            "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "hf_experts_implementation": args.hf_experts,
            "results": rows, "ratio": ratio}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
