"""The simulator's control channel: change a running site's faults and energy-ledger signatures,
one JSON line at a time.

``lmt sim --control-port N`` (0: a free port, see the ready file's JSON) serves it on
127.0.0.1. Each request is one JSON object on one line; each answer too, in order:

* ``{"device": "main-meter", "faults": {"no_answer_rate": 0.5}}`` replaces the device's faults
  (keys as in the site file's ``[devices.faults]``; missing keys take their defaults, so
  ``{"faults": {}}`` clears them) -> ``{"ok": true, "device": ..., "faults": {...all keys}}``.
  Any device: Modbus TCP, Modbus RTU or a DL/T 645 meter (by its device name).
* ``{"device": "meter-b", "tamper": {"ct_reversed": "l3"}}`` replaces a meter's signatures
  (keys as in ``[devices.tamper]``; ``{"tamper": {}}`` clears them) ->
  ``{"ok": true, "device": ..., "tamper": {...all keys}, "events": {...}}``.
* ``{"device": "meter-b", "event": "cover_open"}``: the meter records one event (its cover was
  opened; any key of ``[devices.events]`` its profile serves) ->
  ``{"ok": true, "device": ..., "events": {...every count}}``.
* ``{"device": "meter-a", "register_jump_kwh": -500.0}``: the meter's import register steps by
  that much, once (negative: back) -> ``{"ok": true, "device": ..., "import_energy_kwh": ...}``.
* ``{"site": {"unmetered_kw": 5.0}}``: the load between the main meter and the sub-meters ->
  ``{"ok": true, "site": {"unmetered_kw": 5.0}}``.
* ``{"get": "faults"}`` -> ``{"ok": true, "faults": {"<device>": {...}, ...}}``
* ``{"get": "tamper"}``, ``{"get": "events"}`` -> every meter's signatures / event counts;
  ``{"get": "site"}`` -> ``{"ok": true, "site": {"unmetered_kw": ...}}``
* ``{"get": "lines"}`` -> ``{"ok": true, "lines": {"<line>": "/dev/pts/4", ...}}`` (Modbus RTU
  and DL/T 645 lines)
* ``{"get": "stats"}`` -> ``{"ok": true, "devices": {"<device>": {"answer": 12, ...}},
  "lines": {"<line>": {"protocol": "modbus-rtu", "frames": 14, "overlaps": 0,
  "bad_frames": 0, "answers": 12, "min_gap_s": ...}, "<dlt645 line>": {"protocol": "dlt645",
  "frames": 9, "answers": 8}}}`` (a DL/T 645 line counts the valid request frames it heard and
  the replies it sent)

A bad request gets ``{"ok": false, "error": "<what is wrong>"}`` and the connection stays
open. From a shell: ``python -m lmt.firmware_sim.control 40123 '{"get": "faults"}'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from typing import TYPE_CHECKING, Any

from lmt.config.site import Faults, Tamper

if TYPE_CHECKING:
    from .server import SimulatedSite

_USAGE = ('expected {"device": "<name>", "faults": {...}}, {"device": "<name>", "tamper": {...}}, '
          '{"device": "<name>", "event": "<key>"}, {"device": "<name>", "register_jump_kwh": '
          '<kWh>}, {"site": {"unmetered_kw": <kW>}} or {"get": "faults" | "tamper" | "events" | '
          '"site" | "lines" | "stats"}')

#: What a device request may carry besides ``device``: exactly one of these.
_DEVICE_ACTIONS = ("faults", "tamper", "event", "register_jump_kwh")


def _validation_message(exc: ValueError, what: str = "faults") -> str:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for e in errors():
        where = ".".join(str(x) for x in (what, *e.get("loc", ())))
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _meters(site: SimulatedSite) -> list[str]:
    return [d.name for d in site.config.devices if _is_meter(site, d.name)]


def _is_meter(site: SimulatedSite, name: str) -> bool:
    try:
        site.tamper(name)
    except (KeyError, ValueError):
        return False
    return True


def _site_answer(site: SimulatedSite) -> dict[str, Any]:
    return {"ok": True, "site": {"unmetered_kw": site.physics.unmetered_kw}}


def _site_request(site: SimulatedSite, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) - {"unmetered_kw"}:
        return {"ok": False, "error": 'site: expected {"unmetered_kw": <kW>}'}
    if "unmetered_kw" in raw:
        kw = raw["unmetered_kw"]
        if isinstance(kw, bool) or not isinstance(kw, int | float) or not kw >= 0 \
                or kw == float("inf"):
            return {"ok": False, "error": f"site.unmetered_kw: a number of kW >= 0 (got {kw!r})"}
        site.set_unmetered_kw(float(kw))
    return _site_answer(site)


def _device_request(site: SimulatedSite, device: str, action: str, raw: Any) -> dict[str, Any]:
    """A request about one device: its faults, its signatures, an event, a register jump."""
    if action == "faults":
        if not isinstance(raw, dict):
            return {"ok": False, "error": "faults must be a JSON object"}
        try:
            faults = Faults.model_validate(raw)
        except ValueError as exc:  # pydantic's ValidationError
            return {"ok": False, "error": _validation_message(exc)}
        site.set_faults(device, faults)
        return {"ok": True, "device": device, "faults": faults.model_dump(mode="json")}
    if not _is_meter(site, device):
        return {"ok": False, "error": f"{device!r} is not a meter (meters: "
                                      f"{', '.join(_meters(site))})"}
    if action == "tamper":
        if not isinstance(raw, dict):
            return {"ok": False, "error": "tamper must be a JSON object"}
        try:
            tamper = Tamper.model_validate(raw)
        except ValueError as exc:
            return {"ok": False, "error": _validation_message(exc, "tamper")}
        site.set_tamper(device, tamper)
        return {"ok": True, "device": device, "tamper": tamper.model_dump(mode="json"),
                "events": site.events(device)}
    if action == "event":
        if not isinstance(raw, str):
            return {"ok": False, "error": "event must be a string, e.g. \"cover_open\""}
        try:
            site.count_event(device, raw)
        except KeyError as exc:
            return {"ok": False, "error": str(exc.args[0])}
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "device": device, "events": site.events(device)}
    # register_jump_kwh
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != raw \
            or abs(raw) == float("inf"):
        return {"ok": False, "error": f"register_jump_kwh: a number of kWh (got {raw!r})"}
    reading = site.jump_register(device, float(raw))
    return {"ok": True, "device": device, "import_energy_kwh": reading}


def handle(site: SimulatedSite, message: Any) -> dict[str, Any]:
    """The answer to one control request (already parsed from JSON)."""
    if not isinstance(message, dict):
        return {"ok": False, "error": f"a request is a JSON object; {_USAGE}"}
    if "get" in message:
        what = message["get"]
        if what == "faults":
            return {"ok": True, "faults": {name: inj.faults.model_dump(mode="json")
                                           for name, inj in site.injectors.items()}}
        if what == "tamper":
            return {"ok": True, "tamper": {name: site.tamper(name).model_dump(mode="json")
                                           for name in _meters(site)}}
        if what == "events":
            return {"ok": True, "events": {name: site.events(name) for name in _meters(site)}}
        if what == "site":
            return _site_answer(site)
        if what == "lines":
            return {"ok": True, "lines": site.line_paths()}
        if what == "stats":
            lines: dict[str, dict[str, Any]] = {
                name: {"protocol": "modbus-rtu", "frames": len(ln.frames),
                       "overlaps": ln.overlaps, "bad_frames": ln.bad_frames,
                       "answers": ln.answers, "min_gap_s": ln.min_gap_s()}
                for name, ln in site.rtu_lines.items()}
            for name, meters in site.dlt645_lines.items():
                lines[name] = {"protocol": "dlt645", "frames": meters.requests,
                               "answers": meters.replies}
            return {"ok": True,
                    "devices": {name: {k.value: n for k, n in inj.counts.items()}
                                for name, inj in site.injectors.items()},
                    "lines": lines}
        return {"ok": False, "error": f"cannot get {what!r}; {_USAGE}"}
    if set(message) == {"site"}:
        return _site_request(site, message["site"])
    actions = [k for k in message if k != "device"]
    if "device" not in message or len(actions) != 1 or actions[0] not in _DEVICE_ACTIONS:
        return {"ok": False, "error": _USAGE}
    device = message["device"]
    if not isinstance(device, str) or device not in site.injectors:
        return {"ok": False, "error": f"no device named {device!r} (devices: "
                                      f"{', '.join(site.injectors)})"}
    return _device_request(site, device, actions[0], message[actions[0]])


class ControlServer:
    """Serves :func:`handle` as JSON lines over TCP."""

    def __init__(self, site: SimulatedSite, host: str = "127.0.0.1", port: int = 0) -> None:
        self.site = site
        self.host = host
        self.port = port
        self.bound_port: int | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        """Start listening; returns the bound port."""
        try:
            self._server = await asyncio.start_server(self._connection, self.host, self.port)
        except OSError as exc:
            raise OSError(f"cannot listen for control on {self.host}:{self.port} "
                          f"({exc.strerror or exc})") from exc
        self.bound_port = int(self._server.sockets[0].getsockname()[1])
        return self.bound_port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (me := asyncio.current_task()) is not None:
            self._tasks.add(me)
            me.add_done_callback(self._tasks.discard)
        self._writers.add(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the reader's limit
                    writer.write(_encode({"ok": False, "error": "request line too long"}))
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    message = json.loads(line)
                except ValueError as exc:
                    answer = {"ok": False, "error": f"not JSON: {exc}"}
                else:
                    answer = handle(self.site, message)
                writer.write(_encode(answer))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def _encode(answer: dict[str, Any]) -> bytes:
    return (json.dumps(answer) + "\n").encode()


async def request_async(port: int, message: dict[str, Any], host: str = "127.0.0.1",
                        timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one control request, return the answer (raises OSError/TimeoutError on failure)."""
    async def exchange() -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write((json.dumps(message) + "\n").encode())
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        if not line:
            raise ConnectionError("the simulator closed the control connection")
        answer: dict[str, Any] = json.loads(line)
        return answer

    return await asyncio.wait_for(exchange(), timeout_s)


def request(port: int, message: dict[str, Any], host: str = "127.0.0.1",
            timeout_s: float = 5.0) -> dict[str, Any]:
    """Blocking :func:`request_async`, for scripts, technicians and threads without a loop."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall((json.dumps(message) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the simulator closed the control connection")
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def main(argv: list[str] | None = None) -> int:
    """``python -m lmt.firmware_sim.control PORT JSON``: send one request, print the answer."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m lmt.firmware_sim.control PORT '{\"get\": \"faults\"}'",
              file=sys.stderr)
        return 2
    try:
        answer = request(int(args[0]), json.loads(args[1]))
    except (ValueError, OSError) as exc:
        print(f"lmt sim control: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0 if answer.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
