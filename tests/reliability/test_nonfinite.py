"""Non-finite steps: with train.nonfinite="skip" a step whose loss, gradient or update is not
finite leaves params and optimizer state exactly as they were and the run goes on; with "stop"
the run ends with one `error: ...` line (exit status 2), and no checkpoint on disk, before or
after, holds a non-finite value.

Injected through real paths: a batch whose loss or gradient is infinite (a scale field the loss
multiplies by, forward or backward), a learning rate that overflows float32 (finite gradients,
infinite update), and, end to end through the launcher, a learning rate of 1e30 that makes the
tiny MoE's activations overflow from the second step on.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import launcher
from r1jax import train
from r1jax.run_config import base_config
from r1jax.train import state as state_lib

# ----------------------------------------------------------------------------- one step


@jax.custom_vjp
def scale_gradient(x, scale):
  """x in the forward pass; the backward pass multiplies the gradient by `scale`."""
  return x


scale_gradient.defvjp(lambda x, scale: (x, scale),
                      lambda scale, g: (g * scale, jnp.zeros_like(scale)))


def linear_loss(params, batch, rng, frozen):
  """Mean squared error, per example times batch["scale"] (forward) and batch["grad_scale"]
  (backward only)."""
  del rng, frozen
  pred = scale_gradient(batch["x"] @ params["w"] + params["b"], batch["grad_scale"][:, None])
  loss = jnp.mean((pred - batch["y"]) ** 2 * batch["scale"][:, None])
  return loss, {"tokens": jnp.float32(batch["y"].size)}


def make_batch(seed, B=8, **poison):
  rng = np.random.default_rng(seed)
  batch = {"x": rng.standard_normal((B, 3)), "y": rng.standard_normal((B, 2)),
           "scale": np.ones(B), "grad_scale": np.ones(B)}
  for field, value in poison.items():
    batch[field][B - 1] = value  # one example: with accumulation, one micro-batch
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), batch)


def optimizer(lr):
  optim = base_config().optim
  optim.update(lr=lr, warmup_steps=0, schedule="constant")
  return train.make_optimizer(optim, total_steps=10)


def snapshot(state):
  return jax.tree.map(np.array, (state.params, state.opt_state))


def assert_same(a, b):
  for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


POISONS = {
    "infinite loss": dict(scale=np.inf),
    "NaN loss": dict(scale=np.nan),
    "infinite gradient, finite loss": dict(grad_scale=np.inf),
    "NaN gradient, finite loss": dict(grad_scale=np.nan),
}


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_skip_leaves_params_and_optimizer_state_unchanged(accum_steps):
  tx, lr = optimizer(1e-2)
  step = train.make_step(linear_loss, tx, lr, accum_steps=accum_steps, nonfinite="skip")
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
            "b": jnp.zeros((2,), jnp.float32)}
  state = state_lib.create(params, tx, seed=0)
  state, metrics = step(state, make_batch(1))
  assert float(metrics["nonfinite"]) == 0.0
  for i, (name, poison) in enumerate(POISONS.items()):
    before, count = snapshot(state), int(state.step)
    state, metrics = step(state, make_batch(10 + i, **poison))
    assert float(metrics["nonfinite"]) == 1.0, name
    if name.endswith(", finite loss"):
      assert math.isfinite(float(metrics["loss"])), name  # caught by the gradient alone
    assert_same(snapshot(state), before)
    assert int(state.step) == count + 1  # the step counts; the model does not move
    # the run continues: the next good batch trains as usual
    state, metrics = step(state, make_batch(20 + i))
    assert float(metrics["nonfinite"]) == 0.0, name
    assert not np.array_equal(np.asarray(state.params["w"]), before[0]["w"]), name
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(snapshot(state)))


def test_an_update_that_overflows_is_skipped_too():
  """Finite loss and gradients, but lr = 1e39 is infinite in float32: the update is not finite.
  (Before the guard looked at the updated params, this step wrote -inf into every weight.)"""
  tx, lr = optimizer(1e39)
  step = train.make_step(linear_loss, tx, lr, nonfinite="skip")
  params = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}
  state = state_lib.create(params, tx, seed=0)
  before = snapshot(state)
  state, metrics = step(state, make_batch(1))
  assert math.isfinite(float(metrics["loss"])) and math.isfinite(float(metrics["grad_norm"]))
  assert float(metrics["nonfinite"]) == 1.0
  assert_same(snapshot(state), before)


# ----------------------------------------------------------------------------- the launcher

STEPS = 4
BLOWUP_ARGS = ["--config", launcher.SHRUNK_R1, "--config.stage_order=('cold_start',)",
               f"--config.stages.cold_start.steps={STEPS}", "--config.optim.lr=1e30",
               "--config.optim.warmup_steps=0", "--config.optim.schedule=constant",
               "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=10"]


@pytest.fixture
def blown_up_runs(tmp_path_factory):
  """The shrunk recipe's SFT stage at lr 1e30, once per train.nonfinite mode, side by side."""
  base = tmp_path_factory.mktemp("nonfinite")
  dirs = {mode: str(base / mode) for mode in ("skip", "stop")}
  procs = {mode: launcher.start([*BLOWUP_ARGS, f"--config.train.nonfinite={mode}",
                                 "--workdir", d], d + ".log") for mode, d in dirs.items()}
  try:
    rcs = {mode: proc.wait(timeout=400) for mode, proc in procs.items()}
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return {mode: (rcs[mode], d, launcher.tail(d + ".log", 20000)) for mode, d in dirs.items()}


def checkpoint_states(workdir):
  """step -> the train state saved at that step (as numpy), for every committed checkpoint."""
  directory = os.path.join(workdir, "checkpoints", "cold_start")
  steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
  return {s: jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(
      os.path.join(directory, str(s), "state"))) for s in steps}


def all_finite(tree):
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def logged(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def test_blown_up_training_skip_goes_on_and_stop_ends_cleanly(blown_up_runs):
  """One test over both runs (run side by side; a shared module fixture would run twice when
  pytest-xdist puts tests on different workers)."""
  check_stop_ends_with_one_error_line_and_only_finite_checkpoints(blown_up_runs)
  check_skip_goes_on_with_the_model_frozen_at_the_last_finite_step(blown_up_runs)


def check_stop_ends_with_one_error_line_and_only_finite_checkpoints(blown_up_runs):
  rc, workdir, log = blown_up_runs["stop"]
  assert rc == 2, log[-3000:]
  assert "Traceback" not in log, log[-3000:]
  errors = [line for line in log.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and log.rstrip().endswith(errors[0]), log[-3000:]
  assert "non-finite" in errors[0] and "train.nonfinite=stop" in errors[0], errors[0]
  stopped_at = int(errors[0].split(" at step ")[1].split()[0])
  assert stopped_at >= 2  # step 1 is finite (it is what blows the weights up)
  states = checkpoint_states(workdir)
  assert sorted(states) == list(range(1, stopped_at)), (sorted(states), stopped_at)
  for s, state in states.items():
    assert all_finite(state), s
  assert not os.path.exists(os.path.join(workdir, "outputs", "cold_start"))
  print(f"\nnonfinite: stop mode stopped at step {stopped_at}: {errors[0]!r}; "
        f"{len(states)} checkpoint(s) on disk, all finite")


def check_skip_goes_on_with_the_model_frozen_at_the_last_finite_step(blown_up_runs):
  rc, workdir, log = blown_up_runs["skip"]
  assert rc == 0, log[-3000:]
  records = logged(workdir)
  assert sorted(records) == list(range(1, STEPS + 1))
  skipped = [s for s, r in records.items() if r["nonfinite"] == 1.0]
  assert records[1]["nonfinite"] == 0.0 and skipped and skipped == list(
      range(skipped[0], STEPS + 1)), records
  states = checkpoint_states(workdir)
  assert sorted(states) == list(range(1, STEPS + 1))
  last_good = states[skipped[0] - 1]
  for s, state in states.items():
    assert all_finite(state), s
    if s in skipped:  # params, optimizer state and router biases exactly as before
      for key in ("params", "opt_state", "router_bias"):
        assert_same(state[key], last_good[key])
      assert state["step"] == s
  output = jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "outputs", "cold_start", "params")))
  assert all_finite(output)
  with open(os.path.join(workdir, "summary.json")) as f:
    (stage,) = json.load(f)["stages"]
  assert stage["name"] == "cold_start" and stage["metrics"]["nonfinite"] == 1.0
  print(f"\nnonfinite: skip mode skipped steps {skipped} of {STEPS}, model frozen at step "
        f"{skipped[0] - 1}, run completed")
