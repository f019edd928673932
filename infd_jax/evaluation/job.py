"""The evaluation job (`--config.stage=eval`).

Computes, for what the config points at:
- patch FID (REFERENCE.md 8) between `eval.real_dir` and `eval.fake_dir` (or the
  generated `samples/<resolution>` of this workdir when fake_dir is empty):
  `pfid_<p>_<R>` with Inception weights, else `pfd_vgg16_<p>_<R>`; each process
  reads its share of both folders, the float64 statistics are merged across
  processes, and the real-set statistics are cached in `<workdir>/fid_stats/`
  (keyed by the file list and the protocol);
- autoencoder reconstruction PSNR/LPIPS at each of `eval.recon_resolutions` on the
  validation split: encode the 256 input, render the whole image at R (official
  tiling) and compare with the ground truth resized to R;
- scale consistency: the same latent rendered at s and k*s, the larger one
  box-downsampled, PSNR/LPIPS between them for k in `eval.scale_factors`.
Results go to TensorBoard (through CLU, once) and `<workdir>/eval.json`.
"""

import json
import logging

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from infd_jax import builders, checks, inference, trained
from infd_jax.data import image_io, pipeline, prepare, sources
from infd_jax.evaluation import metrics as metrics_lib
from infd_jax.evaluation import pfid, scale_consistency, writers
from infd_jax.models.lpips import load_lpips_params

log = logging.getLogger(__name__)


def _validation_images(config: ml_collections.ConfigDict, num: int) -> list[np.ndarray]:
  """Up to `num` whole validation images as uint8 squares (the split `data.eval_split`)."""
  d = pipeline.stage_config(config.data, "ae")
  split = config.data.eval_split or d["split"]
  records = sources.open_split(d["data_dir"], d["name"],
                               prepare.configs_needed(d["name"], d["variant"])[0], split)
  return [np.asarray(image_io.decode_rgb(records[i]["image"]))
          for i in range(min(num, len(records)))]


def reconstruction_metrics(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                           mesh: jax.sharding.Mesh) -> dict[str, float]:
  """PSNR/LPIPS of AE reconstructions rendered at each resolution, and scale consistency."""
  ec = config.eval
  ae = builders.autoencoder(config)
  params = trained.load_ae_params(config, workdir, mesh)
  lp, lp_params = builders.lpips(config), load_lpips_params()
  renderer = inference.renderer(config)
  encode_decode = jax.jit(lambda p, x: ae.apply({"params": p}, ae.apply(
      {"params": p}, ae.apply({"params": p}, x, method="encode"), method="quantize").z_q,
      method="decode"))
  lpips_fn = jax.jit(lambda x, y: lp.apply(lp_params, x, y, train=False))
  inp_res = config.data.inp_res
  images = _validation_images(config, ec.max_images or 16)
  if not images:
    raise checks.UserError("eval: the validation split is empty")
  sums: dict[str, list[float]] = {}
  for image in images:
    pil = Image.fromarray(image)
    inp = np.asarray(pil.resize((inp_res, inp_res), Image.LANCZOS), np.float32)[None] / 127.5 - 1
    phi = encode_decode(params, jnp.asarray(inp))
    for res in ec.recon_resolutions:
      gt = np.asarray(pil.resize((res, res), Image.LANCZOS), np.float32)[None] / 127.5 - 1
      pred = renderer.render_image({"params": params}, phi, (res, res))
      sums.setdefault(f"recon_psnr_{res}", []).append(float(metrics_lib.psnr(pred, gt)[0]))
      sums.setdefault(f"recon_lpips_{res}", []).append(float(lpips_fn(pred, gt)[0]))
    render = lambda size: jnp.asarray(renderer.render_image({"params": params}, phi, (size, size)))
    for k, v in scale_consistency.scale_consistency(
        render, ec.scale_consistency_base, ec.scale_factors, lpips_fn=lpips_fn).items():
      sums.setdefault(k, []).append(v)
  return {k: float(np.mean(v)) for k, v in sums.items()}


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
    # A whole number of rows per local device.
    batch = -(-ec.batch_size // jax.local_device_count()) * jax.local_device_count()
    extractor = pfid.make_feature_extractor(ec.inception_weights or None, batch_size=batch)
    # Each process reads its share; the real-set statistics are cached in the workdir.
    results |= pfid.patch_fid_folders(ec.real_dir, fake_dir, extractor, seed=config.seed,
                                      patch_sizes=tuple(ec.patch_sizes) or None,
                                      cache_dir=workdir / "fid_stats")
  if config.data.data_dir:
    results |= reconstruction_metrics(config, workdir, mesh)
  writer.write_scalars(0, {f"eval/{k}": v for k, v in results.items()})
  if jax.process_index() == 0:
    (workdir / "eval.json").write_text(json.dumps(results, indent=2))
  for k, v in sorted(results.items()):
    log.info("eval %s = %.4f", k, v)
    print(f"{k:>28s} {v:10.4f}")
  return results
