"""Every loss, in one package:

  core        token-level functions: log-probabilities, cross-entropy, MTP, distillation
              divergences, expert-load statistics and the aux-loss-free bias update
  supervised  loss plug-ins for the generic step: SFT (with MTP and the balance loss) and logit
              distillation
  policy      the policy-gradient registries: policy losses (token or sequence ratio),
              aggregations, importance corrections for rollout-vs-trainer mismatch
  grpo        GRPOBatch, group advantages and the GRPO loss plug-in built from those registries
  reward      the reward model's Bradley-Terry loss on preference pairs

A loss plug-in is `loss_fn(params, batch, rng, frozen) -> (loss, metrics)` for
`r1jax.train.make_step`.
"""

from r1jax.train.losses.core import (bias_update, cross_entropy, distill_divergence,
                                     divergence_per_token, expert_load_max_over_mean, mtp_loss,
                                     mtp_targets, token_logprobs)
from r1jax.train.losses.grpo import GRPOBatch, group_advantages, grpo_loss
from r1jax.train.losses.reward import reward_loss
from r1jax.train.losses.supervised import distill_loss, moe_metrics, sft_loss

__all__ = ["GRPOBatch", "bias_update", "cross_entropy", "distill_divergence", "distill_loss",
           "divergence_per_token", "expert_load_max_over_mean", "group_advantages", "grpo_loss",
           "moe_metrics", "mtp_loss", "mtp_targets", "reward_loss", "sft_loss", "token_logprobs"]
