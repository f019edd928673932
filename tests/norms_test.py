"""The low-precision GroupNorm against numpy float64 and against autodiff of the textbook
formula; its parameters against flax's GroupNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infd_jax.models import layers, norms

GROUPS, EPS = 4, 1e-6


def _numpy_group_norm(x, scale, bias):
  b, h, w, c = x.shape
  g = x.astype(np.float64).reshape(b, h, w, GROUPS, c // GROUPS)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + EPS)).reshape(x.shape) * scale + bias


def _autodiff_reference(x, scale, bias):
  """The textbook formula in plain jnp; jax differentiates it."""
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, GROUPS, c // GROUPS)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / jnp.sqrt(var + EPS)).reshape(x.shape) * scale + bias


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(2, 6, 5, 16)) * 3 + 1).astype(np.float32)
  return x, rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)


def test_forward_matches_numpy_float64(inputs):
  x, scale, bias = inputs
  ref = _numpy_group_norm(x, scale, bias)
  out = norms.group_norm(jnp.asarray(x), scale, bias, GROUPS, EPS)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  out = norms.group_norm(jnp.asarray(x, jnp.bfloat16), scale, bias, GROUPS, EPS)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=0.02, atol=0.05)


def test_backward_matches_autodiff_of_the_formula(inputs):
  x, scale, bias = inputs
  dy = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  _, vjp = jax.vjp(lambda *a: norms.group_norm(*a, GROUPS, EPS), x, scale, bias)
  _, ref_vjp = jax.vjp(_autodiff_reference, x, scale, bias)
  for got, want in zip(vjp(dy), ref_vjp(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  xb = jnp.asarray(x, jnp.bfloat16)
  _, vjp = jax.vjp(lambda a, s, b: norms.group_norm(a, s, b, GROUPS, EPS), xb, scale, bias)
  dx, d_scale, _ = vjp(jnp.asarray(dy, jnp.bfloat16))
  assert dx.dtype == jnp.bfloat16 and d_scale.dtype == jnp.float32
  want = ref_vjp(dy)[0]
  assert np.abs(np.asarray(dx, np.float32) - want).max() < 0.02 * np.abs(want).max()


def test_layers_picks_it_for_bfloat16_only_with_flax_parameters(inputs):
  x = jnp.asarray(inputs[0])
  flax_gn = layers.group_norm(EPS, num_groups=GROUPS, dtype=jnp.float32)
  low = layers.group_norm(EPS, num_groups=GROUPS, dtype=jnp.bfloat16)
  assert isinstance(flax_gn, nn.GroupNorm) and isinstance(low, norms.LowPrecisionGroupNorm)
  ours, theirs = (m.init(jax.random.key(0), x)["params"] for m in (low, flax_gn))
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours, is_leaf=lambda v: isinstance(v, nn.Partitioned)),
                  jax.tree.leaves(theirs, is_leaf=lambda v: isinstance(v, nn.Partitioned))):
    assert a.names == b.names and a.value.dtype == b.value.dtype == jnp.float32
    np.testing.assert_array_equal(a.value, b.value)
  out = low.apply({"params": theirs}, x)
  np.testing.assert_allclose(np.asarray(out, np.float32), flax_gn.apply({"params": theirs}, x),
                             rtol=0.02, atol=0.05)
