"""Per-chip memory of the SD 1.5-shaped UNet fine-tuning step, compiled ahead of time for TPUs.

  python -m bench.sd_finetune_aot --topology=v5p:2x2x1 --batch=16 --res=512
  python -m bench.sd_finetune_aot --topology=v6e:2x4 --batch=16 --res=512 --remat
  python -m bench.sd_finetune_aot --topology=v5p:2x2x2 --batch=32 --res=768 --family=sd2

Compiles `training.t2i_step.t2i_train_step` (frozen KL-f8 encoder and CLIP
ViT-L/14 text tower inside the step, or SD 2.x's UNet, OpenCLIP ViT-H/14 text
tower and v objective with `--family=sd2`; AdamW and EMA on the UNet, float32
parameters and optimizer state replicated, the batch split over the chips)
with libtpu for `--topology` on a CPU host (`infd_jax.aot.topology_devices`),
and prints XLA's per-chip memory plan (`infd_jax.aot.analysis`) and the
compile time; appends one JSON line to `--results`. Shapes only: nothing is
allocated and no weights are needed.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infd_jax import aot
from infd_jax.clip.text import SD1_TEXT, SD2_TEXT, TextTransformer
from infd_jax.diffusion import schedules
from infd_jax.models.sd_unet import SD1, SD2, SDUNet
from infd_jax.models.sd_vae import KLAutoencoder
from infd_jax.training import t2i_step
from infd_jax.training.state import DMState


def build(args):
  dtype = jnp.bfloat16 if args.bf16 else jnp.float32
  shapes, text_config = (SD1, SD1_TEXT) if args.family == "sd1" else (SD2, SD2_TEXT)
  unet = SDUNet(**shapes, dtype=dtype, remat=args.remat)
  vae = KLAutoencoder(dtype=dtype)
  text = TextTransformer(**vars(text_config), dtype=dtype)
  tx = optax.adamw(1e-5, weight_decay=1e-2)
  latent = args.res // 8
  key = jax.random.PRNGKey(0)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  ids = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)

  def init_state():
    params = unet.init(key, jnp.zeros((1, latent, latent, 4)), jnp.zeros((1,), jnp.int32),
                       jnp.zeros((1, 77, shapes["context_dim"])))["params"]
    return DMState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                   opt=tx.init(params), rng=key)

  state = jax.eval_shape(init_state)
  frozen = dict(vae=jax.eval_shape(lambda x: vae.init(key, x), f32(1, 64, 64, 3))["params"],
                text=jax.eval_shape(lambda t: text.init(key, t), ids(1, 77))["params"],
                empty_tokens=ids(1, 77))
  batch = dict(image=f32(args.batch, args.res, args.res, 3), tokens=ids(args.batch, 77))
  step = lambda s, b, f: t2i_step.t2i_train_step(
      s, b, f, unet=unet, vae=vae, text=text, tx=tx, sched=schedules.scaled_linear_schedule(),
      objective="eps" if args.family == "sd1" else "v", latent_scale=0.18215, uncond_prob=0.1,
      ema_decay=0.9999)
  return step, state, batch, frozen


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--topology", required=True, help="e.g. v5p:2x2x1, v6e:2x4, or cpu")
  p.add_argument("--family", choices=("sd1", "sd2"), default="sd1",
                 help="SD 1.5's shapes, or SD 2.x's (768-v)")
  p.add_argument("--batch", type=int, default=16, help="global batch")
  p.add_argument("--res", type=int, default=512, help="image side (latents are res / 8)")
  p.add_argument("--remat", action="store_true", help="rematerialise UNet blocks")
  p.add_argument("--bf16", action="store_true", help="bfloat16 compute (float32 parameters)")
  p.add_argument("--results", default="bench/results/sd_finetune_aot.jsonl")
  args = p.parse_args(argv)
  devices = aot.topology_devices(args.topology)
  mesh = Mesh(np.array(devices), ("data",))
  aot.check_batch(args.batch, mesh)
  step, state, batch, frozen = build(args)
  rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  place = lambda tree, s: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree)
  state_sh = jax.tree.map(lambda _: rep, state)
  jitted = jax.jit(step, out_shardings=(state_sh, rep), donate_argnums=0)
  start = time.perf_counter()
  compiled = jitted.lower(place(state, rep), place(batch, split), place(frozen, rep)).compile()
  record = dict(program=f"{args.family}_unet_finetune_step", topology=args.topology,
                chips=len(devices), batch=args.batch, res=args.res, remat=args.remat,
                bf16=args.bf16,
                compile_s=round(time.perf_counter() - start, 1), **aot.analysis(compiled))
  gen = args.topology.split(":")[0]
  if gen in aot.HBM_GIB:
    record["hbm_gib"] = aot.HBM_GIB[gen]
    record["fits"] = record["total_bytes"] <= aot.HBM_GIB[gen] * aot.GIB
  print(json.dumps(record))
  with open(args.results, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
