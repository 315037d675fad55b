"""Bytes exchanged between devices, counted from a compiled program's HLO text.

Per device and per collective, what arrives from other devices:

    collective-permute   the whole result (a neighbour's rows); nothing when it has no
                         source-target pairs (a one-patch mesh)
    all-gather           (N - 1) / N of the result (every patch's part but the own)
    all-reduce           2 (N - 1) / N of the operand (what a ring all-reduce receives)

N is the size of the op's replica group. Patches at the image border receive less from a
collective-permute (nothing from beyond the border); the count is that of an interior patch.
The CPU backend widens bfloat16 collectives to float32, so a bf16 program compiled for CPU
shows twice the bytes it moves on a GPU or TPU.
"""

from __future__ import annotations

import re
from collections import Counter

DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s64": 8}
KINDS = ("collective-permute", "all-gather", "all-reduce")
_OP = re.compile(r"=\s*(?P<result>\(.*?\)|\S+)\s+(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\(")
_SHAPE = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[\d,]+)\}")
_NO_PAIRS = "source_target_pairs={}"


def _bytes(types: str, asynchronous: bool) -> int:
    """Total bytes of the array types in `types` (one shape or a tuple of them). An async
    `-start` op's tuple holds (operand, result, ...): only the result counts."""
    shapes = list(_SHAPE.finditer(types))
    if asynchronous and len(shapes) > 1:
        shapes = shapes[1:2]
    total = 0
    for m in shapes:
        size = 1
        for d in filter(None, m["dims"].split(",")):
            size *= int(d)
        total += size * DTYPE_BYTES[m["dtype"]]
    return total


def collective_bytes(hlo_text: str) -> Counter:
    """Bytes received per device, by collective kind, in one execution of `hlo_text`."""
    received: Counter = Counter()
    for line in hlo_text.splitlines():
        op = _OP.search(line)
        if op is None:
            continue
        size, kind = _bytes(op["result"], op["start"] is not None), op["kind"]
        if kind == "collective-permute" and _NO_PAIRS in line:
            continue
        groups = _GROUPS.search(line)
        n = len(groups["first"].split(",")) if groups else 1
        if kind == "all-gather":
            size = size * (n - 1) // n
        elif kind == "all-reduce":
            size = 2 * size * (n - 1) // n
        received[kind] += size
    return received
