"""Exact resume: a run killed mid-stage (SIGKILL, or SIGTERM = preemption) and started again with
the same workdir ends with the same params and metrics, bit for bit, as an uninterrupted run; a
damaged latest checkpoint falls back to the previous complete one with a warning.

The launcher runs as a subprocess on a shrunk configs/sft_tiny.py; the reference and the two
interrupted runs run side by side.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from r1jax.checkpoint import Checkpointer, abstract_like
from r1jax.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 10, 4
ARGS = ["--config", os.path.join(ROOT, "configs", "sft_tiny.py"),
        f"--config.stages.sft.steps={STEPS}", f"--config.checkpoint.every_steps={EVERY}",
        "--config.data.batch_size=8", "--config.data.seq_len=48",
        "--config.data.num_eval_problems=0",  # no eval: the sampler's compile is not under test
        "--config.model.num_hidden_layers=2", "--config.log.every_steps=1",
        "--config.log.plots=False", "--config.log.tensorboard=False"]
TIMEOUT = 300
from r1jax.runlog import TIMING_KEYS


def start(workdir, *extra):
  """The launcher in the background; the test environment (JAX_PLATFORMS, XLA_FLAGS, the shared
  compilation cache from conftest) is passed on explicitly."""
  log = open(os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log"), "ab")
  return subprocess.Popen([sys.executable, "-m", "r1jax.launch", *ARGS, *extra,
                           "--workdir", workdir],
                          cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)


def log_of(workdir):
  with open(workdir + ".log") as f:
    return f.read()[-3000:]


def finish(proc, workdir, expect=0):
  rc = proc.wait(timeout=TIMEOUT)
  assert rc == expect, (rc, log_of(workdir))


def wait_for_checkpoint(proc, workdir, step):
  """Poll until checkpoints/sft/<step> is committed; the process must still be running."""
  path = os.path.join(workdir, "checkpoints", "sft", str(step))
  deadline = time.time() + TIMEOUT
  while not os.path.exists(os.path.join(path, "commit_success.txt")):
    assert proc.poll() is None, ("exited before checkpoint", step, log_of(workdir))
    assert time.time() < deadline, ("no checkpoint", step, log_of(workdir))
    time.sleep(0.05)


def final_params(workdir):
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "outputs", "sft", "params"))
  return jax.tree.map(np.asarray, restored)


def metrics_by_step(workdir):
  """The last metrics.jsonl record of each training step (a resumed run re-logs the steps
  after its checkpoint), timing fields dropped."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec["stage"] == "sft" and "loss" in rec:
        out[rec["step"]] = {k: v for k, v in rec.items() if k not in TIMING_KEYS}
  return out


def summary_metrics(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    (stage,) = json.load(f)["stages"]
  return {k: v for k, v in stage["metrics"].items() if k not in TIMING_KEYS}


def assert_same_run(workdir, reference):
  ref_params, got_params = final_params(reference), final_params(workdir)
  ref_leaves = jax.tree.leaves_with_path(ref_params)
  assert len(ref_leaves) == len(jax.tree.leaves(got_params)) > 10
  for (path, a), b in zip(ref_leaves, jax.tree.leaves(got_params)):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
  ref_metrics, got_metrics = metrics_by_step(reference), metrics_by_step(workdir)
  assert sorted(ref_metrics) == sorted(got_metrics) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert got_metrics[step] == ref_metrics[step], step
  assert summary_metrics(workdir) == summary_metrics(reference)
  assert ref_metrics[STEPS]["loss"] < ref_metrics[1]["loss"]  # it trained


def checkpoint_steps(workdir):
  path = os.path.join(workdir, "checkpoints", "sft")
  return sorted(int(s) for s in os.listdir(path) if s.isdigit()) if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Three launcher runs side by side (the machine's cores are otherwise idle while a process
  imports, traces and saves): the uninterrupted reference; one SIGKILLed once its step-8
  checkpoint is committed; one sent SIGTERM once its first checkpoint is committed. Each
  interrupted run is restarted with the same workdir as soon as it has exited; what its workdir
  held at that moment is recorded for the tests."""
  base = tmp_path_factory.mktemp("resume")
  ref_dir = str(base / "uninterrupted")
  procs = {"reference": start(ref_dir)}
  plan = {"killed": (8, signal.SIGKILL), "preempted": (EVERY, signal.SIGTERM)}
  # the killed run saves synchronously, so the kill lands right after the step-8 checkpoint (an
  # async save may commit steps later); the others save asynchronously (the default)
  extra = {"killed": ("--config.checkpoint.async_save=False",), "preempted": ()}
  dirs = {name: str(base / name) for name in plan}
  procs.update({name: start(d, *extra[name]) for name, d in dirs.items()})
  seen, signalled = {}, set()
  deadline = time.time() + TIMEOUT
  try:
    while len(seen) < len(plan):  # never block on one run: the other may be due its signal
      for name, (step, sig) in plan.items():
        proc, workdir = procs[name], dirs[name]
        if name in seen:
          continue
        committed = os.path.join(workdir, "checkpoints", "sft", str(step), "commit_success.txt")
        if name not in signalled and proc.poll() is None and os.path.exists(committed):
          proc.send_signal(sig)
          signalled.add(name)
        if proc.poll() is None:
          continue
        # exited (after the signal, or on its own before the checkpoint: the test reports it)
        metrics_path = os.path.join(workdir, "metrics.jsonl")
        seen[name] = dict(
            rc=proc.returncode, log=log_of(workdir), checkpoints=checkpoint_steps(workdir),
            logged=max(metrics_by_step(workdir)) if os.path.exists(metrics_path) else None,
            stage_done=os.path.exists(os.path.join(workdir, "progress.json")) or
            os.path.exists(os.path.join(workdir, "outputs")))
        procs[name] = start(workdir, *extra[name])
      assert time.time() < deadline, "runs did not reach their checkpoints in time"
      time.sleep(0.02)
    yield {"reference": (procs["reference"], ref_dir),
           **{name: (procs[name], dirs[name], seen[name]) for name in plan}}
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_sigkill_mid_stage_then_resume_equals_uninterrupted(runs):
  proc, workdir, at_kill = runs["killed"]
  assert at_kill["rc"] == -signal.SIGKILL, at_kill
  # killed mid-stage: right after the step-8 checkpoint, the stage not complete
  assert at_kill["checkpoints"] == [4, 8] and not at_kill["stage_done"], at_kill
  assert 8 <= at_kill["logged"] < STEPS, at_kill
  finish(proc, workdir)
  assert "[sft] resumed from step 8" in log_of(workdir)
  ref_proc, ref_dir = runs["reference"]
  finish(ref_proc, ref_dir)
  assert_same_run(workdir, ref_dir)


def test_sigterm_saves_exits_143_and_restart_completes(runs):
  proc, workdir, at_term = runs["preempted"]
  assert at_term["rc"] == 143, at_term
  assert "SIGTERM: saved step" in at_term["log"]
  saved = at_term["checkpoints"]
  assert saved and EVERY <= saved[-1] < STEPS, at_term  # saved where it stopped, mid-stage
  assert saved[-1] == at_term["logged"], at_term  # the last step it finished is the one saved
  assert not at_term["stage_done"], at_term
  finish(proc, workdir)
  assert f"[sft] resumed from step {saved[-1]}" in log_of(workdir)
  ref_proc, ref_dir = runs["reference"]
  finish(ref_proc, ref_dir)
  assert_same_run(workdir, ref_dir)


# ----------------------------------------------------------------------------- fallback

def _state(x):
  return {"params": {"w": jnp.full((4, 3), x, jnp.float32)}, "step": jnp.asarray(int(x))}


def test_damaged_latest_checkpoint_falls_back_to_previous_with_warning(tmp_path, caplog):
  directory = str(tmp_path / "ckpt")
  ckpt = Checkpointer(directory, keep=3, async_save=False)
  for step in (4, 8):
    ckpt.save(step, _state(step), extra={"data": {"pos": step}})
  ckpt.close()
  # truncate every file of the latest checkpoint's state (a disk that filled up, a bad copy)
  damaged = os.path.join(directory, "8", "state")
  for dirpath, _, files in os.walk(damaged):
    for name in files:
      with open(os.path.join(dirpath, name), "r+b") as f:
        f.truncate(0)

  ckpt = Checkpointer(directory, keep=3, async_save=False)
  assert ckpt.latest_step() == 8
  with caplog.at_level(logging.WARNING, logger="r1jax.checkpoint.manager"):
    state, extra, step = ckpt.restore(abstract_like(_state(0.0)))
  assert step == 4
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((4, 3), 4.0))
  assert int(state["step"]) == 4 and extra["data"] == {"pos": 4}
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert any("8" in r.getMessage() and "previous" in r.getMessage() for r in warnings), \
      [r.getMessage() for r in caplog.records]
  # asking for the damaged step explicitly is a user error, not a silent fallback
  with pytest.raises(CheckpointError, match="checkpoint 8 cannot be read"):
    ckpt.restore(abstract_like(_state(0.0)), step=8)
  ckpt.close()


def test_all_checkpoints_damaged_restores_nothing(tmp_path, caplog):
  directory = str(tmp_path / "ckpt")
  ckpt = Checkpointer(directory, keep=2, async_save=False)
  ckpt.save(4, _state(4.0))
  ckpt.close()
  for dirpath, _, files in os.walk(os.path.join(directory, "4", "state")):
    for name in files:
      with open(os.path.join(dirpath, name), "r+b") as f:
        f.truncate(0)
  ckpt = Checkpointer(directory, keep=2, async_save=False)
  with caplog.at_level(logging.WARNING, logger="r1jax.checkpoint.manager"):
    assert ckpt.restore(abstract_like(_state(0.0))) is None
  assert any(r.levelno == logging.WARNING for r in caplog.records)
  ckpt.close()
