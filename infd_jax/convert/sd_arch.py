"""The architecture of a Stable Diffusion checkpoint: constructor kwargs of `SDUNet`,
`KLAutoencoder` and `TextTransformer`, the training objective and the schedule.

Read from a diffusers folder's JSON configs, or from the shapes of a single
original file (what the shapes cannot tell: attention heads, GroupNorm groups
and the objective, which default to the released models' values, SD 1.x or
2.x by the text tower's layout, and can be overridden). Anything outside SD
1.x / 2.x (SDXL's added embeddings, other blocks or activations) raises
ConversionError naming the setting.
"""

import re
from typing import Any, Mapping

from infd_jax.convert.architecture import ConversionError

Shapes = Mapping[str, tuple[int, ...]]
Arch = dict[str, Any]

SCALING_FACTOR = 0.18215  # SD 1.x / 2.x latent scale
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, num_steps=1000)  # scaled-linear
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v"}


def _heads(heads: Any, channels: list[int]) -> dict[str, int]:
  """diffusers' per-level head counts -> num_heads or num_head_channels."""
  per_level = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
  if len(set(per_level)) == 1:
    return dict(num_heads=per_level[0], num_head_channels=-1)
  widths = {c // h for c, h in zip(channels, per_level)}
  if len(widths) == 1 and all(c % h == 0 for c, h in zip(channels, per_level)):
    return dict(num_heads=-1, num_head_channels=widths.pop())
  raise ConversionError(f"unet: attention heads {per_level} for widths {channels} are neither "
                        "a constant count nor a constant width")


def _require(part: str, config: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
  bad = [f"{k}={config.get(k)!r} (supported: {v!r})" for k, v in expected.items()
         if config.get(k, v) != v]
  if bad:
    raise ConversionError(f"{part}: unsupported settings {', '.join(bad)}")


def unet_from_config(c: Mapping[str, Any]) -> Arch:
  """SDUNet kwargs of a diffusers `unet/config.json`."""
  _require("unet", c, dict(class_embed_type=None, addition_embed_type=None,
                           time_cond_proj_dim=None, flip_sin_to_cos=True, freq_shift=0,
                           act_fn="silu", norm_eps=1e-5, resnet_time_scale_shift="default",
                           mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
                           dual_cross_attention=False, conv_in_kernel=3, conv_out_kernel=3,
                           encoder_hid_dim=None))
  channels = list(c["block_out_channels"])
  mc = channels[0]
  down = list(c["down_block_types"])
  if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
    raise ConversionError(f"unet: unsupported down_block_types {down}")
  depth = c.get("transformer_layers_per_block", 1)
  if not isinstance(depth, int):
    raise ConversionError(f"unet: per-level transformer_layers_per_block {depth} unsupported")
  heads = c.get("num_attention_heads") or c["attention_head_dim"]
  return dict(model_channels=mc, channel_mult=tuple(ch // mc for ch in channels),
              num_res_blocks=c["layers_per_block"],
              attention_resolutions=tuple(2 ** i for i, t in enumerate(down) if "CrossAttn" in t),
              **_heads(heads, channels), context_dim=c["cross_attention_dim"],
              transformer_depth=depth, in_channels=c["in_channels"],
              out_channels=c["out_channels"], norm_groups=c["norm_num_groups"])


def vae_from_config(c: Mapping[str, Any]) -> Arch:
  """KLAutoencoder kwargs of a diffusers `vae/config.json`."""
  _require("vae", c, dict(in_channels=3, out_channels=3, act_fn="silu",
                          mid_block_add_attention=True))
  channels = list(c["block_out_channels"])
  return dict(ch=channels[0], ch_mult=tuple(ch // channels[0] for ch in channels),
              num_res_blocks=c["layers_per_block"], z_channels=c["latent_channels"],
              norm_groups=c["norm_num_groups"])


def text_from_config(c: Mapping[str, Any]) -> Arch:
  """TextTransformer kwargs of a transformers `text_encoder/config.json`."""
  if c.get("hidden_act") not in ("quick_gelu", "gelu"):
    raise ConversionError(f"text: unsupported hidden_act={c.get('hidden_act')!r}")
  if c["intermediate_size"] != 4 * c["hidden_size"]:
    raise ConversionError(f"text: intermediate_size={c['intermediate_size']} is not 4 x "
                          f"hidden_size={c['hidden_size']}")
  return dict(vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"],
              width=c["hidden_size"], heads=c["num_attention_heads"],
              layers=c["num_hidden_layers"], quick_gelu=c["hidden_act"] == "quick_gelu")


def schedule_from_config(c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """(objective "eps" | "v", schedule kwargs) of a diffusers `scheduler_config.json`."""
  _require("scheduler", c, dict(beta_schedule="scaled_linear"))
  prediction = c.get("prediction_type", "epsilon")
  if prediction not in PREDICTIONS:
    raise ConversionError(f"scheduler: unsupported prediction_type={prediction!r}")
  return PREDICTIONS[prediction], dict(beta_start=c["beta_start"], beta_end=c["beta_end"],
                                       num_steps=c["num_train_timesteps"])


# ---- from the shapes of an original-layout state dict (prefixes removed)


def _indices(shapes: Shapes, pattern: str) -> list[int]:
  rx = re.compile(pattern)
  return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def unet_from_shapes(s: Shapes, sd2: bool) -> Arch:
  """SDUNet kwargs from `input_blocks...` shapes; heads by family (8, or 64 per head)."""
  try:
    mc, in_ch = s["input_blocks.0.0.weight"][:2]
    levels, blocks, attention, ds = [], 0, [], 1
    for n in _indices(s, r"^input_blocks\.(\d+)\.")[1:]:
      if f"input_blocks.{n}.0.op.weight" in s:
        ds *= 2
        continue
      while len(levels) < ds.bit_length():
        levels.append([])
      levels[-1].append(s[f"input_blocks.{n}.0.in_layers.2.weight"][0])
      if f"input_blocks.{n}.1.norm.weight" in s and ds not in attention:
        attention.append(ds)
      blocks += 1
    per_level = {len(lv) for lv in levels}
    if len(per_level) != 1:
      raise ConversionError(f"unet: unequal res blocks per level {[len(lv) for lv in levels]}")
    depth = len(_indices(s, r"^middle_block\.1\.transformer_blocks\.(\d+)\."))
    context = s["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
    return dict(model_channels=mc, channel_mult=tuple(lv[0] // mc for lv in levels),
                num_res_blocks=per_level.pop(), attention_resolutions=tuple(sorted(attention)),
                num_heads=-1 if sd2 else 8, num_head_channels=64 if sd2 else -1,
                context_dim=context, transformer_depth=depth, in_channels=in_ch,
                out_channels=s["out.2.weight"][0], norm_groups=32)
  except KeyError as e:
    raise ConversionError(f"unet: not an SD UNet, no {e.args[0]}") from None


def vae_from_shapes(s: Shapes) -> Arch:
  """KLAutoencoder kwargs from `encoder...` shapes (GroupNorm groups 32)."""
  try:
    ch = s["encoder.conv_in.weight"][0]
    levels = _indices(s, r"^encoder\.down\.(\d+)\.block\.0\.conv2\.weight$")
    return dict(ch=ch, ch_mult=tuple(s[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch
                                     for i in levels),
                num_res_blocks=len(_indices(s, r"^encoder\.down\.0\.block\.(\d+)\.conv1\.weight$")),
                z_channels=s["quant_conv.weight"][0] // 2, norm_groups=32)
  except KeyError as e:
    raise ConversionError(f"vae: not an SD autoencoder, no {e.args[0]}") from None


def text_from_shapes(s: Shapes, sd2: bool, head_width: int = 64) -> Arch:
  """TextTransformer kwargs from OpenCLIP-layout shapes; SD 2.x drops the last block."""
  try:
    width = s["ln_final.weight"][0]
    layers = len(_indices(s, r"^transformer\.resblocks\.(\d+)\."))
    return dict(vocab_size=s["token_embedding.weight"][0],
                context_length=s["positional_embedding"][0], width=width,
                heads=width // head_width, layers=layers - 1 if sd2 else layers,
                quick_gelu=not sd2)
  except KeyError as e:
    raise ConversionError(f"text: not a CLIP text tower, no {e.args[0]}") from None
