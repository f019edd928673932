"""`Model`: a trained INFD model on a mesh, the one way trained weights become latents and images.

Generation, conditioning, evaluation, the contact sheet, the AOT check, the
benchmarks and the training visualisers all go through it (`inference.load`
and `inference.load_model` build it from checkpoints):

- sampling: sample i's noise depends only on (seed, i), so the batch layout and
  the number of hosts do not change it; guided sampling (`condition`) likewise;
- decoding: latents (quantized if `sample.quantize`) -> phi, batch-sharded;
- rendering with the official tiling (tile 256, context 8): phi stays
  batch-sharded and each device renders the images it holds, except that on
  one process fewer images than devices are rendered with phi replicated and
  each renderer call's tiles spread over all devices. Render calls never wait
  on another process. `render_owned` gives each process the images it holds
  (each image is held by exactly one process); `render` gathers them.
"""

import copy
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from infd_jax import builders, checks, sharding, text_to_image
from infd_jax.diffusion import samplers
from infd_jax.guidance import task as task_lib
from infd_jax.rendering import tiles, tiling

PyTree = Any


def sample_latents(config: ml_collections.ConfigDict, unet: nn.Module, dm_params: PyTree,
                   key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The one call site of the latent sampler: key -> latents [*shape] with
  `config.sample.sampler` (DDIM by default, REFERENCE.md 6.3), divided by
  `diffusion.latent_scale` (the scale the UNet was trained at)."""
  scale = builders.latent_scale(config)
  z = samplers.sample(apply_fn=builders.eps_model(config, unet), params=dm_params, key=key,
                      shape=shape, sched=builders.diffusion_schedule(config),
                      **builders.sampler_args(config))
  return z if scale == 1.0 else z / scale


@dataclasses.dataclass
class Model:
  """A trained INFD model on a mesh: sample latents (plain or guided), decode, render, encode.

  Attributes:
    config: the config (architecture as saved with the checkpoints).
    mesh: the device mesh; batches shard over all its axes.
    ae_params: stage-1 generator parameters.
    dm_params: stage-2 UNet parameters (None for an autoencoder-only model); for a
      text-to-image model, SD's UNet (fine-tuned or as imported).
    t2i: Stable Diffusion's parts of a text-to-image model (`generate`): its text
      tower, tokenizer, UNet module and schedule; stage 1 then reads SD's latents.
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  ae_params: PyTree
  dm_params: PyTree | None = None
  t2i: text_to_image.SDParts | None = None

  def __post_init__(self):
    sc = self.config.sample
    self.ae = builders.autoencoder(self.config)
    self.renderer = tiling.TiledRenderer(tiling.module_render_fn(self.ae, "render"), sc.tile,
                                         sc.pad, sc.tiles_per_call)
    self._batch = sharding.batch_sharding(self.mesh)
    self._sample_fn = jax.jit(self._sample, out_shardings=self._batch)
    self._decode_fn = jax.jit(self._decode, out_shardings=self._batch)
    self._encode_fn = jax.jit(self._encode, out_shardings=self._batch)
    self._condition_fn = jax.jit(self._condition, static_argnums=(0, 1),
                                 out_shardings=(self._batch, self._batch))
    self._head_fn = jax.jit(lambda x, n: x[:n], static_argnums=1,
                            out_shardings=sharding.replicated(self.mesh))
    self._row_fn = jax.jit(lambda x, i: jax.lax.dynamic_slice_in_dim(x, i, 1),
                           out_shardings=sharding.replicated(self.mesh))
    if self.t2i is not None:
      self._text_params = jax.device_put(self.t2i.params["text"],
                                         sharding.replicated(self.mesh))
      self._generate_fn = jax.jit(self._generate, out_shardings=self._batch)

  def with_params(self, ae_params: PyTree | None = None, dm_params: PyTree | None = None
                  ) -> "Model":
    """This model with other parameters of the same shapes (e.g. a training state's),
    sharing its compiled programs."""
    other = copy.copy(self)
    other.ae_params = self.ae_params if ae_params is None else ae_params
    other.dm_params = self.dm_params if dm_params is None else dm_params
    return other

  def with_settings(self, **sections: dict[str, Any]) -> "Model":
    """This model's weights with `section=dict(...)` settings changed (e.g.
    `sample=dict(sampler="unipc")`, `diffusion=dict(sample_steps=20)`), as
    `infd_jax.load(path, **sections)` would give."""
    config = ml_collections.ConfigDict(self.config.to_dict())
    for section, values in sections.items():
      config[section].update(values)
    return Model(config, self.mesh, self.ae_params, self.dm_params, self.t2i)

  # -- jitted bodies --------------------------------------------------------------------------

  def _sample(self, dm_params: PyTree, keys: jax.Array) -> jax.Array:
    shape = (1, *builders.latent_shape(self.config))
    unet = builders.unet(self.config)
    one = lambda key: sample_latents(self.config, unet, dm_params, key, shape)[0]
    return jax.vmap(one)(keys)

  def _decode(self, ae_params: PyTree, z: jax.Array) -> jax.Array:
    return self.ae.apply({"params": ae_params}, z, self.config.sample.quantize,
                         method="decode_latents")

  def _encode(self, ae_params: PyTree, images: jax.Array) -> jax.Array:
    return self.ae.apply({"params": ae_params}, images, method="encode")

  def _condition(self, objective, refine, dm_params: PyTree, ae_params: PyTree, inputs: tuple,
                 keys: jax.Array, text: tuple | None = None) -> tuple[jax.Array, jax.Array]:
    """`text`: (text tower parameters, prompt tokens [1, L], guidance scale) of a
    text-to-image model, whose UNet then samples the prompt under the conditions."""
    shape = (1, *builders.latent_shape(self.config))
    if self.t2i is None:
      eps_fn = builders.eps_model(self.config, builders.unet(self.config))
      sched, scale = builders.diffusion_schedule(self.config), builders.latent_scale(self.config)
    else:
      text_params, tokens, guidance = text
      encode = lambda ids: self.t2i.text.apply({"params": text_params}, ids)
      eps_fn = text_to_image.guided_eps(
          self.t2i, encode(tokens), encode(jax.numpy.asarray(self.t2i.empty_tokens())), guidance)
      sched, scale = self.t2i.schedule, self.t2i.latent_scale

    def one(key):
      z, losses = task_lib.guided_latents_of(self.config, eps_fn, dm_params, sched, scale,
                                             ae_params, objective, refine, inputs, key, shape)
      return z[0], losses[:, 0]
    return jax.vmap(one)(keys)

  def _generate(self, unet_params: PyTree, text_params: PyTree, tokens: jax.Array,
                keys: jax.Array, scale: jax.Array) -> jax.Array:
    sd = self.t2i
    encode = lambda ids: sd.text.apply({"params": text_params}, ids)
    uncond = encode(jax.numpy.asarray(sd.empty_tokens()))
    shape = (1, *builders.latent_shape(self.config))
    one = lambda key, context: text_to_image.guided_latents(
        self.config, sd, unet_params, context[None], uncond, scale, key, shape)[0]
    return jax.vmap(one)(keys, encode(tokens))

  def generation_program(self):
    """Jitted (dm_params, ae_params, keys [n, 2]) -> phi [n, ...] batch-sharded: sampling and
    decoding as one program, as generation runs them (for ahead-of-time compiles)."""
    return jax.jit(lambda dm_params, ae_params, keys: self._decode(
        ae_params, self._sample(dm_params, keys)), out_shardings=self._batch)

  # -- global arrays (every process calls these together) ------------------------------------

  def padded(self, n: int) -> int:
    """n rounded up to a multiple of the device count (one row per device at least)."""
    return -(-n // self.mesh.size) * self.mesh.size

  def put_batch(self, x: np.ndarray) -> jax.Array:
    """A host batch, the same on every process, padded and sharded over the mesh."""
    x = np.asarray(x)
    pad = self.padded(len(x)) - len(x)
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
    return jax.make_array_from_callback(x.shape, self._batch, lambda i: x[i])

  def sample_global(self, ids: np.ndarray, seed: int, dm_params: PyTree | None = None
                    ) -> jax.Array:
    """Latents of samples `ids` (padded to the device count), batch-sharded.

    Sample i's noise comes from fold_in(PRNGKey(seed), i) alone. `dm_params`
    replaces the model's UNet parameters (e.g. the EMA weights during training).
    """
    dm_params = self.dm_params if dm_params is None else dm_params
    if dm_params is None:
      raise checks.UserError("this model has no stage-2 (diffusion) parameters")
    return self._sample_fn(dm_params, self._keys(ids, seed))

  def _keys(self, ids: np.ndarray, seed: int) -> jax.Array:
    keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(
        np.asarray(ids, np.uint32)))
    return self.put_batch(keys)

  def prompt_tokens(self, prompts: Any, n: int) -> np.ndarray:
    """Token ids [len(prompts) * n, L]: each prompt's ids n times in a row (sample
    k * n + j is copy j of prompt k)."""
    if self.t2i is None:
      raise checks.UserError("this model has no text-to-image parts (train --config.stage="
                             "t2i_unet, or load a workdir with t2i.sd_weights)")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise checks.UserError(f"prompts must be a string or a list of strings, got {prompts!r}")
    checks.check_count(n, "n")
    return np.repeat(self.t2i.tokenizer(prompts), n, axis=0)

  def generate_global(self, tokens: np.ndarray, ids: np.ndarray, seed: int,
                      guidance_scale: float) -> jax.Array:
    """Text-conditioned latents of samples `ids` with token ids [len(ids), L] (padded to the
    device count), batch-sharded; sample i's noise depends only on (seed, i)."""
    return self._generate_fn(self.dm_params, self._text_params, self.put_batch(tokens),
                             self._keys(ids, seed), np.float32(guidance_scale))

  def condition_global(self, ids: np.ndarray, seed: int, task: task_lib.Task,
                       prompt: str | None = None, guidance_scale: float | None = None
                       ) -> tuple[jax.Array, jax.Array]:
    """Guided latents of samples `ids` (padded to the device count) and their final losses
    [n, conditions], batch-sharded; sample i depends only on (seed, i), as in `sample_global`.
    A text-to-image model samples `prompt` (classifier-free `guidance_scale`, default
    `t2i.guidance_scale`) under the conditions."""
    if self.dm_params is None:
      raise checks.UserError("this model has no stage-2 (diffusion) parameters")
    text = None
    if (prompt is None) != (self.t2i is None):
      raise checks.UserError("Model.condition: a text-to-image model needs prompt=..., and only "
                             "a text-to-image model takes one")
    if prompt is not None:
      scale = self.config.t2i.guidance_scale if guidance_scale is None else guidance_scale
      text = jax.device_put((self._text_params, self.prompt_tokens([prompt], 1),
                             np.float32(scale)), sharding.replicated(self.mesh))
    inputs = jax.device_put(task.inputs, sharding.replicated(self.mesh))
    return self._condition_fn(task.objective, task.refine, self.dm_params, self.ae_params,
                              inputs, self._keys(ids, seed), text)

  def decode_global(self, z: jax.Array | np.ndarray) -> jax.Array:
    """Latents (quantized if `sample.quantize`) -> phi, batch-sharded (padded to the devices)."""
    if not isinstance(z, jax.Array) or z.sharding != self._batch:
      z = self.put_batch(np.asarray(z))
    return self._decode_fn(self.ae_params, z)

  def phi_row(self, phi: jax.Array, row: int) -> jax.Array:
    """phi[row:row + 1], replicated (a single image whose tiles spread over the mesh)."""
    return self._row_fn(phi, row)

  def render_local(self, phi: jax.Array, size: tuple[int, int],
                   window: tiles.Window | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows of phi held here, their images [b, h, w, 3] float32)."""
    return self.renderer.render_local({"params": self.ae_params}, phi, size, window)

  def owned_rows(self, phi: jax.Array, n: int) -> np.ndarray:
    """The rows < n of phi (from `decode_global`) that this process owns (renders and
    writes), ascending: those it holds; each row is held by exactly one process."""
    if self._spread(n):
      return np.arange(n)
    rows = tiling.local_rows(phi)
    return rows[rows < n]  # rows past n pad the batch to the device count

  def render_owned(self, phi: jax.Array, n: int, size: tuple[int, int],
                   window: tiles.Window | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(`owned_rows(phi, n)`, their images [b, h, w, 3] float32, unclipped)."""
    rows = self.owned_rows(phi, n)
    held, images = self.render_local(self._head_fn(phi, n) if self._spread(n) else phi, size,
                                     window)
    return rows, images[np.isin(held, rows)]

  def _spread(self, n: int) -> bool:
    """Fewer images than devices on one process: phi replicated, each renderer call's
    tiles spread over the mesh. With several processes each device renders the rows it
    holds, so no render call waits on another process."""
    return n < self.mesh.size and jax.process_count() == 1

  # -- the Python API (host numpy in and out, the same on every process) ----------------------

  def sample(self, n: int, seed: int = 0) -> np.ndarray:
    """n latents [n, h, w, c] (before quantization); sample i depends only on (seed, i)."""
    checks.check_count(n, "n")
    return _gather(self.sample_global(np.arange(n), seed))[:n]

  def render(self, z: np.ndarray, size: tuple[int, int] | int,
             window: tiles.Window | None = None) -> np.ndarray:
    """Images [n, h, w, 3] float32 of latents z [n, ...] at size (H, W), clipped to [-1, 1].

    window=(top, left, height, width) renders only that crop of the H x W image
    (equal to the same crop of the full render).
    """
    size = checks.parse_size(size)
    window = checks.parse_window(window, size)
    rows, images = self.render_owned(self.decode_global(z), len(z), size, window)
    return np.clip(gather_owned(rows, images, len(z)), -1.0, 1.0)

  def render_grid(self, z: np.ndarray, coord: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Images [n, h, w, 3] of latents z [n, ...], each in one untiled renderer call on its
    own query grid coord, cell [n, h, w, 2] (as the official trainer visualises training
    crops; `render` tiles), clipped to [-1, 1]."""
    out = self.renderer.render_grid({"params": self.ae_params}, self.decode_global(z),
                                    self.put_batch(coord), self.put_batch(cell))
    return np.clip(_gather(out)[:len(z)], -1.0, 1.0)

  def encode(self, images: np.ndarray) -> np.ndarray:
    """Latents [n, h, w, c] (before quantization) of images [n, H, W, 3] (uint8 or [-1, 1])."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
      x = x.astype(np.float32) / 127.5 - 1
    return _gather(self._encode_fn(self.ae_params, self.put_batch(x.astype(np.float32))))[:len(x)]

  def reconstruct(self, images: np.ndarray, size: tuple[int, int] | int,
                  window: tiles.Window | None = None) -> np.ndarray:
    """Encode, quantize (if `sample.quantize`), decode and render the images at `size`."""
    return self.render(self.encode(images), size, window)

  def generate_latents(self, prompts: Any, n: int = 1, seed: int = 0,
                       guidance_scale: float | None = None) -> np.ndarray:
    """Latents [len(prompts) * n, h, w, c] of n samples per prompt (copy j of prompt k is
    sample k * n + j, which depends only on (seed, k * n + j)), classifier-free guided
    with `guidance_scale` (default `t2i.guidance_scale`; 1: the conditional model alone)."""
    tokens = self.prompt_tokens(prompts, n)
    scale = self.config.t2i.guidance_scale if guidance_scale is None else guidance_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
      raise checks.UserError(f"guidance_scale={scale!r}: must be a number >= 0")
    return _gather(self.generate_global(tokens, np.arange(len(tokens)), seed, scale))[:len(tokens)]

  def generate(self, prompts: Any, size: tuple[int, int] | int, n: int = 1, seed: int = 0,
               guidance_scale: float | None = None, window: tiles.Window | None = None
               ) -> np.ndarray:
    """Images [len(prompts) * n, H, W, 3] in [-1, 1] of n samples per prompt at any size
    (or its `window`), rendered from the field the stage-1 decoder makes of
    `generate_latents(prompts, n, seed, guidance_scale)`."""
    size = checks.parse_size(size)
    window = checks.parse_window(window, size)
    return self.render(self.generate_latents(prompts, n, seed, guidance_scale), size, window)

  def condition(self, regions: Any, n: int = 1, seed: int = 0, prompt: str | None = None,
                guidance_scale: float | None = None, **settings: Any
                ) -> tuple[np.ndarray, np.ndarray]:
    """Guided sampling: n latents [n, h, w, c] that satisfy `regions`, and each one's final
    loss per region [n, regions]; render them with `render` at any size.

    Args:
      regions: list of {kind, size, box, image, mask, prompt, scale} (as the
        `condition` job's `regions`; `infd_jax.guidance.task` documents them).
      n, seed: how many; sample i depends only on (seed, i) (guided DDIM).
      prompt, guidance_scale: a text-to-image model's prompt (required there) and its
        classifier-free guidance scale (default `t2i.guidance_scale`).
      **settings: `condition` settings for this call: guide_start, guide_stop,
        guide_every (which DDIM steps are guided), clip_checkpoint, clip_vocab,
        init_image (a file or an array [h, w, 3]) and start (begin from its latent
        part-way), fit_steps, fit_lr and fit_zeta (data consistency instead of DPS).
    """
    checks.check_count(n, "n")
    unknown = set(settings) - set(task_lib.SETTINGS)
    if unknown:
      raise checks.UserError(f"Model.condition: unknown settings {sorted(unknown)} (known: "
                      f"{', '.join(task_lib.SETTINGS)})")
    init_image = settings.pop("init_image", None)  # an array does not fit a config
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.condition.update(settings)
    task = task_lib.from_config(config, regions, name="regions", init_image=init_image,
                                settings_name="condition")
    z, losses = self.condition_global(np.arange(n), seed, task, prompt, guidance_scale)
    return _gather(z)[:n], _gather(losses)[:n]


def _gather(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_owned(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
  """Rows 0..n-1 on every process, each taken from the one process that owns it.

  Args:
    rows: [b] the rows this process owns (as `Model.render_owned` gives them).
    values: [b, ...] their values (images, per-image metrics).
    n: the number of rows.

  Returns:
    [n, ...] in row order. Every process calls this together.
  """
  full = np.zeros((n, *values.shape[1:]), values.dtype)
  if jax.process_count() == 1:
    full[rows] = values
    return full
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sharding.barrier("gather owned rows")  # a peer still rendering must not time out the gather
  longest = int(np.max(multihost_utils.process_allgather(np.int32(len(rows)))))
  pad = longest - len(rows)  # process_allgather needs the same shape everywhere
  rows = np.concatenate([np.asarray(rows, np.int32), np.full(pad, -1, np.int32)])
  values = np.concatenate([values, np.zeros((pad, *values.shape[1:]), values.dtype)])
  every_row = np.asarray(multihost_utils.process_allgather(rows))
  every_value = np.asarray(multihost_utils.process_allgather(values))
  owned = every_row >= 0
  full[every_row[owned]] = every_value[owned]
  return full
