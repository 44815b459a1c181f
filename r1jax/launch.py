"""`python -m r1jax.launch --config configs/NAME.py[:ARG] [--config.a.b=VALUE ...] [--workdir DIR]`

Runs the stages of the config's R1 recipe in a run directory (see README). User errors (bad
config, data, checkpoint, flags) print one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys

from absl import flags
from etils import epath
from ml_collections import config_flags

from r1jax import fileio
from r1jax.errors import UserError


def _define_flags(fv: flags.FlagValues, sys_argv=None) -> flags.FlagValues:
  """The launcher's flags on `fv`; `--config.*` overrides are looked up in `sys_argv` (default:
  sys.argv at parse time, which is what config_flags reads them from)."""
  config_flags.DEFINE_config_file("config", None, "config file (configs/NAME.py[:ARG])",
                                  flag_values=fv, lock_config=True, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "run directory, a filesystem path or gs://BUCKET/PATH "
                      "(default runs/<config>-<timestamp>); an existing one is resumed",
                      flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "compile the first stage's step on abstract inputs and "
                    "print per-device memory; allocates no model", flag_values=fv)
  flags.DEFINE_integer("dry_run_devices", 0, "devices of the abstract mesh for --dry_run "
                       "(default: the mesh section's product, or the local devices)",
                       flag_values=fv)
  flags.DEFINE_string("compilation_cache", os.path.join("~", ".cache", "r1jax", "jax"),
                      "persistent XLA compilation cache directory ('' disables; the "
                      "JAX_COMPILATION_CACHE_DIR environment variable takes precedence): stages "
                      "with the same step (SFT stages, GRPO stages) and reruns skip recompiling",
                      flag_values=fv)
  flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 (multi-host)", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index (multi-host)", flag_values=fv)
  return fv


FLAGS = _define_flags(flags.FlagValues())


def _fail(msg: str) -> int:
  sys.stderr.write(f"error: {msg}\n")
  return 2


def _config_name(path: str) -> str:
  return os.path.splitext(os.path.basename(path.split(":")[0]))[0]


def parse_config(argv):
  """The validated run config of a launcher command line (argv[0] is the program name).

  Raises UserError (one line) for anything wrong with it. Reads overrides from `argv` only (not
  sys.argv) and parses on fresh flags, so it can be called any number of times in one process.
  """
  from r1jax import run_config
  argv = list(argv)
  config = _parse(argv, _define_flags(flags.FlagValues(), sys_argv=argv))
  try:
    run_config.validate(config)
  except (AttributeError, KeyError) as e:  # e.g. --config.checkpoint={} emptied a section
    missing = (re.findall(r"'(\w+)'", str(e)) or ["?"])[0]
    raise UserError(f"the config lacks the field {missing!r}: an override may have replaced a "
                    "whole section (set a section's fields one by one)") from None
  return config


def _parse(argv, fv: flags.FlagValues = FLAGS):
  try:
    fv(argv)
  except flags.Error as e:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if len(lines) > 1 and "Traceback" in lines[1]:  # get_config raised: its own error is last
      raise UserError(f"{lines[0]} {lines[-1]}") from None
    raise UserError(lines[0]) from None
  except (AttributeError, KeyError) as e:  # config_flags: override of a key the config lacks
    key = re.findall(r"'(\w+)'", str(e))
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key and
                 key[0] in a.split("=")[0].split(".")), None)
    if flag is None:
      raise UserError(f"bad config override: {str(e).splitlines()[0]}") from None
    raise UserError(f"unknown config key {key[0]!r} in {flag}") from None
  except OSError as e:  # config_flags: overrides applied to a config file that did not load
    raise UserError(_load_error(e)) from None
  except (TypeError, ValueError) as e:  # config_flags override errors
    raise UserError(f"bad config override: {str(e).splitlines()[0]}") from None
  if fv.config is None:
    raise UserError("--config is required (e.g. --config configs/r1_tiny.py)")
  if type(fv.config).__name__ == "_ErrorConfig":  # config_flags defers load failures
    raise UserError(_load_error(object.__getattribute__(fv.config, "_error")))
  return fv.config


def _load_error(e: BaseException) -> str:
  """One line for a config file that config_flags could not load (its message spans lines)."""
  while e.__cause__ is not None and "earlier failure" in str(e):
    e = e.__cause__
  reason = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("[Errno")]
  return f"cannot load config file: {reason[-1] if reason else str(e).splitlines()[0]}"


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  try:
    config = _parse(argv)
    from r1jax import run_config
    run_config.validate(config)  # before anything is written to the run directory
    if FLAGS.dry_run_devices < 0:
      raise UserError(f"--dry_run_devices={FLAGS.dry_run_devices} must be >= 0 (0: the mesh's)")
    if FLAGS.dry_run:
      _simulate_devices(config)
    _compilation_cache(FLAGS.compilation_cache)
    from r1jax.parallel import distributed
    distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.dry_run:
      from r1jax import dry_run
      print(dry_run.report(config, FLAGS.dry_run_devices or None))
      return 0
    import jax
    if FLAGS.workdir is None and jax.process_count() > 1:
      raise UserError(f"--workdir is required with {jax.process_count()} processes (each would "
                      "name its own default run directory); pass a shared path")
    workdir = FLAGS.workdir or os.path.join(
        "runs", f"{_config_name(FLAGS['config'].config_filename)}-"
        f"{datetime.datetime.now():%Y%m%d-%H%M%S}")
    fileio.check_workdir(workdir)
    # resolved once, here: everything below (orbax above all) sees an absolute path or a URL
    workdir = os.fspath(fileio.absolute(workdir))
    from r1jax import recipe
    try:
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only or missing mount, a file in the path, permissions
      raise UserError(f"--workdir {workdir}: cannot create it ({e.strerror or e})") from None
    try:  # the run's first write
      _write_config(config, workdir)
    except OSError as e:
      raise UserError(f"--workdir {workdir}: cannot write there ({e.strerror or e})") from None
    summary = recipe.Recipe(config, workdir, run_info=recipe.provenance(argv)).run()
  except UserError as e:
    return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  print(json.dumps({"workdir": workdir, "stages": [
      {"name": s["name"], "eval": s.get("eval", {}).get("accuracy")} for s in summary["stages"]]}))
  return 0


def _compilation_cache(directory: str) -> str | None:
  """Turns on jax's persistent compilation cache in `directory` (unless the environment already
  names one); returns the directory in use. Compiles under a second are not cached."""
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if not directory:
    return None
  directory = os.path.expanduser(directory)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return directory


def _simulate_devices(config):
  """--dry_run: simulate the mesh's devices with host CPU devices, unless the user chose another
  platform (JAX_PLATFORMS) or the host device count (XLA_FLAGS). Works once jax is imported (the
  config module imports it), as long as no backend has started: jax_num_cpu_devices and
  jax_platforms are read when the first backend starts."""
  import jax
  if (os.environ.get("JAX_PLATFORMS", "cpu") != "cpu" or
      "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")):
    return
  from r1jax.parallel import mesh as mesh_lib
  n = FLAGS.dry_run_devices or mesh_lib.simulated_devices(config.mesh.to_dict())
  try:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:  # a backend already started: dry_run.report names what is missing
    logging.warning("cannot simulate %d host devices for the dry run: %s", n, e)


def _without_added_defaults(new, old, defaults):
  """`new` less the entries that `old` lacks and that hold their default (`defaults`): fields
  added to the config after `old` was written (a run started by an older r1jax), which mean
  what the older version did."""
  if not all(isinstance(d, dict) for d in (new, old, defaults)):
    return new
  return {k: _without_added_defaults(v, old.get(k), defaults.get(k)) for k, v in new.items()
          if k in old or k not in defaults or v != defaults[k]}


def _write_config(config, workdir: str):
  """config.json: the resolved config. A resumed run must use the same config; fields added
  to r1jax's config since the run started count as the same where they hold their default."""
  import jax
  path = epath.Path(workdir) / "config.json"
  resolved = json.loads(config.to_json_best_effort())
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except ValueError:
      old = None
    if old is not None:
      from r1jax import run_config
      defaults = json.loads(run_config.base_config().to_json_best_effort())
      resolved = _without_added_defaults(resolved, old, defaults)
    if old is not None and old != resolved:
      changed = sorted(k for k in set(old) | set(resolved) if old.get(k) != resolved.get(k))
      raise UserError(f"{workdir} holds a run of a different config (differs in: "
                      f"{', '.join(changed)}); use another --workdir")
    return
  if jax.process_index() == 0:
    fileio.atomic_write_json(path, resolved)


if __name__ == "__main__":
  sys.exit(main())
