"""`demo.py` shrunk further for CPU tests: tiny widths, 32 px, a few steps."""

from infd_jax import config_files, defaults


def get_config(arg: str | None = None):
  arg = defaults.parse_arg(arg, stage="ae")
  c = config_files.load("demo")
  c.stage = arg.stage
  c.data.update(patch=32, inp_res=32, gt_res_min=32, gt_res_max=64)
  c.loss = defaults.base().loss  # every loss term, unlike the demo
  c.optim.update(ae_lr=2e-4, ae_b1=0.5, ae_b2=0.9, dm_lr=3e-4, cosine_decay=False)
  # The demo's quality options stay off: the tests run the official code paths.
  c.data.update(p_whole=0.0, inp_crop=0.0)
  c.diffusion.update(latent_scale=1.0, x0_rms_max=0.0)
  c.contact_sheet = False
  c.ae.update(ch=32, ch_mult=(1, 1), num_res_blocks=1, num_codes=32, renderer_hidden=32,
              codebook_init=0.0, norm_groups=32, renderer_normalize=True, mid_attention=True)
  c.dm.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(2,),
              num_head_channels=8, norm_groups=32)
  c.diffusion.sample_steps = 4
  c.train.update(ae_batch_size=8, ae_steps=3, dm_batch_size=8, dm_steps=3,
                 log_every=1, ckpt_every=2, vis_every=0, eval_every=0)
  c.sample.update(num_samples=2, batch_size=2, sizes=(32, 48), tile=16, pad=4)
  return c
