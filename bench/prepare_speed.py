"""Dataset preparation throughput: images/s for 1 and for N worker processes.

  python -m bench.prepare_speed [--images=48] [--side=1024] [--workers=0]

Writes `--images` FFHQ-like PNGs (scikit-image photos LANCZOS-resized to
`--side`, with a little noise so no two files are alike) into a temporary folder,
then times `prepare --dataset=ffhq` for the `native` config (validate and copy)
and the `lanczos256` config (decode, resize, re-encode), each with 1 worker and
with `--workers` (0 = one per CPU).
"""

import argparse
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

from bench import data_pipeline
from infd_jax.data import prepare


def _write_images(root: pathlib.Path, count: int, side: int) -> None:
  rng = np.random.default_rng(0)
  photos = data_pipeline.demo_photos(side)
  for i in range(count):
    arr = np.asarray(photos[i % len(photos)]).astype(np.int16)
    arr = np.clip(arr + rng.integers(-3, 4, arr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(root / f"{i:05d}.png")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--images", type=int, default=48)
  p.add_argument("--side", type=int, default=1024)
  p.add_argument("--workers", type=int, default=0)
  args = p.parse_args()
  workers = args.workers or os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as tmp:
    src = pathlib.Path(tmp) / "images"
    src.mkdir()
    _write_images(src, args.images, args.side)
    print(f"{args.images} PNGs of {args.side}x{args.side}, {os.cpu_count()} CPUs:")
    for config in ("native", "lanczos256"):
      rates = {}
      for n in sorted({1, workers}):
        start = time.perf_counter()
        prepare.prepare("ffhq", str(pathlib.Path(tmp) / f"out{n}"), configs=[config],
                        source=str(src), workers=n)
        rates[n] = args.images / (time.perf_counter() - start)
      print(f"  {config:10s} " + "  ".join(f"{n} worker(s): {r:6.1f} img/s"
                                          for n, r in rates.items())
            + (f"  speed-up {rates[workers] / rates[1]:.2f}x" if workers > 1 else ""))


if __name__ == "__main__":
  main()
