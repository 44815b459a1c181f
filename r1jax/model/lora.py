"""LoRA (Hu et al. 2021) as functions over the parameter pytree, for every model family.

Adapters mirror the paths of the weights they adapt; each is {"a": A, "b": B} with
W' = W + (alpha / rank) * A @ B, contracted over the rank. (Not to be confused with DeepSeek's
MLA `q_lora_rank`/`kv_lora_rank`, which are parts of the model: their q_a/q_b/kv_a/kv_b
projections are ordinary LoRA targets here.)

    from r1jax.model import lora
    lcfg = lora.LoraConfig(rank=8, alpha=16)           # attention + MLP projections (+ shared
                                                       # experts); experts=True adds routed ones
    adapters = lora.init(cfg, lcfg, params, jax.random.key(1))   # B = 0: the model is unchanged

    def loss_fn(adapters, params, batch):              # the frozen base is a plain argument:
      logits = model.forward(lora.merge(params, adapters, lcfg), batch["tokens"], cfg)
      ...                                              # only adapters reach grad and optimizer
    grads = jax.grad(loss_fn)(adapters, params, batch)

    shardings = lora.shardings(cfg, lcfg, mesh)        # from params.declare's logical axes
    lora.export("out_dir", cfg, params, adapters, lcfg)  # merged HF checkpoint (hf.save)

Shapes: a weight W [*stack, *in, *out] (stack: the layer axis of a stacked tree, and the expert
axis of routed experts; in: the dims the projection contracts, e.g. (heads, head_dim) for `o`)
gets A [*stack, *in, r] and B [*stack, r, *out]. Adapters are float32 whatever param_dtype is
(they are small, and they are what is trained).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from r1jax.errors import ConfigError
from r1jax.model.config import ModelConfig
from r1jax.model import params as param_lib

DEFAULT_TARGETS = ("q", "k", "v", "o", "q_a", "q_b", "kv_a", "kv_b", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Attributes:
    rank: r, the inner dimension of A [.., in, r] and B [.., r, out].
    alpha: the update is scaled by alpha / rank, so changing the rank keeps the update's scale.
    targets: leaf names of the adapted weights, matched in every layer stack and the MTP module;
      names a model lacks (q_a in a dense model) are ignored.
    experts: also adapt the routed experts' gate/up/down [E, D, I] (one adapter per expert);
      shared experts are ordinary MLPs and follow `targets` alone.
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  experts: bool = False

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))  # a list would break hashing
    if not (isinstance(self.rank, int) and self.rank >= 1):
      raise ConfigError(f"lora.rank={self.rank} must be a positive integer")
    if not self.alpha > 0:
      raise ConfigError(f"lora.alpha={self.alpha} must be positive")
    if not self.targets or not all(isinstance(t, str) for t in self.targets):
      raise ConfigError(f"lora.targets={self.targets} must be a non-empty tuple of leaf names")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class _Target:
  """One adapted weight: its declaration and how its dims split into stack | in | out."""
  spec: param_lib.ParamSpec
  n_stack: int
  n_in: int

  @property
  def stack(self):
    return self.spec.shape[:self.n_stack]

  @property
  def fan_in(self) -> int:
    return math.prod(self.spec.shape[self.n_stack:self.n_stack + self.n_in])

  def a_spec(self, rank: int) -> param_lib.ParamSpec:
    k = self.n_stack + self.n_in
    return param_lib.ParamSpec((*self.spec.shape[:k], rank), (*self.spec.axes[:k], None),
                               dtype=jnp.float32)

  def b_spec(self, rank: int) -> param_lib.ParamSpec:
    s, k = self.n_stack, self.n_stack + self.n_in
    return param_lib.ParamSpec((*self.spec.shape[:s], rank, *self.spec.shape[k:]),
                               (*self.spec.axes[:s], None, *self.spec.axes[k:]), "zeros",
                               dtype=jnp.float32)


def _is_spec(x) -> bool:
  return isinstance(x, param_lib.ParamSpec)


def _path(keypath) -> tuple[str, ...]:
  return tuple(k.key for k in keypath)


@functools.lru_cache(maxsize=32)
def _targets(cfg: ModelConfig, lora_cfg: LoraConfig) -> dict[tuple[str, ...], _Target]:
  """The adapted weights of `cfg`, in declaration order."""
  from r1jax import hf  # hf imports the model package; imported here to keep that one-way
  # hf's name map records each linear's stack index (layer[, expert]) and how many leading dims
  # of the slice form its input (o: heads x head_dim), so LoRA splits weights as the checkpoint
  # does; non-linear leaves (norms, biases, embed) have n_in = 0
  layout = {}
  for e in hf.entries(cfg):
    layout.setdefault(e.path, (len(e.index), e.n_in))
  found, matched = {}, set()
  leaves, _ = jax.tree_util.tree_flatten_with_path(param_lib.declare(cfg), is_leaf=_is_spec)
  for keypath, spec in leaves:
    path = _path(keypath)
    if path[-1] not in lora_cfg.targets:
      continue
    n_stack, n_in = layout.get(path, (0, 0))
    if not n_in:
      raise ConfigError(f"lora.targets: {path[-1]!r} ({'/'.join(path)}) is not a projection")
    matched.add(path[-1])
    if "exp" in spec.axes and not lora_cfg.experts:
      continue
    assert all(a in ("layers", "exp") for a in spec.axes[:n_stack]), (path, spec.axes)
    found[path] = _Target(spec, n_stack, n_in)
  unknown = [t for t in lora_cfg.targets if t not in matched and t not in DEFAULT_TARGETS]
  if unknown:
    raise ConfigError(f"lora.targets: {unknown[0]!r} names no weight of this {cfg.model_type} "
                      "model")
  if not found:
    raise ConfigError(f"lora.targets={lora_cfg.targets} select no weight of this "
                      f"{cfg.model_type} model")
  return found


def _nest(flat: dict[tuple[str, ...], object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def declare(cfg: ModelConfig, lora_cfg: LoraConfig) -> dict:
  """The adapter tree as ParamSpec leaves: {path...: {"a": [*stack, *in, r] (in's logical
  axes, None for r), "b": [*stack, r, *out] (None for r, out's logical axes)}}."""
  r = lora_cfg.rank
  return _nest({path: {"a": t.a_spec(r), "b": t.b_spec(r)}
                for path, t in _targets(cfg, lora_cfg).items()})


def _map(fn, cfg, lora_cfg):
  return jax.tree.map(fn, declare(cfg, lora_cfg), is_leaf=_is_spec)


def abstract(cfg: ModelConfig, lora_cfg: LoraConfig):
  """ShapeDtypeStructs of the adapters; allocates nothing."""
  return _map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), cfg, lora_cfg)


def logical_axes(cfg: ModelConfig, lora_cfg: LoraConfig):
  """Logical axis names of every adapter leaf (tuples), for `r1jax.parallel.rules.spec_for`."""
  return _map(lambda s: s.axes, cfg, lora_cfg)


def shardings(cfg: ModelConfig, lora_cfg: LoraConfig, mesh):
  """NamedShardings of the adapters on `mesh`, by the same rules table as the parameters."""
  from jax.sharding import NamedSharding
  from r1jax.parallel import rules  # the model package does not depend on the mesh layer
  return _map(lambda s: NamedSharding(mesh, rules.spec_for(s.axes, s.shape, mesh)), cfg,
              lora_cfg)


def abstract_sharded(cfg: ModelConfig, lora_cfg: LoraConfig, mesh):
  """ShapeDtypeStructs of the adapters with their shardings on `mesh` (restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract(cfg, lora_cfg), shardings(cfg, lora_cfg, mesh))


def num_params(cfg: ModelConfig, lora_cfg: LoraConfig) -> int:
  return sum(math.prod(s.shape) for s in jax.tree.leaves(abstract(cfg, lora_cfg)))


def init(cfg: ModelConfig, lora_cfg: LoraConfig, params_or_abstract, rng: jax.Array):
  """Adapters for `params_or_abstract` (arrays or ShapeDtypeStructs of `cfg`'s tree, checked
  against the declaration): A ~ normal(0, 1/sqrt(fan_in)), B = 0, so the adapted model starts
  equal to the base. fan_in is the size of W's input dims: the kaiming-style scale keeps
  x @ A at the scale of x (loralib draws kaiming-uniform with the same variance bound)."""
  _check(cfg, lora_cfg, params_or_abstract)
  return _init(cfg, lora_cfg, rng)


def _check(cfg: ModelConfig, lora_cfg: LoraConfig, params_or_abstract):
  for path, t in _targets(cfg, lora_cfg).items():
    leaf = params_or_abstract
    try:
      for k in path:
        leaf = leaf[k]
    except (KeyError, TypeError):
      raise ConfigError(f"lora.init: the parameters have no {'/'.join(path)}, which "
                        f"{cfg.model_type} declares (params of another config?)") from None
    if tuple(leaf.shape) != t.spec.shape:
      raise ConfigError(f"lora.init: {'/'.join(path)} has shape {tuple(leaf.shape)}, the "
                        f"config declares {t.spec.shape} (params of another config?)")


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(cfg: ModelConfig, lora_cfg: LoraConfig, rng: jax.Array):
  # one draw cut into pieces: XLA:CPU compiles each threefry draw separately (see params.init)
  targets = _targets(cfg, lora_cfg)
  specs = {p: t.a_spec(lora_cfg.rank) for p, t in targets.items()}
  sizes = [math.prod(s.shape) for s in specs.values()]
  flat = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  out, offset = {}, 0
  for (path, spec), n in zip(specs.items(), sizes):
    a = flat[offset:offset + n].reshape(spec.shape) / math.sqrt(targets[path].fan_in)
    out[path] = {"a": a, "b": jnp.zeros(targets[path].b_spec(lora_cfg.rank).shape, jnp.float32)}
    offset += n
  return _nest(out)


def init_sharded(cfg: ModelConfig, lora_cfg: LoraConfig, params_or_abstract, rng: jax.Array,
                 mesh):
  """`init`, with the adapters created directly in their shardings on `mesh` (every process
  holds its shards of the same values)."""
  _check(cfg, lora_cfg, params_or_abstract)
  return jax.jit(lambda r: _init(cfg, lora_cfg, r),
                 out_shardings=shardings(cfg, lora_cfg, mesh))(rng)


def _is_adapter(node) -> bool:
  return isinstance(node, dict) and node.keys() == {"a", "b"} and not isinstance(node["a"], dict)


def delta(w_shape, a, b, scale: float):
  """scale * A @ B in float32, shaped like W [*stack, *in, *out]: A [*stack, *in, r],
  B [*stack, r, *out] (the split of W's dims follows from the three ranks)."""
  n_stack = a.ndim + b.ndim - 2 - len(w_shape)
  stack, r = a.shape[:n_stack], a.shape[-1]
  a_SIR = a.astype(jnp.float32).reshape(*stack, -1, r)
  b_SRO = b.astype(jnp.float32).reshape(*stack, r, -1)
  # HIGHEST: the default f32 matmul on TPU/GPU rounds inputs to bf16, which would blur a
  # small update against W
  d = jnp.matmul(a_SIR, b_SRO, precision=jax.lax.Precision.HIGHEST)
  return scale * d.reshape(w_shape)


def merge(params, adapters, lora_cfg: LoraConfig):
  """params with W + scale * A @ B for every adapted leaf (computed in f32, cast back to W's
  dtype); all other leaves are the same objects. Differentiable in `adapters` (and params)."""
  def walk(p, a):
    if _is_adapter(a):
      w = p.astype(jnp.float32) + delta(p.shape, a["a"], a["b"], lora_cfg.scale)
      return w.astype(p.dtype)
    out = dict(p)
    for k, sub in a.items():
      out[k] = walk(p[k], sub)
    return out

  return walk(params, adapters)


def export(path: str, cfg: ModelConfig, params, adapters, lora_cfg: LoraConfig, **save_kw):
  """Write the merged model as a HF checkpoint dir (`r1jax.hf.save`; `save_kw` go to it)."""
  from r1jax import hf
  hf.save(path, cfg, jax.jit(merge, static_argnums=2)(params, adapters, lora_cfg), **save_kw)


__all__ = ["LoraConfig", "DEFAULT_TARGETS", "declare", "abstract", "logical_axes", "shardings",
           "num_params", "init", "init_sharded", "merge", "delta", "export"]
