"""Stage-1 training step (REFERENCE.md 4.2-4.6) as one pure, jit-able function.

One call is one official iteration: the generator step (L1 + LPIPS + VQ + 0.75 x
adaptive weight x hinge generator loss) updates encoder, quantizer, decoder and
renderer; then the discriminator step re-renders the fake with the *updated*
generator and takes the hinge loss on separate real and fake passes.

The adaptive weight needs the gradients of the NLL and of the GAN loss at the
renderer's last conv kernel. Instead of two extra backward passes through the
generator, the step differentiates the losses with respect to the prediction,
maps those two cotangents through the (linear) last conv alone, and runs the
generator backward pass once with the combined cotangent.

Losses, gradients and updates are in the autoencoder's full precision
(`layers.full_precision`): float32, or float64 when the compute dtype is float64
(JAX x64 mode), with parameters and optimizer state in float64 too.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from infd_jax.evaluation import metrics as metrics_lib
from infd_jax.models import layers
from infd_jax.training.state import AEState, select, skip_unless_finite

PyTree = Any
LAST_LAYER = ("renderer", "conv_out", "kernel")


@dataclasses.dataclass(frozen=True)
class AELoss:
  """Loss weights and switches (config.loss)."""
  l1: float = 1.0
  perc: float = 1.0
  quant: float = 1.0
  gan_g: float = 0.75
  adaptive_gan_weight: bool = True
  gan_start_step: int = 0
  lpips_train_dropout: bool = True


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(g_nll: jax.Array, g_gan: jax.Array) -> jax.Array:
  """clamp(||g_nll|| / (||g_gan|| + 1e-4), 0, 1e4), without gradient."""
  w = jnp.linalg.norm(g_nll.ravel()) / (jnp.linalg.norm(g_gan.ravel()) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4))


def _get(tree: PyTree, path: tuple[str, ...]) -> jax.Array:
  for key in path:
    tree = tree[key]
  return tree


def _generator_features(ae: nn.Module, params: PyTree, batch: dict[str, jax.Array]):
  """Encoder -> quantizer -> decoder -> renderer up to (not including) its last conv.

  Returns ((features, quant_loss), code indices) for `jax.vjp(..., has_aux=True)`.
  """
  def forward(m):
    q = m.quantize(m.encode(batch["inp"]))
    h = m.render_features(m.decode(q.z_q), batch["coord"], batch["cell"])
    return (h, q.loss), q.indices
  return nn.apply(forward, ae)({"params": params})


def reconstruct(ae: nn.Module, params: PyTree, batch: dict[str, jax.Array]) -> jax.Array:
  """Full forward: the rendered prediction [B, P, P, 3] in full precision."""
  out = ae.apply({"params": params}, batch["inp"], batch["coord"], batch["cell"])
  return out.pred.astype(layers.full_precision(ae.dtype))


def ae_train_step(state: AEState, batch: dict[str, jax.Array], lpips_params: PyTree, *,
                  ae: nn.Module, disc: nn.Module, lpips: nn.Module,
                  gen_tx: optax.GradientTransformation, disc_tx: optax.GradientTransformation,
                  loss: AELoss, skip_nonfinite: bool = False) -> tuple[AEState, dict[str, jax.Array]]:
  """One generator + discriminator iteration on a global batch.

  Args:
    state: the current `AEState`.
    batch: `inp` [B,R,R,3], `gt` [B,P,P,3], `coord`/`cell` [B,P,P,2].
    lpips_params: frozen LPIPS weights.
    ae, disc, lpips: the modules (bound by `functools.partial` before jit).
    gen_tx, disc_tx: optimizers.
    loss: weights and switches.
    skip_nonfinite: if True, a step with a non-finite loss leaves the state unchanged.

  Returns:
    (new state, scalar metrics).
  """
  full = layers.full_precision(ae.dtype)
  gt = batch["gt"].astype(full)
  k_drop = jax.random.fold_in(state.rng, state.step)
  gan_on = (state.step >= loss.gan_start_step).astype(full)

  # Generator forward, split before the last conv (see module docstring).
  (h, quant_loss), gen_vjp, indices = jax.vjp(
      lambda p: _generator_features(ae, p, batch), state.gen_params, has_aux=True)
  pred, head_vjp = jax.vjp(
      lambda p, x: ae.apply({"params": p}, x, method="render_head").astype(full),
      state.gen_params, h)

  def nll_fn(pred):
    l1 = jnp.mean(jnp.abs(pred - gt))
    if not loss.perc:  # weight 0 (a demo setting): LPIPS is not computed at all
      return loss.l1 * l1, (l1, jnp.zeros((), full))
    perc = jnp.mean(lpips.apply(lpips_params, pred, gt, train=loss.lpips_train_dropout,
                                rngs={"dropout": k_drop}))
    return loss.l1 * l1 + loss.perc * perc, (l1, perc)

  def gan_fn(pred):
    logits, upd = disc.apply({"params": state.disc_params, "batch_stats": state.disc_stats},
                             pred, train=True, mutable=["batch_stats"])
    return -jnp.mean(logits.astype(full)), upd["batch_stats"]

  (nll, (l1, perc)), g_pred_nll = jax.value_and_grad(nll_fn, has_aux=True)(pred)
  gp_nll, gh_nll = head_vjp(g_pred_nll)
  if not loss.gan_g:  # GAN weight 0 (a demo setting): no discriminator work at all
    return _without_gan(state, loss, gen_tx, gp_nll, gh_nll, gen_vjp, h, quant_loss, nll, l1,
                        perc, pred, gt, indices, skip_nonfinite)
  (gan_g, stats), g_pred_gan = jax.value_and_grad(gan_fn, has_aux=True)(pred)
  gp_gan, gh_gan = head_vjp(g_pred_gan)
  adaptive = (adaptive_weight(_get(gp_nll, LAST_LAYER), _get(gp_gan, LAST_LAYER))
              if loss.adaptive_gan_weight else jnp.ones((), full))
  w = loss.gan_g * adaptive * gan_on
  (g_features,) = gen_vjp(((gh_nll + w * gh_gan).astype(h.dtype),
                           jnp.asarray(loss.quant, quant_loss.dtype)))
  grads = jax.tree.map(lambda a, b, c: a + b + w * c, g_features, gp_nll, gp_gan)
  total = loss.quant * quant_loss + nll + w * gan_g
  updates, gen_opt = gen_tx.update(grads, state.gen_opt, state.gen_params)
  gen_params = optax.apply_updates(state.gen_params, updates)

  # Discriminator on the fake re-rendered by the updated generator.
  fake = jax.lax.stop_gradient(reconstruct(ae, gen_params, batch))

  def d_loss_fn(dp):
    real_logits, upd = disc.apply({"params": dp, "batch_stats": stats}, gt, train=True,
                                  mutable=["batch_stats"])
    fake_logits, upd = disc.apply({"params": dp, "batch_stats": upd["batch_stats"]}, fake,
                                  train=True, mutable=["batch_stats"])
    real_logits, fake_logits = real_logits.astype(full), fake_logits.astype(full)
    return hinge_d_loss(real_logits, fake_logits), (upd["batch_stats"], jnp.mean(real_logits),
                                                     jnp.mean(fake_logits))

  (d_loss, (d_stats, logit_real, logit_fake)), d_grads = jax.value_and_grad(
      d_loss_fn, has_aux=True)(state.disc_params)
  d_updates, d_opt = disc_tx.update(d_grads, state.disc_opt, state.disc_params)
  d_params = optax.apply_updates(state.disc_params, d_updates)
  on = gan_on > 0
  new_state = state.replace(
      step=state.step + 1, gen_params=gen_params, gen_opt=gen_opt,
      disc_params=select(on, d_params, state.disc_params),
      disc_opt=select(on, d_opt, state.disc_opt),
      disc_stats=select(on, d_stats, state.disc_stats))  # without GAN no disc pass runs
  if skip_nonfinite:
    finite = jnp.isfinite(total) & jnp.isfinite(d_loss)
    new_state = skip_unless_finite(finite, new_state, state)

  scalars = _scalars(state, indices, pred, gt, loss=total, quant_loss=quant_loss, l1_loss=l1,
                     perc_loss=perc, gan_g_loss=gan_g, adaptive_g_w=adaptive, disc_loss=d_loss,
                     disc_logits_real=logit_real, disc_logits_fake=logit_fake)
  return new_state, scalars


def _scalars(state: AEState, indices, pred, gt, **values) -> dict[str, jax.Array]:
  quantizer = state.gen_params.get("quantizer")  # absent with num_codes 0: usage reads 1 code
  num_codes = quantizer["embedding"].shape[0] if quantizer else 1
  usage = metrics_lib.codebook_usage(indices, num_codes)
  return values | dict(psnr=jnp.mean(metrics_lib.psnr(pred, gt)),
                       codebook_perplexity=usage["perplexity"],
                       codebook_usage=usage["fraction_used"])


def _without_gan(state, loss, gen_tx, gp_nll, gh_nll, gen_vjp, h, quant_loss, nll, l1, perc, pred,
                 gt, indices, skip_nonfinite):
  """The generator update of `ae_train_step` when loss.gan_g == 0; the discriminator stays."""
  (g_features,) = gen_vjp((gh_nll.astype(h.dtype), jnp.asarray(loss.quant, quant_loss.dtype)))
  grads = jax.tree.map(lambda a, b: a + b, g_features, gp_nll)
  total = loss.quant * quant_loss + nll
  updates, gen_opt = gen_tx.update(grads, state.gen_opt, state.gen_params)
  new_state = state.replace(step=state.step + 1, gen_opt=gen_opt,
                            gen_params=optax.apply_updates(state.gen_params, updates))
  if skip_nonfinite:
    new_state = skip_unless_finite(jnp.isfinite(total), new_state, state)
  zero = jnp.zeros((), nll.dtype)
  return new_state, _scalars(state, indices, pred, gt, loss=total, quant_loss=quant_loss,
                             l1_loss=l1, perc_loss=perc, gan_g_loss=zero, adaptive_g_w=zero,
                             disc_loss=zero, disc_logits_real=zero, disc_logits_fake=zero)
