"""The code a benchmark result was measured on: the git commit, and whether the work tree had
uncommitted changes then, and when the JSON was written. Every benchmark script stores this in
its JSON, and `benchmarks/run_all.py` prints it in RESULTS.md, so a README figure can be traced to
its commit and its time."""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  # rstrip only: `git status --porcelain` starts a line with a space (" M path"), and the
  # path is read from a fixed column
  return out.stdout.rstrip("\n") if out.returncode == 0 else None


# written by the benchmarks themselves: a run after another one leaves these changed, and they
# are not code
RESULT_PATHS = ("benchmarks/results/", "benchmarks/RESULTS.md")


TIME_FORMAT = "%Y-%m-%d %H:%M UTC"


def code() -> dict:
  """{"commit": HEAD's hash or None outside a git checkout, "dirty": tracked files other than
  benchmark results changed, "written": now, UTC}."""
  commit = _git("rev-parse", "HEAD")
  status = _git("status", "--porcelain", "--untracked-files=no")
  written = datetime.datetime.now(datetime.timezone.utc).strftime(TIME_FORMAT)
  if status is None:
    return {"commit": commit, "dirty": None, "written": written}
  changed = [line[3:] for line in status.splitlines()]
  return {"commit": commit, "dirty": any(not p.startswith(RESULT_PATHS) for p in changed),
          "written": written}


def written(d: dict, path: pathlib.Path) -> str:
  """When a result's JSON was written, for RESULTS.md: "written T" from its own record (since
  2026-12-06); for older files "committed T", when git last committed the file (a clone resets
  every file's mtime); outside git, "file time T", the file's mtime."""
  if d.get("written"):
    return "written " + d["written"]
  committed = _git("log", "-1", "--format=%ct", "--", str(path))
  if committed:
    return "committed " + _utc(int(committed))
  return "file time " + _utc(path.stat().st_mtime)


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(TIME_FORMAT)


def describe(d: dict) -> str:
  """"abc1234", "abc1234 + uncommitted changes", or "not recorded" for a result's JSON."""
  if not d.get("commit"):
    return "not recorded"
  return d["commit"][:7] + (" + uncommitted changes" if d.get("dirty") else "")


def write_result(path, result: dict) -> pathlib.Path:
  """Write a benchmark's result JSON to `path` with `code()` (commit, dirty, written) added, and
  say so on stdout."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({**result, **code()}, indent=1) + "\n")
  print(f"wrote {path}")
  return path
