"""Trained parameters on disk: the one module that knows where they live and how to read them.

A `Source` is a training workdir (one orbax folder `checkpoints_<stage>` per
stage, see `checkpointing`) or the output of `python -m infd_jax.convert`. It
knows which stages it holds, their newest steps, the config saved with them,
their architecture and what they learned (e.g. the latent scale), and restores
parameters alone. Everything else (training, sampling, evaluation, the Python
API) reaches trained weights and saved configs through this module:

- `adopt_architecture` takes the model architecture from the checkpoints, so later
  stages never repeat model flags (a contradicting flag is one UserError);
- `check_resume` refuses to resume a stage with another architecture;
- `load_ae_params` / `load_dm_params` restore the parameters, sharded by the rules;
- `run_config` is the config of a workdir or converted checkpoint (`infd_jax.load`).
"""

import dataclasses
import logging
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from infd_jax import builders, checkpointing, checks, config_checks, defaults, paths, sharding
from infd_jax.models.autoencoder import INFDAutoencoder
from infd_jax.models.discriminator import PatchDiscriminator
from infd_jax.models.unet import UNet

log = logging.getLogger(__name__)
PyTree = Any
STAGES = ("ae", "dm")
# The train-state fields holding each stage's parameters (`training.state`).
PARAM_FIELDS = {"ae": "gen_params", "dm": "ema_params", "dm_raw": "params"}
# Module fields that do not change what trained weights compute: precision, kernels,
# rematerialisation, and settings that only act while training.
_NOT_ARCHITECTURE = frozenset({"dtype", "attention_impl", "remat", "vq_beta", "codebook_init",
                               "parent", "name"})
# Settings outside the modules that a trained stage fixes: its noise schedule and input size.
_STAGE_SETTINGS = {"dm": {"diffusion": ("num_train_steps", "beta_start", "beta_end"),
                          "data": ("inp_res",)}}
# Which stages' architectures a job reads from checkpoints.
_STAGES_READ = {"dm": ("ae", "dm"), "sample": ("ae", "dm"), "condition": ("ae", "dm"),
                "eval": ("ae",), "t2i": ("ae",)}
# Values a stage learns and saves with its checkpoint, and the config key they fill.
_LEARNED = {"dm": {"latent_scale": ("diffusion", "latent_scale")}}


def _module_keys(module: type[nn.Module], section: str) -> tuple[str, ...]:
  """The architecture keys of a config section: its module's fields, less _NOT_ARCHITECTURE."""
  known = defaults.base()[section]
  return tuple(f.name for f in dataclasses.fields(module)
               if f.name in known and f.name not in _NOT_ARCHITECTURE)


def architecture_keys(stage: str) -> dict[str, tuple[str, ...]]:
  """{config section: keys} that fix a trained stage's parameter shapes or meaning."""
  if stage == "ae":
    return {"ae": _module_keys(INFDAutoencoder, "ae")}
  return {"dm": _module_keys(UNet, "dm"), **_STAGE_SETTINGS["dm"]}


def stage_dir(workdir: str | epath.PathLike, stage: str) -> epath.Path:
  """The orbax folder of a stage's checkpoints inside a workdir."""
  return paths.absolute(workdir) / f"checkpoints_{stage}"


def _tupled(value: Any) -> Any:
  return tuple(_tupled(v) for v in value) if isinstance(value, (list, tuple)) else value


def config_from_json(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config saved as JSON, with its lists back as tuples (as the config files write them)."""
  def convert(value):
    if isinstance(value, Mapping):
      return {k: convert(v) for k, v in value.items()}
    return _tupled(value)
  return ml_collections.ConfigDict(convert(saved))


class Source:
  """Trained stages in a workdir or a converted official checkpoint (read-only)."""

  def __init__(self, path: str | epath.PathLike):
    self.path = paths.absolute(path)
    from infd_jax.convert import mapping  # pylint: disable=g-import-not-at-top
    self._mapping = mapping
    self.converted = mapping.is_converted_checkpoint(self.path)
    self._meta = mapping.load_meta(self.path) if self.converted else None

  def __str__(self) -> str:
    return str(self.path)

  def _folder(self, stage: str) -> epath.Path | None:
    """The `checkpoints_<stage>` folder (the path itself may be one) if it has a complete step."""
    for folder in (stage_dir(self.path, stage), self.path):
      if folder.name == f"checkpoints_{stage}" and checkpointing.saved_steps(folder):
        return folder
    return None

  def _checkpointer(self, stage: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(self._folder(stage), read_only=True)

  def has(self, stage: str) -> bool:
    if self._folder(stage) is not None:
      return True
    parts = {"ae": ("ae",), "dm": ("dm", "dm_ema")}.get(stage, ())
    return self.converted and any(p in self._meta.get("parts", ()) for p in parts)

  def stages(self) -> tuple[str, ...]:
    return tuple(s for s in STAGES if self.has(s))

  def latest_step(self, stage: str) -> int | None:
    """The newest complete step of a stage (a converted checkpoint: its official iteration)."""
    folder = self._folder(stage)
    if folder is not None:
      return checkpointing.saved_steps(folder)[0]
    return self._meta.get("iter") if self.has(stage) else None

  def saved_config(self, stage: str) -> dict | None:
    """The config (JSON) saved with the stage's newest step; None for a converted checkpoint."""
    if self._folder(stage) is None:
      return None
    ckpt = self._checkpointer(stage)
    try:
      return ckpt.restore_config()
    finally:
      ckpt.close()

  def learned(self, stage: str) -> dict[str, Any]:
    """What the stage learned and saved with its newest step, e.g. {'latent_scale': s}.

    Checkpoints older than the `learned` item kept such values in their saved config.
    """
    if self._folder(stage) is None:
      return {}
    ckpt = self._checkpointer(stage)
    try:
      learned, saved = ckpt.restore_learned(), ckpt.restore_config()
    finally:
      ckpt.close()
    for name, (section, key) in _LEARNED.get(stage, {}).items():
      if name not in learned and saved.get(section, {}).get(key):
        learned[name] = saved[section][key]
    return learned

  def architecture(self, stage: str, learned: bool = True) -> dict[str, dict[str, Any]] | None:
    """{section: {key: value}} of the stage as trained; None when this source lacks it.

    A key missing from a saved section predates that option: it is the official
    default. Converted checkpoints carry only the module widths (their meta).
    Learned values (the latent scale) fill their config keys unless `learned=False`.
    """
    if not self.has(stage):
      return None
    saved = self.saved_config(stage) if self._folder(stage) is not None else self._meta
    official = defaults.base()
    found = {section: {k: _tupled(saved[section].get(k, official[section][k])) for k in keys}
             for section, keys in architecture_keys(stage).items() if section in saved}
    values = self.learned(stage) if learned else {}
    for name, (section, key) in _LEARNED.get(stage, {}).items():
      if name in values:
        found.setdefault(section, {})[key] = values[name]
    return found

  def restore_params(self, stage: str, field: str, abstract: PyTree, config) -> PyTree:
    """One parameter tree of the stage: `field` of a workdir's newest state, else the
    converted part (`ae`, `dm` or `dm_ema`), placed like `abstract`."""
    if self._folder(stage) is not None:
      ckpt = self._checkpointer(stage)
      try:
        return ckpt.restore_fields({field: abstract})[field]
      finally:
        ckpt.close()
    if self.converted and self.has(stage):
      part = {"gen_params": "ae", "ema_params": "dm_ema", "params": "dm"}[field]
      return jax.device_put(self._converted_part(config, part, stage),
                            jax.tree.map(lambda a: a.sharding, abstract))
    raise checks.UserError(
        f"no stage-{'1' if stage == 'ae' else '2'} checkpoint in {self.path}: train it first "
        f"(--config.stage={stage}) or point --config.ckpt.{stage}_checkpoint at a workdir or "
        "a converted official checkpoint")

  def _converted_part(self, config: ml_collections.ConfigDict, part: str, family: str) -> PyTree:
    """Host arrays of one converted part; its architecture must equal `config.<family>`."""
    wanted = {k: _tupled(v) for k, v in config[family].to_dict().items()}
    diff = {k: (wanted[k], v) for k, v in self._meta[family].items()
            if k in wanted and wanted[k] != v}
    if diff:
      raise checks.UserError(f"config.{family} differs from the checkpoint in {self.path}: "
                      + ", ".join(f"{k}={a!r} (checkpoint {b!r})" for k, (a, b) in diff.items()))
    trees = self._mapping.load_converted(self.path)
    if part not in trees:
      raise checks.UserError(f"{self.path} holds no '{part}' parameters (converted parts: "
                      f"{sorted(trees)})")
    return trees[part]


def stage_source(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                 stage: str) -> Source:
  """Where a stage's parameters come from: `ckpt.<stage>_checkpoint`, else the workdir."""
  return Source(config.ckpt[f"{stage}_checkpoint"] or workdir)


def adopt_architecture(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                       overrides: Iterable[str] = (), job: str | None = None
                       ) -> ml_collections.ConfigDict:
  """The config with each trained stage's architecture taken from its checkpoint.

  Args:
    config: the run's config.
    job: selects which stages are read (default `config.stage`).
    workdir: the run's workdir (default source of both stages).
    overrides: dotted keys the user set explicitly (e.g. "ae.ch"); one that
      contradicts a checkpoint raises UserError naming it.

  Returns:
    A copy of config; the input is not changed.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  explicit = set(overrides)
  job = job or config.stage
  for stage in _STAGES_READ.get(job, ()):
    source = stage_source(config, workdir, stage)
    # A stage that trains on keeps its own setting (it resolves what it learns itself).
    saved = source.architecture(stage, learned=stage != job)
    for section, values in (saved or {}).items():
      for key, value in values.items():
        current = _tupled(config[section][key])
        if current == value:
          continue
        if f"{section}.{key}" in explicit:
          raise checks.UserError(f"--config.{section}.{key}={current!r} contradicts the stage-"
                          f"{'1' if stage == 'ae' else '2'} checkpoint in {source} "
                          f"({section}.{key}={value!r}); drop the flag")
        log.info("config.%s.%s = %r from the checkpoint in %s", section, key, value, source)
        config[section][key] = value
  return config


# The modules whose architecture a resumed training stage must keep (their config sections).
_RESUMED = {"ae": {"ae": INFDAutoencoder, "disc": PatchDiscriminator},
            "dm": {"dm": UNet, "ae": INFDAutoencoder}}


def check_resume(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                 stage: str) -> None:
  """A training stage resuming in `workdir` must have its checkpoint's architecture; a
  difference is one UserError naming the differing keys."""
  source = Source(workdir)
  saved = source.saved_config(stage)
  if saved is None:
    return
  current = checkpointing.config_to_json(config)
  diff = [f"{section}.{k}={current[section][k]!r} (checkpoint {saved[section][k]!r})"
          for section, module in _RESUMED[stage].items() for k in _module_keys(module, section)
          if k in saved.get(section, {}) and current[section][k] != saved[section][k]]
  if diff:
    raise checks.UserError(f"config differs from the checkpoint it would resume ("
                    f"{stage_dir(workdir, stage)}, step {source.latest_step(stage)}) in "
                    f"{', '.join(diff)}: use those settings or another --workdir")


def _abstract(module: nn.Module, mesh: jax.sharding.Mesh, rules, *inputs) -> PyTree:
  boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs)["params"])
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def load_ae_params(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                   mesh: jax.sharding.Mesh) -> PyTree:
  """Stage-1 generator parameters from `ckpt.ae_checkpoint` or the workdir."""
  r, p = config.data.inp_res, config.data.patch
  abstract = _abstract(builders.autoencoder(config), mesh, sharding.config_rules(config.mesh),
                       jnp.zeros((1, r, r, 3)), jnp.zeros((1, p, p, 2)), jnp.zeros((1, p, p, 2)))
  return stage_source(config, workdir, "ae").restore_params(
      "ae", PARAM_FIELDS["ae"], abstract, config)


def load_dm_params(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                   mesh: jax.sharding.Mesh) -> PyTree:
  """UNet parameters (EMA if `sample.use_ema`) from `ckpt.dm_checkpoint` or the workdir."""
  h, w, c = builders.latent_shape(config)
  abstract = _abstract(builders.unet(config), mesh, sharding.config_rules(config.mesh),
                       jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32))
  field = PARAM_FIELDS["dm" if config.sample.use_ema else "dm_raw"]
  return stage_source(config, workdir, "dm").restore_params("dm", field, abstract, config)


def load_t2i_unet_params(config: ml_collections.ConfigDict, workdir: str | epath.PathLike,
                         mesh: jax.sharding.Mesh, module: nn.Module, inputs: tuple
                         ) -> PyTree | None:
  """The fine-tuned SD UNet (EMA if `sample.use_ema`) of the `t2i_unet` stage in
  `ckpt.dm_checkpoint` or the workdir; None when that stage has no checkpoint."""
  source = Source(config.ckpt.dm_checkpoint or workdir)
  if not source.has("t2i_unet"):
    return None
  abstract = _abstract(module, mesh, sharding.config_rules(config.mesh), *inputs)
  field = PARAM_FIELDS["dm" if config.sample.use_ema else "dm_raw"]
  return source.restore_params("t2i_unet", field, abstract, config)


def run_config(path: str | epath.PathLike, **overrides: Any) -> ml_collections.ConfigDict:
  """The sampling config of a workdir or converted checkpoint (both stages read from it).

  The settings come from the config saved with the newest text-to-image UNet or
  stage-2 checkpoint (else
  stage 1; the defaults for a converted checkpoint), the architecture from the
  checkpoints; `overrides` are `section=dict(...)` updates, e.g. `sample=dict(tile=128)`.
  The result passes `config_checks.check_config` (the Python API's settings checked too).
  """
  source = Source(path)
  if not source.stages():
    raise checks.UserError(f"{source} is neither a workdir with checkpoints nor a converted checkpoint")
  saved = next(filter(None, (source.saved_config(s) for s in ("t2i_unet", "dm", "ae"))), None)
  config = defaults.base()  # settings newer than the checkpoint keep their defaults
  if saved is not None:
    config.update(config_from_json(saved))
  config.stage = "sample"
  config.ckpt.update(ae_checkpoint=str(source), dm_checkpoint=str(source))
  for section, values in overrides.items():
    config[section].update(values)
  config = adopt_architecture(config, source.path)
  # Only a stage-2 checkpoint carries a learned latent scale; stage 1 alone renders, not samples.
  config_checks.check_config(config, adopted=source.has("dm"))
  return config
