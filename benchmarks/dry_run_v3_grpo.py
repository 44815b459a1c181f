"""A GRPO stage on configs/deepseek_v3_671b.py, for the dry run of its update's memory.

    python -m r1jax.launch --config benchmarks/dry_run_v3_grpo.py --dry_run
    python -m r1jax.launch --config benchmarks/dry_run_v3_grpo.py:sft_dropless --dry_run

32 prompts x 16 completions = 512 rows on the 256-device default mesh (2 per device), each a
513-token prompt (data.seq_len) + 1,024 new tokens, with a KL term (beta 0.001). Only for
`--dry_run`: it has no data and nothing to train from. With the argument `sft_dropless` it is
the SFT step on the same 512 x 1,536 tokens with capacity_factor None (dropless, as GRPO's
policy runs), which the command line cannot set.
"""

from r1jax.run_config import from_file, stage


def get_config(arg=None):
  c = from_file("../configs/deepseek_v3_671b.py", relative_to=__file__)
  if arg == "sft_dropless":
    c.data.update(batch_size=512, seq_len=1536)
    c.model.capacity_factor = None
    return c
  c.data.update(seq_len=513)  # + 1,023 update columns = 1,536, a multiple of attn_chunk
  c.stages.grpo = stage("grpo", steps=10, prompts_per_step=32, group_size=16,
                        max_new_tokens=1024, beta=0.001)
  c.stage_order = ("grpo",)
  return c
