"""Record files, packed/unpacked SFT batches (masks, segments, resume), prompt batches."""

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1jax.data import pipeline, tasks, template
from r1jax.data.tokenizer import CharTokenizer
from r1jax.errors import DataError

TOK = CharTokenizer()


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def sft_records():
  return tasks.arithmetic_records(200, seed=0, min_digits=1, max_digits=3)


# ----------------------------------------------------------------------------- files

def test_read_jsonl_renames_fields(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"problem": "1+1", "gen": "r", "sol": 2}\n\n{"problem": "2+2", "gen": "s", '
                  '"sol": "4", "extra": 1}\n')
  records = pipeline.read_records(str(path), prompt_field="problem", completion_field="gen",
                                  answer_field="sol")
  assert records == [{"question": "1+1", "completion": "r", "answer": "2"},
                     {"question": "2+2", "completion": "s", "answer": "4"}]


@pytest.mark.parametrize("content, message", [
    ('{"q": "a"}\n{"q": "b"\n', r"d\.jsonl:2: malformed JSON"),
    ('{"q": "a"}\n\n{"x": "b"}\n', r"d\.jsonl:3: missing field 'q'"),
    ('{"q": "a"}\n[1, 2]\n', r"d\.jsonl:2: expected a JSON object, got list"),
    ('{"q": ["a"]}\n', r"d\.jsonl:1: field 'q' must be a string, got list"),
    ("", r"d\.jsonl: no records \(empty file\)"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, content, message):
  path = tmp_path / "d.jsonl"
  path.write_text(content)
  with pytest.raises(DataError, match=message) as info:
    pipeline.read_jsonl(str(path), prompt_field="q")
  assert "\n" not in str(info.value)


def test_read_missing_file_and_unknown_type(tmp_path):
  with pytest.raises(DataError, match=r"nope\.jsonl: cannot open"):
    pipeline.read_records(str(tmp_path / "nope.jsonl"))
  with pytest.raises(DataError, match=r"d\.csv: unknown data file type"):
    pipeline.read_records(str(tmp_path / "d.csv"))


def test_read_parquet(tmp_path):
  path = str(tmp_path / "d.parquet")
  pq.write_table(pa.table({"prompt": ["1+1", "2+3"], "answer": [2, 5], "other": [0, 0]}), path)
  assert pipeline.read_records(path, prompt_field="prompt", answer_field="answer") == [
      {"question": "1+1", "answer": "2"}, {"question": "2+3", "answer": "5"}]
  with pytest.raises(DataError, match=r"d\.parquet: missing field 'solution' \(columns: prompt"):
    pipeline.read_parquet(path, prompt_field="prompt", completion_field="solution")
  pq.write_table(pa.table({"prompt": ["a", None]}), path)
  with pytest.raises(DataError, match=r"d\.parquet: row 1: missing field 'prompt'"):
    pipeline.read_parquet(path, prompt_field="prompt")
  pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), path)
  with pytest.raises(DataError, match="no records"):
    pipeline.read_parquet(path, prompt_field="prompt")


def test_write_jsonl_atomic(tmp_path):
  path = str(tmp_path / "sub" / "out.jsonl")
  records = [{"question": "1+1", "completion": "é", "answer": "2"}]
  assert pipeline.write_jsonl(path, records) == 1
  read = lambda: pipeline.read_jsonl(path, completion_field="completion", answer_field="answer")
  assert read() == records
  # A failure mid-write keeps the old file whole and leaves no temporary behind.
  with pytest.raises(TypeError):
    pipeline.write_jsonl(path, [{"question": "2+2"}, {"question": object()}])
  assert read() == records
  assert os.listdir(tmp_path / "sub") == ["out.jsonl"]


# ----------------------------------------------------------------------------- SFT batches

def test_unpacked_example_by_hand():
  record = {"question": "1+2", "reasoning": "r", "answer": "3"}
  batch = next(pipeline.sft_batches([record], TOK, seq_len=20, batch_size=1, seed=0, pack=False))
  prompt = TOK.encode("<bos><|User|>1+2<|Assistant|><think>\n")
  completion = TOK.encode("r\n</think>\n<answer>3</answer><eos>")
  assert len(prompt) == 8 and len(completion) == 8
  full = prompt + completion
  pad = [0] * (20 - 15)
  assert batch["tokens"].tolist() == [full[:-1] + pad]
  assert batch["targets"].tolist() == [full[1:] + pad]
  # The target at the last prompt position is the first completion token: it is trained on.
  assert batch["loss_mask"].tolist() == [[0.0] * 7 + [1.0] * 8 + pad]
  assert batch["segment_ids"].tolist() == [[1] * 15 + pad]
  assert batch["positions"].tolist() == [list(range(15)) + pad]
  assert {k: v.dtype for k, v in batch.items()} == {
      "tokens": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
      "positions": np.int32}


def _segments(batch):
  """Yield (row, segment id, positions of the segment) for every packed example."""
  for b, row in enumerate(batch["segment_ids"]):
    for s in sorted(set(row.tolist()) - {0}):
      yield b, s, np.flatnonzero(row == s)


def test_packed_segments_masks_and_targets(sft_records):
  texts = {template.format_prompt(r["question"]) + template.completion_text(r): r
           for r in sft_records}
  seen = []
  for batch in pipeline.sft_batches(sft_records, TOK, seq_len=96, batch_size=4, seed=1,
                                    num_epochs=1):
    assert batch["tokens"].shape == (4, 96)
    pad = batch["segment_ids"] == 0
    assert not batch["tokens"][pad].any() and not batch["targets"][pad].any()
    assert not batch["loss_mask"][pad].any() and not batch["positions"][pad].any()
    for b, s, where in _segments(batch):
      assert where.tolist() == list(range(where[0], where[-1] + 1)), "segment not contiguous"
      assert batch["positions"][b, where].tolist() == list(range(len(where)))
      tokens, targets = batch["tokens"][b, where], batch["targets"][b, where]
      # Targets are the next token of the same example, ending on its eos, never the next one's.
      np.testing.assert_array_equal(targets[:-1], tokens[1:])
      assert targets[-1] == TOK.eos_id
      text = TOK.decode(list(tokens) + [targets[-1]])
      record = texts[text]
      n_completion = len(TOK.encode(template.completion_text(record)))
      mask = batch["loss_mask"][b, where]
      assert mask.tolist() == [0.0] * (len(where) - n_completion) + [1.0] * n_completion
      seen.append(record["question"])
  assert len(seen) == len(set(seen))  # One epoch: no example twice.
  assert len(seen) >= 0.9 * len(sft_records)  # Only the final partial batch is dropped.


def test_packing_density(sft_records):
  def fill(pack):
    it = pipeline.sft_batches(sft_records, TOK, seq_len=128, batch_size=8, seed=0, pack=pack)
    return np.mean([(b["segment_ids"] > 0).mean() for b in take(it, 10)])

  packed, unpacked = fill(True), fill(False)
  assert packed > 0.85, packed
  assert unpacked < 0.35, unpacked


@pytest.mark.parametrize("pack", [True, False])
def test_resume_yields_identical_batches(sft_records, pack):
  def make():
    return pipeline.sft_batches(sft_records, TOK, seq_len=64, batch_size=4, seed=3, pack=pack)

  it = make()
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # As a checkpoint would store it.
  expected = take(it, 60)  # 240 rows of >= 1 example each: crosses the 200-record epoch.
  resumed = make()
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 60), expected)
  assert_batches_equal(take(make(), 3), take(make(), 3))  # Same seed, same data.


def test_seed_changes_order(sft_records):
  def first(seed):
    return next(pipeline.sft_batches(sft_records, TOK, seq_len=64, batch_size=4, seed=seed))

  assert not np.array_equal(first(0)["tokens"], first(1)["tokens"])
  unshuffled = next(pipeline.sft_batches(sft_records, TOK, seq_len=64, batch_size=1, seed=0,
                                         shuffle=False, pack=False))
  assert TOK.decode(unshuffled["tokens"][0]).startswith(
      template.format_prompt(sft_records[0]["question"]))


def test_overlong_examples_truncated_with_count(caplog):
  record = {"question": "1+1", "completion": "x" * 50}
  with caplog.at_level(logging.WARNING, logger="r1jax.data.pipeline"):
    batches = take(pipeline.sft_batches([record] * 4, TOK, seq_len=16, batch_size=2, seed=0,
                                        pack=False), 2)
  assert all((b["segment_ids"] == 1).all() for b in batches)  # Cut to exactly seq_len.
  # The prompt is 8 tokens; the target of its last one is already completion.
  assert batches[0]["loss_mask"][0].tolist() == [0.0] * 7 + [1.0] * 9
  counts = [int(r.getMessage().split()[1]) for r in caplog.records
            if "truncated" in r.getMessage()]
  # logged at 1, 2, 4, ... truncations; the loader's read-ahead may already have reached 8
  assert counts[:3] == [1, 2, 4] and counts == [2**i for i in range(len(counts))]


def test_errors_surface_as_data_errors():
  bad = [{"question": "1+1", "reasoning": "ü", "answer": "2"}] * 4
  with pytest.raises(DataError, match=r"'ü' \(U\+00FC\)"):
    next(pipeline.sft_batches(bad, TOK, seq_len=32, batch_size=2, seed=0))
  rl_only = [{"question": "1+1", "reasoning": None, "answer": "2"}] * 4
  with pytest.raises(DataError, match="neither a completion nor reasoning"):
    next(pipeline.sft_batches(rl_only, TOK, seq_len=32, batch_size=2, seed=0))
  with pytest.raises(DataError, match="no records"):
    pipeline.sft_batches([], TOK, seq_len=32, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="unknown template"):
    pipeline.sft_batches(bad, TOK, seq_len=32, batch_size=2, seed=0, template="x")


# ----------------------------------------------------------------------------- prompt batches

def test_prompt_batches_epochs_resume_and_shards():
  records = tasks.arithmetic_records(10, seed=0, min_digits=2, max_digits=2)
  questions = [r["question"] for r in records]
  batches = list(pipeline.prompt_batches(records, batch_size=5, seed=0, num_epochs=2))
  assert len(batches) == 4 and all(isinstance(b, list) and len(b) == 5 for b in batches)
  epochs = [[r["question"] for b in batches[i:i + 2] for r in b] for i in (0, 2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(questions)
  assert epochs[0] != epochs[1] != questions  # Reshuffled every epoch.

  it = pipeline.prompt_batches(records, batch_size=3, seed=4)
  take(it, 5)
  state = it.get_state()
  expected = take(it, 4)
  resumed = pipeline.prompt_batches(records, batch_size=3, seed=4)
  resumed.set_state(state)
  assert take(resumed, 4) == expected

  shards = [[r["question"] for b in pipeline.prompt_batches(records, batch_size=1, seed=0,
                                                             num_epochs=1, shard=(i, 2))
             for r in b] for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 5
  assert sorted(shards[0] + shards[1]) == sorted(questions)
