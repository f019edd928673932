"""The embedded default: every stage on scikit-image's photos, small and brief.

Runs on a 2-core CPU in minutes: prepares the demo dataset (no download),
trains a narrow autoencoder, trains a narrow diffusion model on its latents,
samples, and renders at 256, 512 and 1024. Images will be rough: the point is
that every part of the real pipeline runs.
"""

from infd_jax.configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, stage="all")
  c = common.base()
  c.stage = arg.stage
  c.data.update(name="demo", variant="", split="train", eval_split="", dm_variant="",
                dm_split="train", dm_resize=0, patch=64, inp_res=64, gt_res_min=64,
                gt_res_max=1024, num_workers=0)  # up to the 1024 renders: 16x the 64-px phi
  c.ae.update(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, num_codes=256, renderer_hidden=32)
  # (GroupNorm has 32 groups everywhere, so widths stay multiples of 32.)
  c.disc.update(ndf=8)
  c.dm.update(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,),
              num_head_channels=16)
  c.optim.update(ae_lr=2e-4, dm_lr=3e-4, dm_ema=0.99)
  c.diffusion.sample_steps = 20
  c.train.update(ae_batch_size=4, ae_steps=400, dm_batch_size=8, dm_steps=1500,
                 log_every=50, ckpt_every=200, vis_every=400, eval_every=0)
  # Tiles as large as the training patches, as the official 256 tiles match its 256 patches.
  c.sample.update(num_samples=4, batch_size=4, sizes=(256, 512, 1024), tile=64, pad=8)
  return c
