"""A GRPO stage on configs/r1_distill_qwen_1p5b.py (a dense model on an FSDP mesh), for the dry
run of its update's and rollout's memory.

    python -m r1jax.launch --config benchmarks/dry_run_qwen_grpo.py --dry_run --dry_run_devices=64
    python -m r1jax.launch --config benchmarks/dry_run_qwen_grpo.py:fsdp64 --dry_run \
        --dry_run_devices=64

16 prompts x 8 completions = 128 rows, each a 512-token prompt (data.seq_len) + 4,096 new
tokens, with a KL term (beta 0.001), on the config's data 8 x fsdp 8 or (`fsdp64`) on fsdp 64.
Only for `--dry_run`: it has no data and nothing to train from.
"""

from r1jax.run_config import from_file, stage


def get_config(arg=None):
  if arg not in (None, "fsdp64"):
    raise ValueError(f"unknown argument {arg!r}: fsdp64")
  c = from_file("../configs/r1_distill_qwen_1p5b.py", relative_to=__file__)
  c.data.update(seq_len=512)
  c.stages.grpo = stage("grpo", steps=10, prompts_per_step=16, group_size=8,
                        max_new_tokens=4096, beta=0.001)
  c.stage_order = ("grpo",)
  if arg == "fsdp64":
    c.mesh.update(data=1, fsdp=64)
  return c
