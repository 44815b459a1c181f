"""configs/r1_tiny.py with asynchronous GRPO: both GRPO stages sample each batch one update behind
the policy (`staleness=1`), on a device of their own (`rollout_devices=1`), while the update runs
on the other; the decoupled-PPO correction (`is_correction="token_tis"`) weights each token by
how far the policy moved since it was sampled.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python -m r1jax.launch --config configs/r1_tiny_async.py

On a CPU the two "devices" are XLA's simulated host devices, sharing the cores; every stage
trains on the first. Here that is slower than r1_tiny's synchronous GRPO (the two programs share
the two cores); README "Asynchronous GRPO" has what it measured.
"""

from r1jax.run_config import from_file


def get_config(arg=None):
  c = from_file("r1_tiny.py", arg, relative_to=__file__)
  for name in ("grpo", "grpo_final"):
    c.stages[name].update(staleness=1, rollout_devices=1, is_correction="token_tis")
  return c
