"""Polling: transactions per cycle, cycle time against a bare pymodbus loop, bytes on the wire.

Run: .venv/bin/python benchmarks/bench_poll.py [--cycles N]
Prints one JSON object per line: {"name", "value", "unit", "baseline", "ratio"}.

1. Transactions per poll cycle for the bench site's configured points: the planner's count
   against the minimum possible (must be equal), and against one read per point.
2. The agent's poll cycle (planned reads, decoding, buffering) against a bare pymodbus loop
   reading the same blocks, measured side by side in the same run (goal: ratio <= 1.3).
3. Bytes on the wire per cycle for Modbus RTU, and the cycle time that implies at 9600 and
   2400 baud (8N1 framing plus the 3.5-character silence between frames).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w
from common import emit
from pymodbus.client import AsyncModbusTcpClient

from lmt.agent.broker import free_port, wait_for_port
from lmt.agent.daemon import Agent
from lmt.agent.security import generate_keypair
from lmt.config import load_agent_config, load_profile
from lmt.config.profiles import Profile, Table, available_profiles
from lmt.drivers import plan

ROOT = Path(__file__).resolve().parents[1]


def bench_profiles() -> list[Profile]:
    """Every Modbus profile in the library: one device each on the bench site."""
    out = []
    for pid in sorted(available_profiles()):
        prof = load_profile(pid)
        if prof.protocol == "modbus":
            out.append(prof)
    return out


def minimum_transactions(prof: Profile) -> int:
    if hasattr(plan, "min_transactions"):
        return int(plan.min_transactions(prof.points, prof.max_gap))
    return len(plan.plan_reads(prof.points, prof.max_gap))


def write_site(work: Path, profiles: list[Profile], port: int) -> Path:
    site = {"site": {"name": "bench", "seed": 3}, "server": {"host": "127.0.0.1", "port": port},
            "devices": [{"name": p.id, "profile": p.id, "device_id": i + 1}
                        for i, p in enumerate(profiles)]}
    path = work / "site.toml"
    path.write_text(tomli_w.dumps(site))
    return path


def write_agent(work: Path, profiles: list[Profile], port: int) -> Path:
    _, pub = generate_keypair(work / "keys")
    meter = next(p for p in profiles if p.has_point("power_w"))
    cfg = {"terminal": {"id": "bench"}, "mqtt": {"port": free_port()},
           "security": {"platform_public_key": str(pub)},
           "buffer": {"path": str(work / "buffer.sqlite"), "flush_interval_s": 0.1},
           "poll": {"interval_s": 0.1, "timeout_s": 2.0, "max_timeout_s": 5.0},
           "devices": [{"name": p.id, "profile": p.id, "host": "127.0.0.1", "port": port,
                        "device_id": i + 1} for i, p in enumerate(profiles)],
           "control": {"main_meter": meter.id}}
    path = work / "agent.toml"
    path.write_text(tomli_w.dumps(cfg))
    return path


async def bare_cycle(client: AsyncModbusTcpClient, blocks: list[tuple[int, plan.Block]]) -> None:
    for dev_id, b in blocks:
        if b.table is Table.COIL:
            rr = await client.read_coils(b.address, count=b.count, device_id=dev_id)
        elif b.table is Table.DISCRETE:
            rr = await client.read_discrete_inputs(b.address, count=b.count, device_id=dev_id)
        elif b.table is Table.HOLDING:
            rr = await client.read_holding_registers(b.address, count=b.count, device_id=dev_id)
        else:
            rr = await client.read_input_registers(b.address, count=b.count, device_id=dev_id)
        assert not rr.isError()


async def cycle_times(agent: Agent, port: int, blocks: list[tuple[int, plan.Block]], cycles: int
                      ) -> tuple[list[float], list[float]]:
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
    await client.connect()
    agent_t: list[float] = []
    bare_t: list[float] = []
    def all_due() -> None:  # every point due, as in a cycle where energy totals are read too
        for last in agent.poller.last_read.values():
            last.clear()

    for _ in range(5):  # warm both paths
        all_due()
        await agent.poller.poll(agent.mono() + 1.0)
        await bare_cycle(client, blocks)
    for _ in range(cycles):  # interleaved, so drift hits both alike
        all_due()
        t0 = time.perf_counter()
        got = await agent.poller.poll(agent.mono() + 1.0)
        agent_t.append(time.perf_counter() - t0)
        assert len(got.fresh) == len(agent.devices), "a device did not answer"
        t0 = time.perf_counter()
        await bare_cycle(client, blocks)
        bare_t.append(time.perf_counter() - t0)
    client.close()
    return agent_t, bare_t


async def measure_rtu_bytes(profiles: list[Profile]) -> tuple[int, int]:
    """Bytes one planned poll of every device puts on a simulated RTU line (pty), against one
    read per point; counted by the RTU bus itself."""
    from lmt.config.site import SiteConfig
    from lmt.drivers.modbus import ModbusDevice
    from lmt.drivers.modbus_rtu import ModbusRtuBus
    from lmt.firmware_sim import SimulatedSite

    site_cfg = SiteConfig.model_validate({
        "lines": [{"name": "rs485", "protocol": "modbus-rtu", "baud": 115200}],
        "devices": [{"name": p.id, "profile": p.id, "device_id": i + 1, "line": "rs485"}
                    for i, p in enumerate(profiles)]})
    site = SimulatedSite(site_cfg, port=0)
    await site.start()
    bus = ModbusRtuBus(site.line_paths()["rs485"], baud=115200, timeout_s=2.0)
    try:
        devices = [ModbusDevice(p.id, bus, i + 1, p) for i, p in enumerate(profiles)]
        before = bus.bytes_sent + bus.bytes_received
        for d in devices:
            await d.read_points()
        planned = bus.bytes_sent + bus.bytes_received - before
        before = bus.bytes_sent + bus.bytes_received
        for d in devices:
            for pt in d.profile.points:
                await d.read_points([pt.name])
        naive = bus.bytes_sent + bus.bytes_received - before
    finally:
        bus.close()
        await site.stop()
    return planned, naive


def rtu_bytes(blocks: list[plan.Block]) -> int:
    """Request + response bytes of one cycle in Modbus RTU framing."""
    total = 0
    for b in blocks:
        request = 8  # id, function, address(2), count(2), crc(2)
        data = (b.count + 7) // 8 if b.table.is_bit else 2 * b.count
        response = 5 + data  # id, function, byte count, data, crc(2)
        total += request + response
    return total


def rtu_cycle_s(blocks: list[plan.Block], baud: int, bits_per_char: int = 10) -> float:
    char_s = bits_per_char / baud
    silence = max(3.5 * char_s, 0.00175) if baud > 19200 else 3.5 * char_s
    return rtu_bytes(blocks) * char_s + 2 * len(blocks) * silence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=200)
    args = ap.parse_args()
    profiles = bench_profiles()

    planned = sum(len(plan.plan_reads(p.points, p.max_gap)) for p in profiles)
    minimum = sum(minimum_transactions(p) for p in profiles)
    per_point = sum(len(p.points) for p in profiles)
    emit("transactions_per_cycle_vs_minimum", planned, "transactions", minimum)
    emit("transactions_per_cycle_vs_one_read_per_point", planned, "transactions", per_point)

    all_blocks = [b for p in profiles for b in plan.plan_reads(p.points, p.max_gap)]
    naive_blocks = [plan.Block(pt.table, pt.address, pt.size, (pt,))  # type: ignore[arg-type]
                    for p in profiles for pt in p.points]
    emit("rtu_bytes_per_cycle", rtu_bytes(all_blocks), "bytes", rtu_bytes(naive_blocks))
    for baud in (9600, 2400):
        emit(f"rtu_cycle_time_{baud}_baud", rtu_cycle_s(all_blocks, baud), "s",
             rtu_cycle_s(naive_blocks, baud))

    measured, naive_measured = asyncio.run(measure_rtu_bytes(profiles))
    emit("rtu_bytes_per_cycle_measured", measured, "bytes", naive_measured)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        site = write_site(work, profiles, port)
        sim = subprocess.Popen([sys.executable, "-m", "lmt.agent.cli", "sim", str(site)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port("127.0.0.1", port, 30, sim)
            cfg = load_agent_config(write_agent(work, profiles, port))
            blocks = [(i + 1, b) for i, p in enumerate(profiles)
                      for b in plan.plan_reads(p.points, p.max_gap)]

            async def run() -> tuple[list[float], list[float]]:
                agent = Agent(cfg)
                try:
                    return await cycle_times(agent, port, blocks, args.cycles)
                finally:
                    agent.close()

            agent_t, bare_t = asyncio.run(run())
        finally:
            sim.terminate()
            sim.wait(10)
    a, b = statistics.median(agent_t), statistics.median(bare_t)
    emit("poll_cycle_time_median", a * 1000, "ms", b * 1000)
    emit("poll_cycle_time_p90", sorted(agent_t)[int(0.9 * len(agent_t))] * 1000, "ms",
         sorted(bare_t)[int(0.9 * len(bare_t))] * 1000)


if __name__ == "__main__":
    main()
