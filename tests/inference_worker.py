"""One process of the inference multi-process test: samples PNGs, patch FID, then `Model`.

Usage: python -m tests.inference_worker TRAINED WORKDIR REAL_DIR [COORDINATOR NUM_PROCESSES ID]
Prints `RESULT {json}` with the patch-FID scores (and, with one process, the
scores recomputed from all features at once with np.cov as the reference), and
writes `WORKDIR/model_<process index>.npz`: `Model.render` of 1, 3 and 5
latents and `Model.reconstruct` of 3 and 5 images (fewer and more than the 4
devices), as every process gets them.
"""

import json
import os
import pathlib
import sys
import tempfile
import time

import jax


def main(argv: list[str]) -> None:
  trained, workdir, real_dir = argv[1:4]
  if len(argv) > 4:
    jax.distributed.initialize(coordinator_address=argv[4], num_processes=int(argv[5]),
                               process_id=int(argv[6]), cluster_detection_method="deactivate")
    from tests import processes  # pylint: disable=g-import-not-at-top
    processes.cache_compiles_of_every_process()
  jax.config.update("jax_compilation_cache_dir", os.environ.get(
      "INFD_TEST_JAX_CACHE", str(pathlib.Path(tempfile.gettempdir()) / "infd_jax_test_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import infd_jax  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top  (after distributed init)
  from infd_jax import jobs  # pylint: disable=g-import-not-at-top
  from infd_jax.evaluation import fid, pfid  # pylint: disable=g-import-not-at-top

  c = tiny.get_config()
  c.stage = "sample"
  c.ckpt.update(ae_checkpoint=trained, dm_checkpoint=trained)
  c.sample.update(num_samples=10, batch_size=8, sizes=(32,), out_dir=f"{workdir}/samples")
  jobs.run(c, workdir)
  fake_dir = f"{workdir}/samples/32"
  ext = pfid.make_feature_extractor(None, batch_size=2 * jax.local_device_count())
  scores = pfid.patch_fid_folders(real_dir, fake_dir, ext, seed=3, patch_sizes=(32, 16))
  result = {"scores": scores}
  if jax.process_count() == 1:
    # Reference: every crop's features at once, np.cov (float64, ddof=1) and np.mean.
    ref = {}
    for stream, folder in ((0, real_dir), (1, fake_dir)):
      files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
      images = [pfid._load_rgb(f) for f in files]  # pylint: disable=protected-access
      for p in (32, 16):
        crops = np.stack([pfid.random_crop(im, p, np.random.default_rng([3, stream * 4096 + p, i]))
                          for i, im in enumerate(images)])
        feats = np.concatenate([ext(crops[i:i + ext.batch_size])
                                for i in range(0, len(crops), ext.batch_size)])
        ref[(stream, p)] = (feats.mean(0), np.cov(feats, rowvar=False))
    result["reference"] = {f"pfd_vgg16_{p}_32": fid.frechet_distance(*ref[(0, p)], *ref[(1, p)])
                           for p in (32, 16)}
  started = time.perf_counter()
  model = infd_jax.load(trained)  # every device: 4 on one process or on two
  z = model.sample(5, seed=7)
  images = np.stack([np.asarray(Image.open(f"{fake_dir}/{i}.png")) for i in range(5)])
  np.savez(f"{workdir}/model_{jax.process_index()}.npz", latents=z,
           **{f"render_{n}": model.render(z[:n], 32) for n in (1, 3, 5)},
           **{f"reconstruct_{n}": model.reconstruct(images[:n], (32, 24)) for n in (3, 5)})
  result["model_seconds"] = round(time.perf_counter() - started, 1)
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main(sys.argv)
