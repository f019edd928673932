"""The adherence metric of `bench.t2i_adherence` against a float64 brute force and cases whose
answer is known by construction."""

import numpy as np
import pytest

from bench import t2i_adherence
from infd_jax.data import openmoji


def test_nearest_is_the_brute_force_argmin_of_squared_distances():
  rng = np.random.default_rng(0)
  refs = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
  samples = rng.integers(0, 256, (17, 8, 8, 3), dtype=np.uint8)
  expected = [min(range(len(refs)), key=lambda j: float(
      ((s.astype(np.float64) - refs[j].astype(np.float64)) ** 2).sum())) for s in samples]
  np.testing.assert_array_equal(t2i_adherence.nearest(samples, refs), expected)


def test_noisy_copies_find_their_source_and_adherence_counts_them():
  rng = np.random.default_rng(1)
  refs = rng.integers(0, 256, (40, 16, 16, 3)).astype(np.uint8)
  source = rng.integers(0, 40, 60)
  noisy = np.clip(refs[source].astype(int) + rng.integers(-20, 21, (60, 16, 16, 3)), 0, 255)
  found = t2i_adherence.nearest(noisy.astype(np.uint8), refs)
  np.testing.assert_array_equal(found, source)
  prompted = source.copy()
  prompted[:15] = (prompted[:15] + 1) % 40  # 15 of 60 prompted with another emoji
  assert t2i_adherence.adherence(found, prompted) == pytest.approx(45 / 60)


def test_prompts_have_unique_captions_and_are_fixed_by_name():
  names = ["1F600", "1F601", "1F602", "E000", "1F44D", "1F44D-FE0F"]
  # 1F44D and 1F44D-FE0F share "thumbs up sign"; E000 has no caption.
  chosen = t2i_adherence.pick_prompts(names, 3)
  assert sorted(chosen) == [0, 1, 2]
  reordered = names[::-1]  # the same emoji in another order: the same prompts, same order
  assert [reordered[i] for i in t2i_adherence.pick_prompts(reordered, 3)] == [
      names[i] for i in chosen]
  assert [openmoji.caption(names[i]) for i in sorted(chosen)] == [
      "grinning face", "grinning face with smiling eyes", "face with tears of joy"]
  with pytest.raises(ValueError, match="unique caption"):
    t2i_adherence.pick_prompts(names, 4)
