"""CLIP text towers as Stable Diffusion uses them: token ids -> per-token context [B, L, C].

The causal text transformer of `model.CLIP` without the pooling and projection:
`token_embedding` + `positional_embedding`, `layers` residual blocks, `ln_final`
on every position. SD 1.x takes OpenAI's ViT-L/14 text tower (12 layers, 768
wide, QuickGELU; `transformers.CLIPTextModel`'s `last_hidden_state`); SD 2.x
takes OpenCLIP's ViT-H/14 text tower up to its penultimate block (23 of 24
layers, 1024 wide, GELU), then `ln_final`. Parameter names are OpenCLIP's
(`transformer/resblocks_3/attn/in_proj/kernel`); `infd_jax.convert.sd` maps
the Hugging Face layout onto them.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from infd_jax.clip.model import LN_EPS, Transformer

Dtype = Any


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The fields of `TextTransformer` that describe an architecture."""
  vocab_size: int
  context_length: int
  width: int
  heads: int
  layers: int
  quick_gelu: bool


# SD 1.x's CLIP ViT-L/14 text tower; SD 2.x's OpenCLIP ViT-H/14 one, penultimate block.
SD1_TEXT = TextConfig(49408, 77, 768, 12, 12, quick_gelu=True)
SD2_TEXT = TextConfig(49408, 77, 1024, 16, 23, quick_gelu=False)


class TextTransformer(nn.Module):
  """Token ids [B, L] (L <= context_length) -> ln_final(hidden states) [B, L, width] float32."""
  vocab_size: int
  context_length: int
  width: int
  heads: int
  layers: int
  quick_gelu: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[1]
    if length > self.context_length:
      raise ValueError(f"{length} tokens exceed the context length {self.context_length}")
    x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                 name="token_embedding")(tokens)
    pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                     (self.context_length, self.width))
    x = (x + pos[:length]).astype(self.dtype)
    x = Transformer(self.layers, self.heads, self.quick_gelu, causal=True, dtype=self.dtype,
                    name="transformer")(x)
    return nn.LayerNorm(LN_EPS, dtype=jnp.float32, name="ln_final")(x).astype(jnp.float32)
