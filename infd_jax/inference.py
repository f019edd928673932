"""The inference layer: trained stages -> latents -> phi -> images, on one mesh.

Everything after training goes through here (`generate`, the evaluation job,
the Python API `infd_jax.load`, training visualisations):

- `adopt_architecture` reads the model architecture from the config saved with
  the checkpoint (orbax `config` item of a workdir, `meta.json` of a converted
  official checkpoint), so later stages never repeat model flags;
- `load_ae_params` / `load_dm_params` restore only the parameters (a partial
  orbax restore of the train state), sharded by the config's rules;
- `Model` samples latents (sample i's noise depends only on (seed, i), so the
  batch layout and the number of hosts do not change it), decodes them and
  renders them with the official tiling, batch-sharded over the mesh; guided
  sampling (`Model.condition`, the `condition` job) goes through it too.
"""

import dataclasses
import logging
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from infd_jax import builders, checkpointing, checks, sharding
from infd_jax.configs import common
from infd_jax.diffusion import samplers
from infd_jax.guidance import task as task_lib
from infd_jax.rendering import tiles, tiling

PyTree = Any
UserError = builders.UserError

# Config keys that fix a trained stage's parameter shapes or meaning, per stage.
ARCHITECTURE = {
    "ae": {"ae": ("ch", "ch_mult", "num_res_blocks", "z_channels", "num_codes",
                  "renderer_hidden", "norm_groups", "renderer_normalize", "mid_attention")},
    "dm": {"dm": ("model_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                  "num_head_channels", "norm_groups"),
           "diffusion": ("num_train_steps", "beta_start", "beta_end", "latent_scale"),
           "data": ("inp_res",)},
}
# Which stages' architectures a job reads from checkpoints.
_STAGES_READ = {"dm": ("ae", "dm"), "sample": ("ae", "dm"), "condition": ("ae", "dm"),
                "eval": ("ae",)}
# The train-state fields holding the parameters (`training.state`).
_PARAM_FIELDS = {"ae": "gen_params", "dm": "ema_params", "dm_raw": "params"}


def stage_source(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                 stage: str) -> epath.Path:
  """Where a stage's parameters come from: `ckpt.<stage>_checkpoint`, else the workdir."""
  return epath.Path(config.ckpt[f"{stage}_checkpoint"] or workdir)


def _orbax_dir(source: epath.Path, stage: str) -> epath.Path | None:
  """The `checkpoints_<stage>` folder of a workdir (or the folder itself), if it has steps."""
  folder = f"checkpoints_{stage}"
  for candidate in (source / folder, source):
    if candidate.name == folder and candidate.is_dir() and any(candidate.iterdir()):
      return candidate
  return None


def _is_converted(source: epath.Path) -> bool:
  return (source / "meta.json").is_file() and (source / "params").is_dir()


def saved_architecture(source: epath.Path, stage: str) -> dict[str, dict[str, Any]] | None:
  """{family: {key: value}} of a stage's architecture as saved with its checkpoint.

  None when `source` holds no checkpoint of that stage. Converted official
  checkpoints carry only the module widths (their meta), not data or schedule. A
  key missing from a saved family predates that option: it is the official default.
  """
  folder = _orbax_dir(source, stage)
  if folder is not None:
    saved = _saved_config(folder)[1]
  elif _is_converted(source):
    from infd_jax.convert import mapping  # pylint: disable=g-import-not-at-top
    saved = mapping.load_meta(source)
  else:
    return None
  official = common.base()
  return {family: {k: _tupled(saved[family].get(k, official[family][k])) for k in keys}
          for family, keys in ARCHITECTURE[stage].items() if family in saved}


def _saved_config(folder: epath.Path) -> tuple[int | None, dict[str, Any]]:
  """(newest step, the config saved with it) of an orbax `checkpoints_<stage>` folder."""
  ckpt = checkpointing.Checkpointer(folder, async_save=False)
  try:
    step = ckpt.latest_step()
    return step, ckpt.restore_config(step)
  finally:
    ckpt.close()


# Settings a resumed training stage must keep (they set parameter or optimizer-state shapes).
_RESUMED = {"ae": ("ae", "disc"), "dm": ("dm", "ae")}
_NOT_ARCHITECTURE = {"attention_impl"}


def check_resume(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                 stage: str) -> None:
  """A training stage resuming in `workdir` must have its checkpoint's architecture; a
  difference is one UserError naming the differing keys."""
  folder = _orbax_dir(epath.Path(workdir), stage)
  if folder is None:
    return
  step, saved = _saved_config(folder)
  current = checkpointing.config_to_json(config)
  diff = [f"{family}.{k}={current[family][k]!r} (checkpoint {v!r})"
          for family in _RESUMED[stage] for k, v in saved.get(family, {}).items()
          if k not in _NOT_ARCHITECTURE and k in current[family] and current[family][k] != v]
  if diff:
    raise UserError(f"config differs from the checkpoint it would resume ({folder}, step "
                    f"{step}) in {', '.join(diff)}: use those settings or another --workdir")


def _tupled(value: Any) -> Any:
  return tuple(_tupled(v) for v in value) if isinstance(value, (list, tuple)) else value


def adopt_architecture(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                       overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """The config with each trained stage's architecture taken from its checkpoint.

  Args:
    config: the run's config (`config.stage` selects which stages are read).
    workdir: the run's workdir (default source of both stages).
    overrides: dotted keys the user set explicitly (e.g. "ae.ch"); one that
      contradicts a checkpoint raises UserError naming it.

  Returns:
    A copy of config; the input is not changed.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  explicit = set(overrides)
  for stage in _STAGES_READ.get(config.stage, ()):
    source = stage_source(config, workdir, stage)
    saved = saved_architecture(source, stage)
    if saved is None:
      continue
    for family, values in saved.items():
      for key, value in values.items():
        current = _tupled(config[family][key])
        if current == value:
          continue
        if f"{family}.{key}" in explicit:
          raise UserError(f"--config.{family}.{key}={current!r} contradicts the stage-"
                          f"{'1' if stage == 'ae' else '2'} checkpoint in {source} "
                          f"({family}.{key}={value!r}); drop the flag")
        logging.info("config.%s.%s = %r from the checkpoint in %s", family, key, value, source)
        config[family][key] = value
  return config


def _restore_params(folder: epath.Path, field: str, abstract: PyTree) -> PyTree:
  """One field of the newest saved train state (partial restore: nothing else is read)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = checkpointing.Checkpointer(folder, async_save=False)
  try:
    step = ckpt.latest_step()
  finally:
    ckpt.close()
  target = {field: abstract}
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        ckpt.directory / str(step) / "state",
        args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  except Exception as e:  # re-raised with the path: a corrupt checkpoint must be visible
    raise checkpointing.CheckpointError(f"cannot restore step {step} from {folder}: {e}") from e
  return restored[field]


def _abstract(module: nn.Module, mesh: jax.sharding.Mesh, rules, *inputs) -> PyTree:
  boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs)["params"])
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def _load(config, workdir, mesh, stage: str, field: str, part: str, module: nn.Module,
          *inputs) -> PyTree:
  source = stage_source(config, workdir, stage)
  folder = _orbax_dir(source, stage)
  if folder is not None:
    abstract = _abstract(module, mesh, sharding.config_rules(config.mesh), *inputs)
    return _restore_params(folder, field, abstract)
  if _is_converted(source):
    params = builders.load_converted_part(config, source, part, stage)
    return jax.device_put(params, sharding.replicated(mesh))
  raise UserError(
      f"no stage-{'1' if stage == 'ae' else '2'} checkpoint in {source}: train it first "
      f"(--config.stage={stage}) or point "
      f"--config.ckpt.{stage}_checkpoint at a workdir or a converted official checkpoint")


def load_ae_params(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                   mesh: jax.sharding.Mesh) -> PyTree:
  """Stage-1 generator parameters from `ckpt.ae_checkpoint` or the workdir."""
  r, p = config.data.inp_res, config.data.patch
  return _load(config, workdir, mesh, "ae", _PARAM_FIELDS["ae"], "ae",
               builders.autoencoder(config), jnp.zeros((1, r, r, 3)), jnp.zeros((1, p, p, 2)),
               jnp.zeros((1, p, p, 2)))


def load_dm_params(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                   mesh: jax.sharding.Mesh) -> PyTree:
  """UNet parameters (EMA if `sample.use_ema`) from `ckpt.dm_checkpoint` or the workdir."""
  ema = config.sample.use_ema
  h, w, c = builders.latent_shape(config)
  return _load(config, workdir, mesh, "dm", _PARAM_FIELDS["dm" if ema else "dm_raw"],
               "dm_ema" if ema else "dm", builders.unet(config), jnp.zeros((1, h, w, c)),
               jnp.zeros((1,), jnp.int32))


def sample_latents(config: ml_collections.ConfigDict, unet: nn.Module, dm_params: PyTree,
                   key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """The one call site of the latent sampler: key -> latents [*shape] with
  `config.sample.sampler` (DDIM by default, REFERENCE 6.3), divided by
  `diffusion.latent_scale` (the scale the UNet was trained at)."""
  scale = builders.latent_scale(config)
  z = samplers.sample(apply_fn=builders.eps_model(config, unet), params=dm_params, key=key,
                      shape=shape, sched=builders.diffusion_schedule(config),
                      **builders.sampler_args(config))
  return z if scale == 1.0 else z / scale


def renderer(config: ml_collections.ConfigDict) -> tiling.TiledRenderer:
  """The official tiled renderer with the `sample` tiling settings."""
  sc = config.sample
  return tiling.TiledRenderer(tiling.module_render_fn(builders.autoencoder(config), "render"),
                              sc.tile, sc.pad, sc.tiles_per_call)


@dataclasses.dataclass
class Model:
  """A trained INFD model on a mesh: sample latents (plain or guided), decode, render, encode.

  Attributes:
    config: the config (architecture as saved with the checkpoints).
    mesh: the device mesh; batches shard over all its axes.
    ae_params: stage-1 generator parameters.
    dm_params: stage-2 UNet parameters (None for an autoencoder-only model).
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  ae_params: PyTree
  dm_params: PyTree | None = None

  def __post_init__(self):
    self.ae = builders.autoencoder(self.config)
    self.renderer = renderer(self.config)
    self._batch = sharding.batch_sharding(self.mesh)
    self._sample_fn = jax.jit(self._sample, out_shardings=self._batch)
    self._decode_fn = jax.jit(self._decode, out_shardings=self._batch)
    self._encode_fn = jax.jit(self._encode, out_shardings=self._batch)
    self._condition_fn = jax.jit(self._condition, static_argnums=0,
                                 out_shardings=(self._batch, self._batch))
    self._head_fn = jax.jit(lambda x, n: x[:n], static_argnums=1,
                            out_shardings=sharding.replicated(self.mesh))
    self._row_fn = jax.jit(lambda x, i: jax.lax.dynamic_slice_in_dim(x, i, 1),
                           out_shardings=sharding.replicated(self.mesh))

  # -- jitted bodies --------------------------------------------------------------------------

  def _sample(self, dm_params: PyTree, keys: jax.Array) -> jax.Array:
    shape = (1, *builders.latent_shape(self.config))
    unet = builders.unet(self.config)
    one = lambda key: sample_latents(self.config, unet, dm_params, key, shape)[0]
    return jax.vmap(one)(keys)

  def _decode(self, ae_params: PyTree, z: jax.Array) -> jax.Array:
    if self.config.sample.quantize:
      z = self.ae.apply({"params": ae_params}, z, method="quantize").z_q
    return self.ae.apply({"params": ae_params}, z, method="decode")

  def _encode(self, ae_params: PyTree, images: jax.Array) -> jax.Array:
    return self.ae.apply({"params": ae_params}, images, method="encode")

  def _condition(self, objective, dm_params: PyTree, ae_params: PyTree, inputs: tuple,
                 keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    shape = (1, *builders.latent_shape(self.config))
    unet = builders.unet(self.config)

    def one(key):
      z, losses = task_lib.guided_latents(self.config, unet, dm_params, ae_params, objective,
                                          inputs, key, shape)
      return z[0], losses[:, 0]
    return jax.vmap(one)(keys)

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
      raise UserError("this model has no stage-2 (diffusion) parameters")
    return self._sample_fn(dm_params, self._keys(ids, seed))

  def _keys(self, ids: np.ndarray, seed: int) -> jax.Array:
    keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(
        np.asarray(ids, np.uint32)))
    return self.put_batch(keys)

  def condition_global(self, ids: np.ndarray, seed: int, task: task_lib.Task
                       ) -> tuple[jax.Array, jax.Array]:
    """Guided latents of samples `ids` (padded to the device count) and their final losses
    [n, conditions], batch-sharded; sample i depends only on (seed, i), as in `sample_global`."""
    if self.dm_params is None:
      raise UserError("this model has no stage-2 (diffusion) parameters")
    inputs = jax.device_put(task.inputs, sharding.replicated(self.mesh))
    return self._condition_fn(task.objective, self.dm_params, self.ae_params, inputs,
                              self._keys(ids, seed))

  def decode_global(self, z: jax.Array) -> jax.Array:
    """Latents (quantized if `sample.quantize`) -> phi, batch-sharded."""
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

  # -- the Python API (host numpy in and out) --------------------------------------------------

  def sample(self, n: int, seed: int = 0) -> np.ndarray:
    """n latents [n, h, w, c] (before quantization); sample i depends only on (seed, i)."""
    check_count(n, "n")
    return _gather(self.sample_global(np.arange(n), seed))[:n]

  def render(self, z: np.ndarray, size: tuple[int, int] | int,
             window: tiles.Window | None = None) -> np.ndarray:
    """Images [n, h, w, 3] float32 of latents z [n, ...] at size (H, W), clipped to [-1, 1].

    window=(top, left, height, width) renders only that crop of the H x W image
    (equal to the same crop of the full render).
    """
    size = checks.parse_size(size)
    window = parse_window(window, size)
    phi = self.decode_global(z)
    if len(z) < self.mesh.size:  # fewer images than devices: spread each call's tiles instead
      phi = self._head_fn(phi, len(z))
    rows, images = self.render_local(phi, size, window)
    if jax.process_count() > 1:
      images = _gather_rows(rows, images, phi.shape[0])
    return np.clip(images[:len(z)], -1.0, 1.0)

  def encode(self, images: np.ndarray) -> np.ndarray:
    """Latents [n, h, w, c] (before quantization) of images [n, H, W, 3] (uint8 or [-1, 1])."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
      x = x.astype(np.float32) / 127.5 - 1
    return _gather(self._encode_fn(self.ae_params, self.put_batch(x.astype(np.float32))))[:len(x)]

  def reconstruct(self, images: np.ndarray, size: tuple[int, int] | int) -> np.ndarray:
    """Encode, quantize, decode and render the images at `size`."""
    return self.render(self.encode(images), size)

  def condition(self, regions: Any, n: int = 1, seed: int = 0, **settings: Any
                ) -> tuple[np.ndarray, np.ndarray]:
    """Guided sampling: n latents [n, h, w, c] that satisfy `regions`, and each one's final
    loss per region [n, regions]; render them with `render` at any size.

    Args:
      regions: list of {kind, size, box, image, mask, prompt, scale} (as the
        `condition` job's `regions`; `infd_jax.guidance.task` documents them).
      n, seed: how many; sample i depends only on (seed, i) (guided DDIM).
      **settings: `condition` settings for this call: guide_start, guide_stop,
        guide_every (which DDIM steps are guided), clip_checkpoint, clip_vocab.
    """
    check_count(n, "n")
    unknown = set(settings) - set(task_lib.SETTINGS)
    if unknown:
      raise UserError(f"Model.condition: unknown settings {sorted(unknown)} (known: "
                      f"{', '.join(task_lib.SETTINGS)})")
    config = ml_collections.ConfigDict(self.config.to_dict())
    config.condition.update(settings)
    task = task_lib.from_config(config, regions, name="regions")
    z, losses = self.condition_global(np.arange(n), seed, task)
    return _gather(z)[:n], _gather(losses)[:n]


def _gather(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _gather_rows(rows: np.ndarray, images: np.ndarray, total: int) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  full = np.zeros((total, *images.shape[1:]), np.float32)
  full[rows] = images
  # Each row is non-zero on exactly one process.
  return np.asarray(multihost_utils.process_allgather(full)).sum(axis=0)


def parse_window(window: Any, size: tuple[int, int], name: str = "window") -> tiles.Window | None:
  """() / None -> None; (top, left, height, width) inside size -> itself; else UserError."""
  if window is None or (isinstance(window, (tuple, list)) and not window):
    return None
  if not (isinstance(window, (tuple, list)) and len(window) == 4
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in window)):
    raise UserError(f"{name}={window!r} is not (top, left, height, width) in integers")
  window = tuple(int(v) for v in window)
  try:
    tiles.check_window(size, window)
  except ValueError as e:
    raise UserError(f"{name}: {e}") from None
  return window


def check_count(n: Any, name: str) -> None:
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
    raise UserError(f"{name}={n!r} must be a positive integer")


def load_model(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
               mesh: jax.sharding.Mesh, *, need_dm: bool = True) -> Model:
  """A Model from the stages `config.ckpt` (or the workdir) points at."""
  ae_params = load_ae_params(config, workdir, mesh)
  dm_params = load_dm_params(config, workdir, mesh) if need_dm else None
  return Model(config, mesh, ae_params, dm_params)


def config_from_json(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config saved as JSON, with its lists back as tuples (as the config files write them)."""
  def convert(value):
    if isinstance(value, Mapping):
      return {k: convert(v) for k, v in value.items()}
    return _tupled(value)
  return ml_collections.ConfigDict(convert(saved))


def load(path: str | epath.PathLike, mesh: jax.sharding.Mesh | None = None, **overrides: Any
         ) -> Model:
  """`infd_jax.load`: a Model from a workdir or a converted official checkpoint.

  The architecture and settings come from the config saved with the newest
  stage-2 checkpoint (else stage 1; a converted checkpoint's meta); no flags.

  Args:
    path: a training workdir or the output of `python -m infd_jax.convert`.
    mesh: devices to use (default: all, pure data parallel).
    **overrides: `section=dict(...)` updates of the config, e.g.
      `sample=dict(tiles_per_call=4)`.
  """
  path = epath.Path(path)
  config = None
  for stage in ("dm", "ae"):
    folder = _orbax_dir(path, stage)
    if folder is not None:
      config = config_from_json(_saved_config(folder)[1])
      break
  if config is None:
    if not _is_converted(path):
      raise UserError(f"{path} is neither a workdir with checkpoints nor a converted checkpoint")
    config = common.base()
  config.stage = "sample"
  config.ckpt.update(ae_checkpoint=str(path), dm_checkpoint=str(path))
  for section, values in overrides.items():
    config[section].update(values)
  config = adopt_architecture(config, path)
  mesh = mesh or sharding.make_mesh(-1, 1)
  has_dm = _orbax_dir(path, "dm") is not None or (
      _is_converted(path) and "dm" in _converted_parts(path))
  return load_model(config, path, mesh, need_dm=has_dm)


def _converted_parts(path: epath.Path) -> list[str]:
  from infd_jax.convert import mapping  # pylint: disable=g-import-not-at-top
  return list(mapping.load_meta(path).get("parts", ()))

