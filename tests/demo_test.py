"""The demo's stage 1, shortened: its settings really train (train patches and held-out crops)."""

import jax
import numpy as np
import pytest

from infd_jax.configs import demo
from infd_jax.data import pipeline
from infd_jax.evaluation import contact_sheet
from infd_jax.models.lpips import load_lpips_params
from infd_jax import builders, sharding
from infd_jax.model import Model
from infd_jax.training import ae_task

STEPS = 120


def _psnr(pred, gt) -> float:
  """Mean PSNR in float64 numpy on the [0, 1] scale (independent of the metrics module)."""
  err = (np.clip(np.asarray(pred, np.float64), -1, 1) - np.asarray(gt, np.float64)) / 2.0
  return float(np.mean(-10.0 * np.log10(np.mean(err ** 2, axis=(1, 2, 3)))))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demo_stage1_improves_training_and_held_out_psnr(tmp_path):
  c = demo.get_config()
  c.data.data_dir = str(tmp_path)
  step = jax.jit(ae_task.make_step(c), donate_argnums=0)  # the training job's step
  state = jax.tree.map(lambda x: getattr(x, "value", x),
                       ae_task.init_fn(c)(jax.random.PRNGKey(0)),
                       is_leaf=lambda x: hasattr(x, "value"))
  batches = iter(pipeline.make_ae_dataset(builders.pipeline_config(c.data, "ae"),
                                          global_batch_size=c.train.ae_batch_size, seed=0))
  crops = contact_sheet.held_out_crops(128)  # a photo the demo never trains on
  model = Model(c, sharding.make_mesh(-1, 1), ae_params=None)  # as the contact sheet renders

  def held_out(params):
    return _psnr(model.with_params(ae_params=params).reconstruct(crops, 128), crops)

  lp = load_lpips_params()
  before = held_out(state.gen_params)
  train = []
  for _ in range(STEPS):
    batch = next(batches)
    state, metrics = step(state, batch, lp)
    train.append(float(metrics["psnr"]))
  after = held_out(state.gen_params)
  # Patch PSNR varies with the drawn scales: compare means over several steps.
  assert np.mean(train[-20:]) > np.mean(train[:5]) + 2.5, (train[:5], train[-20:])
  assert after > before + 2.0, (before, after)


@pytest.mark.parametrize("bound,expected", [(0.0, 1.0 / 512), (1.0, 1.0)])
def test_codebook_starts_uniform_within_the_bound(bound, expected):
  """0 keeps the official U(-1/N, 1/N); the demo's wider start fills (-1, 1)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from infd_jax.models.quantizer import VectorQuantizer  # pylint: disable=g-import-not-at-top
  params = VectorQuantizer(512, 3, init_bound=bound).init(jax.random.PRNGKey(0),
                                                          np.zeros((1, 2, 2, 3), np.float32))
  codes = np.asarray(nn.unbox(params)["params"]["embedding"])
  assert codes.shape == (512, 3)
  assert expected * 0.98 < np.abs(codes).max() < expected
  assert abs(codes.mean()) < expected * 0.1
