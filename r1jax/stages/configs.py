"""Typed stage configs: one frozen dataclass per stage kind, with its defaults and its rules.

A stage entry of the run config (`config.stages.NAME`, an ml_collections section) is parsed once,
by `parse(name, section, optim_keys)` during `run_config.validate`, into the dataclass of its
`kind`. An unknown key or a bad value is a ConfigError naming `stages.NAME.FIELD` (the launcher
prints it as one line and exits 2). Stage code reads attributes of the parsed config; no default
lives anywhere else.

Keys of the run config's `optim` section (lr, warmup_steps, schedule, ...) may be set on any
training stage; they override `optim` for that stage (`StageConfig.optim`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from r1jax.errors import ConfigError

KINDS = ("pretrain", "sft", "grpo", "rejection_sampling", "distill", "reward_model", "eval")
TRAINING_KINDS = ("pretrain", "sft", "grpo", "distill", "reward_model")


@dataclasses.dataclass(frozen=True)
class StageConfig:
  """Fields every stage has.

  Attributes:
    kind: the stage kind (`KINDS`).
    steps: training steps (0 for stages that do not train; capped by the run's max_steps).
    start_from: the name of an earlier stage whose output model this stage starts from (default:
      the current policy; a distill stage names an earlier distill stage, whose student it
      continues).
    branch: a control branch: the recipe continues from the policy as it was before this stage.
    eval: evaluate the stage's model on the held-out problems after a training stage.
    template: the prompt template ("" = data.template).
    optim: overrides of the run config's optim section for this stage (lr, schedule, ...).
  """
  name: str
  kind: str
  steps: int = 0
  start_from: str = ""
  branch: bool = False
  eval: bool = True
  template: str = ""
  optim: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def check(self, need):
    need(self.steps >= 0, "steps", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class SFTConfig(StageConfig):
  """`sft` and `pretrain`: next-token loss on completions.

  Attributes:
    data_file: a JSONL/Parquet file of {question, completion|reasoning, answer} (relative paths
      are under the run directory, e.g. samples/rejection.jsonl); "" = the built-in task's SFT
      split (or data.train_file when data.task is "file").
    with_sft_split: train on data_file plus the built-in task's SFT split.
    mtp_weight: weight of the MTP loss (None = train.mtp_weight).
    tagged_frac: (pretrain) share of documents written in the think/answer markup.
    match_compute_of: an earlier training stage; this stage then trains for that stage's model
      FLOPs (its step count is derived, `steps` is ignored): the equal-compute SFT control.
  """
  data_file: str = ""
  with_sft_split: bool = False
  mtp_weight: float | None = None
  tagged_frac: float = 0.0
  match_compute_of: str = ""

  def check(self, need):
    super().check(need)
    need(0.0 <= self.tagged_frac <= 1.0, "tagged_frac", "must be in [0, 1]")
    need(self.mtp_weight is None or self.mtp_weight >= 0, "mtp_weight",
         "must be >= 0")


@dataclasses.dataclass(frozen=True)
class DistillConfig(SFTConfig):
  """`distill`: a dense student learns from the policy (the teacher).

  Attributes:
    mode: "sequence" (SFT on the stage's data, as R1 distils), "logit" (divergence to the
      teacher's logits on the same data) or "on_policy" (the student samples completions of
      RL prompts, and learns the teacher's distribution at every position it visited: GKD with
      only student samples, Agarwal et al. 2024; with reverse_kl, on-policy distillation).
    divergence: forward_kl | reverse_kl | jsd (logit and on_policy modes).
    temperature: softmax temperature of both distributions in the divergence.
    ce_weight: weight of the plain CE term mixed into the logit loss (0 in on_policy mode: its
      targets would be the student's own samples).
    student: ModelConfig fields of the student; vocab_size and logits_chunk default to the
      policy's (with logits_chunk, the logit loss runs both heads a chunk of positions at a time).
      A stage with start_from takes the student of that stage and leaves this empty.
    start_from: (distill) an earlier distill stage whose student this one continues; "" = a
      fresh student. Required in on_policy mode, whose student samples from the first step.
    teacher: an earlier pretrain, sft or grpo stage whose output model is the teacher; "" = the
      current policy (the last such stage's, or the model a branch left).
    prompts_per_step, group_size, max_new_tokens, sample_temperature, length_bucket: (on_policy)
      prompts of the RL split per step, samples per prompt, their length cap, the sampling
      temperature, and GRPO's `length_bucket` (the update's columns end after the longest
      sample, rounded up to this; 0 = always max_new_tokens).
  """
  mode: str = "sequence"
  divergence: str = "forward_kl"
  temperature: float = 1.0
  ce_weight: float = 0.0
  student: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  teacher: str = ""
  prompts_per_step: int = 16
  group_size: int = 4
  max_new_tokens: int = 64
  sample_temperature: float = 1.0
  length_bucket: int = 0

  @property
  def rows(self) -> int:
    return self.prompts_per_step * self.group_size

  def check(self, need):
    super().check(need)
    need(self.mode in ("sequence", "logit", "on_policy"), "mode", "must be 'sequence', "
         "'logit' or 'on_policy'")
    need(self.divergence in ("forward_kl", "reverse_kl", "jsd"), "divergence",
         "must be forward_kl, reverse_kl or jsd")
    need(self.temperature > 0, "temperature", "must be > 0")
    need(0.0 <= self.ce_weight <= 1.0, "ce_weight", "must be in [0, 1]")
    need(not (self.start_from and self.student), "student", "must be empty with start_from "
         "(the stage continues that stage's student)")
    if self.mode == "on_policy":
      need(self.start_from != "", "start_from", "must name an earlier distill stage in "
           "on_policy mode: the student samples from its first step, so it starts trained")
      need(self.ce_weight == 0.0, "ce_weight", "must be 0 in on_policy mode (the CE targets "
           "would be the student's own samples)")
      need(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
      need(self.group_size >= 1, "group_size", "must be >= 1")
      need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
      need(self.sample_temperature > 0 and math.isfinite(self.sample_temperature),
           "sample_temperature", "must be positive and finite")
      need(self.length_bucket >= 0, "length_bucket", "must be >= 0")
      need(not self.match_compute_of, "match_compute_of", "is for sequence and logit modes "
           "(an on_policy step's FLOPs depend on its samples)")
      need(not self.data_file and not self.with_sft_split, "data_file" if self.data_file else
           "with_sft_split", "is for sequence and logit modes (on_policy samples the RL "
           "split's prompts)")


def _check_sampling(need, max_new_tokens, temperature, top_p):
  need(max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
  need(temperature > 0 and math.isfinite(temperature), "temperature",
       "must be positive and finite")
  need(0 < top_p <= 1, "top_p", "must be in (0, 1]")


def _model_rewards() -> tuple:
  from r1jax.rollout import rewards
  return rewards.MODEL_REWARDS


def _check_reward_model(need, weights, reward_model: str):
  named = [n for n in weights if n in _model_rewards()]
  if named:
    need(reward_model != "", "reward_model", f"must name a reward_model stage or a HF "
         f"classifier checkpoint: reward_weights names {named[0]!r}")
  else:
    need(reward_model == "", "reward_model", "is set, but reward_weights names no "
         f"model-scored reward ({', '.join(_model_rewards())})")


def _check_rewards(need, weights):
  from r1jax.rollout import rewards
  need(len(weights) > 0, "reward_weights", "must name at least one reward")
  for name, w in weights.items():
    need(name in rewards.known(), "reward_weights",
         f"names {name!r}, which is not a reward ({', '.join(rewards.known())})")
    need(math.isfinite(float(w)), "reward_weights", f"has {name}={w}: weights must be finite")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(StageConfig):
  """`grpo`: sample G completions per prompt, score them with rule rewards, update the policy
  on group-normalized advantages.

  Attributes:
    prompts_per_step, group_size: prompts per step and completions per prompt (G).
    max_new_tokens, temperature, top_p: rollout sampling. The loss scores the same tempered
      distribution, softmax(logits / temperature), so the policy trained is the one sampled;
      greedy evaluation (argmax) does not depend on it.
    reward_weights: {reward name: weight}; the total reward is the weighted sum.
    policy_loss: a registered policy loss (`r1jax.train.losses.policy`): "grpo" (PPO clip of the
      token ratio) or "gspo" (clip of the length-normalized sequence ratio).
    loss_type: aggregation over tokens: grpo | bnpo | dr_grpo | dapo.
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high].
    beta: k3 KL coefficient to the reference model (0 keeps no reference model).
    ref_refresh_every: copy the policy into the reference every this many steps (0 = never).
    ref_from: the reference model is the output of this earlier pretrain, sft or grpo stage
      instead of the policy this stage starts from ("" = the start), e.g. a cold start that
      several GRPO rounds keep their KL term to. Needs beta > 0; not with ref_refresh_every or
      LoRA (whose reference is the frozen base).
    mu: policy updates per rollout batch.
    advantage_scale: group | batch | none (Dr. GRPO).
    dynamic_sampling: DAPO: swap zero-variance groups for fresh ones, up to max_refills batches.
      Synchronous GRPO samples a refill batch only when a group is flat. With staleness >= 1
      the rollout samples max_refills more batches of prompts beside the batch, from the same
      weights and in the same dispatched call (over-sampling: nothing samples synchronously, and
      the extra batches cost their generation whether or not they are used); their groups whose
      rewards vary fill the flat slots, in order. `refilled_groups` logs the slots filled.
    mask_truncated: drop completions that hit max_new_tokens from the loss.
    routing_replay: MoE routing replay (R3): the update's forward uses the experts the sampler
      chose for each token (gate weights still from the current router).
    is_correction: rollout-vs-trainer importance correction: none | token_tis | seq_tis |
      token_mis | seq_mis (truncated importance sampling or masking, per token or sequence).
    is_threshold: TIS: the weight's upper bound C; MIS: the upper bound of kept ratios.
    is_threshold_low: MIS: the lower bound of kept ratios.
    length_bucket: 0: the update runs on prompt + max_new_tokens columns (one compiled shape).
      > 0: on prompt + the batch's longest completion, rounded up to a multiple of this; the
      same loss with less work when completions are short, at one compile per length.
    drop_zero_var: the update leaves out most groups whose rewards are all equal: their
      advantages are zero, so they add no policy-gradient term, only the KL one (DAPO's
      filter, without refills). It runs on the other groups, filled up with zero-variance
      ones to a power-of-two count of at least 2 groups (one compile per count), and the loss
      averages over those rows; the update's FLOPs (and so a matched control's) are what it
      ran. In the tiny recipe's d3aa4cf round 79-92 % of the groups were flat.
    share_prompt: the update runs each group's prompt once, not G times: the prompt's keys and
      values are computed for the group and its G completions attend to them (the sampler's
      cached attention, with the gradient through the shared entries). The same loss to float
      rounding, with less work when prompts are long next to completions (r1_zero_smollm2: 121
      prompt tokens, 16-64 completion tokens). Off by default: the committed tiny-recipe
      rounds ran without it, and float order changes their numbers. Not with routing_replay.
    staleness: 0: synchronous (each batch is sampled by the policy it updates). k >= 1:
      k-step off-policy (asynchronous) GRPO: the rollout of step t+k is dispatched before
      update t, from the policy before that update, so the two can run at once (with
      rollout_devices) and the host scores batch t while the devices sample. Batch t+k is then
      k updates behind the policy that learns from it (k rollouts in flight: a bound on the
      lag, as verl and slime set one); the clipped ratio is taken against the sampler's
      log-probs, or with `is_correction` against the current policy's, with the sampler's
      weight truncated (decoupled PPO). The stage keeps (and checkpoints) a copy of the
      trained weights per rollout in flight. With dynamic_sampling, refill candidates are
      sampled beside each batch (above).
    rollout_devices: with staleness >= 1, sample on this many devices of their own (the last
      rollout_devices / processes local devices of every process; the run's mesh is built on
      the rest, for every stage). The policy's weights are copied to them before each
      rollout (with LoRA only the adapters and correction biases, the frozen base once).
      0: sample on the run's mesh.
    draft: "mtp": speculative rollouts, the policy's own MTP module drafting one token ahead
      and the policy verifying it (`rollout.speculative`): the same sampling distribution and
      the same log-probs, up to two tokens per decode step; `draft_accept_rate` is logged.
      "" (default): plain decoding. Needs a model with an MTP module; not with routing_replay.
    partial_tokens: > 0: partial rollouts (Kimi k1.5, slime; `rollout.partial`): each generate
      call decodes at most this many tokens per row, unfinished rows are carried to the next
      call and step (continued by the policy of that step), and the update takes the oldest
      prompts_per_step groups whose rows all finished. A long completion no longer holds a
      whole batch. Tokens sampled at earlier steps keep their sampler log-probs, so the
      clipped ratio sees their policy lag (`stale_token_frac` logs their share). DAPO's
      refills sample whole completions. Must be < max_new_tokens; not with staleness >= 1 or
      routing_replay. 0 (default): every completion in one call.
    draft_weight: > 0: train the MTP draft online on the rollouts (slime's MTP training): the
      update adds draft_weight x the MTP modules' cross-entropy on the completion tokens at the
      sampling temperature, with no gradient into the trunk or the shared embedding and head,
      and clips the MTP gradient by its own norm, so the policy's update is GRPO's alone
      (`r1jax.train.losses.grpo`). Logs `draft_loss`. Under AdamW the weight scales the MTP
      gradient, which Adam normalizes: the draft learns at the stage's lr whatever the weight,
      so read it as on/off. 0 (default): the MTP modules stay as the stage found them (with
      weight_decay > 0, AdamW decays them). Needs a model with an MTP module; not with
      share_prompt (the MTP modules run on whole rows). The policy's gradient is the one
      without it, to float rounding.
    reward_model: the reward model that scores the `reward_model` reward: the name of an
      earlier `reward_model` stage, or a directory of a HF `*ForSequenceClassification`
      checkpoint (one label; the run's tokenizer). Needed exactly when `reward_weights` names
      `reward_model` (R1's RL for all scenarios: rule rewards where a rule can judge, a model
      where it cannot). Several, comma-separated, make an ensemble: each completion scores
      the mean of their scores or the lowest (`reward_model_aggregate`).
    reward_model_aggregate: "mean" or "min" (conservative: high only where every model
      agrees), for an ensemble of reward models.
  """
  prompts_per_step: int = 16
  group_size: int = 8
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_p: float = 1.0
  reward_weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
  policy_loss: str = "grpo"
  loss_type: str = "grpo"
  eps_low: float = 0.2
  eps_high: float = 0.2
  beta: float = 0.0
  ref_refresh_every: int = 0
  ref_from: str = ""
  mu: int = 1
  advantage_scale: str = "group"
  dynamic_sampling: bool = False
  max_refills: int = 2
  mask_truncated: bool = False
  routing_replay: bool = False
  is_correction: str = "none"
  is_threshold: float = 2.0
  is_threshold_low: float = 0.5
  length_bucket: int = 0
  drop_zero_var: bool = False
  share_prompt: bool = False
  staleness: int = 0
  rollout_devices: int = 0
  draft: str = ""
  draft_weight: float = 0.0
  partial_tokens: int = 0
  reward_model: str = ""
  reward_model_aggregate: str = "mean"

  @property
  def reward_models(self) -> list[str]:
    """The reward models `reward_model` names (one, or an ensemble's)."""
    return [r.strip() for r in self.reward_model.split(",") if r.strip()]

  def check(self, need):
    super().check(need)
    from r1jax.train.losses import policy as policy_loss
    need(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
    need(self.group_size >= 2, "group_size", "must be >= 2 (advantages are "
         "relative to the group)")
    _check_sampling(need, self.max_new_tokens, self.temperature, self.top_p)
    _check_rewards(need, self.reward_weights)
    need(self.policy_loss in policy_loss.POLICY_LOSSES, "policy_loss",
         f"is not one of {tuple(policy_loss.POLICY_LOSSES)}")
    need(self.loss_type in policy_loss.AGGREGATIONS, "loss_type",
         f"is not one of {tuple(policy_loss.AGGREGATIONS)}")
    need(0 <= self.eps_low < 1, "eps_low", "must be in [0, 1)")
    need(self.eps_high >= 0, "eps_high", "must be >= 0")
    need(self.beta >= 0, "beta", "must be >= 0")
    need(self.ref_refresh_every >= 0, "ref_refresh_every", "must be >= 0")
    need(not self.ref_from or self.beta > 0, "ref_from", "needs beta > 0 (with beta=0 there is "
         "no reference model)")
    need(not (self.ref_from and self.ref_refresh_every), "ref_from",
         "cannot be set with ref_refresh_every (which replaces the reference with the policy)")
    need(self.mu >= 1, "mu", "must be >= 1")
    need(self.advantage_scale in ("group", "batch", "none"), "advantage_scale",
         "must be group, batch or none")
    need(self.max_refills >= 0, "max_refills", "must be >= 0")
    need(self.is_correction in policy_loss.IS_CORRECTIONS, "is_correction",
         f"is not one of {policy_loss.IS_CORRECTIONS}")
    need(self.is_threshold > 0, "is_threshold", "must be > 0")
    need(0 <= self.is_threshold_low < self.is_threshold, "is_threshold_low",
         "must be in [0, is_threshold)")
    need(self.length_bucket >= 0, "length_bucket", "must be >= 0")
    need(not (self.share_prompt and self.routing_replay), "share_prompt",
         "cannot be on with routing_replay (replay runs on whole rows)")
    need(self.staleness >= 0, "staleness", "must be >= 0 (0: synchronous; k: k steps "
         "off-policy)")
    need(self.rollout_devices >= 0, "rollout_devices", "must be >= 0")
    need(not (self.rollout_devices and not self.staleness), "rollout_devices",
         "needs staleness >= 1 (a synchronous rollout waits for the update anyway)")
    need(self.draft in ("", "mtp"), "draft", "must be '' (plain decoding) or 'mtp'")
    need(not (self.draft and self.routing_replay), "draft",
         "cannot be on with routing_replay (a rejected draft's experts are not a row's)")
    need(self.draft_weight >= 0 and math.isfinite(self.draft_weight), "draft_weight",
         "must be >= 0 and finite")
    need(not (self.draft_weight and self.share_prompt), "draft_weight",
         "cannot be > 0 with share_prompt (the MTP modules run on whole rows)")
    need(0 <= self.partial_tokens < self.max_new_tokens, "partial_tokens",
         f"must be in [0, max_new_tokens={self.max_new_tokens}) (0: whole completions)")
    need(not (self.partial_tokens and self.staleness), "partial_tokens",
         "cannot be on with staleness >= 1 (asynchronous GRPO samples whole completions)")
    need(not (self.partial_tokens and self.routing_replay), "partial_tokens",
         "cannot be on with routing_replay (a carried row's earlier experts are not kept)")
    _check_reward_model(need, self.reward_weights, self.reward_model)
    from r1jax.rollout.reward_model import ENSEMBLE_AGGREGATES
    need(self.reward_model_aggregate in ENSEMBLE_AGGREGATES, "reward_model_aggregate",
         f"must be one of {ENSEMBLE_AGGREGATES}")
    need(len(set(self.reward_models)) == len(self.reward_models), "reward_model",
         "names a reward model twice")

  @property
  def rows(self) -> int:
    return self.prompts_per_step * self.group_size

  @property
  def oversample(self) -> int:
    """Refill batches sampled beside each batch (asynchronous dynamic sampling), else 0."""
    return self.max_refills if self.staleness and self.dynamic_sampling else 0

  @property
  def rollout_rows(self) -> int:
    """Rows of one rollout call: the batch's and its over-sampled refill candidates'."""
    return self.rows * (1 + self.oversample)


@dataclasses.dataclass(frozen=True)
class RejectionConfig(StageConfig):
  """`rejection_sampling`: k answers per prompt from the policy; keep the correct, readable ones
  as an SFT dataset at samples/<stage>.jsonl.

  Attributes:
    num_prompts: RL prompts to sample for (the first ones of the RL split).
    k, max_new_tokens, temperature, top_p: sampling.
    reward_weights: the rewards a kept sample must reach `min_reward` in (weights unused).
    max_chars: readability: drop longer completions.
    keep_per_prompt: at most this many distinct samples per prompt.
    batch_size: rows per generate call.
    draft: "mtp": sample speculatively, the policy's MTP module drafting (the same sampling
      distribution as plain decoding; `draft_accept_rate` is logged). Needs a model with an
      MTP module.
    pairs: also write preference pairs to samples/<stage>_pairs.jsonl: for every prompt with a
      sample that passes (every reward >= min_reward, within max_chars) and one that fails,
      {question, chosen: a passing one, rejected: a failing one}: a `reward_model` stage's data.
    pairs_per_prompt: at most this many pairs per prompt, of distinct samples (the i-th pairs
      the i-th passing and the i-th failing one, cycling through the shorter list).
  """
  num_prompts: int = 256
  k: int = 4
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_p: float = 1.0
  reward_weights: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
  min_reward: float = 1.0
  max_chars: int = 10_000
  keep_per_prompt: int = 1
  batch_size: int = 64
  draft: str = ""
  pairs: bool = False
  pairs_per_prompt: int = 1

  def check(self, need):
    super().check(need)
    need(self.num_prompts >= 1, "num_prompts", "must be >= 1")
    need(self.k >= 1, "k", "must be >= 1")
    _check_sampling(need, self.max_new_tokens, self.temperature, self.top_p)
    _check_rewards(need, self.reward_weights)
    need(self.max_chars >= 1, "max_chars", "must be >= 1")
    need(self.keep_per_prompt >= 1, "keep_per_prompt", "must be >= 1")
    need(self.batch_size >= 1, "batch_size", "must be >= 1")
    need(self.draft in ("", "mtp"), "draft", "must be '' (plain decoding) or 'mtp'")
    need(self.pairs_per_prompt >= 1, "pairs_per_prompt", "must be >= 1")
    need(not any(n in _model_rewards() for n in self.reward_weights), "reward_weights",
         "names a model-scored reward; rejection sampling keeps samples by rule rewards")


@dataclasses.dataclass(frozen=True)
class RewardModelConfig(StageConfig):
  """`reward_model`: train a reward model (a sequence classifier with one label) on preference
  pairs with the Bradley-Terry loss, -log sigmoid(r(chosen) - r(rejected)), as InstructGPT and
  TRL's RewardTrainer do. The model is the policy's architecture with a `score` head in place of
  the LM head (HF `*ForSequenceClassification`), scoring a row at its last token; its trunk
  starts from the current policy (or the output of `start_from`), its head from zero-mean noise.
  The policy does not change.

  Attributes:
    data_file: a JSONL file of {question, chosen, rejected} (relative paths are under the run
      directory, e.g. samples/rejection_pairs.jsonl, which a rejection stage with `pairs`
      writes), or several, comma-separated: their pairs are pooled. A row is the prompt
      formatted with the stage's template, then the completion.
    start_from: an earlier pretrain, sft or grpo stage whose output model the trunk starts
      from ("" = the current policy), or an earlier reward_model stage, which this one then
      continues (its trunk and head): iterated reward modelling, retraining the reward model
      on pairs from the policy it shaped. A continued stage keeps its predecessor's held-out
      questions held out and its training questions in training; only new questions are
      split by heldout_frac.
    pairs_per_step: pairs per step (each is two rows of data.seq_len tokens).
    heldout_frac: the share of the pairs' distinct questions (a seeded choice) whose pairs are
      held out of training; after the stage the model's pairwise accuracy on them is its
      evaluation ("accuracy").
    center_coef: weight of mean((r(chosen) + r(rejected))^2), which keeps the scores centred
      on zero (TRL's center_rewards_coefficient; 0 = off).
  """
  data_file: str = ""
  pairs_per_step: int = 16
  heldout_frac: float = 0.1
  center_coef: float = 0.0

  def check(self, need):
    super().check(need)
    need(self.data_file != "", "data_file", "must name a JSONL file of preference pairs")
    need(self.pairs_per_step >= 1, "pairs_per_step", "must be >= 1")
    need(0.0 <= self.heldout_frac < 1.0, "heldout_frac", "must be in [0, 1)")
    need(self.center_coef >= 0 and math.isfinite(self.center_coef), "center_coef",
         "must be >= 0 and finite")


@dataclasses.dataclass(frozen=True)
class EvalConfig(StageConfig):
  """`eval`: evaluate a model on the held-out problems.

  Attributes:
    model: "policy" or "student".
    overrides: of the run config's eval section (k, temperature, max_new_tokens, draft, ...),
      given as that section's own keys on the stage: `stage("eval", steps=0, k=8,
      temperature=0.6)`.
  """
  model: str = "policy"
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def check(self, need):
    super().check(need)
    need(self.model in ("policy", "student"), "model", "must be 'policy' or "
         "'student'")


CLASSES = {"pretrain": SFTConfig, "sft": SFTConfig, "distill": DistillConfig,
           "grpo": GRPOConfig, "rejection_sampling": RejectionConfig,
           "reward_model": RewardModelConfig, "eval": EvalConfig}


def _plain(v):
  return v.to_dict() if hasattr(v, "to_dict") else v


def parse(name: str, section, optim_keys=(), eval_keys=()) -> StageConfig:
  """The typed config of stage `name` from its run-config section. Raises ConfigError."""
  raw = {k: _plain(v) for k, v in dict(section).items()}
  kind = raw.get("kind")
  if kind not in CLASSES:
    raise ConfigError(f"stages.{name}.kind={kind!r} is not one of {KINDS}")
  cls = CLASSES[kind]
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kw: dict[str, Any] = {"name": name}
  optim, overrides = {}, {}
  for key, value in raw.items():
    if key in optim_keys and kind in TRAINING_KINDS:
      optim[key] = value
    elif cls is EvalConfig and key in eval_keys:
      overrides[key] = value
    elif key in fields and key not in ("name", "optim", "overrides"):
      kw[key] = _coerce(name, key, value, fields[key])
    else:
      raise ConfigError(f"stages.{name}.{key} is not a field of a {kind} stage")
  kw["optim"] = optim
  if cls is EvalConfig:
    kw["overrides"] = overrides
  stage = cls(**kw)

  def need(ok, field, rule):
    if not ok:
      value = getattr(stage, field)
      shown = dict(value) if isinstance(value, Mapping) else value
      raise ConfigError(f"stages.{name}.{field}={shown!r} {rule}")

  stage.check(need)
  return stage


def _coerce(stage: str, key: str, value, field: dataclasses.Field):
  """Values as the field's type (ml_collections keeps ints where a float field is meant)."""
  t = str(field.type)
  try:
    if t in ("int",) and not isinstance(value, bool):
      if isinstance(value, float) and not value.is_integer():
        raise ValueError
      return int(value)
    if t in ("float", "float | None") and value is not None and not isinstance(value, bool):
      return float(value)
    if t == "bool":
      if not isinstance(value, bool):
        raise ValueError
      return value
    if t == "str":
      if not isinstance(value, str):
        raise ValueError
      return value
  except (TypeError, ValueError):
    raise ConfigError(f"stages.{stage}.{key}={value!r} must be of type {t}") from None
  return value
