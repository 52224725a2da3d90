"""The buffer's write cost: commits per second and bytes written, synchronous=FULL vs NORMAL.

Run: .venv/bin/python benchmarks/bench_buffer_durability.py [--dir DIR] [--seconds S]
Prints one JSON object per line: {"name", "value", "unit", "baseline", "ratio"}.

Run it with --dir on the storage the buffer will live on (an SD card is what matters: a
laptop SSD or a tmpfs hides the cost of an fsync). Each round is what the agent does per
flush interval: one commit of a batch of readings (a three-phase meter and a relay module),
then one commit of the acknowledgement, both through lmt.agent.outbox.Outbox.

1. Commits per second with the buffer's synchronous=FULL (the baseline is NORMAL, measured side
   by side in the same run).
2. Bytes handed to the filesystem per round (the process's write() total, from /proc/self/io:
   WAL frames, checkpoints), FULL against NORMAL, and what that makes per day at one round per
   second.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from common import emit

from lmt.agent.outbox import Outbox

METER = ["voltage_l1_v", "voltage_l2_v", "voltage_l3_v", "current_l1_a", "current_l2_a",
         "current_l3_a", "power_l1_w", "power_l2_w", "power_l3_w", "power_w", "frequency_hz",
         "power_factor", "import_energy_kwh", "export_energy_kwh"]


def written_bytes() -> int:
    """write() bytes of this process so far (Linux); 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(folder: Path, synchronous: str, seconds: float) -> tuple[float, float]:
    """(commits per second, bytes written per round)."""
    buf = Outbox.open(folder / f"bench-{synchronous.lower()}.sqlite")
    buf.db.execute(f"PRAGMA synchronous = {synchronous}")
    rounds = 0
    w0, t0 = written_bytes(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        now = time.time()
        recs = buf.append("telemetry", [
            {"ts": now, "device": "main-meter", "values": {p: random.uniform(0, 400) for p in METER}},
            {"ts": now, "device": "relays", "values": {f"relay_{i}": True for i in range(1, 9)}},
        ])
        buf.mark_delivered("telemetry", recs[-1].seq)
        rounds += 1
    elapsed = time.perf_counter() - t0
    w1 = written_bytes()
    buf.close()
    return 2 * rounds / elapsed, (w1 - w0) / rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path.cwd(),
                    help="folder on the storage to measure (default: the current folder)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per setting")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmt-bench-buffer-", dir=args.dir) as tmp:
        full_rate, full_bytes = run(Path(tmp), "FULL", args.seconds)
        normal_rate, normal_bytes = run(Path(tmp), "NORMAL", args.seconds)
    emit("buffer commits/s, synchronous=FULL (baseline NORMAL)", full_rate, "commits/s",
         normal_rate)
    emit("buffer bytes written per round (1 batch + 1 ack), FULL (baseline NORMAL)",
         full_bytes, "bytes", normal_bytes)
    emit("buffer bytes written per day at 1 round/s, FULL", full_bytes * 86400 / 2**30, "GiB",
         None)


if __name__ == "__main__":
    main()
