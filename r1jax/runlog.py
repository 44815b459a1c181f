"""The run directory's logs: metrics.jsonl, TensorBoard events, progress lines, plots, summary.

Only process 0 writes; other processes get a logger whose writes are no-ops.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np


def _clean(v):
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None


def atomic_write_json(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


class RunLog:

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self.tty = sys.stderr.isatty()
    self._tb = None
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # optional dependency
        self._tb = None
    self._t0 = time.time()

  def metrics(self, stage: str, step: int, values: dict) -> dict:
    """Append one metrics.jsonl record; returns it."""
    rec = {"stage": stage, "step": int(step), "time": round(time.time() - self._t0, 3)}
    rec.update({k: _clean(v) for k, v in values.items() if not k.startswith("_")})
    if not self.enabled:
      return rec
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      for k, v in rec.items():
        if k not in ("stage", "step", "time") and v is not None:
          self._tb.add_scalar(f"{stage}/{k}", v, step)
      self._tb.flush()
    return rec

  def progress(self, stage: str, step: int, total: int, rec: dict, keys=("loss", "reward")):
    if not self.enabled:
      return
    shown = " ".join(f"{k}={rec[k]:.4g}" for k in keys if rec.get(k) is not None)
    if self.tty:
      width = 30
      done = int(width * step / max(total, 1))
      sys.stderr.write(f"\r[{stage}] [{'#' * done}{'.' * (width - done)}] {step}/{total} "
                       f"{shown}   ")
      if step >= total:
        sys.stderr.write("\n")
    else:
      sys.stderr.write(f"[{stage}] step {step}/{total} {shown}\n")
    sys.stderr.flush()

  def info(self, msg: str):
    if self.enabled:
      sys.stderr.write(msg + "\n")
      sys.stderr.flush()

  def read_metrics(self) -> list[dict]:
    path = os.path.join(self.workdir, "metrics.jsonl")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def plot(self, summary: list[dict] | None = None):
    """plots/<metric>.png: each metric against step, one line per stage; with the summary's
    stage entries also plots/accuracy_by_stage.png (held-out accuracy after each stage,
    overall and per bucket)."""
    if not self.enabled:
      return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = self.read_metrics()
    os.makedirs(os.path.join(self.workdir, "plots"), exist_ok=True)
    for key in ("loss", "reward", "kl", "completion_len", "grad_norm"):
      series = {}
      for r in recs:
        if r.get(key) is not None:
          series.setdefault(r["stage"], []).append((r["step"], r[key]))
      if not series:
        continue
      fig, ax = plt.subplots(figsize=(6, 3.5))
      for name, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 20 else None)
      ax.set_xlabel("step")
      ax.set_ylabel(key)
      ax.legend()
      fig.tight_layout()
      fig.savefig(os.path.join(self.workdir, "plots", f"{key}.png"), dpi=100)
      plt.close(fig)
    evaluated = [s for s in summary or () if s.get("eval")]
    if evaluated:
      fig, ax = plt.subplots(figsize=(7, 3.5))
      xs = range(len(evaluated))
      ax.plot(xs, [s["eval"].get("accuracy") for s in evaluated], marker="o", label="all")
      buckets = sorted({b for s in evaluated for b in s["eval"].get("by_bucket", {})})
      for b in buckets:
        ax.plot(xs, [s["eval"].get("by_bucket", {}).get(b, {}).get("accuracy") for s in evaluated],
                marker="o", linestyle="--", label=b)
      ax.set_xticks(list(xs), [s["name"] for s in evaluated], rotation=20)
      ax.set_ylabel("held-out accuracy (greedy)")
      ax.legend()
      fig.tight_layout()
      fig.savefig(os.path.join(self.workdir, "plots", "accuracy_by_stage.png"), dpi=100)
      plt.close(fig)

  def close(self):
    if self._tb is not None:
      self._tb.close()
