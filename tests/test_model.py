"""The functional model: remat policies, gradients, MTP outputs, expert counts, capacity drops."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import model
from r1jax.model.config import ModelConfig
from r1jax.model import moe as moe_lib
from testing import jit, random_params

# 1 dense + 2 MoE layers, 2 MTP modules (so the depth axis is not trivially 1)
CFG = ModelConfig.from_config(dict(
    model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48,
    num_hidden_layers=3, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=2,
    topk_group=1, num_nextn_predict_layers=2, rope_factor=4.0,
    original_max_position_embeddings=8))
B, T = 2, 16


@pytest.fixture(scope="module")
def params():
  return random_params(CFG, seed=0)


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T)), jnp.int32)


def loss_fn(params, tokens, cfg):
  """Next-token cross entropy on the main and MTP logits plus the balance statistic: a loss
  that reaches every parameter except the (non-gradient) router bias."""
  logits, aux = model.forward_with_aux(params, tokens, cfg, mtp=True)
  def xent(lg, shift):
    lp = jax.nn.log_softmax(lg[:, :-shift])
    return -jnp.take_along_axis(lp, tokens[:, shift:, None], -1).mean()
  loss = xent(logits, 1)
  for k in range(cfg.num_nextn_predict_layers):
    loss = loss + 0.3 * xent(aux["mtp_logits"][k], k + 2)
  return loss + 1e-2 * aux["balance"], logits


@functools.lru_cache(maxsize=None)
def value_and_grad(cfg):
  """((loss, logits), grads) of loss_fn."""
  return jit(jax.value_and_grad(functools.partial(loss_fn, cfg=cfg), has_aux=True))


@functools.lru_cache(maxsize=None)
def forward(cfg, mtp=True):
  return jit(functools.partial(model.forward_with_aux, cfg=cfg, mtp=mtp))


def test_grad_is_finite_and_reaches_every_trainable_param(params, tokens):
  (loss, _), grads = value_and_grad(CFG)(params, tokens)
  assert np.isfinite(float(loss)) and float(loss) > 0
  for path, g in jax.tree.flatten_with_path(grads)[0]:
    name = jax.tree_util.keystr(path)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    if "router_bias" in name:  # steers selection only; updated by the balancing rule
      assert np.all(g == 0), name
    else:
      assert np.abs(g).max() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_match_no_remat(params, tokens, policy):
  # without MTP: its compile doubles the cost; the MTP scan's remat shares maybe_remat
  cfg = CFG.replace(num_nextn_predict_layers=0)
  params = {k: v for k, v in params.items() if k != "mtp"}
  (loss_ref, logits_ref), grads_ref = value_and_grad(cfg)(params, tokens)
  (loss, logits), grads = value_and_grad(cfg.replace(remat=policy))(params, tokens)
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, grads_ref)


def test_layer_loop_matches_the_layer_scan(params, tokens):
  """scan_layers=False (a Python loop over each stack, MTP's too) computes what the scan does:
  logits, MTP logits, per-layer expert ids and counts, and gradients; with replayed routing too."""
  loop_cfg = CFG.replace(scan_layers=False)
  (loss_ref, logits_ref), grads_ref = value_and_grad(CFG)(params, tokens)
  (loss, logits), grads = value_and_grad(loop_cfg)(params, tokens)
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads, grads_ref)
  _, aux_ref = forward(CFG)(params, tokens)
  _, aux = forward(loop_cfg)(params, tokens)
  assert aux.keys() == aux_ref.keys() and aux["expert_ids"].shape[0] == 2  # two MoE layers
  np.testing.assert_array_equal(aux["expert_ids"], aux_ref["expert_ids"])
  np.testing.assert_array_equal(aux["expert_counts"], aux_ref["expert_counts"])
  np.testing.assert_allclose(aux["mtp_logits"], aux_ref["mtp_logits"], rtol=1e-5, atol=1e-6)
  replay = jnp.moveaxis(aux_ref["expert_ids"], 0, 2)[..., ::-1]  # [B, T, L_moe, k], reordered
  replayed = [jit(functools.partial(model.forward_with_aux, cfg=cfg, mtp=False))(
      params, tokens, routing=replay)[0] for cfg in (CFG, loop_cfg)]
  np.testing.assert_allclose(replayed[1], replayed[0], rtol=1e-5, atol=1e-6)


def test_layer_loop_gradient_concatenates_the_layers(params, tokens):
  """The loop takes its layers from each stack with one split, so a stack's gradient is one
  concatenate of its layers' gradients, not a sum of zero-padded copies of the whole stack
  (indexing stack[i] per layer: XLA:CPU's pad_add fusions took 13 % of a SmolLM2 step)."""
  loop_cfg = CFG.replace(scan_layers=False)
  # batch 1: no activation shares a shape with a stack of 2 layers
  text = str(jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, tokens[:1], loop_cfg)[0]))(params))
  stacks = [a for k in ("dense_layers", "moe_layers") for a in jax.tree.leaves(params[k])]
  assert text.count(" = split[") >= len(stacks), text.count(" = split[")
  assert text.count(" = concatenate[") >= len(stacks)
  shapes = {"f32[" + ",".join(map(str, a.shape)) + "]" for a in stacks if a.shape[0] > 1}
  pads = re.findall(r":(f32\[[0-9,]*\]) = pad\[", text)
  assert not shapes & set(pads), sorted(shapes & set(pads))


@pytest.mark.parametrize("chunk", [None, 5])
def test_tempered_target_logprobs_match_the_hand_computed_ones(params, tokens, chunk):
  """target_logprobs(temperature=T): log p and entropy of softmax(logits / T), computed here by
  hand from the model's logits, on the full-logits and the chunked head. Temperature 1 is the
  untempered default; the negative control shows T changes the figures."""
  cfg = CFG.replace(logits_chunk=chunk)
  targets = jnp.roll(tokens, -1, axis=1)
  logits = np.asarray(jit(functools.partial(model.forward, cfg=cfg))(params, tokens), np.float64)
  got = {}
  for t in (1.0, 1.7):
    logp, ent, _ = jit(functools.partial(model.target_logprobs, cfg=cfg, entropy=True,
                                         temperature=t))(params, tokens, targets)
    z = logits / t
    z = z - z.max(-1, keepdims=True)
    lsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    want = np.take_along_axis(lsm, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), -(np.exp(lsm) * lsm).sum(-1), rtol=1e-5,
                               atol=1e-5)
    got[t] = np.asarray(logp)
  default, _, _ = jit(functools.partial(model.target_logprobs, cfg=cfg))(params, tokens, targets)
  np.testing.assert_array_equal(np.asarray(default), got[1.0])
  assert np.abs(got[1.7] - got[1.0]).max() > 1e-2


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_logits_give_the_same_losses_and_gradients(params, tokens, tie):
  """logits_chunk=5 (32 tokens: 7 chunks, the last padded) computes the SFT loss (with MTP) and
  the GRPO loss (with a reference KL), their metrics (entropy included) and their gradients as
  the full [B, T, V] logits do; the untied head and the tied embedding both get gradients.
  The compiled step's temporaries shrink with the chunk (benchmarks/step_memory.py measures it at
  a 152k vocabulary)."""
  from r1jax import train
  from r1jax.train.losses import grpo
  cfg = CFG.replace(tie_word_embeddings=tie)
  p = dict(params)
  if tie:
    p.pop("lm_head")
  rng = np.random.default_rng(3)
  mask = jnp.asarray(rng.random((B, T)) > 0.3, jnp.float32)
  targets = jnp.roll(tokens, -1, axis=1)
  sft_batch = {"tokens": tokens, "targets": targets, "loss_mask": mask,
               "segment_ids": jnp.ones((B, T), jnp.int32),
               "positions": jnp.tile(jnp.arange(T), (B, 1))}
  old = jnp.asarray(rng.normal(-4.0, 0.3, (B, T)), jnp.float32)
  grpo_batch = grpo.GRPOBatch(
      tokens=tokens, targets=targets, segment_ids=sft_batch["segment_ids"],
      positions=sft_batch["positions"], loss_mask=mask, rollout_logprobs=old, old_logprobs=old,
      advantages=jnp.asarray([1.0, -0.5], jnp.float32))
  ref = jax.tree.map(lambda x: x * 1.01, p)
  # MTP's heads are chunked too: log-probs of each depth's targets, no [D, B, T, V] logits
  _, _, aux = model.target_logprobs(p, tokens, targets, cfg.replace(logits_chunk=5), mtp=True)
  D = cfg.num_nextn_predict_layers
  assert "mtp_logits" not in aux and aux["mtp_logprobs"].shape == (D, B, T), aux.keys()
  for make, batch in ((lambda c: train.sft_loss(c, mtp_weight=0.3), sft_batch),
                      (lambda c: grpo.grpo_loss(c, beta=0.04, budget=T), grpo_batch)):
    results = [jit(jax.value_and_grad(make(c), has_aux=True))(p, batch, None, ref)
               for c in (cfg, cfg.replace(logits_chunk=5))]
    (loss_ref, m_ref), g_ref = results[0]
    (loss, m), g = results[1]
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-5)
    for k in m_ref:
      if not k.startswith("_"):
        np.testing.assert_allclose(np.asarray(m[k]), np.asarray(m_ref[k]), rtol=1e-5,
                                   atol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_ref)
    head = "embed" if tie else "lm_head"
    assert float(jnp.abs(g[head]).max()) > 1e-4


@pytest.mark.parametrize("impl", ["ragged_dot", "blocked", "capacity"])
def test_moe_forward_adds_no_floats_with_a_scatter(params, tokens, impl):
  """A floating-point scatter-add with repeated indices runs as atomic adds on a GPU, in an order
  that varies run to run: the first H200 run found the sampler's log-probs not bit-identical
  between two identical calls. Every MoE path gathers each token's k rows and sums them in a fixed
  order instead (experts.sorted_rows / combine_sorted); integer scatter-adds (the expert counts)
  are exact in any order. Checked on the forward's jaxpr, with and without a capacity."""
  import re
  for capacity_factor in (None, 1.0):
    cfg = CFG.replace(moe_impl=impl, capacity_factor=capacity_factor, num_nextn_predict_layers=0)
    p = {k: v for k, v in params.items() if k != "mtp"}
    text = str(jax.make_jaxpr(lambda p: model.forward(p, tokens, cfg))(p))
    adds = re.findall(r":(\w+)\[[^\]]*\] = scatter-add", text)
    assert adds and all(d.startswith(("i", "u")) for d in adds), (impl, adds)


def test_chunked_attention_matches_full(params, tokens):
  """attn_chunk=4 (4 query blocks of the 16 tokens, each under checkpoint) is the same model, and
  so is attn_chunk=6, which does not divide T (3 blocks, the last padded with 2 queries that see
  nothing), and attn_key_chunk=5 (key blocks with a running softmax): logits and gradients equal
  the unchunked ones."""
  cfg = CFG.replace(num_nextn_predict_layers=0)
  params = {k: v for k, v in params.items() if k != "mtp"}
  (loss_ref, logits_ref), grads_ref = value_and_grad(cfg)(params, tokens)
  assert tokens.shape[1] % 6
  # attn_key_chunk 5 adds key blocks (the last padded) with a running softmax, in the query
  # chunks or alone
  for chunk, key_chunk in ((4, None), (6, None), (6, 5), (None, 5)):
    (loss, logits), grads = value_and_grad(cfg.replace(attn_chunk=chunk,
                                                       attn_key_chunk=key_chunk))(params, tokens)
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads, grads_ref)
  from r1jax.model import layers
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 6, 2, 4)), jnp.float32) for _ in range(3))
  mask = jnp.tril(jnp.ones((6, 6), bool))[None, None]
  np.testing.assert_allclose(layers.attend(q, k, v, mask, 0.5, chunk=4),
                             layers.attend(q, k, v, mask, 0.5), rtol=1e-6)
  np.testing.assert_allclose(layers.attend(q, k, v, mask, 0.5, chunk=3),
                             layers.attend(q, k, v, mask, 0.5), rtol=1e-6, atol=1e-7)
  # key blocks: a fully masked query row (a left-padded row's padding) still averages every real
  # key as the one-block softmax does; padded keys weigh nothing
  padded = mask.at[:, :, :2, :].set(False)
  for key_chunk in (4, 5):
    np.testing.assert_allclose(layers.attend(q, k, v, padded, 0.5, chunk=4, key_chunk=key_chunk),
                               layers.attend(q, k, v, padded, 0.5), rtol=1e-6, atol=1e-6)
  # the 6 queries run as 2 blocks of 4 (padded), not as one block
  jaxpr = str(jax.make_jaxpr(lambda q: layers.attend(q, k, v, mask, 0.5, chunk=4))(q))
  assert "scan" in jaxpr and "f32[2,1,4,2,4]" in jaxpr, jaxpr


def test_causal_attention_skips_the_key_blocks_after_each_query_block():
  """causal=True: no query sees a later key even where the mask allows it, and with key blocks a
  block that starts after a query block's last query is skipped, forward and backward. The
  probe: NaN values at keys 12-15 reach queries 0-11 through a skipped block's zero weights
  (0 x NaN) only if that block runs. With causal=True the first 12 queries and their gradients
  stay finite and equal the all-finite run; with the same mask and causal=False (no skipping),
  they are NaN."""
  from r1jax.model import layers
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 4)), jnp.float32) for _ in range(3))
  seg = jnp.asarray([[1] * 16, [1] * 7 + [2] * 9], jnp.int32)
  pos = layers.default_positions(seg, seg)
  mask = layers.attention_mask(seg, seg, pos, pos)
  v_nan = v.at[:, 12:].set(jnp.nan)

  @functools.partial(jit, static_argnums=(1, 2, 3))
  def run(v, causal, chunk=4, key_chunk=4, m=mask):
    f = lambda q, v: layers.attend(q, k, v, m, 0.5, chunk=chunk, key_chunk=key_chunk,
                                   causal=causal)
    out, vjp = jax.vjp(f, q, v)
    return out, vjp(jnp.ones_like(out).at[:, 12:].set(0.0))

  ref, (dq_ref, dv_ref) = run(v, False, None, None)
  for chunk, key_chunk in ((4, 4), (6, 5), (None, 4)):
    out, (dq, dv) = run(v, True, chunk, key_chunk)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dq, dq_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dv, dv_ref, rtol=1e-5, atol=1e-6)
  out, (dq, _) = run(v_nan, True)
  np.testing.assert_allclose(out[:, :12], ref[:, :12], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dq[:, :12], dq_ref[:, :12], rtol=1e-5, atol=1e-6)
  assert np.isnan(out[:, 12:]).all()
  out, (dq, _) = run(v_nan, False)  # negative control: every key block runs
  assert np.isnan(out[:, :12]).all() and np.isnan(dq[:, :12]).all()
  # index causality: a mask that lets every query see every key (same segment, equal positions)
  flat, tril = jnp.ones((2, 1, 16, 16), bool), jnp.tril(jnp.ones((2, 1, 16, 16), bool))
  causal_ref = run(v, False, None, None, m=tril)[0]
  np.testing.assert_allclose(run(v, True, m=flat)[0], causal_ref, rtol=1e-6, atol=1e-6)
  assert not np.allclose(run(v, False, m=flat)[0], causal_ref, atol=1e-3)


def test_causal_attention_skips_the_key_blocks_of_earlier_segments():
  """Packed rows: with causal=True a key block the mask allows no pair of (the keys of the
  segments before a query block's own) is skipped too, tested on the data. One row of two
  8-token segments, query and key blocks of 4: NaN values at keys 0-3 (segment 1) leave the
  segment-2 queries 8-15 and their gradients finite and equal the all-finite run. Negative
  controls: every block run (causal=False), or only the blocks past the last query skipped
  (`attend_key_blocks(skip_masked=False)`), make them NaN. A query block that sees no key at all
  keeps the blocks over its own indices, so it stays finite."""
  from r1jax.model import layers
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 4)), jnp.float32) for _ in range(3))
  seg = jnp.asarray([[1] * 8 + [2] * 8], jnp.int32)
  pos = layers.default_positions(seg, seg)
  mask = layers.attention_mask(seg, seg, pos, pos)
  v_nan = v.at[:, :4].set(jnp.nan)

  @functools.partial(jit, static_argnums=(1,))
  def run(v, causal):
    f = lambda q: layers.attend(q, k, v, mask, 0.5, chunk=4, key_chunk=4, causal=causal)
    out, vjp = jax.vjp(f, q)
    return out, vjp(jnp.ones_like(out).at[:, :8].set(0.0))[0]

  ref, dq_ref = run(v, False)
  out, dq = run(v_nan, True)
  np.testing.assert_allclose(out[:, 8:], ref[:, 8:], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dq[:, 8:], dq_ref[:, 8:], rtol=1e-5, atol=1e-6)
  assert np.isnan(out[:, :4]).all()
  out, dq = run(v_nan, False)  # negative control: every key block runs
  assert np.isnan(out[:, 8:]).all() and np.isnan(dq[:, 8:]).all()
  # queries 8-11 alone: the mask test is what skips keys 0-7 (they are not past query 11)
  blocks = lambda v, m=mask, **kw: jit(functools.partial(
      layers.attend_key_blocks, scale=0.5, key_chunk=4, queries=(8, 11), **kw))(
          q[:, 8:12], k, v, m[:, :, 8:12])
  np.testing.assert_allclose(blocks(v_nan), ref[:, 8:12], rtol=1e-6, atol=1e-6)
  assert np.isnan(blocks(v_nan, skip_masked=False)).all()
  # a query block that sees no key keeps key block 2 (its own indices): finite, not 0 / 0
  assert np.isfinite(blocks(v_nan, m=mask.at[:, :, 8:12].set(False))).all()


@pytest.mark.parametrize("heads,kv_heads,d,e", [(4, 2, 8, 8), (2, 2, 12, 8)])
def test_fused_attention_matches_the_einsum_attention(monkeypatch, heads, kv_heads, d, e):
  """attn_impl="cudnn" hands q, k, v, the packed-segment mask and the scale to
  jax.nn.dot_product_attention, with v zero-padded to q's head dim where they differ (MLA). On a
  CPU the same call runs jax's "xla" implementation: outputs and gradients equal attend's own
  einsum path, for GQA (4 query heads on 2 kv heads) and an MLA shape (d 12, e 8). The cuDNN
  kernel itself runs on a GPU (benchmarks/accelerator_checks.py)."""
  from r1jax.model import layers
  monkeypatch.setitem(layers.FUSED_IMPLEMENTATION, "cudnn", "xla")
  rng = np.random.default_rng(1)
  Tq = 10
  q = jnp.asarray(rng.standard_normal((2, Tq, heads, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, Tq, kv_heads, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, Tq, kv_heads, e)), jnp.float32)
  seg = jnp.asarray([[1] * 6 + [2] * 4, [1] * 10], jnp.int32)
  pos = layers.default_positions(seg, seg)
  mask = layers.attention_mask(seg, seg, pos, pos)
  f = lambda impl: jax.value_and_grad(
      lambda q, k, v: jnp.sum(jnp.sin(layers.attend(q, k, v, mask, 0.3, impl=impl))),
      argnums=(0, 1, 2))(q, k, v)
  (val, grads), (val_ref, grads_ref) = f("cudnn"), f("xla")
  assert layers.attend(q, k, v, mask, 0.3, impl="cudnn").shape == (2, Tq, heads, e)
  np.testing.assert_allclose(val, val_ref, rtol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(Exception, match="attn_impl='cudnn' needs dtype"):
    CFG.replace(attn_impl="cudnn")


def test_mtp_logits_shape_and_meaning(params, tokens):
  logits, aux = forward(CFG)(params, tokens)
  D, V = CFG.num_nextn_predict_layers, CFG.vocab_size
  assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
  assert aux["mtp_logits"].shape == (D, B, T, V)
  # module 2 differs from module 1, and the main logits do not depend on mtp=True
  assert float(jnp.abs(aux["mtp_logits"][1] - aux["mtp_logits"][0]).max()) > 1e-3
  logits_no_mtp, aux_no_mtp = forward(CFG, mtp=False)(params, tokens)
  assert "mtp_logits" not in aux_no_mtp
  np.testing.assert_allclose(logits, logits_no_mtp, rtol=1e-6, atol=1e-6)
  # MTP position i (module 1) sees token i + 1: changing the last token changes position T-2
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % V)
  mtp_changed = forward(CFG)(params, changed)[1]["mtp_logits"]
  assert float(jnp.abs(mtp_changed[0, :, T - 2] - aux["mtp_logits"][0, :, T - 2]).max()) > 1e-4
  np.testing.assert_allclose(mtp_changed[0, :, :T - 2], aux["mtp_logits"][0, :, :T - 2],
                             atol=1e-6)


def test_expert_counts_sum_to_assignments(params, tokens):
  _, aux = forward(CFG)(params, tokens)
  counts = np.asarray(aux["expert_counts"])
  assert counts.shape == (CFG.num_moe_layers, CFG.n_routed_experts)
  np.testing.assert_array_equal(counts.sum(1), B * T * CFG.num_experts_per_tok)
  assert counts.max() < B * T  # an expert gets a token at most once
  mtp_counts = np.asarray(aux["mtp_expert_counts"])
  assert mtp_counts.shape == (CFG.num_nextn_predict_layers, CFG.n_routed_experts)
  np.testing.assert_array_equal(mtp_counts.sum(1), B * T * CFG.num_experts_per_tok)
  assert float(aux["dropped"]) == 0 and float(aux["balance"]) > 0


def test_capacity_drops_exactly_the_overflow(params, tokens):
  cfg = CFG.replace(moe_impl="capacity", capacity_factor=0.5)
  C = moe_lib.capacity(cfg, B * T)
  assert C < B * T * cfg.num_experts_per_tok / cfg.n_routed_experts
  logits, aux = forward(cfg, mtp=False)(params, tokens)
  counts = np.asarray(aux["expert_counts"])
  expected = np.maximum(counts - C, 0).sum()
  assert expected > 0 and float(aux["dropped"]) == expected
  dropless_logits, dropless = forward(CFG.replace(moe_impl="capacity"), mtp=False)(params, tokens)
  assert float(dropless["dropped"]) == 0
  assert float(jnp.abs(logits - dropless_logits).max()) > 1e-3
  ragged_logits = forward(CFG, mtp=False)(params, tokens)[0]
  np.testing.assert_allclose(dropless_logits, ragged_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast", [0.5, 3.0])
def test_dropless_fast_path_is_exact_in_both_branches(params, tokens, fast):
  """dropless_fast_factor: small buffers when every expert's load fits them (3.0 here), the full
  N-slot buffers when one overflows (0.5: an expert gets more than half the mean load); either
  way the logits are the dropless ones and nothing drops."""
  dropless = CFG.replace(moe_impl="capacity", capacity_factor=None)
  logits, aux = forward(dropless.replace(dropless_fast_factor=fast), mtp=False)(params, tokens)
  ref, _ = forward(dropless, mtp=False)(params, tokens)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-6)
  assert float(aux["dropped"]) == 0
  # which branch ran: the small buffers would have dropped at 0.5 and do not at 3.0
  small = moe_lib.capacity(CFG.replace(capacity_factor=fast), B * T)
  assert small < B * T
  overflow = np.asarray(aux["expert_counts"]).max() > small
  assert overflow == (fast == 0.5)


@pytest.mark.parametrize("experts, tokens_n", [(8, 32), (64, 512)])
def test_blocked_experts_equal_dense_values_and_gradients(experts, tokens_n):
  """The blocked dropless path (assignments sorted by expert, padded to blocks, one batched
  matmul over blocks) equals every expert on every token (the dense reference), forward and
  backward, with ids >= E (another device's experts, or padding) contributing nothing; the
  blocks hold the real rows plus less than one block per expert."""
  cfg = CFG.replace(n_routed_experts=experts, n_group=1, topk_group=1, num_experts_per_tok=2)
  rng = np.random.default_rng(experts)
  D, I = cfg.hidden_size, cfg.moe_intermediate_size
  p = {k: jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
       for k, s in (("gate", (experts, D, I)), ("up", (experts, D, I)), ("down", (experts, I, D)))}
  x = jnp.asarray(rng.standard_normal((tokens_n, D)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, experts, (tokens_n, 2)), jnp.int32).at[:3].set(experts)
  w = jnp.asarray(rng.random((tokens_n, 2)), jnp.float32)

  def f(impl):
    def loss(p, x):
      y, dropped = moe_lib.routed_experts(p, x, w, ids, cfg.replace(moe_impl=impl))
      return jnp.sum(jnp.sin(y)), (y, dropped)
    return jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(p, x)
  (_, (y, dropped)), grads = f("blocked")
  (_, (y_ref, _)), grads_ref = f("dense")
  assert float(dropped) == 0
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    # float32 sums over a gradient's rows: the error scales with the largest entry (~5 here),
    # 2.9e-5 on one host at 64 experts
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))
  assert np.all(np.asarray(y)[:3] == 0)  # tokens routed to id E: nothing
  b = moe_lib.block_rows(ids.size, experts)
  assert b in (8, 16, 32, 64, 128)


def test_masked_tokens_take_no_expert_capacity(params, tokens):
  """token_mask=False tokens (padding) route to no expert: they are not counted (so they do not
  move the correction bias), take no capacity, and the real tokens' logits are unchanged when
  nothing drops."""
  cfg = CFG.replace(moe_impl="capacity", capacity_factor=None, num_nextn_predict_layers=0)
  params = {k: v for k, v in params.items() if k != "mtp"}
  mask = jnp.arange(T)[None, :] >= jnp.array([[6], [0]])  # row 0 has 6 left pads
  fwd = jit(functools.partial(model.forward_with_aux, cfg=cfg))
  seg = mask.astype(jnp.int32)  # as in training batches: segment 0 = padding, attended by none
  logits, aux = fwd(params, tokens, token_mask=mask, segment_ids=seg)
  ref, aux_ref = fwd(params, tokens, segment_ids=seg)
  k, L = cfg.num_experts_per_tok, cfg.num_moe_layers
  assert float(np.asarray(aux_ref["expert_counts"]).sum()) == B * T * k * L
  assert float(np.asarray(aux["expert_counts"]).sum()) == int(mask.sum()) * k * L
  # real tokens never attend to padding, so only the padded positions' outputs changed
  np.testing.assert_allclose(np.asarray(logits)[np.asarray(mask)],
                             np.asarray(ref)[np.asarray(mask)], rtol=1e-5, atol=1e-6)
  # with a tight capacity, padding no longer pushes real tokens out
  tight = cfg.replace(capacity_factor=0.75)
  fwd_tight = jit(functools.partial(model.forward_with_aux, cfg=tight))
  _, aux_masked = fwd_tight(params, tokens, token_mask=mask, segment_ids=seg)
  _, aux_all = fwd_tight(params, tokens, segment_ids=seg)
  assert float(aux_masked["dropped"]) < float(aux_all["dropped"])
