"""Files of the run directory on a local (or shared) filesystem or in a bucket, via etils.epath.

A workdir is a filesystem path or `gs://BUCKET/PATH`. epath reaches gs:// through gcsfs (fsspec),
or tf.io.gfile where TensorFlow is installed; orbax checkpoints there through tensorstore's own
GCS driver and lists steps with google-cloud-storage (which gcsfs brings along). Other URL schemes
are refused: orbax checkpoints only to filesystem paths and gs://.

Local paths keep plain-filesystem behaviour. An object store differs in two ways the callers
meet: it has no append (the run log rewrites metrics.jsonl instead, see r1jax.runlog), and it has
no rename (epath copies and deletes), which `atomic_open` avoids there (see its docstring).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

from etils import epath

from r1jax.errors import UserError

SCHEMES = ("gs",)


def is_remote(path) -> bool:
  """Whether `path` is a URL (gs://...) rather than a filesystem path."""
  return "://" in os.fspath(path)


def absolute(path) -> epath.Path:
  """`path` as an absolute epath.Path (URLs are absolute already; `~` is expanded)."""
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def under(directory, path) -> epath.Path:
  """`path` if it is absolute or a URL, else `path` relative to `directory`."""
  path = os.fspath(path)
  if is_remote(path) or os.path.isabs(path):
    return epath.Path(path)
  return epath.Path(directory) / path


def check_workdir(workdir: str) -> None:
  """Raise UserError (one line) for a workdir URL that cannot work here: a scheme orbax cannot
  checkpoint to, a missing client library, a bucket that does not exist or cannot be reached.
  A filesystem path must be a directory or not exist yet (it is created)."""
  scheme, sep, rest = workdir.partition("://")
  if not sep:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise UserError(f"--workdir {workdir}: exists and is not a directory")
    return
  if scheme not in SCHEMES:
    raise UserError(f"--workdir {workdir}: {scheme}:// is not supported; use gs://BUCKET/PATH "
                    "or a filesystem path (local, NFS, a gcsfuse mount)")
  bucket = rest.split("/", 1)[0]
  if not bucket:
    raise UserError(f"--workdir {workdir}: no bucket named; use gs://BUCKET/PATH")
  try:
    import google.cloud.storage  # noqa: F401  orbax lists checkpoint steps on gs:// with it
    found = epath.Path(f"gs://{bucket}").exists()
  except ImportError:
    raise UserError(f"--workdir {workdir}: gs:// needs the gcsfs package "
                    "(pip install gcsfs, or r1jax[gcs])") from None
  except Exception as e:  # noqa: BLE001 - credentials, network, permissions: report, not trace
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    raise UserError(f"--workdir {workdir}: cannot reach gs://{bucket} "
                    f"({type(e).__name__}: {reason})") from None
  if not found:
    raise UserError(f"--workdir {workdir}: bucket gs://{bucket} does not exist (or this "
                    "account cannot see it)")


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
  """A file to write `path` whole ("w": UTF-8 text, or "wb"): readers see the previous file (or
  none) until the block ends without an exception, never a part of the new one.

  Filesystem: a temporary file in the same directory, fsynced and renamed over `path`; the
  temporary files a killed writer left behind are removed by the next write of the same path.
  Object store: an upload is atomic there (an object appears whole when its upload completes), so
  the content is gathered in memory and uploaded to `path` itself; a temporary object renamed
  into place would cost a copy and a delete (no rename on an object store) for no extra safety.
  """
  assert mode in ("w", "wb"), mode
  if is_remote(path):
    buffer = io.StringIO() if mode == "w" else io.BytesIO()
    yield buffer
    data = buffer.getvalue()
    epath.Path(path).write_bytes(data.encode("utf-8") if mode == "w" else data)
    return
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  prefix = f".{os.path.basename(path)}.tmp-"
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix)
  try:
    with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
  for name in os.listdir(directory):
    if name.startswith(prefix):
      os.unlink(os.path.join(directory, name))


def atomic_write_json(path, obj) -> None:
  """`obj` as indented JSON, written atomically (`atomic_open`)."""
  with atomic_open(path) as f:
    json.dump(obj, f, indent=2)
