"""configs/r1_tiny.py with on-policy distillation after a short sequence distillation, and its
equal-compute control.

    python -m r1jax.launch --config configs/r1_tiny_onpolicy.py --config.seed=45

The teacher is r1_tiny's (the same stages and seed give the same policy). Then:
  distill       r1_tiny's student, sequence distillation (SFT on the rejection samples plus
                the cold-start traces), stopped at 150 steps instead of 500: a student that has
                learned the format and part of the skill
  distill_opd   on-policy distillation from it: each step the student samples 4 completions
                for each of 16 RL prompts, and learns the teacher's distribution at every
                position it visited (reverse KL over the vocabulary), 100 steps
  distill_more  control branch: more sequence distillation from the same 150-step student, for
                the model FLOPs distill_opd spent (sampling, the student's steps and the
                teacher's forwards)
Both students are evaluated on the same held-out problems as every other stage.
"""

from r1jax.run_config import from_file, stage


def get_config(arg=None):
  c = from_file("r1_tiny.py", arg, relative_to=__file__)
  c.stages.distill.steps = 150
  onward = dict(start_from="distill", lr=1e-3, warmup_steps=0, schedule="constant")
  c.stages.distill_opd = stage("distill", steps=100, mode="on_policy", divergence="reverse_kl",
                               prompts_per_step=16, group_size=4, max_new_tokens=32,
                               length_bucket=8, **onward)
  c.stages.distill_more = stage("distill", steps=0, mode="sequence", branch=True,
                                match_compute_of="distill_opd",
                                data_file="samples/rejection.jsonl", with_sft_split=True,
                                **onward)
  c.stage_order = tuple(c.stage_order) + ("distill_opd", "distill_more")
  return c
