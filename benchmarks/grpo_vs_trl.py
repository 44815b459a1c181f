"""One GRPO step on CPU: r1jax (jitted sampler + jitted step) vs TRL's GRPOTrainer (transformers).

  python benchmarks/grpo_vs_trl.py        # writes benchmarks/results/grpo_vs_trl.json (~4 min)

Both sides train the same tiny DeepSeek-V3 (r1jax.run_config.tiny_moe_fields() without MTP,
1.6M parameters; ours written with r1jax.hf.save, read by transformers, checked by a logits
comparison) at configs/grpo_tiny.py's shapes: P=16 prompts x G=8 completions of exactly N=40
tokens after 16-token prompts, temperature 1, loss "grpo", eps 0.2, beta 0, one update per
rollout (mu = 1), AdamW lr 1e-4 (betas 0.9/0.95, clip 1.0), float32. One step = sample P*G
completions, decode, score, group-normalize, forward + backward + optimizer update:
- r1jax: sampler.generate -> decode -> reward -> group_advantages -> stages.grpo.grpo_batch
  -> make_step(grpo_loss), i.e. the GRPO stage's step without its logging; the shipped MoE path
  of configs/grpo_tiny.py (dropless "blocked" experts; `--capacity_factor` to change it).
- TRL: GRPOTrainer.train() (transformers `generate` with a KV cache, its loss, the Trainer's
  AdamW), activation checkpointing and bf16 off, transformers' default experts implementation
  (`--hf_experts` to pick one); a step is the Trainer's on_step_begin -> on_step_end interval.
Both generate exactly N tokens (no stop token on ours, min_new_tokens=N on TRL's) and never
sample the 23 ids past the char vocabulary (vocab_limit / suppress_tokens).

Tokenizer: TRL tokenizes text prompts and decodes completions for the reward, so
`char_hf_tokenizer` builds a PreTrainedTokenizerFast with the CharTokenizer's exact ids (a
`tokenizers` WordLevel model over single characters, the tags as added tokens); the script
asserts equal encodings of the prompts and equal decodings. The reward (`digit_fraction`) is the
same Python function on both sides.

Timing: our first step (the JIT compiles of sampler and step) runs alone; then the two run side
by side, one of our steps after each of TRL's (from its on_step_end callback, outside its
interval), so background load hits both alike. Figures: medians of each side's last `--runs`
steps after `--warmup` more; first steps reported separately. torch: its default thread count
and OpenMP wait policy (nothing set here); XLA:CPU: its default pool.

Loss cross-check (`loss_crosscheck`): on identical inputs (completions of mixed lengths, old
log-probs = the policy's plus noise so the clip is active, advantages, reference log-probs)
r1jax's grpo_loss and TRL's GRPOTrainer._compute_loss, each with its own forward, give the same
loss for grpo, bnpo, dr_grpo, dapo and grpo with beta 0.04, and the same gradient (compared
tensor by tensor after writing ours with hf.save and reading it with transformers).

Known differences: TRL's advantages use the unbiased group std, ours the population std; TRL's
default KL term (use_bias_correction_kl=True) is weighted by the ratio, ours is plain k3 (the
cross-check sets it off and reports the default's loss apart); ours drops the expert
assignments past capacity (`moe_drop_frac_mean` in the JSON), transformers' experts are
dropless; ours also applies the aux-loss-free router-bias update.
"""

from __future__ import annotations

import argparse
import os
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
from benchmarks import provenance  # noqa: E402
from benchmarks.run_all import machine_info  # noqa: E402
from r1jax import hf, model, run_config, train  # noqa: E402
from r1jax.model.config import ModelConfig  # noqa: E402
from r1jax.data.tokenizer import CHAR_SPECIALS, CharTokenizer  # noqa: E402
from r1jax.rollout import sampler  # noqa: E402
from r1jax.stages.grpo import grpo_batch  # noqa: E402
from r1jax.train.losses import grpo as grpo_lib  # noqa: E402
from r1jax.train import losses  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "grpo_vs_trl.json"
# the cross-check's compile needs no optimization at these sizes (see tests/testing.py); jax 0.11
# no longer knows the fusion-emitter option
FAST_COMPILE = {"xla_backend_optimization_level": 0}
if jax.__version_info__ < (0, 11):
  FAST_COMPILE["xla_cpu_use_fusion_emitters"] = False
CHECK_VARIANTS = (("grpo", 0.0), ("bnpo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.0), ("grpo", 0.04))


def digit_fraction(completions, **kwargs):
  """The reward on both sides: the share of digits in each completion's text."""
  del kwargs  # TRL passes prompts, completion_ids, ...
  return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def char_hf_tokenizer(tok: CharTokenizer):
  """A transformers PreTrainedTokenizerFast with exactly the CharTokenizer's ids."""
  import tokenizers
  import transformers
  from tokenizers import Regex, decoders, models, pre_tokenizers

  vocab = {tok.decode([i]): i for i in range(tok.vocab_size)}
  # unknown characters map to <pad>; the prompts are checked against tok.encode
  t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  t.decoder = decoders.Fuse()
  control = {tok.decode([i]) for i in (tok.pad_id, tok.eos_id, tok.bos_id)}
  # skip_special_tokens drops pad/eos/bos only, like CharTokenizer.decode(skip_special=True)
  t.add_special_tokens([tokenizers.AddedToken(s, normalized=False)
                        for s in CHAR_SPECIALS if s in control])
  t.add_tokens([tokenizers.AddedToken(s, normalized=False, special=False)
                for s in CHAR_SPECIALS if s not in control])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=t, pad_token=tok.decode([tok.pad_id]), eos_token=tok.decode([tok.eos_id]),
      bos_token=tok.decode([tok.bos_id]), padding_side="left")


def make_prompts(n: int, length: int, seed: int = 0) -> list[str]:
  """n arithmetic prompts of exactly `length` characters (equal lengths: no padding anywhere)."""
  ab = np.random.default_rng(seed).integers(0, 10_000, (n, 2))
  return [f"Q: {a:04d}+{b:04d} A:".ljust(length)[:length] for a, b in ab]


def tiny_config(capacity_factor: float | None) -> ModelConfig:
  return ModelConfig.from_config(run_config.tiny_moe_fields(
      capacity_factor=capacity_factor, num_nextn_predict_layers=0))


def optim_config(lr: float):
  c = run_config.base_config().optim
  c.update(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0, clip_norm=1.0,
           b1=0.9, b2=0.95, eps=1e-8)
  return c


def load_hf(model_dir: str, experts: str = "default"):
  """transformers' model at its defaults, or with the experts implementation `experts`."""
  import torch
  import transformers
  kwargs = {} if experts == "default" else {"experts_implementation": experts}
  return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                           **kwargs)


def trl_config(out_dir: str, *, batch: int, group: int, new_tokens: int, lr: float,
               loss_type: str, epsilon: float, beta: float, vocab: int, model_vocab: int,
               max_steps: int = 1):
  from trl import GRPOConfig
  # transformers 5 renamed gradient_checkpointing (TRL's default: on) to activation_checkpointing
  no_remat = ({"activation_checkpointing": False}
              if "activation_checkpointing" in GRPOConfig.__dataclass_fields__
              else {"gradient_checkpointing": False})
  return GRPOConfig(
      output_dir=out_dir, per_device_train_batch_size=batch, num_generations=group,
      max_completion_length=new_tokens, learning_rate=lr, lr_scheduler_type="constant",
      warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
      max_grad_norm=1.0, optim="adamw_torch", beta=beta, loss_type=loss_type, epsilon=epsilon,
      scale_rewards="group", temperature=1.0, top_p=1.0, top_k=0,
      generation_kwargs={"min_new_tokens": new_tokens,
                         "suppress_tokens": list(range(vocab, model_vocab))},
      max_steps=max_steps, logging_steps=10_000, report_to="none", save_strategy="no",
      bf16=False, use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
      disable_dropout=True, log_completions=False, **no_remat)


# ------------------------------------------------------------------ the timed steps
class R1jaxGRPO:
  """The GRPO stage's per-step work (r1jax.stages.grpo.run_grpo) without its logging."""

  def __init__(self, cfg, params, tok, prompts, a):
    tx, lr = train.make_optimizer(optim_config(a.lr), total_steps=1000)
    loss = grpo_lib.grpo_loss(cfg, loss_type=a.loss_type, eps_low=a.epsilon,
                              eps_high=a.epsilon, beta=0.0, budget=a.new_tokens)
    self.step_fn = train.make_step(loss, tx, lr, bias_gamma=1e-3)
    self.state = train.create(params, tx, seed=0)
    self.cfg, self.tok, self.a = cfg, tok, a
    self.prompt_ids = [tok.encode(p) for p in prompts for _ in range(a.group)]
    self.drop = []

  def once(self):
    a, tok = self.a, self.tok
    t0 = time.perf_counter()
    key = jax.random.fold_in(jax.random.key(0), int(self.state.step))
    out = sampler.generate(train.full_params(self.state), self.cfg, self.prompt_ids,
                           max_new_tokens=a.new_tokens, rng=key, temperature=1.0, top_p=1.0,
                           eos_id=None, pad_id=tok.pad_id, vocab_limit=tok.vocab_size)
    assert out.lengths.min() == a.new_tokens
    texts = [tok.decode(c, skip_special=True) for c in out.completion]
    rewards = digit_fraction(texts)
    adv, _ = grpo_lib.group_advantages(rewards, a.group, "group")
    batch = grpo_batch(out, adv, mask_truncated=False)
    t1 = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, batch)
    jax.block_until_ready(metrics["loss"])
    t2 = time.perf_counter()
    self.drop.append(float(metrics.get("moe_drop_frac", 0.0)))
    return {"total": t2 - t0, "rollout": t1 - t0, "update": t2 - t1}


def time_side_by_side(job: R1jaxGRPO, model_dir, hf_tok, prompts, a, vocab: int,
                      model_vocab: int):
  """Our first step (the compiles) alone, then TRL's GRPOTrainer.train() with one of our steps
  run after each of its steps (from its on_step_end callback, outside its timed interval), so
  background load on a shared machine hits both alike. Returns (ours, theirs) step records."""
  import datasets
  from transformers import TrainerCallback
  from trl import GRPOTrainer

  ours = [job.once()]

  class Interleave(TrainerCallback):
    def __init__(self):
      self.t0, self.steps = None, []

    def on_step_begin(self, args, state, control, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      self.steps.append({"total": time.perf_counter() - self.t0})
      ours.append(job.once())

  class TimedGRPOTrainer(GRPOTrainer):
    """Records the rollout share (generate + score) of each step; behaviour unchanged."""
    rollout_s: list

    def _generate_and_score_completions(self, inputs):
      t0 = time.perf_counter()
      out = super()._generate_and_score_completions(inputs)
      self.rollout_s.append(time.perf_counter() - t0)
      return out

  timer = Interleave()
  with tempfile.TemporaryDirectory() as out_dir:
    args = trl_config(out_dir, batch=a.prompts * a.group, group=a.group,
                      new_tokens=a.new_tokens, lr=a.lr, loss_type=a.loss_type,
                      epsilon=a.epsilon, beta=0.0, vocab=vocab, model_vocab=model_vocab,
                      max_steps=1 + a.warmup + a.runs)
    trainer = TimedGRPOTrainer(
        model=load_hf(model_dir, a.hf_experts), reward_funcs=digit_fraction, args=args,
        train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
        processing_class=hf_tok, callbacks=[timer])
    trainer.rollout_s = []
    trainer.train()
  for step, rollout_s in zip(timer.steps, trainer.rollout_s):
    step.update(rollout=rollout_s, update=step["total"] - rollout_s)
  return ours, timer.steps


def summarize(name, steps, a):
  """Medians over the last `a.runs` steps; the first step separately; the rest is warm-up."""
  timed = steps[-a.runs:]
  med = lambda k: statistics.median(s[k] for s in timed)
  n_tokens = a.prompts * a.group * a.new_tokens
  return {"name": name, "seconds": med("total"), "rollout_s": med("rollout"),
          "update_s": med("update"), "completion_tokens_per_s": n_tokens / med("total"),
          "first_step_s": steps[0]["total"], "runs_s": [s["total"] for s in timed],
          "warmup_s": [s["total"] for s in steps[1:-a.runs]]}


# ------------------------------------------------------------------ loss cross-check
def crosscheck_inputs(cfg, params, *, prompts: int, group: int, prompt_len: int,
                      new_tokens: int, vocab: int, seed: int = 0):
  """Identical GRPO inputs for both sides: a synthetic rollout (completions of mixed lengths,
  some ending in EOS), old log-probs = the policy's + noise, rewards -> group advantages, and
  reference params (the policy's + noise) with their log-probs."""
  rng = np.random.default_rng(seed)
  B, P, N = prompts * group, prompt_len, new_tokens
  prompt = rng.integers(9, vocab, (B, P)).astype(np.int32)  # printable chars, no specials
  completion = rng.integers(9, vocab, (B, N)).astype(np.int32)
  lengths = np.full(B, N, np.int32)
  lengths[1::2] = rng.integers(max(N // 4, 1), N, B // 2)  # every other row stops early
  truncated = lengths == N
  for b in np.flatnonzero(~truncated):
    completion[b, lengths[b] - 1] = 1  # eos
    completion[b, lengths[b]:] = 0  # pad
  tokens = np.concatenate([prompt, completion], 1)
  fwd = jax.jit(lambda p, t: losses.token_logprobs(model.forward(p, t[:, :-1], cfg), t[:, 1:]),
                compiler_options=FAST_COMPILE)
  comp_mask = (np.arange(N)[None, :] < lengths[:, None])
  logp = np.asarray(fwd(params, tokens))[:, P - 1:]
  old = np.where(comp_mask, logp + 0.3 * rng.standard_normal((B, N)), 0.0).astype(np.float32)
  ref_params = jax.tree.map(  # in numpy: eager jnp ops would compile one kernel per shape
      lambda x: np.asarray(x) + 0.02 * rng.standard_normal(x.shape).astype(x.dtype), params)
  ref = np.where(comp_mask, np.asarray(fwd(ref_params, tokens))[:, P - 1:], 0.0)
  adv, _ = grpo_lib.group_advantages(rng.random(B), group, "group")
  rollout = sampler.Rollout(tokens=tokens, completion=completion, logprobs=old,
                            completion_mask=comp_mask, lengths=lengths, truncated=truncated,
                            prompt_lengths=np.full(B, P, np.int32))
  batch = grpo_batch(rollout, adv, mask_truncated=False)
  return batch, rollout, ref.astype(np.float32), ref_params


def _trl_loss(model_dir, hf_tok, inputs, *, loss_type, beta, kl_bias_correction, cfg,
              prompts, group, new_tokens, epsilon, eps_high, vocab):
  """TRL's loss on prepared inputs: GRPOTrainer._compute_loss (its forward, through
  transformers, included); returns the trainer too (its model holds the gradient after
  backward)."""
  import datasets
  from trl import GRPOTrainer

  with tempfile.TemporaryDirectory() as out_dir:
    args = trl_config(out_dir, batch=prompts * group, group=group, new_tokens=new_tokens,
                      lr=1e-4, loss_type=loss_type, epsilon=epsilon, beta=beta, vocab=vocab,
                      model_vocab=cfg.vocab_size)
    args.epsilon_high = eps_high
    args.use_bias_correction_kl = kl_bias_correction
    trainer = GRPOTrainer(model=load_hf(model_dir), reward_funcs=digit_fraction, args=args,
                          train_dataset=datasets.Dataset.from_dict({"prompt": ["x"] * prompts}),
                          processing_class=hf_tok)
  trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()'s loop
  trainer.model.train()
  return trainer._compute_loss(trainer.model, inputs), trainer


def loss_crosscheck(cfg, params, model_dir, hf_tok, *, prompts: int = 4, group: int = 4,
                    prompt_len: int = 16, new_tokens: int = 24, epsilon: float = 0.2,
                    eps_high: float = 0.28, grad_loss_type: str | None = "grpo",
                    variants=CHECK_VARIANTS, vocab: int = 105):
  """r1jax grpo_loss vs TRL GRPOTrainer._compute_loss on identical inputs, per (loss_type,
  beta) in `variants`, and the gradients of `grad_loss_type` (None: skip). `cfg` must be
  dropless (capacity_factor None) for an exact comparison with transformers' MoE.

  For beta > 0 TRL runs with use_bias_correction_kl=False: its default (True in TRL 1.16,
  DeepSeek-V3.2's unbiased KL) multiplies the k3 term by the ratio, which r1jax (k3 as in the
  GRPO/R1 papers) does not; that default's loss is reported separately."""
  import torch

  batch, rollout, ref, ref_params = crosscheck_inputs(
      cfg, params, prompts=prompts, group=group, prompt_len=prompt_len,
      new_tokens=new_tokens, vocab=vocab)
  N = new_tokens
  loss_fns = {v: grpo_lib.grpo_loss(cfg, loss_type=v[0], eps_low=epsilon, eps_high=eps_high,
                                    beta=v[1], budget=N) for v in variants}

  def ours_fn(p, b, rp):
    values = {v: fn(p, b, None, rp if v[1] else None)[0] for v, fn in loss_fns.items()}
    grads = None
    if grad_loss_type:
      fn = grpo_lib.grpo_loss(cfg, loss_type=grad_loss_type, eps_low=epsilon,
                              eps_high=eps_high, budget=N)
      grads = jax.grad(lambda q: fn(q, b, None, None)[0])(p)
    return values, grads

  ours, grads = jax.jit(ours_fn, compiler_options=FAST_COMPILE)(
      params, jax.tree.map(jnp.asarray, batch), ref_params)

  comp_mask = torch.as_tensor(rollout.completion_mask.astype(np.int64))
  inputs = {"prompt_ids": torch.as_tensor(rollout.tokens[:, :-N], dtype=torch.long),
            "prompt_mask": torch.ones((rollout.tokens.shape[0], prompt_len), dtype=torch.long),
            "completion_ids": torch.as_tensor(rollout.completion, dtype=torch.long),
            "completion_mask": comp_mask,
            "advantages": torch.as_tensor(batch.advantages),
            "old_per_token_logps": torch.as_tensor(rollout.logprobs),
            "ref_per_token_logps": torch.as_tensor(ref),
            "num_items_in_batch": comp_mask.sum()}
  common = dict(cfg=cfg, prompts=prompts, group=group, new_tokens=N, epsilon=epsilon,
                eps_high=eps_high, vocab=vocab)
  rows, result = [], {}
  for lt, beta in variants:
    loss, trainer = _trl_loss(model_dir, hf_tok, inputs, loss_type=lt, beta=beta,
                              kl_bias_correction=False, **common)
    ours_v, theirs_v = float(ours[(lt, beta)]), loss.item()
    rows.append({"loss_type": lt, "beta": beta, "r1jax": ours_v, "trl": theirs_v,
                 "abs_diff": abs(ours_v - theirs_v)})
    if lt == grad_loss_type and beta == 0.0 and "grad_max_abs_diff" not in result:
      loss.backward()
      with tempfile.TemporaryDirectory() as gdir:
        # our gradient written as a checkpoint and read back by transformers: its names and
        # layouts (it fuses the experts' weights)
        hf.save(gdir, cfg, grads)
        ours_g = dict(load_hf(gdir).named_parameters())
      diff, scale, n = 0.0, 0.0, 0
      for name, p in trainer.model.named_parameters():
        if p.grad is not None:
          g = p.grad.numpy()
          diff = max(diff, float(np.abs(ours_g[name].detach().numpy() - g).max()))
          scale, n = max(scale, float(np.abs(g).max())), n + 1
      result.update(grad_loss_type=lt, grad_max_abs_diff=diff, grad_max_abs=scale,
                    grad_tensors_compared=n)
  kl_rows = [r for r in rows if r["beta"]]
  if kl_rows:
    r = kl_rows[0]
    loss, _ = _trl_loss(model_dir, hf_tok, inputs, loss_type=r["loss_type"], beta=r["beta"],
                        kl_bias_correction=True, **common)
    result["trl_default_kl_bias_correction"] = {
        "loss_type": r["loss_type"], "beta": r["beta"], "trl": loss.item(),
        "abs_diff_to_r1jax": abs(loss.item() - r["r1jax"])}
  result.update(variants=rows, max_abs_diff=max(r["abs_diff"] for r in rows),
                shape={"prompts": prompts, "group": group, "prompt_len": prompt_len,
                       "new_tokens": N}, epsilon_low=epsilon, epsilon_high=eps_high)
  return result


# ------------------------------------------------------------------ main
def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--prompts", type=int, default=16, help="P prompts per step")
  ap.add_argument("--group", type=int, default=8, help="G completions per prompt")
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--new_tokens", type=int, default=40, help="N tokens per completion")
  ap.add_argument("--loss_type", default="grpo", choices=grpo_lib.LOSS_TYPES)
  ap.add_argument("--epsilon", type=float, default=0.2)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--warmup", type=int, default=1, help="steps after the first, untimed")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--capacity_factor", type=float, default=None,
                  help="r1jax's expert capacity (default: dropless, as shipped)")
  ap.add_argument("--torch_threads", type=int, default=0, help="0: torch's default")
  ap.add_argument("--hf_experts", default="default",
                  choices=("default", "eager", "batched_mm", "grouped_mm"))
  ap.add_argument("--skip_check", action="store_true", help="no loss cross-check")
  ap.add_argument("--out", default=str(RESULTS))
  a = ap.parse_args()

  import torch
  import transformers
  import trl
  if a.torch_threads:
    torch.set_num_threads(a.torch_threads)

  tok = CharTokenizer()
  hf_tok = char_hf_tokenizer(tok)
  prompts = make_prompts(a.prompts, a.prompt_len)
  assert all(hf_tok(text=[p])["input_ids"][0] == tok.encode(p) for p in prompts)
  sample = np.random.default_rng(1).integers(0, tok.vocab_size, 500).tolist()
  assert hf_tok.decode(sample, skip_special_tokens=True) == tok.decode(sample, skip_special=True)

  cfg = tiny_config(a.capacity_factor)
  exact = cfg.replace(capacity_factor=None)
  params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  with tempfile.TemporaryDirectory() as model_dir:
    hf.save(model_dir, cfg, params)
    probe = np.asarray([tok.encode(p) for p in prompts[:2]], np.int32)
    with torch.no_grad():
      hf_logits = load_hf(model_dir, a.hf_experts).eval()(torch.as_tensor(probe)).logits.numpy()
    parity = float(np.abs(hf_logits - np.asarray(model.forward(params, probe, exact))).max())
    assert parity < 1e-3, f"transformers and r1jax disagree on the same weights: {parity}"

    check = None
    if not a.skip_check:
      t0 = time.perf_counter()
      check = loss_crosscheck(exact, params, model_dir, hf_tok, grad_loss_type=a.loss_type)
      check["seconds"] = time.perf_counter() - t0
    job = R1jaxGRPO(cfg, params, tok, prompts, a)
    ours, theirs = time_side_by_side(job, model_dir, hf_tok, prompts, a, tok.vocab_size,
                                     cfg.vocab_size)
  rows = [summarize("r1jax (jit sampler + make_step(grpo_loss))", ours, a),
          summarize("TRL GRPOTrainer (transformers generate + Trainer)", theirs, a)]
  ratio = rows[1]["seconds"] / rows[0]["seconds"]

  B = a.prompts * a.group
  print(f"tiny DeepSeek-V3 ({n_params / 1e6:.2f}M params, no MTP, our capacity_factor "
        f"{a.capacity_factor}), one GRPO step: {a.prompts} prompts x {a.group} completions x "
        f"{a.new_tokens} new tokens (prompt {a.prompt_len}), loss {a.loss_type}, beta 0, CPU "
        f"({os.cpu_count()} cores), jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, experts {a.hf_experts}, OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY')}), transformers {transformers.__version__}, trl "
        f"{trl.__version__}; logits parity {parity:.1e}")
  print(f"{'':52s} {'step s':>7s} {'rollout s':>10s} {'update s':>9s} {'tok/s':>7s} "
        f"{'1st step s':>11s}")
  for r in rows:
    print(f"{r['name']:52s} {r['seconds']:7.2f} {r['rollout_s']:10.2f} {r['update_s']:9.2f} "
          f"{r['completion_tokens_per_s']:7.0f} {r['first_step_s']:11.2f}   runs: "
          f"{' '.join(f'{t:.2f}' for t in r['runs_s'])}")
  print(f"{'ratio (TRL step time / r1jax step time)':52s} {ratio:6.2f}x")
  if check:
    print(f"loss cross-check ({check['shape']}, eps {check['epsilon_low']}/"
          f"{check['epsilon_high']}, {check['seconds']:.0f} s):")
    for v in check["variants"]:
      print(f"  {v['loss_type']:8s} beta {v['beta']:<5} r1jax {v['r1jax']:+.8f}  TRL "
            f"{v['trl']:+.8f}  |diff| {v['abs_diff']:.1e}")
    print(f"  gradient ({check['grad_loss_type']}): max |diff| {check['grad_max_abs_diff']:.1e} "
          f"over {check['grad_tensors_compared']} tensors (max |grad| "
          f"{check['grad_max_abs']:.1e})")
    kl = check.get("trl_default_kl_bias_correction")
    if kl:
      print(f"  (TRL's default use_bias_correction_kl=True, beta {kl['beta']}: TRL "
            f"{kl['trl']:+.8f}, |diff| to r1jax {kl['abs_diff_to_r1jax']:.1e}: a different KL "
            f"term, not compared)")

  result = {"model": "r1jax.run_config.tiny_moe_fields(), no MTP", "params": n_params,
            "prompts": a.prompts, "group": a.group, "batch": B, "prompt_len": a.prompt_len,
            "new_tokens": a.new_tokens, "loss_type": a.loss_type, "epsilon": a.epsilon,
            "beta": 0.0, "lr": a.lr, "warmup": a.warmup, "runs": a.runs,
            "capacity_factor": a.capacity_factor,
            "moe_drop_frac_mean": float(np.mean(job.drop)), "logits_parity": parity,
            "reward": "digit_fraction", "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__,
            "torch_threads": torch.get_num_threads(), "hf_experts_implementation": a.hf_experts,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "machine": machine_info(),
            "results": rows, "ratio": ratio,
            "loss_crosscheck": check}
  provenance.write_result(a.out, result)


if __name__ == "__main__":
  main()
