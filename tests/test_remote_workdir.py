"""A run directory in a bucket: `--workdir gs://BUCKET/PATH`.

Everything goes through the real clients, pointed at a Google Cloud Storage stand-in on localhost
(tests/gcs_emulator.py; no network): epath over gcsfs for the run's files, tensorstore's GCS driver
for orbax's checkpoints, google-cloud-storage for orbax's step listing. A shrunk sft_tiny run is
launched into the bucket, checked, cut back to its first checkpoint and resumed from it; the IO
layer (r1jax.fileio, the run log) is checked in process; a workdir that cannot work is one
`error:` line.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "r1jax-test"
STEPS, EVERY = 4, 2
ARGS = ["--config", os.path.join(ROOT, "configs", "sft_tiny.py"),
        f"--config.stages.sft.steps={STEPS}", f"--config.checkpoint.every_steps={EVERY}",
        "--config.data.batch_size=8", "--config.data.seq_len=48",
        "--config.data.num_eval_problems=0", "--config.model.num_hidden_layers=2",
        "--config.log.every_steps=1", "--config.log.plots=True", "--config.log.tensorboard=True"]
from r1jax.runlog import TIMING_KEYS


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """The emulator in a subprocess with bucket BUCKET, and this process's clients pointed at it;
  yields (url, gcsfs filesystem)."""
  import gcp_storage_emulator  # noqa: F401  (the test extra installs it; fail, never skip)
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  with pytest.MonkeyPatch.context() as mp:
    for k, v in gcs_emulator.environment(url).items():
      mp.setenv(k, v)  # before gcsfs is imported: it reads one of them at import
    import gcsfs
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "gcs_emulator.py"),
                               str(port), BUCKET], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
      deadline = time.time() + 30
      while True:
        try:
          socket.create_connection(("127.0.0.1", port), timeout=1).close()
          break
        except OSError:
          assert server.poll() is None and time.time() < deadline, "no GCS emulator"
          time.sleep(0.1)
      yield url, gcsfs.GCSFileSystem(skip_instance_cache=True)
    finally:
      server.kill()
      server.wait()


def launcher_env(url: str | None = None) -> dict:
  """The test environment (conftest), 2 simulated devices (fewer checkpoint shards), the
  emulator's variables."""
  env = dict(os.environ, **(gcs_emulator.environment(url) if url else {}))
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=2".strip()
  return env


def launch(*args, env, prelude=""):
  """`python -m r1jax.launch ARGS` (with `prelude` run first in the same interpreter)."""
  code = f"{prelude}\nimport sys\nfrom r1jax import launch\nsys.exit(launch.main(sys.argv))"
  return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def read_json(fs, path):
  return json.loads(fs.cat(path))


def metrics_by_step(fs, path):
  """The last metrics.jsonl record of each step, timing fields dropped."""
  out = {}
  for line in fs.cat(path).decode().splitlines():
    rec = json.loads(line)
    out[rec["step"]] = {k: v for k, v in rec.items() if k not in TIMING_KEYS}
  return out


def restore(path):
  return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))


# ----------------------------------------------------------------------------- the whole run

def test_a_run_in_a_bucket_writes_its_files_and_resumes_from_a_checkpoint(gcs):
  url, fs = gcs
  run = f"{BUCKET}/run"
  proc = launch(*ARGS, "--workdir", f"gs://{run}", env=launcher_env(url))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.splitlines()[-1])["workdir"] == f"gs://{run}"

  config = read_json(fs, f"{run}/config.json")
  assert config["stages"]["sft"]["steps"] == STEPS
  first = metrics_by_step(fs, f"{run}/metrics.jsonl")
  assert sorted(first) == list(range(1, STEPS + 1))
  assert first[STEPS]["loss"] < first[1]["loss"]  # it trained
  (stage,) = read_json(fs, f"{run}/summary.json")["stages"]
  assert stage["name"] == "sft" and stage["metrics"]["loss"] == first[STEPS]["loss"]
  assert read_json(fs, f"{run}/progress.json")["completed"] == ["sft"]
  for step in (EVERY, STEPS):  # orbax's commit marker on GCS
    assert fs.exists(f"{run}/checkpoints/sft/{step}/commit_success.txt"), step
  assert fs.cat(f"{run}/plots/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
  assert [p for p in fs.ls(f"{run}/tensorboard") if "tfevents" in p]
  assert not [p for p in fs.find(run) if "tmp" in p.rsplit("/", 1)[-1]]  # no temporary files
  params = restore(f"gs://{run}/outputs/sft/params")

  # back to the first checkpoint, as if killed right after it: the stage resumes from it there
  for path in ("progress.json", "outputs", f"checkpoints/sft/{STEPS}"):
    fs.rm(f"{run}/{path}", recursive=True)
  proc = launch(*ARGS, "--workdir", f"gs://{run}", env=launcher_env(url))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"[sft] resumed from step {EVERY}" in proc.stderr
  resumed = restore(f"gs://{run}/outputs/sft/params")
  for (path, a), b in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
  lines = fs.cat(f"{run}/metrics.jsonl").decode().splitlines()
  assert len(lines) == STEPS + (STEPS - EVERY)  # the resumed run appended its steps
  assert metrics_by_step(fs, f"{run}/metrics.jsonl") == first


# ----------------------------------------------------------------------------- the IO layer

def test_atomic_open_in_a_bucket_replaces_whole_or_not_at_all(gcs):
  from r1jax import fileio
  _, fs = gcs
  path = f"gs://{BUCKET}/io/data.jsonl"
  with fileio.atomic_open(path) as f:
    f.write("one\n")
  with pytest.raises(RuntimeError):
    with fileio.atomic_open(path) as f:
      f.write("two\n")
      raise RuntimeError("the writer failed half-way")
  assert fs.cat(path) == b"one\n"
  fileio.atomic_write_json(path, {"a": "é"})
  assert json.loads(fs.cat(path)) == {"a": "é"}
  assert fs.ls(f"{BUCKET}/io") == [f"{BUCKET}/io/data.jsonl"]  # nothing temporary left


def test_run_log_in_a_bucket_uploads_on_flush_and_continues_the_file(gcs):
  from r1jax.runlog import RunLog
  _, fs = gcs
  workdir = f"gs://{BUCKET}/log"
  log = RunLog(workdir, tensorboard=True)
  log.metrics("sft", 1, {"loss": 2.0})
  log.metrics("sft", 2, {"loss": 1.0})
  assert not fs.exists(f"{BUCKET}/log/metrics.jsonl")  # an object store has no append: buffered
  log.flush()
  lines = fs.cat(f"{BUCKET}/log/metrics.jsonl").splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2]
  assert [p for p in fs.ls(f"{BUCKET}/log/tensorboard") if "tfevents" in p]
  log.plot()
  assert fs.cat(f"{BUCKET}/log/plots/loss.png")[:4] == b"\x89PNG"
  log.close()
  log = RunLog(workdir, tensorboard=False)  # a resumed run continues the file
  log.metrics("sft", 3, {"loss": 0.5})
  log.close()
  steps = [json.loads(x)["step"] for x in fs.cat(f"{BUCKET}/log/metrics.jsonl").splitlines()]
  assert steps == [1, 2, 3]
  assert [r["step"] for r in log.read_metrics()] == [1, 2, 3]


def test_records_are_read_from_a_bucket(gcs):
  from r1jax.data import pipeline
  from r1jax.errors import DataError
  _, fs = gcs
  fs.pipe(f"{BUCKET}/data/train.jsonl", b'{"question": "1+1", "answer": 2}\n\n')
  assert pipeline.read_records(f"gs://{BUCKET}/data/train.jsonl", answer_field="answer") == [
      {"question": "1+1", "answer": "2"}]
  with pytest.raises(DataError, match="nope.jsonl: cannot open"):
    pipeline.read_records(f"gs://{BUCKET}/data/nope.jsonl")


def test_under_keeps_absolute_paths_and_urls():
  from r1jax import fileio
  assert str(fileio.under("gs://b/run", "samples/x.jsonl")) == "gs://b/run/samples/x.jsonl"
  assert str(fileio.under("runs/r", "gs://b/x.jsonl")) == "gs://b/x.jsonl"
  assert str(fileio.under("gs://b/run", "/data/x.jsonl")) == "/data/x.jsonl"
  assert str(fileio.under("runs/r", "x.jsonl")) == "runs/r/x.jsonl"


# ----------------------------------------------------------------------------- user errors

def assert_one_error_line(proc, *fragments):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("error: --workdir "), lines[0]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def test_a_scheme_orbax_cannot_checkpoint_to_is_refused():
  proc = launch(*ARGS, "--workdir", "s3://bucket/run", env=launcher_env())
  assert_one_error_line(proc, "s3:// is not supported", "gs://")


def test_gs_without_gcsfs_names_the_package(gcs):
  url, _ = gcs
  proc = launch(*ARGS, "--workdir", f"gs://{BUCKET}/nogcsfs", env=launcher_env(url),
                prelude="import sys; sys.modules['gcsfs'] = None  # as if not installed")
  assert_one_error_line(proc, "pip install gcsfs")


def test_a_bucket_that_does_not_exist_is_refused(gcs):
  url, fs = gcs
  proc = launch(*ARGS, "--workdir", "gs://no-such-bucket/run", env=launcher_env(url))
  assert_one_error_line(proc, "gs://no-such-bucket does not exist")
  assert not fs.exists("no-such-bucket")  # not created on the way
