"""Command intake (agent/commands.py) over a real buffer file: verification, replay, the bounded
queue, the time budget, and answers that never flood the buffer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import lmt.agent.commands as commands
from lmt.agent.buffer import BufferFile
from lmt.agent.commands import Intake
from lmt.agent.platform import command_body
from lmt.agent.security import generate_keypair, load_private_key, load_public_key, sign_body
from lmt.agent.state_store import StateStore
from lmt.config.agent import Security
from lmt.control.supervisor import CapRequest

TERMINAL = "demo-0001"


class Sink:
    def __init__(self) -> None:
        self.got: dict[str, list[dict[str, Any]]] = {"results": [], "events": []}
        self.calls = 0

    def __call__(self, stream: str, bodies: list[dict[str, Any]]) -> None:
        self.got[stream] += bodies
        self.calls += 1


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    key, pub = generate_keypair(tmp_path / "keys")
    f = BufferFile(tmp_path / "b.sqlite")
    sink = Sink()
    sec = Security(platform_public_key=pub)
    intake = Intake(sec, load_public_key(pub), TERMINAL, StateStore(f), sink, time.time,
                    budget_s=0.25)

    def signed(**params: Any) -> bytes:
        return sign_body(load_private_key(key), command_body("cap", TERMINAL, **params)).encode()

    yield intake, sink, signed
    f.close()


def test_verified_replayed_and_forged(rig: Any) -> None:
    intake, sink, signed = rig
    cmd = signed(cap_kw=100.0, duration_s=60)
    intake.receive(cmd)
    intake.receive(cmd)  # a duplicate delivery
    intake.receive(b'{"v":1,"body":"{}","sig":"AAAA"}')
    requests = intake.take()
    assert len(requests) == 1 and isinstance(requests[0], CapRequest)
    assert requests[0].cap_kw == 100.0
    got = [(r["status"], r["reason"]) for r in sink.got["results"]]
    assert ("rejected", "replayed") in got and ("rejected", "bad_signature") in got
    assert sink.calls == 1, "the refusals share one transaction"


def test_an_exception_in_one_message_is_a_refusal(rig: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    intake, sink, signed = rig

    def boom(*_a: Any, **_k: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(commands, "verify_command", boom)
    intake.receive(signed(cap_kw=100.0, duration_s=60))
    assert intake.take() == []
    assert sink.got["results"][0]["reason"] == "malformed"


def test_a_full_queue_drops_the_oldest_and_says_so(rig: Any) -> None:
    intake, sink, signed = rig
    intake.max_queue = 10
    for _ in range(15):
        intake.receive(b"junk")
    real = signed(cap_kw=100.0, duration_s=60)
    intake.receive(real)  # the newest is kept
    requests = intake.take()
    assert [r.cap_kw for r in requests] == [100.0]
    dropped = sink.got["events"]
    assert dropped and dropped[0]["type"] == "commands_dropped"
    assert dropped[0]["data"]["unread"] == 6


def test_the_budget_bounds_the_time_spent_per_cycle(rig: Any) -> None:
    intake, _sink, _signed = rig
    intake.budget_s = 0.02
    intake.max_bytes = 1 << 30
    deep = json.dumps({"v": 1, "body": "[" * 30 + "]" * 30 + "x" * 16000, "sig": "A"}).encode()
    for _ in range(2000):
        intake.receive(deep)
    assert len(intake.queue) == 2000
    t0 = time.monotonic()
    intake.take()
    assert time.monotonic() - t0 < 0.2
    assert intake.queue, "what the budget did not allow waits for the next cycle"


def test_forgeries_beyond_a_burst_get_no_result_of_their_own(rig: Any,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.setattr(commands, "UNAUTHENTICATED_BURST", 5)
    intake, sink, _signed = rig
    intake._tokens = 5.0
    for _ in range(50):
        intake.receive(b'{"v":1,"body":"{}","sig":"AAAA"}')
    intake.take()
    assert len(sink.got["results"]) == 5
    ev = sink.got["events"][0]["data"]
    assert ev["unanswered"] == 45 and ev["count"] == 45


def test_ids_are_remembered_with_the_answer_not_before(rig: Any) -> None:
    """A verified command's id waits for the transaction that saves the supervisor's answer;
    a request that gets no answer (the step failed, the agent stopped) may be sent again."""
    intake, _sink, signed = rig
    cmd = signed(cap_kw=100.0, duration_s=60)
    intake.receive(cmd)
    [req] = intake.take()
    assert not intake.store.command_seen(req.id), "not before the answer is saved"
    intake.receive(cmd)
    assert intake.take() == [], "a duplicate meanwhile is still a replay"
    intake.forget([req])  # no answer was saved
    intake.receive(cmd)
    [again] = intake.take()
    assert again.id == req.id
    seen = intake.seen([again])
    assert [s[0] for s in seen] == [req.id]
    intake.store.remember_commands(seen)  # (the daemon does it in the step's transaction)
    assert intake.store.command_seen(req.id)
