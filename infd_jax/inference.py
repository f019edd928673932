"""Trained stages on disk -> a `model.Model` on one mesh.

Everything after training loads its weights here (`generate`, the condition
and evaluation jobs, the contact sheet, the Python API `infd_jax.load`) and
then works through the `Model`:

- `adopt_architecture` reads the model architecture from the config saved with
  the checkpoint (orbax `config` item of a workdir, `meta.json` of a converted
  official checkpoint), so later stages never repeat model flags;
- `load_ae_params` / `load_dm_params` restore only the parameters (a partial
  orbax restore of the train state), sharded by the config's rules;
- `load_model` / `load` build the `Model` from them.
"""

import logging
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from infd_jax import builders, checkpointing, sharding
from infd_jax.configs import common
from infd_jax.model import Model

PyTree = Any
UserError = builders.UserError

# Config keys that fix a trained stage's parameter shapes or meaning, per stage.
ARCHITECTURE = {
    "ae": {"ae": ("ch", "ch_mult", "num_res_blocks", "z_channels", "num_codes",
                  "renderer_hidden", "norm_groups", "renderer_normalize", "mid_attention",
                  "kl_encoder")},
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

