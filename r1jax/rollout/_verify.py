"""Final-answer extraction and time-bounded math equivalence (math-verify in a worker process).

Why a process: math-verify bounds its own time with `signal.alarm`, which only works on the main
thread, and no in-process bound can stop sympy inside one long C call (a big-integer power such as
`10^{10^{10}}` holds the GIL until it finishes or exhausts memory). So the comparison runs in one
persistent child process that talks JSON lines over pipes; the parent waits on the pipe with a
deadline (`select`), which works from any thread, and on a timeout kills the child (SIGKILL) and
starts a fresh one at once so its import overlaps the caller's next work. The child caps its own
address space (`RLIMIT_AS`) so a huge number fails fast with MemoryError instead of swapping, and
keeps math-verify's own alarms as a cheap first line (they interrupt pure-Python loops without
losing the process).

Nothing from a completion is executed: text is only sliced, scanned and handed to math-verify's
parser (an ANTLR LaTeX grammar plus sympy's `parse_expr` on math-verify's normalized expression);
the child process is the blast wall if that parser misbehaves.

This file is also the child's entry point (`python _verify.py`), so it imports only the standard
library at module level.
"""

from __future__ import annotations

import atexit
import fractions
import functools
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

# Only the tail of a completion is searched for the final answer: answers come last, and this keeps
# extraction O(cap) on megabyte completions.
MAX_SEARCH_CHARS = 10_000
# An extracted answer longer than this, or nested deeper than MAX_BRACE_DEPTH, is not a plausible
# final answer; scoring it as wrong avoids feeding pathological inputs to the LaTeX parser.
MAX_ANSWER_CHARS = 1_000
MAX_BRACE_DEPTH = 32
# Per-comparison hard bound (seconds) seen by the caller, and the child's inner math-verify alarms.
DEFAULT_TIMEOUT_S = 3.0
_INNER_TIMEOUT_S = 1
_STARTUP_TIMEOUT_S = 60.0
_CHILD_MEMORY_BYTES = 2 << 30

_BOXED_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
# ASCII digits only: other Unicode digits ("３", "٣") are left to math-verify's normalization.
_INTEGER = re.compile(r"[+-]?\d{1,64}", re.ASCII)
_DECIMAL = re.compile(r"[+-]?(?:\d{1,64}(?:\.\d{0,64})?|\.\d{1,64})", re.ASCII)
_FRACTION = re.compile(r"([+-]?\d{1,64})\s*/\s*(\d{1,64})", re.ASCII)
_LATEX_FRACTION = re.compile(r"([+-]?)\\[dt]?frac\{(\d{1,64})\}\{(\d{1,64})\}", re.ASCII)


# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------

def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces balance, else None.

  One left-to-right pass over brace tokens with a stack, so the cost is linear even for
  thousands of unclosed `\\boxed{`. Escaped braces `\\{ \\}` are literal and do not count.
  "Last" means the last to close; for nested boxes that is the outermost.
  """
  stack: list[int | None] = []   # per open brace: content start if it opened a box, else None
  found = None
  for m in _BOXED_TOKENS.finditer(text):
    token = m.group()
    if token[0] == "\\" and len(token) == 2:
      continue
    if token == "}":
      if stack:
        start = stack.pop()
        if start is not None:
          found = (start, m.start())
      continue
    stack.append(m.end() if token != "{" else None)
  return None if found is None else text[found[0]:found[1]]


def last_answer_tag(text: str) -> str | None:
  """Content of the last closed `<answer>...</answer>`, else None."""
  end = text.rfind("</answer>")
  if end < 0:
    return None
  start = text.rfind("<answer>", 0, end)
  if start < 0:
    return None
  return text[start + len("<answer>"):end]


def extract_answer(completion: str) -> str | None:
  """The final answer of a completion: the last balanced `\\boxed{}`, else the last `<answer>`.

  Only the last MAX_SEARCH_CHARS characters are searched. Returns None when there is no answer
  or it is implausible (longer than MAX_ANSWER_CHARS or nested deeper than MAX_BRACE_DEPTH).
  """
  tail = completion[-MAX_SEARCH_CHARS:]
  answer = last_boxed(tail)
  if answer is None:   # (a box inside an answer tag was already taken above)
    answer = last_answer_tag(tail)
  if answer is None:
    return None
  answer = answer.strip()
  if not answer or len(answer) > MAX_ANSWER_CHARS or _brace_depth(answer) > MAX_BRACE_DEPTH:
    return None
  return answer


def _brace_depth(text: str) -> int:
  """Maximum nesting depth of `{` in text (unbalanced closes are ignored)."""
  depth = deepest = 0
  for ch in text:
    if ch == "{":
      depth += 1
      deepest = max(deepest, depth)
    elif ch == "}":
      depth = max(0, depth - 1)
  return deepest


# ---------------------------------------------------------------------------------------------
# Exact numeric fast path
# ---------------------------------------------------------------------------------------------

def _as_number(text: str) -> fractions.Fraction | None:
  """Parses a plain integer, decimal, `a/b` or `\\frac{a}{b}` exactly; None for anything else.

  Exponent notation is rejected on purpose: `Fraction("1e999999999")` would build a huge int.
  """
  text = text.strip().strip("$").strip().rstrip(".")
  if _DECIMAL.fullmatch(text):
    return fractions.Fraction(text)
  m = _FRACTION.fullmatch(text) or _LATEX_FRACTION.fullmatch(text)
  if m is None:
    return None
  if len(m.groups()) == 3:
    sign, num, den = m.groups()
    num = sign + num
  else:
    num, den = m.groups()
  return None if int(den) == 0 else fractions.Fraction(int(num), int(den))


def fast_equal(gold: str, pred: str) -> bool | None:
  """Decides equality without math-verify when both sides are plain numbers, else None.

  Equal values are equal. Two different integers are different. Other differing numbers are left
  to math-verify, which accepts rounded forms (0.333333 for 1/3) that exact comparison would not.
  """
  g, p = _as_number(gold), _as_number(pred)
  if g is None or p is None:
    return None
  if g == p:
    return True
  if _INTEGER.fullmatch(gold.strip()) and _INTEGER.fullmatch(pred.strip()):
    return False
  return None


# ---------------------------------------------------------------------------------------------
# The worker process (parent side)
# ---------------------------------------------------------------------------------------------

class VerifyTimeout(Exception):
  """The child did not answer within the time bound (it has been killed and restarted)."""


class VerifyWorker:
  """One persistent math-verify child process, safe to call from any thread.

  Calls are serialized by a lock (one child, 2-core machines); the bound applies to the
  comparison itself, not to time spent waiting for the lock or for a fresh child to import.
  """

  def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
    self.timeout_s = timeout_s
    self._lock = threading.Lock()
    self._proc: subprocess.Popen | None = None
    self._owner_pid = os.getpid()
    self._ready = False
    self._buffer = b""
    self.restarts = 0

  def equivalent(self, gold: str, pred: str, timeout_s: float | None = None) -> bool:
    """math-verify's `verify(parse(gold), parse(pred))`, bounded by `timeout_s` seconds.

    Raises VerifyTimeout on timeout and RuntimeError if the child died or reported an error.
    """
    timeout_s = self.timeout_s if timeout_s is None else timeout_s
    request = json.dumps({"gold": gold, "pred": pred}).encode() + b"\n"
    with self._lock:
      self._ensure_started()
      try:
        self._proc.stdin.write(request)
        self._proc.stdin.flush()
        reply = self._read_line(time.monotonic() + timeout_s)
      except (OSError, ValueError) as e:   # the child died, or garbled its reply
        self._restart()
        raise RuntimeError(f"math-verify worker failed: {type(e).__name__}") from e
      except (VerifyTimeout, RuntimeError):
        self._restart()
        raise
    if "error" in reply:
      raise RuntimeError(f"math-verify failed in the worker: {reply['error']}")
    return bool(reply["equal"])

  def start(self) -> None:
    """Starts the child and waits until math-verify is imported (~1-2 s); optional warm-up."""
    with self._lock:
      self._ensure_started()

  def close(self) -> None:
    """Stops the child (it also exits by itself when our end of its stdin closes)."""
    with self._lock:
      self._kill()

  def _ensure_started(self) -> None:
    if self._proc is not None and self._owner_pid != os.getpid():
        # We are a fork of the process that started the child: its pipes are not ours to use.
      self._proc = None
    if self._proc is None:
      self._spawn()
    if not self._ready:
      try:
        self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S)
      except (VerifyTimeout, RuntimeError) as e:
        self._kill()
        raise RuntimeError("math-verify worker failed to start "
                           "(is the math-verify package installed?)") from e
      self._ready = True

  def _spawn(self) -> None:
      # The child runs this file as a script: no package import, so it does not pull in JAX.
    self._proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        close_fds=True)
    self._owner_pid = os.getpid()
    self._ready = False
    self._buffer = b""

  def _kill(self) -> None:
    if self._proc is not None and self._owner_pid != os.getpid():
      self._proc = None   # a fork's copy: leave the parent's child alone
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      for pipe in (self._proc.stdin, self._proc.stdout):
        pipe.close()
      self._proc = None

  def _restart(self) -> None:
    self._kill()
    self.restarts += 1
    self._spawn()

  def _read_line(self, deadline: float) -> dict:
    """Reads one JSON line from the child, waiting at most until `deadline`."""
    fd = self._proc.stdout.fileno()
    while b"\n" not in self._buffer:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        raise VerifyTimeout()
      readable, _, _ = select.select([fd], [], [], remaining)
      if not readable:
        raise VerifyTimeout()
      chunk = os.read(fd, 65536)
      if not chunk:
        raise RuntimeError("math-verify worker exited")
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    return json.loads(line)


_default_worker: VerifyWorker | None = None
_default_worker_lock = threading.Lock()


def default_worker() -> VerifyWorker:
  """The process-wide worker, started on first use and stopped at exit."""
  global _default_worker
  with _default_worker_lock:
    if _default_worker is None:
      _default_worker = VerifyWorker()
      atexit.register(_default_worker.close)
    return _default_worker


@functools.lru_cache(maxsize=8192)
def is_equivalent(gold: str, pred: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
  """True if `pred` equals `gold` (exact numbers first, then math-verify within `timeout_s`).

  A timeout or a worker failure counts as not equal and is logged. Results are cached because
  GRPO groups repeat the same answers and several rewards (accuracy, cosine) ask the same
  question.
  """
  decided = fast_equal(gold, pred)
  if decided is not None:
    return decided
  try:
    return default_worker().equivalent(gold, pred, timeout_s)
  except VerifyTimeout:
    log.warning("math-verify timed out after %.1f s on a %d-char answer; scored as wrong",
                timeout_s, len(pred))
  except RuntimeError as e:
    log.warning("math-verify worker failed (%s); scored as wrong", e)
  return False


# ---------------------------------------------------------------------------------------------
# The worker process (child side)
# ---------------------------------------------------------------------------------------------

def _child_compare(parse, verify, gold: str, pred: str) -> bool:
  """Parses both sides as LaTeX math (wrapped in `$...$` so bare answers are recognized)."""
  gold_parsed = parse(f"${gold}$", parsing_timeout=_INNER_TIMEOUT_S)
  pred_parsed = parse(f"${pred}$", parsing_timeout=_INNER_TIMEOUT_S)
  if not gold_parsed or not pred_parsed:
    return False
  return bool(verify(gold_parsed, pred_parsed, timeout_seconds=_INNER_TIMEOUT_S))


def _exit_when_orphaned(parent_pid: int) -> None:
  """Exits the child when its parent is gone, even if the main thread is busy in sympy."""
  while True:
    time.sleep(1.0)
    if os.getppid() != parent_pid:
      os._exit(0)


def _serve() -> None:
  """Child main loop: one JSON request per stdin line, one JSON reply per stdout line."""
  import resource
  resource.setrlimit(resource.RLIMIT_AS, (_CHILD_MEMORY_BYTES, _CHILD_MEMORY_BYTES))
  # Nothing but replies may reach the protocol stream: keep it on a private descriptor and
  # point fd 1 (and sys.stdout) at stderr, so stray prints, even from C code, go there.
  out = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
  logging.disable(logging.CRITICAL)   # math-verify logs whole inputs on timeouts
  from math_verify import parse, verify
  out.write(b'{"ready": true}\n')
  out.flush()
  for line in sys.stdin.buffer:
    request = json.loads(line)
    try:
      reply = {"equal": _child_compare(parse, verify, request["gold"], request["pred"])}
    except BaseException as e:   # includes math-verify's TimeoutException and MemoryError
      reply = {"error": type(e).__name__}
    out.write(json.dumps(reply).encode() + b"\n")
    out.flush()


if __name__ == "__main__":
  _serve()
