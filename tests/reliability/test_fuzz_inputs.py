"""Property tests of the two places user input enters: command-line config overrides and data
records.

Overrides: keys drawn from the real config trees (plus bogus ones), values of every sort (numbers
negative, huge, NaN; empty strings, tuples, dicts, quotes, control characters). The launcher's
`parse_config` must return a config that `run_config.validate` accepts, or raise a UserError
with a one-line message: never another exception. A few command lines also go through
`python -m r1jax.launch` (exit status 2, exactly one `error: ` line on stderr, no traceback).

Records: JSONL lines for SFT and RL (missing fields, wrong types, huge strings and numbers, deep
nesting, invalid JSON, bytes that are not UTF-8) through `read_records`: either records of
strings, or a DataError naming the file and line.

Deterministic (derandomized) and sized for CI; the number of inputs tried is printed (pytest -s).
"""

import json
import math
import os
import string
import subprocess
import sys
import tempfile

import hypothesis.configuration
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import launcher
from r1jax import launch, run_config
from r1jax.data import pipeline
from r1jax.errors import DataError, UserError

CONFIGS = [launcher.SFT_TINY, os.path.join(launcher.ROOT, "configs", "r1_tiny.py"),
           os.path.join(launcher.ROOT, "configs", "grpo_tiny.py")]
TRIED = {"overrides": 0, "valid configs": 0, "config errors": 0, "records": 0,
         "valid record files": 0, "data errors": 0, "launcher runs": 0}
# Hypothesis caches (unicode tables, constants) outside the repository.
hypothesis.configuration.set_hypothesis_home_dir(
    os.path.join(tempfile.gettempdir(), "r1jax-hypothesis"))
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def report_inputs_tried():
  yield
  print(f"\nfuzz_inputs: {TRIED}")


def config_paths(config, prefix=""):
  """Every dotted key of a config tree, sections included."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if hasattr(value, "items"):
      out += config_paths(value, prefix + key + ".")
  return out


def config_leaves(config, prefix=""):
  """(dotted key, value) of every non-section entry of a config tree."""
  out = []
  for key, value in config.items():
    if hasattr(value, "items"):
      out += config_leaves(value, prefix + key + ".")
    else:
      out.append((prefix + key, value))
  return out


PARSED = [launch.parse_config(["launch", "--config", path]) for path in CONFIGS]
REAL_KEYS = sorted({p for config in PARSED for p in config_paths(config)})
REAL_LEAVES = sorted({(k, repr(v)): (k, v) for c in PARSED for k, v in config_leaves(c)}.values(),
                     key=repr)

identifier = st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=12)
bogus_keys = st.one_of(
    identifier,                                                    # a top-level key
    st.tuples(st.sampled_from(REAL_KEYS), identifier).map(".".join),  # a child of a real one
    st.text(string.printable, max_size=20),                        # anything at all
    st.sampled_from(["", ".", "..", "model.", ".seed", "stages..sft", "model.__class__",
                     "stages.sft.kind.x", "__dict__", "seed.real"]))
special_values = st.sampled_from([
    "", " ", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "1e400", "-1e400", "1e-400",
    "None", "none", "null", "True", "False", "true", "0", "-0", "-1", "1.5", "0x10", "1_000",
    "9" * 400, "-" + "9" * 400, "()", "(1,)", "(1, 2)", "('sft',)", "('a', 'b')", "[]", "[1]",
    "{}", "{'a': 1}", "{1: 2}", "'", '"', "'quoted'", '"quoted"', "\\", "é", "\u202e", "\x01",
    "\t", "1 2", "__import__('os')", "lambda: 0", "sft", "grpo", "skip", "stop", "float32"])
values = st.one_of(
    special_values,
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=30).filter(lambda s: "\x00" not in s),
    st.tuples(st.integers(-5, 5), st.integers(-5, 5)).map(str))


def typed_values(default):
  """Values of the default's own type (what parses), mostly near it, some far out."""
  if isinstance(default, bool):
    return st.sampled_from(["true", "false", "True", "False", "1", "0"])
  if isinstance(default, int):
    return st.one_of(st.integers(-3, 2 * max(default, 1) + 3),
                     st.integers(-10**20, 10**20)).map(str)
  if isinstance(default, float):
    return st.one_of(st.floats(min_value=-2 * abs(default) - 1, max_value=2 * abs(default) + 1),
                     st.floats()).map(repr)
  if isinstance(default, str):
    return st.one_of(st.just(default), st.text(max_size=10).filter(lambda s: "\x00" not in s))
  if isinstance(default, tuple):
    return st.one_of(st.just(default), st.lists(st.sampled_from(default or (0,)),
                                                max_size=3).map(tuple)).map(repr)
  return values


typed_override = st.sampled_from(REAL_LEAVES).flatmap(
    lambda kv: typed_values(kv[1]).map(lambda v: f"--config.{kv[0]}={v}"))
override = st.one_of(
    typed_override, typed_override,  # twice the weight: most command lines are well typed
    st.tuples(st.one_of(st.sampled_from(REAL_KEYS), bogus_keys), values).map(
        lambda kv: f"--config.{kv[0]}={kv[1]}"),
    st.sampled_from(REAL_KEYS).map(lambda k: f"--config.{k}"),     # no value
    st.sampled_from(REAL_KEYS).map(lambda k: f"--noconfig.{k}"))   # absl's boolean negation
command_lines = st.tuples(st.sampled_from(CONFIGS), st.lists(override, min_size=1, max_size=4))


def parse_outcome(config_path, overrides):
  """("ok", config) or ("error", one-line message); anything else raised fails the test."""
  argv = ["launch", "--config", config_path, *overrides]
  try:
    config = launch.parse_config(argv)
  except UserError as e:
    message = str(e)
    assert message and "\n" not in message and "Traceback" not in message, (argv, message)
    return "error", message
  run_config.validate(config)  # parse_config's promise: a config that validates
  return "ok", config


@FUZZ
@given(command_lines)
def test_any_override_gives_a_valid_config_or_a_one_line_user_error(command_line):
  config_path, overrides = command_line
  TRIED["overrides"] += 1
  kind, _ = parse_outcome(config_path, overrides)
  TRIED["valid configs" if kind == "ok" else "config errors"] += 1


# The first four used to pass validation: a NaN or infinite learning rate poisons every update,
# and a negative seed crashed the run later with a traceback (numpy's seeding refuses it).
@pytest.mark.parametrize("override, fragment", [
    ("--config.optim.lr=nan", "optim.lr=nan must be positive and finite"),
    ("--config.optim.lr=inf", "optim.lr=inf must be positive and finite"),
    ("--config.optim.lr=1e400", "optim.lr=inf must be positive and finite"),
    ("--config.seed=-5", "seed=-5 must be >= 0"),
    ("--config.stages.sft.steps=-1", "stages.sft.steps=-1 must be >= 0"),
    ("--config.seed=1e400", "--config.seed=1e400"),
    ("--config.stage_order=()", "stage_order is empty"),
    ("--config.model=1", "--config.model=1"),
])
def test_edge_values_are_rejected_naming_the_field(override, fragment):
  kind, message = parse_outcome(launcher.SFT_TINY, [override])
  assert kind == "error" and fragment in message, (kind, message)


def test_overrides_come_from_argv_not_sys_argv():
  """parse_config parses the given argv afresh each time (the launcher's module-level flags
  read overrides from sys.argv and can be parsed once)."""
  for seed in (3, 4):
    config = launch.parse_config(["launch", "--config", launcher.SFT_TINY, f"--config.seed={seed}"])
    assert config.seed == seed


# A few bad command lines end to end: the real process, its exit status and its stderr.
LAUNCHER_CASES = [
    ["--config.optim.lr=nan"],
    ["--config.seed=-1", "--config.data.batch_size=abc"],
    ["--config.no_such.key=1"],
    ["--config.stages.sft.kind=bogus"],
    ["--config.model.n_group=3"],
    ["--config.train.nonfinite=", "--config.max_steps=-9999999999999999999999"],
]


def test_bad_command_lines_exit_2_with_one_line_and_write_nothing(tmp_path):
  """Also: a rejected config leaves no run directory behind (it used to be validated after
  config.json was written, and the corrected command then failed with "holds a run of a
  different config")."""
  procs = []
  for i, overrides in enumerate(LAUNCHER_CASES):
    workdir = tmp_path / f"run{i}"
    argv = [sys.executable, "-m", "r1jax.launch", "--config", launcher.SFT_TINY, *overrides,
            "--workdir", str(workdir)]
    procs.append((overrides, workdir, subprocess.Popen(
        argv, cwd=launcher.ROOT, env=launcher.env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)))
  for overrides, workdir, proc in procs:
    out, err = proc.communicate(timeout=120)
    TRIED["launcher runs"] += 1
    lines = err.strip().splitlines()
    assert proc.returncode == 2, (overrides, proc.returncode, err[-2000:])
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), \
        (overrides, err[-2000:])
    # the same message as in-process, and the run directory untouched (not even config.json)
    assert lines[0] == "error: " + parse_outcome(launcher.SFT_TINY, overrides)[1]
    assert not workdir.exists(), (overrides, os.listdir(workdir))


# ----------------------------------------------------------------------------- data records

class HugeInt:
  """An integer past Python's 4300-digit str limit (json.dumps refuses it; a file can hold it)."""

  def __repr__(self):
    return "HugeInt(5000 digits)"


def dumps(value) -> str:
  """JSON text of value (NaN and Infinity as Python's json writes them), HugeInt as 5000 9s."""
  if isinstance(value, HugeInt):
    return "9" * 5000
  if isinstance(value, list):
    return "[" + ", ".join(map(dumps, value)) + "]"
  if isinstance(value, dict):
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {dumps(v)}"
                           for k, v in value.items()) + "}"
  return json.dumps(value, ensure_ascii=False)


text_values = st.one_of(st.text(max_size=20), st.sampled_from(["", "x" * 1_000_000, "\x00",
                                                                "\ud800", "1+1", "\u2028"]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), text_values,
              st.sampled_from([HugeInt(), float("nan"), float("inf"), -float("inf")])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)
field_names = st.sampled_from(["question", "completion", "answer", "prompt", "Question", ""])
record_dicts = st.dictionaries(field_names, json_values, max_size=4)


good_line = st.fixed_dictionaries(
    {"question": st.text(max_size=30), "completion": st.text(max_size=30),
     "answer": st.one_of(st.text(max_size=10), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False))}).map(
    lambda d: dumps(d).encode("utf-8", "surrogatepass"))
lines = st.one_of(
    good_line, good_line, good_line,  # most files are mostly good: errors come late in a file
    record_dicts.map(lambda d: dumps(d).encode("utf-8", "surrogatepass")),
    st.fixed_dictionaries({"question": text_values, "answer": json_values,
                           "completion": text_values}).map(
                               lambda d: dumps(d).encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: dumps(v).encode("utf-8", "surrogatepass")),   # not an object
    st.binary(max_size=40),                                                 # any bytes
    st.sampled_from([b"{", b"}", b'{"question": "a", "answer": "1"', b"\xff\xfe", b"\xef\xbb\xbf{}",
                     b'{"question": "\xc3\x28", "answer": "1"}', b"[" * 50_000 + b"]" * 50_000,
                     b'{"question": "a", "answer": ' + b"9" * 5000 + b"}", b"NaN", b"\x00",
                     b'{"question": "a", "answer": NaN}', b'{"question": "a", "answer": 1e999}',
                     b"   ", b"\r", b'{"question": "a", "answer": "1"}']))
# Files: good lines with at most one other line put in at a known place, or anything at all.
planted = st.tuples(st.lists(good_line, max_size=5), st.one_of(st.none(), lines),
                    st.integers(0, 5)).map(
    lambda t: (t[0] if t[1] is None else t[0][:t[2]] + [t[1]] + t[0][t[2]:],
               None if t[1] is None else min(t[2], len(t[0]))))
files = st.one_of(planted, st.lists(lines, max_size=6).map(lambda ls: (ls, None)))
KINDS = {"sft": dict(prompt_field="question", completion_field="completion"),
         "rl": dict(prompt_field="question", answer_field="answer"),
         "sft with answers": dict(prompt_field="question", completion_field="completion",
                                  answer_field="answer")}


@FUZZ
@given(files, st.sampled_from(sorted(KINDS)))
def test_any_record_file_gives_records_or_a_data_error_with_file_and_line(tmp_path_factory,
                                                                           file, kind):
  file_lines, planted_at = file
  path = str(tmp_path_factory.mktemp("records") / "data.jsonl")
  with open(path, "wb") as f:
    f.write(b"\n".join(file_lines) + b"\n")
  TRIED["records"] += len(file_lines)
  fields = KINDS[kind]
  try:
    records = pipeline.read_records(path, **fields)
  except DataError as e:
    TRIED["data errors"] += 1
    message = str(e)
    assert message.startswith(path + ":") and "\n" not in message, message
    where = message[len(path) + 1:].split(":")[0]
    if where.strip() != "no records (empty file)":
      # physical lines, as a text editor counts them (a lone \r also ends a line)
      n_lines = max(len(b"\n".join(file_lines).decode("utf-8", "replace").splitlines()), 1)
      assert where.isdigit() and 1 <= int(where) <= n_lines, (message, n_lines)
      if planted_at is not None and not any(c in file_lines[planted_at] for c in b"\r\n"):
        assert int(where) == planted_at + 1, (message, planted_at)  # the good lines are good
    return
  TRIED["valid record files"] += 1
  assert records
  for record in records:
    assert set(record) == {k for k, v in {"question": "prompt_field",
                                          "completion": "completion_field",
                                          "answer": "answer_field"}.items() if v in fields}
    for value in record.values():
      assert isinstance(value, str)


@pytest.mark.parametrize("content, message", [
    (b'{"question": "a", "answer": "1"}\n\xff\xfe{"question": "b"}\n', ":2: not UTF-8"),
    (b'{"question": "a", "answer": ' + b"9" * 5000 + b"}\n", ":1: malformed JSON"),
    (b'{"question": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", ":1: malformed JSON"),
    (b'{"question": "a", "answer": NaN}\n', ":1: field 'answer' must be a string or a finite"),
    (b'{"question": "a", "answer": 1e999}\n', ":1: field 'answer' must be a string or a finite"),
])
def test_records_that_used_to_escape_as_other_errors(tmp_path, content, message):
  path = tmp_path / "d.jsonl"
  path.write_bytes(content)
  with pytest.raises(DataError, match=message) as info:
    pipeline.read_records(str(path), prompt_field="question", answer_field="answer")
  assert "\n" not in str(info.value)




def test_an_override_that_empties_a_section_is_a_one_line_error():
  """Found by the fuzz test above: `--config.checkpoint={}` replaced the section with an empty
  one, and validation died on the missing field with a traceback."""
  kind, message = parse_outcome(os.path.join(launcher.ROOT, "configs", "sft_tiny.py"),
                                ["--config.checkpoint={}"])
  assert kind == "error" and "lacks the field 'keep'" in message, message
