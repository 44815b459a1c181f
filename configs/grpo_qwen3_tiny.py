"""GRPO on a tiny Qwen3 (dense GQA with q/k RMSNorm) after a cold-start SFT, on a CPU.

    python -m r1jax.launch --config configs/grpo_qwen3_tiny.py

configs/grpo_tiny.py (its task, stages and GRPO settings) with a Qwen3-family policy instead of
the MoE: what a Qwen3 run needs is `model_type="qwen3"` and its sizes, or `init_from` a Qwen3 HF
checkpoint, whose config.json gives them.
"""

from r1jax.model.config import model_section
from r1jax.run_config import from_file

QWEN3_TINY = dict(model_type="qwen3", vocab_size=128, hidden_size=96, intermediate_size=256,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-6)


def get_config(arg=None):
  c = from_file("grpo_tiny.py", arg, relative_to=__file__)
  c.model = model_section(**QWEN3_TINY)
  c.train.mtp_weight = 0.0  # no MTP module in a dense model
  return c
