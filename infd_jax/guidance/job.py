"""The `condition` stage: guided sampling from the conditions of `config.condition`.

`condition.regions` is a list (a tuple of dicts in a config file, or a JSON list
on the command line) of:
  kind   "low_res" | "known" | "text"
  size   virtual image the box lives in: N or "HxW"
  box    (top, left, h, w) in its pixels; default the whole image
  image  low_res: the observation (any smaller size: the factor is box / image);
         known: the box's pixels (the box's size); alpha (or `mask`) marks known pixels
  mask   optional grayscale file for known (white = known)
  prompt text
  scale  guidance scale (default 1)
Every sample is rendered at `condition.sizes` with the sampling tiling and written
to `<out_dir or workdir/condition>/<size>/<id>.png`.
"""

import dataclasses
import functools
import json
import logging
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from infd_jax import builders, generate, inference, sharding
from infd_jax.guidance import conditions as cond_lib
from infd_jax.guidance import sampler
from infd_jax.rendering import tiling

UserError = builders.UserError
_KEYS = {"kind", "size", "box", "image", "mask", "prompt", "scale"}


def _read_image(path: str, what: str) -> Image.Image:
  p = epath.Path(path)
  if not p.exists():
    raise UserError(f"config.condition.regions: {what} {path} not found")
  with p.open("rb") as f:
    img = Image.open(f)
    img.load()
  return img


def _to_unit(img: Image.Image) -> np.ndarray:
  return np.asarray(img.convert("RGB"), np.float32) / 127.5 - 1.0


def parse_regions(regions: Any) -> list[dict]:
  """The region list of the config (tuple of dicts or a JSON string), keys checked."""
  if isinstance(regions, str):
    try:
      regions = json.loads(regions) if regions.strip() else []
    except json.JSONDecodeError as e:
      raise UserError(f"config.condition.regions is not a JSON list: {e}") from None
  regions = [dict(r) for r in regions]
  if not regions:
    raise UserError("config.condition.regions is empty: give at least one region")
  for i, r in enumerate(regions):
    unknown = set(r) - _KEYS
    if unknown or "kind" not in r or "size" not in r:
      raise UserError(f"config.condition.regions[{i}]: needs kind and size; unknown keys "
                      f"{sorted(unknown)} (known: {sorted(_KEYS)})")
  return regions


def build(regions: list[dict], text_embed=None
          ) -> tuple[tuple[cond_lib.Condition, ...], list[dict[str, np.ndarray]]]:
  """Conditions and their targets from parsed regions; text_embed: prompt -> [D]."""
  conds, targets = [], []
  for i, r in enumerate(regions):
    where = f"config.condition.regions[{i}]"
    size = generate.parse_size(r["size"])
    box = tuple(int(v) for v in r.get("box", (0, 0, *size)))
    try:
      cond = cond_lib.Condition(r["kind"], size, box, float(r.get("scale", 1.0)))
    except ValueError as e:
      raise UserError(f"{where}: {e}") from None
    if cond.kind == "text":
      if not r.get("prompt"):
        raise UserError(f"{where}: a text region needs a prompt")
      targets.append({"embedding": np.asarray(text_embed(r["prompt"]), np.float32)})
    else:
      if not r.get("image"):
        raise UserError(f"{where}: a {cond.kind} region needs an image")
      img = _read_image(r["image"], "image")
      if cond.kind == "low_res":
        if img.height > box[2] or img.width > box[3]:
          raise UserError(f"{where}: observation {img.width}x{img.height} is larger than the "
                          f"box {box[3]}x{box[2]}")
        targets.append({"image": _to_unit(img)})
      else:
        if (img.height, img.width) != box[2:]:
          raise UserError(f"{where}: known image {r['image']} is {img.height}x{img.width}, the "
                          f"box is {box[2]}x{box[3]} (HxW)")
        if r.get("mask"):
          mask = np.asarray(_read_image(r["mask"], "mask").convert("L").resize(img.size))
        elif "A" in img.getbands():
          mask = np.asarray(img.getchannel("A"))
        else:
          mask = np.full(box[2:], 255, np.uint8)
        targets.append({"image": _to_unit(img),
                        "mask": (mask >= 128).astype(np.float32)[..., None]})
    conds.append(cond)
  return tuple(conds), targets


def _clip_text_embedder(config: ml_collections.ConfigDict):
  """(CLIP module, params, prompt -> embedding) from `condition.clip_checkpoint`/`clip_vocab`."""
  from infd_jax.clip import convert, model, tokenizer  # pylint: disable=g-import-not-at-top
  cc = config.condition
  if not cc.clip_checkpoint or not cc.clip_vocab:
    raise UserError("text regions need config.condition.clip_checkpoint (a folder written by "
                    "python -m infd_jax.clip.convert) and config.condition.clip_vocab "
                    "(bpe_simple_vocab_16e6.txt.gz)")
  try:
    clip_cfg, params = convert.load(cc.clip_checkpoint)
    tok = tokenizer.Tokenizer(cc.clip_vocab, clip_cfg.context_length)
  except FileNotFoundError as e:
    raise UserError(f"config.condition: {e}") from None
  clip = model.CLIP(**dataclasses.asdict(clip_cfg))
  encode = jax.jit(lambda p, t: clip.apply({"params": p}, t, method="encode_text"))
  return clip, params, lambda prompt: encode(params, tok(prompt))[0]


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        mesh: jax.sharding.Mesh) -> pathlib.Path:
  """Writes `condition.num_samples` guided samples at every size of `condition.sizes`."""
  cc, sc = config.condition, config.sample
  workdir = pathlib.Path(workdir)
  out_dir = pathlib.Path(cc.out_dir or workdir / "condition")
  regions = parse_regions(cc.regions)
  clip = clip_params = embed = None
  if any(r["kind"] == "text" for r in regions):
    clip, clip_params, embed = _clip_text_embedder(config)
  conds, targets = build(regions, embed)
  sizes = [generate.parse_size(s) for s in cc.sizes]
  ae_params = inference.load_ae_params(config, workdir, mesh)
  dm_params = inference.load_dm_params(config, workdir, mesh)
  ae, unet = builders.autoencoder(config), builders.unet(config)
  objective = cond_lib.Objective(ae, conds, clip=clip, tile=sc.tile, pad=sc.pad,
                                 quantize=sc.quantize)
  steps = config.diffusion.sample_steps
  guide = sampler.guided_steps(steps, cc.guide_start, cc.guide_stop, cc.guide_every)
  shape = (cc.batch_size, *builders.latent_shape(config))

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def sample(dm_params, ae_params, clip_params, targets, key):
    z, _ = sampler.guided_ddim_sample(
        lambda p, x, t: unet.apply({"params": p}, x, t), dm_params, key, shape,
        builders.diffusion_schedule(config),
        lambda z0: objective.weighted(ae_params, clip_params, z0, targets),
        num_steps=steps, eta=config.diffusion.eta, guide=guide)
    losses = objective.losses(ae_params, clip_params, z, targets)
    if sc.quantize:
      z = ae.apply({"params": ae_params}, z, method="quantize").z_q
    return ae.apply({"params": ae_params}, z, method="decode"), losses

  renderer = tiling.TiledRenderer(tiling.module_render_fn(ae, "render"), sc.tile, sc.pad,
                                  sc.tiles_per_call)
  num_batches = -(-cc.num_samples // cc.batch_size)
  progress = tqdm(total=num_batches, desc="guided batches", unit="batch",
                  disable=jax.process_index() > 0)
  started = time.perf_counter()
  for b in range(num_batches):
    phi, losses = sample(dm_params, ae_params, clip_params, targets,
                         jax.random.fold_in(jax.random.PRNGKey(cc.seed), b))
    ids = range(b * cc.batch_size, min((b + 1) * cc.batch_size, cc.num_samples))
    for c, loss in zip(conds, np.asarray(losses)):
      logging.info("batch %d: %s loss on %s of %s: %s", b, c.kind, c.box, c.size,
                   np.round(loss[:len(ids)], 4).tolist())
    for h, w in sizes:
      images = generate.to_uint8(renderer.render_image({"params": ae_params}, phi, (h, w)))
      folder = out_dir / (str(h) if h == w else f"{h}x{w}")
      if jax.process_index() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in zip(ids, images):
          Image.fromarray(image).save(folder / f"{i}.png")
    progress.update(1)
  progress.close()
  logging.info("wrote %d guided samples at %s in %.1fs to %s", cc.num_samples, sizes,
               time.perf_counter() - started, out_dir)
  return out_dir
