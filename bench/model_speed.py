"""Speed and memory of the jitted hot paths, on whatever accelerator jax sees.

  python bench/model_speed.py --what=ae --config=configs/ffhq.py --dtype=bfloat16
  python bench/model_speed.py --what=dm --batch=48
  python bench/model_speed.py --what=ddim --batch=8
  python bench/model_speed.py --what=render --batch=8 --size=1024
  python bench/model_speed.py --what=render --batch=1 --size=8192

Inputs are synthetic arrays of the real shapes (the data pipeline is measured by
bench/data_pipeline.py). Reports the compile time, the median and p90 of
`--repeats` timed calls (each waits for its result), throughput, and the
device's peak memory. Prints one JSON line per run.
"""

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from infd_jax import sharding  # noqa: E402
from infd_jax.models.lpips import load_lpips_params  # noqa: E402
from infd_jax.rendering import coords, tiling  # noqa: E402
from infd_jax.training import ae_step, ae_task, builders, dm_task, loop, optim  # noqa: E402
from infd_jax.training.dm_step import dm_train_step  # noqa: E402


def _config(path: str, dtype: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.compute_dtype = dtype
  return config


def _time(fn, repeats: int) -> tuple[float, list[float]]:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return compile_s, times


def _peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _train_step(config, what: str, batch: int):
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  rules = sharding.config_rules(config.mesh)
  rng = np.random.default_rng(0)
  if what == "ae":
    r, p = config.data.inp_res, config.data.patch
    # A P x P window in the middle of a 2P x 2P ground truth.
    coord, cell = coords.window_coord_cell((2 * p, 2 * p), (p // 2, p // 2), (p, p))
    data = {"inp": rng.uniform(-1, 1, (batch, r, r, 3)), "gt": rng.uniform(-1, 1, (batch, p, p, 3)),
            "coord": np.broadcast_to(coord, (batch, p, p, 2)),
            "cell": np.broadcast_to(cell, (batch, p, p, 2))}
    tx = optim.ae_optimizer(config.optim)
    step = functools.partial(
        ae_step.ae_train_step, ae=builders.autoencoder(config),
        disc=builders.discriminator(config), lpips=builders.lpips(config), gen_tx=tx, disc_tx=tx,
        loss=ae_step.AELoss(**config.loss))
    init_fn, consts = ae_task.init_fn(config), (jax.device_put(load_lpips_params()),)
  else:
    step = functools.partial(
        dm_train_step, unet=builders.unet(config), ae=builders.autoencoder(config),
        tx=optim.dm_optimizer(config.optim), sched=builders.diffusion_schedule(config),
        ema_decay=config.optim.dm_ema)
    init_fn = dm_task.init_fn(config)
    if config.train.latent_cache:
      data, consts = {"z": rng.normal(size=(batch, *builders.latent_shape(config)))}, (None,)
    else:  # the step runs the frozen encoder on images itself
      r = config.data.inp_res
      data = {"inp": rng.uniform(-1, 1, (batch, r, r, 3))}
      consts = (_init_params(ae_task.init_fn(config), 0).gen_params,)
  _, shardings, init = loop.initial_state(init_fn, mesh, rules, 0)
  state = [init()]
  batch_arrays = sharding.shard_batch({k: v.astype(np.float32) for k, v in data.items()}, mesh)
  jitted = jax.jit(step, out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)

  def run():
    state[0], metrics = jitted(state[0], batch_arrays, *consts)
    return metrics
  return run


def _init_params(init_fn, seed: int):
  return jax.jit(lambda k: nn.unbox(init_fn(k)))(jax.random.PRNGKey(seed))


def _sampler(config, batch: int):
  ae_params = _init_params(ae_task.init_fn(config), 0).gen_params
  dm_params = _init_params(dm_task.init_fn(config), 1).params
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  sample = dm_task.make_sampler(config, num=batch, mesh=mesh)
  keys = iter(range(10**6))
  return lambda: sample(dm_params, ae_params, jax.random.PRNGKey(next(keys))), ae_params


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--what", choices=("ae", "dm", "ddim", "render"), required=True)
  p.add_argument("--config", default="configs/ffhq.py")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--batch", type=int, default=0, help="0 = the config's training batch / 8")
  p.add_argument("--size", type=int, default=1024, help="render: output side")
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--no_latent_cache", action="store_true",
                 help="dm: encode images inside the step instead of reading cached latents")
  args = p.parse_args()
  config = _config(args.config, args.dtype)
  config.train.latent_cache = not args.no_latent_cache
  batch = args.batch or {"ae": config.train.ae_batch_size, "dm": config.train.dm_batch_size}.get(
      args.what, 8)
  if args.what in ("ae", "dm"):
    fn = _train_step(config, args.what, batch)
  elif args.what == "ddim":
    fn, _ = _sampler(config, batch)
  else:
    sample, ae_params = _sampler(config, batch)
    phi = sample()
    renderer = tiling.TiledRenderer(tiling.module_render_fn(builders.autoencoder(config), "render"),
                                    config.sample.tile, config.sample.pad,
                                    config.sample.tiles_per_call)
    fn = lambda: renderer.render_image({"params": ae_params}, phi, (args.size, args.size))
  compile_s, times = _time(fn, args.repeats)
  median = statistics.median(times)
  print(json.dumps({
      "what": args.what, "config": args.config, "latent_cache": config.train.latent_cache, "dtype": args.dtype, "batch": batch,
      "size": args.size if args.what == "render" else None, "device": str(jax.devices()[0]),
      "devices": jax.device_count(), "compile_s": round(compile_s, 3),
      "median_s": round(median, 5), "p90_s": round(sorted(times)[int(0.9 * (len(times) - 1))], 5),
      "items_per_s": round(batch / median, 2), "peak_bytes": _peak_bytes()}))


if __name__ == "__main__":
  main()
