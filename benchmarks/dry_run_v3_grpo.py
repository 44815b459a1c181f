"""A GRPO stage on configs/deepseek_v3_671b.py, for the dry run of its update's memory.

    python -m r1jax.launch --config benchmarks/dry_run_v3_grpo.py --dry_run

32 prompts x 16 completions = 512 rows on the 256-device default mesh (2 per device), each a
513-token prompt (data.seq_len) + 1,024 new tokens, with a KL term (beta 0.001). Only for
`--dry_run`: it has no data and nothing to train from.
"""

from r1jax.run_config import from_file, stage


def get_config(arg=None):
  c = from_file("../configs/deepseek_v3_671b.py", arg, relative_to=__file__)
  c.data.update(seq_len=513)  # + 1,023 update columns = 1,536, a multiple of attn_chunk
  c.stages.grpo = stage("grpo", steps=10, prompts_per_step=32, group_size=16,
                        max_new_tokens=1024, beta=0.001)
  c.stage_order = ("grpo",)
  return c
