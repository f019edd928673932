"""Writes a randomly initialised, Stable-Diffusion-shaped checkpoint (no download needed).

The output has the layout `python -m infd_jax.convert.sd` writes (DIR/params with
'unet', 'vae', 'text' and DIR/meta.json), so the text-to-image stages read it
as they read imported SD weights (`t2i.sd_weights`). It is the starting point of
a from-scratch run on hosts where pretrained SD weights cannot be downloaded:
stage (a) keeps the random KL encoder frozen (as the recipe keeps SD's), stage
(b) trains the UNet from its random start against the random, frozen CLIP-shaped
text tower (distinct captions give distinct contexts).

The latent scale is SD's rule (unit-variance latents for the UNet): with
`--calibrate_res=N` it is 1 / std of the encoder's posterior means of the first
256 OpenMoji training emoji at N px; else 1.

    python -m infd_jax.convert.sd_init --output=DIR [--arch=openmoji32 | --arch=JSON]
        [--seed=0] [--calibrate_res=32]
"""

import argparse
import json
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from infd_jax.clip.text import TextTransformer
from infd_jax.convert import sd, sd_arch
from infd_jax.models.sd_unet import SDUNet
from infd_jax.models.sd_vae import KLAutoencoder

PyTree = Any
CALIBRATION_IMAGES = 256
CLIP_VOCAB_SIZE = 49408  # OpenAI's bpe_simple_vocab_16e6 (SD 1.x's tokenizer)

# The OpenMoji text-to-image proof (docs/text_to_image.md): 32 px emoji, an f1 KL
# encoder with 4 latent channels (more numbers than pixels, as SD's 4 x 64 x 64 for
# 512 px is not), a three-level UNet of width 32 with cross-attention at 16 and 8, a 2-layer
# text tower of width 64 on CLIP's vocabulary, 24 tokens (emoji names are short).
PRESETS = {
    "openmoji32": dict(
        vae=dict(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=4, norm_groups=8),
        unet=dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(2, 4), num_heads=-1, num_head_channels=32,
                  context_dim=64, transformer_depth=1, in_channels=4, out_channels=4,
                  norm_groups=8),
        text=dict(vocab_size=CLIP_VOCAB_SIZE, context_length=24, width=64, heads=4, layers=2,
                  quick_gelu=True),
    ),
}


def resolve_arch(arch: str) -> dict[str, Any]:
  """A preset name or JSON {'unet', 'vae', 'text'} -> module kwargs (ValueError if neither)."""
  if arch in PRESETS:
    return json.loads(json.dumps(PRESETS[arch]))
  try:
    parsed = json.loads(arch)
  except json.JSONDecodeError as e:
    raise ValueError(f"--arch={arch!r} is neither a preset ({sorted(PRESETS)}) nor JSON") from e
  missing = [p for p in sd.PARTS if not isinstance(parsed.get(p), dict)]
  if missing:
    raise ValueError(f"--arch lacks the module kwargs of {missing}")
  return parsed


def init_params(arch: Mapping[str, Any], seed: int) -> dict[str, PyTree]:
  """Random {'unet', 'vae', 'text'} parameters (host float32 arrays) of `arch`."""
  k_unet, k_vae, k_text = jax.random.split(jax.random.key(seed), 3)
  text, unet = arch["text"], arch["unet"]
  side = 8 * 2 ** (len(arch["vae"]["ch_mult"]) - 1)  # any size the UNet's levels divide
  latent = np.zeros((1, side, side, unet["in_channels"]), np.float32)
  tokens = np.zeros((1, text["context_length"]), np.int32)
  context = np.zeros((1, text["context_length"], text["width"]), np.float32)
  trees = dict(
      unet=SDUNet(**unet).init(k_unet, latent, np.zeros((1,), np.int32), context)["params"],
      vae=KLAutoencoder(**arch["vae"]).init(k_vae, np.zeros((1, side, side, 3), np.float32)),
      text=TextTransformer(**text).init(k_text, tokens)["params"])
  trees["vae"] = trees["vae"]["params"]
  return jax.tree.map(np.asarray, nn.unbox(trees))  # logical-axis boxes off, as sd.load gives


def latent_std(arch: Mapping[str, Any], vae_params: PyTree, images: np.ndarray) -> float:
  """Std of the KL encoder's posterior means of uint8 images [N, H, W, 3]."""
  vae = KLAutoencoder(**arch["vae"])
  encode = jax.jit(lambda x: vae.apply({"params": vae_params}, x, method="encode")[0])
  means = [np.asarray(encode(batch.astype(np.float32) / 127.5 - 1))
           for batch in np.array_split(images, max(1, len(images) // 64))]
  return float(np.concatenate(means).std())


def openmoji_images(res: int) -> np.ndarray:
  """The first `CALIBRATION_IMAGES` OpenMoji training emoji (by name) at res px."""
  from infd_jax.data import openmoji  # pylint: disable=g-import-not-at-top  (data only)
  train, _ = openmoji.split_names(openmoji.list_names(openmoji.svg_dir()))
  return openmoji.ground_truth(train[:CALIBRATION_IMAGES], res)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m infd_jax.convert.sd_init",
                              description=__doc__.split("\n")[0])
  p.add_argument("--output", required=True, help="output folder (must not hold params/)")
  p.add_argument("--arch", default="openmoji32",
                 help=f"a preset ({', '.join(PRESETS)}) or JSON {{unet, vae, text}} kwargs")
  p.add_argument("--seed", type=int, default=0, help="seed of the random parameters")
  p.add_argument("--calibrate_res", type=int, default=0,
                 help="N > 0: latent scale 1 / std on OpenMoji emoji at N px; 0: scale 1")
  args = p.parse_args(argv)
  try:
    arch = resolve_arch(args.arch)
  except ValueError as e:
    p.error(str(e))
  if args.calibrate_res < 0:
    p.error(f"--calibrate_res={args.calibrate_res} must be >= 0")
  if (epath.Path(args.output) / "params").exists():
    p.error(f"{args.output}/params already exists; choose a fresh --output")
  trees = init_params(arch, args.seed)
  scale = 1.0
  if args.calibrate_res:
    scale = 1.0 / latent_std(arch, trees["vae"], openmoji_images(args.calibrate_res))
  meta = dict(arch, prediction="eps", scaling_factor=scale, schedule=dict(sd_arch.SCHEDULE))
  sd.save(args.output, trees, meta, f"random init, seed {args.seed}")
  print(f"random SD-shaped checkpoint (seed {args.seed}, scaling_factor={scale:.5g}) "
        f"-> {args.output}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
