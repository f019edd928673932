"""Which environments start `jax.distributed` without flags (infd_jax.main)."""

import pytest

from infd_jax import main

_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
         "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "SLURM"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),      # one task: nothing to join
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3"}, "Cloud TPU slice"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}, None),              # a single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, "Cloud TPU slice"),
])
def test_detected_cluster(monkeypatch, env, expected):
  for name in _VARS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # never ask a metadata server from a test
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert main.detected_cluster() == expected
