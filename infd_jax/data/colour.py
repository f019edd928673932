"""Colour statistics of an image set: the whitening map for `ae.input_colour`.

  python -m infd_jax.data.colour --dataset=openmoji [--every=20] [--size=64]
"""

import argparse

import numpy as np


def whitening(images: np.ndarray, eps: float = 1e-4) -> tuple[float, ...]:
  """ZCA whitening of uint8 RGB images [..., 3] as seen by the model (values in [-1, 1]).

  Returns 12 numbers for `ae.input_colour`: W (3 x 3, row-major) then -W mean, where
  W = V diag(1 / sqrt(lambda + eps)) V^T from the pixels' colour covariance: the map
  sends the pixels to zero mean and identity covariance, staying closest to RGB.
  """
  x = images.reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
  mean = x.mean(0)
  lam, v = np.linalg.eigh(np.cov(x, rowvar=False))
  w = (v / np.sqrt(np.maximum(lam, 0.0) + eps)) @ v.T
  return tuple(float(round(a, 6)) for a in np.concatenate([w.reshape(-1), -w @ mean]))


def main(argv=None) -> tuple[float, ...]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", choices=("openmoji",), default="openmoji")
  p.add_argument("--every", type=int, default=20, help="Use every n-th training emoji.")
  p.add_argument("--size", type=int, default=64, help="Rasterise at this side.")
  args = p.parse_args(argv)
  from infd_jax.data import openmoji  # pylint: disable=g-import-not-at-top
  train, _ = openmoji.split_names(openmoji.list_names(openmoji.svg_dir()))
  out = whitening(openmoji.ground_truth(train[::args.every], args.size))
  print(out)
  return out


if __name__ == "__main__":
  main()
