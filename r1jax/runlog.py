"""The run directory's logs: metrics.jsonl, TensorBoard events, progress lines, plots.

Only process 0 writes; other processes get a logger whose writes are no-ops. On a filesystem each
record is appended to metrics.jsonl as it comes. An object store (gs://) has no append: there the
log keeps the file's lines, rewrites it whole at most every FLUSH_SECONDS and on `flush()` (which
the train loop calls before every checkpoint, so the records up to a checkpoint are never lost),
and writes TensorBoard events to a local directory that `flush()` copies into the run directory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from etils import epath

from r1jax import fileio

FLUSH_SECONDS = 30.0
# metrics that measure time: two runs of the same config legitimately differ in them
TIMING_KEYS = frozenset({"time", "step_seconds", "tokens_per_sec", "rollout_seconds",
                         "rollout_tokens_per_sec", "wall_seconds", "model_flops_per_sec", "mfu"})


def _clean(v):
  v = float(np.asarray(v))
  return v if math.isfinite(v) else None


class RunLog:

  def __init__(self, workdir, *, enabled: bool = True, tensorboard: bool = True):
    self.workdir, self.enabled = epath.Path(workdir), enabled
    self.tty = sys.stderr.isatty()
    self._metrics_path = self.workdir / "metrics.jsonl"
    self._remote = fileio.is_remote(workdir)
    self._lines = None  # object store: metrics.jsonl's lines, uploaded whole by flush()
    if enabled and self._remote:
      self._lines = (self._metrics_path.read_text().splitlines(keepends=True)
                     if self._metrics_path.exists() else [])
    self._unflushed = False
    self._flushed_at = time.time()
    self._tb, self._tb_staging = None, None
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:  # optional dependency
        pass
      else:
        if self._remote:
          self._tb_staging = tempfile.mkdtemp(prefix="r1jax-tensorboard-")
        self._tb = SummaryWriter(self._tb_staging or os.fspath(self.workdir / "tensorboard"))
    self._t0 = time.time()

  def metrics(self, stage: str, step: int, values: dict) -> dict:
    """Append one metrics.jsonl record; returns it."""
    rec = {"stage": stage, "step": int(step), "time": round(time.time() - self._t0, 3)}
    rec.update({k: _clean(v) for k, v in values.items() if not k.startswith("_")})
    if not self.enabled:
      return rec
    line = json.dumps(rec) + "\n"
    if self._remote:
      self._lines.append(line)
      self._unflushed = True
    else:
      with self._metrics_path.open("a") as f:
        f.write(line)
    if self._tb is not None:
      for k, v in rec.items():
        if k not in ("stage", "step", "time") and v is not None:
          self._tb.add_scalar(f"{stage}/{k}", v, step)
    if not self._remote or time.time() - self._flushed_at >= FLUSH_SECONDS:
      self.flush()
    return rec

  def flush(self):
    """Make every record logged so far durable in the run directory."""
    if not self.enabled:
      return
    if self._tb is not None:
      self._tb.flush()
    if not self._remote:
      return  # appended as they came
    if self._unflushed:
      with fileio.atomic_open(self._metrics_path) as f:
        f.writelines(self._lines)
      self._unflushed = False
    self._upload_tensorboard()
    self._flushed_at = time.time()

  def _upload_tensorboard(self):
    if self._tb_staging is None:
      return
    for name in os.listdir(self._tb_staging):  # event files are small: copied whole each time
      with open(os.path.join(self._tb_staging, name), "rb") as f:
        (self.workdir / "tensorboard" / name).write_bytes(f.read())

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
    if self._lines is not None:
      return [json.loads(line) for line in self._lines if line.strip()]
    if not self._metrics_path.exists():
      return []
    with self._metrics_path.open() as f:
      return [json.loads(line) for line in f if line.strip()]

  def plot(self, summary: list[dict] | None = None):
    """plots/<metric>.png: each metric against step, one line per stage; with the summary's
    stage entries also plots/accuracy_by_stage.png (held-out accuracy after each stage,
    overall, per bucket and on the large held-out set when there is one)."""
    if not self.enabled:
      return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = self.read_metrics()
    plots = self.workdir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
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
      _save_png(fig, plots / f"{key}.png")
    self._plot_bucket_rewards(recs, plots)
    evaluated = [s for s in summary or () if s.get("eval")]
    if evaluated:
      fig, ax = plt.subplots(figsize=(7, 3.5))
      xs = range(len(evaluated))
      ax.plot(xs, [s["eval"].get("accuracy") for s in evaluated], marker="o", label="all")
      buckets = sorted({b for s in evaluated for b in s["eval"].get("by_bucket", {})})
      for b in buckets:
        ax.plot(xs, [s["eval"].get("by_bucket", {}).get(b, {}).get("accuracy") for s in evaluated],
                marker="o", linestyle="--", label=b)
      if any("heldout" in s["eval"] for s in evaluated):
        heldout = [s["eval"].get("heldout", {}) for s in evaluated]
        n = max(h.get("num_problems", 0) for h in heldout)
        ax.plot(xs, [h.get("accuracy") for h in heldout], marker="s", linestyle=":",
                label=f"held-out uncovered ({n})")
      ax.set_xticks(list(xs), [s["name"] for s in evaluated], rotation=20)
      ax.set_ylabel("held-out accuracy (greedy)")
      ax.legend()
      fig.tight_layout()
      _save_png(fig, plots / "accuracy_by_stage.png")

  def _plot_bucket_rewards(self, recs, plots, window: int = 10):
    """plots/reward_by_bucket.png: each RL stage's accuracy reward per data bucket (fresh
    rollouts, moving average over `window` logged steps): where RL finds its signal."""
    import matplotlib.pyplot as plt
    prefix = "reward_accuracy_"
    series = {}
    for r in recs:
      for k, v in r.items():
        if k.startswith(prefix) and v is not None:
          series.setdefault((r["stage"], k[len(prefix):]), []).append((r["step"], v))
    if not series:
      return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (stage, bucket), pts in series.items():
      xs, ys = map(np.asarray, zip(*pts))
      w = min(window, len(ys))
      smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
      ax.plot(xs[w - 1:], smooth, label=f"{stage} {bucket}")
    ax.set_xlabel("step")
    ax.set_ylabel(f"accuracy reward ({window}-step mean)")
    ax.legend()
    fig.tight_layout()
    _save_png(fig, plots / "reward_by_bucket.png")

  def close(self):
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self.flush()
    if self._tb_staging is not None:
      shutil.rmtree(self._tb_staging, ignore_errors=True)
      self._tb_staging = None


def _save_png(fig, path: epath.Path):
  import matplotlib.pyplot as plt
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)
