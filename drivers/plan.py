"""Read planning: merge a profile's points into the fewest block reads.

Points of one table are sorted by address and merged while the block stays within the
protocol limit (125 registers, 2000 bits) and the unused gap bridged is no larger than the
profile's ``max_gap``: reading a few unused registers is cheaper than another request.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmt.config.profiles import Point, Table

MAX_REGISTERS = 125
MAX_BITS = 2000


@dataclass(frozen=True)
class Block:
    """One read request: ``count`` registers (or bits) of ``table`` from ``address``."""

    table: Table
    address: int
    count: int
    points: tuple[Point, ...]


def plan_reads(points: list[Point] | tuple[Point, ...], max_gap: int) -> list[Block]:
    blocks: list[Block] = []
    for table in Table:
        pts = sorted((p for p in points if p.table is table), key=lambda p: p.address)
        if not pts:
            continue
        limit = MAX_BITS if table.is_bit else MAX_REGISTERS
        start = pts[0].address
        end = start + pts[0].size
        members = [pts[0]]
        for p in pts[1:]:
            new_end = max(end, p.address + p.size)
            if p.address - end <= max_gap and new_end - start <= limit:
                end = new_end
                members.append(p)
                continue
            blocks.append(Block(table, start, end - start, tuple(members)))
            start, end, members = p.address, p.address + p.size, [p]
        blocks.append(Block(table, start, end - start, tuple(members)))
    return blocks
