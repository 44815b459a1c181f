"""A/B: r1jax's sampler on a 1-device and a 2-device host mesh (the batch split over both CPU
cores), at rollout.py's tiny MoE and shapes; medians of 3 round-robin calls after a compile call.

    python benchmarks/rollout_mesh_ab.py   # prints one line per shape (results/rollout_mesh_ab.txt)
"""
import os, sys, time, statistics
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax, numpy as np
from benchmarks.rollout import tiny_config
from r1jax import model
from r1jax.parallel import make_mesh
from r1jax.rollout import sampler
cfg = tiny_config()
params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
for B, N in ((128, 40), (16, 128)):
  prompts = np.random.default_rng(0).integers(2, cfg.vocab_size, (B, 16)).tolist()
  def call(mesh):
    with jax.set_mesh(mesh):
      out = sampler.generate(params, cfg, prompts, max_new_tokens=N, rng=jax.random.key(0), temperature=1.0, eos_id=None)
    return out
  meshes = {"1 device": make_mesh({"data": 1}, jax.devices()[:1]), "2 devices": make_mesh({"data": 2})}
  outs = {k: call(m) for k, m in meshes.items()}
  same = np.array_equal(outs["1 device"].completion, outs["2 devices"].completion)
  t = {k: [] for k in meshes}
  for _ in range(3):
    for k, m in meshes.items():
      t0 = time.perf_counter(); call(m); t[k].append(time.perf_counter() - t0)
  print(B, N, {k: round(statistics.median(v), 3) for k, v in t.items()}, "same tokens", same)
