"""GRPO on a tiny Qwen3-MoE (GQA with q/k RMSNorm, softmax top-k experts) after a cold-start SFT.

    python -m r1jax.launch --config configs/grpo_qwen3_moe_tiny.py

configs/grpo_tiny.py (its task, stages and GRPO settings) with a Qwen3-MoE policy: 16 experts,
top-2 with renormalized weights, experts in every layer but the first (mlp_only_layers=[0]).
"""

from r1jax.model.config import model_section
from r1jax.run_config import from_file

QWEN3_MOE_TINY = dict(
    model_type="qwen3_moe", vocab_size=128, hidden_size=128, intermediate_size=256,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=(0,), max_position_embeddings=1024,
    tie_word_embeddings=False, rms_norm_eps=1e-6, moe_impl="blocked")


def get_config(arg=None):
  c = from_file("grpo_tiny.py", arg, relative_to=__file__)
  c.model = model_section(**QWEN3_MOE_TINY)
  c.train.mtp_weight = 0.0  # no MTP module outside DeepSeek
  return c
