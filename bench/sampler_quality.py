"""Quality versus steps of the latent samplers, against DDIM-200 (eta 0) from the same noise.

  python -m bench.sampler_quality --workdir=workdir/demo \
      [--num=64] [--steps=5,10,15,20,25,50] [--samplers=ddim,dpmpp_2m,unipc] \
      [--spacings=uniform] [--res=128] [--out=workdir/bench/sampler_quality]

Loads a trained workdir (read-only) as a `Model`, draws `--num` initial noises
and samples them with every (sampler, spacing, steps) of that model
(`Model.with_settings`; the model's own settings otherwise, the x0 bound
included); DDIM always with eta 0 (the probability-flow ODE that the other
solvers solve). For each setting:

- latent distance: per latent, the RMS over its elements of z - z_ref, with
  z_ref the DDIM-200 latent from the same noise; mean and standard deviation
  over the latents, and the mean relative to the RMS of z_ref; its floor is
  DDIM-200's own distance to DDIM-`--floor_steps` (its discretisation error);
- pFD: VGG16 Frechet distance (infd_jax.evaluation.pfid, not FID) of the
  images rendered at `--res` to the DDIM-200 images from the same noise, and
  (mean) to `--floor_sets` DDIM-200 sets from independent noise; the noise floor
  is the latter for DDIM-200 itself (mean and sd over the sets). A setting
  "matches" DDIM-200 when its independent pFD is within the floor + 2 sd;
- time per image of the jitted latent sampler (median of `--repeats` calls
  after the first; decode and render not included).

Writes `<out>/sampler_quality.json` and `<out>/sampler_quality.png` (drawn
with PIL; no matplotlib needed) and prints a markdown table.
"""

import argparse
import functools
import json
import pathlib
import statistics
import time

import jax
import numpy as np
from PIL import Image, ImageDraw

from infd_jax import builders, inference
from infd_jax.model import Model
from infd_jax.evaluation import fid, pfid
from infd_jax.rendering import pixels

COLOURS = {"ddim": (31, 119, 180), "dpmpp_2m": (214, 39, 40), "unipc": (44, 160, 44)}


class Bench:
  """The trained model with each sampler setting (`Model.with_settings`), and its images."""

  def __init__(self, workdir: pathlib.Path, num: int, res: int):
    self.num, self.res = num, res
    self.model = inference.load(workdir)  # the saved architecture; decode + tiled render
    self.shape = (num, *builders.latent_shape(self.model.config))
    self.extractor = pfid.vgg16_extractor(batch_size=min(num, 64))

  @functools.lru_cache(maxsize=None)
  def sampler(self, name: str, steps: int, spacing: str) -> Model:
    """The model sampling with `name` at `steps` calls, DDIM with eta 0 (the ODE)."""
    return self.model.with_settings(sample=dict(sampler=name, spacing=spacing),
                                    diffusion=dict(sample_steps=steps, eta=0.0))

  def latents(self, name: str, steps: int, spacing: str, seed: int) -> np.ndarray:
    return np.asarray(self.sampler(name, steps, spacing).sample(self.num, seed), np.float64)

  def time_per_image(self, name: str, steps: int, spacing: str, seed: int,
                     repeats: int) -> float:
    model = self.sampler(name, steps, spacing)  # compiled and run once by `latents` before
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(model.sample_global(np.arange(self.num), seed))
      times.append(time.perf_counter() - start)
    return statistics.median(times) / self.num

  def features(self, z: np.ndarray) -> fid.FeatureStats:
    images = pixels.to_uint8(self.model.render(z.astype(np.float32), (self.res, self.res)))
    # p = R: the whole image, so the crops are deterministic.
    return pfid.patch_stats(images, [self.res], self.extractor,
                            np.random.default_rng(0))[self.res]


def _rms(x: np.ndarray) -> np.ndarray:
  return np.sqrt(np.mean(np.square(x), axis=tuple(range(1, x.ndim))))


def plot(results: dict, path: pathlib.Path) -> None:
  """Two log-log panels (latent distance, pFD vs steps) drawn with PIL."""
  width, height, margin = 1000, 440, 60
  img = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(img)
  rows = results["rows"]
  steps = sorted({r["steps"] for r in rows})
  ref = results["reference_steps"]
  panels = [(f"latent RMS distance to DDIM-{ref}", "latent_dist", results["latent_floor"]),
            (f"pFD (VGG16) to independent DDIM-{ref} sets", "pfd_indep", results["pfd_floor"])]
  for p, (title, key, floor) in enumerate(panels):
    x0, x1 = margin + p * width // 2, (p + 1) * width // 2 - 20
    y0, y1 = 40, height - margin
    values = [r[key] for r in rows if r[key] > 0] + ([floor] if floor and floor > 0 else [])
    lo, hi = np.log10(min(values)) - 0.1, np.log10(max(values)) + 0.1
    ls, hs = np.log10(steps[0]), np.log10(steps[-1])
    def xy(s, v):
      return (x0 + (np.log10(s) - ls) / (hs - ls) * (x1 - x0),
              y1 - (np.log10(max(v, 10 ** lo)) - lo) / (hi - lo) * (y1 - y0))
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((x0, 15), title + " (log-log)", fill="black")
    for s in steps:
      draw.text((xy(s, 1)[0] - 6, y1 + 6), str(s), fill="black")
    for v in sorted({min(values), max(values)} | {10.0 ** e for e in range(
        int(np.ceil(lo)), int(np.floor(hi)) + 1)}):
      draw.text((x0 - 50, xy(steps[0], v)[1] - 6), f"{v:.3g}", fill="black")
    if floor and floor > 0:
      ya = xy(steps[0], floor)[1]
      for xa in range(int(x0), int(x1), 12):
        draw.line([(xa, ya), (xa + 6, ya)], fill=(120, 120, 120))
      draw.text((x1 - 110, ya - 14), "noise floor", fill=(120, 120, 120))
    series = sorted({(r["sampler"], r["spacing"]) for r in rows})
    for i, (name, spacing) in enumerate(series):
      pts = [xy(r["steps"], r[key]) for r in rows
             if (r["sampler"], r["spacing"]) == (name, spacing) and r[key] > 0]
      colour = COLOURS.get(name, (0, 0, 0))
      draw.line(pts, fill=colour, width=3 if spacing == "uniform" else 1)
      for x, y in pts:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
      draw.text((x1 - 150, y0 + 8 + 14 * i), f"{name} {spacing}", fill=colour)
  draw.text((margin, height - 25), "steps (model calls per sample)", fill="black")
  img.save(path)


def table(results: dict) -> str:
  lines = ["| sampler | spacing | steps | latent dist (mean +- sd) | rel. | pFD same noise | "
           "pFD independent | within noise | ms/image |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | :---: | ---: |"]
  for r in results["rows"]:
    lines.append(f"| {r['sampler']} | {r['spacing']} | {r['steps']} | "
                 f"{r['latent_dist']:.4f} +- {r['latent_dist_sd']:.4f} | "
                 f"{r['latent_dist_rel']:.3f} | {r['pfd']:.3f} | {r['pfd_indep']:.3f} | "
                 f"{'yes' if r['matches'] else 'no'} | {1e3 * r['sec_per_image']:.2f} |")
  ref = results["reference_steps"]
  lines.append(f"| ddim | uniform | {ref} | 0 (reference) | 0 | 0 | "
               f"{results['pfd_floor']:.3f} +- {results['pfd_floor_sd']:.3f} (floor) | | "
               f"{1e3 * results['reference_sec_per_image']:.2f} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a trained workdir (read only)")
  p.add_argument("--num", type=int, default=64, help="latents per setting")
  p.add_argument("--steps", default="5,10,15,20,25,50")
  p.add_argument("--samplers", default="ddim,dpmpp_2m,unipc")
  p.add_argument("--spacings", default="uniform")
  p.add_argument("--reference_steps", type=int, default=200)
  p.add_argument("--floor_steps", type=int, default=1000,
                 help="DDIM steps of the latent floor (distance of DDIM-200 to it); 0: skip")
  p.add_argument("--floor_sets", type=int, default=3,
                 help="independent DDIM-200 sets for the pFD noise floor (>= 2)")
  p.add_argument("--res", type=int, default=128, help="render size for the pFD")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="workdir/bench/sampler_quality")
  args = p.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  def log(msg):
    print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

  log(f"loading {args.workdir} on {jax.device_count()} {jax.default_backend()} device(s)")
  bench = Bench(pathlib.Path(args.workdir), args.num, args.res)
  seed = args.seed  # latent i starts from the noise of (seed, i) under every sampler
  ref_steps = args.reference_steps
  z_ref = bench.latents("ddim", ref_steps, "uniform", seed)
  ref_stats = bench.features(z_ref)
  ref_scale = float(np.sqrt(np.mean(z_ref ** 2)))
  ref_time = bench.time_per_image("ddim", ref_steps, "uniform", seed, args.repeats)
  log(f"DDIM-{ref_steps} reference: {args.num} latents {bench.shape[1:]}, RMS {ref_scale:.4f}, "
      f"{1e3 * ref_time:.2f} ms/image")
  # Noise floors: DDIM-200 sets from independent noise for the pFD; for the latent
  # distance, how far DDIM-200 itself is from DDIM-1000 (its own discretisation error).
  others = [bench.features(bench.latents("ddim", ref_steps, "uniform", seed + 1 + j))
            for j in range(args.floor_sets)]
  floors = [fid.fid_from_stats(ref_stats, other) for other in others]
  pfd_floor, pfd_floor_sd = float(np.mean(floors)), float(np.std(floors, ddof=1))
  latent_floor = None
  if args.floor_steps:
    z_fine = bench.latents("ddim", args.floor_steps, "uniform", seed)
    latent_floor = float(np.mean(_rms(z_fine - z_ref)))
  log(f"noise floors: pFD {pfd_floor:.4f} +- {pfd_floor_sd:.4f} (DDIM-{ref_steps} vs "
      f"{args.floor_sets} independent DDIM-{ref_steps} sets), latent "
      f"{latent_floor} (DDIM-{ref_steps} vs DDIM-{args.floor_steps})")

  rows = []
  for spacing in args.spacings.split(","):
    for name in args.samplers.split(","):
      for steps in (int(s) for s in args.steps.split(",")):
        z = bench.latents(name, steps, spacing, seed)
        dist, stats = _rms(z - z_ref), bench.features(z)
        pfd_indep = float(np.mean([fid.fid_from_stats(stats, other) for other in others]))
        row = dict(sampler=name, spacing=spacing, steps=steps,
                   latent_dist=float(dist.mean()), latent_dist_sd=float(dist.std(ddof=1)),
                   latent_dist_rel=float(dist.mean() / ref_scale),
                   pfd=fid.fid_from_stats(ref_stats, stats), pfd_indep=pfd_indep,
                   matches=bool(pfd_indep <= pfd_floor + 2 * pfd_floor_sd),
                   sec_per_image=bench.time_per_image(name, steps, spacing, seed, args.repeats))
        rows.append(row)
        log(f"{name} {spacing} {steps}: latent {row['latent_dist']:.4f}, pFD {row['pfd']:.3f} "
            f"(independent {pfd_indep:.3f}), "
            f"{1e3 * row['sec_per_image']:.2f} ms/image")
  results = dict(workdir=str(args.workdir), num=args.num,
                 latent_shape=list(bench.shape[1:]), res=args.res, reference_steps=ref_steps,
                 reference_rms=ref_scale, reference_sec_per_image=ref_time,
                 pfd_floor=pfd_floor, pfd_floor_sd=pfd_floor_sd, latent_floor=latent_floor,
                 device=f"{jax.device_count()} x {jax.devices()[0].device_kind}", rows=rows)
  (out / "sampler_quality.json").write_text(json.dumps(results, indent=1))
  plot(results, out / "sampler_quality.png")
  print(table(results))
  log(f"wrote {out / 'sampler_quality.json'} and {out / 'sampler_quality.png'}")


if __name__ == "__main__":
  main()
