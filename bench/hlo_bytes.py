"""Where a compiled program's bytes go: operand and result bytes per op of its optimized HLO.

  python -m bench.hlo_bytes PLAN.hlo [--depth=2] [--top=25]

Reads the text of `compiled.as_text()` (`python -m bench.roofline compile --hlo_out=...`)
and charges each top-level instruction (the entry computation and the bodies of its
loops and branches; a fusion is one instruction) with the bytes of its operands and
result in their TPU layouts (tiled: a minor dimension of 3 counts its padding to the
tile). Summed over every memory space this is XLA's "bytes accessed" to within a few
percent (its cost analysis refines slices and in-place updates); the HBM column keeps
only arrays in memory space 0, so on-chip VMEM (S(1)) traffic, the prefetches and
sliced copies the TPU compiler adds around convolutions, is left out and an async copy
is charged once, for what it reads. Ops the compiler added take the source path of the
nearest op that uses them. Bytes are grouped by source module path (op_name metadata,
`--depth` components after the transformation prefixes), opcode and element type.
"""

import argparse
import collections
import dataclasses
import math
import re
import sys

ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
              "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(ITEM_BYTES) + r")\[([\d,]*)\](?:\{([^}]*)\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLED = re.compile(r"\b(body|condition|branch_computations|to_apply|true_computation|"
                     r"false_computation)=\{?([%\w.\-, ]+)\}?")
# Opcodes that move no data themselves (their callees, if any, are charged instead).
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while",
         "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
         "copy-done", "send-done", "recv-done", "all-reduce-done", "all-gather-done",
         "collective-permute-done", "async-done", "add-dependency"}


def array_bytes(dtype: str, dims: str, layout: str | None) -> int:
  """Bytes of one array in its layout: the first tile T(a,b,..) pads the minor dimensions."""
  shape = [int(d) for d in dims.split(",") if d]
  if layout and ":" in layout:
    order, _, rest = layout.partition(":")
    minor_to_major = [int(d) for d in order.split(",") if d]
    tile = re.match(r"T\(([\d,]+)\)", rest)
    if tile and minor_to_major:
      sizes = [int(t) for t in tile.group(1).split(",")]
      major_to_minor = minor_to_major[::-1]
      for dim, t in zip(major_to_minor[len(major_to_minor) - len(sizes):], sizes):
        shape[dim] = -(-shape[dim] // t) * t
  return math.prod(shape) * ITEM_BYTES[dtype]


def _arrays(text: str) -> list[tuple[int, bool]]:
  """(bytes, in HBM) of each array of a (possibly tuple) shape; S(n), n > 0, is on chip."""
  return [(array_bytes(d, s, l), not re.search(r"S\([1-9]\d*\)", l or ""))
          for d, s, l in _ARRAY.findall(text)]


@dataclasses.dataclass
class Op:
  """A top-level instruction and the bytes it is charged with."""
  name: str
  opcode: str
  bytes: int      # operands + result, every memory space (XLA's "bytes accessed" count)
  hbm_bytes: int  # operands + result in HBM (memory space 0); an async copy's once
  dtype: str      # element type of the (first) result
  op_name: str    # source path from the metadata, or that of the nearest op that uses it


def _split_result(rest: str) -> tuple[str, str, str]:
  """'SHAPE opcode(operands), attrs' -> (shape, opcode, text after the opcode's '(')."""
  depth, i = 0, 0
  while i < len(rest):  # the shape ends at the first space outside brackets
    ch = rest[i]
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    elif ch == " " and depth == 0:
      break
    i += 1
  shape, tail = rest[:i], rest[i:].lstrip()
  m = re.match(r"([\w\-]+)\((.*)$", tail)
  return (shape, m.group(1), m.group(2)) if m else (shape, tail.split(" ")[0], "")


def _operands(text: str) -> list[str]:
  depth, end = 1, 0
  for end, ch in enumerate(text):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      break
  return re.findall(r"%([\w.\-]+)", text[:end])


def _hbm_bytes(opcode: str, result: str, operands: list[str]) -> int:
  """HBM bytes of one op: an async start moves its operand to its destination (tuple
  element 1), its done moves nothing more."""
  if opcode.endswith("-done"):
    return 0
  out = _arrays(result)
  if opcode.endswith("-start") and len(out) > 1:
    out = out[1:2]
  arrays = out + [a for o in operands for a in _arrays(o)]
  return sum(b for b, hbm in arrays if hbm)


def parse(hlo: str) -> list[Op]:
  """The top-level ops of an optimized HLO module, each charged with its bytes."""
  computations: dict[str, list[tuple[str, str, str, str]]] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
      continue
    inst = _INSTRUCTION.match(line)
    if inst and current is not None:
      shape, opcode, tail = _split_result(inst.group(2))
      current.append((inst.group(1), shape, opcode, tail))
  shapes = {name: shape for body in computations.values() for name, shape, _, _ in body}
  users: dict[str, list[str]] = collections.defaultdict(list)
  names: dict[str, str] = {}
  rows, todo, seen = [], [entry], set()
  while todo:
    comp = todo.pop()
    if comp in seen or comp not in computations:
      continue
    seen.add(comp)
    for name, shape, opcode, tail in computations[comp]:
      if opcode in ("while", "conditional", "call"):
        for _, called in _CALLED.findall(tail):
          todo.extend(n.strip().lstrip("%") for n in called.split(","))
      operands = _operands(tail)
      for o in operands:
        users[o].append(name)
      m = _OP_NAME.search(tail)
      names[name] = m.group(1) if m else ""
      if opcode not in _FREE:
        rows.append((name, shape, opcode, operands))
  ops = []
  for name, shape, opcode, operands in rows:
    arrays = _arrays(shape) + [a for o in operands for a in _arrays(shapes.get(o, ""))]
    ops.append(Op(name, opcode, sum(b for b, _ in arrays),
                  _hbm_bytes(opcode, shape, [shapes.get(o, "") for o in operands]),
                  _ARRAY.search(shape).group(1) if _ARRAY.search(shape) else "",
                  _source(name, names, users)))
  return ops


def _source(name: str, names: dict[str, str], users: dict[str, list[str]]) -> str:
  """The op's source path, or (for ops the compiler added: copies, slices, prefetches) that
  of the nearest op that uses its result."""
  frontier, seen = [name], {name}
  for _ in range(8):
    for n in frontier:
      if names.get(n):
        return names[n]
    frontier = [u for n in frontier for u in users.get(n, ()) if u not in seen]
    seen.update(frontier)
  return ""


def module_path(op_name: str, depth: int) -> str:
  """'jit(f)/transpose(jvp(INFDAutoencoder.decode))/decoder/up_0_block_0/conv1/conv' ->
  'bwd decoder/up_0_block_0' (depth 2); 'fwd' without a transpose."""
  parts = op_name.split("/")
  direction = "bwd" if any(p.startswith("transpose(") for p in parts) else "fwd"
  names = [p for p in parts if p and "(" not in p and not p.startswith("jit")]
  return f"{direction} {'/'.join(names[:depth]) or '(none)'}"


def summary(ops: list[Op], depth: int, top: int) -> str:
  total, hbm = sum(op.bytes for op in ops), sum(op.hbm_bytes for op in ops)
  out = [f"{len(ops)} top-level ops: {total / 1e9:,.2f} GB operands + results "
         f"(all memory spaces), {hbm / 1e9:,.2f} GB in HBM",
         "columns: GB all spaces, % of it, GB in HBM"]
  for title, key in (("module", lambda op: module_path(op.op_name, depth)),
                     ("opcode", lambda op: op.opcode), ("result type", lambda op: op.dtype)):
    groups, groups_hbm = collections.Counter(), collections.Counter()
    for op in ops:
      groups[key(op)] += op.bytes
      groups_hbm[key(op)] += op.hbm_bytes
    out.append(f"\nby {title}:")
    out += [f"  {b / 1e9:9.2f} {100 * b / total:5.1f} % {groups_hbm[k] / 1e9:9.2f}  {k}"
            for k, b in groups.most_common(top)]
  out.append("\nlargest ops:")
  out += [f"  {op.bytes / 1e9:9.3f} {op.hbm_bytes / 1e9:9.3f}  {op.opcode:14s} {op.dtype:5s} "
          f"{op.name}  {op.op_name}" for op in sorted(ops, key=lambda op: -op.bytes)[:top]]
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.hlo_bytes", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("hlo")
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args(argv)
  with open(args.hlo) as f:
    print(summary(parse(f.read()), args.depth, args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
