"""bench.hlo_bytes on a hand-written optimized-HLO module, against byte counts worked out by
hand from the shapes and TPU tiles."""

from bench import hlo_bytes

MODULE = """\
HloModule jit_step, is_scheduled=true

%fused_computation (param_0: f32[8,256]) -> bf16[8,256] {
  %param_0 = f32[8,256]{1,0:T(8,128)} parameter(0)
  ROOT %convert.1 = bf16[8,256]{1,0:T(8,128)(2,1)} convert(%param_0)
}

ENTRY %main (p0: f32[8,256], p1: f32[2,3]) -> bf16[8,256] {
  %p0 = f32[8,256]{1,0:T(8,128)} parameter(0)
  %p1 = f32[2,3]{1,0:T(8,128)} parameter(1)
  %copy-start.1 = (f32[8,256]{1,0:T(8,128)}, f32[8,256]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%p0)
  %copy-done.1 = f32[8,256]{1,0:T(8,128)S(1)} copy-done(%copy-start.1)
  %copy.2 = f32[2,3]{0,1:T(8,128)} copy(%p1), metadata={op_name="jit(step)/transpose(jvp(Net))/head/conv/copy"}
  ROOT %fusion.1 = bf16[8,256]{1,0:T(8,128)(2,1)} fusion(%copy-done.1), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(step)/jvp(Net)/body/conv/convert_element_type"}
}
"""


def test_array_bytes_pad_the_minor_dimensions_to_the_first_tile():
  assert hlo_bytes.array_bytes("f32", "8,256", "1,0:T(8,128)") == 8 * 256 * 4
  assert hlo_bytes.array_bytes("f32", "2,3", "1,0:T(8,128)") == 8 * 128 * 4
  # Minor-to-major {0,1}: dimension 0 (2) is minor, padded to 128; dimension 1 (3) to 8.
  assert hlo_bytes.array_bytes("f32", "2,3", "0,1:T(8,128)") == 8 * 128 * 4
  assert hlo_bytes.array_bytes("bf16", "3,5,7", "2,1,0:T(8,128)(2,1)") == 3 * 8 * 128 * 2
  assert hlo_bytes.array_bytes("s32", "10", None) == 40


def test_ops_are_charged_with_operands_and_results_by_memory_space():
  ops = {op.name: op for op in hlo_bytes.parse(MODULE)}
  assert set(ops) == {"copy-start.1", "copy.2", "fusion.1"}  # a copy-done moves nothing more
  big, small = 8 * 256 * 4, 8 * 128 * 4
  # The start's result tuple (source alias, VMEM destination, 4-byte context) plus its operand;
  # in HBM only the read of the operand.
  assert ops["copy-start.1"].bytes == big + big + 4 + big
  assert ops["copy-start.1"].hbm_bytes == big
  assert ops["copy.2"].bytes == ops["copy.2"].hbm_bytes == 2 * small
  # The fusion reads its operand from VMEM (S(1)) and writes bf16 to HBM.
  assert ops["fusion.1"].bytes == big + 8 * 256 * 2
  assert ops["fusion.1"].hbm_bytes == 8 * 256 * 2
  # Ops without metadata take their user's source path.
  assert ops["copy-start.1"].op_name == "jit(step)/jvp(Net)/body/conv/convert_element_type"
  assert hlo_bytes.module_path(ops["copy.2"].op_name, 2) == "bwd head/conv"
  assert hlo_bytes.module_path(ops["fusion.1"].op_name, 1) == "fwd body"
