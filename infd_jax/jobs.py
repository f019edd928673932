"""Runs the job a config selects: `ae`, `dm`, `sample`, `eval` or `all` (the demo).

`run(config, workdir)` is the testable body of `python -m infd_jax.main`.
"""

import contextlib
import logging
import os
import pathlib
from typing import Iterator

import jax
import ml_collections

from infd_jax import checks, sharding
from infd_jax.evaluation import writers
from infd_jax.training import builders

UserError = builders.UserError
STAGES = checks.STAGES


def _prepare_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """Prepares the data a training stage reads if missing (always possible for the demo).

  Other datasets are prepared here only when `data.source` names the input folder.
  """
  from infd_jax.data import prepare  # pylint: disable=g-import-not-at-top
  if not config.data.data_dir:
    config.data.data_dir = str(workdir / "data")
  stages = ("ae", "dm") if config.stage == "all" else (config.stage,)
  try:
    for stage in stages:
      d = builders.pipeline_config(config.data, stage)
      # The demo's nine photos are quicker to prepare than worker processes are to start.
      workers = 1 if d["name"] == "demo" else os.cpu_count() or 1
      prepare.ensure_prepared(d["name"], d["data_dir"], variant=d["variant"], source=d["source"],
                              workers=workers)
  except (FileNotFoundError, ValueError) as e:
    if isinstance(e, prepare.PrepareError) and e.report.skipped:
      logging.warning("%s", e.report.summary())
    raise UserError(str(e)) from e


@contextlib.contextmanager
def _stage_writer(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                  stage: str) -> Iterator[writers.MetricWriter]:
  """Log + TensorBoard writer of one stage: its own run in `<workdir>/<stage>/`."""
  writer = writers.create_writer(workdir / stage, just_logging=jax.process_index() > 0)
  writer.write_hparams({k: str(v) for k, v in config.to_dict().items()
                        if not isinstance(v, dict)} | {"config": config.to_json_best_effort()})
  try:
    yield writer
  finally:
    writer.close()


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
  """Runs `config.stage` in `workdir` (created if needed)."""
  checks.check_config(config)
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  logging.info("process %d/%d, %d local / %d global devices, mesh %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), dict(mesh.shape))
  logging.info("config:\n%s", config)
  if config.stage in ("ae", "dm", "all"):
    for stage in ("ae", "dm") if config.stage == "all" else (config.stage,):
      checks.check_resume_architecture(config, workdir, stage)
    _prepare_data(config, workdir)
  if config.stage in ("ae", "all"):
    from infd_jax.training import ae_task, loop  # pylint: disable=g-import-not-at-top
    with _stage_writer(config, workdir, "ae") as writer:
      loop.train(config, workdir, ae_task.make_task(config, mesh), mesh, writer)
  if config.stage in ("dm", "all"):
    from infd_jax.training import dm_task, loop  # pylint: disable=g-import-not-at-top
    with _stage_writer(config, workdir, "dm") as writer:
      loop.train(config, workdir, dm_task.make_task(config, workdir, mesh), mesh, writer)
  if config.stage in ("sample", "all"):
    from infd_jax import generate  # pylint: disable=g-import-not-at-top
    out = generate.run(config, workdir, mesh)
    print(f"infd_jax: samples in {out}")
  if config.stage == "all" and config.contact_sheet:
    from infd_jax.evaluation import contact_sheet  # pylint: disable=g-import-not-at-top
    sheet, numbers = contact_sheet.run(config, workdir, mesh)
    print(f"infd_jax: contact sheet {sheet}")
    print("infd_jax: " + ", ".join(f"{k} {v:.2f} dB" for k, v in numbers.items()))
  if config.stage == "eval":
    from infd_jax.evaluation import job  # pylint: disable=g-import-not-at-top
    with _stage_writer(config, workdir, "eval") as writer:
      job.run(config, workdir, mesh, writer)
  print(f"infd_jax: {config.stage} done; checkpoints, TensorBoard events and outputs in {workdir}")
