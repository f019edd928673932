"""Rendered images in the [-1, 1] convention -> uint8 pixels, as the official code saves them."""

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] -> uint8 with the official truncation (REFERENCE.md 7, step 4):
  floor(clip(x / 2 + 0.5, 0, 1) * 255) in float32, as `ToPILImage` of the clamped output."""
  x = np.asarray(images, np.float32)
  return np.floor(np.clip(x * 0.5 + 0.5, 0.0, 1.0) * 255.0).astype(np.uint8)
