"""CLIP (Radford et al. 2021) in linen: a ViT image tower and a causal text transformer.

The layer order and names follow the OpenAI / OpenCLIP state dicts, so a
converted checkpoint is a mechanical rename (see `infd_jax.clip.convert`):
`visual.transformer.resblocks.3.attn.in_proj_weight` ->
`visual/transformer/resblocks_3/attn/in_proj/kernel`. Pre-norm residual blocks
(LayerNorm eps 1e-5), the class token pooled after `ln_post`, the text pooled at
the end-of-text token (the largest token id) after `ln_final`. OpenAI's weights
use QuickGELU (x * sigmoid(1.702 x)); most OpenCLIP weights use exact GELU.
Activations are [B, L, C]; images NHWC, already normalised with `MEAN`/`STD`.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
LN_EPS = 1e-5
# The CLIP preprocessing: RGB in [0, 1] minus MEAN, divided by STD.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture of one CLIP model (the fields of `CLIP`)."""
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  context_length: int
  vocab_size: int
  text_width: int
  text_heads: int
  text_layers: int
  quick_gelu: bool


def _preset(embed, patch, v_width, v_layers, t_width, t_layers, image=224):
  return dict(embed_dim=embed, image_size=image, patch_size=patch, vision_width=v_width,
              vision_layers=v_layers, vision_heads=v_width // 64, context_length=77,
              vocab_size=49408, text_width=t_width, text_heads=t_width // 64,
              text_layers=t_layers)


# OpenAI's released ViTs (OpenCLIP names); quick_gelu is set by the weights' origin.
PRESETS = {
    "ViT-B-32": _preset(512, 32, 768, 12, 512, 12),
    "ViT-B-16": _preset(512, 16, 768, 12, 512, 12),
    "ViT-L-14": _preset(768, 14, 1024, 24, 768, 12),
    "ViT-L-14-336": _preset(768, 14, 1024, 24, 768, 12, image=336),
}


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention: packed q/k/v projection `in_proj`, then `out_proj`."""
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
    b, n, c = x.shape
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="in_proj")(x)
    q, k, v = (t.reshape(b, n, self.heads, c // self.heads) for t in jnp.split(qkv, 3, axis=-1))
    mask = jnp.tril(jnp.ones((n, n), bool))[None, None] if causal else None
    out = nn.dot_product_attention(q, k, v, mask=mask, dtype=self.dtype)
    return nn.Dense(c, dtype=self.dtype, name="out_proj")(out.reshape(b, n, c))


class ResidualAttentionBlock(nn.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a 4x MLP `c_fc` -> GELU -> `c_proj`."""
  heads: int
  quick_gelu: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, causal: bool) -> jax.Array:
    c = x.shape[-1]
    ln = lambda name: nn.LayerNorm(LN_EPS, dtype=jnp.float32, name=name)
    x = x + MultiheadAttention(self.heads, self.dtype, name="attn")(ln("ln_1")(x), causal)
    h = nn.Dense(4 * c, dtype=self.dtype, name="c_fc")(ln("ln_2")(x))
    h = h * jax.nn.sigmoid(1.702 * h) if self.quick_gelu else jax.nn.gelu(h, approximate=False)
    return x + nn.Dense(c, dtype=self.dtype, name="c_proj")(h).astype(x.dtype)


class Transformer(nn.Module):
  """`layers` residual blocks named resblocks_<i> (the torch `resblocks.<i>`)."""
  layers: int
  heads: int
  quick_gelu: bool
  causal: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.heads, self.quick_gelu, self.dtype,
                                 name=f"resblocks_{i}")(x, self.causal)
    return x


class VisionTransformer(nn.Module):
  """Normalised images [B, S, S, 3] -> image embeddings [B, embed_dim] (not L2-normalised)."""
  embed_dim: int
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  quick_gelu: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p, grid = self.patch_size, self.image_size // self.patch_size
    scale = self.width ** -0.5
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                dtype=self.dtype, name="conv1")(images)
    x = x.reshape(x.shape[0], grid * grid, self.width)
    cls = self.param("class_embedding", nn.initializers.normal(scale), (self.width,))
    pos = self.param("positional_embedding", nn.initializers.normal(scale),
                     (grid * grid + 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype), x],
                        axis=1) + pos
    x = nn.LayerNorm(LN_EPS, dtype=jnp.float32, name="ln_pre")(x)
    x = Transformer(self.layers, self.heads, self.quick_gelu, causal=False, dtype=self.dtype,
                    name="transformer")(x)
    x = nn.LayerNorm(LN_EPS, dtype=jnp.float32, name="ln_post")(x[:, 0])
    proj = self.param("proj", nn.initializers.normal(scale), (self.width, self.embed_dim))
    return x @ proj


class CLIP(nn.Module):
  """Image and text towers; `encode_image` / `encode_text` return unnormalised embeddings."""
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  context_length: int
  vocab_size: int
  text_width: int
  text_heads: int
  text_layers: int
  quick_gelu: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    self.visual = VisionTransformer(self.embed_dim, self.image_size, self.patch_size,
                                    self.vision_width, self.vision_layers, self.vision_heads,
                                    self.quick_gelu, self.dtype)
    self.token_embedding = nn.Embed(self.vocab_size, self.text_width,
                                    embedding_init=nn.initializers.normal(0.02))
    self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.01),
                                           (self.context_length, self.text_width))
    self.transformer = Transformer(self.text_layers, self.text_heads, self.quick_gelu,
                                   causal=True, dtype=self.dtype)
    self.ln_final = nn.LayerNorm(LN_EPS, dtype=jnp.float32)
    self.text_projection = self.param("text_projection",
                                      nn.initializers.normal(self.text_width ** -0.5),
                                      (self.text_width, self.embed_dim))
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), ())

  def encode_image(self, images: jax.Array) -> jax.Array:
    """Normalised images [B, image_size, image_size, 3] -> [B, embed_dim]."""
    return self.visual(images)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """Token ids [B, context_length] (from `tokenizer.Tokenizer`) -> [B, embed_dim]."""
    x = self.token_embedding(tokens) + self.positional_embedding
    x = self.ln_final(self.transformer(x.astype(self.dtype)))
    eot = jnp.argmax(tokens, axis=-1)  # the end-of-text token has the largest id
    return x[jnp.arange(x.shape[0]), eot] @ self.text_projection

  def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encode_image(images), self.encode_text(tokens)


def preprocess(images: jax.Array, size: int) -> jax.Array:
  """Images [B, h, w, 3] in [-1, 1] -> the CLIP input [B, size, size, 3] (differentiable).

  The whole image is resized (antialiased bicubic, no crop) and normalised with MEAN/STD.
  """
  x = jax.image.resize(images.astype(jnp.float32) * 0.5 + 0.5,
                       (images.shape[0], size, size, 3), "bicubic", antialias=True)
  return (x - jnp.asarray(MEAN)) / jnp.asarray(STD)
