"""Stage-1 and stage-2 train steps: sharded == single device, the adaptive-weight trick,
and that the autoencoder really learns a real photo."""

import functools

import flax.linen as nn
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


@pytest.fixture(scope="module")
def lpips_params():
  from infd_jax.models.lpips import load_lpips_params
  return load_lpips_params()


# Sharding-equality tests use SGD: Adam's first step is about lr * sign(g), which turns
# float-reordering noise in near-zero gradients into lr-sized parameter differences.
SGD = optax.sgd(1e-2)


def _ae_step(config, tx=None):
  ae, disc, lp = builders.autoencoder(config), builders.discriminator(config), builders.lpips(config)
  tx = tx or optim.ae_optimizer(config.optim)
  return functools.partial(ae_step.ae_train_step, ae=ae, disc=disc, lpips=lp, gen_tx=tx,
                           disc_tx=tx, loss=ae_step.AELoss(**config.loss))


def _sharded_init(init_fn, mesh):
  """The seed-0 state, initialised directly into its FSDP shardings (the training loop's way)."""
  _, _, init = loop.initial_state(init_fn, mesh, FSDP_RULES, 0)
  return init()


def _with_sgd(state, *fields):
  return state.replace(**{f: SGD.init(getattr(state, p)) for f, p in fields})


def _run_on(mesh, state, step, batch, consts):
  """One jitted `step` on `mesh`, from and to the shardings of `state`'s arrays."""
  shardings = jax.tree.map(lambda x: x.sharding, state)
  consts = jax.device_put(consts, sharding.replicated(mesh))
  out = jax.jit(step, out_shardings=(shardings, sharding.replicated(mesh)))(
      state, sharding.shard_batch(batch, mesh), *consts)
  return jax.device_get(out), out[0]


def _on_one_device(state):
  """A one-device mesh and `state` copied there, unsharded."""
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  return mesh, jax.device_put(jax.device_get(state), sharding.replicated(mesh))


def _assert_trees_close(a, b, rtol, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def ae_adam_state(config):
  """The stage-1 state with Adam, initialised once into its 4x2 FSDP shardings."""
  return _sharded_init(ae_task.init_fn(config), sharding.make_mesh(4, 2))


@pytest.fixture(scope="module")
def ae_sgd_steps(config, ae_batch, lpips_params, ae_adam_state):
  """One SGD stage-1 step from the same state on the 4x2 FSDP mesh and on one device:
  (initial host state, single-device (state, metrics), 8-device (state, metrics), 8-device
  state as sharded arrays)."""
  state = _with_sgd(ae_adam_state, ("gen_opt", "gen_params"), ("disc_opt", "disc_params"))
  step = _ae_step(config, SGD)
  eight, sharded = _run_on(sharding.make_mesh(4, 2), state, step, ae_batch, (lpips_params,))
  one, _ = _run_on(*_on_one_device(state), step, ae_batch, (lpips_params,))
  return jax.device_get(state), one, eight, sharded


def test_initialisation_into_the_4x2_fsdp_shardings_equals_one_device(config, ae_adam_state):
  """The training loop's initialiser gives the same state, bit for bit, straight into its
  FSDP shardings as on one device (the sharding tests below start from that state)."""
  _, _, init = loop.initial_state(ae_task.init_fn(config),
                                  sharding.make_mesh(1, 1, jax.devices()[:1]), FSDP_RULES, 0)
  one, eight = jax.device_get(init()), jax.device_get(ae_adam_state)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(eight)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_ae_step_on_4x2_fsdp_mesh_equals_single_device(ae_adam_state, ae_sgd_steps):
  _, one, eight, sharded_state = ae_sgd_steps
  # Parameters really are split over fsdp (most bytes), and so is Adam's state.
  assert sharding.fraction_sharded(sharded_state.gen_params) > 0.9
  mu = jax.tree.leaves(ae_adam_state.gen_opt[0].mu)
  sharded = sum(x.size for x in mu if not x.sharding.is_fully_replicated)
  assert sharded > 0.9 * sum(x.size for x in mu)
  # Tolerance: float32 reductions in a different order across 8 devices (observed
  # parameter differences after one step are below 3e-6).
  _assert_trees_close(one[1], eight[1], rtol=1e-4, atol=1e-5)
  _assert_trees_close(one[0].gen_params, eight[0].gen_params, rtol=1e-4, atol=1e-5)
  _assert_trees_close(one[0].disc_stats, eight[0].disc_stats, rtol=1e-4, atol=1e-6)


def test_adaptive_weight_matches_two_full_backward_passes(config, ae_batch, lpips_params,
                                                         ae_sgd_steps):
  """The step's one-backward trick equals differentiating NLL and GAN loss separately
  (the step's weight is read before its optimizer update, so the SGD step's is Adam's)."""
  ae, disc, lp = builders.autoencoder(config), builders.discriminator(config), builders.lpips(config)
  state, (_, metrics), _, _ = ae_sgd_steps
  k_drop = jax.random.fold_in(state.rng, state.step)

  def losses(params, disc_vars, lp_params, batch):
    pred = ae.apply({"params": params}, batch["inp"], batch["coord"], batch["cell"]).pred
    nll = jnp.mean(jnp.abs(pred - batch["gt"])) + jnp.mean(
        lp.apply(lp_params, pred, batch["gt"], train=True, rngs={"dropout": k_drop}))
    logits, _ = disc.apply(disc_vars, pred, train=True, mutable=["batch_stats"])
    return nll, -jnp.mean(logits)

  @jax.jit
  def last_layer_grads(*args):
    kernel = lambda i: jax.grad(lambda p: losses(p, *args[1:])[i])(args[0])[
        "renderer"]["conv_out"]["kernel"]
    return kernel(0), kernel(1)

  g_nll, g_gan = last_layer_grads(
      state.gen_params, {"params": state.disc_params, "batch_stats": state.disc_stats},
      lpips_params, ae_batch)
  expected = np.clip(np.linalg.norm(g_nll) / (np.linalg.norm(g_gan) + 1e-4), 0, 1e4)
  np.testing.assert_allclose(float(metrics["adaptive_g_w"]), expected, rtol=1e-4)


@pytest.fixture(scope="module")
def dm_sgd_state(config):
  """The stage-2 state with SGD, initialised once into its 4x2 FSDP shardings."""
  state = _sharded_init(dm_task.init_fn(config), sharding.make_mesh(4, 2))
  return _with_sgd(state, ("opt", "params"))


def test_dm_step_on_4x2_fsdp_mesh_equals_single_device(config, dm_sgd_state):
  rng = np.random.default_rng(0)
  h, w, c = builders.latent_shape(config)
  batch = {"z": rng.normal(size=(8, h, w, c)).astype(np.float32)}
  step = functools.partial(dm_train_step, unet=builders.unet(config),
                           ae=builders.autoencoder(config), tx=SGD,
                           sched=builders.diffusion_schedule(config), ema_decay=0.9999)
  eight, state = _run_on(sharding.make_mesh(4, 2), dm_sgd_state, step, batch, (None,))
  one, _ = _run_on(*_on_one_device(dm_sgd_state), step, batch, (None,))
  assert sharding.fraction_sharded(state.params) > 0.9
  np.testing.assert_allclose(one[1]["z_dm_loss"], eight[1]["z_dm_loss"], rtol=1e-5)
  _assert_trees_close(one[0].params, eight[0].params, rtol=1e-4, atol=1e-6)
  _assert_trees_close(one[0].ema_params, eight[0].ema_params, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_autoencoder_learns_a_real_photo(dtype, lpips_params, ae_adam_state):
  """100 steps on one photo at tiny width raise reconstruction PSNR by a clear margin,
  with float32 and with bfloat16 compute (float32 parameters; the initial state does not
  depend on the compute dtype or the learning rate)."""
  res = 32
  image = np.asarray(jax.image.resize(skimage.data.astronaut() / 127.5 - 1.0, (res, res, 3),
                                      "linear"), np.float32)
  coord, cell = coords.make_coord_cell_grid((res, res), batch=1)
  batch = {"inp": image[None], "gt": image[None], "coord": np.asarray(coord),
           "cell": np.asarray(cell)}
  c = tiny.get_config()
  c.train.compute_dtype = dtype
  c.optim.ae_lr = 1e-3
  c.loss.gan_start_step = 10_000  # the GAN only slows the fit; tested elsewhere
  step = jax.jit(_ae_step(c), donate_argnums=0)
  state = jax.device_put(jax.device_get(ae_adam_state), jax.devices()[0])
  psnrs = []
  for _ in range(100):
    state, metrics = step(state, batch, lpips_params)
    psnrs.append(float(metrics["psnr"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.gen_params))
  assert np.mean(psnrs[-10:]) > np.mean(psnrs[:5]) + 6.0, (psnrs[:5], psnrs[-10:])


def test_skip_nonfinite_keeps_the_state_and_advances_the_step(config, dm_sgd_state):
  h, w, c = builders.latent_shape(config)
  z = np.zeros((2, h, w, c), np.float32)
  z[0, 0, 0, 0] = np.nan
  step = jax.jit(functools.partial(
      dm_train_step, unet=builders.unet(config), ae=builders.autoencoder(config), tx=SGD,
      sched=builders.diffusion_schedule(config), ema_decay=0.9, skip_nonfinite=True))
  state = jax.device_get(dm_sgd_state)
  new, metrics = step(state, {"z": z}, None)
  assert not np.isfinite(float(metrics["z_dm_loss"]))
  assert int(new.step) == int(state.step) + 1
  _assert_trees_close(new.params, state.params, rtol=0, atol=0)
  _assert_trees_close(new.ema_params, state.ema_params, rtol=0, atol=0)


def test_zero_gan_and_lpips_weights_skip_their_work_with_the_same_update(
    config, ae_batch, lpips_params, ae_sgd_steps):
  """loss.gan_g=0 / perc=0 (the demo) leave out the discriminator and LPIPS; the generator
  update equals the full step's with the GAN gated off and an LPIPS weight of zero."""
  state = ae_sgd_steps[0]
  full, skipped = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  full.loss.update(gan_start_step=10**9, perc=1e-30)  # GAN gated at run time, LPIPS ~ 0
  skipped.loss.update(gan_g=0.0, perc=0.0)
  a, ma = jax.jit(_ae_step(full, SGD))(state, ae_batch, lpips_params)
  b, mb = jax.jit(_ae_step(skipped, SGD))(state, ae_batch, lpips_params)
  _assert_trees_close(a.gen_params, b.gen_params, rtol=1e-5, atol=1e-7)
  _assert_trees_close(state.disc_params, b.disc_params, rtol=0, atol=0)
  np.testing.assert_allclose(float(ma["l1_loss"]), float(mb["l1_loss"]), rtol=1e-6)
  assert float(mb["perc_loss"]) == 0.0 and float(mb["disc_loss"]) == 0.0


def test_without_quantizer_the_step_trains_the_continuous_latent(config, ae_batch, lpips_params,
                                                                 ae_sgd_steps):
  """ae.num_codes=0 (the official quantizer=False): no codebook parameters, z goes to the
  decoder unchanged, and one SGD step is exactly a gradient step on the L1 loss of
  encode -> decode -> render."""
  c = config.copy_and_resolve_references()
  c.ae.num_codes = 0
  c.loss.update(gan_g=0.0, perc=0.0)
  ae = builders.autoencoder(c)
  layout = jax.eval_shape(ae_task.init_fn(c), jax.random.PRNGKey(0)).gen_params
  assert "quantizer" not in layout and "encoder" in layout
  # The shared state's parameters without the codebook fit that layout exactly.
  state = ae_sgd_steps[0]
  state = state.replace(gen_params={k: v for k, v in state.gen_params.items() if k != "quantizer"})
  shape = lambda x: (x.shape, x.dtype)
  assert jax.tree.map(shape, nn.unbox(layout)) == jax.tree.map(shape, state.gen_params)
  new, m = jax.jit(_ae_step(c, SGD))(state, ae_batch, lpips_params)
  assert float(m["quant_loss"]) == 0.0 and float(m["codebook_usage"]) == 1.0

  def l1(p):
    phi = ae.apply({"params": p}, ae.apply({"params": p}, ae_batch["inp"], method="encode"),
                   method="decode")
    pred = ae.apply({"params": p}, phi, ae_batch["coord"], ae_batch["cell"], method="render")
    return jnp.mean(jnp.abs(pred - ae_batch["gt"]))

  grads = jax.jit(jax.grad(l1))(state.gen_params)
  want = jax.tree.map(lambda p, g: p - 1e-2 * g, state.gen_params, grads)
  _assert_trees_close(new.gen_params, want, rtol=1e-4, atol=1e-6)
