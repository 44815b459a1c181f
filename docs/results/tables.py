"""The README's result tables, printed from the summary.json files committed here.

    python docs/results/tables.py            # markdown tables of every r1_tiny seed and more
    python docs/results/tables.py --save RUN_DIR NAME --command "..." --commit SHA --wall S
        # copy a run's summary.json here as NAME.json with what produced it

Each NAME.json is a run's summary.json plus "run": the command, the git commit of the code,
the wall seconds of the whole command (from /usr/bin/time), and notes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def save(run_dir: str, name: str, **run):
  with open(os.path.join(run_dir, "summary.json")) as f:
    summary = json.load(f)
  summary["run"] = dict(summary.get("run", {}), **{k: v for k, v in run.items() if v is not None})
  with open(os.path.join(HERE, f"{name}.json"), "w") as f:
    json.dump(summary, f, indent=2)


def _acc(entry, bucket=None, key="accuracy"):
  ev = entry.get("eval") or {}
  if bucket:
    ev = ev.get("by_bucket", {}).get(bucket, {})
  v = ev.get(key)
  return "" if v is None else f"{v:.2f}"


def r1_tiny_tables():
  runs = {}
  for path in sorted(glob.glob(os.path.join(HERE, "r1_tiny_seed*.json"))):
    seed = int(path.rsplit("seed", 1)[1].split(".")[0])
    with open(path) as f:
      runs[seed] = json.load(f)
  if not runs:
    return
  print("| seed | tuned on | wall | cold_start | grpo | sft_control | sft_rs | grpo_final | "
        "student (% of teacher) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for seed, s in runs.items():
    st = {e["name"]: e for e in s["stages"]}
    teacher = float(_acc(st["grpo_final"]) or 0)
    student = float(_acc(st["distill"]) or 0)
    cells = [f"{_acc(st[n])} / {_acc(st[n], 'covered')} / {_acc(st[n], 'uncovered')}"
             for n in ("cold_start", "grpo", "sft_control", "sft_rs", "grpo_final")]
    wall = s.get("run", {}).get("wall_seconds")
    print(f"| {seed} | {'yes' if s['run'].get('tuned') else 'no'} | "
          f"{'' if wall is None else f'{wall / 60:.1f} min'} | " + " | ".join(cells) +
          f" | {student:.2f} ({100 * student / max(teacher, 1e-9):.0f} %) |")
  print()
  print("| seed | grpo - cold_start (all) | grpo - sft_control (uncovered) | uncovered pass@1 / "
        "pass@4: cold_start -> grpo |")
  print("|---|---|---|---|")
  gains = []
  for seed, s in runs.items():
    st = {e["name"]: e for e in s["stages"]}
    g = st["grpo"]["eval"]["accuracy"] - st["cold_start"]["eval"]["accuracy"]
    u = (st["grpo"]["eval"]["by_bucket"]["uncovered"]["accuracy"] -
         st["sft_control"]["eval"]["by_bucket"]["uncovered"]["accuracy"])
    gains.append(g)
    print(f"| {seed} | {g:+.2f} | {u:+.2f} | {_acc(st['cold_start'], 'uncovered', 'pass@1')} / "
          f"{_acc(st['cold_start'], 'uncovered', 'pass@k')} -> "
          f"{_acc(st['grpo'], 'uncovered', 'pass@1')} / {_acc(st['grpo'], 'uncovered', 'pass@k')} |")
  print(f"\nmean grpo - cold_start over {len(gains)} seeds: {sum(gains) / len(gains):+.3f}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--save", nargs=2, metavar=("RUN_DIR", "NAME"))
  ap.add_argument("--command")
  ap.add_argument("--commit")
  ap.add_argument("--wall", type=float)
  ap.add_argument("--tuned", action="store_true")
  ap.add_argument("--note")
  a = ap.parse_args()
  if a.save:
    save(*a.save, command=a.command, git_commit=a.commit, wall_seconds=a.wall,
         tuned=a.tuned, note=a.note)
    return
  r1_tiny_tables()


if __name__ == "__main__":
  main()
