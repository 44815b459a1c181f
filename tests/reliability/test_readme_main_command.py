"""The README's main command, exactly as written, from a directory a new user would run it in.

`python -m r1jax.launch --config configs/r1_tiny.py` (the README's first set-up block) runs from
a fresh temporary working directory holding only the configs, with no --workdir, shortened only by
--config.max_steps. Its default run directory is relative (runs/r1_tiny-<timestamp>): the run must
write summary.json with every stage there, and the same command with `--workdir runs/<that name>`
(relative too) must resume it: every finished stage is loaded, none rerun.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import launcher

MAX_STEPS = "2"


def readme_main_command() -> list[str]:
  """The launcher arguments of the README's first ```bash block under `## Set-up`."""
  with open(os.path.join(launcher.ROOT, "README.md")) as f:
    text = f.read()
  setup = text[text.index("## Set-up"):]
  block = re.search(r"```bash\n(.*?)\n```", setup, re.S).group(1).strip()
  install, run = block.split("&&")
  assert install.split() == ["pip", "install", "-e", "."], block
  words = run.split()
  assert words[:3] == ["python", "-m", "r1jax.launch"], block
  return words[3:]


def test_readme_main_command_runs_and_resumes_from_a_fresh_directory(tmp_path):
  args = readme_main_command()
  assert args == ["--config", "configs/r1_tiny.py"]  # as written: no --workdir
  shutil.copytree(os.path.join(launcher.ROOT, "configs"), tmp_path / "configs")

  # XLA's default optimization level, not the suite's fast-compile one: this run's time goes to
  # sampling and evaluation rather than compiles (measured cold, alone: 144 s against 212 s).
  env = launcher.env(1)
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("--xla_backend_optimization_level=0", "").strip()

  def launch(*extra):
    return subprocess.run([sys.executable, "-m", "r1jax.launch", *args,
                           f"--config.max_steps={MAX_STEPS}", *extra], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)

  first = launch()
  assert first.returncode == 0, first.stderr[-3000:]
  result = json.loads(first.stdout.strip().splitlines()[-1])
  workdir = result["workdir"]
  assert os.path.isabs(workdir) and workdir.startswith(str(tmp_path / "runs" / "r1_tiny-"))
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  order = ["cold_start", "grpo", "sft_control", "rejection", "sft_rs", "grpo_final", "distill"]
  assert [e["name"] for e in summary["stages"]] == order
  assert summary["splits"]["eval"]["total"] > 0
  assert summary["splits"]["heldout"]["total"] == summary["stages"][0]["eval"]["heldout"][
      "num_problems"] > 0
  assert os.path.exists(os.path.join(workdir, "samples", "eval_cold_start.jsonl"))

  again = launch("--workdir", os.path.relpath(workdir, tmp_path))
  assert again.returncode == 0, again.stderr[-3000:]
  for name in order:
    if name != "rejection":
      assert f"[{name}] already complete; loaded its output" in again.stderr, again.stderr[-3000:]
    assert f"== stage {name}" not in again.stderr
  assert json.loads(again.stdout.strip().splitlines()[-1])["stages"] == result["stages"]
