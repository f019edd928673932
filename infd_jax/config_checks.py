"""Every setting checked once, before any work: a mistake is one `UserError`, one line.

`check_config` validates the whole config without jax (the command line runs it
before jax is even imported): every enum, range and size, windows, the sampler,
the region list and the files a stage needs (local paths; remote ones are read
when used). `check_devices` adds what depends on the machine (mesh shape, batch
layout, GPU-only kernels) once the devices are known, before anything compiles
or reads data.
"""

import os
import re
from typing import Any, Callable

import ml_collections

from infd_jax import checks
from infd_jax.checks import UserError, is_int, is_local, is_number, parse_size
from infd_jax.diffusion import SAMPLERS, SPACINGS

STAGES = ("ae", "dm", "sample", "eval", "condition", "all", "t2i_unet", "t2i")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: JAX x64 mode only
# The data variant each stage reads.
_DATA_VARIANTS = {"ae": ("variant",), "dm": ("dm_variant",), "all": ("variant", "dm_variant"),
                  "t2i_unet": ("dm_variant",)}
Rule = Callable[[Any], str]  # value -> what is wrong with it ('' if nothing)


def _int(lo: int | None = None, hi: int | None = None) -> Rule:
  def rule(v):
    if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
      return "must be an integer" + (f" >= {lo}" if lo is not None else "") + (
          f" and <= {hi}" if hi is not None else "")
    return ""
  return rule


def _num(lo: float, hi: float = float("inf"), lo_open: bool = False,
         hi_open: bool = False) -> Rule:
  def rule(v):
    ok = is_number(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return "" if ok else (f"must be a number in {'(' if lo_open else '['}{lo}, {hi}"
                          f"{')' if hi_open or hi == float('inf') else ']'}")
  return rule


def _choice(*options: Any) -> Rule:
  return lambda v: "" if v in options else f"choose one of {', '.join(map(str, options))}"


def _bool(v: Any) -> str:
  return "" if isinstance(v, bool) else "must be True or False"


def _subset(*options: str) -> Rule:
  def rule(v):
    if isinstance(v, (list, tuple)) and all(x in options for x in v):
      return ""
    return f"must be a tuple of names among {', '.join(options)}"
  return rule


def _str(v: Any) -> str:
  return "" if isinstance(v, str) else "must be a string"


def _ints(lo: int, empty: bool = False) -> Rule:
  def rule(v):
    if isinstance(v, (list, tuple)) and (v or empty) and all(is_int(x) and x >= lo for x in v):
      return ""
    return f"must be a {'' if empty else 'non-empty '}tuple of integers >= {lo}"
  return rule


def _affine_rgb(v: Any) -> str:
  ok = isinstance(v, (list, tuple)) and len(v) in (0, 12) and all(map(is_number, v))
  return "" if ok else "must be () or 12 numbers (a 3 x 3 matrix row-major, then 3 offsets)"


def _split(empty: bool = False) -> Rule:
  """A TFDS split expression: `train`, `val`, `train+val`, `train[:90%]`."""
  pattern = re.compile(r"[a-z_]+(\[[^\]]*\])?(\+[a-z_]+(\[[^\]]*\])?)*")
  return lambda v: "" if isinstance(v, str) and ((empty and not v) or pattern.fullmatch(v)) else (
      "must be a split such as train, val, train+val or train[:90%]" + (" (or empty)" if empty
                                                                        else ""))


def _folder(v: Any) -> str:
  """A folder to write or read ('' = the default); an existing file cannot be one."""
  if not isinstance(v, str):
    return "must be a string"
  return "is a file, not a folder" if is_local(v) and os.path.isfile(os.path.expanduser(v)) \
      else ""


def _prompts(v: Any) -> str:
  ok = isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v)
  return "" if ok else "must be a tuple of prompt strings"


def _window(v: Any) -> str:
  ok = v in ((), []) or (isinstance(v, (list, tuple)) and len(v) == 4 and all(map(is_int, v)))
  return "" if ok else "must be () or (top, left, height, width) in integers"


def _sizes(v: Any) -> str:
  if isinstance(v, (str, int)) or not isinstance(v, (list, tuple)) or not v:
    return "give a tuple of sizes, e.g. '(256, 1024, \"720x1280\")'"
  for s in v:
    parse_size(s, "size")
  return ""


def _mesh_rules(v: Any) -> str:
  ok = isinstance(v, (list, tuple)) and all(
      isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], str)
      and r[1] in (*checks.MESH_AXES, None) for r in v)
  return "" if ok else f"must be (logical axis, mesh axis) pairs, mesh axes {checks.MESH_AXES} or None"


# Every setting of `infd_jax.defaults.base()` and what it must be.
RULES: dict[str, Rule] = {
    "stage": _choice(*STAGES), "seed": _int(), "compile_cache": _folder, "contact_sheet": _bool,
    **{f"data.{k}": _str for k in ("name", "variant", "dm_variant", "source")},
    "data.data_dir": _folder, "data.split": _split(), "data.dm_split": _split(),
    "data.eval_split": _split(empty=True),
    **{f"data.{k}": _int(1) for k in ("inp_res", "patch", "gt_res_min", "gt_res_max",
                                      "read_threads", "prefetch_buffer")},
    **{f"data.{k}": _num(0, 1) for k in ("p_whole", "p_max", "p_lr", "inp_crop")},
    "data.resize": _int(0), "data.dm_resize": _int(0), "data.num_workers": _int(0),
    "data.fast_crop": _bool,
    "ae.ch": _int(1), "ae.ch_mult": _ints(1), "ae.num_res_blocks": _int(1),
    "ae.z_channels": _int(1), "ae.num_codes": _int(0), "ae.vq_beta": _num(0),
    "ae.renderer_hidden": _int(1), "ae.codebook_init": _num(0), "ae.norm_groups": _int(1),
    "ae.renderer_normalize": _bool, "ae.mid_attention": _bool, "ae.kl_encoder": _bool,
    "ae.decoder_ch_mult": _ints(1, empty=True), "ae.input_colour": _affine_rgb,
    "disc.ndf": _int(1), "disc.n_layers": _int(1),
    **{f"loss.{k}": _num(0) for k in ("l1", "perc", "quant", "gan_g")},
    "loss.adaptive_gan_weight": _bool, "loss.gan_start_step": _int(0),
    "loss.lpips_train_dropout": _bool,
    "dm.model_channels": _int(1), "dm.channel_mult": _ints(1), "dm.num_res_blocks": _int(1),
    "dm.attention_resolutions": _ints(1, empty=True), "dm.num_head_channels": _int(1),
    "dm.attention_impl": _choice("xla", "cudnn"), "dm.norm_groups": _int(1),
    "diffusion.num_train_steps": _int(1), "diffusion.beta_start": _num(0, 1, lo_open=True),
    "diffusion.beta_end": _num(0, 1, lo_open=True), "diffusion.sample_steps": _int(1),
    "diffusion.eta": _num(0), "diffusion.latent_scale": _num(0), "diffusion.x0_rms_max": _num(0),
    **{f"optim.{k}": _num(0, lo_open=True) for k in ("ae_lr", "dm_lr")},
    **{f"optim.{k}": _num(0, 1, hi_open=True) for k in ("ae_b1", "ae_b2")},
    "optim.dm_weight_decay": _num(0), "optim.dm_ema": _num(0, 1), "optim.cosine_decay": _bool,
    # The generator's top-level parts (`models.autoencoder.INFDAutoencoder`).
    "optim.ae_frozen": _subset("encoder", "quantizer", "decoder", "renderer"),
    **{f"train.{k}": _int(1) for k in ("ae_batch_size", "dm_batch_size", "log_every",
                                       "ckpt_every", "keep_checkpoints")},
    **{f"train.{k}": _int(0) for k in ("ae_steps", "dm_steps", "vis_every", "eval_every",
                                       "eval_batches")},
    "train.compute_dtype": _choice(*DTYPES), "train.on_nonfinite": _choice("stop", "skip"),
    "train.latent_cache": _bool,
    "sample.num_samples": _int(1), "sample.batch_size": _int(1), "sample.sizes": _sizes,
    "sample.tile": _int(1), "sample.pad": _int(0), "sample.tiles_per_call": _int(1),
    "sample.use_ema": _bool, "sample.quantize": _bool, "sample.seed": _int(),
    "sample.out_dir": _folder, "sample.window": _window,
    "sample.stream_above": _int(1), "sample.sampler": _choice(*SAMPLERS),
    "sample.spacing": _choice(*SPACINGS),
    "condition.regions": lambda v: "" if isinstance(v, (str, list, tuple)) else
    "must be a list of dicts or its JSON",
    "condition.sizes": _sizes, "condition.window": _window, "condition.num_samples": _int(1), "condition.batch_size": _int(1),
    "condition.seed": _int(), "condition.guide_start": _int(0), "condition.guide_stop": _int(-1),
    "condition.guide_every": _int(1), "condition.clip_checkpoint": _str,
    "condition.clip_vocab": _str, "condition.out_dir": _folder,
    # condition.init_image, start, fit_steps, fit_lr, fit_zeta: checks.check_start_and_fit
    "eval.real_dir": _folder, "eval.fake_dir": _folder, "eval.resolution": _int(1),
    "eval.inception_weights": _str, "eval.patch_sizes": _ints(1, empty=True),
    "eval.batch_size": _int(1), "eval.max_images": _int(0), "eval.recon_resolutions": _ints(1),
    "eval.scale_consistency_base": _int(1), "eval.scale_factors": _ints(1),
    "t2i.sd_weights": _str, "t2i.vocab": _str,
    "t2i.caption_feature": lambda v: "" if isinstance(v, str) and v else "must be a feature name",
    "t2i.uncond_prob": _num(0, 1), "t2i.prompts": _prompts, "t2i.guidance_scale": _num(0),
    "ckpt.ae_checkpoint": _str, "ckpt.dm_checkpoint": _str,
    "mesh.data": lambda v: "" if v == -1 or (is_int(v) and v >= 1) else "must be -1 or >= 1",
    "mesh.fsdp": lambda v: "" if v == -1 or (is_int(v) and v >= 1) else "must be -1 or >= 1",
    "mesh.rules": _mesh_rules,
}


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def _fail(key: str, value: Any, problem: str) -> None:
  raise UserError(f"config.{key}={value!r}: {problem}")


def _need_file(key: str, path: str, folder: bool = False) -> None:
  """A local file (or folder) the run reads must exist now, not hours in."""
  if is_local(path) and not (os.path.isdir if folder else os.path.exists)(os.path.expanduser(path)):
    _fail(key, path, f"{'folder ' if folder else ''}not found")


def check_config(config: ml_collections.ConfigDict, workdir: str | None = None, *,
                 adopted: bool = False) -> None:
  """Raises UserError naming the first bad setting (no jax, no data read, nothing compiled).

  Args:
    config: the whole config.
    workdir: the run's workdir (for defaults that live in it, e.g. samples to evaluate).
    adopted: the architecture and learned values were read from the checkpoints
      (`trained.adopt_architecture`), so sampling knows its latent scale.
  """
  for key, rule in RULES.items():
    value = _get(config, key)
    problem = rule(value)
    if problem:
      _fail(key, value, problem)
  stage = config.stage
  checks.check_start_and_fit(config.condition, sampling=stage == "condition")
  _check_models(config)
  _check_data(config)
  # (A text-to-image model scales its latents by its SD checkpoint's scaling_factor instead.)
  if (adopted and stage in ("sample", "condition") and not config.diffusion.latent_scale
      and not config.t2i.sd_weights):
    _fail("diffusion.latent_scale", 0.0, "no stage-2 checkpoint learned a scale: set the one "
          "the UNet was trained at (1.0 unless it was changed)")
  sc = config.sample
  for section in {"sample": ("sample",), "all": ("sample",), "condition": ("condition",),
                  "t2i": ("sample",)}.get(
      stage, ()):
    checks.plan_sizes(config[section].sizes, config[section].window, tile=sc.tile,
                      stream_above=sc.stream_above, name=f"config.{section}")
  if stage in ("dm", "sample", "condition", "eval"):
    for part in ("ae", "dm"):
      _need_file(f"ckpt.{part}_checkpoint", config.ckpt[f"{part}_checkpoint"])
  if stage == "condition":
    _check_condition(config)
  if stage in ("t2i_unet", "t2i") or (stage == "ae" and config.ae.kl_encoder
                                      and config.t2i.sd_weights):
    _check_t2i(config)
  if stage == "eval":
    _check_eval(config, workdir)


def _check_models(config: ml_collections.ConfigDict) -> None:
  for key, width, groups in (
      ("ae.ch", config.ae.ch, config.ae.norm_groups),
      ("ae.renderer_hidden", config.ae.renderer_hidden, config.ae.norm_groups),
      ("dm.model_channels", config.dm.model_channels, config.dm.norm_groups)):
    if width % groups:
      _fail(key, width, f"must be a multiple of {groups} (GroupNorm has {groups} groups, "
                        f"config.{key.split('.')[0]}.norm_groups)")
  dm = config.dm
  for level, mult in enumerate(dm.channel_mult):
    if 2 ** level in dm.attention_resolutions and (dm.model_channels * mult) % dm.num_head_channels:
      _fail("dm.num_head_channels", dm.num_head_channels,
            f"must divide the {dm.model_channels * mult} channels of level {level}, which has "
            "attention")
  if dm.attention_impl == "cudnn" and config.train.compute_dtype == "float32":
    _fail("dm.attention_impl", dm.attention_impl, "needs --config.train.compute_dtype=bfloat16 "
          "(cuDNN attention has no float32 kernel)")
  d = config.diffusion
  if not d.beta_start < d.beta_end:
    _fail("diffusion.beta_end", d.beta_end, f"must exceed diffusion.beta_start={d.beta_start}")
  if d.sample_steps > d.num_train_steps:
    _fail("diffusion.sample_steps", d.sample_steps, f"use 1..{d.num_train_steps}")
  if not d.latent_scale and not config.train.latent_cache:
    _fail("diffusion.latent_scale", 0.0, "0 (1 / std of the training latents) needs "
          "config.train.latent_cache=True")
  if config.mesh.data == -1 and config.mesh.fsdp == -1:
    _fail("mesh.fsdp", -1, "only one of mesh.data and mesh.fsdp may be -1")


def _check_data(config: ml_collections.ConfigDict) -> None:
  d = config.data
  factor = 2 ** (len(config.ae.ch_mult) - 1)
  if d.inp_res % factor:
    _fail("data.inp_res", d.inp_res, f"must be a multiple of {factor} (the encoder halves it "
          f"{len(config.ae.ch_mult) - 1} times, config.ae.ch_mult={tuple(config.ae.ch_mult)})")
  if not d.patch <= d.gt_res_min <= d.gt_res_max:
    raise UserError(f"config.data: need patch <= gt_res_min <= gt_res_max, got patch={d.patch}, "
                    f"gt_res_min={d.gt_res_min}, gt_res_max={d.gt_res_max}")
  if "://" in d.data_dir:
    _fail("data.data_dir", d.data_dir, "prepared datasets are ArrayRecord files read with "
          "local file I/O; use a local or mounted directory (e.g. a gcsfuse mount of the "
          "bucket) that every host can read")
  if config.stage not in _DATA_VARIANTS:
    return
  from infd_jax.data import prepare, sources  # pylint: disable=g-import-not-at-top  (no jax)
  if d.name not in sources.BUILDERS:
    _fail("data.name", d.name, f"choose one of {', '.join(sorted(sources.BUILDERS))}")
  for key in _DATA_VARIANTS[config.stage]:
    try:
      prepare.configs_needed(d.name, d[key] or None)
    except ValueError as e:
      _fail(f"data.{key}", d[key], str(e))
  _need_file("data.source", d.source, folder=True)


def _check_condition(config: ml_collections.ConfigDict) -> None:
  cc = config.condition
  checks.parse_regions(cc.regions, clip_files=(cc.clip_checkpoint, cc.clip_vocab))
  if cc.guide_start >= config.diffusion.sample_steps:
    _fail("condition.guide_start", cc.guide_start, "must be below diffusion.sample_steps="
          f"{config.diffusion.sample_steps} (0 = the noisiest step)")


def _check_t2i(config: ml_collections.ConfigDict) -> None:
  """The converted SD folder, the BPE vocabulary and (to generate) the prompts."""
  tc = config.t2i
  if config.stage != "ae":
    if not tc.vocab:
      _fail("t2i.vocab", "", "name CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)")
    _need_file("t2i.vocab", tc.vocab)
  if not tc.sd_weights:
    _fail("t2i.sd_weights", "", "name the folder written by python -m infd_jax.convert.sd")
  _need_file("t2i.sd_weights", tc.sd_weights, folder=True)
  if is_local(tc.sd_weights) and not os.path.isfile(
      os.path.join(os.path.expanduser(tc.sd_weights), "meta.json")):
    _fail("t2i.sd_weights", tc.sd_weights, "holds no meta.json: not an output of "
          "python -m infd_jax.convert.sd")
  if config.stage == "t2i" and not tc.prompts:
    _fail("t2i.prompts", tuple(tc.prompts), "give at least one prompt, e.g. "
          "--config.t2i.prompts='(\"a red apple\",)'")


def _check_eval(config: ml_collections.ConfigDict, workdir: str | None) -> None:
  ec = config.eval
  if not ec.real_dir and not config.data.data_dir:
    raise UserError("eval: nothing to evaluate; set eval.real_dir and/or data.data_dir")
  _need_file("eval.real_dir", ec.real_dir, folder=True)
  _need_file("eval.inception_weights", ec.inception_weights)
  fake_dir = ec.fake_dir or (workdir and os.path.join(workdir, "samples", str(ec.resolution)))
  if ec.real_dir and fake_dir and is_local(fake_dir) and not os.path.isdir(fake_dir):
    raise UserError(f"eval: no generated images in {fake_dir}; run --config.stage=sample first "
                    "or set --config.eval.fake_dir")


def check_devices(config: ml_collections.ConfigDict, devices: int, processes: int,
                  platform: str, x64: bool = False) -> tuple[int, int]:
  """The settings that depend on the machine and JAX (x64: `jax_enable_x64`); returns the
  mesh shape (data, fsdp)."""
  mesh = checks.mesh_shape(config.mesh.data, config.mesh.fsdp, devices)
  settings = {"ae": ("train.ae_batch_size",), "dm": ("train.dm_batch_size",),
              "t2i_unet": ("train.dm_batch_size",),
              "all": ("train.ae_batch_size", "train.dm_batch_size")}.get(config.stage, ())
  for setting in settings:
    problem = checks.batch_layout_problem(setting, _get(config, setting), mesh, processes)
    if problem:
      raise UserError(problem)
  if config.train.compute_dtype == "float64" and not x64:
    _fail("train.compute_dtype", "float64", "needs JAX's x64 mode (JAX_ENABLE_X64=1); use "
          "float32 or bfloat16")
  if config.dm.attention_impl == "cudnn" and platform != "gpu":
    _fail("dm.attention_impl", "cudnn", f"needs an NVIDIA GPU; this run is on {platform}: use "
          "'xla'")
  return mesh


