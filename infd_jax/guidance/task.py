"""A guidance task from a region list, and the guided sampler of one latent.

Shared by the `condition` job and `model.Model.condition`. A region list is
a list of dicts (a JSON list as a string is accepted too):
  kind   "low_res" | "known" | "text"
  size   virtual image the box lives in: N or "HxW"
  box    (top, left, h, w) in its pixels; default the whole image
  image  low_res: the observation (any smaller size: the factor is box / image);
         known: the box's pixels (the box's size); alpha (or `mask`) marks known pixels.
         A file, or (Python API) an array [h, w, 3], uint8 or float in [-1, 1]
  mask   optional grayscale file for known (white = known)
  prompt text
  scale  guidance scale (default 1)
The guided steps and the CLIP files come from the `condition` config section
(`SETTINGS`), the tiling and the step spacing from `sample`, the DDIM steps and eta
from `diffusion`. Also from `condition`: `init_image` and `start` (begin part-way,
from the encoder's latent of an image, e.g. the low-resolution observation) and
`fit_steps`, `fit_lr`, `fit_zeta` (data consistency instead of DPS), both documented
in `guidance.sampler`.
"""

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from infd_jax import builders, checks
from infd_jax.guidance import conditions as cond_lib
from infd_jax.guidance import sampler

PyTree = Any
# `condition` settings that change how a task is built and guided (not what is written).
SETTINGS = ("guide_start", "guide_stop", "guide_every", "clip_checkpoint", "clip_vocab",
            "init_image", "start", "fit_steps", "fit_lr", "fit_zeta")


def _read_image(path: str, what: str, where: str) -> Image.Image:
  p = epath.Path(path)
  if not p.exists():
    raise checks.UserError(f"{where}: {what} {path} not found")
  with p.open("rb") as f:
    img = Image.open(f)
    img.load()
  return img


def _load_image(value: Any, where: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(RGB [h, w, 3] float32 in [-1, 1], alpha [h, w] uint8 or None) of a region's image: a
  file, or an array [h, w, 3] (uint8, or float in [-1, 1]) from the Python API."""
  if isinstance(value, (str, os.PathLike)):
    img = _read_image(value, "image", where)
    alpha = np.asarray(img.getchannel("A")) if "A" in img.getbands() else None
    return np.asarray(img.convert("RGB"), np.float32) / 127.5 - 1.0, alpha
  x = np.asarray(value)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise checks.UserError(f"{where}: an image array must be [H, W, 3], not {list(x.shape)}")
  return (x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8
          else x.astype(np.float32)), None


def build(regions: list[dict], text_embed: Callable[[str], np.ndarray] | None = None,
          name: str = "config.condition.regions"
          ) -> tuple[tuple[cond_lib.Condition, ...], list[dict[str, np.ndarray]]]:
  """Conditions and their targets from regions checked by `checks.parse_regions`;
  text_embed: prompt -> [D]. The images are read here (their sizes must fit the boxes)."""
  conds, targets = [], []
  for i, r in enumerate(regions):
    where = f"{name}[{i}]"
    size = checks.parse_size(r["size"], f"{where}.size")
    box = tuple(r.get("box", (0, 0, *size)))
    cond = cond_lib.Condition(r["kind"], size, box, float(r.get("scale", 1.0)))
    if cond.kind == "text":
      targets.append({"embedding": np.asarray(text_embed(r["prompt"]), np.float32)})
    else:
      rgb, alpha = _load_image(r["image"], where)
      h, w = rgb.shape[:2]
      if cond.kind == "low_res":
        if h > box[2] or w > box[3]:
          raise checks.UserError(f"{where}: observation {w}x{h} is larger than the box "
                                 f"{box[3]}x{box[2]}")
        targets.append({"image": rgb})
      else:
        if (h, w) != box[2:]:
          name_of = "array" if isinstance(r["image"], np.ndarray) else r["image"]
          raise checks.UserError(f"{where}: known image {name_of} is {h}x{w}, the box is "
                                 f"{box[2]}x{box[3]} (HxW)")
        if r.get("mask"):
          mask = np.asarray(_read_image(r["mask"], "mask", where).convert("L").resize((w, h)))
        elif alpha is not None:
          mask = alpha
        else:
          mask = np.full(box[2:], 255, np.uint8)
        targets.append({"image": rgb, "mask": (mask >= 128).astype(np.float32)[..., None]})
    conds.append(cond)
  return tuple(conds), targets


@functools.lru_cache(maxsize=1)
def clip_text_embedder(checkpoint: str, vocab: str):
  """(CLIP module, params, prompt -> embedding) of a converted CLIP and its BPE vocabulary.

  Cached: repeated tasks with the same files read them once.
  """
  from infd_jax.clip import convert, model, tokenizer  # pylint: disable=g-import-not-at-top
  try:
    clip_cfg, params = convert.load(checkpoint)
    tok = tokenizer.Tokenizer(vocab, clip_cfg.context_length)
  except FileNotFoundError as e:
    raise checks.UserError(f"config.condition: {e}") from None
  clip = model.CLIP(**dataclasses.asdict(clip_cfg))
  encode = jax.jit(lambda p, t: clip.apply({"params": p}, t, method="encode_text"))
  return clip, params, lambda prompt: np.asarray(encode(params, tok(prompt))[0])


@dataclasses.dataclass
class Task:
  """Conditions to guide towards.

  Attributes:
    objective: the static part (conditions, modules, tiling): hashable, a jit
      static argument, so one compilation serves every task of its shapes.
    refine: DPS or data consistency (`sampler.Refine`), static too.
    inputs: (CLIP params or None, targets per condition, guided iterations bool
      [steps], the start: None (from noise) or {"image": [H, W, 3] in [-1, 1] at the
      encoder's input size, "step": the spaced step to start at}): the arrays the
      guided sampler takes.
  """
  objective: cond_lib.Objective
  refine: sampler.Refine
  inputs: tuple[PyTree, list[dict[str, np.ndarray]], np.ndarray, dict[str, np.ndarray] | None]


def _start(config: ml_collections.ConfigDict, image: Any) -> dict[str, np.ndarray] | None:
  """The sampler's start: None (from noise), or the image resized (bicubic) to the encoder's
  input size and the spaced step that leaves ceil(start * sample_steps) iterations."""
  cc, steps = config.condition, config.diffusion.sample_steps
  if image is None or isinstance(image, (str, os.PathLike)) and not os.fspath(image):
    return None
  if isinstance(image, (str, os.PathLike)):
    image = _read_image(image, "init_image", "condition.init_image").convert("RGB")
  else:
    image = Image.fromarray(np.asarray(_load_image(image, "condition.init_image")[0] * 127.5
                                       + 127.5).round().clip(0, 255).astype(np.uint8))
  side = config.data.inp_res
  rgb = np.asarray(image.resize((side, side), Image.Resampling.BICUBIC), np.float32)
  return {"image": rgb / 127.5 - 1.0, "step": np.int32(math.ceil(cc.start * steps) - 1)}


def from_config(config: ml_collections.ConfigDict, regions: Any = None,
                name: str = "config.condition.regions", init_image: Any = None,
                settings_name: str = "config.condition") -> Task:
  """The task of `regions` (default `config.condition.regions`) started from `init_image`
  (a file or an array; default `config.condition.init_image`); checks the settings and
  reads every file first. Errors name the regions `name` and the settings `settings_name`."""
  cc, sc = config.condition, config.sample
  init_image = cc.init_image if init_image is None else init_image
  checks.check_start_and_fit({**cc, "init_image": init_image}, settings_name)
  regions = checks.parse_regions(cc.regions if regions is None else regions, name,
                                 clip_files=(cc.clip_checkpoint, cc.clip_vocab))
  clip = clip_params = embed = None
  if any(r["kind"] == "text" for r in regions):
    clip, clip_params, embed = clip_text_embedder(cc.clip_checkpoint, cc.clip_vocab)
  conds, targets = build(regions, embed, name)
  objective = cond_lib.Objective(builders.autoencoder(config), conds, clip=clip, tile=sc.tile,
                                 pad=sc.pad, quantize=sc.quantize)
  guide = sampler.guided_steps(config.diffusion.sample_steps, cc.guide_start, cc.guide_stop,
                               cc.guide_every)
  start = _start(config, init_image)
  return Task(objective, sampler.Refine(cc.fit_steps, cc.fit_lr, cc.fit_zeta),
              (clip_params, targets, guide, start))


def guided_latents_of(config: ml_collections.ConfigDict, eps_fn: Any, dm_params: PyTree,
                      sched: Any, scale: float, ae_params: PyTree,
                      objective: cond_lib.Objective, refine: sampler.Refine, inputs: tuple,
                      key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Guided DDIM latents [*shape] (before quantization) and their losses [conditions, B]
  for any denoiser: `eps_fn` (params, x_t, t) -> eps on `sched`, working on scale * z
  (the stage-2 UNet, or a text-to-image UNet with its prompt and guidance); the
  conditions see (and this returns) z itself."""
  clip_params, targets, guide, start = inputs
  init, init_step = None, -1
  if start is not None:
    z0 = objective.ae.apply({"params": ae_params}, start["image"][None], method="encode")
    init, init_step = jax.numpy.broadcast_to(scale * z0, shape), start["step"]
  x, _ = sampler.guided_ddim_sample(
      eps_fn, dm_params, key, shape, sched,
      lambda x0: objective.weighted(ae_params, clip_params, x0 / scale, targets),
      num_steps=config.diffusion.sample_steps, eta=config.diffusion.eta,
      spacing=config.sample.spacing, guide=guide, init=init, init_step=init_step,
      refine=refine)
  z = x / scale
  return z, objective.losses(ae_params, clip_params, z, targets)
