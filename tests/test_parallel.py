"""Sharded runs equal single-device runs: forward logits, gradients and optimizer steps of the tiny
MoE on meshes of 8 simulated CPU devices; sharding rules; all-to-all drop counting; mesh errors.

Parameters are drawn at the model's init scale (std 0.02, testing.random_params), where logits
are O(1) and the sharded results agree with one device to ~5e-7 (logits) and ~3e-8 (gradients):
float32 summation order is the only difference, so the 1e-5 bound is absolute. Scaled-up
parameters (std 0.1) make the logits O(10) and the same relative error reaches ~1e-5 absolute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from r1jax import model, parallel, run_config, train
from r1jax.errors import ConfigError
from r1jax.model.config import ModelConfig
from r1jax.model import moe as moe_lib
from r1jax.model.moe import dispatch as expert_lib
from r1jax import dry_run
from r1jax.train import losses
from testing import jit, random_params

# 1 dense + 1 MoE layer and one MTP module (itself an MoE layer): 16 experts, top-2, 4 groups
CFG = ModelConfig.from_config(run_config.tiny_moe_fields(
    num_hidden_layers=2, moe_impl="capacity", capacity_factor=None, num_nextn_predict_layers=1))
B, T = 8, 32  # B divides every mesh's batch split (8 or 4 devices)
MESHES = {"data8": dict(data=8), "data2_expert4": dict(data=2, expert=4),
          "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
          "data2_expert2_context2": dict(data=2, expert=2, context=2)}
# (mesh, expert_dispatch): without an `expert` axis both strategies are the same program
CASES = [("data8", "allgather"), ("data2_expert4", "allgather"), ("data2_expert4", "all_to_all"),
         ("data2_expert4", "ragged_all_to_all"), ("fsdp2_expert2_tensor2", "allgather"),
         ("fsdp2_expert2_tensor2", "all_to_all"), ("fsdp2_expert2_tensor2", "ragged_all_to_all"),
         ("data2_expert2_context2", "allgather"), ("data2_expert2_context2", "all_to_all")]
TOL = 1e-5


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, seed=0, std=0.02)


@pytest.fixture(scope="module")
def batch():
  """Two packed segments per row (20 + 12 tokens), as the data pipeline makes them."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, CFG.vocab_size, (B, T)).astype(np.int32)
  seg = np.where(np.arange(T) < 20, 1, 2).astype(np.int32)
  pos = np.concatenate([np.arange(20), np.arange(T - 20)]).astype(np.int32)
  mask = (rng.random((B, T)) < 0.8).astype(np.float32)
  return dict(tokens=tokens, targets=np.roll(tokens, -1, axis=1), loss_mask=mask,
              segment_ids=np.broadcast_to(seg, (B, T)).copy(),
              positions=np.broadcast_to(pos, (B, T)).copy())


def _loss(params, batch, cfg):
  """SFT-style loss reaching every trainable parameter: CE + MTP CE + balance statistic."""
  logits, aux = model.forward_with_aux(params, batch["tokens"], cfg, mtp=True,
                                       segment_ids=batch["segment_ids"],
                                       positions=batch["positions"])
  ce = losses.cross_entropy(logits, batch["targets"], batch["loss_mask"])
  mtp = losses.mtp_loss(aux["mtp_logits"], batch["targets"], batch["loss_mask"],
                        batch["segment_ids"])
  return ce + 0.3 * mtp + 1e-2 * aux["balance"], (logits, aux["expert_counts"])


@functools.lru_cache(maxsize=None)
def _value_and_grad(cfg):
  return jit(jax.value_and_grad(functools.partial(_loss, cfg=cfg), has_aux=True))


def _mesh(name):
  return parallel.make_mesh(MESHES[name])


@pytest.fixture(scope="module")
def reference(params, batch):
  out = _value_and_grad(CFG)(params, batch)
  return jax.tree.map(np.asarray, out)


def test_reference_is_not_degenerate(reference):
  """The comparison means something: routing spreads over every expert shard, logits vary."""
  (loss, (logits, counts)), grads = reference
  assert np.isfinite(loss) and 0.5 < np.abs(logits).max() < 10 and logits.std() > 0.05
  counts = counts.reshape(-1, 4)  # 16 experts in 4 blocks, the shards of a 4-way expert axis
  assert (counts.sum(1) > 0).all() and (counts > 0).sum() >= 12
  assert all(np.abs(g).max() > 0 for k, g in _flat(grads).items() if "router_bias" not in k)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.flatten_with_path(tree)[0]}


# + dropless exchanges with fast buffers (2x the mean load; `dispatch._dropless`) inside the model
@pytest.mark.parametrize("mesh_name,dispatch,fast", [case + (None,) for case in CASES] + [
    ("data2_expert4", "all_to_all", 2.0), ("fsdp2_expert2_tensor2", "ragged_all_to_all", 2.0)])
def test_logits_and_grads_match_single_device(params, batch, reference, mesh_name, dispatch,
                                              fast):
  # the fast cases under remat "full", as the full-size configs run them (lax.cond in a remat)
  cfg = CFG.replace(expert_dispatch=dispatch, dropless_fast_factor=fast,
                    remat="full" if fast else CFG.remat)
  mesh = _mesh(mesh_name)
  sharded_params = parallel.shard_params(params, cfg, mesh)
  with jax.set_mesh(mesh):
    (loss, (logits, counts)), grads = _value_and_grad(cfg)(
        sharded_params, parallel.shard_batch(batch, mesh))
  (loss_ref, (logits_ref, counts_ref)), grads_ref = reference
  # the inputs really were split: batch over the batch axes, experts over `expert`
  assert len(logits.sharding.device_set) == 8
  if "context" in MESHES[mesh_name]:  # context parallelism: each device kept its own positions
    assert logits.sharding.spec[1] == "context", logits.sharding.spec
  if "expert" in MESHES[mesh_name]:
    gate = sharded_params["moe_layers"]["moe"]["gate"]
    assert gate.addressable_shards[0].data.shape[1] == CFG.n_routed_experts // mesh.shape["expert"]
  np.testing.assert_array_equal(counts, counts_ref)  # identical routing
  np.testing.assert_allclose(logits, logits_ref, rtol=0, atol=TOL)
  np.testing.assert_allclose(loss, loss_ref, rtol=0, atol=TOL)
  flat, flat_ref = _flat(grads), _flat(grads_ref)
  assert flat.keys() == flat_ref.keys()
  for k in flat:
    np.testing.assert_allclose(flat[k], flat_ref[k], rtol=0, atol=TOL, err_msg=k)


def test_context_parallel_chunks_match_single_device_and_split_the_work(params, batch):
  """Context parallelism through every chunked path: a 4-way `context` axis (8 of each row's 32
  positions per device) with query chunks of 3 (each device's 8 positions padded to 9), key
  blocks of 5, and the main and MTP heads' log-probs 3 positions at a time give the single-device
  log-probs and gradients. The compiled program splits the work: per device, about the FLOPs of
  the 8-way row split, not those of the whole batch (k and v are expanded for every key on every
  context device, the one part not split)."""
  cfg = CFG.replace(attn_chunk=3, attn_key_chunk=5, logits_chunk=3)

  def f(p, b):
    picked, _, aux = model.decoder.chunked_target_logprobs(
        p, b["tokens"], b["targets"], cfg, segment_ids=b["segment_ids"],
        positions=b["positions"], mtp=True)
    return (jnp.sum(picked * b["loss_mask"]) + 0.3 * jnp.sum(aux["mtp_logprobs"]),
            (picked, aux["mtp_logprobs"]))

  value_and_grad = jit(jax.value_and_grad(f, has_aux=True))
  (_, ref), grads_ref = value_and_grad(params, batch)
  flops = {}
  for name, mesh_cfg in (("rows", dict(data=8)), ("context", dict(fsdp=2, context=4))):
    mesh = parallel.make_mesh(mesh_cfg)
    args = parallel.shard_params(params, cfg, mesh), parallel.shard_batch(batch, mesh)
    with jax.set_mesh(mesh):
      (_, got), grads = value_and_grad(*args)
      flops[name] = value_and_grad.lower(*args).compile().cost_analysis()["flops"]
    if name == "context":
      assert got[0].sharding.spec == P("fsdp", "context"), got[0].sharding.spec
      for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
      flat, flat_ref = _flat(grads), _flat(grads_ref)
      for k in flat:
        np.testing.assert_allclose(flat[k], flat_ref[k], rtol=0, atol=TOL, err_msg=k)
  whole = value_and_grad.lower(params, batch).compile().cost_analysis()["flops"]
  assert flops["context"] < 1.5 * flops["rows"] < 0.25 * whole, (flops, whole)


def test_zigzag_order_puts_an_early_and_a_late_chunk_on_each_device():
  """`zigzag_slots`: 16 positions over 2 devices in 4 chunks of 4, device 0 holding chunks 0 and
  3, device 1 chunks 1 and 2; `to_zigzag` and its inverse move rows that way and back. GRPO
  updates pad their columns to twice the context axis in that order."""
  layers = model.layers
  np.testing.assert_array_equal(layers.zigzag_slots(16, 2), [0, 1, 2, 3, 12, 13, 14, 15,
                                                             4, 5, 6, 7, 8, 9, 10, 11])
  np.testing.assert_array_equal(layers.zigzag_slots(16, 2), layers.zigzag_slots(16, 2, jnp))
  x = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
  with jax.set_mesh(parallel.make_mesh(dict(data=4, context=2))):
    assert layers.zigzag_applies(16) and not layers.zigzag_applies(14)
    z = jax.jit(layers.to_zigzag)(x)
    back = jax.jit(functools.partial(layers.to_zigzag, inverse=True))(z)
  np.testing.assert_array_equal(z, x[:, layers.zigzag_slots(16, 2)])
  np.testing.assert_array_equal(back, x)
  mesh = parallel.make_mesh(dict(data=2, context=4))
  assert parallel.position_multiple(mesh, "zigzag") == 8
  assert parallel.position_multiple(mesh, "contiguous") == 4
  assert parallel.position_multiple(parallel.make_mesh(dict(data=8)), "zigzag") == 1


@pytest.mark.parametrize("zigzag", [True, False])
def test_context_parallel_causal_attention_skips_each_devices_own_blocks(zigzag, monkeypatch):
  """Causal attention on a 4-way `context` axis (32 positions, 8 per device, query blocks of 2,
  key blocks of 4), its positions in zigzag or in position order, equals one device's, values
  and gradients. Each device skips the key blocks past its own queries: with NaN values at the
  last 4 keys, every query before them stays finite and exact. One skip decision for all devices
  (the key blocks past every device's queries in a loop step) would run the NaN block for the
  late chunk of every device in the zigzag order. Negative control: without the causal skip
  (`causal=False`, the same causal mask) every block runs, and every query reads NaN.
  attn_impl="cudnn" (jax's "xla" implementation on a CPU) runs per device too."""
  layers = model.layers
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((2, T, 2, 8)), jnp.float32) for _ in range(3))
  pos, seg = jnp.broadcast_to(jnp.arange(T), (2, T)), jnp.ones((2, T), jnp.int32)
  mask = layers.attention_mask(seg, seg, pos, pos)
  v_nan = v.at[:, T - 4:].set(jnp.nan)
  order = (lambda a: layers.to_zigzag(a)) if zigzag else (lambda a: a)
  back = (lambda a: layers.to_zigzag(a, inverse=True)) if zigzag else (lambda a: a)

  def attend(q, k, v, causal=True, impl="xla"):
    s, p = order(seg), order(pos)
    out = layers.attend(order(q), order(k), order(v), layers.attention_mask(s, s, p, p), 0.5,
                        chunk=2, key_chunk=4, causal=causal, zigzag=zigzag, impl=impl)
    return back(out)

  loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v)))
  ref = layers.attend(q, k, v, mask, 0.5, causal=True)
  grads_ref = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(layers.attend(q, k, v, mask, 0.5))),
                       argnums=(0, 1, 2))(q, k, v)
  with jax.set_mesh(parallel.make_mesh(dict(data=2, context=4))):
    out = jax.jit(attend)(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    dq_nan = jax.jit(jax.grad(lambda q: jnp.sum(jnp.sin(attend(q, k, v_nan)[:, :T - 4]))))(q)
    out_nan = jax.jit(attend)(q, k, v_nan)
    control = jax.jit(functools.partial(attend, causal=False))(q, k, v_nan)
    monkeypatch.setitem(layers.FUSED_IMPLEMENTATION, "cudnn", "xla")
    fused = jax.jit(functools.partial(attend, impl="cudnn"))(q, k, v)
    bf16 = lambda a: a.astype(jnp.bfloat16)  # XLA:CPU cannot sum bf16 gradients over `context`
    dk16 = jax.jit(jax.grad(lambda k: loss(bf16(q), k, bf16(v)).astype(jnp.float32)))(bf16(k))
  np.testing.assert_allclose(out, ref, rtol=0, atol=TOL)
  np.testing.assert_allclose(fused, ref, rtol=0, atol=TOL)
  assert out.sharding.spec[1] == fused.sharding.spec[1] == "context"
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
  np.testing.assert_allclose(out_nan[:, :T - 4], ref[:, :T - 4], rtol=0, atol=TOL)
  assert np.isfinite(np.asarray(dq_nan[:, :T - 4])).all()
  assert np.isnan(np.asarray(out_nan[:, T - 4:])).all()
  assert np.isnan(np.asarray(control)).all()
  assert dk16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(dk16, np.float32), grads_ref[1], rtol=0, atol=0.1)


def test_zigzag_order_keeps_the_expert_ids_and_their_replay(params, batch):
  """On a data 2 x context 4 mesh the model runs its positions in zigzag order and puts them
  back: the MoE layers' expert ids come out in position order, equal to one device's, and
  replaying them (R3) gives one device's logits. In position order (`context_order=
  "contiguous"`) the logits are one device's too."""
  def forward(cfg):
    return jit(lambda p, b, r: model.forward_with_aux(
        p, b["tokens"], cfg, segment_ids=b["segment_ids"], positions=b["positions"], routing=r))
  fwd = forward(CFG)
  logits_ref, aux_ref = fwd(params, batch, None)
  routing = jnp.moveaxis(aux_ref["expert_ids"], 0, 2)  # [B, T, L_moe, k]
  mesh = parallel.make_mesh(dict(data=2, context=4))
  args = parallel.shard_params(params, CFG, mesh), parallel.shard_batch(batch, mesh)
  with jax.set_mesh(mesh):
    assert model.layers.zigzag_applies(T)
    logits, aux = fwd(*args, None)
    replayed, _ = fwd(*args, routing)
    in_order, _ = forward(CFG.replace(context_order="contiguous"))(*args, None)
  np.testing.assert_allclose(in_order, logits_ref, rtol=0, atol=TOL)
  np.testing.assert_array_equal(aux["expert_ids"], aux_ref["expert_ids"])
  np.testing.assert_allclose(logits, logits_ref, rtol=0, atol=TOL)
  np.testing.assert_allclose(replayed, logits_ref, rtol=0, atol=TOL)


def _optimizer():
  optim = run_config.base_config().optim
  optim.update(lr=1e-3, warmup_steps=0, schedule="constant")
  return train.make_optimizer(optim, 10)


def _run_steps(params, batch, cfg, mesh, n=3):
  tx, lr = _optimizer()
  step = jit(train.make_step(train.sft_loss(cfg, mtp_weight=0.3, balance_alpha=1e-3), tx, lr,
                             bias_gamma=1e-2, jit=False), donate_argnums=(0,))
  state = jit(lambda p: train.create(p, tx, 0))(params)
  if mesh is not None:
    shardings = jax.tree.map(lambda x: x.sharding, dry_run.abstract_state(cfg, tx, mesh))
    state, batch = jax.device_put(state, shardings), parallel.shard_batch(batch, mesh)
  losses_ = []
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    for _ in range(n):
      state, metrics = step(state, batch)
      losses_.append(float(metrics["loss"]))
  return jax.tree.map(np.asarray, train.full_params(state)), losses_


def test_optimizer_steps_match_single_device(params, batch):
  """Three AdamW steps (with the correction-bias update) on the 2 fsdp x 2 expert x 2 tensor
  mesh, experts exchanged by all-to-all, give the single-device parameters."""
  cfg = CFG.replace(expert_dispatch="all_to_all")
  ref, ref_losses = _run_steps(params, batch, cfg, None)
  got, got_losses = _run_steps(params, batch, cfg, _mesh("fsdp2_expert2_tensor2"))
  assert ref_losses[-1] < ref_losses[0]  # the steps did train
  np.testing.assert_allclose(got_losses, ref_losses, rtol=0, atol=TOL)
  flat, flat_ref, flat0 = _flat(got), _flat(ref), _flat(params)
  moved = [k for k in flat_ref if np.abs(flat_ref[k] - flat0[k]).max() > 2e-3]
  assert any("router_bias" in k for k in moved) and any("moe']['gate" in k for k in moved)
  for k in flat:  # AdamW's normalized steps magnify float-order differences where a gradient
    # is near 0: one element of dense_layers.mlp.up moved 1.16e-5 apart on one host
    np.testing.assert_allclose(flat[k], flat_ref[k], rtol=0, atol=3 * TOL, err_msg=k)


def test_rules_put_experts_on_expert_and_dense_weights_on_fsdp():
  mesh = _mesh("fsdp2_expert2_tensor2")
  specs = parallel.param_specs(CFG, mesh)
  moe, dense = specs["moe_layers"]["moe"], specs["dense_layers"]["mlp"]
  # [layers, E, D, I]: experts over `expert`, their model dim over `fsdp`, width over `tensor`
  assert moe["gate"] == P(None, "expert", "fsdp", "tensor")
  assert moe["down"] == P(None, "expert", "tensor", "fsdp")
  # dense weights: the model dim over fsdp (and expert, plain data parallelism outside MoE)
  assert dense["gate"] == P(None, ("fsdp", "expert"), "tensor")
  assert specs["embed"] == P("tensor", ("fsdp", "expert"))
  assert specs["moe_layers"]["moe"]["shared"]["up"] == P(None, ("fsdp", "expert"), "tensor")
  assert specs["moe_layers"]["moe"]["router_bias"] == P(None, None)
  # an axis that does not divide a dimension is dropped instead of failing
  odd = parallel.spec_for(("exp", "embed"), (6, 128), parallel.make_mesh(dict(expert=4, fsdp=2)))
  assert odd == P(None, ("fsdp", "expert"))


def _shipped_config(name):
  """configs/NAME.py's get_config()."""
  path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


LARGE = 2**20  # bytes: a parameter this big must not sit whole on every device


def test_activations_keep_each_devices_rows_on_fsdp_meshes(monkeypatch):
  """r1_distill_qwen_1p5b shrunk (2 layers, hidden 256, 8 rows of 1,024 tokens) on fsdp 8: the
  dry run's compiled SFT step needs at most a third of the temporaries it needs when the rows
  are left to XLA's sharding propagation (`constrain_positions` and `embed_split` as no-ops,
  the code before): there a device held the activations of all 8 rows, with the model
  dimension split instead (about 130 against 30 MiB; at full size on fsdp 64, 220 GiB against
  7.5)."""
  from r1jax import dry_run
  from r1jax.model import layers
  monkeypatch.setattr(dry_run, "GiB", 2 ** 20)  # the report in MiB

  def temporaries():
    config = _shipped_config("r1_distill_qwen_1p5b")
    config.mesh.update(data=1, fsdp=8)
    config.model.update(num_hidden_layers=2, hidden_size=256, intermediate_size=512,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                        attn_chunk=256, attn_key_chunk=256, logits_chunk=256)
    config.data.update(seq_len=1024, batch_size=8)
    line = next(l for l in dry_run.report(config, 8).splitlines() if "temporaries" in l)
    return float(line.split()[1])

  pinned = temporaries()
  monkeypatch.setattr(layers, "constrain_positions", lambda x, *a, **k: x)
  monkeypatch.setattr(layers, "embed_split", lambda x: x)
  assert pinned * 3 < temporaries(), pinned


@pytest.mark.parametrize("name,num_devices,mesh_update", [
    ("deepseek_v3_671b", 256, {}), ("deepseek_v3_671b", 256, dict(fsdp=2, context=2)),
    ("deepseek_v2_lite", 64, {})])
def test_full_size_parameters_split_over_the_whole_mesh(name, num_devices, mesh_update):
  """The shipped configs on their default meshes (abstract: spec_for reads only the axis sizes),
  and the 671B with half its FSDP axis given to context parallelism: every parameter over 1 MiB
  is split over all devices (none replicated, as MLA's q_b / kv_b and the stacked norms were), so
  a device holds 1/num_devices of the parameters, and of their gradients and AdamW moments,
  which take the same specs."""
  config = _shipped_config(name)
  config.mesh.update(mesh_update)
  cfg = ModelConfig.from_config(config.model)
  mesh = parallel.abstract_mesh(config.mesh.to_dict(), num_devices)
  shapes, specs = model.abstract(cfg), parallel.param_specs(cfg, mesh)
  total = per_device = 0
  replicated, partly_split = [], []
  for (path, x), spec in zip(jax.tree.flatten_with_path(shapes)[0], jax.tree.leaves(
      specs, is_leaf=lambda s: isinstance(s, P))):
    nbytes = x.size * x.dtype.itemsize
    shard_bytes = math.prod(NamedSharding(mesh, spec).shard_shape(x.shape)) * x.dtype.itemsize
    total, per_device = total + nbytes, per_device + shard_bytes
    if nbytes > LARGE and shard_bytes == nbytes:
      replicated.append(jax.tree_util.keystr(path))
    elif nbytes > LARGE and shard_bytes * num_devices != nbytes:
      partly_split.append((jax.tree_util.keystr(path), spec))
  assert not replicated, replicated
  assert not partly_split, partly_split
  assert total > (1000 if name == "deepseek_v3_671b" else 50) * 2**30  # the real sizes (fp32)
  assert per_device <= 1.05 * total / num_devices, (per_device / 2**30, total / num_devices / 2**30)


@pytest.mark.parametrize("mesh_cfg,match", [
    (dict(data=-1, fsdp=-1), "at most one axis may be -1"),
    (dict(data=3), "need 3 devices, have 8"),
    (dict(data=2, expert=2), "need 4 devices, have 8"),
    (dict(data=-1, expert=3), "not divisible"),
    (dict(pipeline=2), "mesh.pipeline is not a mesh axis"),
    (dict(data=0), "mesh.data=0"),
])
def test_mesh_config_errors(mesh_cfg, match):
  with pytest.raises(ConfigError, match=match):
    parallel.make_mesh(mesh_cfg)


def test_mesh_minus_one_takes_the_rest():
  mesh = parallel.make_mesh(dict(data=-1, expert=4))
  assert dict(mesh.shape) == dict(data=2, fsdp=1, expert=4, context=1, tensor=1)


def test_dry_run_simulates_a_mesh_the_config_can_take():
  from r1jax.parallel.mesh import simulated_devices
  assert simulated_devices(dict(data=-1)) == 8
  assert simulated_devices(dict(data=-1, fsdp=4)) == 8
  assert simulated_devices(dict(data=-1, fsdp=8, expert=8)) == 64  # deepseek_v2_lite.py
  assert simulated_devices(dict(data=-1, fsdp=3)) == 6
  assert simulated_devices(dict(data=1, fsdp=4, expert=64)) == 256
  with pytest.raises(ConfigError, match="at most one axis"):
    simulated_devices(dict(data=-1, fsdp=-1))


# ------------------------------------------------------------------ all-to-all drop counting

def _two_level_capacity(ids_Nk, cfg, n_shards, ep):
  """Which assignments survive the all-to-all path, in numpy: each source device keeps at most
  C1 = ceil(n*k/ep * cf) assignments per destination device (in token order), and each
  destination keeps at most C2 = capacity(local experts, ep*C1 rows) rows per local expert (in
  source-then-slot order). Returns kept [N, k] bool."""
  N, k = ids_Nk.shape
  n, E_loc = N // n_shards, cfg.n_routed_experts // ep
  A = n * k
  C1 = min(A, math.ceil(A / ep * cfg.capacity_factor))
  cfg1 = dataclasses.replace(cfg, num_experts_per_tok=1, n_routed_experts=E_loc)
  C2 = moe_lib.capacity(cfg1, ep * C1)
  kept = np.zeros((N, k), bool)
  for group in range(n_shards // ep):  # devices of one expert group exchange tokens
    rows = {}  # destination -> list of (flat assignment index) in receive order
    for src in range(ep):
      base = (group * ep + src) * n
      flat = ids_Nk[base:base + n].reshape(-1)
      for dst in range(ep):
        mine = np.nonzero(flat // E_loc == dst)[0][:C1]
        rows.setdefault(dst, []).extend(base * k + mine)
    for dst, assignments in rows.items():
      local = ids_Nk.reshape(-1)[assignments] % E_loc
      for e in range(E_loc):
        for a in np.asarray(assignments)[local == e][:C2]:
          kept.reshape(-1)[a] = True
  return kept


def _experts_numpy(p, x, w, ids, kept):
  silu = lambda v: v / (1 + np.exp(-v))
  g, u, d = (np.asarray(p[k], np.float64) for k in ("gate", "up", "down"))
  y = np.zeros(x.shape, np.float64)
  for t, j in zip(*np.nonzero(kept)):
    e = ids[t, j]
    y[t] += w[t, j] * (silu(x[t] @ g[e]) * (x[t] @ u[e])) @ d[e]
  return y


def test_all_to_all_drops_follow_per_device_capacity():
  """With capacity_factor set, all-to-all capacity is per (source, destination) device pair and
  per local expert at the destination, not per expert over the global batch: the dropped count
  legitimately differs from one device's. It equals the two-level rule exactly, and the output
  is the sum over exactly the kept assignments."""
  cfg = CFG.replace(capacity_factor=0.75, expert_dispatch="all_to_all")
  mesh = _mesh("data2_expert4")
  N, D, k, E = 256, CFG.hidden_size, CFG.num_experts_per_tok, CFG.n_routed_experts
  rng = np.random.default_rng(1)
  x = rng.standard_normal((N, D)).astype(np.float32)
  # skewed routing (experts 0-3, on device 0 of each group, are popular) so that both levels drop
  prefs = np.where(np.arange(E) < 4, 4.0, 1.0)
  ids = np.stack([rng.choice(E, k, replace=False, p=prefs / prefs.sum())
                  for _ in range(N)]).astype(np.int32)
  w = rng.random((N, k)).astype(np.float32)
  p = {key: 0.1 * rng.standard_normal((E,) + s).astype(np.float32)
       for key, s in (("gate", (D, 64)), ("up", (D, 64)), ("down", (64, D)))}

  kept = _two_level_capacity(ids, cfg, n_shards=8, ep=4)
  with jax.set_mesh(mesh):
    y, dropped, _ = jit(lambda *a: expert_lib.dispatch(*a, cfg, mesh))(p, x, w, ids)
  assert float(dropped) == (~kept).sum() > 0
  np.testing.assert_allclose(y, _experts_numpy(p, x, w, ids, kept), rtol=1e-4, atol=1e-4)

  # one device: capacity per expert over all N tokens, a different (here smaller) drop count
  _, dropped_single = jit(lambda *a: moe_lib.routed_experts(*a, cfg))(p, x, w, ids)
  C = moe_lib.capacity(cfg, N)
  expected_single = np.maximum(np.bincount(ids.reshape(-1), minlength=E) - C, 0).sum()
  assert float(dropped_single) == expected_single
  assert float(dropped_single) != float(dropped)


# ------------------------------------------------------------------ ragged all-to-all

def _ragged_kept(ids_Nk, n_shards, ep, E_loc, R):
  """Which assignments survive the ragged path, in numpy: each source sends its assignments
  sorted by expert; receiver r fills its R-row buffer with the sources' chunks in device order
  and cuts the last one that does not fit. Returns kept [N, k] bool."""
  N, k = ids_Nk.shape
  n = N // n_shards
  kept = np.zeros(N * k, bool)
  for group in range(n_shards // ep):
    used = np.zeros(ep, int)
    for src in range(ep):
      base = (group * ep + src) * n
      flat = ids_Nk[base:base + n].reshape(-1)
      order = np.argsort(flat, kind="stable")
      for dst in range(ep):
        mine = order[flat[order] // E_loc == dst]
        take = min(len(mine), max(R - used[dst], 0))
        kept[base * k + mine[:take]] = True
        used[dst] += len(mine)
  return kept.reshape(N, k)


def test_ragged_all_to_all_capacity_drops_are_counted():
  """With capacity_factor set, each device's receive buffer holds ceil(n*k * cf) rows, shared by
  the senders in device order: the drop count and the output follow that rule exactly."""
  cfg = CFG.replace(capacity_factor=0.75, expert_dispatch="ragged_all_to_all")
  mesh = _mesh("data2_expert4")
  N, D, k, E = 256, CFG.hidden_size, CFG.num_experts_per_tok, CFG.n_routed_experts
  rng = np.random.default_rng(2)
  x = rng.standard_normal((N, D)).astype(np.float32)
  prefs = np.where(np.arange(E) < 4, 4.0, 1.0)  # device 0 of each group is popular
  ids = np.stack([rng.choice(E, k, replace=False, p=prefs / prefs.sum())
                  for _ in range(N)]).astype(np.int32)
  w = rng.random((N, k)).astype(np.float32)
  p = {key: 0.1 * rng.standard_normal((E,) + s).astype(np.float32)
       for key, s in (("gate", (D, 64)), ("up", (D, 64)), ("down", (64, D)))}
  n = N // 8
  kept = _ragged_kept(ids, n_shards=8, ep=4, E_loc=E // 4, R=math.ceil(n * k * 0.75))
  with jax.set_mesh(mesh):
    y, dropped, _ = jit(lambda *a: expert_lib.dispatch(*a, cfg, mesh))(p, x, w, ids)
  assert float(dropped) == (~kept).sum() > 0
  np.testing.assert_allclose(y, _experts_numpy(p, x, w, ids, kept), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["all_to_all", "ragged_all_to_all"])
def test_dropless_exchange_fast_buffers_and_exact_fallback(strategy):
  """Dropless exchanges (capacity_factor None) with dropless_fast_factor f: buffers of f x the
  mean load, and the exchange over the fewest token slices (1, 2, 3 here) whose every slice fits
  them on every device. Every case gives every assignment's output and the gradients of the one
  device's computation, and reports how many exchanges ran. The skewed and concentrated routings
  overflow the fast buffers, so only the slices can get them right (the fast buffers alone would
  drop rows); the concentrated one needs the most slices (each slice's exact bound), and the
  balanced one fits in one. n = 70 tokens per device (a mean of 35 rows per pair): 2 slices of
  35, or 3 of 24 with the last one padded. With dropless_max_tokens 35 every routing exchanges in
  2 slices or more (4 for the skewed one, 6 for the concentrated), with buffers sized for 35
  tokens."""
  mesh = _mesh("data2_expert4")
  N, D, k, E = 560, CFG.hidden_size, CFG.num_experts_per_tok, CFG.n_routed_experts
  ep, E_loc, n = 4, E // 4, N // 8
  rng = np.random.default_rng(3)
  x = rng.standard_normal((N, D)).astype(np.float32)
  w = rng.random((N, k)).astype(np.float32)
  p = {key: 0.1 * rng.standard_normal((E,) + s).astype(np.float32)
       for key, s in (("gate", (D, 64)), ("up", (D, 64)), ("down", (64, D)))}
  skewed = np.stack([rng.choice(E, k, replace=False, p=np.where(np.arange(E) < 4, 2.5, 1.0) /
                                (4 * 2.5 + 12)) for _ in range(N)]).astype(np.int32)
  t = np.arange(N)
  balanced = np.stack([t % E, (t + 1 + (t // E) % (E - 1)) % E], 1).astype(np.int32)
  concentrated = np.stack([t % 2, 2 + t % 2], 1).astype(np.int32)  # all on device 0's experts
  fast = 1.5
  assert n * k / ep >= expert_lib.FAST_MIN_MEAN
  rows = math.ceil(n * k / ep * fast) if strategy == "all_to_all" else math.ceil(n * k * fast)
  exact_rows = n * min(k, E_loc) * (1 if strategy == "all_to_all" else ep)
  most = math.ceil(exact_rows / rows)
  assert most == 3

  def slices(ids, least=1):
    """The fewest slices in (least, 2 least, ...) whose loads all fit the fast buffers (sized
    for n / least tokens), else the most: each slice's exact bound."""
    n_least = math.ceil(n / least)
    rows = (math.ceil(n_least * k / ep * fast) if strategy == "all_to_all"
            else math.ceil(n_least * k * fast))
    most = least * math.ceil(n_least * min(k, E_loc) * (1 if strategy == "all_to_all" else ep)
                             / rows)
    s = least
    while s < most:
      nc = math.ceil(n / s)
      dest = ids.reshape(8, n, k) // E_loc  # [device, token, k]
      sent = np.stack([[np.bincount(dest[d, j * nc:(j + 1) * nc].reshape(-1), minlength=ep)
                        for j in range(s)] for d in range(8)])  # [device, slice, destination]
      if strategy == "ragged_all_to_all":
        sent = sent.reshape(2, ep, s, ep).sum(1)  # rows each device of a group receives
      if sent.max() <= rows:
        return s
      s *= 2
    return most

  assert (slices(skewed), slices(concentrated), slices(balanced)) == (2, 3, 1)
  # dropless_max_tokens 35: the 70 tokens always exchange in 2 slices or more, buffers for 35
  assert (slices(skewed, 2), slices(concentrated, 2), slices(balanced, 2)) == (4, 6, 2)
  every = np.ones((N, k), bool)
  grad_of = lambda c: jit(jax.grad(lambda p, x: jnp.sum(
      expert_lib.dispatch(p, x, jnp.asarray(w), jnp.asarray(ids), c, mesh)[0] ** 2), (0, 1)))
  for ids in (skewed, concentrated, balanced):
    for f, max_tokens in ((None, None), (fast, None), (fast, 35)) + (
        ((None, 35),) if ids is skewed else ()):
      cfg = CFG.replace(expert_dispatch=strategy, dropless_fast_factor=f,
                        dropless_max_tokens=max_tokens)
      with jax.set_mesh(mesh):
        y, dropped, ran = jit(lambda *a: expert_lib.dispatch(*a, cfg, mesh))(p, x, w, ids)
        grads = grad_of(cfg)(p, x)
      assert float(dropped) == 0
      least = 2 if max_tokens else 1
      assert float(ran) == (slices(ids, least) if f else least), (f, max_tokens)
      np.testing.assert_allclose(y, _experts_numpy(p, x, w, ids, every), rtol=1e-4, atol=1e-4)
      single = jax.grad(lambda p, x: jnp.sum(moe_lib.routed_experts(
          p, x, jnp.asarray(w), jnp.asarray(ids), CFG)[0] ** 2), (0, 1))(p, x)
      for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(single)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_ragged_all_to_all_lowers_to_the_native_collective():
  """Off CPU the ragged path uses `jax.lax.ragged_all_to_all` (XLA:CPU cannot run it): the
  forward and the gradient lower to ragged collectives, driven by the same offsets the CPU
  emulation executes in the tests above."""
  cfg = CFG.replace(expert_dispatch="ragged_all_to_all")
  mesh = _mesh("data2_expert4")
  N, D, k, E = 64, CFG.hidden_size, CFG.num_experts_per_tok, CFG.n_routed_experts
  rng = np.random.default_rng(3)
  x = rng.standard_normal((N, D)).astype(np.float32)
  ids = np.stack([rng.choice(E, k, replace=False) for _ in range(N)]).astype(np.int32)
  w = rng.random((N, k)).astype(np.float32)
  p = {key: rng.standard_normal((E,) + s).astype(np.float32)
       for key, s in (("gate", (D, 8)), ("up", (D, 8)), ("down", (8, D)))}

  def loss(p, x, native):
    return jnp.sum(expert_lib.dispatch(p, x, w, ids, cfg, mesh, native=native)[0] ** 2)

  with jax.set_mesh(mesh):
    forward = jax.jit(functools.partial(loss, native=True)).lower(p, x).as_text()
    grad = jax.jit(jax.grad(functools.partial(loss, native=True))).lower(p, x).as_text()
    emulated = jax.jit(jax.grad(functools.partial(loss, native=False))).lower(p, x).as_text()
  assert forward.count("@ragged_all_to_all(") == 2  # tokens out, results back
  assert grad.count("@ragged_all_to_all(") > 2     # the backward pass also exchanges raggedly
  assert "ragged_all_to_all" not in emulated
