"""Streaming Gaussian statistics of features and the Frechet distance between them.

Everything here is host-side numpy in float64: features come off the device in
batches, and the 2048 x 2048 covariance of 50k-70k samples needs the precision.
The covariance uses ddof=1 (unbiased), as `np.cov`'s default, which
pytorch-fid and torch-fidelity call on the stacked features.
"""

import dataclasses
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Count, mean and centred scatter sum_i (x_i - mean)(x_i - mean)^T of features.

  Batches are combined with the pairwise update of Chan et al. (1979), which never
  forms the raw sum of outer products: that one cancels catastrophically in
  `S - n mu mu^T` when |mean| is large next to the spread.
  """
  count: int
  mean: np.ndarray      # [D] float64
  scatter: np.ndarray   # [D, D] float64

  @classmethod
  def empty(cls, dim: int) -> "FeatureStats":
    return cls(0, np.zeros((dim,), np.float64), np.zeros((dim, dim), np.float64))

  @classmethod
  def from_features(cls, features: np.ndarray) -> "FeatureStats":
    """Statistics of one batch of features [N, D]."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
      raise ValueError(f"features must be [N, D], got shape {x.shape}")
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    xc = x - mean
    return cls(len(x), mean, xc.T @ xc)

  def update(self, features: np.ndarray) -> "FeatureStats":
    """Returns the statistics with a batch of features [N, D] added."""
    return self.merge(FeatureStats.from_features(features))

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Statistics of the union of both sample sets."""
    if self.mean.shape != other.mean.shape:
      raise ValueError(f"feature dims differ: {self.mean.shape} vs {other.mean.shape}")
    if self.count == 0 or other.count == 0:
      return other if self.count == 0 else self
    n = self.count + other.count
    delta = other.mean - self.mean
    w = self.count * other.count / n
    return FeatureStats(n, self.mean + delta * (other.count / n),
                        self.scatter + other.scatter + np.outer(delta, delta) * w)

  def mean_cov(self, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]); ddof=1 matches np.cov and the FID references."""
    if self.count <= ddof:
      raise ValueError(f"need more than {ddof} samples for a covariance, have {self.count}")
    return self.mean, self.scatter / (self.count - ddof)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the statistics to an .npz (e.g. precomputed real-data statistics)."""
    np.savez(path, count=self.count, mean=self.mean, scatter=self.scatter)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "FeatureStats":
    with np.load(path) as f:
      return cls(int(f["count"]), f["mean"].astype(np.float64), f["scatter"].astype(np.float64))


def _psd_eigh(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposition of a PSD matrix with round-off eigenvalues set to 0.

  eigh's eigenvalues carry absolute errors up to about D * eps * max|w|; left in,
  the ones of null directions would each add sqrt(error) ~ 1e-7 to the trace.
  """
  w, v = np.linalg.eigh((s + s.T) / 2)
  tol = len(w) * np.finfo(np.float64).eps * max(np.abs(w).max(initial=0.0), 1e-300)
  return np.where(w > tol, w, 0.0), v


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  w, v = _psd_eigh(s)
  return (v * np.sqrt(w)) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray,
                     mu2: np.ndarray, sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace term is
  computed as tr((S1^(1/2) S2 S1^(1/2))^(1/2)) (same eigenvalues as S1 S2, but a
  symmetric PSD matrix), so it stays real and stable when the covariances are
  singular, where scipy.linalg.sqrtm(S1 @ S2) returns complex or inaccurate roots.

  Args:
    mu1, mu2: means [D].
    sigma1, sigma2: covariances [D, D].

  Returns:
    The squared Frechet distance (what "FID" reports), a Python float.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
  r1 = _psd_sqrt(s1)
  m = r1 @ s2 @ r1
  tr_covmean = np.sqrt(_psd_eigh(m)[0]).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
  """Frechet distance between the Gaussians fitted (ddof=1) to two feature sets."""
  return frechet_distance(*a.mean_cov(), *b.mean_cov())
