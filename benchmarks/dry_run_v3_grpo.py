"""A GRPO stage on configs/deepseek_v3_671b.py, for the dry run of its update's memory.

    python -m r1jax.launch --config benchmarks/dry_run_v3_grpo.py --dry_run
    python -m r1jax.launch --config benchmarks/dry_run_v3_grpo.py:exact_buffers --dry_run
    python -m r1jax.launch --config benchmarks/dry_run_v3_grpo.py:sft --dry_run
    python -m r1jax.launch --config benchmarks/dry_run_v3_grpo.py:sft_capacity --dry_run

32 prompts x 16 completions = 512 rows on the 256-device default mesh (2 per device), each a
512-token prompt (data.seq_len) + 1,024 new tokens, with a KL term (beta 0.001). The dry run
compiles the update and the rollout (sampler.generate on the same rows). Only for `--dry_run`:
it has no data and nothing to train from. The arguments, which the command line
cannot express (it cannot set a float field to None):
- `exact_buffers`: the same update with dropless_fast_factor None, so the dropless exchange
  always uses its exact bound (n * min(k, E_loc) rows per device pair);
- `sft`: the SFT step on the same 512 x 1,536 tokens, dropless as the config ships it;
- `sft_capacity`: that SFT step with capacity_factor 1.25 (assignments past it are dropped).
"""

from r1jax.run_config import from_file, stage


def get_config(arg=None):
  c = from_file("../configs/deepseek_v3_671b.py", relative_to=__file__)
  if arg in ("sft", "sft_capacity"):
    c.data.update(batch_size=512, seq_len=1536)
    if arg == "sft_capacity":
      c.model.capacity_factor = 1.25
    return c
  if arg == "exact_buffers":
    c.model.dropless_fast_factor = None
  elif arg is not None:
    raise ValueError(f"unknown argument {arg!r}: exact_buffers, sft or sft_capacity")
  c.data.update(seq_len=512)  # + 1,023 update columns = 1,535: 3 attention chunks of 512
  c.stages.grpo = stage("grpo", steps=10, prompts_per_step=32, group_size=16,
                        max_new_tokens=1024, beta=0.001)
  c.stage_order = ("grpo",)
  return c
