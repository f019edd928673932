"""bench.roofline's bounds and table from a record, against the chips' published figures."""

import pytest

from bench import roofline


def _record(**kw):
  r = {"program": "ae_step", "slice": "v5e-8", "dtype": "bfloat16", "label": "", "batch": 8,
       "chips": 8, "flops": 197e9, "bytes_accessed": 819e9 * 3e-3, "hbm_bytes": 819e9 * 2e-3,
       "argument_bytes": 2 ** 30, "output_bytes": 0, "temp_bytes": 2 ** 31,
       "total_bytes": 3 * 2 ** 30}
  return r | kw


def test_bounds_divide_by_the_published_peak_and_bandwidth():
  b = roofline.bounds(_record())  # v5e: 197 TFLOP/s, 819 GB/s
  assert b["t_flops"] == pytest.approx(1e-3) and b["t_bytes"] == pytest.approx(3e-3)
  assert b["t_hbm"] == pytest.approx(2e-3) and b["items_per_s"] == pytest.approx(1 / 3e-3)
  b = roofline.bounds(_record(slice="v5p-8", chips=4, flops=459e12))  # 459 TFLOP/s: 1 s
  assert b["per_chip"] == 2 and b["items_per_s"] == pytest.approx(2.0)


def test_table_keeps_the_newest_record_per_row_and_leaves_missing_hbm_blank():
  rows = roofline.table([_record(flops=1e9), _record(), _record(dtype="float32", hbm_bytes=None)])
  lines = rows.splitlines()[2:]
  assert len(lines) == 2
  assert lines[0].startswith("| ae_step | v5e-8 | float32 |") and "|  |" in lines[0]
  assert "| 197 | 2.5 | 1.6 | 1.00 / 0.00 / 2.00 / 3.00 | 1.00 | 3.00 | 2.00 | memory |" in lines[1]


def test_aot_sweep_records_become_rows_of_the_tables_slices(tmp_path):
  path = tmp_path / "aot.jsonl"
  base = {"program": "dm_step", "batch": 48, "chips": 4, "compute_dtype": "float32",
          "flops": 459e12, "bytes_accessed": 2765e9, "argument_bytes": 0, "output_bytes": 0,
          "temp_bytes": 0, "total_bytes": 0, "hbm_bytes": 95 * 2 ** 30}  # its HBM capacity
  rows = [base | {"topology": "v5p:2x2x1"}, base | {"topology": "v5e:4x8", "chips": 32},
          base | {"topology": "v5p:2x2x1", "program": "sampler"}]
  path.write_text("\n".join(roofline.json.dumps(r) for r in rows))
  (record,) = roofline.aot_records(path)
  assert (record["slice"], record["dtype"], record["label"]) == ("v5p-8", "float32", "aot")
  b = roofline.bounds(record)
  assert b["t_flops"] == pytest.approx(1.0) and b["t_bytes"] == pytest.approx(1.0)
  assert b["t_hbm"] is None and b["items_per_s"] == pytest.approx(12.0)


def test_block_bytes_counts_the_gradient_of_two_convolutions_per_image():
  """FLOPs of the block's gradient (forward, input and weight gradients of two 3x3 convs)
  against the closed form, per image at two batches, on this host's CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  from bench import block_bytes  # pylint: disable=g-import-not-at-top
  c, s = 32, 16
  full = 3 * 2 * 2 * 9 * s * s * c * c / 1e9  # 3 passes x 2 convs x 2 FLOP per multiply-add
  inside = full * (3 * s - 2) ** 2 / (9 * s * s)  # without the taps that fall on the zero border
  one, two = (block_bytes.measure(c, s, b, "float32", jax.devices("cpu")[0]) for b in (1, 2))
  assert inside <= one["gflop"] <= 1.1 * full  # GroupNorm and swish add a few percent
  assert two["gflop"] == pytest.approx(one["gflop"], rel=1e-3)  # reported per image
  assert 0 < one["hbm_gb"] <= one["xla_gb"] * (1 + 1e-6)
