"""User errors at the command line: each exits 2 with exactly one `error: ...` line on stderr and
no traceback (DESIGN.md, "The command line"). All of them fail before anything compiles; the
dry-run test that succeeds is the one exception."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = os.path.join(ROOT, "configs", "sft_tiny.py")


def launch(*args, workdir):
  """Run the launcher; the environment (JAX_PLATFORMS, XLA_FLAGS, cache dir set by conftest)
  is passed on explicitly."""
  return subprocess.run([sys.executable, "-m", "r1jax.launch", *args, "--workdir", str(workdir)],
                        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                        timeout=180)


def assert_user_error(proc, *fragments):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("error: "), lines[0]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


@pytest.fixture
def data_dir(tmp_path):
  good = '{"question": "1+1", "answer": "2"}\n'
  (tmp_path / "malformed.jsonl").write_text(good + good + '{"question": "2+2", "answer" "4"}\n')
  (tmp_path / "missing.jsonl").write_text(good + '{"question": "2+2"}\n')
  return tmp_path


def test_malformed_jsonl_names_file_and_line(data_dir, tmp_path):
  path = data_dir / "malformed.jsonl"
  proc = launch("--config", SFT_TINY, "--config.data.task=file",
                f"--config.data.train_file={path}", workdir=tmp_path / "run")
  assert_user_error(proc, f"{path}:3:", "malformed JSON")


def test_missing_field_names_file_line_and_field(data_dir, tmp_path):
  path = data_dir / "missing.jsonl"
  proc = launch("--config", SFT_TINY, "--config.data.task=file",
                f"--config.data.train_file={path}", workdir=tmp_path / "run")
  assert_user_error(proc, f"{path}:2:", "missing field 'answer'")


@pytest.mark.parametrize("override, key", [("--config.model.nonexistent=1", "nonexistent"),
                                           ("--config.no_such_section=1", "no_such_section")])
def test_unknown_config_key(tmp_path, override, key):
  proc = launch("--config", SFT_TINY, override, workdir=tmp_path / "run")
  assert_user_error(proc, key)


def test_ill_typed_override(tmp_path):
  proc = launch("--config", SFT_TINY, "--config.data.batch_size=abc", workdir=tmp_path / "run")
  assert_user_error(proc, "data.batch_size", "abc")


def test_nonexistent_config_file(tmp_path):
  missing = tmp_path / "no_such_config.py"
  proc = launch("--config", str(missing), workdir=tmp_path / "run")
  assert_user_error(proc, str(missing))
  # with overrides too (config_flags applies them to the config that failed to load)
  proc = launch("--config", str(missing), "--config.seed=3", workdir=tmp_path / "run")
  assert_user_error(proc, str(missing))


def test_config_whose_get_config_raises_names_its_error(tmp_path):
  """A config's own error (here an unknown `:ARG`) is the line's end, not a traceback."""
  bad = tmp_path / "picky.py"
  bad.write_text("def get_config(arg=None):\n  raise ValueError(f'unknown argument {arg!r}')\n")
  proc = launch("--config", f"{bad}:bogus", workdir=tmp_path / "run")
  assert_user_error(proc, "ValueError: unknown argument 'bogus'")


def test_init_from_nonexistent_checkpoint_dir(tmp_path):
  missing = tmp_path / "no_such_checkpoint"
  proc = launch("--config", SFT_TINY, f"--config.init_from={missing}", workdir=tmp_path / "run")
  assert_user_error(proc, str(missing))


def test_bad_stage_order(tmp_path):
  proc = launch("--config", SFT_TINY, "--config.stage_order=('sft', 'nope')",
                workdir=tmp_path / "run")
  assert_user_error(proc, "stage_order", "'nope'")


def test_pretrain_tagged_frac_out_of_range(tmp_path):
  proc = launch("--config", os.path.join(ROOT, "configs", "r1_zero_tiny.py"),
                "--config.stages.pretrain.tagged_frac=1.5", workdir=tmp_path / "run")
  assert_user_error(proc, "stages.pretrain.tagged_frac=1.5", "[0, 1]")


def test_with_sft_split_needs_the_builtin_task(tmp_path):
  proc = launch("--config", os.path.join(ROOT, "configs", "r1_tiny.py"), "--config.data.task=file",
                f"--config.data.train_file={tmp_path / 'train.jsonl'}", workdir=tmp_path / "run")
  assert_user_error(proc, "stages.distill.with_sft_split", "data.task is 'file'")


def test_on_policy_distillation_without_a_student_to_continue(tmp_path):
  proc = launch("--config", os.path.join(ROOT, "configs", "r1_tiny_onpolicy.py"),
                "--config.stages.distill_opd.start_from=", workdir=tmp_path / "run")
  assert_user_error(proc, "stages.distill_opd.start_from=''", "on_policy mode")
  assert not os.path.exists(tmp_path / "run" / "progress.json")


def test_sampling_devices_that_leave_none_to_train_on(tmp_path):
  """The shrunk recipe's asynchronous GRPO takes 2 devices to sample on; with 2 devices in all
  (conftest's 8 replaced here), none would be left to train on."""
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=2"))
  proc = subprocess.run([sys.executable, "-m", "r1jax.launch", "--config",
                         os.path.join(ROOT, "tests", "reliability", "r1_tiny_shrunk.py"),
                         "--workdir", str(tmp_path / "run")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=180)
  assert_user_error(proc, "rollout_devices=2 leaves no training device")
  assert not (tmp_path / "run" / "checkpoints").exists()


SHRUNK = os.path.join(ROOT, "tests", "reliability", "r1_tiny_shrunk.py")


@pytest.mark.parametrize("override, fragments", [
    # its grpo stage drafts with the MTP module (`draft="mtp"`)
    ("--config.model.num_nextn_predict_layers=0",
     ("stages.grpo.draft='mtp' needs a model with an MTP module",)),
    ("--config.stages.grpo.draft=eagle", ("stages.grpo.draft='eagle'", "or 'mtp'")),
    # and trains its draft (`draft_weight`)
    ("--config.stages.grpo.draft_weight=-0.5", ("stages.grpo.draft_weight", "must be >= 0")),
])
def test_speculative_rollouts_on_a_model_or_stage_that_cannot(tmp_path, override, fragments):
  proc = launch("--config", SHRUNK, override, workdir=tmp_path / "run")
  assert_user_error(proc, *fragments)
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_reward_model_that_is_not_there(tmp_path):
  proc = launch("--config", os.path.join(ROOT, "configs", "r1_tiny_rm.py"),
                f"--config.stages.grpo_rm.reward_model={tmp_path / 'no_rm'}",
                workdir=tmp_path / "run")
  assert_user_error(proc, "stages.grpo_rm.reward_model=", "neither a stage nor a checkpoint")
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_with_a_different_config_is_refused(tmp_path):
  """A workdir holds one config; reusing it with another one is a user error, not a resume."""
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text('{"seed": 123}')
  proc = launch("--config", SFT_TINY, workdir=run)
  assert_user_error(proc, str(run), "different config")


def test_resume_of_a_run_from_before_a_config_field_was_added(tmp_path):
  """A run directory written before a config field existed (here `mesh.context`) resumes where
  the field holds its default; set to anything else, the config differs."""
  from r1jax import launch, run_config
  from r1jax.errors import UserError
  config = run_config.from_file(SFT_TINY)
  old = json.loads(config.to_json_best_effort())
  del old["mesh"]["context"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  launch._write_config(config, str(tmp_path))  # the same run
  assert json.loads((tmp_path / "config.json").read_text()) == old  # left as it was
  config.mesh.context = 2
  with pytest.raises(UserError, match="differs in: mesh"):
    launch._write_config(config, str(tmp_path))


def test_compilation_cache_flag(tmp_path, monkeypatch):
  """--compilation_cache turns on jax's persistent cache there; '' leaves it off; the
  environment variable wins (the test suite relies on that)."""
  import jax
  from r1jax import launch
  old = jax.config.jax_compilation_cache_dir
  try:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
    assert launch._compilation_cache(str(tmp_path)) == "/elsewhere"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert launch._compilation_cache("") is None
    assert launch._compilation_cache(str(tmp_path / "c")) == str(tmp_path / "c")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
  finally:
    jax.config.update("jax_compilation_cache_dir", old)


def _dry_run(*args, env):
  return subprocess.run([sys.executable, "-m", "r1jax.launch", "--config", SFT_TINY, "--dry_run",
                         *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_simulates_the_mesh_devices_itself():
  """The README's dry-run command as a user types it: no XLA_FLAGS, no JAX_PLATFORMS. The
  launcher makes the mesh's host devices (the config module has imported jax by then, so only
  jax's own config, set before any backend starts, can do it). The one test here that compiles."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = _dry_run("--config.mesh.data=2", "--config.model.num_hidden_layers=2", env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "(2 devices)" in proc.stdout and "per device:" in proc.stdout, proc.stdout[-2000:]


def test_dry_run_with_fewer_devices_than_its_mesh_is_one_line():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  assert_user_error(_dry_run("--config.mesh.data=4", env=env), "needs 4 devices",
                    "this process has 2")


@pytest.mark.parametrize("args, fragment", [
    (("--config.mesh.data=0",), "mesh.data=0 must be a positive size"),
    (("--config.mesh.fsdp=-1",), "at most one axis may be -1"),
    (("--config.mesh.context=3",), "data.seq_len=64 must be a multiple of mesh.context=3"),
    (("--dry_run_devices=-3",), "--dry_run_devices=-3 must be >= 0")])
def test_dry_run_bad_mesh_is_one_line_before_any_device_starts(args, fragment):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  assert_user_error(_dry_run(*args, env=env), fragment)


@pytest.mark.parametrize("sub, fragment", [("", "exists and is not a directory"),
                                           ("run", "cannot create it")])
def test_workdir_that_is_a_file_is_one_line(tmp_path, sub, fragment):
  afile = tmp_path / "afile"
  afile.write_text("keep me\n")
  proc = launch("--config", SFT_TINY, workdir=afile / sub if sub else afile)
  assert_user_error(proc, fragment)
  assert afile.read_text() == "keep me\n"


def test_workdir_it_cannot_write_is_one_line(tmp_path):
  """A directory the run cannot write into (a read-only mount; root ignores chmod, so the write
  is made to fail): one line naming the workdir, exit 2."""
  code = ("import sys\nfrom r1jax import fileio, launch\n"
          "def refuse(*a, **k):\n  raise PermissionError(13, 'Permission denied')\n"
          "fileio.atomic_write_json = refuse\nsys.exit(launch.main(sys.argv))")
  proc = subprocess.run([sys.executable, "-c", code, "--config", SFT_TINY, "--workdir",
                         str(tmp_path)], cwd=ROOT, env=dict(os.environ), capture_output=True,
                        text=True, timeout=180)
  assert_user_error(proc, f"--workdir {tmp_path}: cannot write there (Permission denied)")
