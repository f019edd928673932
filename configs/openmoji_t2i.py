"""OpenMoji text-to-image from scratch: the SD-shaped path of docs/text_to_image.md on CPU.

  python -m infd_jax.convert.sd_init --output=runs/om_sd --calibrate_res=32
  infd --config=openmoji_t2i:stage=ae --workdir=runs/om_t2i \
      --config.t2i.sd_weights=runs/om_sd --config.t2i.vocab=bpe_simple_vocab_16e6.txt.gz
  infd --config=openmoji_t2i:stage=t2i_unet --workdir=runs/om_t2i (same two flags)
  python -m bench.t2i_adherence --workdir=runs/om_t2i

Pretrained SD weights cannot be downloaded on this project's hosts, so the
section-5 recipe runs on a random SD-shaped checkpoint (`convert.sd_init`'s
`openmoji32` preset): stage (a) trains the INFD decoder and CLIF renderer on its
frozen random KL encoder (f1, 4 channels) over every training emoji at 32 px,
with ground truth up to 256 px for a quarter of them; stage (b) trains the
cross-attention UNet from scratch on (emoji, caption) pairs of a fixed subset of
100 training emoji (`32_32_0_100`: captions are the Unicode names,
`data.openmoji.caption`) against the random frozen CLIP-shaped text tower.
The rest follows the OpenMoji quick preset (`openmoji.py`).
"""

from infd_jax import config_files, defaults
from infd_jax.convert import sd_init

PRESET = "openmoji32"
TRAIN_EMOJI = 100


def get_config(arg: str | None = None):
  arg = defaults.parse_arg(arg, stage="ae")
  c = config_files.load("openmoji:size=quick")
  c.stage = arg.stage
  vae = sd_init.PRESETS[PRESET]["vae"]
  c.data.update(variant="32_256_25", dm_variant=f"32_32_0_{TRAIN_EMOJI}", inp_res=32, patch=32,
                gt_res_min=32, gt_res_max=256)
  c.ae.update(ch=vae["ch"], ch_mult=vae["ch_mult"], num_res_blocks=vae["num_res_blocks"],
              z_channels=vae["z_channels"], norm_groups=vae["norm_groups"], mid_attention=True,
              kl_encoder=True, num_codes=0, renderer_hidden=32)
  c.optim.update(ae_frozen=("encoder",), dm_lr=1e-3, dm_ema=0.995)
  c.train.update(ae_batch_size=8, ae_steps=1200, dm_batch_size=16, dm_steps=1200,
                 log_every=100, ckpt_every=500)
  c.t2i.update(uncond_prob=0.1, guidance_scale=3.0)
  c.diffusion.update(sample_steps=20, eta=0.0, x0_rms_max=0.0)
  c.sample.update(sampler="dpmpp_2m", num_samples=4, batch_size=16, sizes=(256, 1024))
  return c
