"""The cluster launch scripts in launch/: the Cloud TPU script's commands (printed with --dry_run,
and carried out against stand-ins for gcloud, uv and the worker's Python), the SLURM batch script
(syntax, its srun line, the XLA flags it sets, each task's GPU selection) and the Colab notebook,
whose cells run a shrunk configs/r1_tiny.py end to end."""

import json
import os
import stat
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "slurm_gpu.sbatch")
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")
TPU_ARGS = ["--name", "t", "--zone", "z", "--project", "p", "--accelerator", "v5p-16",
            "--config", "configs/r1_tiny.py", "--workdir", "/mnt/shared/run"]
# a value the remote shells must pass through intact
TRICKY_OVERRIDE = "--config.data.template=it's a \"b\" $HOME"


def write_executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def run_script(args, env=None, **kw):
  return subprocess.run(["bash", *args], cwd=ROOT, env=dict(os.environ, **(env or {})),
                        capture_output=True, text=True, timeout=60, **kw)


# --- launch/tpu_pod.sh -------------------------------------------------------------------------

@pytest.fixture
def fake_tpu(tmp_path):
  """Stand-ins on PATH: `gcloud` logs its arguments and runs `tpu-vm ssh --command=...` locally
  in a fake worker home (scp copies there); `uv venv` makes a venv whose `python` records its
  working directory, the coordinator it was given (none: r1jax finds a slice's workers itself)
  and its arguments, prints a log line and exits 3."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  home.mkdir()
  bin_dir.mkdir()
  write_executable(bin_dir / "gcloud", r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_GCLOUD_LOG"
case "$4" in
  ssh) for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}" ;; esac; done
       cd "$HOME" && exec bash -c "$cmd" ;;
  scp) cp "$5" "$HOME/${6#*:}" ;;
  describe) exit 1 ;;
esac
""")
  write_executable(tmp_path / "worker_python", r"""#!/usr/bin/env bash
{ echo "cwd=$PWD"; echo "coordinator=${JAX_COORDINATOR_ADDRESS:-}"; printf 'arg=%s\n' "$@"; \
  } >"$HOME/launched"
echo "[cold_start] step 1/2 loss=5.35"
exit 3
""")
  write_executable(bin_dir / "uv", r"""#!/usr/bin/env bash
if [ "$1" = venv ]; then mkdir -p "${@: -1}/bin"; cp "$FAKE_WORKER_PYTHON" "${@: -1}/bin/python"; fi
""")
  # the repository the workers get: a small git checkout (packed with git archive)
  repo = tmp_path / "repo"
  (repo / "configs").mkdir(parents=True)
  (repo / "configs" / "r1_tiny.py").write_text("# stand-in\n")
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  subprocess.run([*git, "add", "-A"], check=True)
  subprocess.run([*git, "commit", "-qm", "stand-in"], check=True)
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
         "TMPDIR": str(tmp_path), "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"),
         "FAKE_WORKER_PYTHON": str(tmp_path / "worker_python")}
  return dict(env=env, home=home, repo=repo, log=tmp_path / "gcloud.log", tmp=tmp_path)


def test_tpu_dry_run_prints_every_command_and_runs_none(fake_tpu):
  proc = run_script([TPU_POD, "--dry_run", *TPU_ARGS, TRICKY_OVERRIDE], env=fake_tpu["env"])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines and all(ln.startswith("+ ") for ln in lines), proc.stdout
  create = [ln for ln in lines if " tpu-vm create " in ln]
  install = [ln for ln in lines if " --worker=all " in ln and "pip install" in ln]
  launch = [ln for ln in lines if "python -m r1jax.launch" in ln]
  stream = [ln for ln in lines if " --worker=0 " in ln and "r1jax-run.log" in ln]
  assert len(create) == len(install) == len(launch) == len(stream) == 1, proc.stdout
  for flag in ("t ", "--zone=z", "--project=p", "--accelerator-type=v5p-16",
               "--version=v2-alpha-tpuv5"):
    assert flag in create[0], (flag, create[0])
  assert " --worker=all " in launch[0]
  assert "--config configs/r1_tiny.py --workdir /mnt/shared/run" in launch[0], launch[0]
  assert "--config.data.template=" in launch[0]
  assert not fake_tpu["log"].exists(), "--dry_run ran gcloud"
  assert not list(fake_tpu["tmp"].glob("r1jax-*.tar.gz")), "--dry_run packed the repository"


def test_tpu_runs_on_every_worker_streams_and_returns_the_run_status(fake_tpu):
  proc = run_script([TPU_POD, *TPU_ARGS, "--repo", str(fake_tpu["repo"]), "--reuse",
                     "--delete_after", "--config.max_steps=2", TRICKY_OVERRIDE],
                    env=fake_tpu["env"])
  assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)  # the run's status
  assert "[cold_start] step 1/2 loss=5.35" in proc.stdout  # worker 0's log, streamed
  launched = (fake_tpu["home"] / "launched").read_text().splitlines()
  assert launched[0] == f"cwd={fake_tpu['home'] / 'r1jax'}"
  assert launched[1] == "coordinator="  # not exported: r1jax reads the slice from the metadata
  assert launched[2:] == [f"arg={a}" for a in (
      "-m", "r1jax.launch", "--config", "configs/r1_tiny.py", "--workdir", "/mnt/shared/run",
      "--config.max_steps=2", TRICKY_OVERRIDE)]
  assert (fake_tpu["home"] / "r1jax" / "configs" / "r1_tiny.py").exists()  # the shipped tree
  verbs = [ln.split()[3] for ln in fake_tpu["log"].read_text().splitlines()]
  # --reuse: describe fails (no such TPU), so it is created; delete after the run ended
  assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "delete"], verbs


@pytest.mark.parametrize("args, fragment", [
    ([*TPU_ARGS, "--bogus"], "unknown flag: --bogus"),
    ([a for a in TPU_ARGS if a not in ("--zone", "z")], "--zone is required"),
    ([*TPU_ARGS, "--repo"], "--repo needs a value"),
])
def test_tpu_usage_errors(args, fragment):
  proc = run_script([TPU_POD, "--dry_run", *args])
  assert proc.returncode == 2, proc.stdout
  assert proc.stdout == ""
  (line,) = proc.stderr.splitlines()
  assert line.startswith("error: ") and fragment in line, line


def test_tpu_help():
  proc = run_script([TPU_POD, "--help"])
  assert proc.returncode == 0
  for flag in ("--name", "--zone", "--project", "--accelerator", "--version", "--config",
               "--workdir", "--repo", "--ref", "--reuse", "--delete_after", "--dry_run"):
    assert flag in proc.stdout, flag


# --- launch/slurm_gpu.sbatch -------------------------------------------------------------------

def test_slurm_script_parses():
  proc = run_script(["-n", SLURM])
  assert proc.returncode == 0, proc.stderr


def slurm_dry_run(**env):
  proc = run_script([SLURM], env=dict(DRY_RUN="1", **env))
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.splitlines()


def test_slurm_dry_run_prints_srun_and_xla_flags_parse():
  lines = slurm_dry_run(CONFIG="configs/grpo_tiny.py", WORKDIR="/shared/run",
                        OVERRIDES="--config.max_steps=2 --config.seed=3")
  (srun,) = [ln for ln in lines if ln.startswith("+ srun ")]
  assert ("python -m r1jax.launch --config configs/grpo_tiny.py --workdir /shared/run "
          "--config.max_steps=2 --config.seed=3") in srun, srun
  assert "--ntasks-per-node=8" in srun  # one process per GPU by default
  (xla,) = [ln for ln in lines if ln.startswith("+ export 'XLA_FLAGS=")]
  flags = xla[len("+ export 'XLA_FLAGS="):-1]
  # XLA aborts on a flag it does not know; this jaxlib parses GPU flags on CPU too
  check = subprocess.run(
      [sys.executable, "-c", "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"],
      env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=120)
  assert check.returncode == 0, check.stderr[-2000:]


@pytest.mark.parametrize("procs_per_node, visible, local_ids", [
    ("gpu", "0,1,2,3", ""),        # JAX's SLURM default: [SLURM_LOCALID] of the node's GPUs
    ("gpu", "2", "0"),             # SLURM bound one GPU to the task: it is device 0
    ("1", "0,1,2,3", "0,1,2,3"),   # one process drives all of the node's GPUs
])
def test_slurm_tasks_select_their_gpus(tmp_path, procs_per_node, visible, local_ids):
  """A stand-in `srun` runs the task command as local task 1 with CUDA_VISIBLE_DEVICES set; the
  stand-in python reports the device ids JAX would use and its arguments."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  write_executable(bin_dir / "srun", r"""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
SLURM_LOCALID=1 CUDA_VISIBLE_DEVICES="$FAKE_VISIBLE" exec "$@"
""")
  python = write_executable(tmp_path / "python", r"""#!/usr/bin/env bash
echo "ids=${JAX_LOCAL_DEVICE_IDS:-}"; printf 'arg=%s\n' "$@"
""")
  proc = run_script([SLURM], env=dict(
      PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=str(python), FAKE_VISIBLE=visible,
      PROCS_PER_NODE=procs_per_node, GPUS_PER_NODE="4", WORKDIR="/shared/run",
      OVERRIDES="--config.max_steps=2"))
  assert proc.returncode == 0, proc.stderr
  out = [ln for ln in proc.stdout.splitlines() if not ln.startswith("+ ")]
  assert out == [f"ids={local_ids}"] + [f"arg={a}" for a in (
      "-m", "r1jax.launch", "--config", "configs/r1_tiny.py", "--workdir", "/shared/run",
      "--config.max_steps=2")], proc.stdout


# --- launch/colab.ipynb ------------------------------------------------------------------------

# configs/r1_tiny.py shrunk: every stage at most 2 steps (max_steps), a 2-layer model (one dense,
# one MoE layer) without MTP, small batches, rollouts and evaluation
NOTEBOOK_OVERRIDES = [
    "--config.max_steps=2", "--config.model.num_hidden_layers=2",
    "--config.model.num_nextn_predict_layers=0", "--config.train.mtp_weight=0.0",
    "--config.data.batch_size=8", "--config.data.seq_len=48", "--config.data.num_sft_examples=64",
    "--config.data.num_rl_prompts=64", "--config.data.num_eval_problems=8",
    "--config.eval.k=0", "--config.eval.max_new_tokens=12",  # greedy evaluation only
    "--config.log.every_steps=1", "--config.log.plots=False",
    "--config.log.tensorboard=False",
    *[f"--config.stages.{s}.{k}={v}" for s in ("grpo", "grpo_final")
      for k, v in (("prompts_per_step", 2), ("group_size", 4), ("max_new_tokens", 12))],
    "--config.stages.rejection.num_prompts=8", "--config.stages.rejection.k=2",
    "--config.stages.rejection.max_new_tokens=12",
    "--config.stages.distill.student.num_hidden_layers=1",
]


def code_cells(notebook):
  return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


def test_notebook_is_nbformat4():
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  assert nb["nbformat"] == 4 and "kernelspec" in nb["metadata"]
  for cell in nb["cells"]:
    assert cell["cell_type"] in ("code", "markdown") and isinstance(cell["source"], list)
    assert isinstance(cell["metadata"], dict) and cell.get("id")
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
  params = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
  assert len(params) == 1
  assert all(name in "".join(params[0]["source"])
             for name in ("REPO_URL", "CONFIG", "WORKDIR", "OVERRIDES"))


def test_notebook_runs_the_shrunk_recipe_and_plots(tmp_path, monkeypatch):
  """Every code cell but the Colab-only ones, in one namespace, with the parameters cell followed
  by test values (the repository here, a tmp workdir, the shrunk config)."""
  monkeypatch.setenv("MPLBACKEND", "Agg")
  import matplotlib
  matplotlib.use("Agg")
  with open(NOTEBOOK) as f:
    nb = json.load(f)
  workdir = str(tmp_path / "r1_run")
  namespace = {}
  for cell in nb["cells"]:
    source = "".join(cell["source"])
    if cell["cell_type"] != "code" or source.startswith("# colab-only"):
      continue
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=".*non-interactive.*")  # plt.show() under Agg
      exec(compile(source, f"colab.ipynb:{cell['id']}", "exec"), namespace)
    if "parameters" in cell["metadata"].get("tags", []):
      namespace.update(REPO_DIR=ROOT, WORKDIR=workdir, OVERRIDES=NOTEBOOK_OVERRIDES)
  with open(os.path.join(workdir, "config.json")) as f:
    stage_order = json.load(f)["stage_order"]
  assert [e["name"] for e in namespace["summary"]["stages"]] == list(stage_order)
  assert set(namespace["reward_by_stage"]) == {"grpo", "grpo_final"}
  assert all(len(points) == 2 for points in namespace["reward_by_stage"].values())
  assert len(namespace["accuracy_by_series"]["all"]) == len(stage_order) - 1  # all but rejection
  assert {"covered", "uncovered"} <= set(namespace["accuracy_by_series"])
  for name in ("reward.png", "accuracy.png"):
    path = os.path.join(workdir, "notebook_plots", name)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
