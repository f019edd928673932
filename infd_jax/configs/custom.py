"""Any folder of images (REFERENCE.md 2.5 `ae_custom`/`dm_custom`).

  python -m infd_jax.data.prepare --dataset=image_folder --source=PHOTOS --data_dir=DATA
  python -m infd_jax.main --config=configs/custom.py --workdir=W --config.data.data_dir=DATA

Images are centre-cropped to a square and resized to 1024 (the official
`image_folder` with `resize: 1024`). The official custom schedule is 1.2M AE
steps; its high-resolution fine-tune phase (p_max 0.5 from step 800,001) is
set with `--config.data.p_max=0.5` when resuming for that phase.
"""

from infd_jax.configs import common


def get_config(arg: str | None = None):
  arg = common.parse_arg(arg, stage="ae")
  c = common.base()
  c.stage = arg.stage
  c.data.update(name="image_folder", variant="default", dm_variant="default", resize=1024,
                dm_resize=256)
  c.train.ae_steps = 1_200_000
  return c
