"""Patch throughput per CPU core: window resampling vs resize-then-crop.

  python -m bench.data_pipeline [--seconds=3] [--patch=256] [--image=1024]

Times the stage-1 ground-truth patch (P=256 from a 1024x1024 image at a
REFERENCE.md 5.4 random r in [256, 1024]) on one core, for both paths, then the
whole per-example transform (decode + inp + patch + coord/cell) with each path.
Images are photos from scikit-image, LANCZOS-resized to the image side.
"""

import argparse
import io
import os
import time

import numpy as np
from PIL import Image

from infd_jax.data import sources
from infd_jax.data import transforms


def demo_photos(side: int) -> list[Image.Image]:
  """Four scikit-image photos, RGB, LANCZOS-resized to side x side."""
  root = sources.demo_source_dir()
  out = []
  for name in sources.DEMO_FILES[:4]:
    img = Image.open(os.path.join(root, name)).convert("RGB")
    out.append(img.resize((side, side), Image.Resampling.LANCZOS))
  return out


def _rate(fn, seconds: float) -> float:
  """Calls per second of fn(i), measured over about `seconds`."""
  fn(0)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    fn(n)
    n += 1
  return n / (time.perf_counter() - start)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--seconds", type=float, default=3.0)
  p.add_argument("--patch", type=int, default=256)
  p.add_argument("--image", type=int, default=1024)
  args = p.parse_args()
  if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
  imgs = demo_photos(args.image)
  rng = np.random.default_rng(0)
  draws = []
  for _ in range(4096):
    r = int(rng.integers(max(256, args.patch), args.image, endpoint=True))
    ii, jj = rng.integers(0, r - args.patch, size=2, endpoint=True)
    draws.append((r, int(ii), int(jj)))

  def patch_fn(crop):
    def fn(i):
      r, ii, jj = draws[i % len(draws)]
      return np.asarray(crop(imgs[i % len(imgs)], r, ii, jj, args.patch))
    return fn

  rates = {name: _rate(patch_fn(crop), args.seconds) for name, crop in
           (("naive", transforms.resize_then_crop), ("fast", transforms.fast_patch))}
  print(f"gt patch only, P={args.patch} from {args.image}x{args.image}, 1 core:")
  for name, rate in rates.items():
    print(f"  {name:5s} {rate:8.1f} patches/s")
  print(f"  speed-up {rates['fast'] / rates['naive']:.2f}x")

  records = []
  for img in imgs:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    records.append({"image": buf.getvalue(), "name": "bench"})
  print("whole example (PNG decode + inp + gt + coord/cell), 1 core:")
  full = {}
  for fast in (False, True):
    t = transforms.AeTransform(patch=args.patch, gt_res_max=args.image, fast=fast)
    ex_rng = np.random.default_rng(1)
    full[fast] = _rate(lambda i, t=t: t(records[i % len(records)], ex_rng), args.seconds)
    print(f"  {'fast' if fast else 'naive':5s} {full[fast]:8.1f} examples/s")
  print(f"  speed-up {full[True] / full[False]:.2f}x")


if __name__ == "__main__":
  main()
