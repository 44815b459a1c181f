"""The package's import graph: no module of r1jax imports, at module level, a module that imports
it back (directly or through others). Function-local imports that dodge such a cycle are the
thing to avoid, so the model's config, the MoE package and the mesh axes are leaves or one-way."""

import ast
import collections
import pathlib
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for f in (ROOT / "r1jax").rglob("*.py"):
    parts = f.relative_to(ROOT).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = f
  return out


def _module_level_imports(f: pathlib.Path, mods) -> set[str]:
  """r1jax modules that importing `f` runs: its module-level imports and their parent
  packages' __init__ files."""
  found = set()
  for node in ast.parse(f.read_text()).body:
    for n in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
      if isinstance(n, ast.Import):
        found.update(a.name for a in n.names)
      elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
        found.add(n.module)
        found.update(f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in mods)
  out = set()
  for name in found:
    parts = name.split(".")
    out.update(".".join(parts[:i]) for i in range(2, len(parts) + 1)
               if ".".join(parts[:i]) in mods)
  return out


def import_graph() -> dict[str, set[str]]:
  mods = _modules()
  graph = {}
  for name, f in mods.items():
    # a submodule imports its parent packages by construction; that is not a cycle
    graph[name] = {d for d in _module_level_imports(f, mods)
                   if d != name and not name.startswith(d + ".")}
  return graph


def cycles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles():
  assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
  graph = import_graph()
  graph["r1jax.model.config"] = graph["r1jax.model.config"] | {"r1jax.model.params"}
  assert any({"r1jax.model.config", "r1jax.model.params"} <= set(c) for c in cycles(graph))


def test_leaves_stay_leaves():
  graph = import_graph()
  assert graph["r1jax.model.config"] <= {"r1jax.errors"}
  assert graph["r1jax.axes"] == set()
  assert graph["r1jax.errors"] == set()
  # the MoE package is one-way: routing and experts never reach dispatch or the block
  for leaf in ("r1jax.model.moe.routing", "r1jax.model.moe.experts"):
    assert not graph[leaf] & {"r1jax.model.moe.dispatch", "r1jax.model.moe.block"}
  # the model does not depend on the mesh layer
  assert not any(d.startswith("r1jax.parallel") for n, ds in graph.items()
                 if n.startswith("r1jax.model") for d in ds)


def test_two_space_indentation():
  """One indentation everywhere (the codebases we imitate use 2 spaces)."""
  wrong = {}
  files = [f for d in ("r1jax", "tests", "benchmarks", "pallas_kernels", "configs")
           for f in (ROOT / d).rglob("*.py")]
  for f in files:
    steps, stack = collections.Counter(), [0]
    with open(f, "rb") as fh:
      for tok in tokenize.tokenize(fh.readline):
        if tok.type == tokenize.INDENT:
          width = len(tok.string.expandtabs())
          steps[width - stack[-1]] += 1
          stack.append(width)
        elif tok.type == tokenize.DEDENT:
          stack.pop()
    if set(steps) - {2}:
      wrong[str(f.relative_to(ROOT))] = dict(steps)
  assert len(files) > 50 and not wrong, wrong


def test_model_types_are_one_table():
  """Code dispatches on a model's parts (attention, MoE layout, q/k norm), never on its name:
  the names appear only in `r1jax.model.config.MODEL_TYPE_TABLE`."""
  import re
  names = ("deepseek_v3", "deepseek_v2", "qwen2", "qwen3", "qwen3_moe", "llama")
  pattern = re.compile(r"model_type\s*(==|!=|in\b)|model_type\.startswith|"
                       + "|".join(f'"{n}"' for n in names))
  hits = []
  for f in (ROOT / "r1jax").rglob("*.py"):
    text = f.read_text()
    if f.name == "config.py":  # the table itself, and its membership check
      text = text[:text.index("MODEL_TYPE_TABLE: dict")] + text[text.index("MODEL_TYPES = tuple"):]
      text = text.replace("self.model_type in MODEL_TYPES", "")
      text = re.sub(r'(get\("model_type", |model_type: str = )"\w+"', "", text)  # the default
    if f.name == "run_config.py":  # the tiny configs name their model type as data
      text = re.sub(r'model_type="\w+"', "", text)
    hits += [f"{f.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(text)]
  assert not hits, hits
