"""TensorBoard writer: events written by tensorboardX, read back by TensorBoard's own reader."""

import io
import shutil
import tempfile

from absl.testing import absltest
import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from infd_jax.evaluation import writers


def _read(logdir: str) -> event_accumulator.EventAccumulator:
  acc = event_accumulator.EventAccumulator(
      logdir, size_guidance={event_accumulator.IMAGES: 0, event_accumulator.SCALARS: 0,
                             event_accumulator.TENSORS: 0})
  return acc.Reload()


def _tempdir(test: absltest.TestCase) -> str:
  # absltest's create_tempdir needs parsed absl flags, which pytest never parses.
  path = tempfile.mkdtemp()
  test.addCleanup(shutil.rmtree, path, ignore_errors=True)
  return path


class MakeImageGridTest(absltest.TestCase):

  def test_layout_and_values(self):
    imgs = np.stack([np.full((4, 5, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])
    grid = writers.make_image_grid(imgs, ncols=2, padding=1)
    # 2 rows x 2 cols of (4+1)x(5+1) cells plus the trailing border.
    self.assertEqual(grid.shape, (2 * 5 + 1, 2 * 6 + 1, 3))
    self.assertEqual(grid.dtype, np.uint8)
    np.testing.assert_array_equal(grid[1:5, 1:6], 0)        # -1 -> 0
    np.testing.assert_array_equal(grid[1:5, 7:12], 127)     # 0 -> floor(127.5), as saved PNGs
    np.testing.assert_array_equal(grid[6:10, 1:6], 255)     # 1 -> 255
    np.testing.assert_array_equal(grid[6:10, 7:12], 0)      # empty cell stays black
    np.testing.assert_array_equal(grid[0], 0)               # border


class TensorboardXWriterTest(absltest.TestCase):

  def test_round_trip_through_tensorboard_reader(self):
    logdir = _tempdir(self)
    w = writers.create_writer(logdir, just_logging=False)
    w.write_hparams({"lr": 1e-4, "batch": 8, "name": "ffhq", "flag": True, "t": (1, 2)})
    w.write_scalars(1, {"train/loss": 0.5, "train/psnr": np.float32(21.25)})
    w.write_scalars(2, {"train/loss": np.asarray(0.25)})
    grid = writers.make_image_grid(np.linspace(-1, 1, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3), 2)
    w.write_images(2, {"vis/grid": grid})
    w.write_texts(2, {"notes": "hello"})
    w.flush()
    w.close()

    acc = _read(logdir)
    self.assertCountEqual(acc.Tags()["scalars"], ["train/loss", "train/psnr"])
    loss = acc.Scalars("train/loss")
    self.assertEqual([e.step for e in loss], [1, 2])
    np.testing.assert_allclose([e.value for e in loss], [0.5, 0.25])
    self.assertAlmostEqual(acc.Scalars("train/psnr")[0].value, 21.25, places=5)

    (img_event,) = acc.Images("vis/grid")
    self.assertEqual(img_event.step, 2)
    decoded = np.asarray(Image.open(io.BytesIO(img_event.encoded_image_string)))
    np.testing.assert_array_equal(decoded, grid)   # PNG is lossless

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    self.assertAlmostEqual(hp["lr"].number_value, 1e-4)
    self.assertEqual(hp["batch"].number_value, 8)
    self.assertEqual(hp["name"].string_value, "ffhq")
    self.assertTrue(hp["flag"].bool_value)
    self.assertEqual(hp["t"].string_value, "(1, 2)")
    self.assertIn("notes/text_summary", acc.Tags()["tensors"])

  def test_just_logging_writes_no_events(self):
    logdir = _tempdir(self)
    w = writers.create_writer(logdir, just_logging=True)
    w.write_scalars(1, {"loss": 1.0})
    w.close()
    self.assertEqual(_read(logdir).Tags()["scalars"], [])

  def test_clu_default_writer_uses_tensorboardx_without_tensorflow(self):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    logdir = _tempdir(self)
    w = metric_writers.create_default_writer(logdir, asynchronous=False)
    w.write_scalars(3, {"x": 2.0})
    w.close()
    self.assertEqual(_read(logdir).Scalars("x")[0].value, 2.0)


if __name__ == "__main__":
  absltest.main()
