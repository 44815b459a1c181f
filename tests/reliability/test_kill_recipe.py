"""SIGKILL anywhere in the R1 recipe, on one process or two, restart with the same workdir: the run
ends where an uninterrupted one does.

Three runs of the shrunk recipe (tests/reliability/r1_tiny_shrunk.py: cold-start SFT -> a reward
model -> GRPO, which the reward model scores -> asynchronous GRPO -> the compute-matched SFT
control -> rejection sampling -> SFT on the sampled data -> distillation -> on-policy
distillation; every stage of configs/r1_tiny.py but the second GRPO, and
configs/r1_tiny_onpolicy.py's on-policy stage), each with 4 CPU devices in all, share one
uninterrupted reference (one process):
- one process, SIGKILLed at six points in turn and restarted after each: inside SFT, between two
  stages, inside GRPO, inside asynchronous GRPO (a rollout for the step after its checkpoint
  already dispatched), inside rejection sampling and inside on-policy distillation. Its params,
  summary.json, every logged step (a step redone after a restart logs what it logged the first
  time: same batch, same update) and generated files must equal the reference's bit for bit.
- two processes with 2 devices each (gloo collectives, one global mesh of 4): process 1 is
  SIGKILLed inside asynchronous GRPO after a checkpoint and a later step, process 0 notices
  through the coordination service's heartbeat and exits, both are started again. summary.json
  and every logged step must equal the reference's within float tolerance: same data in the same
  order, the same rollouts, the same decisions, whatever the number of processes.
Asynchronous GRPO samples on the training mesh here (`rollout_devices=0`): on devices of their
own, the sampler's collectives and the update's would run at once, and gloo mixes concurrent
collectives up (measured: an aborted run), so the launcher refuses that on CPU with several
processes. tests/test_grpo_async.py kills a run sampling on devices of its own.
The interrupted one-process run starts once the reference has finished GRPO, so that it finds the
reference's compiled programs in the shared compilation cache (one compile of each, not two);
the two-process run compiles its own and runs beside them. A dataset write SIGKILLed half-way is
tested on its own, deterministically.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest

import launcher
from r1jax.data import pipeline as data_pipeline

ARGS = ["--config", launcher.SHRUNK_R1, "--config.stages.grpo_async.rollout_devices=0"]
ORDER = ("cold_start", "rm", "grpo", "grpo_async", "sft_control", "rejection", "sft_rs",
         "distill", "distill_opd")
DEVICES = 4
# as in r1_tiny_shrunk.py; sft_control's steps come from grpo's FLOPs (capped by max_steps=4),
# so the run's summary.json says how many it took
TRAIN_STEPS = {"cold_start": 4, "rm": 3, "grpo": 4, "grpo_async": 4, "sft_control": None,
               "sft_rs": 3, "distill": 3, "distill_opd": 4}
TIMEOUT = 900
HEARTBEAT_S = "20"
RTOL, ATOL = 1e-4, 1e-5  # two processes against one: gloo's reductions round differently


def train_steps(workdir) -> dict:
  """Each training stage's step count, as TRAIN_STEPS or as the run recorded it."""
  with open(os.path.join(workdir, "summary.json")) as f:
    recorded = {e["name"]: e.get("steps") for e in json.load(f)["stages"]}
  out = {k: v or recorded[k] for k, v in TRAIN_STEPS.items()}
  assert 1 <= out["sft_control"] <= 4, out
  return out


class Watch:
  """What one launcher process has done so far: metrics records and log text it wrote."""

  def __init__(self, workdir):
    self.workdir = workdir
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.log_path = workdir + ".log"
    self.metrics_from = _size(self.metrics_path)
    self.log_from = _size(self.log_path)

  def records(self):
    with open(self.metrics_path) as f:
      f.seek(self.metrics_from)
      text = f.read()
    complete = text[:text.rfind("\n") + 1]  # a line may be half-way through being appended
    return [json.loads(line) for line in complete.splitlines() if line.strip()]

  def logged(self, stage):
    """The highest training step of `stage` this process logged (0 if none)."""
    if not os.path.exists(self.metrics_path):
      return 0
    return max([r["step"] for r in self.records() if r["stage"] == stage and "loss" in r],
               default=0)

  def log(self):
    with open(self.log_path, errors="replace") as f:
      f.seek(self.log_from)
      return f.read()

  def completed(self):
    return completed(self.workdir)


def _size(path):
  return os.path.getsize(path) if os.path.exists(path) else 0


def completed(workdir):
  try:
    with open(os.path.join(workdir, "progress.json")) as f:
      return json.load(f)["completed"]
  except FileNotFoundError:
    return []


def committed_checkpoints(workdir, stage):
  """Steps of the stage's finished checkpoints (orbax renames a save into place when done)."""
  path = os.path.join(workdir, "checkpoints", stage)
  return sorted(int(s) for s in os.listdir(path) if s.isdigit()) if os.path.isdir(path) else []


def past_a_checkpoint(w, stage):
  """The process logged a step of `stage` after the stage's newest committed checkpoint."""
  saved = committed_checkpoints(w.workdir, stage)
  return bool(saved) and w.logged(stage) > saved[-1]


# Each point: (name, stage it interrupts or None, condition on the running process's Watch).
# Checkpoints are saved asynchronously every 2 steps; the kills inside training stages wait until
# one is committed and a later step is logged, so the restart resumes from it and redoes a step.
KILL_POINTS = [
    ("inside SFT (a step logged after a committed checkpoint)", "cold_start",
     lambda w: past_a_checkpoint(w, "cold_start")),
    ("between stages (cold_start recorded complete)", None,
     lambda w: "cold_start" in w.completed()),
    ("inside GRPO (a step logged after a committed checkpoint)", "grpo",
     lambda w: past_a_checkpoint(w, "grpo")),
    ("inside asynchronous GRPO (a step logged after a committed checkpoint)", "grpo_async",
     lambda w: past_a_checkpoint(w, "grpo_async")),
    ("inside rejection sampling (its stage started)", "rejection",
     lambda w: "== stage rejection" in w.log()),
    ("inside on-policy distillation (a step logged after a committed checkpoint)", "distill_opd",
     lambda w: past_a_checkpoint(w, "distill_opd")),
]


def _interrupted_one_process(ref_dir, work_dir, started, kills, watches):
  """The one-process run: waits for the reference to finish GRPO, then is SIGKILLed at each kill
  point in turn and at once started again with the same workdir; what the workdir held at each
  kill is recorded, and what each process printed is kept apart. A generator: it yields while it
  waits."""
  while "grpo" not in completed(ref_dir):
    yield
  watch = Watch(work_dir)
  watches.append(watch)
  proc = started(launcher.start([*ARGS, "--workdir", work_dir], watch.log_path, devices=DEVICES))
  for name, stage, condition in KILL_POINTS:
    while not (os.path.exists(work_dir) and condition(watch)):
      assert proc.poll() is None, (f"run exited (rc {proc.returncode}) before the kill point "
                                   f"{name!r}", launcher.tail(watch.log_path))
      yield
    proc.send_signal(signal.SIGKILL)
    rc = proc.wait()
    kills.append(dict(
        name=name, stage=stage, rc=rc, completed=completed(work_dir),
        checkpoints=committed_checkpoints(work_dir, stage) if stage else []))
    watch = Watch(work_dir)
    watches.append(watch)
    proc = started(launcher.start([*ARGS, "--workdir", work_dir], watch.log_path,
                                  devices=DEVICES))
  while proc.poll() is None:
    yield
  assert proc.returncode == 0, (proc.returncode, launcher.tail(watch.log_path))


def _pair(workdir, log, started):
  coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
  return [started(launcher.start(
              [*ARGS, "--workdir", workdir, "--coordinator", coordinator, "--num_processes", "2",
               "--process_id", str(i)], f"{log}.{i}", devices=2,
              R1JAX_HEARTBEAT_TIMEOUT=HEARTBEAT_S))
          for i in range(2)]


def _interrupted_two_processes(two, started, out):
  """Two processes; process 1 SIGKILLed inside asynchronous GRPO, both started again."""
  procs = _pair(two, two + ".log", started)
  watch = Watch(two)
  while not (os.path.exists(two) and past_a_checkpoint(watch, "grpo_async")):
    for i, p in enumerate(procs):
      assert p.poll() is None, (f"process {i} exited (rc {p.returncode}) before the kill",
                                launcher.tail(f"{two}.log.{i}"))
    yield
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  assert procs[1].wait() == -signal.SIGKILL
  while procs[0].poll() is None:
    assert time.time() < killed_at + 180, ("process 0 still running after its peer's SIGKILL",
                                           launcher.tail(f"{two}.log.0"))
    yield
  assert procs[0].returncode != 0, "process 0 finished although its peer was killed"
  out["survivor_exit_s"] = time.time() - killed_at
  out["first"] = _json_or_none(os.path.join(two, "summary.json"))
  procs = _pair(two, two + ".log.restart", started)
  while any(p.poll() is None for p in procs):
    yield
  for i, p in enumerate(procs):
    assert p.returncode == 0, launcher.tail(f"{two}.log.restart.{i}")


def _finished(proc, log):
  while proc.poll() is None:
    yield
  assert proc.returncode == 0, (proc.returncode, launcher.tail(log))


@pytest.fixture
def runs(tmp_path_factory):
  """The reference, the interrupted one-process run and the interrupted two-process run, driven
  side by side (each a generator, stepped in turn until all have finished)."""
  base = tmp_path_factory.mktemp("kill_recipe")
  ref_dir, work_dir, two = (str(base / n) for n in ("reference", "interrupted", "two"))
  procs, kills, watches, two_out = [], [], [], {}

  def started(proc):
    procs.append(proc)
    return proc

  start_time = time.time()
  deadline = start_time + TIMEOUT
  ref = started(launcher.start([*ARGS, "--workdir", ref_dir], ref_dir + ".log", devices=DEVICES))
  scripts = [_finished(ref, ref_dir + ".log"),
             _interrupted_one_process(ref_dir, work_dir, started, kills, watches),
             _interrupted_two_processes(two, started, two_out)]
  try:
    while scripts:
      scripts = [s for s in scripts if next(s, StopIteration) is not StopIteration]
      assert time.time() < deadline, ("runs not finished", launcher.tail(ref_dir + ".log"))
      time.sleep(0.02)
    yield dict(reference=ref_dir, workdir=work_dir, kills=kills, watches=watches, two=two,
               seconds=time.time() - start_time, **two_out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_sigkill_on_one_process_or_two_then_restart_equals_the_uninterrupted_run(runs):
  """One test over the three runs (a module fixture shared by several tests would run twice when
  pytest-xdist puts them on different workers)."""
  check_every_kill_landed_where_planned_and_the_restart_recovered(runs)
  check_summary_and_final_params_equal_the_uninterrupted_run(runs)
  check_no_stage_repeats_or_skips_data(runs)
  check_generated_files_are_whole_and_equal_and_no_temporary_files_are_left(runs)
  check_the_kl_reference_is_where_the_stage_says(runs)
  check_asynchronous_grpo_refilled_flat_groups(runs)
  check_two_processes_resumed_and_equal_one_process(runs)


def check_every_kill_landed_where_planned_and_the_restart_recovered(runs):
  kills, watches = runs["kills"], runs["watches"]
  assert len(kills) == len(KILL_POINTS)
  recovered = 0
  for kill in kills[0], kills[2], kills[3], kills[5]:  # the kills inside training stages

    assert kill["checkpoints"], kill
  for i, kill in enumerate(kills):
    assert kill["rc"] == -signal.SIGKILL, kill
    after = watches[i + 1].log()  # what the restarted process printed
    stage = kill["stage"]
    if stage is None:  # between stages: the finished stage is loaded, not redone
      assert kill["completed"] == ["cold_start"], kill
      assert "[cold_start] already complete; loaded its output" in after, after[-2000:]
      assert "== stage cold_start" not in after
    else:
      assert stage not in kill["completed"], kill  # the kill landed inside the stage
      assert all(s in kill["completed"] for s in ORDER[:ORDER.index(stage)]), kill
      if kill["checkpoints"]:
        assert f"[{stage}] resumed from step {kill['checkpoints'][-1]}" in after, after[-2000:]
      else:
        assert f"[{stage}] resumed" not in after
      assert f"== stage {stage}" in after
    recovered += 1
  assert "[rejection] kept" in watches[-2].log()  # the restart after it redid rejection sampling
  print(f"\nkill_recipe: {len(kills)} SIGKILLs injected, {recovered} recovered by restarting "
        f"({runs['seconds']:.0f} s for the three runs):")
  for kill in kills:
    print(f"  {kill['name']}: completed then {kill['completed']}, "
          f"checkpoints of the stage {kill['checkpoints']}")


def summary(workdir):
  """summary.json without what says how and when it ran (the command, the topology, times)."""
  with open(os.path.join(workdir, "summary.json")) as f:
    out = json.load(f)
  assert out.pop("run")["processes"] in (1, 2)
  for entry in out["stages"]:
    entry.pop("wall_seconds")
    entry["metrics"] = {k: v for k, v in entry["metrics"].items()
                        if k not in launcher.TIMING_KEYS}
  return out


def output_params(workdir, stage):
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "outputs", stage, "params"))
  return jax.tree.map(np.asarray, restored)


def check_summary_and_final_params_equal_the_uninterrupted_run(runs):
  got, want = summary(runs["workdir"]), summary(runs["reference"])
  assert [e["name"] for e in got["stages"]] == list(ORDER)
  assert got == want
  assert "accuracy" in got["stages"][-1]["eval"]  # the last stage was evaluated
  for stage in TRAIN_STEPS:
    ref = jax.tree.leaves_with_path(output_params(runs["reference"], stage))
    leaves = jax.tree.leaves(output_params(runs["workdir"], stage))
    assert len(ref) == len(leaves) > 10
    for (path, a), b in zip(ref, leaves):
      np.testing.assert_array_equal(b, a, err_msg=f"{stage} {jax.tree_util.keystr(path)}")


def check_the_kl_reference_is_where_the_stage_says(runs):
  """grpo's reference is the policy it starts from, so its first update's KL is 0; grpo_async
  (ref_from="cold_start") starts from grpo's policy with the cold start as its reference, so
  its first KL is not."""
  first_kl = {stage: recs[0]["kl"] for (stage, step, train), recs in
              metric_records(runs["reference"]).items() if train and step == 1 and
              stage in ("grpo", "grpo_async")}
  assert first_kl["grpo"] == 0.0 and first_kl["grpo_async"] > 1e-4, first_kl


def check_asynchronous_grpo_refilled_flat_groups(runs):
  """grpo_async's dynamic sampling took groups from the candidate batch each rollout samples
  beside its batch: one candidate batch per step at most (max_refills=1), and some flat group
  refilled (measured: 2, 1, 1, 0 groups at steps 1-4)."""
  recs = [r[0] for (stage, _, train), r in metric_records(runs["reference"]).items()
          if stage == "grpo_async" and train]
  assert len(recs) == 4 and all(r["refills"] <= 1 for r in recs), recs
  assert sum(r["refilled_groups"] for r in recs) > 0, recs


def metric_records(workdir):
  """(stage, step) -> every metrics.jsonl record logged for it, timing fields dropped."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)  # a half-written line would fail here
      key = (rec["stage"], rec["step"], "loss" in rec)
      out.setdefault(key, []).append({k: v for k, v in rec.items()
                                      if k not in launcher.TIMING_KEYS})
  return out


def check_no_stage_repeats_or_skips_data(runs):
  """Every training step of every stage is logged; a step redone after a restart (the steps
  after the newest checkpoint) logs exactly what it logged the first time, and what the
  uninterrupted run logged, so it drew the same batch and made the same update."""
  got, want = metric_records(runs["workdir"]), metric_records(runs["reference"])
  assert sorted(got) == sorted(want)
  for stage, steps in train_steps(runs["reference"]).items():
    logged = sorted(step for s, step, train in got if s == stage and train)
    assert logged == list(range(1, steps + 1)), (stage, logged)
  redone = 0
  for key, records in got.items():
    assert all(r == records[0] for r in records), key  # a redone step repeats itself exactly
    assert records[0] == want[key][-1], key
    redone += len(records) - 1
  assert all(len(r) == 1 for r in want.values())  # the reference logs each step once
  assert redone > 0  # some steps after a checkpoint were redone (and matched)
  print(f"\nkill_recipe: {redone} logged steps redone after restarts, each identical")


def check_generated_files_are_whole_and_equal_and_no_temporary_files_are_left(runs):
  """samples/rejection.jsonl (a dataset the next stage trains on), samples/grpo.jsonl and
  grpo_async.jsonl (the GRPO stages' logged samples) and samples/distill_opd.jsonl (the on-policy
  student's) are whole and what the uninterrupted run wrote; nothing half-written or temporary
  is left anywhere in the run directory."""
  for name in ("grpo.jsonl", "grpo_async.jsonl", "rejection.jsonl", "distill_opd.jsonl"):
    with open(os.path.join(runs["workdir"], "samples", name)) as f, \
         open(os.path.join(runs["reference"], "samples", name)) as g:
      assert f.read() == g.read(), name
  path = os.path.join(runs["workdir"], "samples", "rejection.jsonl")
  with open(path, "rb") as f, open(os.path.join(runs["reference"], "samples",
                                                "rejection.jsonl"), "rb") as g:
    data = f.read()
    assert data == g.read()
  assert data.endswith(b"\n")
  rows = [json.loads(line) for line in data.decode().splitlines()]
  kept = next(e for e in summary(runs["workdir"])["stages"] if e["name"] == "rejection")["metrics"]
  assert len(rows) == kept["num_kept"] > 0
  records = data_pipeline.read_records(path, prompt_field="question",
                                       completion_field="completion", answer_field="answer")
  assert len(records) == len(rows)
  leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(runs["workdir"])
               for n in files + dirs if ".tmp" in n or "tmp-" in n]
  assert not leftovers, leftovers


def check_two_processes_resumed_and_equal_one_process(runs):
  """The restarted pair loaded what was complete and resumed asynchronous GRPO from its
  checkpoint; its summary.json and every logged step equal the reference's within tolerance."""
  two = runs["two"]
  restarted = launcher.tail(f"{two}.log.restart.0", 100_000)
  assert "[cold_start] already complete; loaded its output" in restarted
  assert "[grpo_async] resumed from step" in restarted, restarted[-3000:]
  assert [e["name"] for e in runs["first"]["stages"]] == ["cold_start", "rm", "grpo"]

  got, want = summary(two), summary(runs["reference"])
  _close(got, want, "summary")
  evaluated = {e["name"] for e in want["stages"] if "eval" in e}
  # the policy, the students, and the reward model (on held-out pairs)
  assert {"rm", "sft_rs", "distill", "distill_opd"} <= evaluated, evaluated
  got_recs, want_recs = metric_records(two), metric_records(runs["reference"])
  assert sorted(got_recs) == sorted(want_recs)
  for stage, steps in train_steps(two).items():
    logged = sorted(step for s, step, train in got_recs if s == stage and train)
    assert logged == list(range(1, steps + 1)), (stage, logged)
  for key in want_recs:  # a step redone after the restart: the record it logged last
    _close(got_recs[key][-1], want_recs[key][-1], str(key))
  print(f"\nkill_recipe: 2 x 2 devices == 1 x 4 devices over {len(want_recs)} logged records; "
        f"the survivor exited {runs['survivor_exit_s']:.0f} s after its peer's SIGKILL")


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


def _json_or_none(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


WRITER = """
import sys, time
from r1jax.data import pipeline

def records():
  for i in range(2000):
    if i == 1000:  # half-way: the file is open, part of it written; wait to be killed
      print("half-way", flush=True)
      time.sleep(600)
    yield {"question": f"{i}+0", "completion": "x" * 200, "answer": str(i)}

pipeline.write_jsonl(sys.argv[1], records())
"""


def test_a_dataset_write_killed_half_way_leaves_the_previous_file_whole(tmp_path):
  """write_jsonl SIGKILLed half-way through a dataset: the file holds the previous version, whole;
  the temporary file the killed writer left is removed by the next write."""
  path = str(tmp_path / "samples" / "rejection.jsonl")
  old = [{"question": "1+1", "completion": "c", "answer": "2"}] * 3
  data_pipeline.write_jsonl(path, old)
  writer = subprocess.Popen([sys.executable, "-c", WRITER, path], cwd=launcher.ROOT,
                            env=launcher.env(), stdout=subprocess.PIPE, text=True)
  try:
    assert writer.stdout.readline().strip() == "half-way"
    writer.send_signal(signal.SIGKILL)
    assert writer.wait(30) == -signal.SIGKILL
  finally:
    if writer.poll() is None:
      writer.kill()
      writer.wait()
  read = lambda: data_pipeline.read_records(path, prompt_field="question",
                                            completion_field="completion", answer_field="answer")
  assert read() == old
  left = [n for n in os.listdir(tmp_path / "samples") if n != "rejection.jsonl"]
  assert len(left) == 1 and os.path.getsize(tmp_path / "samples" / left[0]) > 0, left
  new = [{"question": "2+2", "completion": "d", "answer": "4"}]
  data_pipeline.write_jsonl(path, new)
  assert read() == new
  assert os.listdir(tmp_path / "samples") == ["rejection.jsonl"]
