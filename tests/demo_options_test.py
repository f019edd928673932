"""Demo-only options, off (official) by default: diffusion.latent_scale (LDM's scale_factor:
train on s * z, divide samples by s), cosine learning-rate decay, stage-1 input windows
(data.inp_crop) and GroupNorm groups (ae/dm.norm_groups)."""

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from PIL import Image

from infd_jax import builders
from infd_jax import model as model_lib
from configs import tiny
from infd_jax.data import latents as latents_lib
from infd_jax.data import transforms
from infd_jax.diffusion import schedules
from infd_jax.models import layers
from infd_jax.training import dm_step, optim
from infd_jax.training.state import DMState

SCHED = schedules.linear_schedule()
DATA = np.random.default_rng(0).normal(0.0, 0.3, size=(3, 4, 4, 3))  # "training latents", std 0.3


class ExactDenoiser(nn.Module):
  """The exact eps-prediction of the empirical distribution of `data` (a closed form)."""
  data: np.ndarray

  @nn.compact
  def __call__(self, x, t):
    self.param("unused", nn.initializers.zeros, (1,))
    ab = jnp.asarray(SCHED.alphas_cumprod, jnp.float32)[t][:, None, None, None, None]
    data = jnp.asarray(self.data, jnp.float32)[None]
    d2 = jnp.sum((x[:, None] - jnp.sqrt(ab) * data) ** 2, axis=(2, 3, 4))
    w = jax.nn.softmax(-d2 / (2.0 * (1.0 - ab[:, :, 0, 0, 0])), axis=1)
    x0 = jnp.einsum("bn,nhwc->bhwc", w, data[0])
    return (x - jnp.sqrt(ab[:, 0]) * x0) / jnp.sqrt(1.0 - ab[:, 0])


class Identity(nn.Module):
  """eps_hat = x_t (one unused parameter, so the optimizer has something to update)."""

  @nn.compact
  def __call__(self, x, t):
    del t
    return x + 0.0 * self.param("unused", nn.initializers.zeros, (1,))


def _config(scale: float):
  c = tiny.get_config()
  c.diffusion.update(sample_steps=20, eta=1.0, latent_scale=scale)
  return c


def test_sampled_latents_come_back_at_the_data_scale():
  """A UNet trained on s * z (here exact) samples s * z; sample_latents returns z."""
  key = jax.random.PRNGKey(0)
  for scale in (1.0, 1.0 / 0.3):
    module = ExactDenoiser(DATA * scale)
    z = np.asarray(model_lib.sample_latents(_config(scale), module, {"unused": jnp.zeros(1)},
                                            key, (4, *DATA.shape[1:])), np.float64)
    dist = np.sqrt(((z[:, None] - DATA[None]) ** 2).mean(axis=(2, 3, 4))).min(axis=1)
    assert np.all(dist < 0.02 * DATA.std()), (scale, dist)


def test_train_step_learns_the_scaled_latents():
  """The loss equals the float64 eps-MSE of an identity model on x_t of s * z."""
  scale, z = 2.5, DATA.astype(np.float32)
  params = {"unused": jnp.zeros(1)}
  tx = optax.adamw(1e-3)
  state = DMState(step=jnp.int32(3), params=params, ema_params=params, opt=tx.init(params),
                  rng=jax.random.PRNGKey(7))
  _, out = dm_step.dm_train_step(state, {"z": jnp.asarray(z)}, None, unet=Identity(), ae=None,
                                 tx=tx, sched=SCHED, ema_decay=0.9, latent_scale=scale)
  # The step's documented draws: t ~ U{0..T-1} and eps ~ N(0, I) from fold_in(rng, step).
  k_t, k_eps = jax.random.split(jax.random.fold_in(state.rng, 3))
  t = np.asarray(jax.random.randint(k_t, (len(z),), 0, SCHED.num_steps))
  eps = np.asarray(jax.random.normal(k_eps, z.shape), np.float64)
  ab = SCHED.alphas_cumprod[t][:, None, None, None]
  x_t = np.sqrt(ab) * scale * z.astype(np.float64) + np.sqrt(1.0 - ab) * eps
  np.testing.assert_allclose(float(out["z_dm_loss"]), np.mean((eps - x_t) ** 2), rtol=1e-5)


def test_auto_scale_is_one_over_the_std_of_every_cached_latent(tmp_path):
  """Two writers' shares over several files (an uneven split), against np.std in float64."""
  rows = np.random.default_rng(1).normal(0.2, 0.27, size=(7, 4, 4, 3)).astype(np.float32)
  directory = epath.Path(tmp_path)
  for p in (0, 1):
    latents_lib.write_share(directory, iter([rows[p::2]]), process_index=p, rows_per_file=2)
  latents_lib.write_meta(directory, num_records=7, process_count=2, rows_per_file=2)
  np.testing.assert_allclose(latents_lib.latent_std(directory), np.std(rows.astype(np.float64)),
                             rtol=1e-6)


def test_cosine_decay_reaches_zero_and_constant_is_the_default():
  """Adam on a constant gradient moves each step by exactly the step's rate (m/sqrt(v) = 1)."""
  c = tiny.get_config()
  assert not c.optim.cosine_decay
  n, lr = 8, 0.01
  expected = {False: np.full(n + 2, lr),
              True: lr * 0.5 * (1 + np.cos(np.pi * np.minimum(np.arange(n + 2), n) / n))}
  for decay, rates in expected.items():
    c.optim.update(ae_lr=lr, dm_lr=lr, dm_weight_decay=0.0, cosine_decay=decay)
    for tx in (optim.ae_optimizer(c.optim, n), optim.dm_optimizer(c.optim, n)):
      p, g = jnp.zeros(1), jnp.full(1, 0.3)
      opt, moves = tx.init(p), []
      for _ in range(n + 2):
        u, opt = tx.update(g, opt, p)
        moves.append(-float(u[0]))
      np.testing.assert_allclose(moves, rates, rtol=1e-5, atol=1e-9)


def test_inp_crop_trains_on_random_windows_of_the_photo():
  """Pixels that encode their own (row, col) reveal the window; inp is that window resized."""
  s, p = 200, 32
  rows, cols = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
  img = Image.fromarray(np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8))
  png = io.BytesIO()
  img.save(png, format="PNG")
  sides = {}
  for crop in (0.0, 0.5):
    # p_max = 1 and a large gt_res_max: gt is an exact P x P crop of the window at its own size.
    t = transforms.AeTransform(inp_res=16, patch=p, gt_res_min=p, gt_res_max=1000, p_max=1.0,
                               inp_crop=crop)
    for seed in range(30):
      out = t({"image": png.getvalue()}, np.random.default_rng(seed))
      side, ii, jj = (int(v) for v in out["crop"])
      top, left = int(out["gt"][0, 0, 0]) - ii, int(out["gt"][0, 0, 1]) - jj
      assert 0 <= top <= s - side and 0 <= left <= s - side
      np.testing.assert_array_equal(out["gt"][..., 0], rows[top + ii:top + ii + p, :p])
      np.testing.assert_array_equal(out["gt"][..., 1],
                                    cols[:p, left + jj:left + jj + p])
      ref = img.crop((left, top, left + side, top + side)).resize((16, 16),
                                                                  Image.Resampling.LANCZOS)
      np.testing.assert_array_equal(out["inp"], np.asarray(ref))
      sides.setdefault(crop, []).append(side)
  assert set(sides[0.0]) == {s}  # off: the whole image, as the official pipeline
  assert 100 <= min(sides[0.5]) < 125 and max(sides[0.5]) > 175


def _group_norm_groups(module: nn.Module, *inputs) -> list[int]:
  """num_groups of every GroupNorm that runs in module.init(*inputs)."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.GroupNorm) and context.method_name == "__call__":
      seen.append(context.module.num_groups)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))
  return seen


def test_norm_groups_reaches_every_group_norm_and_32_stays_the_default():
  c = tiny.get_config()
  assert (c.ae.norm_groups, c.dm.norm_groups) == (32, 32)
  ae_in = (jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 8, 8, 2)))
  dm_in = (jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32))
  counts = {}
  for groups in (32, 8):
    c.ae.norm_groups = c.dm.norm_groups = groups
    for name, module, inputs in (("ae", builders.autoencoder(c), ae_in),
                                 ("dm", builders.unet(c), dm_in)):
      seen = _group_norm_groups(module, *inputs)
      assert set(seen) == {groups}, (name, groups, seen)
      counts.setdefault(name, set()).add(len(seen))
  assert all(len(n) == 1 for n in counts.values()), counts  # the same norms, other groups


def test_group_norm_with_8_groups_matches_numpy():
  x = np.random.default_rng(2).normal(1.0, 2.0, size=(2, 5, 6, 32))
  norm = layers.group_norm(1e-6, num_groups=8)
  params = norm.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 6, 32)))
  got = np.asarray(norm.apply(params, jnp.asarray(x, jnp.float32)))
  g = x.reshape(2, 5, 6, 8, 4)  # contiguous groups of 4 channels
  ref = ((g - g.mean(axis=(1, 2, 4), keepdims=True))
         / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-6)).reshape(x.shape)
  np.testing.assert_allclose(got, ref, atol=2e-5)


class PullTo:
  """A condition objective: w * squared distance of the predicted latent z0 to `target`."""

  def __init__(self, target: np.ndarray, weight: float):
    self.target, self.weight = jnp.asarray(target, jnp.float32), weight

  def _sq(self, z):
    return jnp.sum((z - self.target) ** 2, axis=(1, 2, 3))

  def weighted(self, ae_params, clip_params, z0, targets):
    del ae_params, clip_params, targets
    sq = self._sq(z0)
    return self.weight * jnp.sum(sq), sq[None]

  def losses(self, ae_params, clip_params, z, targets):
    del ae_params, clip_params, targets
    return self._sq(z)[None]


def test_guided_latents_condition_the_unscaled_latent():
  """With latent_scale s the UNet samples s * z; conditions are stated on z: guidance
  towards each training latent in turn ends at that latent, and the returned losses are
  the float64 squared distances of the returned z."""
  from infd_jax.guidance import sampler, task  # pylint: disable=g-import-not-at-top
  scale = 1.0 / 0.3
  module = ExactDenoiser(DATA * scale)
  key = jax.random.PRNGKey(1)
  shape = (1, *DATA.shape[1:])
  ends = []
  for k in range(len(DATA)):
    config = _config(scale)
    z, losses = task.guided_latents_of(
        config, builders.eps_model(config, module), {"unused": jnp.zeros(1)},
        builders.diffusion_schedule(config), builders.latent_scale(config), None,
        PullTo(DATA[k], 0.05), sampler.Refine(), (None, None, None, None), key, shape)
    z = np.asarray(z, np.float64)
    ends.append(int(np.argmin(((z - DATA) ** 2).sum(axis=(1, 2, 3)))))
    np.testing.assert_allclose(np.asarray(losses)[0], ((z - DATA[k]) ** 2).sum(axis=(1, 2, 3)),
                               rtol=1e-4, atol=1e-6)
  assert ends == list(range(len(DATA)))
