"""Fused router kernel against the plain-jnp router and the model's router (interpret mode),
with both fills for the experts of dropped groups."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import routing
from r1jax.model.config import ModelConfig
from r1jax.model import moe as moe_lib

V3_LIKE = dict(top_k=4, n_group=4, topk_group=2, scoring_func="sigmoid", norm_topk_prob=True,
               routed_scaling_factor=2.5)
V2_LIKE = dict(top_k=3, n_group=4, topk_group=2, scoring_func="softmax", norm_topk_prob=False,
               routed_scaling_factor=1.0)
T, E = 200, 32  # T is not a multiple of the 64-token block below: the kernel pads
GROUP_FILLS = tuple(routing.GROUP_FILLS)
# correction bias (mean, std): "negative" is where aux-loss-free updates can drive it, and makes
# most selection scores sigmoid + bias negative, where the two group fills disagree
BIASES = {"none": None, "small": (0.0, 0.3), "negative": (-0.8, 0.2)}


def _logits(seed=0, quantized=False):
  x = jax.random.normal(jax.random.key(seed), (T, E))
  return jnp.round(x * 2) / 2 if quantized else x  # coarse values create exact ties


def _bias(kind):
  if BIASES[kind] is None:
    return None
  mean, std = BIASES[kind]
  return mean + std * jax.random.normal(jax.random.key(1), (E,))


@functools.lru_cache(maxsize=None)
def _routes(config_name, bias_kind, quantized, group_fill="neg_inf"):
  config = dict({"v3": V3_LIKE, "v2": V2_LIKE}[config_name], group_fill=group_fill)
  bias = _bias(bias_kind)
  logits = _logits(quantized=quantized)
  kernel = routing.route(logits, bias, **config, block_sizes=routing.BlockSizes(tt=64),
                         interpret=True)
  return config, bias, kernel, routing.route_reference(logits, bias, **config)


@pytest.mark.parametrize("config_name,bias_kind,quantized,group_fill", [
    ("v3", "small", False, "neg_inf"), ("v3", "none", True, "neg_inf"),
    ("v2", "none", False, "neg_inf"), ("v3", "negative", False, "neg_inf"),
    ("v3", "negative", False, "zero"), ("v3", "negative", True, "zero")])
def test_kernel_matches_reference(config_name, bias_kind, quantized, group_fill):
  config, _, kernel, reference = _routes(config_name, bias_kind, quantized, group_fill)
  weights, ids, sort_idx, sizes = kernel
  assert weights.shape == ids.shape == (T, config["top_k"]) and ids.dtype == jnp.int32
  np.testing.assert_array_equal(ids, reference[1])
  np.testing.assert_allclose(weights, reference[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(sort_idx, reference[2])
  np.testing.assert_array_equal(sizes, reference[3])


def test_bias_changes_selection_but_not_weight_source():
  _, bias, (weights, ids, _, _), _ = _routes("v3", "small", False)
  no_bias = routing.route_reference(_logits(), None, **V3_LIKE)
  assert float((ids != no_bias[1]).mean()) > 0.1
  # Weights are unbiased sigmoid scores of the chosen experts, normalized and scaled.
  scores = jnp.take_along_axis(jax.nn.sigmoid(_logits()), ids, axis=1)
  expected = scores / scores.sum(-1, keepdims=True) * V3_LIKE["routed_scaling_factor"]
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  del bias


def test_selected_experts_respect_group_limit_and_are_distinct():
  _, _, (_, ids, _, _), _ = _routes("v3", "small", False)
  ids = np.asarray(ids)
  groups = ids // (E // V3_LIKE["n_group"])
  assert max(len(set(row)) for row in groups) <= V3_LIKE["topk_group"]
  assert all(len(set(row)) == len(row) for row in ids)


def test_dispatch_permutation_and_group_sizes():
  config, _, (_, ids, sort_idx, sizes), _ = _routes("v3", "small", False)
  flat = np.asarray(ids).reshape(-1)
  assert sorted(np.asarray(sort_idx).tolist()) == list(range(flat.size))
  sorted_ids = flat[np.asarray(sort_idx)]
  assert np.all(np.diff(sorted_ids) >= 0)
  for e in np.unique(flat):  # stable: within one expert, original order
    positions = np.asarray(sort_idx)[sorted_ids == e]
    assert np.all(np.diff(positions) > 0)
  np.testing.assert_array_equal(sizes, np.bincount(flat, minlength=E))
  assert int(sizes.sum()) == T * config["top_k"] and sizes.dtype == jnp.int32


def test_rejects_bad_config():
  with pytest.raises(ValueError, match="n_group"):
    routing.route(_logits(), None, **{**V3_LIKE, "n_group": 5})
  with pytest.raises(ValueError, match="scoring_func"):
    routing.route(_logits(), None, **{**V3_LIKE, "scoring_func": "relu"})
  with pytest.raises(ValueError, match="group_fill"):
    routing.route(_logits(), None, **V3_LIKE, group_fill="nan")


def _groups_per_token(ids, n_group):
  return np.array([len(set(row)) for row in np.asarray(ids) // (E // n_group)])


def test_negative_selection_scores_make_the_group_fills_differ():
  """With most sigmoid + bias scores negative, "zero" picks experts of dropped groups (their
  0.0 beats a kept expert's negative score) and "neg_inf" never does: the parity tests above
  compare two different selections, not one twice."""
  _, bias, (_, ids_inf, _, _), _ = _routes("v3", "negative", False, "neg_inf")
  _, _, (_, ids_zero, _, _), _ = _routes("v3", "negative", False, "zero")
  assert float(((jax.nn.sigmoid(_logits()) + bias) < 0).mean()) > 0.5
  assert float((ids_inf != ids_zero).any(axis=1).mean()) > 0.2
  assert _groups_per_token(ids_inf, V3_LIKE["n_group"]).max() <= V3_LIKE["topk_group"]
  assert _groups_per_token(ids_zero, V3_LIKE["n_group"]).max() > V3_LIKE["topk_group"]


def _model_config(config_name, group_fill):
  """The model's ModelConfig with V3_LIKE's or V2_LIKE's router."""
  config = {"v3": V3_LIKE, "v2": V2_LIKE}[config_name]
  base = ModelConfig.preset("deepseek_v3" if config_name == "v3" else "deepseek_v2")
  return base.replace(
      n_routed_experts=E, num_experts_per_tok=config["top_k"], n_group=config["n_group"],
      topk_group=config["topk_group"], scoring_func=config["scoring_func"],
      topk_method="noaux_tc" if config_name == "v3" else "group_limited_greedy",
      norm_topk_prob=config["norm_topk_prob"],
      routed_scaling_factor=config["routed_scaling_factor"], router_group_fill=group_fill)


def _assert_model_routers_match(cfg, logits, bias, kernel):
  weights, ids = kernel[:2]
  for router in (moe_lib.route, moe_lib.route_pallas):  # route_pallas: cfg.router_group_fill
    got_weights, got_ids, _ = router(logits, jnp.zeros((E,)) if bias is None else bias, cfg)
    np.testing.assert_array_equal(got_ids, ids, err_msg=router.__name__)
    np.testing.assert_allclose(got_weights, weights, rtol=1e-6, atol=1e-6,
                               err_msg=router.__name__)


@pytest.mark.parametrize("group_fill", GROUP_FILLS)
def test_model_router_matches_kernel_with_negative_bias(group_fill):
  _, bias, kernel, _ = _routes("v3", "negative", False, group_fill)
  _assert_model_routers_match(_model_config("v3", group_fill), _logits(), bias, kernel)


@pytest.mark.parametrize("group_fill", GROUP_FILLS)
def test_softmax_group_fill_on_underflowed_scores(group_fill):
  """V2's group_limited_greedy (softmax, groups scored by their max) takes the same fill. Its
  scores are > 0, so the fills agree unless scores underflow to exactly 0: here expert 20
  (group 2) and expert 12 (group 1) outscore the rest by >= 190, groups 2 and 1 are kept, and the
  third pick is a 0.0 tie: expert 8 (a kept group) with "neg_inf", expert 0 (dropped group 0)
  with "zero"."""
  logits = _logits().at[:, 20].add(200.0).at[:, 12].add(190.0)
  config = dict(V2_LIKE, group_fill=group_fill)
  kernel = routing.route(logits, None, **config, block_sizes=routing.BlockSizes(tt=64),
                         interpret=True)
  reference = routing.route_reference(logits, None, **config)
  np.testing.assert_array_equal(kernel[1], reference[1])
  np.testing.assert_allclose(kernel[0], reference[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(kernel[1], np.tile([20, 12, 8 if group_fill == "neg_inf" else 0],
                                                   (T, 1)))
  _assert_model_routers_match(_model_config("v2", group_fill), logits, None, kernel)
