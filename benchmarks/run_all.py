"""Run the benchmarks and write benchmarks/RESULTS.md from their JSON results.

  python -m benchmarks.run_all                      # every benchmark, then RESULTS.md
  python -m benchmarks.run_all --only rollout grpo_vs_trl
  python -m benchmarks.run_all --quick              # fewer/smaller steps (noisier figures)
  python -m benchmarks.run_all --from_json          # only rewrite RESULTS.md, run nothing
  python -m benchmarks.run_all --list

Each benchmark is a script in benchmarks/ run as a subprocess; it writes
benchmarks/results/<name>.json, which this file reads to write one table per benchmark with its
headline figure against the project's target. A missing JSON file reads "not run". --quick
overwrites the JSON files too (with the smaller settings they record).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time
from typing import Callable

from benchmarks import provenance

BENCH_DIR = pathlib.Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def machine_info() -> dict:
  """CPU model, cores, RAM, python/jax versions and the accelerator JAX sees."""
  info = {"cpu_model": None, "cpu_count": os.cpu_count(), "ram_gib": None,
          "python": platform.python_version(), "platform": platform.platform()}
  try:
    cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    info["cpu_model"] = m.group(1).strip() if m else None
    meminfo = pathlib.Path("/proc/meminfo").read_text()
    m = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)
    info["ram_gib"] = round(int(m.group(1)) / 2**20, 1) if m else None
  except OSError:  # not Linux
    info["cpu_model"] = platform.processor() or None
  try:
    import jax
    info["jax"] = jax.__version__
    info["backend"] = jax.default_backend()
    devices = jax.devices()
    info["accelerator"] = (None if info["backend"] == "cpu"
                           else f"{len(devices)} x {devices[0].device_kind}")
  except Exception as e:  # a broken accelerator install is worth reporting, not fatal
    info["jax_error"] = f"{type(e).__name__}: {e}"
  return info


# ------------------------------------------------------------------ per-benchmark tables
def _fmt(x, spec=".2f"):
  return "-" if x is None else format(x, spec)


def _versions(d: dict) -> str:
  keys = ("jax", "torch", "transformers", "trl")
  parts = [f"{k} {d[k]}" for k in keys if d.get(k)]
  cpus = d.get("cpu_count") or (d.get("machine") or {}).get("cpu_count")
  if cpus:
    parts.append(f"{cpus} CPUs")
  return ", ".join(parts)


def train_step_md(d):
  rows = ["| implementation | median s | tokens/s | first step s |", "|---|---:|---:|---:|"]
  for r in d["results"]:
    rows.append(f"| {r['name']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | "
                f"{r['first_step_s']:.2f} |")
  setup = (f"SFT step (forward, loss, backward, AdamW) on batch {d['batch']} x {d['seq_len']}, "
           f"{d['params'] / 1e6:.2f}M params, our moe_impl {d.get('moe_impl')} with "
           f"capacity_factor {d.get('capacity_factor')}, transformers experts "
           f"{d.get('hf_experts_implementation')} with {d.get('torch_threads')} threads, "
           f"median of {d['runs']} steps; logits parity {d['logits_parity']:.1e}; headline: "
           f"{d.get('ratio_basis', 'r1jax make_step / transformers')}")
  return d["ratio"], setup, rows


def rollout_md(d):
  rows = ["| batch x new tokens | implementation | median s | new tokens/s | ratio |",
          "|---|---|---:|---:|---:|"]
  for sh in d.get("shapes") or [{"batch": d["batch"], "new_tokens": d["new_tokens"],
                                  "results": d["results"], "ratio": d["ratio"]}]:
    for r in sh["results"]:
      rows.append(f"| {sh['batch']} x {sh['new_tokens']} | {r['name']} | {r['seconds']:.3f} | "
                  f"{r['tokens_per_s']:.0f} | |")
    rows.append(f"| {sh['batch']} x {sh['new_tokens']} | ratio | | | {sh['ratio']:.2f}x |")
  setup = (f"batch {d['batch']} x {d['new_tokens']} sampled tokens after {d['prompt_len']}-token "
           f"prompts, {d['params'] / 1e6:.2f}M params, median of {d['runs']} "
           f"{'round-robin ' if d.get('timing') == 'round-robin' else ''}runs after a "
           f"warm-up; logits parity {d['logits_parity']:.1e}")
  return d["ratio"], setup, rows


def moe_scaling_md(d):
  rows = ["| impl | experts | params | step ms | tokens/s | step ratio | fwd+bwd ms | "
          "fwd+bwd ratio | dropped % |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in d["rows"]:
    rows.append(f"| {r['impl']} | {r['experts']} | {r['params_M']:.2f}M | {r['step_ms']:.0f} | "
                f"{r['tokens_per_s']:.0f} | {r['ratio']:.2f} | {r['fwd_bwd_ms']:.0f} | "
                f"{r['fwd_bwd_ratio']:.2f} | {100 * r['drop_frac_mean']:.1f} |")
  by_e = {(r["impl"], r["experts"]): r for r in d["rows"]}
  impl = d["rows"][0]["impl"] if d["rows"] else None
  lo, hi = by_e.get((impl, 8)), by_e.get((impl, 64))
  headline = hi["step_ms"] / lo["step_ms"] if lo and hi else None
  setup = (f"SFT step on {d['batch'][0]} x {d['batch'][1]} tokens as n_routed_experts grows "
           f"with top-k fixed, median of {d['rounds']} round-robin rounds; headline: 64-expert "
           f"/ 8-expert step time ({impl})")
  if lo and hi:
    setup += f"; forward+backward alone: {hi['fwd_bwd_ms'] / lo['fwd_bwd_ms']:.2f}"
  return headline, setup, rows


def kernels_md(d):
  if d.get("backend") == "cpu" or "results" not in d:
    rows = ["| interpret-mode check | value |", "|---|---:|"]
    rows += [f"| {k} | {v:.2e} |" for k, v in d.get("interpret_correctness", {}).items()]
    return None, ("CPU: Pallas kernels run in interpret mode, so only their correctness "
                  "against the references is checked; FP8 timings need a GPU or TPU"), rows
  rows = ["| kernel | ms | TFLOP/s |", "|---|---:|---:|"]
  speedups = []
  by_name = {r["name"]: r for r in d["results"]}
  for r in d["results"]:
    if "error" in r:
      rows.append(f"| {r['name']} | error: {r['error']} | |")
      continue
    rows.append(f"| {r['name']} | {r['ms']:.3f} | {r['tflops']:.1f} |")
  for name, r in by_name.items():  # per GEMM shape: the fastest prequantized FP8 row over bf16
    if name.startswith("bf16 jnp.dot ") and "tflops" in r:
      shape = name.rsplit(" ", 1)[1]
      fp8 = [x["tflops"] for n, x in by_name.items() if "tflops" in x and n.endswith(" " + shape)
             and (n.startswith("fp8 matmul") or n.startswith("fp8 mosaic"))]
      if fp8:
        speedups.append(max(fp8) / r["tflops"])
  setup = (f"{d.get('device')} ({d.get('backend')}); headline: the fastest prequantized FP8 "
           f"GEMM's TFLOP/s over bf16 jnp.dot, the smallest over the DeepSeek-V3 shapes")
  return (min(speedups) if speedups else None), setup, rows


def grpo_vs_trl_md(d):
  rows = ["| implementation | step s | rollout s | update s | completion tokens/s | "
          "first step s |", "|---|---:|---:|---:|---:|---:|"]
  for r in d["results"]:
    rows.append(f"| {r['name']} | {r['seconds']:.2f} | {r['rollout_s']:.2f} | "
                f"{r['update_s']:.2f} | {r['completion_tokens_per_s']:.0f} | "
                f"{r['first_step_s']:.1f} |")
  setup = (f"one GRPO step (generate, score, update): {d['prompts']} prompts x {d['group']} "
           f"completions x {d['new_tokens']} tokens after {d['prompt_len']}-token prompts, loss "
           f"{d['loss_type']}, beta 0, {d['params'] / 1e6:.2f}M params, the two run side by "
           f"side, median of each one's last {d['runs']} steps; our first step includes the JIT "
           f"compiles; our capacity_factor {d['capacity_factor']} dropped "
           f"{100 * d.get('moe_drop_frac_mean', 0):.1f}% of expert assignments (transformers: "
           f"dropless); logits parity {d['logits_parity']:.1e}; headline: TRL step time / "
           f"r1jax step time")
  check = d.get("loss_crosscheck")
  if check:
    rows += ["", "| loss cross-check (same inputs) | beta | r1jax | TRL | abs diff |",
             "|---|---:|---:|---:|---:|"]
    rows += [f"| {v['loss_type']} | {v['beta']} | {v['r1jax']:.8f} | {v['trl']:.8f} | "
             f"{v['abs_diff']:.1e} |" for v in check["variants"]]
    rows.append(f"| gradient ({check['grad_loss_type']}), max abs diff over "
                f"{check['grad_tensors_compared']} tensors | 0 | | | "
                f"{check['grad_max_abs_diff']:.1e} |")
    kl = check.get("trl_default_kl_bias_correction")
    if kl:
      rows += ["", f"TRL's default `use_bias_correction_kl=True` (ratio-weighted KL) is a "
               f"different objective from r1jax's k3 term: with beta {kl['beta']} its loss "
               f"differs by {kl['abs_diff_to_r1jax']:.1e} on the same inputs (the rows above "
               f"set it off)."]
  return d["ratio"], setup, rows


def _shares(share: dict) -> str:
  """"a % / b % / c %": the wall time with 0, 1 and 2+ ops running (step_profile.op_summary)."""
  return " / ".join(f"{100 * share.get(k, 0.0):.0f} %" for k in ("0", "1", "2+"))


def _op_kind_rows(title: str, by_kind: list[dict], ms: str = ".2f", ops: str = ".0f"):
  rows = [f"| {title} | thread ms per step | ops per step |", "|---|---:|---:|"]
  return rows + [f"| {k['kind']} | {k['ms_per_step']:{ms}} | {k['ops_per_step']:{ops}} |"
                 for k in by_kind[:12]]


def _traced(p: dict) -> str:
  """What a profile of whole steps says, for a setup line; its headline is share["2+"]."""
  return (f"{p['steps']} traced steps of {p['step_wall_ms']:.1f} ms wall, "
          f"{p['ops_per_step']:.0f} ops and {p['op_thread_ms_per_step']:.1f} ms of op thread time "
          f"each; share of the wall time with 0 / 1 / 2+ ops running: "
          f"{_shares(p['wall_share_by_ops_running'])}; headline: the share with both cores "
          "running an op")


def step_profile_md(d):
  p = d["profile"]
  rows = ["| timed (round-robin) | median ms | tokens/s |", "|---|---:|---:|"]
  tokens = d["batch"] * d["seq_len"]
  rows += [f"| {r['name']} | {1e3 * r['seconds']:.1f} | {tokens / r['seconds']:.0f} |"
           for r in d["timed"]]
  rows += [""] + _op_kind_rows("op kind (traced full steps)", p["by_kind"])
  setup = (f"the tiny MoE's SFT step ({d['batch']} x {d['seq_len']} tokens, MTP off) on "
           f"{d['cpu_devices']} CPU device; " + _traced(p))
  return p["wall_share_by_ops_running"].get("2+", 0.0), setup, rows


def step_threads_md(d):
  rows = ["| side | 1 core ms | 2 cores ms | gain from the 2nd core |", "|---|---:|---:|---:|"]
  rows += [f"| {r['name']} | {1e3 * r['one_core_s']:.1f} | {1e3 * r['two_cores_s']:.1f} | "
           f"{r['second_core_speedup']:.2f}x |" for r in d["rows"]]
  ratios = d.get("r1jax_over_transformers") or {}
  setup = (f"train_step.py's SFT step ({d['batch']} x {d['seq_len']} tokens) in child processes "
           f"pinned to 1 and 2 cores, median of {d['rounds']} children's medians of {d['runs']} "
           "steps; headline: r1jax's step speed / transformers' on one core"
           + (f" ({ratios['2']:.2f}x on two)" if "2" in ratios else ""))
  return ratios.get("1"), setup, rows


def rollout_profile_md(d):
  rows = ["| shape | median s | new tokens/s | ms per decode step | ops per step | "
          "op thread ms per step | wall with 0 / 1 / 2+ ops running |",
          "|---|---:|---:|---:|---:|---:|---|"]
  for sh in d["shapes"]:
    p = sh["profile"]
    rows.append(f"| {sh['batch']} x {sh['new_tokens']} | {sh['seconds']:.3f} | "
                f"{sh['tokens_per_s']:.0f} | {sh['ms_per_new_token']:.2f} | "
                f"{p['ops_per_step']:.0f} | {p['op_thread_ms_per_step']:.2f} | "
                f"{_shares(p['wall_share_by_ops_running'])} |")
  head = d["shapes"][0]["profile"]
  rows += [""] + _op_kind_rows(
      f"op kind ({d['shapes'][0]['batch']} x {d['shapes'][0]['new_tokens']}; per decode step)",
      head["by_kind"], ms=".3f", ops=".1f")
  setup = (f"r1jax's sampler on rollout.py's tiny MoE ({d['prompt_len']}-token prompts, no "
           f"stop), one traced generate call per shape on {d['cpu_devices']} CPU device, per "
           "new token; headline: the share of the first shape's wall time with both cores "
           "running an op")
  return head["wall_share_by_ops_running"].get("2+", 0.0), setup, rows


def grpo_update_profile_md(d):
  p = d["profile"]
  rows = _op_kind_rows("op kind (traced update steps)", p["by_kind"])
  setup = (f"r1jax's GRPO update at grpo_vs_trl.py's shape ({d['rows']} rows x {d['positions']} "
           f"positions, the tiny MoE): median {1e3 * d['seconds']:.1f} ms; " + _traced(p))
  shared = d.get("share_prompt")
  if shared:
    setup += (f". With share_prompt (the {shared['prefix_positions']}-token prompt once per "
              f"group, {shared['positions']} positions per row): median "
              f"{1e3 * shared['seconds']:.1f} ms round-robin beside it, {shared['speedup']:.2f}x, "
              f"first-step losses {shared['first_step_loss_difference']:.1e} apart")
  return p["wall_share_by_ops_running"].get("2+", 0.0), setup, rows


def moe_profile_md(d):
  small, large = (str(e) for e in d["experts"])
  ps, pl = d["profiles"][small], d["profiles"][large]
  rows = [f"| op kind | thread ms per step ({small} experts) | ({large} experts) | added | "
          f"ops ({small}) | ops ({large}) |", "|---|---:|---:|---:|---:|---:|"]
  rows += [f"| {r['kind']} | {r['small_ms']:.2f} | {r['large_ms']:.2f} | "
           f"{r['large_ms'] - r['small_ms']:+.2f} | {r['small_ops']:.0f} | {r['large_ops']:.0f} |"
           for r in d["by_kind_added"][:12]]
  ratio = pl["step_wall_ms"] / ps["step_wall_ms"]
  setup = (f"moe_scaling.py's step ({d['impl']}, 16 x 128 tokens), {small} vs {large} routed "
           f"experts, {d['traced']} traced steps each: {ps['step_wall_ms']:.1f} vs "
           f"{pl['step_wall_ms']:.1f} ms wall, {ps['op_thread_ms_per_step']:.1f} vs "
           f"{pl['op_thread_ms_per_step']:.1f} ms of op thread time per step; headline: the "
           "traced wall-time ratio")
  return ratio, setup, rows


def grpo_async_md(d):
  rows = ["| mode | round | devices | step s | rollout s | reward | sync median / step |",
          "|---|---:|---:|---:|---:|---:|---:|"]
  rows += [f"| {r['mode']} | {r['round']} | {r['devices']} | {r['step_s']:.3f} | "
           f"{r['rollout_s']:.3f} | {r['reward']:.3f} | {r['speedup_vs_sync_median']:.2f}x |"
           for r in d["rows"]]
  import statistics
  median = lambda mode: statistics.median(r["step_s"] for r in d["rows"] if r["mode"] == mode)
  ratio = median("sync") / median("async")
  setup = (f"r1_tiny's grpo stage through the launcher from {d['from_run']} (seed {d['seed']}), "
           f"{d['steps']} steps per run, median step_seconds after the first {d['skip']}; sync on "
           "one CPU device, async (staleness 1) with the update on one simulated device and the "
           "next rollout on another; headline: sync step time / async step time")
  return ratio, setup, rows


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  title: str
  quick_args: tuple[str, ...]
  writer: Callable
  target: float | None  # the headline's target; None: reported only
  higher_is_better: bool = True
  target_text: str = ""
  cpu_note: str = ""
  suffix: str = "x"  # a speed-up; "" for a plain ratio
  # the script's file name when it is not `<name>.py` (a `kernels.py` here would shadow the
  # `kernels` package that transformers imports, since a script's folder leads sys.path)
  script_name: str = ""

  @property
  def script(self) -> pathlib.Path:
    return BENCH_DIR / (self.script_name or f"{self.name}.py")


BENCHMARKS = (
    Benchmark("train_step", "SFT train step vs transformers", ("--warmup", "1", "--runs", "3"),
              train_step_md, 1.3,
              target_text="r1jax launcher tokens/s >= 1.3x transformers at its defaults"),
    Benchmark("rollout", "Rollout (KV-cache sampling) vs transformers generate",
              ("--runs", "1", "--shapes", "128x40"), rollout_md, 4.0,
              target_text="r1jax new tokens/s >= 4x transformers `generate` at the GRPO shape "
              "(>= 10x at batch 16)"),
    Benchmark("moe_scaling", "MoE cost as experts grow (top-k fixed)",
              ("--experts", "8,64", "--rounds", "3"), moe_scaling_md, 1.3,
              higher_is_better=False, target_text="64-expert / 8-expert step time <= 1.3 (issue 18)",
              suffix=""),
    Benchmark("kernels", "Pallas kernels: FP8 GEMM and grouped matmul", (), kernels_md, 1.5,
              target_text="FP8 GEMM >= 1.5x bf16 on H200",
              cpu_note="timing needs an accelerator; CPU checks interpret-mode correctness",
              script_name="pallas_kernels_bench.py"),
    Benchmark("grpo_vs_trl", "GRPO step vs TRL GRPOTrainer",
              ("--prompts", "4", "--group", "4", "--new_tokens", "16", "--warmup", "1",
               "--runs", "2"), grpo_vs_trl_md, None,
              target_text="none set (> 1: r1jax faster)"),
    Benchmark("step_profile", "Where the SFT step's time goes on XLA:CPU (a profile)",
              ("--runs", "5", "--traced", "2"), step_profile_md, None,
              target_text="none (it explains train_step's gap)", suffix=""),
    Benchmark("step_threads", "What the second core gives each side's SFT step",
              ("--runs", "3", "--warmup", "1", "--rounds", "1"), step_threads_md, None,
              target_text="none (it tests step_profile's reading of train_step's gap)"),
    Benchmark("rollout_profile", "Where the sampler's time goes on XLA:CPU (a profile)",
              ("--runs", "1", "--shapes", "128x40"), rollout_profile_md, None,
              target_text="none (it explains rollout's gap)", suffix=""),
    Benchmark("grpo_update_profile", "Where the GRPO update's time goes on XLA:CPU (a profile)",
              ("--runs", "2", "--traced", "1"), grpo_update_profile_md, None,
              target_text="none (it explains grpo_vs_trl's update)", suffix=""),
    Benchmark("grpo_async", "Asynchronous GRPO (one step off-policy) vs synchronous, launcher",
              ("--steps", "12", "--skip", "4", "--rounds", "1"), grpo_async_md, None,
              target_text="none set (> 1: the asynchronous step is faster)"),
    Benchmark("moe_profile", "Where the MoE step's added time goes as experts grow (a profile)",
              ("--traced", "2"), moe_profile_md, None,
              target_text="none (it explains moe_scaling's ratio)", suffix=""),
)
BY_NAME = {b.name: b for b in BENCHMARKS}


def _ratio_text(value, b: Benchmark) -> str:
  if value is None:
    return "-"
  return f"{value:.2f}{b.suffix}"


def section(b: Benchmark, results_dir: pathlib.Path, runs: dict) -> tuple[list[str], list[str]]:
  """(summary row, section lines) for one benchmark."""
  path = results_dir / f"{b.name}.json"
  lines = [f"## {b.title} (`{b.name}`)", ""]
  ran = runs.get(b.name)
  if ran and ran["returncode"] != 0:
    lines += [f"**This run failed** (exit status {ran['returncode']} after "
              f"{ran['seconds']:.0f} s); the figures below, if any, are older.", ""]
  if not path.exists():
    lines += [f"not run (no `{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`)."
              f" Run `python benchmarks/{b.script.name}`.", ""]
    return [f"| {b.name} | not run | {b.target_text} | - | - | - |"], lines
  try:
    d = json.loads(path.read_text())
    measured = provenance.written(d, path)
    headline, setup, rows = b.writer(d)
  except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
    measured = provenance.written({}, path)
    lines += [f"could not read `{path.name}` ({type(e).__name__}: {e}).", ""]
    return [f"| {b.name} | unreadable | {b.target_text} | - | {measured} | - |"], lines
  if b.target is None:
    status = "reported"
  elif headline is None:
    status = "not measured" + (f" ({b.cpu_note})" if b.cpu_note else "")
  else:
    met = headline >= b.target if b.higher_is_better else headline <= b.target
    status = "met" if met else "not met"
  lines += [f"Headline: **{_ratio_text(headline, b)}** (target: {b.target_text}; {status}). "
            f"JSON {measured}, at commit {provenance.describe(d)}" +
            (f" ({_versions(d)})." if _versions(d) else "."), "",
            setup + ".", ""] + rows + [""]
  return [f"| {b.name} | {_ratio_text(headline, b)} | {b.target_text} | {status} | "
          f"{measured} | {provenance.describe(d)} |"], lines


def write_markdown(out: pathlib.Path, results_dir: pathlib.Path, runs: dict | None = None,
                   command: str = "") -> str:
  runs = runs or {}
  m = machine_info()
  accel = m.get("accelerator") or f"none (JAX backend {m.get('backend', '?')})"
  head = [
      "# Benchmark results", "",
      f"Generated by `{command or 'python -m benchmarks.run_all'}` on "
      f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Each benchmark's own JSON "
      "(benchmarks/results/) records the settings and library versions it ran with; the "
      "machine below is the one that wrote this file.", "",
      "| machine | |", "|---|---|",
      f"| CPU | {m.get('cpu_model')} ({m.get('cpu_count')} cores visible) |",
      f"| RAM | {_fmt(m.get('ram_gib'), '.1f')} GiB |",
      f"| accelerator | {accel} |",
      f"| python / jax | {m.get('python')} / {m.get('jax', m.get('jax_error'))} |",
      f"| platform | {m.get('platform')} |", "",
      "| benchmark | headline | target | status | JSON | commit |",
      "|---|---:|---|---|---|---|"]
  summary, body = [], []
  for b in BENCHMARKS:
    row, lines = section(b, results_dir, runs)
    summary += row
    body += lines
  notes = BENCH_DIR / "results" / "h200" / "README.md"  # the first accelerator run (issue 13)
  if notes.exists():
    body += [notes.read_text().rstrip(), ""]
  text = "\n".join(head + summary + [""] + body).rstrip() + "\n"
  out.write_text(text)
  return text


def run(b: Benchmark, quick: bool) -> dict:
  cmd = [sys.executable, str(b.script), *(b.quick_args if quick else ())]
  print(f"== {b.name}: {' '.join(cmd[1:])}", flush=True)
  t0 = time.perf_counter()
  rc = subprocess.run(cmd, cwd=ROOT).returncode
  seconds = time.perf_counter() - t0
  print(f"== {b.name}: exit {rc} after {seconds:.0f} s", flush=True)
  return {"returncode": rc, "seconds": seconds}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", nargs="+", choices=list(BY_NAME), metavar="NAME",
                  help=f"benchmarks to run, of: {', '.join(BY_NAME)}")
  ap.add_argument("--quick", action="store_true", help="smaller, noisier settings")
  ap.add_argument("--from_json", action="store_true",
                  help="run nothing; rewrite RESULTS.md from the existing JSON files")
  ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
  ap.add_argument("--results_dir", default=str(RESULTS_DIR), help=argparse.SUPPRESS)
  ap.add_argument("--out", default=str(RESULTS_MD), help="the markdown file to write")
  a = ap.parse_args(argv)
  if a.list:
    for b in BENCHMARKS:
      print(f"{b.name:12s} benchmarks/{b.script.name:16s} {b.title}; target: {b.target_text}")
    return 0
  runs = {}
  if not a.from_json:
    for name in a.only or list(BY_NAME):
      runs[name] = run(BY_NAME[name], a.quick)
  command = "python -m benchmarks.run_all " + " ".join(
      (argv if argv is not None else sys.argv[1:]))
  write_markdown(pathlib.Path(a.out), pathlib.Path(a.results_dir), runs, command.strip())
  print(f"wrote {a.out}")
  return 1 if any(r["returncode"] for r in runs.values()) else 0


if __name__ == "__main__":
  sys.exit(main())
