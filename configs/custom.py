"""Any folder of images (REFERENCE.md 2.5 `ae_custom`/`dm_custom`).

One line, from a folder of photos to samples (prepares the data on first use):

  infd --config=custom:size=small,stage=all --config.data.source=PHOTOS --workdir=W

Later commands need only the same `--config` and `--workdir` (e.g.
`--config=custom:size=small,stage=sample`). Or prepare once by hand:

  infd-prepare --dataset=image_folder --source=PHOTOS --data_dir=DATA
  infd --config=custom --workdir=W --config.data.data_dir=DATA

`size=full` (default) is the official recipe: images centre-cropped to a square
and resized to 1024 (the official `image_folder` with `resize: 1024`), 1.2M AE
steps; its high-resolution fine-tune phase (p_max 0.5 from step 800,001) is set
with `--config.data.p_max=0.5` when resuming for that phase. `size=small` is
for one GPU, TPU chip or a CPU: the demo's narrow networks at 64-pixel inputs
and patches (images resized to 512), L1 + VQ losses, sized to give recognisable
results in about an hour on one accelerator.
"""

from infd_jax import config_files, defaults

SIZES = ("full", "small")


def get_config(arg: str | None = None):
  arg = defaults.parse_arg(arg, stage="ae", size="full")
  if arg.size not in SIZES:
    raise ValueError(f"custom.py: size={arg.size!r}; choose one of {SIZES}")
  c = defaults.base() if arg.size == "full" else config_files.load("demo")
  c.stage = arg.stage
  c.data.update(name="image_folder", variant="default", dm_variant="default", split="train",
                dm_split="train", eval_split="", resize=1024, dm_resize=256)
  if arg.size == "full":
    c.train.ae_steps = 1_200_000
    return c
  c.data.update(resize=512, num_workers=2)
  c.ae.update(num_codes=2048, codebook_init=1.0)  # keeps the VQ the demo's short run drops
  c.loss.quant = 0.25
  c.diffusion.x0_rms_max = 0.0  # off: the demo's bound suits its nine photos and short stage 2
  c.train.update(ae_steps=20_000, dm_steps=50_000, ae_batch_size=8, dm_batch_size=32,
                 log_every=100, ckpt_every=2_000, vis_every=2_000)
  c.sample.update(num_samples=16, batch_size=16, sizes=(256, 1024))
  c.contact_sheet = False
  return c
