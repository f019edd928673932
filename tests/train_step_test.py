"""Stage-1 and stage-2 train steps: sharded == single device, the adaptive-weight trick,
and that the autoencoder really learns a real photo."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import skimage.data

from configs import tiny
from infd_jax import sharding
from infd_jax.data import pipeline
from infd_jax.training import on_device
from infd_jax.rendering import coords
from infd_jax import builders
from infd_jax.training import ae_step, ae_task, dm_task, loop, optim
from infd_jax.training.dm_step import dm_train_step

FSDP_RULES = (("conv_out", "fsdp"), ("mlp_out", "fsdp"), ("codes", "fsdp"))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  c = tiny.get_config()
  c.data.data_dir = str(tmp_path_factory.mktemp("data"))
  return c


@pytest.fixture(scope="module")
def ae_batch(config):
  d = pipeline.stage_config(config.data, "ae")
  batch = next(iter(pipeline.make_ae_dataset(d, global_batch_size=8, seed=0)))
  return jax.device_get(jax.jit(on_device.ae_batch)(batch))


# Sharding-equality tests use SGD: Adam's first step is about lr * sign(g), which turns
# float-reordering noise in near-zero gradients into lr-sized parameter differences.
SGD = optax.sgd(1e-2)


def _ae_step(config, tx=None):
  ae, disc, lp = builders.autoencoder(config), builders.discriminator(config), builders.lpips(config)
  tx = tx or optim.ae_optimizer(config.optim)
  return functools.partial(ae_step.ae_train_step, ae=ae, disc=disc, lpips=lp, gen_tx=tx,
                           disc_tx=tx, loss=ae_step.AELoss(**config.loss))


def _with_sgd(init_fn, *fields):
  def init(key):
    state = init_fn(key)
    return state.replace(**{f: SGD.init(getattr(state, p)) for f, p in fields})
  return init


def _run_on(mesh, rules, init_fn, step, batch, consts, seed=0):
  _, shardings, init = loop.initial_state(init_fn, mesh, rules, seed)
  state = init()
  consts = jax.device_put(consts, sharding.replicated(mesh))
  out = jax.jit(step, out_shardings=(shardings, sharding.replicated(mesh)))(
      state, sharding.shard_batch(batch, mesh), *consts)
  return jax.device_get(out), out[0]


def _assert_trees_close(a, b, rtol, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def test_ae_step_on_4x2_fsdp_mesh_equals_single_device(config, ae_batch):
  from infd_jax.models.lpips import load_lpips_params
  step, lp = _ae_step(config, SGD), load_lpips_params()
  init = _with_sgd(ae_task.init_fn(config), ("gen_opt", "gen_params"), ("disc_opt", "disc_params"))
  one, _ = _run_on(sharding.make_mesh(1, 1, jax.devices()[:1]), FSDP_RULES, init, step,
                   ae_batch, (lp,))
  eight, sharded_state = _run_on(sharding.make_mesh(4, 2), FSDP_RULES, init, step, ae_batch, (lp,))
  # Parameters really are split over fsdp (most bytes), and so is Adam's state.
  assert sharding.fraction_sharded(sharded_state.gen_params) > 0.9
  adam, _, _ = loop.initial_state(ae_task.init_fn(config), sharding.make_mesh(4, 2), FSDP_RULES, 0)
  mu = jax.tree.leaves(adam.gen_opt[0].mu)
  sharded = sum(x.size for x in mu if not x.sharding.is_fully_replicated)
  assert sharded > 0.9 * sum(x.size for x in mu)
  # Tolerance: float32 reductions in a different order across 8 devices (observed
  # parameter differences after one step are below 3e-6).
  _assert_trees_close(one[1], eight[1], rtol=1e-4, atol=1e-5)
  _assert_trees_close(one[0].gen_params, eight[0].gen_params, rtol=1e-4, atol=1e-5)
  _assert_trees_close(one[0].disc_stats, eight[0].disc_stats, rtol=1e-4, atol=1e-6)


def test_adaptive_weight_matches_two_full_backward_passes(config, ae_batch):
  """The step's one-backward trick equals differentiating NLL and GAN loss separately."""
  from infd_jax.models.lpips import load_lpips_params
  ae, disc, lp = builders.autoencoder(config), builders.discriminator(config), builders.lpips(config)
  lp_params = load_lpips_params()
  state = ae_task.init_fn(config)(jax.random.PRNGKey(0))
  state = jax.tree.map(lambda x: getattr(x, "value", x), state,
                       is_leaf=lambda x: hasattr(x, "value"))
  batch = jax.tree.map(jnp.asarray, ae_batch)
  k_drop = jax.random.fold_in(state.rng, state.step)

  def losses(params):
    pred = ae.apply({"params": params}, batch["inp"], batch["coord"], batch["cell"]).pred
    nll = jnp.mean(jnp.abs(pred - batch["gt"])) + jnp.mean(
        lp.apply(lp_params, pred, batch["gt"], train=True, rngs={"dropout": k_drop}))
    logits, _ = disc.apply({"params": state.disc_params, "batch_stats": state.disc_stats}, pred,
                           train=True, mutable=["batch_stats"])
    return nll, -jnp.mean(logits)

  g_nll = jax.grad(lambda p: losses(p)[0])(state.gen_params)["renderer"]["conv_out"]["kernel"]
  g_gan = jax.grad(lambda p: losses(p)[1])(state.gen_params)["renderer"]["conv_out"]["kernel"]
  expected = np.clip(np.linalg.norm(g_nll) / (np.linalg.norm(g_gan) + 1e-4), 0, 1e4)
  _, metrics = jax.jit(_ae_step(config))(state, batch, lp_params)
  np.testing.assert_allclose(float(metrics["adaptive_g_w"]), expected, rtol=1e-4)


def test_dm_step_on_4x2_fsdp_mesh_equals_single_device(config):
  rng = np.random.default_rng(0)
  h, w, c = builders.latent_shape(config)
  batch = {"z": rng.normal(size=(8, h, w, c)).astype(np.float32)}
  step = functools.partial(dm_train_step, unet=builders.unet(config),
                           ae=builders.autoencoder(config), tx=SGD,
                           sched=builders.diffusion_schedule(config), ema_decay=0.9999)
  init = _with_sgd(dm_task.init_fn(config), ("opt", "params"))
  one, _ = _run_on(sharding.make_mesh(1, 1, jax.devices()[:1]), FSDP_RULES, init, step, batch,
                   (None,))
  eight, state = _run_on(sharding.make_mesh(4, 2), FSDP_RULES, init, step, batch, (None,))
  assert sharding.fraction_sharded(state.params) > 0.9
  np.testing.assert_allclose(one[1]["z_dm_loss"], eight[1]["z_dm_loss"], rtol=1e-5)
  _assert_trees_close(one[0].params, eight[0].params, rtol=1e-4, atol=1e-6)
  _assert_trees_close(one[0].ema_params, eight[0].ema_params, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_autoencoder_learns_a_real_photo(dtype):
  """200 steps on one photo at tiny width raise reconstruction PSNR by a clear margin,
  with float32 and with bfloat16 compute (float32 parameters)."""
  res = 32
  image = np.asarray(jax.image.resize(skimage.data.astronaut() / 127.5 - 1.0, (res, res, 3),
                                      "linear"), np.float32)
  coord, cell = coords.make_coord_cell_grid((res, res), batch=1)
  batch = {"inp": image[None], "gt": image[None], "coord": np.asarray(coord),
           "cell": np.asarray(cell)}
  c = tiny.get_config()
  c.train.compute_dtype = dtype
  c.optim.ae_lr = 1e-3
  c.loss.gan_start_step = 10_000  # the GAN only slows a 200-step fit; tested elsewhere
  step = jax.jit(_ae_step(c), donate_argnums=0)
  from infd_jax.models.lpips import load_lpips_params
  lp = load_lpips_params()
  state = jax.tree.map(lambda x: getattr(x, "value", x), ae_task.init_fn(c)(jax.random.PRNGKey(0)),
                       is_leaf=lambda x: hasattr(x, "value"))
  psnrs = []
  for _ in range(200):
    state, metrics = step(state, batch, lp)
    psnrs.append(float(metrics["psnr"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.gen_params))
  assert np.mean(psnrs[-10:]) > np.mean(psnrs[:5]) + 6.0, (psnrs[:5], psnrs[-10:])


def test_skip_nonfinite_keeps_the_state_and_advances_the_step(config):
  h, w, c = builders.latent_shape(config)
  z = np.zeros((2, h, w, c), np.float32)
  z[0, 0, 0, 0] = np.nan
  step = jax.jit(functools.partial(
      dm_train_step, unet=builders.unet(config), ae=builders.autoencoder(config), tx=SGD,
      sched=builders.diffusion_schedule(config), ema_decay=0.9, skip_nonfinite=True))
  state = _with_sgd(dm_task.init_fn(config), ("opt", "params"))(jax.random.PRNGKey(0))
  state = jax.tree.map(lambda x: getattr(x, "value", x), state,
                       is_leaf=lambda x: hasattr(x, "value"))
  new, metrics = step(state, {"z": z}, None)
  assert not np.isfinite(float(metrics["z_dm_loss"]))
  assert int(new.step) == int(state.step) + 1
  _assert_trees_close(new.params, state.params, rtol=0, atol=0)
  _assert_trees_close(new.ema_params, state.ema_params, rtol=0, atol=0)


def test_zero_gan_and_lpips_weights_skip_their_work_with_the_same_update(config, ae_batch):
  """loss.gan_g=0 / perc=0 (the demo) leave out the discriminator and LPIPS; the generator
  update equals the full step's with the GAN gated off and an LPIPS weight of zero."""
  from infd_jax.models.lpips import load_lpips_params
  lp = load_lpips_params()
  init = _with_sgd(ae_task.init_fn(config), ("gen_opt", "gen_params"),
                  ("disc_opt", "disc_params"))
  state = jax.tree.map(lambda x: getattr(x, "value", x), init(jax.random.PRNGKey(0)),
                       is_leaf=lambda x: hasattr(x, "value"))
  full, skipped = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  full.loss.update(gan_start_step=10**9, perc=1e-30)  # GAN gated at run time, LPIPS ~ 0
  skipped.loss.update(gan_g=0.0, perc=0.0)
  a, ma = jax.jit(_ae_step(full, SGD))(state, ae_batch, lp)
  b, mb = jax.jit(_ae_step(skipped, SGD))(state, ae_batch, lp)
  _assert_trees_close(a.gen_params, b.gen_params, rtol=1e-5, atol=1e-7)
  _assert_trees_close(state.disc_params, b.disc_params, rtol=0, atol=0)
  np.testing.assert_allclose(float(ma["l1_loss"]), float(mb["l1_loss"]), rtol=1e-6)
  assert float(mb["perc_loss"]) == 0.0 and float(mb["disc_loss"]) == 0.0


def test_without_quantizer_the_step_trains_the_continuous_latent(config, ae_batch):
  """ae.num_codes=0 (the official quantizer=False): no codebook parameters, z goes to the
  decoder unchanged, and one SGD step is exactly a gradient step on the L1 loss of
  encode -> decode -> render."""
  from infd_jax.models.lpips import load_lpips_params
  c = config.copy_and_resolve_references()
  c.ae.num_codes = 0
  c.loss.update(gan_g=0.0, perc=0.0)
  ae = builders.autoencoder(c)
  init = _with_sgd(ae_task.init_fn(c), ("gen_opt", "gen_params"), ("disc_opt", "disc_params"))
  state = jax.tree.map(lambda x: getattr(x, "value", x), init(jax.random.PRNGKey(0)),
                       is_leaf=lambda x: hasattr(x, "value"))
  assert "quantizer" not in state.gen_params and "encoder" in state.gen_params
  new, m = jax.jit(_ae_step(c, SGD))(state, ae_batch, load_lpips_params())
  assert float(m["quant_loss"]) == 0.0 and float(m["codebook_usage"]) == 1.0

  def l1(p):
    phi = ae.apply({"params": p}, ae.apply({"params": p}, ae_batch["inp"], method="encode"),
                   method="decode")
    pred = ae.apply({"params": p}, phi, ae_batch["coord"], ae_batch["cell"], method="render")
    return jnp.mean(jnp.abs(pred - ae_batch["gt"]))

  grads = jax.jit(jax.grad(l1))(state.gen_params)
  want = jax.tree.map(lambda p, g: p - 1e-2 * g, state.gen_params, grads)
  _assert_trees_close(new.gen_params, want, rtol=1e-4, atol=1e-6)
