"""The R1 recipe on two processes equals the recipe on one, through a SIGKILL inside asynchronous
GRPO.

tests/reliability/r1_tiny_shrunk.py (every stage kind: SFT, a reward model, GRPO scored by it too,
asynchronous GRPO, the compute-matched SFT control, rejection sampling, SFT on the sampled data,
distillation, on-policy distillation, with evaluations) runs twice side by side: once as one process
with 4 CPU devices, once as two processes with 2 devices each (gloo collectives, one global mesh of
4). Here asynchronous GRPO samples on the training mesh (`rollout_devices=0`): on devices of their
own, the sampler's collectives and the update's would run at once, and gloo mixes concurrent
collectives up (measured: an aborted run), so the launcher refuses that on CPU with several
processes; the kill test covers sampling devices of its own in one process. The two-process run is
interrupted inside asynchronous GRPO: process 1 is SIGKILLed after a checkpoint and a later step (a
rollout for the next step already dispatched), process 0 notices through the coordination service's
heartbeat and exits, and both are started again with the same workdir. The restarted run resumes the
stage from its checkpoint and finishes. Then summary.json (every stage's evaluation and final
metrics) and every logged step (losses, rewards, mismatch metrics) must equal the one-process run's
within float tolerance: same data in the same order, the same rollouts, the same decisions, whatever
the number of processes.
"""

import json
import math
import os
import signal
import time

import portpicker

import launcher
from test_kill_recipe import ORDER, Watch, past_a_checkpoint, train_steps

ARGS = ["--config", launcher.SHRUNK_R1, "--config.stages.grpo_async.rollout_devices=0"]
TIMEOUT = 900
HEARTBEAT_S = "20"
RTOL, ATOL = 1e-4, 1e-5


def _pair(workdir, log):
  coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
  return [launcher.start([*ARGS, "--workdir", workdir, "--coordinator", coordinator,
                          "--num_processes", "2", "--process_id", str(i)], f"{log}.{i}",
                         devices=2, R1JAX_HEARTBEAT_TIMEOUT=HEARTBEAT_S)
          for i in range(2)]


def _wait(proc, deadline, log):
  try:
    return proc.wait(timeout=max(deadline - time.time(), 1))
  except Exception:
    raise AssertionError(("still running", launcher.tail(log))) from None


def _close(values, expected, where):
  if isinstance(expected, dict):
    assert sorted(values) == sorted(expected), where
    for k in expected:
      _close(values[k], expected[k], f"{where}.{k}")
  elif isinstance(expected, list):
    assert isinstance(values, list) and len(values) == len(expected), where
    for i, (v, e) in enumerate(zip(values, expected)):
      _close(v, e, f"{where}[{i}]")
  elif isinstance(expected, float) and isinstance(values, float):
    assert math.isclose(values, expected, rel_tol=RTOL, abs_tol=ATOL), (where, values, expected)
  else:
    assert values == expected, (where, values, expected)


def _records(workdir):
  """(stage, step, is a training record) -> the last record logged for it, timing dropped."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      out[(rec["stage"], rec["step"], "loss" in rec)] = {
          k: v for k, v in rec.items() if k not in launcher.TIMING_KEYS}
  return out


def _summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary.pop("run")["processes"] in (1, 2)  # how it ran: the command, the topology
  for entry in summary["stages"]:
    entry.pop("wall_seconds")
    entry["metrics"] = {k: v for k, v in entry["metrics"].items()
                        if k not in launcher.TIMING_KEYS}
  return summary


def test_two_processes_killed_inside_async_grpo_resume_and_equal_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  deadline = time.time() + TIMEOUT
  reference = launcher.start([*ARGS, "--workdir", one], one + ".log", devices=4)
  procs = _pair(two, two + ".log")
  watch = Watch(two)
  try:
    while not (os.path.exists(two) and past_a_checkpoint(watch, "grpo_async")):
      for i, p in enumerate(procs):
        assert p.poll() is None, (f"process {i} exited (rc {p.returncode}) before the kill",
                                  launcher.tail(f"{two}.log.{i}"))
      assert time.time() < deadline, "grpo_async checkpoint not reached"
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    assert procs[1].wait() == -signal.SIGKILL
    rc = _wait(procs[0], killed_at + 180, f"{two}.log.0")
    assert rc != 0, "process 0 finished although its peer was killed"
    survivor_exit_s = time.time() - killed_at
    first = _summary_or_none(two)
    procs = _pair(two, two + ".log.restart")
    for i, p in enumerate(procs):
      assert _wait(p, deadline, f"{two}.log.restart.{i}") == 0, launcher.tail(
          f"{two}.log.restart.{i}")
    assert _wait(reference, deadline, one + ".log") == 0, launcher.tail(one + ".log")
  finally:
    for p in procs + [reference]:
      if p.poll() is None:
        p.kill()
        p.wait()

  restarted = launcher.tail(f"{two}.log.restart.0", 100_000)
  assert "[cold_start] already complete; loaded its output" in restarted
  assert "[grpo_async] resumed from step" in restarted, restarted[-3000:]
  assert first is not None
  assert [e["name"] for e in first["stages"]] == ["cold_start", "rm", "grpo"]

  got, want = _summary(two), _summary(one)
  assert [e["name"] for e in want["stages"]] == list(ORDER)
  _close(got, want, "summary")
  evaluated = {e["name"] for e in want["stages"] if "eval" in e}
  # the policy, the students, and the reward model (on held-out pairs)
  assert {"rm", "sft_rs", "distill", "distill_opd"} <= evaluated, evaluated
  got_recs, want_recs = _records(two), _records(one)
  assert sorted(got_recs) == sorted(want_recs)
  for stage, steps in train_steps(one).items():
    logged = sorted(step for s, step, train in want_recs if s == stage and train)
    assert logged == list(range(1, steps + 1)), (stage, logged)
  for key in want_recs:
    _close(got_recs[key], want_recs[key], str(key))
  print(f"\nmultiprocess recipe: 2 x 2 devices == 1 x 4 devices over {len(want_recs)} logged "
        f"records; survivor exited {survivor_exit_s:.0f} s after its peer's SIGKILL")


def _summary_or_none(workdir):
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
