"""`data.colour.whitening`: the map it returns whitens the pixels (numpy, float64)."""

import numpy as np

from infd_jax.data import colour


def test_whitening_gives_zero_mean_identity_covariance_and_is_symmetric():
  rng = np.random.default_rng(0)
  # Correlated colours: a bright, mostly grey set with weak chroma, as emoji are.
  mix = np.array([[0.8, 0.1, 0.05], [0.75, 0.2, 0.0], [0.7, 0.0, 0.25]])
  pixels = np.clip(rng.normal(size=(4, 32, 32, 3)) @ mix.T * 60 + 170, 0, 255).astype(np.uint8)
  out = np.asarray(colour.whitening(pixels, eps=0.0))
  w, b = out[:9].reshape(3, 3), out[9:]
  x = pixels.reshape(-1, 3).astype(np.float64) / 127.5 - 1
  y = x @ w.T + b
  np.testing.assert_allclose(y.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(3), atol=1e-3)
  np.testing.assert_allclose(w, w.T, atol=1e-5)  # ZCA: the symmetric whitening matrix
