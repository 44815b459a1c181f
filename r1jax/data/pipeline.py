"""grain pipelines: record files, packed SFT batches, RL prompt batches, atomic JSONL writes.

Records are dicts with `question` and, for SFT, either `completion` or `reasoning` + `answer`
(see `template.completion_text`); RL prompts need `question` and `answer`.

SFT batch (numpy, B = batch_size, T = seq_len):
  tokens      int32   [B, T]  input ids
  targets     int32   [B, T]  next token of the same example (0 on padding)
  loss_mask   float32 [B, T]  1 where targets[b, t] is a completion token (prompt and pad masked)
  segment_ids int32   [B, T]  1, 2, ... per packed example in a row; 0 = padding
  positions   int32   [B, T]  position within the example, from 0
An example of L tokens gives inputs x[:-1] and targets x[1:], so a target never crosses into the
next packed example. Examples over T + 1 tokens are truncated at the end (the tail of a long
trace is still useful signal; dropping would bias against long reasoning) and counted in a
logged warning. Batches are full: a final partial batch of a finite epoch is dropped, so the
train step compiles once.

Both iterators are grain `DatasetIterator`s: `get_state()` is a small JSON-able dict and
`set_state()` on an iterator of an identically built pipeline resumes exactly.
"""

from __future__ import annotations

import io
import json
import logging
import math
from typing import Iterable, Mapping, Sequence

import grain
import grain.experimental
import numpy as np
from etils import epath

from r1jax import fileio
from r1jax.data import template as template_lib
from r1jax.data.tokenizer import Tokenizer
from r1jax.errors import DataError

log = logging.getLogger(__name__)

SFT_FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# A few prefetch threads: tokenization is cheap, and the hosts' cores belong to the train step.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
_BATCH_PREFETCH = 2  # SFT batches built ahead of the step that consumes them


# ----------------------------------------------------------------------------- record files

def _normalize(raw: Mapping, fields: Mapping[str, str | None], where: str) -> dict:
  """Rename the caller's field names to the canonical ones; strings only (answers may be numbers)."""
  record = {}
  for canonical, name in fields.items():
    if name is None:
      continue
    if name not in raw or raw[name] is None:
      raise DataError(f"{where}: missing field {name!r}")
    value = raw[name]
    if canonical == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
      if not math.isfinite(value):
        raise DataError(f"{where}: field {name!r} must be a string or a finite number, "
                        f"got {value}")
      value = str(value)
    if not isinstance(value, str):
      raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    record[canonical] = value
  return record


def read_jsonl(path, *, prompt_field: str = "question", completion_field: str | None = None,
               answer_field: str | None = None) -> list[dict]:
  """Records {question, completion?, answer?} from a JSONL file, one JSON object per line."""
  return _read_jsonl(path, dict(question=prompt_field, completion=completion_field,
                                answer=answer_field))


def _read_jsonl(path, fields: Mapping[str, str | None]) -> list[dict]:
  """Records with the canonical `fields` ({canonical: the file's name}) from a JSONL file."""
  records = []
  try:
    # Bytes that are not UTF-8 decode to lone surrogates, so they are reported with their line.
    f = io.TextIOWrapper(epath.Path(path).open("rb"), encoding="utf-8", errors="surrogateescape")
  except OSError as e:
    raise DataError(f"{path}: cannot open ({e.strerror or e})") from None
  with f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue  # Tolerate blank lines (a trailing newline pair is common).
      try:
        line.encode("utf-8")
      except UnicodeEncodeError as e:
        raise DataError(f"{path}:{line_no}: not UTF-8 (byte {ord(line[e.start]) - 0xDC00:#04x} at "
                        f"column {e.start + 1})") from None
      try:
        raw = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: malformed JSON ({e.msg} at column {e.colno})") from None
      except (ValueError, RecursionError) as e:  # e.g. an integer of 5000 digits, deep nesting
        raise DataError(f"{path}:{line_no}: malformed JSON ({str(e).splitlines()[0]})") from None
      if not isinstance(raw, dict):
        raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(raw).__name__}")
      records.append(_normalize(raw, fields, f"{path}:{line_no}"))
  if not records:
    raise DataError(f"{path}: no records (empty file)")
  return records


def read_parquet(path: str, *, prompt_field: str = "question", completion_field: str | None = None,
                 answer_field: str | None = None) -> list[dict]:
  """Records {question, completion?, answer?} from a Parquet file (columns named by the caller)."""
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError("reading Parquet needs pyarrow: pip install pyarrow") from None
  fields = dict(question=prompt_field, completion=completion_field, answer=answer_field)
  try:
    schema = pq.read_schema(path)
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
  for name in filter(None, fields.values()):
    if name not in schema.names:
      raise DataError(f"{path}: missing field {name!r} (columns: {', '.join(schema.names)})")
  table = pq.read_table(path, columns=sorted(set(filter(None, fields.values()))))
  rows = table.to_pylist()
  if not rows:
    raise DataError(f"{path}: no records (empty file)")
  return [_normalize(raw, fields, f"{path}: row {i}") for i, raw in enumerate(rows)]


def read_records(path: str, **fields) -> list[dict]:
  """`read_jsonl` or `read_parquet` by file extension (.jsonl/.json or .parquet)."""
  if path.endswith(".parquet"):
    return read_parquet(path, **fields)
  if path.endswith((".jsonl", ".json")):
    return read_jsonl(path, **fields)
  raise DataError(f"{path}: unknown data file type; expected .jsonl or .parquet")


def write_jsonl(path, records: Iterable[Mapping]) -> int:
  """Write records as JSONL atomically (`fileio.atomic_open`); returns the count.

  A crash mid-write leaves the previous file (or none), never a truncated one that a resumed
  run would read as a smaller dataset. The temporary file a killed writer (SIGKILL) left behind is
  removed by the next successful write of the same path.
  """
  count = 0
  with fileio.atomic_open(path) as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      count += 1
  return count


# ----------------------------------------------------------------------------- SFT batches

class _Encode:
  """record -> {tokens, targets, loss_mask} of one example (unpadded); counts truncations."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, template: str):
    self.tokenizer, self.seq_len, self.template = tokenizer, seq_len, template
    self.num_truncated = 0

  def __call__(self, record: Mapping) -> dict[str, np.ndarray]:
    markers = self.tokenizer.markers
    prompt = self.tokenizer.encode(
        template_lib.format_prompt(record["question"], self.template, markers))
    completion = self.tokenizer.encode(template_lib.completion_text(record, markers))
    ids = np.asarray(prompt + completion, np.int32)
    is_completion = np.arange(len(ids)) >= len(prompt)
    if len(ids) > self.seq_len + 1:
      self.num_truncated += 1
      if self.num_truncated & (self.num_truncated - 1) == 0:  # 1, 2, 4, ...: visible, not noisy.
        log.warning("truncated %d SFT examples longer than seq_len + 1 = %d tokens (this one: %d)",
                    self.num_truncated, self.seq_len + 1, len(ids))
      ids, is_completion = ids[:self.seq_len + 1], is_completion[:self.seq_len + 1]
    return dict(tokens=ids[:-1], targets=ids[1:], loss_mask=is_completion[1:].astype(np.float32))


def _pad_example(example: Mapping[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One example per row, right padded to seq_len (the unpacked layout)."""
  n = len(example["tokens"])
  row = {k: np.zeros(seq_len, v.dtype) for k, v in example.items()}
  for k, v in example.items():
    row[k][:n] = v
  row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  row["positions"] = np.where(row["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
  return row


def _rename_packed(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  # grain names packing metadata per feature; all features share it, so keep the tokens' copy.
  return dict(tokens=batch["tokens"].astype(np.int32), targets=batch["targets"].astype(np.int32),
              loss_mask=batch["loss_mask"].astype(np.float32),
              segment_ids=batch["tokens_segment_ids"].astype(np.int32),
              positions=batch["tokens_positions"].astype(np.int32))


def _records_dataset(records: Sequence[Mapping], seed: int, shuffle: bool,
                     num_epochs: int | None, shard: tuple[int, int]) -> grain.MapDataset:
  if len(records) == 0:
    raise DataError("no records to build batches from")
  ds = grain.MapDataset.source(records)
  index, count = shard
  if count > 1:
    ds = ds[index::count]  # Each process reads its own slice; batch_size is per process.
  if shuffle:
    ds = ds.shuffle(seed=seed)  # Before repeat: every epoch gets a new order, no epoch mixing.
  return ds.repeat(num_epochs)


def sft_batches(records: Sequence[Mapping], tokenizer: Tokenizer, *, seq_len: int,
                batch_size: int, seed: int, template: str = "r1", pack: bool = True,
                shuffle: bool = True, num_epochs: int | None = None, packing_bins: int | None = None,
                shard: tuple[int, int] = (0, 1)) -> grain.DatasetIterator:
  """A checkpointable iterator of SFT batches (fields in the module docstring).

  Packing is grain's first-fit over `packing_bins` open rows (default: batch_size): whole
  examples go into the first row with room; when one fits nowhere, the open rows are emitted.
  `num_epochs=None` repeats forever. `shard=(process_index, process_count)` splits records
  across hosts.
  """
  template_lib.format_prompt("", template)  # Fail now, not inside a grain worker thread.
  encode = _Encode(tokenizer, seq_len, template)
  ds = _records_dataset(records, seed, shuffle, num_epochs, shard).map(encode)
  if pack:
    lengths = {k: seq_len for k in ("tokens", "targets", "loss_mask")}
    ds = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(_READ_OPTIONS), length_struct=lengths,
        num_packing_bins=packing_bins or batch_size, seed=seed, shuffle_bins=False)
    ds = ds.batch(batch_size, drop_remainder=True).map(_rename_packed)
  else:
    ds = ds.map(lambda example: _pad_example(example, seq_len))
    ds = ds.batch(batch_size, drop_remainder=True).to_iter_dataset(_READ_OPTIONS)
  # Packing runs in Python; a background thread builds the next batches while the device
  # trains on this one (its checkpointed state is that of the batches handed out).
  ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=_BATCH_PREFETCH)
  return iter(ds)


# ----------------------------------------------------------------------------- preference pairs

PAIR_FIELDS = ("tokens", "segment_ids", "positions", "last")


def reward_row(tokenizer: Tokenizer, prompt: str, completion: str, max_len: int) -> np.ndarray:
  """The token ids a reward model scores: the formatted prompt, then the completion text (no
  end token: a row is scored at its last token). Over max_len tokens, the last max_len are kept
  (the end is what is judged). The reward-model stage and the reward share this."""
  ids = tokenizer.encode(prompt) + tokenizer.encode(completion)
  return np.asarray(ids[-max_len:], np.int32)


def reward_rows(rows: Sequence[np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """Right-padded rows [len(rows), seq_len] and `last` (each row's last token index)."""
  n = len(rows)
  out = dict(tokens=np.zeros((n, seq_len), np.int32), segment_ids=np.zeros((n, seq_len), np.int32),
             positions=np.zeros((n, seq_len), np.int32), last=np.zeros(n, np.int32))
  for i, ids in enumerate(rows):
    k = len(ids)
    out["tokens"][i, :k] = ids
    out["segment_ids"][i, :k] = 1
    out["positions"][i, :k] = np.arange(k)
    out["last"][i] = max(k - 1, 0)
  return out


class _EncodePair:
  """record {question, chosen, rejected} -> two reward rows (chosen, rejected); counts rows cut
  to seq_len."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, template: str):
    self.tokenizer, self.seq_len, self.template = tokenizer, seq_len, template
    self.num_truncated = 0

  def __call__(self, record: Mapping) -> dict[str, np.ndarray]:
    prompt = template_lib.format_prompt(record["question"], self.template, self.tokenizer.markers)
    rows = []
    for side in ("chosen", "rejected"):
      ids = reward_row(self.tokenizer, prompt, record[side], self.seq_len + 1)
      if len(ids) > self.seq_len:
        self.num_truncated += 1
        if self.num_truncated & (self.num_truncated - 1) == 0:
          log.warning("cut %d preference rows longer than seq_len = %d tokens to their last "
                      "seq_len", self.num_truncated, self.seq_len)
        ids = ids[-self.seq_len:]
      rows.append(ids)
    return reward_rows(rows, self.seq_len)


def pair_batches(records: Sequence[Mapping], tokenizer: Tokenizer, *, seq_len: int,
                 pairs: int, seed: int, template: str = "r1", shuffle: bool = True,
                 num_epochs: int | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator of preference-pair batches: `PAIR_FIELDS`, [2 * pairs, seq_len]
  (`last`: [2 * pairs]), rows 2i and 2i + 1 the chosen and rejected completion of pair i."""
  template_lib.format_prompt("", template)
  encode = _EncodePair(tokenizer, seq_len, template)
  ds = _records_dataset(records, seed, shuffle, num_epochs, (0, 1)).map(encode)
  ds = ds.batch(pairs, drop_remainder=True).map(
      lambda b: {k: v.reshape(2 * pairs, *v.shape[2:]) for k, v in b.items()})
  return iter(ds.to_iter_dataset(_READ_OPTIONS))


def read_pairs(path) -> list[dict]:
  """Preference pairs {question, chosen, rejected} from a JSONL file."""
  return _read_jsonl(path, {k: k for k in ("question", "chosen", "rejected")})


def prompt_batches(records: Sequence[Mapping], *, batch_size: int, seed: int, shuffle: bool = True,
                   num_epochs: int | None = None,
                   shard: tuple[int, int] = (0, 1)) -> grain.DatasetIterator:
  """A checkpointable iterator over lists of `batch_size` raw records (RL prompts)."""
  ds = _records_dataset(records, seed, shuffle, num_epochs, shard)
  return iter(ds.batch(batch_size, drop_remainder=True, batch_fn=list).to_iter_dataset(_READ_OPTIONS))
