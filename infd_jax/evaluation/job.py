"""The evaluation job (`--config.stage=eval`).

Computes, for what the config points at:
- patch FID (REFERENCE.md 8) between `eval.real_dir` and `eval.fake_dir` (or the
  generated `samples/<resolution>` of this workdir when fake_dir is empty):
  `pfid_<p>_<R>` with Inception weights, else `pfd_vgg16_<p>_<R>`; each process
  reads its share of both folders, the float64 statistics are merged across
  processes, and the real-set statistics are cached in `<workdir>/fid_stats/`
  (keyed by the file list and the protocol);
- autoencoder reconstruction PSNR/LPIPS at each of `eval.recon_resolutions` on the
  validation split: `Model` encodes the 256 input, quantizes (`sample.quantize`),
  decodes and renders the whole image at R (official tiling), compared with the
  ground truth resized to R; batched over all devices, each image scored once;
- scale consistency: the same latent rendered at s and k*s, the larger one
  box-downsampled, PSNR/LPIPS between them for k in `eval.scale_factors`.
Results go to TensorBoard (through CLU, once) and `<workdir>/eval.json`.
"""

import json
import logging

from etils import epath
import jax
import ml_collections
import numpy as np
from PIL import Image

from infd_jax import builders, inference
from infd_jax import model as model_lib
from infd_jax.data import image_io, prepare, sources
from infd_jax.evaluation import metrics as metrics_lib
from infd_jax.evaluation import pfid, scale_consistency, writers
from infd_jax.models.lpips import load_lpips_params


def _validation_images(config: ml_collections.ConfigDict, num: int) -> list[Image.Image]:
  """Up to `num` whole validation images as RGB squares (the split `data.eval_split`)."""
  d = builders.pipeline_config(config.data, "ae")
  split = config.data.eval_split or d["split"]
  records = sources.open_split(d["data_dir"], d["name"],
                               prepare.configs_needed(d["name"], d["variant"])[0], split)
  return [image_io.decode_rgb(records[i]["image"]) for i in range(min(num, len(records)))]


def _resized(images: list[Image.Image], side: int) -> np.ndarray:
  """uint8 [n, side, side, 3] LANCZOS resizes (as the official data and ground truth)."""
  out = np.zeros((len(images), side, side, 3), np.uint8)
  for i, img in enumerate(images):
    out[i] = np.asarray(img.resize((side, side), Image.LANCZOS))
  return out


def reconstruction_metrics(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                           mesh: jax.sharding.Mesh) -> dict[str, float]:
  """PSNR/LPIPS of AE reconstructions rendered at each resolution, and scale consistency.

  Through `Model` (what `Model.reconstruct` gives: quantized if `sample.quantize`,
  clipped as saved images), in batches of `eval.batch_size` images over all
  devices; each process scores the images it owns and the per-image values are
  gathered, so every image counts once whatever the number of hosts.
  """
  ec = config.eval
  model = inference.load_model(config, workdir, mesh, need_dm=False)
  lp, lp_params = builders.lpips(config), load_lpips_params()
  lpips_batch = jax.jit(lambda x, y: lp.apply(lp_params, x, y, train=False))
  # A process may own none of a batch's images; it still takes part in every render.
  lpips_fn = lambda x, y: lpips_batch(x, y) if len(x) else np.zeros(0, np.float32)
  images = _validation_images(config, ec.max_images or 16)
  if not images:
    raise builders.UserError("eval: the validation split is empty")
  values: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(images), ec.batch_size):
    batch = images[start:start + ec.batch_size]
    n = len(batch)
    phi = model.decode_global(model.encode(_resized(batch, config.data.inp_res)))
    rows = model.owned_rows(phi, n)
    render = lambda size: np.clip(model.render_owned(phi, n, (size, size))[1], -1.0, 1.0)
    scores = {}
    for res in ec.recon_resolutions:
      pred = render(res)
      gt = _resized([batch[r] for r in rows], res).astype(np.float32) / 127.5 - 1
      scores[f"recon_psnr_{res}"] = metrics_lib.psnr(pred, gt)
      scores[f"recon_lpips_{res}"] = lpips_fn(pred, gt)
    scores |= scale_consistency.per_image(render, ec.scale_consistency_base, ec.scale_factors,
                                          lpips_fn=lpips_fn)
    for name, owned in scores.items():  # the same names, in the same order, everywhere
      values.setdefault(name, []).append(
          model_lib.gather_owned(rows, np.asarray(owned, np.float32), n))
  return {k: float(np.mean(np.concatenate(v))) for k, v in values.items()}


def run(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
        mesh: jax.sharding.Mesh, writer: writers.MetricWriter) -> dict[str, float]:
  """Runs every evaluation the config enables; returns {metric: value}.

  The workdir and folders may be remote (`gs://`): they are read and written
  through etils.epath.
  """
  ec = config.eval
  workdir = epath.Path(workdir)
  results: dict[str, float] = {}
  if ec.real_dir:
    fake_dir = ec.fake_dir or str(workdir / "samples" / str(ec.resolution))
    if not epath.Path(fake_dir).is_dir():
      raise builders.UserError(f"eval: no generated images in {fake_dir}; run --config.stage="
                               "sample first or set --config.eval.fake_dir")
    if not epath.Path(ec.real_dir).is_dir():
      raise builders.UserError(f"eval: eval.real_dir={ec.real_dir} is not a folder")
    # A whole number of rows per local device.
    batch = -(-ec.batch_size // jax.local_device_count()) * jax.local_device_count()
    extractor = pfid.make_feature_extractor(ec.inception_weights or None, batch_size=batch)
    # Each process reads its share; the real-set statistics are cached in the workdir.
    results |= pfid.patch_fid_folders(ec.real_dir, fake_dir, extractor, seed=config.seed,
                                      patch_sizes=tuple(ec.patch_sizes) or None,
                                      cache_dir=workdir / "fid_stats")
  if config.data.data_dir:
    results |= reconstruction_metrics(config, workdir, mesh)
  if not results:
    raise builders.UserError("eval: nothing to evaluate; set eval.real_dir and/or data.data_dir")
  writer.write_scalars(0, {f"eval/{k}": v for k, v in results.items()})
  if jax.process_index() == 0:
    (workdir / "eval.json").write_text(json.dumps(results, indent=2))
  for k, v in sorted(results.items()):
    logging.info("eval %s = %.4f", k, v)
    print(f"{k:>28s} {v:10.4f}")
  return results
