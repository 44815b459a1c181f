"""Rollout throughput: r1jax's jitted KV-cache sampler vs transformers' `generate` on CPU.

  python benchmarks/rollout.py            # writes benchmarks/results/rollout.json

Both sides run the same tiny DeepSeek-V3 (configs/tiny_moe.py without its MTP module, ~1.8M
parameters; our weights written with r1jax.hf.save and read by transformers' from_pretrained,
checked by a logits comparison), 16-token prompts, exactly N sampled new tokens per row (no stop
token on our side; min_new_tokens=N on HF's), temperature 1, KV cache on, each side at its
defaults: r1jax's sampler with the config's dropless MoE, transformers' default experts
implementation and thread count (`--hf_experts` picks another). Shapes (`--shapes`, batch x N):
16 x 128, and 128 x 40, the GRPO rollout of configs/grpo_tiny.py (16 prompts x 8 completions x
40 tokens), which is the headline. Throughput is new tokens per second of wall time, median of
`--runs` timed calls after a warm-up call of each side (which includes our compile), the two
sides timed round-robin, one call of each per round (since 2026-12-06; before, all of one side's
runs came first).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from benchmarks.train_step import time_round_robin  # noqa: E402
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


def sampling_calls(params, cfg: ModelConfig, hf_model, prompts: np.ndarray, N: int):
  """(r1jax's call, transformers' call), each sampling N new tokens after every prompt row at
  temperature 1, no early stop."""
  import torch

  def ours():
    out = sampler.generate(params, cfg, prompts.tolist(), max_new_tokens=N,
                           rng=jax.random.key(0), temperature=1.0, eos_id=None)
    assert out.lengths.min() == N

  def theirs():
    ids = torch.as_tensor(prompts)
    with torch.no_grad():
      out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                              temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=N,
                              min_new_tokens=N, use_cache=True, pad_token_id=0)
    assert out.shape == (prompts.shape[0], prompts.shape[1] + N), out.shape
  return ours, theirs


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="128x40,16x128", help="batch x new tokens, first = headline")
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--out", default=str(RESULTS))
  ap.add_argument("--hf_experts", default="default",
                  choices=("default", "eager", "batched_mm", "grouped_mm"))
  args = ap.parse_args()

  import torch
  import transformers

  cfg = tiny_config()
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  kwargs = {} if args.hf_experts == "default" else {"experts_implementation": args.hf_experts}
  with tempfile.TemporaryDirectory() as tmp:
    hf.save(tmp, cfg, params)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, dtype=torch.float32, **kwargs).eval()
  experts = getattr(hf_model.config, "_experts_implementation", None) or args.hf_experts
  probe = np.random.default_rng(0).integers(2, cfg.vocab_size, (2, args.prompt_len))
  with torch.no_grad():
    hf_logits = hf_model(torch.as_tensor(probe)).logits.numpy()
  parity = float(np.abs(hf_logits - np.asarray(model.forward(params, jnp.asarray(probe),
                                                             cfg))).max())
  assert parity < 1e-3, f"transformers and r1jax disagree on the same weights: {parity}"

  shapes = []
  for shape in args.shapes.split(","):
    B, N = (int(v) for v in shape.split("x"))
    prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, args.prompt_len))
    ours, theirs = sampling_calls(params, cfg, hf_model, prompts, N)
    rows = []
    names = ("r1jax sampler (jit, while_loop)", "transformers generate (use_cache)")
    # one warm-up call of each (compiles ours), then one call of each per round
    for name, all_times in zip(names, time_round_robin((ours, theirs), 1, args.runs)):
      seconds = statistics.median(all_times)
      rows.append({"name": name, "seconds": seconds, "tokens_per_s": B * N / seconds,
                   "runs_s": all_times})
    shapes.append({"batch": B, "new_tokens": N, "results": rows,
                   "ratio": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]})

  print(f"tiny DeepSeek-V3 ({n_params / 1e6:.2f}M params), prompt {args.prompt_len}, CPU, jax "
        f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads, "
        f"experts {experts}), transformers {transformers.__version__}; logits parity "
        f"{parity:.1e}")
  print(f"{'':46s} {'median s':>9s} {'new tokens/s':>13s}")
  for sh in shapes:
    for r in sh["results"]:
      print(f"{sh['batch']:4d} x {sh['new_tokens']:3d}  {r['name']:34s} {r['seconds']:9.3f} "
            f"{r['tokens_per_s']:13.0f}")
    print(f"{sh['batch']:4d} x {sh['new_tokens']:3d}  {'ratio (r1jax / transformers)':34s} "
          f"{'':9s} {sh['ratio']:12.2f}x")

  head_shape = shapes[0]
  result = {"model": "configs/tiny_moe.py", "params": n_params, "batch": head_shape["batch"],
            "new_tokens": head_shape["new_tokens"], "prompt_len": args.prompt_len,
            "runs": args.runs, "timing": "round-robin", "logits_parity": parity, "jax": jax.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "hf_experts_implementation": experts,
            "results": head_shape["results"], "ratio": head_shape["ratio"], "shapes": shapes}
  provenance.write_result(args.out, result)


if __name__ == "__main__":
  main()
