"""configs/r1_tiny.py shrunk for the reliability and multi-process tests: every stage of the
recipe but the final GRPO, and every other stage kind (cold-start SFT -> a reward model ->
GRPO, which the reward model also scores -> asynchronous GRPO -> the compute-matched SFT
control -> rejection sampling -> SFT on the sampled data -> distillation -> on-policy
distillation), 3-4 steps each on a 2-layer MoE, batches of 8, a checkpoint every 2 steps, 8
evaluation problems (and 8 more uncovered held-out ones) after the stages that evaluate. It needs
4 devices: asynchronous GRPO samples on 2 of its own, and every stage trains on the other 2.

    python -m r1jax.launch --config tests/reliability/r1_tiny_shrunk.py --workdir /tmp/r1

It is deterministic, so an interrupted run can be compared bit for bit with one that never
stopped. `grpo_final` is left out: it is a second stage of the kind `grpo` already covers, and
its compile would only add time. Rejection sampling keeps every sample (`min_reward=-1`): a
policy trained for a few steps is never right, and the next stages should train on real
generated data rather than skip for want of it.
"""

import importlib.util
import os

import ml_collections

from r1jax.run_config import stage

HERE = os.path.dirname(os.path.abspath(__file__))
R1_TINY = os.path.join(HERE, "..", "..", "configs", "r1_tiny.py")


def get_config(arg=None):
  del arg
  spec = importlib.util.spec_from_file_location("r1_tiny", R1_TINY)
  r1_tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(r1_tiny)
  c = r1_tiny.get_config()
  c.model.num_hidden_layers = 2
  c.data.update(batch_size=8, seq_len=48, num_sft_examples=64, num_rl_prompts=64,
                num_eval_problems=8, num_heldout_uncovered=8)
  c.optim.warmup_steps = 2
  c.eval.update(k=2, max_new_tokens=12)
  c.eval.batch_size = 8  # one compiled generation shape (the default is 64 rows)
  c.checkpoint.update(every_steps=2, keep=2)
  c.log.update(every_steps=1, plots=False, tensorboard=False)
  # 8 rows, as above. With drop_zero_var the update runs on 2 (or 4) of the 4 groups: the
  # filtered path in every multi-process, kill and resume test
  rollout = dict(prompts_per_step=4, group_size=2, max_new_tokens=12, drop_zero_var=True)
  c.stages.cold_start.update(steps=4, eval=False)
  # GRPO samples speculatively (the MTP module drafts; `draft="mtp"`) and trains its draft
  # (`draft_weight`), decodes 5 tokens per call and carries unfinished rows to the next call
  # and step (partial rollouts), refills flat groups (DAPO's dynamic sampling, one refill
  # batch a step) and refreshes its KL reference every 2 steps: these paths in every kill,
  # resume and multi-process test
  c.stages.grpo.update(steps=4, eval=False, draft="mtp", draft_weight=0.1, partial_tokens=5,
                       dynamic_sampling=True, max_refills=1, ref_refresh_every=2, **rollout)
  # a reward model (Bradley-Terry on 24 fixed pairs of a right and a wrong answer, 8 held out)
  # scores grpo's rollouts: logged as reward_reward_model, at weight 0 so that the rule rewards
  # keep the flat groups dynamic sampling refills
  c.stages.rm = stage("reward_model", steps=3, data_file=os.path.join(HERE, "pairs.jsonl"),
                      pairs_per_step=4, heldout_frac=0.25)
  c.stages.grpo.reward_weights = dict(c.stages.grpo.reward_weights, reward_model=0.0)
  c.stages.grpo.reward_model = "rm"
  c.stages.rejection.update(num_prompts=8, k=2, max_new_tokens=12)
  c.stages.rejection.batch_size = 8
  c.stages.rejection.min_reward = -1.0
  c.stages.sft_control.update(eval=False)  # its step count comes from grpo's FLOPs: capped
  c.stages.sft_rs.steps = 3
  c.stages.distill.update(steps=3)
  c.stages.distill.student.num_hidden_layers = 1
  # on-policy distillation: the student of `distill` samples and learns the teacher's
  # distribution where it went (reverse KL)
  c.stages.distill_opd = stage("distill", steps=4, mode="on_policy", start_from="distill",
                               divergence="reverse_kl", prompts_per_step=4, group_size=2,
                               max_new_tokens=12, length_bucket=4)
  # asynchronous GRPO: two rollouts in flight, each batch sampled two updates behind, on 2
  # devices of their own, with the decoupled-PPO correction; every stage trains on the other
  # devices. Each rollout samples a second batch of prompts beside its batch, whose varied
  # groups refill its flat ones (asynchronous dynamic sampling). Its KL term is to the cold
  # start (ref_from), not to the policy it starts from
  c.stages.grpo_async = ml_collections.ConfigDict(c.stages.grpo.to_dict())
  c.stages.grpo_async.update(staleness=2, rollout_devices=2, is_correction="token_tis",
                             draft="", dynamic_sampling=True, max_refills=1, partial_tokens=0,
                             reward_model="", ref_refresh_every=0, ref_from="cold_start")
  c.stages.grpo_async.reward_weights = dict(c.stages.grpo.reward_weights)
  del c.stages.grpo_async.reward_weights["reward_model"]
  c.max_steps = 4  # caps the compute-matched control (every other stage is shorter already)
  c.stage_order = ("cold_start", "rm", "grpo", "grpo_async", "sft_control", "rejection",
                   "sft_rs", "distill", "distill_opd")
  return c
