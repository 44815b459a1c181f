"""SIGKILL anywhere in the R1 recipe, restart with the same workdir: the run ends exactly where an
uninterrupted one does.

One launcher run of the shrunk recipe (tests/reliability/r1_tiny_shrunk.py: cold-start SFT -> a
reward model -> GRPO, which the reward model scores -> asynchronous GRPO on devices of its own ->
the compute-matched SFT control -> rejection sampling -> SFT on the sampled data -> distillation
-> on-policy distillation; every stage of
configs/r1_tiny.py but the second GRPO, and configs/r1_tiny_onpolicy.py's on-policy stage) is
SIGKILLed at six points in turn and restarted after each: inside SFT, between two stages, inside
GRPO, inside asynchronous GRPO (with a rollout dispatched for the step after its checkpoint),
inside rejection sampling and inside on-policy distillation. Both runs have 4 CPU devices: 2
sample for asynchronous GRPO, and every stage trains on the other 2.
An uninterrupted reference run of the same config runs beside it. Compared afterwards: summary.json
(metrics and evaluation), every training stage's output params (bit for bit), every logged step
(a step redone after a restart must log what it logged the first time: same batch, same update),
the generated dataset samples/rejection.jsonl and the sampling stages' samples/*.jsonl. A dataset write
SIGKILLed half-way is tested on its own, deterministically.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import launcher
from r1jax.data import pipeline as data_pipeline

ARGS = ["--config", launcher.SHRUNK_R1]
ORDER = ("cold_start", "rm", "grpo", "grpo_async", "sft_control", "rejection", "sft_rs",
         "distill", "distill_opd")
DEVICES = 4  # the shrunk recipe's asynchronous GRPO samples on 2 of them
# as in r1_tiny_shrunk.py; sft_control's steps come from grpo's FLOPs (capped by max_steps=4),
# so the run's summary.json says how many it took
TRAIN_STEPS = {"cold_start": 4, "rm": 3, "grpo": 4, "grpo_async": 4, "sft_control": None,
               "sft_rs": 3, "distill": 3, "distill_opd": 4}


def train_steps(workdir) -> dict:
  """Each training stage's step count, as TRAIN_STEPS or as the run recorded it."""
  with open(os.path.join(workdir, "summary.json")) as f:
    recorded = {e["name"]: e.get("steps") for e in json.load(f)["stages"]}
  out = {k: v or recorded[k] for k, v in TRAIN_STEPS.items()}
  assert 1 <= out["sft_control"] <= 4, out
  return out
TIMEOUT = 600


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


@pytest.fixture
def runs(tmp_path_factory):
  """The reference run and the interrupted one side by side. At each kill point in turn the
  interrupted run's launcher is SIGKILLed and at once started again with the same workdir; what
  the workdir held at the kill is recorded, and what each process printed is kept apart."""
  base = tmp_path_factory.mktemp("kill_recipe")
  ref_dir, work_dir = str(base / "reference"), str(base / "interrupted")
  start_time = time.time()
  ref = launcher.start([*ARGS, "--workdir", ref_dir], ref_dir + ".log", devices=DEVICES)
  watch = Watch(work_dir)
  proc = launcher.start([*ARGS, "--workdir", work_dir], work_dir + ".log", devices=DEVICES)
  kills, watches = [], [watch]
  deadline = time.time() + TIMEOUT
  try:
    for name, stage, condition in KILL_POINTS:
      while not (os.path.exists(work_dir) and condition(watch)):
        assert proc.poll() is None, (f"run exited (rc {proc.returncode}) before the kill point "
                                     f"{name!r}", launcher.tail(watch.log_path))
        assert time.time() < deadline, ("kill point not reached", name)
        time.sleep(0.02)
      proc.send_signal(signal.SIGKILL)
      rc = proc.wait()
      kills.append(dict(
          name=name, stage=stage, rc=rc, completed=completed(work_dir),
          checkpoints=committed_checkpoints(work_dir, stage) if stage else []))
      watch = Watch(work_dir)
      watches.append(watch)
      proc = launcher.start([*ARGS, "--workdir", work_dir], work_dir + ".log",
                            devices=DEVICES)
    for p, log in ((proc, watch.log_path), (ref, ref_dir + ".log")):
      rc = p.wait(timeout=max(deadline - time.time(), 1))
      assert rc == 0, (rc, launcher.tail(log))
    yield dict(reference=ref_dir, workdir=work_dir, kills=kills, watches=watches,
               seconds=time.time() - start_time)
  finally:
    for p in (proc, ref):
      if p.poll() is None:
        p.kill()
        p.wait()


def test_sigkill_at_six_points_then_restart_equals_the_uninterrupted_run(runs):
  """One test over the two runs (a module fixture shared by several tests would run twice when
  pytest-xdist puts them on different workers)."""
  check_every_kill_landed_where_planned_and_the_restart_recovered(runs)
  check_summary_and_final_params_equal_the_uninterrupted_run(runs)
  check_no_stage_repeats_or_skips_data(runs)
  check_generated_files_are_whole_and_equal_and_no_temporary_files_are_left(runs)
  check_the_kl_reference_is_where_the_stage_says(runs)


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
        f"({runs['seconds']:.0f} s for the reference and the interrupted run side by side):")
  for kill in kills:
    print(f"  {kill['name']}: completed then {kill['completed']}, "
          f"checkpoints of the stage {kill['checkpoints']}")


def summary(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    stages = json.load(f)["stages"]
  for entry in stages:
    entry.pop("wall_seconds")
    entry["metrics"] = {k: v for k, v in entry["metrics"].items()
                        if k not in launcher.TIMING_KEYS}
  return stages


def output_params(workdir, stage):
  restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "outputs", stage, "params"))
  return jax.tree.map(np.asarray, restored)


def check_summary_and_final_params_equal_the_uninterrupted_run(runs):
  got, want = summary(runs["workdir"]), summary(runs["reference"])
  assert [e["name"] for e in got] == list(ORDER)
  assert got == want
  assert "accuracy" in got[-1]["eval"]  # the last stage was evaluated
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
  kept = next(e for e in summary(runs["workdir"]) if e["name"] == "rejection")["metrics"]
  assert len(rows) == kept["num_kept"] > 0
  records = data_pipeline.read_records(path, prompt_field="question",
                                       completion_field="completion", answer_field="answer")
  assert len(records) == len(rows)
  leftovers = [os.path.join(d, n) for d, dirs, files in os.walk(runs["workdir"])
               for n in files + dirs if ".tmp" in n or "tmp-" in n]
  assert not leftovers, leftovers


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
