"""Our side of `bench.vs_official`: one workload on the converted official weights.

  python -m bench.vs_official_ours --workdir=W --what=unet|render|render_conv|ae_step [...]

W holds `converted/` (the official checkpoint through `infd_jax.convert`) and
`inputs.npz`; compiled programs are cached in `W/jax_cache`, and the warm-up calls
before the timed ones include the compilation. Prints one JSON line
(`bench.cpu_measure.measure`) and writes the first call's output to `--output`
(`bench.cpu_measure.save_output`), which `bench.vs_official` compares with the
official one.
"""

import argparse
import json
import pathlib

import jax
import numpy as np

import infd_jax
from bench import cpu_measure
from infd_jax import builders, compile_cache
from infd_jax import defaults
from infd_jax.convert import mapping
from infd_jax.models import layers
from infd_jax.models.lpips import load_lpips_params
from infd_jax.training import ae_task, optim
from infd_jax.training.state import AEState


def ae_step(converted: pathlib.Path, inputs, args):
  del args
  meta, trees = mapping.load_meta(converted), mapping.load_converted(converted)
  config = defaults.base()  # the official settings, with the converted architecture
  config.ae.update(meta["ae"])
  config.disc.update(meta["disc"])
  config.train.ae_batch_size = len(inputs["ae_inp_uint8"])
  tx = optim.ae_optimizer(config.optim, config.train.ae_steps)
  gen, disc = trees["ae"], trees["disc"]
  state = AEState(step=np.zeros((), np.int32), gen_params=gen, disc_params=disc["params"],
                  disc_stats=disc["batch_stats"], gen_opt=tx.init(gen),
                  disc_opt=tx.init(disc["params"]), rng=jax.random.PRNGKey(0))
  n = len(inputs["ae_inp_uint8"])
  batch = {"inp": inputs["ae_inp_uint8"], "gt": inputs["ae_gt_uint8"],
           "crop": np.tile(inputs["ae_crop"], (n, 1))}
  step = jax.jit(ae_task.make_step(config), donate_argnums=0)
  lpips = load_lpips_params()
  holder = {"state": jax.device_put(state)}

  def call():
    holder["state"], scalars = step(holder["state"], batch, lpips)
    return jax.block_until_ready(scalars)
  return call


def render(converted: pathlib.Path, inputs, args):
  model = infd_jax.load(converted, **({"sample": {"tiles_per_call": args.tiles_per_call}}
                                      if args.tiles_per_call else {}))
  z = inputs["render_z_nhwc"]
  return lambda: model.render(z, args.size)


def render_conv(converted: pathlib.Path, inputs, args):
  del args
  params = mapping.load_converted(converted)["ae"]["renderer"]["model_1"]["conv1"]
  x = inputs["conv_x_nhwc"]
  conv = layers.conv(x.shape[-1], 3, in_features=x.shape[-1])  # the renderer's conv layer
  apply = jax.jit(lambda p, x: conv.apply({"params": p}, x))
  params = jax.device_put(params)
  return lambda: jax.block_until_ready(apply(params, x))


def unet(converted: pathlib.Path, inputs, args):
  del args
  meta, trees = mapping.load_meta(converted), mapping.load_converted(converted)
  config = defaults.base()
  config.dm.update({k: v for k, v in meta["dm"].items() if k not in ("in_channels", "out_channels")})
  module = builders.unet(config)
  params = jax.device_put(trees["dm"])
  apply = jax.jit(lambda p, x, t: module.apply({"params": p}, x, t))
  x, t = inputs["unet_x_nhwc"], inputs["unet_t"]
  return lambda: jax.block_until_ready(apply(params, x, t))


WORKLOADS = {"ae_step": ae_step, "render": render, "render_conv": render_conv, "unet": unet}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--what", choices=tuple(WORKLOADS), required=True)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--output", type=pathlib.Path, default=None)
  parser.add_argument("--tiles_per_call", type=int, default=0,
                      help="render: tiles per call (0: the model's setting, sample.tiles_per_call)")
  args = parser.parse_args()
  cpu_measure.pin(args.threads)
  compile_cache.enable(str(args.workdir / "jax_cache"))
  inputs = dict(np.load(args.workdir / "inputs.npz"))
  fn = WORKLOADS[args.what](args.workdir / "converted", inputs, args)
  first = cpu_measure.FirstOutput(fn)
  result = cpu_measure.measure(first, args.warmup, args.repeats, memory=args.what == "render")
  if args.output:
    out = first.value
    cpu_measure.save_output(args.output, {k: np.asarray(v) for k, v in out.items()}
                            if isinstance(out, dict) else {"out": np.asarray(out)})
  print(json.dumps({"side": "ours", "what": args.what, "jax": jax.__version__,
                    "threads": args.threads, **result}), flush=True)


if __name__ == "__main__":
  main()
