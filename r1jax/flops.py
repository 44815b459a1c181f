"""Model FLOPs and MFU: the usual convention, so figures compare with other frameworks.

Per token, a forward pass costs 2 x N_active (every matmul parameter a token touches: attention
and MLP projections, the shared experts, k of the E routed experts, the router and the LM head;
the embedding lookup is free unless the head reuses it) plus attention's score and value products,
2 x layers x heads x (qk_head_dim + v_head_dim) x context (PaLM's count: the full context, no
causal halving). A sequence classifier's `score` head (num_labels x hidden) is counted per token
like the LM head it replaces, though it runs only on each row's last token: it is negligible
(num_labels / vocab of an LM head's cost). Training costs 3x the forward (forward + two
backward products). MTP modules count when their loss is on. Generation counts every row of
every decode step the sampler ran (rows that stopped early still compute), with the context the
step attended over.

MFU = model FLOPs per second / peak FLOPs. Peaks are the dense bf16 figures of the vendors' data
sheets for accelerators (`PEAK_FLOPS`, per chip), and a measured float32 matmul rate for CPUs
(`measured_cpu_peak`, the whole host).
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp

from r1jax.model.config import ModelConfig

# dense bf16 peak per chip, FLOP/s (data sheets); matched against jax's device_kind
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "h800": 989e12,
    "a100": 312e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,  # v5p reports "TPU v5"
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "tpu7x": 2307e12,  # v7x (Ironwood)
    "tpu v7": 2307e12,
    "tpu v4": 275e12,
}


def _is_matmul_leaf(path: tuple[str, ...], spec) -> bool:
  name = path[-1]
  if name.endswith("bias") or "norm" in name:
    return False
  return len([a for a in spec.axes if a != "layers"]) >= 2


@functools.lru_cache(maxsize=None)
def matmul_params_per_token(cfg: ModelConfig, mtp: bool = False) -> int:
  """N_active: matmul parameters one token's forward pass multiplies with (module docstring)."""
  from flax import traverse_util
  from r1jax.model import params as param_lib
  flat = traverse_util.flatten_dict(param_lib.declare(cfg))
  total = 0.0
  for path, spec in flat.items():
    if path[0] == "mtp" and not mtp:
      continue
    if path[-1] == "embed":
      if cfg.tie_word_embeddings and not cfg.num_labels:
        total += math.prod(spec.shape)  # the LM head is the embedding
      continue
    if not _is_matmul_leaf(path, spec):
      continue
    n = math.prod(spec.shape)
    if "exp" in spec.axes:  # routed experts: k of E per token
      n = n * cfg.num_experts_per_tok / cfg.n_routed_experts
    total += n
  return int(total)


def _attention_layers(cfg: ModelConfig, mtp: bool) -> int:
  return cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp and cfg.is_moe else 0)


def attention_flops_per_token(cfg: ModelConfig, context: float, mtp: bool = False) -> float:
  """Forward FLOPs of the score and value products for one query over `context` keys."""
  if cfg.attention == "mla":
    qk, v = cfg.qk_head_dim, cfg.v_head_dim
  else:
    qk = v = cfg.dense_head_dim
  return 2.0 * _attention_layers(cfg, mtp) * cfg.num_attention_heads * (qk + v) * context


def forward_flops(cfg: ModelConfig, tokens: float, context: float, mtp: bool = False) -> float:
  return tokens * (2.0 * matmul_params_per_token(cfg, mtp) +
                   attention_flops_per_token(cfg, context, mtp))


def train_factor(frozen_weights: bool = False) -> float:
  """A training pass (forward + backward) in forwards: 3, or 2 with frozen weights (LoRA), whose
  backward computes no weight gradients (the adapters' own FLOPs are negligible)."""
  return 2.0 if frozen_weights else 3.0


def train_flops(cfg: ModelConfig, tokens: float, seq_len: float, mtp: bool = False,
                frozen_weights: bool = False) -> float:
  """One training pass (forward + backward) over `tokens` tokens in rows of `seq_len`
  (`train_factor` forwards)."""
  return train_factor(frozen_weights) * forward_flops(cfg, tokens, seq_len, mtp)


def generate_flops(cfg: ModelConfig, rows: int, prompt_len: int, decode_steps: int,
                   prefill_rows: int | None = None) -> float:
  """Prefill of prefill_rows (default: rows) x prompt_len, then `decode_steps` steps of every
  row, step i attending over prompt_len + i keys. A shared prefill (`sampler.generate`) runs on
  one row per distinct prompt."""
  prefill_rows = rows if prefill_rows is None else prefill_rows
  prefill = forward_flops(cfg, prefill_rows * prompt_len, prompt_len)
  mean_context = prompt_len + (decode_steps + 1) / 2.0
  return prefill + forward_flops(cfg, rows * decode_steps, mean_context)


def mtp_flops_per_token(cfg: ModelConfig, context: float) -> float:
  """Forward FLOPs of the first MTP module for one token over `context` keys: its projection
  and layer, and the LM head it shares with the main model."""
  if not cfg.num_nextn_predict_layers:
    return 0.0
  depth = cfg.num_nextn_predict_layers
  head = 2.0 * cfg.vocab_size * cfg.hidden_size
  return (forward_flops(cfg, 1, context, mtp=True) - forward_flops(cfg, 1, context)) / depth + head


def speculative_flops(cfg: ModelConfig, rows: int, prompt_len: int, decode_steps: int,
                      prefill_rows: int | None = None) -> float:
  """Generation with the MTP draft (`rollout.speculative`): the prefill, the MTP module over
  the prompt, then `decode_steps` steps of every row, each the main model and the MTP module on
  two tokens, step i attending over prompt_len + 2 (i + 1) slots."""
  prefill_rows = rows if prefill_rows is None else prefill_rows
  prefill = (forward_flops(cfg, prefill_rows * prompt_len, prompt_len)
             + (prefill_rows * prompt_len + rows) * mtp_flops_per_token(cfg, prompt_len))
  mean_context = prompt_len + decode_steps + 1.0
  per_token = forward_flops(cfg, 1, mean_context) + mtp_flops_per_token(cfg, mean_context)
  return prefill + 2.0 * rows * decode_steps * per_token


@functools.lru_cache(maxsize=None)
def measured_cpu_peak(n: int = 1024, reps: int = 5) -> float:
  """FLOP/s of a jitted float32 n x n matmul on the host CPU (all its cores), best of `reps`."""
  cpu = jax.local_devices(backend="cpu")[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_flops_per_device(device=None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from)."""
  device = device or jax.local_devices()[0]
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    # simulated host devices share the cores: the host's rate split evenly between them
    return measured_cpu_peak() / jax.local_device_count(), "measured (host matmul)"
  for key, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if key in kind:
      return peak, f"data sheet ({key}, bf16 dense)"
  return math.nan, f"unknown device kind {device.device_kind!r}"


def device_peak_flops() -> float:
  """Peak FLOP/s of the whole job: every device of every process."""
  per_device, _ = peak_flops_per_device()
  return per_device * jax.device_count()
