"""The state store: the terminal's own state in the buffer file, under typed keys.

What it keeps (table ``state``: key -> JSON text, and two tables of its own):

- ``supervisor``: the control supervisor's state (:class:`lmt.control.supervisor
  .SupervisorState`): the active command, the loads held off and by whom, DR events, the
  terminal control modes' parameters and state, pending two-minute records. Saved before
  every cycle's actions are carried out (persist, then actuate);
- ``ledger``: the energy ledger's state (:class:`lmt.analytics.ledger.LedgerState`): each
  ledger meter's open and unfinished intervals, registers, demand window and month maximum,
  bills so far, detectors; saved with every interval written and at least every
  ``ledger.save_every_s``
  (:mod:`lmt.agent.ledger`);
- the command ids already seen (table ``seen_commands``): a replayed command is refused, also
  after a restart;
- the customer's opt-out requests (table ``optout_requests``), queued by ``lmt optout``.

An older agent kept its control state in the tables ``shed_loads``, ``dr_state`` and
``mode_store``; :meth:`StateStore.legacy` reads them once, so an upgraded terminal keeps its
mode parameters, DR events and held loads (:func:`lmt.agent.derive.migrate`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Literal

from .buffer import BufferFile

StateKey = Literal["supervisor", "ledger"]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class StateStore:
    def __init__(self, file: BufferFile) -> None:
        self.file = file
        self.db = file.db

    # -- typed keys --------------------------------------------------------------------------
    def load(self, key: StateKey) -> Any:
        """The value stored under ``key`` (JSON types), or None. ``ValueError`` when it is not
        JSON (a damaged row: the caller decides what to start from)."""
        row = self.db.execute("SELECT value FROM state WHERE key = ?", [key]).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except ValueError as exc:
            raise ValueError(f"state {key!r} in {self.file.path} is not JSON: {exc}") from None

    def save_text(self, key: StateKey, text: str, now: float) -> None:
        """Store ``text`` (JSON) under ``key``, in the caller's transaction if there is one."""
        with self.file.atomic():
            self.db.execute("INSERT OR REPLACE INTO state(key, value, saved_at) VALUES (?, ?, ?)",
                            [key, text, now])

    def save(self, key: StateKey, value: Any, now: float) -> None:
        self.save_text(key, dumps(value), now)

    # -- command replay protection -----------------------------------------------------------
    def command_seen(self, command_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM seen_commands WHERE id = ?", [command_id]).fetchone()
        return row is not None

    def remember_commands(self, seen: list[tuple[str, float, float]]) -> None:
        """:meth:`remember_command` for several (id, expires at, received at), in the caller's
        transaction."""
        for command_id, expires_at, now in seen:
            self.remember_command(command_id, expires_at, now)

    def remember_command(self, command_id: str, expires_at: float, now: float) -> None:
        with self.file.atomic():
            self.db.execute("INSERT OR IGNORE INTO seen_commands(id, expires_at, received_at) "
                            "VALUES (?, ?, ?)", [command_id, expires_at, now])
            # An expired id would be refused as expired anyway: forget it after a day's margin.
            self.db.execute("DELETE FROM seen_commands WHERE expires_at < ?", [now - 86400.0])

    # -- the customer's opt-out requests -----------------------------------------------------
    def pending_optouts(self) -> list[tuple[int, str, str, float]]:
        """Opt-out requests not yet handled, oldest first: (id, event id, reason, requested at)."""
        return [(int(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in self.db.execute(
            "SELECT id, event_id, reason, requested_at FROM optout_requests ORDER BY id")]

    def optouts_done(self, request_ids: Iterable[int]) -> None:
        ids = [(i,) for i in request_ids]
        if ids:
            with self.file.atomic():
                self.db.conn.executemany("DELETE FROM optout_requests WHERE id = ?", ids)

    # -- an older agent's control state ------------------------------------------------------
    def legacy(self) -> dict[str, Any]:
        """What an agent before the supervisor kept: ``shed`` (load -> (command id, since)),
        ``dr`` (the DR scheduler's dict), ``modes`` (key -> value of ``mode_store``); empty
        when there is none."""
        out: dict[str, Any] = {}
        if self.file.has_table("shed_loads"):
            out["shed"] = {str(r[0]): (r[1], float(r[2])) for r in self.db.execute(
                "SELECT load, command_id, since FROM shed_loads")}
        if self.file.has_table("dr_state"):
            row = self.db.execute("SELECT state FROM dr_state WHERE id = 1").fetchone()
            if row is not None:
                out["dr"] = json.loads(row[0])
        if self.file.has_table("mode_store"):
            out["modes"] = {str(k): json.loads(v) for k, v in self.db.execute(
                "SELECT key, value FROM mode_store")}
        return out

    def drop_legacy(self) -> None:
        """Forget the older agent's tables once their content is in the supervisor's state (in
        the caller's transaction)."""
        with self.file.atomic():
            for table in ("shed_loads", "dr_state", "mode_store"):
                self.db.execute(f"DROP TABLE IF EXISTS {table}")
