"""Two processes on localhost (2 CPU devices each, gloo collectives) train the tiny MoE on one
global mesh of 4 devices and match a single process with 4 devices; when one process dies, the
other exits with an error in bounded time instead of hanging.

The workers are this file run as a script:

    python tests/test_multiprocess.py --out DIR [--coordinator H:P --num_processes 2 --process_id I]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

STEPS = 3
B, T = 8, 16
MESH = dict(expert=4)  # experts and batch split over both processes: all-to-all crosses them
HEARTBEAT_S = 10
EXIT_BOUND_S = 90


# ---------------------------------------------------------------------------------- worker

def _worker(args):
  import jax
  from r1jax import parallel, run_config, train
  from r1jax.model.config import ModelConfig
  from r1jax import dry_run as memory
  from r1jax.parallel import distributed
  from r1jax.stages import common

  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  cfg = ModelConfig.from_config(run_config.tiny_moe_fields(
      num_hidden_layers=2, num_nextn_predict_layers=0, expert_dispatch="all_to_all",
      dropless_fast_factor=args.fast_factor or None, attn_chunk=args.attn_blocks or None,
      attn_key_chunk=args.attn_blocks or None))
  mesh = parallel.make_mesh(json.loads(args.mesh) if args.mesh else MESH)
  assert jax.device_count() == 4 and jax.local_device_count() == 4 // jax.process_count()

  # identical host values everywhere; each process places only its own shards
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  from testing import random_params
  host_params = random_params(cfg, seed=0, std=0.02)
  shardings = parallel.param_shardings(cfg, mesh)
  params = jax.tree.map(lambda x, s: jax.make_array_from_callback(
      x.shape, s, lambda idx, x=x: np.asarray(x)[idx]), host_params, shardings)
  optim = run_config.base_config().optim
  optim.update(lr=1e-3, warmup_steps=0, schedule="constant")
  tx, lr = train.make_optimizer(optim, STEPS)
  state_sh = jax.tree.map(lambda x: x.sharding, memory.abstract_state(cfg, tx, mesh))
  state = jax.jit(lambda p: train.create(p, tx, 0), out_shardings=state_sh)(params)
  step = train.make_step(train.sft_loss(cfg), tx, lr, bias_gamma=1e-2)

  # the global batch, the same on every process; each places only its devices' rows
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, cfg.vocab_size, (B, T)).astype(np.int32)
  batch = dict(tokens=tokens, targets=np.roll(tokens, -1, 1),
               loss_mask=np.ones((B, T), np.float32),
               segment_ids=np.ones((B, T), np.int32),
               positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy())
  ctx = argparse.Namespace(mesh=mesh)
  from jax.experimental import multihost_utils
  losses = []
  with jax.set_mesh(mesh):
    sharded = common.shard(ctx, batch)
    step = step.lower(state, sharded).compile()
    # gloo connects the processes at their first collective and gives up after ~30 s; on a
    # loaded machine one process can finish compiling far later than the other
    multihost_utils.sync_global_devices("train step compiled")
    for i in range(STEPS):
      state, metrics = step(state, sharded)
      losses.append(float(metrics["loss"]))
      print(f"step {i + 1} loss {losses[-1]:.6f} exchanges "
            f"{float(metrics.get('moe_exchange_rounds', 1.0)):.2f}", flush=True)
      if args.pause_s:
        time.sleep(args.pause_s)
  final = multihost_utils.process_allgather(train.full_params(state), tiled=True)
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree.flatten_with_path(final)[0]}
    np.savez(os.path.join(args.out, "params.npz"), **flat)
    with open(os.path.join(args.out, "losses.json"), "w") as f:
      json.dump(losses, f)
  multihost_utils.sync_global_devices("results written")  # reach shutdown together
  print("done", flush=True)


def _main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--coordinator")
  ap.add_argument("--num_processes", type=int)
  ap.add_argument("--process_id", type=int)
  ap.add_argument("--pause_s", type=float, default=0.0)
  ap.add_argument("--fast_factor", type=float, default=0.0)  # 0: exact dropless buffers
  ap.add_argument("--mesh", default="")  # JSON mesh sizes; default MESH
  ap.add_argument("--attn_blocks", type=int, default=0)  # query chunk = key block; 0: none
  _worker(ap.parse_args())


# ---------------------------------------------------------------------------------- tests

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(local_devices: int, heartbeat_s: int = HEARTBEAT_S):
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices} "
                       "--xla_backend_optimization_level=0",
             JAX_PLATFORMS="cpu", R1JAX_HEARTBEAT_TIMEOUT=str(heartbeat_s),
             PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
  return env


def _spawn(out, local_devices, *extra, heartbeat_s: int = HEARTBEAT_S):
  os.makedirs(out, exist_ok=True)
  return subprocess.Popen([sys.executable, __file__, "--out", str(out), *map(str, extra)],
                          env=_env(local_devices, heartbeat_s), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _pair(out, *extra, heartbeat_s: int = HEARTBEAT_S):
  import portpicker
  coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
  return [_spawn(out, 2, "--coordinator", coordinator, "--num_processes", 2, "--process_id", i,
                 *extra, heartbeat_s=heartbeat_s) for i in range(2)]


def _finish(proc, timeout):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"worker still running after {timeout} s\n{out}\n{err[-3000:]}")
  return proc.returncode, out, err


@pytest.mark.parametrize("fast,mesh", [(0.0, ""), (1.0, ""), (0.0, '{"context": 4}')],
                         ids=["exact_buffers", "fast_buffers", "context_parallel"])
def test_two_processes_match_one_process(tmp_path, fast, mesh):
  """With fast buffers of 1x the mean load the routing overflows them, so the exchange runs in
  token slices, chosen alike by both processes (`moe.dispatch._dropless`). With a 4-way
  `context` axis each device holds 4 of every row's 16 positions (in zigzag order), the
  attention gathers keys across the processes, and each device skips its own key blocks (query
  and key blocks of 2)."""
  # a generous heartbeat: on a loaded machine a short one can end a healthy run
  extra = ("--fast_factor", fast) + (("--mesh", mesh, "--attn_blocks", 2) if mesh else ())
  procs = _pair(tmp_path / "two", *extra, heartbeat_s=120)
  reference = _spawn(tmp_path / "one", 4, *extra)
  results = [_finish(p, 600) for p in procs + [reference]]
  for rc, out, err in results:
    assert rc == 0, f"worker failed (rc {rc}):\n{out}\n{err[-3000:]}"
    assert out.count("loss") == STEPS
    exchanges = [float(line.split()[-1]) for line in out.splitlines() if " loss " in line]
    assert (max(exchanges) > 1) == bool(fast), exchanges
  two = json.loads((tmp_path / "two" / "losses.json").read_text())
  one = json.loads((tmp_path / "one" / "losses.json").read_text())
  assert len(two) == STEPS and two[-1] < two[0]
  np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)
  p2, p1 = np.load(tmp_path / "two" / "params.npz"), np.load(tmp_path / "one" / "params.npz")
  assert sorted(p2.files) == sorted(p1.files) and len(p1.files) > 20
  for k in p1.files:
    np.testing.assert_allclose(p2[k], p1[k], rtol=0, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("victim", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_survivor_exits_with_an_error_when_a_process_dies(tmp_path, victim):
  """Process 0 hosts the coordination service: either the service sees the missing heartbeats
  of process 1 and propagates the error, or process 1 loses the service."""
  procs = _pair(tmp_path, "--pause_s", 2)
  victim, survivor = procs[victim], procs[1 - victim]
  seen = []
  for line in victim.stdout:  # blocks until the first step is done (or the worker fails)
    seen.append(line)
    if line.startswith("step 1"):
      break
  assert seen and seen[-1].startswith("step 1"), f"{seen}\n{victim.stderr.read()[-3000:]}"
  victim.send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  victim.communicate()
  rc, out, err = _finish(survivor, EXIT_BOUND_S)
  elapsed = time.monotonic() - killed_at
  assert rc != 0 and "done" not in out, f"survivor did not fail: rc {rc}\n{out}\n{err[-3000:]}"
  assert elapsed < EXIT_BOUND_S
  print(f"survivor exited with rc {rc} {elapsed:.1f} s after the kill; stderr:\n{err[-6000:]}")
  # JAX's own words: "... another task died", "Task 1 heartbeat timeout", "Connection closed by peer"
  assert any(s in err.lower() for s in ("task died", "heartbeat", "connection closed")), err


if __name__ == "__main__":
  _main()
