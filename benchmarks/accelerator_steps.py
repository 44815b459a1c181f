"""SFT and GRPO step throughput and MFU on an accelerator, at two shapes a user would train.

  python benchmarks/accelerator_steps.py        # writes benchmarks/results/accelerator_steps.json

Models (random weights, bfloat16 compute, float32 params and AdamW moments, full
rematerialization and LM-head chunks of 128 positions (8 x 128 tokens) by default, as the
shipped full-size configs
train; MFU counts model FLOPs only, so the recomputed forward is not credited):
- dense: Qwen2-0.5B's shape (24 layers, hidden 896, GQA 14/2, MLP 4864, vocab 151,936, tied);
- moe: a DeepSeek-V3-shaped model with about 1B active parameters: MLA, 10 layers (the first
  dense), hidden 2048, 64 routed experts (top 8) plus one shared, expert width 768,
  vocab 129,280, no MTP. Each MoE path the backend offers is a row (`--moe_impls`).
Rows:
- SFT: `train.make_step(sft_loss)` on a fixed random batch of `--batch` x `--seq_len` tokens;
  median of `--runs` steps after the compile and one warm-up.
- SFT with the FP8 recipe (`--fp8 xla,mosaic`): the same SFT step with `model.fp8` (1x128 /
  128x128 e4m3 scales; forward and dgrad GEMMs in FP8, and the dense layers' wgrad), the MoE
  model on `ragged_dot` as the full-size configs run it, once with XLA dots on e4m3-rounded
  operands and once with the Mosaic GPU wgmma kernels. Beside the bf16 `ragged_dot` row, these
  rows say whether FP8 makes a step faster on the device.
- GRPO: one step as the GRPO stage runs it: `sampler.generate` of `--grpo_rows` sequences
  (`--prompt_len` prompt tokens, `--new_tokens` sampled, no early stop), then the clipped-ratio
  update on them. Rollout and update are timed apart.
Model FLOPs follow r1jax.flops (6 x N_active x tokens plus attention for training; generation
counts every decode row). MFU is against the device's data-sheet bf16 peak
(`flops.peak_flops_per_device`) and, as a second column, against `--measured_peak` (the bf16
matmul rate measured on the machine, default 790e12 for the H200 here).

On a CPU the script runs the same rows at toy sizes (`--toy`), to check that it works.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import provenance  # noqa: E402
from r1jax import flops, model, run_config, train  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402
from r1jax.rollout import sampler  # noqa: E402
from r1jax.stages.grpo import grpo_batch  # noqa: E402
from r1jax.train.losses import grpo as grpo_lib  # noqa: E402
from benchmarks.train_step import optim_config  # noqa: E402  (AdamW, constant lr, clip 1.0)

RESULTS = ROOT / "benchmarks" / "results" / "accelerator_steps.json"

DENSE = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
             attention_bias=True, tie_word_embeddings=True, rope_theta=1000000.0,
             rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None)
MOE = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=2048, intermediate_size=5632,
           num_hidden_layers=10, num_attention_heads=16, q_lora_rank=1536, kv_lora_rank=512,
           qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
           n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=768,
           first_k_dense_replace=1, n_group=1, topk_group=1, rope_type="default",
           num_nextn_predict_layers=0, capacity_factor=None)
# toy sizes for a CPU check of the script itself
TOY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=512)
TOY_MOE = dict(TOY, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, moe_intermediate_size=32)
TOY_DENSE = dict(TOY, num_attention_heads=4, num_key_value_heads=2)


def model_config(fields: dict, **over) -> ModelConfig:
  c = run_config.base_config(**{**fields, "dtype": "bfloat16", "param_dtype": "float32",
                                "remat": "full", **over})
  return ModelConfig.from_config(c.model)


def _median_s(fn, runs: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def _mfu(model_flops_per_s: float, peak: float, measured_peak: float) -> dict:
  return {"model_tflops_per_s": model_flops_per_s / 1e12, "mfu": model_flops_per_s / peak,
          "mfu_vs_measured_peak": model_flops_per_s / measured_peak}


def use_fp8_gemm(gemm: str):
  """Route the FP8 GEMMs of the rows that follow: 'mosaic' = the Mosaic GPU wgmma kernels
  (R1JAX_MOSAIC_GPU=1), 'xla' = XLA dots on e4m3-rounded operands. The switch is read when a
  function is traced, so the caches of earlier traces are dropped."""
  if gemm not in ("xla", "mosaic"):
    raise ValueError(f"--fp8 takes xla and/or mosaic, not {gemm!r}")
  if gemm == "mosaic" and jax.default_backend() != "gpu":
    raise RuntimeError("the Mosaic wgmma kernels need a GPU")
  os.environ["R1JAX_MOSAIC_GPU"] = "1" if gemm == "mosaic" else "0"
  jax.clear_caches()


def sft_row(name, cfg, params, a, peak):
  rng = np.random.default_rng(0)
  seq = rng.integers(2, cfg.vocab_size, (a.batch, a.seq_len + 1)).astype(np.int32)
  batch = {"tokens": seq[:, :-1], "targets": seq[:, 1:],
           "loss_mask": np.ones((a.batch, a.seq_len), np.float32),
           "segment_ids": np.ones((a.batch, a.seq_len), np.int32),
           "positions": np.broadcast_to(np.arange(a.seq_len, dtype=np.int32),
                                        (a.batch, a.seq_len)).copy()}
  batch = jax.tree.map(jnp.asarray, batch)
  tx, lr_of = train.make_optimizer(optim_config(1e-5), total_steps=1000)
  # the step donates its state: a copy keeps `params` for the next row
  holder = {"state": train.create(jax.tree.map(jnp.copy, params), tx, seed=0)}
  step = train.make_step(train.sft_loss(cfg), tx, lr_of)

  def once():
    holder["state"], m = step(holder["state"], batch)
    return float(jax.block_until_ready(m["loss"]))
  t0 = time.perf_counter()
  loss0 = once()
  first = time.perf_counter() - t0
  once()
  med, times = _median_s(once, a.runs)
  tokens = a.batch * a.seq_len
  fl = flops.train_flops(cfg, tokens, a.seq_len)
  return {"name": name, "kind": "sft", "batch": a.batch, "seq_len": a.seq_len,
          "first_step_s": first, "step_s": med, "runs_s": times, "tokens_per_s": tokens / med,
          "first_loss": loss0, "model_flops_per_step": fl, **_mfu(fl / med, peak, a.measured_peak)}


def grpo_row(name, cfg, params, a, peak):
  rng = np.random.default_rng(1)
  group = 8
  prompts = rng.integers(2, cfg.vocab_size, (a.grpo_rows // group, a.prompt_len))
  prompt_ids = [list(map(int, p)) for p in prompts for _ in range(group)]
  tx, lr_of = train.make_optimizer(optim_config(1e-5), total_steps=1000)
  loss = grpo_lib.grpo_loss(cfg, loss_type="dr_grpo", eps_low=0.2, eps_high=0.2, beta=0.0,
                            budget=a.new_tokens)
  step = train.make_step(loss, tx, lr_of)
  holder = {"state": train.create(jax.tree.map(jnp.copy, params), tx, seed=0)}

  def once():
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(0), int(holder["state"].step))
    out = sampler.generate(train.full_params(holder["state"]), cfg, prompt_ids,
                           max_new_tokens=a.new_tokens, rng=key, eos_id=None, pad_id=0)
    jax.block_until_ready(out.tokens)
    t1 = time.perf_counter()
    rewards = (np.asarray(out.completion)[:, 0] % 2).astype(np.float32)  # a stand-in reward
    adv, _ = grpo_lib.group_advantages(rewards, group, "group")
    b = grpo_batch(out, adv, mask_truncated=False)
    holder["state"], m = step(holder["state"], b)
    jax.block_until_ready(m["loss"])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1
  t0 = time.perf_counter()
  once()
  first = time.perf_counter() - t0
  rolls, updates = [], []
  for _ in range(a.grpo_runs):
    r, u = once()
    rolls.append(r)
    updates.append(u)
  roll, upd = statistics.median(rolls), statistics.median(updates)
  rows = a.grpo_rows
  L = a.prompt_len + a.new_tokens
  gen_fl = flops.generate_flops(cfg, rows, a.prompt_len, a.new_tokens)
  # the update's forward + backward over every row's full length (prompt tokens included)
  upd_fl = flops.train_flops(cfg, rows * (L - 1), L - 1)
  return {"name": name, "kind": "grpo", "rows": rows, "prompt_len": a.prompt_len,
          "new_tokens": a.new_tokens, "first_step_s": first, "rollout_s": roll,
          "update_s": upd, "step_s": roll + upd, "rollout_runs_s": rolls,
          "update_runs_s": updates, "new_tokens_per_s": rows * a.new_tokens / roll,
          "update_tokens_per_s": rows * (L - 1) / upd,
          "rollout": _mfu(gen_fl / roll, peak, a.measured_peak),
          "update": _mfu(upd_fl / upd, peak, a.measured_peak),
          **_mfu((gen_fl + upd_fl) / (roll + upd), peak, a.measured_peak)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=1024)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--grpo_rows", type=int, default=64)
  ap.add_argument("--prompt_len", type=int, default=128)
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--grpo_runs", type=int, default=2)
  ap.add_argument("--models", default="moe,dense")
  ap.add_argument("--moe_impls", default="blocked,ragged_dot")
  ap.add_argument("--kinds", default="sft,grpo")
  ap.add_argument("--fp8", default="",
                  help="FP8 GEMM paths for extra SFT rows with model.fp8 (the DeepSeek-V3 recipe; "
                       "the MoE model on ragged_dot): 'xla' (XLA dots on e4m3-rounded operands), "
                       "'mosaic' (the wgmma kernels, GPU only), or both")
  ap.add_argument("--attn_impls", default="xla",
                  help="model.attn_impl values; after the first, SFT rows only (cudnn: GPUs)")
  ap.add_argument("--remat", default="full",
                  help="as the shipped full-size configs; 'none' needed 46-230 GiB on the H200")
  ap.add_argument("--attn_chunk", type=int, default=None, help="queries per attention chunk")
  ap.add_argument("--logits_chunk", type=int, default=128,
                  help="positions per LM-head chunk in the losses (all rows at once)")
  ap.add_argument("--measured_peak", type=float, default=790e12)
  ap.add_argument("--budget_s", type=float, default=1e9,
                  help="start no new row after this many seconds (rows left are listed)")
  ap.add_argument("--toy", action="store_true", help="tiny shapes: a CPU check of the script")
  ap.add_argument("--out", default=str(RESULTS))
  a = ap.parse_args()
  start = time.perf_counter()
  peak, peak_source = flops.peak_flops_per_device()
  if a.toy:
    a.batch, a.seq_len, a.runs, a.grpo_rows, a.prompt_len, a.new_tokens = 2, 32, 1, 8, 8, 8
    a.grpo_runs = 1
  # each model's first MoE path for every kind first, then the other MoE paths
  impls = a.moe_impls.split(",")
  plan = [(m, impls[0] if m == "moe" else None, kind)
          for kind in a.kinds.split(",") for m in a.models.split(",")]
  plan = [(m, impl, kind, "xla") for m, impl, kind in plan]
  # then the SFT rows again with each other attention implementation (cuDNN's fused kernel)
  plan += [(m, impls[0] if m == "moe" else None, "sft", attn)
           for attn in a.attn_impls.split(",")[1:] for m in a.models.split(",")]
  if "moe" in a.models.split(","):
    plan += [("moe", impl, kind, "xla") for impl in impls[1:] for kind in a.kinds.split(",")]
  # then SFT with the FP8 recipe on the full-size configs' MoE path (ragged_dot), beside the bf16
  # rows above: what decides those configs' default (README, "Performance")
  plan += [(m, "ragged_dot" if m == "moe" else None, "sft", "xla", gemm)
           for gemm in filter(None, a.fp8.split(",")) for m in a.models.split(",")]
  plan = [p if len(p) == 5 else (*p, None) for p in plan]
  report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__, "peak_flops": peak, "peak_source": peak_source,
            "measured_peak": a.measured_peak, "args": vars(a), "rows": [], "not_run": []}
  cache = {}
  for m, impl, kind, attn, fp8_gemm in plan:
    name = (f"{m}{'/' + impl if impl else ''}{'/' + attn if attn != 'xla' else ''}"
            f"{'/fp8-' + fp8_gemm if fp8_gemm else ''} {kind}")
    if time.perf_counter() - start > a.budget_s:
      report["not_run"].append(name)
      print(f"{name}: not run (budget of {a.budget_s:.0f} s spent)", flush=True)
      continue
    try:
      if m not in cache:
        fields = dict(MOE if m == "moe" else DENSE)
        if a.toy:
          fields.update(TOY_MOE if m == "moe" else TOY_DENSE)
        cfg = model_config(fields, remat=a.remat, attn_chunk=a.attn_chunk,
                           logits_chunk=a.logits_chunk)
        params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
        cache[m] = (cfg, params, n)
      cfg, params, n = cache[m]
      if impl:
        cfg = cfg.replace(moe_impl=impl)
      cfg = cfg.replace(attn_impl=attn, fp8=bool(fp8_gemm))
      if fp8_gemm:
        use_fp8_gemm(fp8_gemm)
      row = (sft_row if kind == "sft" else grpo_row)(name, cfg, params, a, peak)
      row.update(params=n, active_matmul_params=flops.matmul_params_per_token(cfg))
      report["rows"].append(row)
      tput = (f"{row['tokens_per_s']:,.0f} tok/s, first loss {row['first_loss']:.5f}"
              if kind == "sft" else
              f"rollout {row['new_tokens_per_s']:,.0f} new tok/s "
              f"(MFU {row['rollout']['mfu']:.1%}), update {row['update_tokens_per_s']:,.0f} "
              f"tok/s (MFU {row['update']['mfu']:.1%})")
      print(f"{name}: {n / 1e9:.2f}B params, {row['active_matmul_params'] / 1e9:.2f}B active; "
            f"step {row['step_s']:.3f} s (first {row['first_step_s']:.1f} s), {tput}; "
            f"MFU {row['mfu']:.1%} of {peak / 1e12:.0f} TF/s, {row['mfu_vs_measured_peak']:.1%} "
            f"of measured {a.measured_peak / 1e12:.0f}", flush=True)
    except Exception as e:  # one failing row is a result; the others still run
      traceback.print_exc()
      report["rows"].append({"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
      print(f"{name}: error {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    report.update(provenance.code())
    pathlib.Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
