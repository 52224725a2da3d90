"""Read planning: which points to read now, and in the fewest block reads.

**Blocks.** Points of one table are sorted by address and merged, left to right, into a block
while the block stays within the protocol limit (125 registers, 2000 bits), the unused gap
bridged is at most the profile's ``max_gap``, and the block does not span into a ``barrier``
point from below (a block may *start* at a barrier; a barrier ends the block before it).

**Cost model.** One read request costs a fixed overhead plus what it carries; both are counted
in register-equivalents (2 bytes on the wire). Bridging a gap of ``g`` registers instead of
sending a second request saves ``overhead - g``: worth it only when ``g < overhead``. A
profile's integer ``max_gap`` is exactly that threshold: ``overhead = max_gap + 1``, i.e. the
largest gap strictly cheaper than a request (:class:`CostModel`). For Modbus TCP the fixed
part is 12 request + 9 response header bytes (10.5 registers) before TCP/IP headers and the
round trip; on a 9600 baud RTU line a 20 ms turnaround alone is worth ~10 registers. That is
why profiles use ``max_gap`` 8-16.

**Poll by age.** A point is due when its last reading is at least as old as its class's max
age (``poll = "fast"``: ``fast_interval_s``, ``"slow"``: ``slow_interval_s``) or it was never
read (:func:`due_points`); :func:`plan_due` plans only the due points (barriers of every
point still apply) and lets not-due points that lie inside a planned block ride along free.

**Minimum.** :func:`min_transactions` computes the fewest requests that can cover the points
by dynamic programming over the address-sorted runs of each table, independently of the
greedy merge in :func:`plan_reads`. The greedy is optimal: a block's feasibility (span limit,
gap limit, no barrier inside) is monotone - any sub-run of a feasible run is feasible - so by
induction the greedy's first ``k`` blocks always cover at least as long a prefix of the sorted
points as any other plan's first ``k`` blocks ("greedy stays ahead"); therefore it never uses
more blocks. The tests check both against an exhaustive search on small random cases.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lmt.config.profiles import Point, Table

MAX_REGISTERS = 125
MAX_BITS = 2000

#: Bytes of one Modbus TCP read transaction besides the data: request ADU (7 MBAP + 5 PDU) and
#: response header (7 MBAP + function + byte count).
MODBUS_TCP_FRAME_BYTES = 21


@dataclass(frozen=True)
class Block:
    """One read request: ``count`` registers (or bits) of ``table`` from ``address``."""

    table: Table
    address: int
    count: int
    points: tuple[Point, ...]

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True)
class CostModel:
    """What reads cost, in register-equivalents (2 bytes on the wire)."""

    request_overhead: float
    """The fixed cost of one more request (framing, headers, turnaround, round trip)."""

    @classmethod
    def from_max_gap(cls, max_gap: int) -> CostModel:
        """The model a profile's ``max_gap`` stands for: a request costs ``max_gap + 1``."""
        return cls(float(max_gap + 1))

    @classmethod
    def from_link(cls, round_trip_s: float, bytes_per_s: float,
                  frame_bytes: int = MODBUS_TCP_FRAME_BYTES) -> CostModel:
        """A request's overhead from a link: its framing plus the bytes a round trip is worth."""
        return cls((frame_bytes + round_trip_s * bytes_per_s) / 2.0)

    @property
    def max_gap(self) -> int:
        """The largest gap that is strictly cheaper to read than a separate request."""
        return max(0, math.ceil(self.request_overhead) - 1)

    def cost(self, blocks: Iterable[Block]) -> float:
        """Total cost of a plan: every request's overhead plus every register it reads."""
        return sum(self.request_overhead + b.count for b in blocks)


def limit_for(table: Table) -> int:
    """The protocol's largest read of one request for ``table``."""
    return MAX_BITS if table.is_bit else MAX_REGISTERS


def _end(p: Point) -> int:
    assert p.address is not None
    return p.address + p.size


def _by_table(points: Iterable[Point]) -> dict[Table, list[Point]]:
    out: dict[Table, list[Point]] = {}
    for p in points:
        if p.table is None or p.address is None:
            raise ValueError(f"{p.name}: not a Modbus point")
        out.setdefault(p.table, []).append(p)
    for pts in out.values():
        pts.sort(key=lambda p: (p.address, _end(p)))
    return out


def _barrier_addresses(points: Iterable[Point], table: Table) -> list[int]:
    return sorted({p.address for p in points if p.barrier and p.table is table
                   and p.address is not None})


def _crosses_barrier(start: int, end: int, barriers: Sequence[int]) -> bool:
    """Whether a block ``[start, end)`` spans into a barrier from below."""
    return any(start < b < end for b in barriers)


def plan_reads(points: Sequence[Point], max_gap: int,
               barriers: Iterable[Point] = ()) -> list[Block]:
    """Merge ``points`` into the fewest block reads (greedy, left to right, per table).

    ``barriers`` are further points whose ``barrier`` flag applies although they are not read
    (when planning a subset of a profile, pass the whole profile).
    """
    context = [*points, *barriers]
    blocks: list[Block] = []
    for table, pts in sorted(_by_table(points).items(), key=lambda kv: list(Table).index(kv[0])):
        limit = limit_for(table)
        fences = _barrier_addresses(context, table)
        start = pts[0].address
        end = _end(pts[0])
        members = [pts[0]]
        for p in pts[1:]:
            assert p.address is not None and start is not None
            new_end = max(end, _end(p))
            if (p.address - end <= max_gap and new_end - start <= limit
                    and not _crosses_barrier(start, new_end, fences)):
                end = new_end
                members.append(p)
                continue
            blocks.append(Block(table, start, end - start, tuple(members)))
            start, end, members = p.address, _end(p), [p]
        assert start is not None
        blocks.append(Block(table, start, end - start, tuple(members)))
    return blocks


# -- poll by age ---------------------------------------------------------------------------------


def max_age_s(point: Point, fast_interval_s: float, slow_interval_s: float) -> float:
    """How old a reading of ``point`` may get before it is read again."""
    return slow_interval_s if point.poll == "slow" else fast_interval_s


def due_points(points: Iterable[Point], last_read: Mapping[str, float], now: float,
               fast_interval_s: float, slow_interval_s: float) -> list[Point]:
    """The points to read at ``now``: never read, or read at least their max age ago.

    ``last_read`` maps point name to the time of its last good reading (same clock as ``now``).
    """
    due = []
    for p in points:
        t = last_read.get(p.name)
        if t is None or now - t >= max_age_s(p, fast_interval_s, slow_interval_s):
            due.append(p)
    return due


def plan_due(points: Sequence[Point], last_read: Mapping[str, float], now: float,
             fast_interval_s: float, slow_interval_s: float, max_gap: int) -> list[Block]:
    """Block reads for the points due at ``now`` (see :func:`due_points`).

    Only due points decide where blocks go; a not-due point whose registers lie wholly inside
    a planned block is added to it (read anyway, so decoded for free). Every point's barrier
    applies. Returns ``[]`` when nothing is due.
    """
    due = due_points(points, last_read, now, fast_interval_s, slow_interval_s)
    if not due:
        return []
    due_names = {p.name for p in due}
    blocks = plan_reads(due, max_gap, barriers=points)
    out = []
    for b in blocks:
        riders = tuple(p for p in points if p.name not in due_names and p.table is b.table
                       and p.address is not None and b.address <= p.address and _end(p) <= b.end)
        members = tuple(sorted((*b.points, *riders), key=lambda p: (p.address, _end(p))))
        out.append(Block(b.table, b.address, b.count, members))
    return out


# -- the minimum ---------------------------------------------------------------------------------


def _clusters(pts: list[Point]) -> list[tuple[int, int]]:
    """Address-sorted points of one table as disjoint ``[start, end)`` runs of overlapping ones.

    Points that share registers (bit fields of one register) are read together or not at all.
    """
    out: list[tuple[int, int]] = []
    for p in pts:
        assert p.address is not None
        if out and p.address < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], _end(p)))
        else:
            out.append((p.address, _end(p)))
    return out


def _run_ok(runs: list[tuple[int, int]], i: int, j: int, max_gap: int, limit: int,
            fences: Sequence[int]) -> bool:
    """Whether one block can read runs ``i..j`` (inclusive)."""
    start, end = runs[i][0], runs[j][1]
    if end - start > limit or _crosses_barrier(start, end, fences):
        return False
    return all(runs[k + 1][0] - runs[k][1] <= max_gap for k in range(i, j))


def min_transactions(points: Sequence[Point], max_gap: int,
                     barriers: Iterable[Point] = ()) -> int:
    """The fewest read requests that can cover ``points`` under the planner's rules.

    Exact, per table: ``f(i) = 1 + min f(j + 1)`` over the runs ``i..j`` one block can read,
    ``f(n) = 0`` (a block reads a contiguous run of the address-sorted points; see the module
    docstring for why the greedy :func:`plan_reads` always reaches this minimum).
    """
    context = [*points, *barriers]
    total = 0
    for table, pts in _by_table(points).items():
        runs = _clusters(pts)
        fences = _barrier_addresses(context, table)
        limit = limit_for(table)
        n = len(runs)
        best = [0] * (n + 1)
        for i in range(n - 1, -1, -1):
            if runs[i][1] - runs[i][0] > limit:
                raise ValueError(f"{table.value} points at {runs[i][0]}: wider than one request")
            fewest = best[i + 1]  # a run of one cluster is always readable on its own
            for j in range(i + 1, n):
                if not _run_ok(runs, i, j, max_gap, limit, fences):
                    break  # feasibility is monotone: no longer run from i is feasible either
                fewest = min(fewest, best[j + 1])
            best[i] = 1 + fewest
        total += best[0]
    return total
