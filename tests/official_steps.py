"""Our training steps replayed on the official steps of tests/fixtures/official/.

`step_errors(stage, dtype)` runs one step of our stage-1 or stage-2 training code
(the real `ae_train_step` / `dm_train_step` with the optimizers and loss weights
of the default config) from the official fixture's weights and batch, with the
official step's randomness replayed (LPIPS dropout masks; diffusion timesteps and
noise) and the batch's query grid built by `rendering.coords` in the step's
precision, and returns relative errors against the official float64 step: every
loss, then per parameter group the gradient and the optimizer's update (the
official update is the closed form of `fixtures/official/first_step.py`).

Run as a script it writes `step_errors` of both stages in float64 as JSON; the
test runs it in a subprocess with JAX_ENABLE_X64=1, so x64 never leaks into the
test process.
"""

import functools
import json
import pathlib
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from infd_jax import builders
from infd_jax import defaults
from infd_jax.convert import mapping, torch_pickle
from infd_jax.models import layers, lpips as lpips_lib
from infd_jax.rendering import coords
from infd_jax.training import ae_step, dm_step, optim
from infd_jax.training.state import AEState, DMState
from tests.fixtures.official import first_step

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "official"
PyTree = Any
AE_LOSSES = ("l1_loss", "perc_loss", "quant_loss", "gan_g_loss", "adaptive_g_w", "loss",
             "disc_loss", "disc_logits_real", "disc_logits_fake", "psnr")  # official = our names


def rel(ours, official) -> float:
  """Relative L2 error of a tree (or array) against the official one."""
  a = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(ours)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(official)])
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _official_tree(arrays: dict[str, np.ndarray], part: str, arch: dict) -> PyTree:
  """Torch-layout tensors of one part -> our tree (float64, no rounding)."""
  shapes = {k: v.shape for k, v in arrays.items()}
  targets = {part: mapping.target_shapes(part, arch)}
  return mapping.apply(mapping.plan(shapes, targets), arrays, np.float64)[part]


@functools.cache
def _fixture():
  """(torch state dict, our trees, architecture) of the official checkpoint."""
  ckpt = torch_pickle.load_torch_state_dict(FIXTURES / "infd_tiny.pth")
  trees, arch = mapping.convert_state_dict(ckpt["model"]["sd"], ckpt["model"], ["ae", "disc", "dm"])
  return ckpt["model"]["sd"], trees, arch


def _official(fx: dict, kind: str) -> dict[str, np.ndarray]:
  return {k[len(kind) + 1:]: v for k, v in fx.items() if k.startswith(kind + "/")}


def _official_updates(fx: dict, sd: dict) -> dict[str, np.ndarray]:
  """The official step's update of every parameter (first_step's closed form, float64)."""
  hyper = {k: float(v) for k, v in _official(fx, "optimizer").items()}
  return {k: first_step.update(g.astype(np.float64), sd[k].astype(np.float64), **hyper)
          for k, g in _official(fx, "grad").items()}


def _config(dtype: str, arch: dict):
  c = defaults.base()
  c.train.compute_dtype = dtype
  c.ae.update(arch["ae"])
  c.disc.update(arch["disc"])
  c.dm.update({k: v for k, v in arch["dm"].items() if k not in ("in_channels", "out_channels")})
  return c


def _recording(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` after a stage that keeps the incoming gradients as its state."""
  keep = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (g, g))
  return optax.chain(keep, tx)


def _fixed_dropout(masks: list[np.ndarray]):
  """Replaces LPIPS's Dropout_k by the official step's keep mask k (scaled by 1 / 0.5)."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Dropout) and context.method_name == "__call__" and not (
        module.deterministic or kwargs.get("deterministic")):
      x = args[0]
      keep = masks[int(module.name.split("_")[1])]
      return jnp.where(keep, x / 0.5, 0).astype(x.dtype)
    return next_fun(*args, **kwargs)
  return nn.intercept_methods(interceptor)


def _cast(tree: PyTree, dtype) -> PyTree:
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def _loss_errors(scalars: dict, fx: dict, names) -> dict[str, float]:
  return {f"loss/{k}": abs(float(scalars[k]) - float(fx[f"loss/{k}"])) / abs(float(fx[f"loss/{k}"]))
          for k in names}


def _ae_batch(fx: dict, dtype) -> dict[str, jax.Array]:
  """The official batch; its query grid is ours, built in the step's precision."""
  full, top, left, side = (int(v) for v in fx["gt_window"])
  coord, cell = coords.window_coord_cell((full, full), (top, left), (side, side), dtype=dtype)
  b = fx["gt"].shape[0]
  return _cast({"inp": fx["inp"], "gt": fx["gt"], "coord": np.broadcast_to(coord, (b, *coord.shape)),
                "cell": np.broadcast_to(cell, (b, *cell.shape))}, dtype)


def ae_step_errors(dtype: str) -> dict[str, float]:
  sd, trees, arch = _fixture()
  fx = dict(np.load(FIXTURES / "ae_step.npz"))
  c = _config(dtype, arch)
  full = layers.full_precision(builders.compute_dtype(c))
  tx = _recording(optim.ae_optimizer(c.optim))
  step = jax.jit(functools.partial(
      ae_step.ae_train_step, ae=builders.autoencoder(c), disc=builders.discriminator(c),
      lpips=builders.lpips(c), gen_tx=tx, disc_tx=tx, loss=ae_step.AELoss(**c.loss)))
  gen, disc = _cast(trees["ae"], full), _cast(trees["disc"], full)
  state = AEState(step=jnp.zeros((), jnp.int32), gen_params=gen, disc_params=disc["params"],
                  disc_stats=disc["batch_stats"], gen_opt=tx.init(gen),
                  disc_opt=tx.init(disc["params"]), rng=jax.random.PRNGKey(0))
  with _fixed_dropout([fx[f"mask{k}"] for k in range(5)]):
    new, scalars = step(state, _ae_batch(fx, full), _cast(lpips_lib.load_lpips_params(), full))
  grads, updates = _official(fx, "grad"), _official_updates(fx, sd)
  stats = {k: v for k, v in _official(fx, "after").items() if "running_" in k}
  gen_keys = lambda d: {k: v for k, v in d.items() if not k.startswith("disc.")}
  before_stats = {k: sd[k] for k in sd if k.startswith("disc.") and "running_" in k}
  disc_keys = lambda d: before_stats | {k: v for k, v in d.items() if k.startswith("disc.")}
  og = _official_tree(gen_keys(grads), "ae", arch["ae"])["params"]
  ou = _official_tree(gen_keys(updates), "ae", arch["ae"])["params"]
  odg = _official_tree(disc_keys(grads), "disc", arch["disc"])
  odu = _official_tree(disc_keys(updates), "disc", arch["disc"])
  ods = _official_tree(disc_keys(stats) | {k: v for k, v in disc_keys(grads).items()
                                           if "running_" not in k}, "disc", arch["disc"])
  errors = _loss_errors(scalars, fx, AE_LOSSES)
  upd = jax.tree.map(lambda a, b: a - b, new.gen_params, gen)
  for group in og:
    errors[f"grad/{group}"] = rel(new.gen_opt[0][group], og[group])
    errors[f"update/{group}"] = rel(upd[group], ou[group])
  errors["grad/disc"] = rel(new.disc_opt[0], odg["params"])
  errors["update/disc"] = rel(jax.tree.map(lambda a, b: a - b, new.disc_params, disc["params"]),
                              odu["params"])
  errors["stats/disc"] = rel(new.disc_stats, ods["batch_stats"])
  errors["dtype"] = str(jax.tree.leaves(new.gen_opt)[0].dtype)
  return errors


def dm_step_errors(dtype: str) -> dict[str, float]:
  sd, trees, arch = _fixture()
  fx = dict(np.load(FIXTURES / "dm_step.npz"))
  c = _config(dtype, arch)
  full = layers.full_precision(builders.compute_dtype(c))
  tx = _recording(optim.dm_optimizer(c.optim))
  step = jax.jit(functools.partial(
      dm_step.dm_train_step, unet=builders.unet(c), ae=builders.autoencoder(c), tx=tx,
      sched=builders.diffusion_schedule(c), ema_decay=c.optim.dm_ema))
  params = _cast(trees["dm"], full)
  state = DMState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                  opt=tx.init(params), rng=jax.random.PRNGKey(0))
  batch = {"inp": jnp.asarray(fx["inp"], full), "t": jnp.asarray(fx["t"]),
           "eps": jnp.asarray(fx["eps"], full)}
  new, scalars = step(state, batch, _cast(trees["ae"], full))
  og = _official_tree(_official(fx, "grad"), "dm", arch["dm"])["params"]
  ou = _official_tree(_official_updates(fx, sd), "dm", arch["dm"])["params"]
  errors = _loss_errors(scalars, fx, ("z_dm_loss",))
  errors["grad/z_dm"] = rel(new.opt[0], og)
  errors["update/z_dm"] = rel(jax.tree.map(lambda a, b: a - b, new.params, params), ou)
  # EMA: the change of the official z_dm_ema in the step, at two sampled tensors.
  for key, path, layout in (("out.2.weight", ("out_2", "kernel"), (2, 3, 1, 0)),
                            ("input_blocks.0.0.weight", ("input_blocks_0_0", "kernel"),
                             (2, 3, 1, 0))):
    change = fx[f"after/z_dm_ema.{key}"] - sd[f"z_dm_ema.{key}"].astype(np.float64)
    ours = new.ema_params[path[0]][path[1]] - params[path[0]][path[1]]
    errors[f"ema/{key}"] = rel(ours, np.transpose(change, layout))
  errors["dtype"] = str(jax.tree.leaves(new.opt)[0].dtype)
  return errors


def step_errors(stage: str, dtype: str) -> dict[str, float]:
  return ae_step_errors(dtype) if stage == "ae" else dm_step_errors(dtype)


if __name__ == "__main__":
  out = {stage: step_errors(stage, "float64") for stage in ("ae", "dm")}
  pathlib.Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
