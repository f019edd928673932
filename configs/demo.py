"""The embedded demo: every stage on scikit-image's photos, sized for 2 CPU cores.

Prepares the demo dataset (no download), trains a narrow autoencoder, trains a
narrow diffusion model on its latents, samples at 256 and 1024, and ends with
`<workdir>/contact_sheet.png` (held-out reconstructions at 1x and 4x, samples)
and the headline numbers (reconstruction PSNR, scale consistency).

Demo-only settings, chosen for a result in minutes on a CPU, not for quality at
scale (each is off, i.e. official, in the other configs):
- narrow widths with GroupNorm in 8 groups (`norm_groups`): the official 32 groups
  of 32-channel layers normalise every channel on its own, which drops each
  channel's level (colour casts; a UNet that cannot match the latents' scale);
- an f2 autoencoder (`ae.ch_mult=(1, 1)`: z is 32 x 32 x 3 for a 64-pixel input,
  not f4's 16 x 16 x 3): a thousand CPU steps do not teach f4's 16x compression
  (held-out crops: 19.3 dB at f4, 22.8 dB at f2 without mid attention, both
  1,000 steps);
- no self-attention in the autoencoder's mid stages (`ae.mid_attention=False`,
  the official `attn_type="none"`): at the 256-pixel inputs of the held-out crops
  it would attend over 16x the tokens it was trained on (one training photo
  encoded at 256 fell to 12 dB with it), and without it the f2 step is faster;
- no quantizer (`ae.num_codes=0`, the official `quantizer=False`): in a run this
  short only a few hundred codes get used, and that palette caps the
  reconstructions (about 1 dB below the continuous latent on the held-out crops);
- a renderer without GroupNorm (`ae.renderer_normalize=False`, the official net's
  `normalize` switch): every pixel then depends on its 13 x 13 neighbourhood
  only, so tiled renders have no seams and the 2x and 4x renders agree closely
  with the 1x one;
- stage 1 with the L1 loss only (no LPIPS, no GAN: both slow a short CPU run and
  the GAN only pays off after long training), a high learning rate decayed along a
  cosine, half the examples at 1x (`p_whole`) and random windows of the photos as
  inputs (`inp_crop`), so nine photos still give the encoder varied inputs;
- stage 2 on latents scaled to unit variance (`diffusion.latent_scale=0`: 1 / std
  of the cached latents, LDM's scale_factor), a UNet with one ResBlock per level
  and batches of 4 (2,500 steps fit the budget), a high learning rate with cosine
  decay, 20 DDIM steps;
- sampling with each step's x0 bounded in RMS (`diffusion.x0_rms_max=1.2`, just
  under the largest RMS of the nine scaled training latents): a briefly trained
  eps model overshoots at high noise, where its x0 errors are multiplied by
  1 / sqrt(snr). With this config, 9 of 16 samples overshoot without the bound
  (latent RMS 2.7-7.6, the data's at most 2.0; they render saturated black or
  white) and none with it; for a 3,000-step UNet of channel_mult (1, 2, 2) at batch 8, samples
  near a training latent go from 4 of 16 to 12 (9 different photos);
- what it shows stays within the scales it trains on: the encoder sees 64-pixel
  inputs and the renderer ground truth up to 256 pixels (1x to 4x), so the
  contact sheet encodes held-out crops at 64 and renders them at 1x, 2x and 4x
  (next to the photo at 256), and samples are written at 64 and 256. Encoding
  256-pixel crops (as the sheet did before) shifts the mean colour of the
  reconstructions by about +10 red and -10 blue out of 255 (the orange cast),
  against +0 and -3 at 64 (`python -m bench.demo_encode_size`); renders at 16x,
  four times the largest trained scale, show the feature map's cells as blocks.
"""

from infd_jax import defaults


def get_config(arg: str | None = None):
  arg = defaults.parse_arg(arg, stage="all")
  c = defaults.base()
  c.stage = arg.stage
  c.data.update(name="demo", variant="", split="train", eval_split="", dm_variant="",
                dm_split="train", dm_resize=0, patch=64, inp_res=64, gt_res_min=64,
                gt_res_max=256, p_whole=0.5, inp_crop=0.3, num_workers=0)
  c.ae.update(ch=32, ch_mult=(1, 1), num_res_blocks=1, num_codes=0, renderer_hidden=32,
              norm_groups=8, renderer_normalize=False, mid_attention=False)
  c.disc.update(ndf=8)
  c.loss.update(perc=0.0, gan_g=0.0)
  c.dm.update(model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1,
              attention_resolutions=(4,), num_head_channels=16, norm_groups=8)
  c.diffusion.update(sample_steps=20, latent_scale=0.0, x0_rms_max=1.2)
  c.train.update(ae_batch_size=4, ae_steps=1000, dm_batch_size=4, dm_steps=2500,
                 log_every=50, ckpt_every=1000, vis_every=100_000, eval_every=0)  # grids at the end
  c.optim.update(ae_lr=2e-3, ae_b1=0.9, ae_b2=0.99, dm_lr=2e-3, dm_ema=0.99, cosine_decay=True)
  c.sample.update(num_samples=4, batch_size=4, sizes=(64, 256), tile=128, pad=8)
  c.eval.update(scale_consistency_base=64, scale_factors=(2, 4))
  c.contact_sheet = True
  return c
