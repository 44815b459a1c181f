"""The benchmark driver's listing and RESULTS.md writer, and grpo_vs_trl's loss cross-check
(r1jax's GRPO loss and gradient equal TRL's on identical inputs) at a tiny size."""

import json
import os
import shutil
import subprocess
import tempfile

import pytest

from benchmarks import run_all
from r1jax import hf
from r1jax.model.config import ModelConfig
from r1jax.run_config import tiny_moe_fields
import testing


def test_list_names_every_benchmark(capsys):
  assert run_all.main(["--list"]) == 0
  out = capsys.readouterr().out
  for b in run_all.BENCHMARKS:
    assert b.name in out and b.script.exists(), b.name


def test_no_script_shadows_an_installed_package():
  """`python benchmarks/x.py` puts benchmarks/ first on sys.path, so a script named like an
  installed package (kernels.py vs the `kernels` package transformers imports) breaks the peer."""
  import importlib.util
  import sys
  bench_dir = str(run_all.BENCH_DIR)
  saved = list(sys.path)
  try:
    sys.path[:] = [p for p in sys.path if p.rstrip("/") != bench_dir.rstrip("/")]
    clashes = [f.stem for f in run_all.BENCH_DIR.glob("*.py")
               if f.stem != "__init__" and importlib.util.find_spec(f.stem) is not None]
  finally:
    sys.path[:] = saved
  assert not clashes, f"benchmarks/ scripts shadow installed packages: {clashes}"


def test_markdown_from_json_and_missing(tmp_path):
  results = tmp_path / "results"
  results.mkdir()
  for path in run_all.RESULTS_DIR.glob("*.json"):
    shutil.copy(path, results)
  (results / "rollout.json").unlink(missing_ok=True)
  text = run_all.write_markdown(tmp_path / "RESULTS.md", results)
  assert (tmp_path / "RESULTS.md").read_text() == text
  for b in run_all.BENCHMARKS:
    assert f"(`{b.name}`)" in text, b.name
  assert "| rollout | not run |" in text
  assert "| CPU |" in text and "accelerator" in text


def test_markdown_headline_and_verdict(tmp_path):
  row = {"impl": "capacity", "params_M": 1.0, "step_ms": 100.0, "tokens_per_s": 1.0,
         "ratio": 1.0, "fwd_bwd_ms": 80.0, "fwd_bwd_ratio": 1.0, "drop_frac_mean": 0.0}
  d = {"batch": [16, 128], "rounds": 3, "cpu_count": 2, "jax": "x",
       "rows": [dict(row, experts=8), dict(row, experts=64, step_ms=130.0, ratio=1.3)]}
  (tmp_path / "moe_scaling.json").write_text(json.dumps(d))
  text = run_all.write_markdown(tmp_path / "R.md", tmp_path)
  assert "| moe_scaling | 1.30 |" in text and "not met" in text
  row = next(line for line in text.splitlines() if line.startswith("| moe_scaling |"))
  assert row.endswith(" | not recorded |"), row  # no commit in this JSON
  d.update(commit="0123456789abcdef", dirty=True)
  (tmp_path / "moe_scaling.json").write_text(json.dumps(d))
  text = run_all.write_markdown(tmp_path / "R.md", tmp_path)
  assert " | 0123456 + uncommitted changes |" in text
  assert ", at commit 0123456 + uncommitted changes" in text


def test_results_record_the_commit_they_were_measured_on():
  from benchmarks import provenance
  got = provenance.code()
  assert got["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=run_all.ROOT,
                                         capture_output=True, text=True).stdout.strip()
  assert isinstance(got["dirty"], bool)
  assert provenance.describe({"commit": got["commit"], "dirty": False}) == got["commit"][:7]


def test_dirty_ignores_the_benchmarks_own_result_files(monkeypatch):
  from benchmarks import provenance
  status = {"results": " M benchmarks/results/rollout.json\n M benchmarks/RESULTS.md",
            "code": " M benchmarks/results/rollout.json\n M r1jax/model/decoder.py"}
  for kind, expected in (("results", False), ("code", True)):
    monkeypatch.setattr(provenance, "_git",
                        lambda *args, k=kind: status[k] if args[0] == "status" else "abc")
    got = provenance.code()
    assert {k: got[k] for k in ("commit", "dirty")} == {"commit": "abc", "dirty": expected}, kind


def test_dirty_reads_git_status_as_git_prints_it(monkeypatch):
  """The first line of `git status --porcelain` starts with a space; a stripped output once
  shifted its path by one character and flagged a changed RESULTS.md as code."""
  from benchmarks import provenance
  out = {"rev-parse": "abc\n", "status": " M benchmarks/RESULTS.md\n M benchmarks/results/x.json\n"}
  monkeypatch.setattr(provenance.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
      cmd, 0, stdout=out[cmd[1]], stderr=""))
  assert provenance.code()["dirty"] is False


def test_results_record_when_they_were_written(tmp_path):
  """RESULTS.md once read each JSON's time from its mtime, which a clone resets to the clone's
  time: a JSON's own record comes first, then the time git committed it, then the mtime."""
  import datetime
  from benchmarks import provenance
  got = datetime.datetime.strptime(provenance.code()["written"], provenance.TIME_FORMAT)
  now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
  assert abs((now - got).total_seconds()) < 120
  assert (provenance.written({"written": "2026-01-02 03:04 UTC"}, tmp_path)
          == "written 2026-01-02 03:04 UTC")
  committed = run_all.RESULTS_DIR / "moe_scaling.json"  # committed, without its own record
  seconds = subprocess.run(["git", "log", "-1", "--format=%ct", "--", str(committed)],
                           cwd=run_all.ROOT, capture_output=True, text=True).stdout.strip()
  assert provenance.written({}, committed) == "committed " + datetime.datetime.fromtimestamp(
      int(seconds), datetime.timezone.utc).strftime(provenance.TIME_FORMAT)
  written = provenance.write_result(tmp_path / "sub" / "r.json", {"ratio": 2.0})
  got = json.loads(written.read_text())  # the result with the code's provenance added
  assert got["ratio"] == 2.0 and got["commit"] and "dirty" in got and got["written"]
  outside = tmp_path / "x.json"
  outside.write_text("{}")
  os.utime(outside, (0, 0))
  assert provenance.written({}, outside) == "file time 1970-01-01 00:00 UTC"


def test_step_profile_sums_ops_and_their_overlap():
  from benchmarks import step_profile
  step = "ThunkExecutor::Execute (wait for completion)"
  x = lambda name, ts, dur: {"ph": "X", "name": name, "ts": ts, "dur": dur}
  events = [x(step, 0, 100), x(step, 200, 100),  # two steps of 100 us
            x("dot.1", 0, 60), x("copy.3", 40, 40),  # step 1: 40 alone, 20 overlapped, 20 alone
            x("dot.2", 200, 50), x("end: dot.2", 250, 0), x("ThreadpoolListener::Record", 200, 90),
            x("$api.py:1 block_until_ready", 0, 300)]
  got = step_profile.op_summary(events, steps=2)
  assert got["steps"] == 2 and got["step_wall_ms"] == pytest.approx(0.1)
  assert got["ops_per_step"] == 1.5 and got["op_thread_ms_per_step"] == pytest.approx(0.075)
  assert [k["kind"] for k in got["by_kind"]] == ["dot", "copy"]
  assert [k["ms_per_step"] for k in got["by_kind"]] == pytest.approx([0.055, 0.02])
  # of 200 us of step wall time: 70 with no op (20 + 50 at the steps' ends), 110 with one op,
  # 20 with two
  assert got["wall_share_by_ops_running"] == pytest.approx({"0": 0.35, "1": 0.55, "2+": 0.1})
  # whole=True: one window from the first op to the last (0-250 us), over 5 decode steps
  whole = step_profile.op_summary(events, steps=5, whole=True)
  assert whole["steps"] == 5 and whole["step_wall_ms"] == pytest.approx(0.05)
  assert whole["ops_per_step"] == pytest.approx(0.6)
  # of 250 us: 40 + 20 + 50 with one op, 20 with two, 120 (80-200) with none
  assert whole["wall_share_by_ops_running"] == pytest.approx(
      {"0": 120 / 250, "1": 110 / 250, "2+": 20 / 250})


def test_grpo_loss_and_grad_match_trl():
  from benchmarks import grpo_vs_trl
  from r1jax.data.tokenizer import CharTokenizer

  cfg = ModelConfig.from_config(tiny_moe_fields(
      num_hidden_layers=2, num_nextn_predict_layers=0, capacity_factor=None))
  params = testing.random_params(cfg, seed=1)
  hf_tok = grpo_vs_trl.char_hf_tokenizer(CharTokenizer())
  with tempfile.TemporaryDirectory() as model_dir:
    hf.save(model_dir, cfg, params)
    check = grpo_vs_trl.loss_crosscheck(
        cfg, params, model_dir, hf_tok, prompts=2, group=2, new_tokens=8,
        variants=(("dr_grpo", 0.0), ("grpo", 0.04)), grad_loss_type="dr_grpo")
  assert check["max_abs_diff"] < 1e-5, check["variants"]
  assert check["grad_tensors_compared"] > 10
  assert check["grad_max_abs_diff"] < 1e-5 * max(check["grad_max_abs"], 1.0), check
  # TRL's default KL (ratio-weighted) is a different objective: the check must see it
  assert check["trl_default_kl_bias_correction"]["abs_diff_to_r1jax"] > 1e-7
