"""Noise schedules: float64 numpy coefficient tables, cast to float32 after indexing.

Mirrors guided-diffusion's `GaussianDiffusion` tables (REFERENCE.md 6.2): every table
is computed in float64 from the betas and only the looked-up entries become
float32 `jnp` arrays, so the coefficients equal the official ones bit for bit.
"""

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def linear_betas(beta_start: float = 0.0015, beta_end: float = 0.0195,
                 num_steps: int = 1000) -> np.ndarray:
  """Plain linear betas (INFD's; not LDM's sqrt-linear-squared), [num_steps] float64."""
  return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def _take(table: np.ndarray, t: jax.Array | int) -> jax.Array:
  # Casting the whole float64 table elementwise and then gathering equals
  # gathering and then casting (what the official `_extract_into_tensor` does).
  return jnp.asarray(table.astype(np.float32))[t]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity (jit static arg).
class Schedule:
  """A discrete diffusion schedule indexed by step 0..num_steps-1.

  Attributes:
    betas: [T] float64.
    alphas_cumprod: [T] float64, cumprod(1 - betas).
  """
  betas: np.ndarray
  alphas_cumprod: np.ndarray

  @classmethod
  def from_betas(cls, betas: np.ndarray) -> "Schedule":
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
      raise ValueError("betas must be 1-D and in (0, 1]")
    return cls(betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))

  @property
  def num_steps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alphas_cumprod_prev(self) -> np.ndarray:
    """[T] float64, alpha-bar of the previous step (1 before step 0)."""
    return np.append(1.0, self.alphas_cumprod[:-1])

  # Lookups: t is an int or an int array of any shape; results are float32, shape of t.
  def alphas_cumprod_at(self, t: jax.Array | int) -> jax.Array:
    return _take(self.alphas_cumprod, t)

  def alphas_cumprod_prev_at(self, t: jax.Array | int) -> jax.Array:
    return _take(self.alphas_cumprod_prev, t)

  def sqrt_alphas_cumprod_at(self, t: jax.Array | int) -> jax.Array:
    return _take(np.sqrt(self.alphas_cumprod), t)

  def sqrt_one_minus_alphas_cumprod_at(self, t: jax.Array | int) -> jax.Array:
    return _take(np.sqrt(1.0 - self.alphas_cumprod), t)

  def sqrt_recip_alphas_cumprod_at(self, t: jax.Array | int) -> jax.Array:
    return _take(np.sqrt(1.0 / self.alphas_cumprod), t)

  def sqrt_recipm1_alphas_cumprod_at(self, t: jax.Array | int) -> jax.Array:
    return _take(np.sqrt(1.0 / self.alphas_cumprod - 1.0), t)


def log_snr(sched: Schedule, t: np.ndarray) -> np.ndarray:
  """lambda_t = log(alpha_t / sigma_t) = log(sqrt(ab_t) / sqrt(1 - ab_t)) at int steps t, float64."""
  ab = sched.alphas_cumprod[np.asarray(t)]
  return 0.5 * (np.log(ab) - np.log1p(-ab))


def linear_schedule(beta_start: float = 0.0015, beta_end: float = 0.0195,
                    num_steps: int = 1000) -> Schedule:
  """INFD's training schedule (alphas_cumprod[999] ~= 2.569e-5 at the defaults)."""
  return Schedule.from_betas(linear_betas(beta_start, beta_end, num_steps))


def scaled_linear_schedule(beta_start: float = 0.00085, beta_end: float = 0.012,
                           num_steps: int = 1000) -> Schedule:
  """Stable Diffusion's schedule: betas linear in sqrt(beta), then squared (LDM "linear",
  diffusers "scaled_linear")."""
  return Schedule.from_betas(
      np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=np.float64) ** 2)


def respace(base: Schedule, timesteps: Sequence[int]) -> Schedule:
  """The schedule that keeps only `timesteps` of `base` (guided-diffusion `SpacedDiffusion`).

  Spaced betas are 1 - ab[t_k] / ab[t_{k-1}] (ab[t_{-1}] = 1), so the spaced
  alpha-bar at index k is ab[t_k] (recomputed by cumprod in float64, as the
  official code does). The model must still be fed the original t_k.

  Args:
    base: the full schedule.
    timesteps: kept steps of `base`, any order (they are sorted).

  Returns:
    A Schedule of length len(timesteps).
  """
  kept = np.unique(np.asarray(timesteps, dtype=np.int64))
  ab = base.alphas_cumprod[kept]
  prev = np.append(1.0, ab[:-1])
  return Schedule.from_betas(1.0 - ab / prev)
