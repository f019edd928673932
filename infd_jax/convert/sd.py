"""Imports Stable Diffusion 1.x / 2.x weights into `SDUNet`, `KLAutoencoder` and
`TextTransformer` parameters, without torch.

Inputs (nothing pickled is executed):
  * a diffusers folder: `unet/`, `vae/`, `text_encoder/` (each a `config.json`
    and `*.safetensors`) and `scheduler/scheduler_config.json`;
  * a single original (CompVis / Stability) file, `.safetensors`, or `.ckpt`
    through the restricted unpickler (`torch_pickle`), optionally under
    `state_dict`: `model.diffusion_model.`, `first_stage_model.` and
    `cond_stage_model.transformer.text_model.` (SD 1.x, Hugging Face layout) or
    `cond_stage_model.model.` (SD 2.x, OpenCLIP layout).

Every key is mapped (`sd_layout` renames diffusers' keys into the original
layout, then `mapping.plan` places UNet and VAE keys, `clip.convert.flax_rule`
the text keys). Dropped on purpose, by name: LDM's schedule buffers (with
`alphas_cumprod` checked against the scaled-linear schedule), `model_ema.*`
(EMA copies; the `model.diffusion_model` weights are taken), the VAE
training loss (`first_stage_model.loss.*`), `position_ids`, and in SD 2.x the
OpenCLIP blocks past the penultimate one, `text_projection` and
`logit_scale`. Unknown keys, unfilled parameters and shape mismatches stop the
import with their names.

Output (`save`/`load`): DIR/params (orbax: {'unet', 'vae', 'text'}) and
DIR/meta.json ({'format': 'stable_diffusion', 'unet', 'vae', 'text' kwargs,
'prediction', 'scaling_factor', 'schedule', 'source'}).

    python -m infd_jax.convert.sd --input=stable-diffusion-v1-5 --output=sd15
    python -m infd_jax.convert.sd --input=v2-1_768-ema-pruned.ckpt --output=sd21 --prediction=v
"""

import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from infd_jax.clip import convert as clip_convert
from infd_jax.clip.text import TextTransformer
from infd_jax.convert import mapping, sd_arch, sd_layout, torch_pickle
from infd_jax.convert.architecture import ConversionError
from infd_jax.diffusion import schedules
from infd_jax.models.sd_unet import SDUNet
from infd_jax.models.sd_vae import KLAutoencoder

PyTree = Any
PARTS = ("unet", "vae", "text")
FORMAT = "stable_diffusion"
_PREFIXES: mapping.Prefixes = (
    ("model.diffusion_model.", "unet", ()),
    ("first_stage_model.quant_conv.", "vae", ("encoder", "quant_conv")),
    ("first_stage_model.post_quant_conv.", "vae", ("decoder", "post_quant_conv")),
    ("first_stage_model.", "vae", ()),
)
_SD1_TEXT = "cond_stage_model.transformer."
_SD2_TEXT = "cond_stage_model.model."
_LDM_BUFFERS = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_(one_minus_|recip_|recipm1_)?alphas_cumprod|"
    r"log_one_minus_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])|"
    r"logvar|model_ema\..*|first_stage_model\.loss\..*)$")
_TEXT_UNUSED = re.compile(r"^(text_projection|logit_scale|attn_mask)$")


def _read_json(path: epath.Path) -> dict[str, Any]:
  if not path.exists():
    raise FileNotFoundError(f"{path} not found (not a diffusers Stable Diffusion folder?)")
  return json.loads(path.read_text())


def _read_weights(folder: epath.Path) -> dict[str, np.ndarray]:
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"no .safetensors weights in {folder}")
  files = [f for f in files if ".fp16." not in f.name] or files  # prefer the full-precision copy
  out = {}
  for f in files:
    out.update(clip_convert.read_safetensors(f))
  return out


def read_diffusers(folder: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict in the original layout, architecture) of a diffusers folder."""
  d = epath.Path(folder)
  configs = {p: _read_json(d / p / "config.json") for p in ("unet", "vae", "text_encoder")}
  prediction, schedule = sd_arch.schedule_from_config(
      _read_json(d / "scheduler" / "scheduler_config.json"))
  unet_c, vae_c = configs["unet"], configs["vae"]
  sd = {"model.diffusion_model." + k: v for k, v in sd_layout.unet_from_diffusers(
      _read_weights(d / "unet"), unet_c["layers_per_block"], unet_c["up_block_types"]).items()}
  sd.update({"first_stage_model." + k: v for k, v in sd_layout.vae_from_diffusers(
      _read_weights(d / "vae"), len(vae_c["block_out_channels"])).items()})
  sd.update({_SD2_TEXT + k: v for k, v in sd_layout.text_from_hf(
      _read_weights(d / "text_encoder")).items()})
  arch = dict(unet=sd_arch.unet_from_config(unet_c), vae=sd_arch.vae_from_config(vae_c),
              text=sd_arch.text_from_config(configs["text_encoder"]), prediction=prediction,
              scaling_factor=vae_c.get("scaling_factor", sd_arch.SCALING_FACTOR),
              schedule=schedule)
  return sd, arch


def read_single_file(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict in the original layout, architecture) of a single original file.

  `overrides`: {'unet' | 'vae' | 'text': kwargs, 'text_head_width': int,
  'prediction': 'eps' | 'v', 'scaling_factor': float} for what shapes do not
  tell. SD 2.x files need 'prediction' (768-v models are 'v', base models 'eps').
  """
  path, overrides = epath.Path(path), dict(overrides or {})
  if path.suffix == ".safetensors":
    sd = clip_convert.read_safetensors(path)
  else:
    sd = torch_pickle.load_torch_state_dict(path)
    sd = sd.get("state_dict", sd) if isinstance(sd, Mapping) else sd
  if not isinstance(sd, Mapping):
    raise ConversionError(f"{path}: expected a state dict, found {type(sd).__name__}")
  sd2 = any(k.startswith(_SD2_TEXT) for k in sd)
  if not sd2:  # SD 1.x: the Hugging Face text layout -> OpenCLIP's
    text = sd_layout.text_from_hf({k[len(_SD1_TEXT):]: v for k, v in sd.items()
                                   if k.startswith(_SD1_TEXT)})
    sd = {**{k: v for k, v in sd.items() if not k.startswith(_SD1_TEXT)},
          **{_SD2_TEXT + k: v for k, v in text.items()}}
  if sd2 and "prediction" not in overrides:
    raise ConversionError(f"{path} is an SD 2.x checkpoint: say its objective with "
                          "--prediction=v (768-v models) or --prediction=eps (base models)")
  shapes = lambda prefix: {k[len(prefix):]: np.shape(v) for k, v in sd.items()
                           if k.startswith(prefix)}
  first_stage = shapes("first_stage_model.")
  arch = dict(unet=sd_arch.unet_from_shapes(shapes("model.diffusion_model."), sd2),
              vae=sd_arch.vae_from_shapes(first_stage),
              text=sd_arch.text_from_shapes(shapes(_SD2_TEXT), sd2,
                                            overrides.get("text_head_width", 64)),
              prediction=overrides.get("prediction", "eps"),
              scaling_factor=overrides.get("scaling_factor", sd_arch.SCALING_FACTOR),
              schedule=dict(sd_arch.SCHEDULE))
  for part in PARTS:
    arch[part].update(overrides.get(part, {}))
  if "alphas_cumprod" in sd:
    want = schedules.scaled_linear_schedule(**arch["schedule"]).alphas_cumprod
    got = np.asarray(sd["alphas_cumprod"], np.float64)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5):
      raise ConversionError(f"{path}: alphas_cumprod is not SD's scaled-linear schedule "
                            f"{arch['schedule']}")
  return dict(sd), arch


def _target_shapes(part: str, kwargs: Mapping[str, Any]) -> PyTree:
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  if part == "unet":
    s = 2 ** len(kwargs["channel_mult"])
    model = SDUNet(**kwargs)
    inputs = (f32(1, s, s, kwargs["in_channels"]), jax.ShapeDtypeStruct((1,), jnp.int32),
              f32(1, 2, kwargs["context_dim"]))
  elif part == "vae":
    s = 2 ** len(kwargs["ch_mult"])
    model, inputs = KLAutoencoder(**kwargs), (f32(1, s, s, 3),)
  else:
    model, inputs = TextTransformer(**kwargs), (jax.ShapeDtypeStruct((1, 2), jnp.int32),)
  init = lambda *x: model.init(jax.random.PRNGKey(0), *x)
  return mapping._unboxed_shapes(jax.eval_shape(init, *inputs))  # pylint: disable=protected-access


def _text_params(sd: Mapping[str, np.ndarray], kwargs: Mapping[str, Any]) -> PyTree:
  """OpenCLIP-layout text keys (prefix removed) -> TextTransformer params; raises naming keys."""
  wanted = {"/".join(p): s for p, s in mapping._flatten(  # pylint: disable=protected-access
      _target_shapes("text", kwargs)["params"]).items()}
  flat, unknown, bad = {}, [], []
  for key, value in sd.items():
    m = re.match(r"^transformer\.resblocks\.(\d+)\.", key)
    if _TEXT_UNUSED.match(key) or (m and int(m.group(1)) >= kwargs["layers"]):
      continue  # the pooled projection, and SD 2's blocks past the penultimate one
    rule = clip_convert.flax_rule(key)
    if rule is None or rule[0] not in wanted:
      unknown.append(_SD2_TEXT + key)
      continue
    value = np.asarray(value, np.float32)
    value = np.ascontiguousarray(rule[1](value) if rule[1] else value)
    if value.shape != wanted[rule[0]]:
      bad.append(f"{_SD2_TEXT}{key} {value.shape} vs text/{rule[0]} {wanted[rule[0]]}")
    flat[rule[0]] = value
  missing = sorted(f"text/{k}" for k in set(wanted) - set(flat))
  if unknown or missing or bad:
    raise ConversionError("text encoder does not match: " + "; ".join(
        f"{what}: {', '.join(items)}" for what, items in
        (("unknown keys", sorted(unknown)), ("missing parameters", missing),
         ("shape mismatches", bad)) if items))
  return clip_convert.unflatten(flat)


def to_flax(sd: Mapping[str, np.ndarray], arch: Mapping[str, Any]) -> dict[str, PyTree]:
  """{'unet', 'vae', 'text'} param trees (float32) from an original-layout state dict."""
  text = {k[len(_SD2_TEXT):]: v for k, v in sd.items() if k.startswith(_SD2_TEXT)}
  rest = {k: np.shape(v) for k, v in sd.items()
          if not k.startswith(_SD2_TEXT) and not _LDM_BUFFERS.match(k)}
  targets = {p: _target_shapes(p, arch[p]) for p in ("unet", "vae")}
  trees = mapping.apply(mapping.plan(rest, targets, _PREFIXES), sd)
  return dict(unet=trees["unet"]["params"], vae=trees["vae"]["params"],
              text=_text_params(text, arch["text"]))


def read(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None
         ) -> tuple[dict[str, PyTree], dict[str, Any]]:
  """(param trees, architecture) of a diffusers folder or a single original file."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"Stable Diffusion checkpoint {path} not found")
  if path.is_dir():
    sd, arch = read_diffusers(path)
    for part in PARTS:
      arch[part].update((overrides or {}).get(part, {}))
  else:
    sd, arch = read_single_file(path, overrides)
  return to_flax(sd, arch), arch


def save(directory: str | os.PathLike, trees: dict[str, PyTree], arch: Mapping[str, Any],
         source: str) -> None:
  mapping.save_converted(directory, trees, dict(format=FORMAT, source=source, **arch))


def load(directory: str | os.PathLike) -> tuple[dict[str, PyTree], dict[str, Any]]:
  """(param trees, architecture) of an imported checkpoint; kwargs lists come back as tuples."""
  meta = json.loads((epath.Path(directory) / "meta.json").read_text())
  if meta.get("format") != FORMAT:
    raise ConversionError(f"{directory} is not an imported Stable Diffusion checkpoint")
  for part in PARTS:
    meta[part] = {k: tuple(v) if isinstance(v, list) else v for k, v in meta[part].items()}
  return mapping.load_converted(directory), meta


def main(argv: list[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m infd_jax.convert.sd",
                              description=__doc__.split("\n")[0])
  p.add_argument("--input", required=True, help="diffusers folder, .safetensors or .ckpt")
  p.add_argument("--output", required=True, help="output folder (must not hold params/)")
  p.add_argument("--prediction", choices=("eps", "v"), default=None,
                 help="the objective (single files; SD 2.x files need it)")
  p.add_argument("--arch", default="{}",
                 help='JSON overrides, e.g. {"unet": {"norm_groups": 32}, "text_head_width": 64}')
  args = p.parse_args(argv)
  try:
    overrides = json.loads(args.arch)
  except json.JSONDecodeError as e:
    p.error(f"--arch is not JSON: {e}")
  if args.prediction:
    overrides["prediction"] = args.prediction
  if (epath.Path(args.output) / "params").exists():
    p.error(f"{args.output}/params already exists; choose a fresh --output")
  if not epath.Path(args.input).exists():
    p.error(f"--input {args.input} does not exist")
  try:
    trees, arch = read(args.input, overrides)
  except (FileNotFoundError, ConversionError, torch_pickle.CheckpointFormatError,
          torch_pickle.UnsafeCheckpointError) as e:
    print(f"infd_jax.convert.sd: error: {e}")
    return 2
  save(args.output, trees, arch, str(args.input))
  for part in PARTS:
    print(f"{part}: {arch[part]} ({mapping.param_count(trees[part]):,d} values)")
  print(f"prediction={arch['prediction']} scaling_factor={arch['scaling_factor']} -> {args.output}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
