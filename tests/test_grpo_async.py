"""Asynchronous GRPO (`staleness=k`, optionally on `rollout_devices` of its own): each batch is
sampled k updates behind the policy that learns from it, and sampling on devices of its own
changes nothing but where it runs.

Launcher runs of the shrunk recipe's `grpo_async` stage after a 4-step cold start (two, then
four side by side): synchronous GRPO, asynchronous GRPO sampling on the training devices, and
asynchronous GRPO sampling on 2 devices of its own (SIGKILLed inside the stage with rollouts in
flight there, and restarted); the last two also with LoRA. Each trains on 2 CPU devices. SIGKILLs
at every other point of the recipe, and two processes against one, are in
tests/reliability/test_kill_recipe.py.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from r1jax import parallel, run_config
from r1jax.errors import ConfigError
from r1jax.runlog import TIMING_KEYS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHRUNK = os.path.join(ROOT, "tests", "reliability", "r1_tiny_shrunk.py")
# without the shrunk recipe's asynchronous dynamic sampling: a synchronous run's refills are
# sampled in calls of their own, so the runs below would part at the first step (the kill test
# in tests/reliability covers it)
ARGS = ["--config", SHRUNK, "--config.stage_order=('cold_start','grpo_async')",
        "--config.stages.grpo_async.dynamic_sampling=False"]
STAGE = "grpo_async"


def _shrunk():
  return run_config.from_file(SHRUNK)


def _launch(workdir, devices, *extra):
  env = dict(os.environ)
  flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}"
  log = open(str(workdir) + ".log", "ab")
  return subprocess.Popen([sys.executable, "-m", "r1jax.launch", *ARGS, *extra,
                           "--workdir", str(workdir)], cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT)


def _records(workdir):
  """The stage's logged training records in the order logged, timing fields dropped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  lines = text[:text.rfind("\n") + 1].splitlines()  # the last line may be half-written
  recs = [json.loads(line) for line in lines]
  return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
          for r in recs if r["stage"] == STAGE and "loss" in r]


def _steps(workdir):
  """The stage's training records in step order; a step redone after a restart must have logged
  the same record both times."""
  by_step = {}
  for r in _records(workdir):
    assert by_step.setdefault(r["step"], r) == r, ("a redone step differs", r)
  return [by_step[k] for k in sorted(by_step)]


def _past_a_checkpoint(workdir):
  """A step of the stage logged after its newest committed checkpoint."""
  path = os.path.join(workdir, "checkpoints", STAGE)
  saved = sorted(int(s) for s in os.listdir(path) if s.isdigit()) if os.path.isdir(path) else []
  return bool(saved) and max((r["step"] for r in _records(workdir)), default=0) > saved[-1]


def _kill_and_restart(proc, workdir, devices, *extra, timeout=600):
  """SIGKILL inside the stage (after a checkpoint and a later step, a rollout in flight), then the
  same command again: it resumes from the checkpoint."""
  deadline = time.time() + timeout
  while not _past_a_checkpoint(workdir):
    assert proc.poll() is None, ("exited before the kill", proc.returncode)
    assert time.time() < deadline, "no checkpoint of the stage"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  return _launch(workdir, devices, *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("grpo_async")
  modes = {"sync": (2, "--config.stages.grpo_async.staleness=0",
                    "--config.stages.grpo_async.rollout_devices=0"),
           # the shrunk recipe's grpo_async keeps two rollouts in flight; one here
           "one_behind": (2, "--config.stages.grpo_async.staleness=1",
                          "--config.stages.grpo_async.rollout_devices=0"),
           "async_shared": (2, "--config.stages.grpo_async.rollout_devices=0"),
           # SIGKILLed inside the stage and restarted (below)
           "async_own": (4,),
           # LoRA: only the adapters and biases go to the sampling devices, the base once
           # (the reference is then the frozen base, so not the shrunk recipe's ref_from)
           "lora_shared": (2, "--config.lora.rank=4", "--config.stages.grpo_async.ref_from=",
                           "--config.stages.grpo_async.rollout_devices=0"),
           "lora_own": (4, "--config.lora.rank=4", "--config.stages.grpo_async.ref_from=")}
  # the synchronous run and one LoRA run first; the others then find most of their programs in
  # the shared compilation cache instead of compiling the same ones side by side
  first = ("sync", "lora_shared")
  procs = {name: _launch(base / name, *modes[name]) for name in first}
  try:
    for name in first:
      procs[name].wait(timeout=600)
    procs.update({name: _launch(base / name, devices, *extra)
                  for name, (devices, *extra) in modes.items() if name not in first})
    procs["async_own"] = _kill_and_restart(procs["async_own"], base / "async_own",
                                           *modes["async_own"])
    for name, proc in procs.items():
      rc = proc.wait(timeout=600)
      with open(str(base / name) + ".log", errors="replace") as f:
        log = f.read()
      assert rc == 0, (name, log[-3000:])
      if name == "async_own":
        assert "[grpo_async] resumed from step" in log, log[-3000:]
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  redone = len(_records(base / "async_own")) - len(_steps(base / "async_own"))
  assert redone > 0, "the restart redid no step"
  return {name: _steps(str(base / name)) for name in modes}


def test_sampling_on_devices_of_its_own_changes_nothing_but_where(runs):
  """The same weights, prompts and keys on other devices: every logged value is the same, with
  full fine-tuning (through a SIGKILL inside the stage with rollouts in flight there, and a
  restart) and with LoRA (whose base is merged with the adapters there)."""
  assert len(runs["async_own"]) == len(runs["lora_own"]) == 4
  assert runs["async_own"] == runs["async_shared"]
  assert runs["lora_own"] == runs["lora_shared"]
  assert runs["lora_own"] != runs["async_own"]  # LoRA did train something else


def test_each_batch_is_sampled_one_update_behind(runs):
  """The first batch is the synchronous run's (both sample it from the starting policy). From the
  second step on, the asynchronous batch comes from the weights before the last update, so the
  trainer's log-probs differ from the sampler's; the synchronous run's agree to float rounding.
  (The MoE correction biases move at every step, so the weights change even where a batch has
  no reward signal.)"""
  sync, stale = runs["sync"], runs["one_behind"]
  assert stale[0] == sync[0]
  assert max(r["logp_mismatch_max"] for r in sync) < 1e-5
  assert stale[0]["logp_mismatch_max"] < 1e-5
  for r in stale[1:]:
    assert r["logp_mismatch_mean"] > 1e-4, r
  assert [r["reward"] for r in stale] != [r["reward"] for r in sync] or \
      [r["loss"] for r in stale] != [r["loss"] for r in sync]


def test_two_in_flight_sample_each_batch_two_updates_behind(runs):
  """staleness=2 against staleness=1: batch 0 comes from the starting policy in both, and so
  does batch 1 (at staleness 1 it is sampled before update 0, at 2 it is in flight from the
  start); the steps are the same to the bit. From batch 2 on, staleness 2 samples from the
  weights one update older (before update t-2, not t-1), and the runs part."""
  one, two = runs["one_behind"], runs["async_shared"]
  assert len(one) == len(two) == 4
  assert two[:2] == one[:2]
  for a, b in zip(one[2:], two[2:]):
    assert a != b


def test_the_decoupled_correction_weights_by_the_policy_lag(runs):
  """With is_correction=token_tis the update's ratio is taken against the current policy and
  the sampler's weight is truncated: mismatch_ratio_* report it. Synchronous: all 1."""
  for r in runs["sync"]:
    assert abs(r["mismatch_ratio_mean"] - 1) < 1e-5
  lagged = runs["async_shared"][1:]
  assert any(abs(r["mismatch_ratio_max"] - 1) > 1e-3 for r in lagged)


@pytest.mark.parametrize("change, message", [
    (dict(staleness=-1), r"stages\.grpo_async\.staleness=-1 must be >= 0"),
    (dict(staleness=0), r"stages\.grpo_async\.rollout_devices=2 needs staleness >= 1"),
    (dict(rollout_devices=-1), r"stages\.grpo_async\.rollout_devices=-1 must be >= 0"),
])
def test_bad_async_settings_are_one_clear_config_error(change, message):
  c = _shrunk()
  c.stages.grpo_async.update(**change)
  with pytest.raises(ConfigError, match=message):
    run_config.validate(c)


def test_two_stages_cannot_reserve_different_sampling_devices():
  c = _shrunk()
  c.stages.grpo.update(staleness=1, rollout_devices=4, dynamic_sampling=False, partial_tokens=0)
  with pytest.raises(ConfigError, match=r"different rollout_devices \(\[2, 4\]\)"):
    run_config.validate(c)


def test_the_sampling_devices_are_the_last_of_each_process():
  devices = jax.devices()  # 8 simulated CPU devices, one process (tests/conftest.py)
  train, rollout = parallel.split_devices(2)
  assert train == devices[:6] and rollout == devices[6:]
  assert parallel.split_devices(0) == (devices, [])
  with pytest.raises(ConfigError, match="rollout_devices=8 leaves no training device"):
    parallel.split_devices(8)


def test_several_cpu_processes_sample_on_the_training_mesh(monkeypatch):
  """gloo (XLA:CPU's cross-process collectives) mixes up collectives that run at once on
  disjoint devices, so several CPU processes get one clear error instead of an aborted run."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match="rollout_devices=2 with 2 processes needs collectives"):
    parallel.split_devices(2)


def test_asynchronous_dynamic_sampling_samples_its_candidates_in_the_batchs_call():
  """With staleness >= 1, dynamic_sampling over-samples: each rollout call has the batch's rows
  and max_refills candidate batches' (what `--dry_run` compiles); synchronous GRPO samples its
  refills in calls of their own."""
  c = _shrunk()
  s = run_config.stage_configs(c)["grpo_async"]
  assert (s.staleness, s.dynamic_sampling, s.max_refills, s.rows) == (2, True, 1, 8)
  assert (s.oversample, s.rollout_rows) == (1, 16)
  c.stages.grpo_async.max_refills = 3
  assert run_config.stage_configs(c)["grpo_async"].rollout_rows == 32
  c.stages.grpo_async.dynamic_sampling = False
  assert run_config.stage_configs(c)["grpo_async"].rollout_rows == 8
  sync = run_config.stage_configs(c)["grpo"]
  assert sync.dynamic_sampling and sync.staleness == 0 and sync.rollout_rows == sync.rows
