"""Fused router kernel against the plain-jnp router (interpret mode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import routing

V3_LIKE = dict(top_k=4, n_group=4, topk_group=2, scoring_func="sigmoid", norm_topk_prob=True,
               routed_scaling_factor=2.5)
V2_LIKE = dict(top_k=3, n_group=4, topk_group=2, scoring_func="softmax", norm_topk_prob=False,
               routed_scaling_factor=1.0)
T, E = 200, 32  # T is not a multiple of the 64-token block below: the kernel pads


def _logits(seed=0, quantized=False):
  x = jax.random.normal(jax.random.key(seed), (T, E))
  return jnp.round(x * 2) / 2 if quantized else x  # coarse values create exact ties


@functools.lru_cache(maxsize=None)
def _routes(config_name, with_bias, quantized):
  config = {"v3": V3_LIKE, "v2": V2_LIKE}[config_name]
  bias = 0.3 * jax.random.normal(jax.random.key(1), (E,)) if with_bias else None
  logits = _logits(quantized=quantized)
  kernel = routing.route(logits, bias, **config, block_sizes=routing.BlockSizes(tt=64),
                         interpret=True)
  return config, bias, kernel, routing.route_reference(logits, bias, **config)


@pytest.mark.parametrize("config_name,with_bias,quantized",
                         [("v3", True, False), ("v3", False, True), ("v2", False, False)])
def test_kernel_matches_reference(config_name, with_bias, quantized):
  config, _, kernel, reference = _routes(config_name, with_bias, quantized)
  weights, ids, sort_idx, sizes = kernel
  assert weights.shape == ids.shape == (T, config["top_k"]) and ids.dtype == jnp.int32
  np.testing.assert_array_equal(ids, reference[1])
  np.testing.assert_allclose(weights, reference[0], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(sort_idx, reference[2])
  np.testing.assert_array_equal(sizes, reference[3])


def test_bias_changes_selection_but_not_weight_source():
  _, bias, (weights, ids, _, _), _ = _routes("v3", True, False)
  no_bias = routing.route_reference(_logits(), None, **V3_LIKE)
  assert float((ids != no_bias[1]).mean()) > 0.1
  # Weights are unbiased sigmoid scores of the chosen experts, normalized and scaled.
  scores = jnp.take_along_axis(jax.nn.sigmoid(_logits()), ids, axis=1)
  expected = scores / scores.sum(-1, keepdims=True) * V3_LIKE["routed_scaling_factor"]
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  del bias


def test_selected_experts_respect_group_limit_and_are_distinct():
  _, _, (_, ids, _, _), _ = _routes("v3", True, False)
  ids = np.asarray(ids)
  groups = ids // (E // V3_LIKE["n_group"])
  assert max(len(set(row)) for row in groups) <= V3_LIKE["topk_group"]
  assert all(len(set(row)) == len(row) for row in ids)


def test_dispatch_permutation_and_group_sizes():
  config, _, (_, ids, sort_idx, sizes), _ = _routes("v3", True, False)
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
