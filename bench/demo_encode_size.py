"""Held-out reconstructions of a demo workdir against the size the crops are encoded at.

The demo's encoder is trained on 64-pixel inputs (`data.inp_res`) with ground
truth up to 256 pixels (`data.gt_res_max`). This encodes the held-out crops of
the contact sheet (`contact_sheet.held_out_crops`) at each --sizes, renders them
at 1x and at each --factors, and prints per size the 1x PSNR and the mean
shift of each colour channel (render minus input, 0-255 scale): a colour cast
shows as a red gain and blue loss.

    python -m bench.demo_encode_size --workdir=workdir/demo [--sizes=64,128,256] [--factors=4]
"""

import argparse
import json

import numpy as np

from infd_jax import inference
from infd_jax.evaluation import contact_sheet, fidelity
from infd_jax.rendering import pixels


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--sizes", default="64,128,256", help="encoder input sizes")
  p.add_argument("--factors", default="4", help="render scales besides 1x")
  args = p.parse_args(argv)
  model = inference.load(args.workdir)
  for size in (int(s) for s in args.sizes.split(",")):
    photo = contact_sheet.held_out_photo_crops(size)
    mean_in = fidelity.to_unit(photo).reshape(-1, 3).mean(0)
    z = model.encode(contact_sheet.held_out_crops(size))
    row = dict(encode_size=size)
    for k in [1] + [int(f) for f in args.factors.split(",")]:
      render = pixels.to_uint8(model.render(z, (k * size, k * size)))
      shift = (fidelity.to_unit(render).reshape(-1, 3).mean(0) - mean_in) * 255.0
      row[f"rgb_shift_x{k}"] = [round(float(v), 1) for v in shift]
      if k == 1:
        row["psnr_x1"] = round(float(np.mean(fidelity.psnr(render, photo))), 2)
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
