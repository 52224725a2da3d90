"""The DL/T 645-2007 codec, byte for byte: the worked sequences of the domain note, BCD values,
preamble and garbage handling, checksums, abnormal replies, multi-frame replies, 1C payloads."""

from __future__ import annotations

from datetime import datetime

import pytest

from lmt.config.profiles import Point
from lmt.drivers.dlt645 import (
    ChecksumError,
    ControlCommand,
    Dlt645Refused,
    Frame,
    FrameError,
    StatusWord3,
    assemble,
    control_payload,
    control_request,
    decode_bcd,
    decode_frame,
    decode_value,
    encode_frame,
    error_meanings,
    find_frame,
    frame_length,
    read_address_request,
    read_follow_request,
    read_request,
    reply_payload,
    time_sync_request,
)
from lmt.drivers.errors import DeviceException


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# The worked examples of the DL/T 645-2007 domain notes.
READ_REQUEST = h("FE FE FE FE 68 12 90 78 56 34 12 68 11 04 33 33 34 33 68 16")
READ_REPLY = h("68 12 90 78 56 34 12 68 91 08 33 33 34 33 89 67 45 33 54 16")
READ_ADDRESS = h("FE FE FE FE 68 AA AA AA AA AA AA 68 13 00 DF 16")


def point(fmt: str, signed: bool = False, **kw: object) -> Point:
    return Point(name="x", di="00000000", format=fmt, signed=signed, **kw)  # type: ignore[arg-type]


# -- worked examples ---------------------------------------------------------------------------


def test_read_request_bytes() -> None:
    assert read_request("123456789012", "00010000") == READ_REQUEST


def test_reply_decodes_to_1234_56_kwh() -> None:
    frame = decode_frame(READ_REPLY)
    assert frame.address == "123456789012"
    assert (frame.control, frame.function) == (0x91, 0x11)
    assert frame.is_reply and not frame.is_abnormal and not frame.more_follows
    body, more = reply_payload(frame, "00010000")
    assert (body, more) == (h("56 34 12 00"), False)
    assert decode_value(body, point("XXXXXX.XX")) == pytest.approx(1234.56)


def test_read_address_request_bytes() -> None:
    assert read_address_request() == READ_ADDRESS


def test_encode_then_decode_round_trip() -> None:
    raw = encode_frame("000000001234", 0x91, h("00 00 03 02 45 23 01"), preamble=0)
    assert raw[0] == 0x68 and raw[-1] == 0x16
    assert decode_frame(raw) == Frame("000000001234", 0x91, h("00 00 03 02 45 23 01"))


def test_bad_address_and_di_rejected() -> None:
    with pytest.raises(ValueError):
        read_request("12345678901", "00010000")
    with pytest.raises(ValueError):
        read_request("12345678901X", "00010000")
    with pytest.raises(ValueError):
        read_request("123456789012", "000100")


# -- framing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("preamble", [0, 1, 4, 9])
def test_any_number_of_preamble_bytes_is_skipped(preamble: int) -> None:
    raw = b"\xfe" * preamble + READ_REPLY
    assert frame_length(raw) == len(raw)
    frame, used = find_frame(raw)
    assert frame is not None and frame.address == "123456789012" and used == len(raw)


def test_garbage_before_a_frame_is_skipped() -> None:
    # Noise including a stray 68 (a false start: no second 68 six bytes later).
    raw = h("00 13 68 22 FF 16 91 07") + READ_REPLY
    assert frame_length(raw) == len(raw)
    frame, used = find_frame(raw)
    assert frame is not None and frame.data[4:] == h("56 34 12 00") and used == len(raw)
    # A stray 68 that looks like a frame header announcing 255 bytes does not hide the reply.
    raw = h("68 01 02 03 04 05 06 68 91 FF 00") + READ_REPLY
    assert frame_length(raw) == len(raw)
    assert find_frame(raw)[0] == decode_frame(READ_REPLY)


def test_incomplete_frame_waits_for_more() -> None:
    for cut in range(len(READ_REPLY)):
        assert frame_length(READ_REPLY[:cut]) is None
        assert find_frame(READ_REPLY[:cut])[0] is None
    frame, used = find_frame(h("00 01 02") + READ_REPLY[:5])
    assert frame is None and used == 3  # the noise before the start can go


def test_bad_checksum_is_rejected_but_ends_the_wait() -> None:
    bad = bytearray(READ_REPLY)
    bad[-2] ^= 0x01
    assert frame_length(bad) == len(bad)  # the line stops waiting ...
    with pytest.raises(ChecksumError):  # ... and the decoder says why
        find_frame(bad)


def test_wrong_end_byte_or_length_is_not_a_frame() -> None:
    bad = bytearray(READ_REPLY)
    bad[-1] = 0x17
    assert frame_length(bad) is None
    assert find_frame(bad)[0] is None
    short = bytearray(READ_REPLY)
    short[9] = 0x07  # length one too short: the 16 is not where it says
    assert find_frame(short)[0] is None


def test_echo_of_our_request_is_skipped_by_the_reply_reader() -> None:
    raw = READ_REQUEST + READ_REPLY
    assert frame_length(raw) == len(raw)
    assert frame_length(raw, replies_only=False) == len(READ_REQUEST)
    frame, _ = find_frame(raw, replies_only=True)
    assert frame is not None and frame.is_reply


# -- values ------------------------------------------------------------------------------------


def test_bcd_little_endian_and_sign_bit() -> None:
    assert decode_bcd(h("56 34 12 00")) == 123456
    assert decode_bcd(h("56 34 92"), signed=True) == -123456
    assert decode_bcd(h("56 34 92"), signed=False) == 923456  # unsigned: 9 is a digit
    assert decode_bcd(h("00 80"), signed=True) == 0  # negative zero


@pytest.mark.parametrize(("fmt", "signed", "data", "value"), [
    ("XXX.X", False, "34 12", 123.4),
    ("XXX.XXX", True, "78 56 34", 345.678),
    ("XXX.XXX", True, "78 56 B4", -345.678),
    ("XX.XXXX", True, "99 99 79", 79.9999),
    ("XX.XXXX", True, "00 50 80", -0.5),
    ("X.XXX", True, "50 89", -0.95),
    ("XX.XX", False, "02 50", 50.02),
    ("XXXXXX.XX", False, "99 99 99 99", 999999.99),
    ("XXXX", False, "34 12", 1234.0),
])
def test_decode_value_by_format(fmt: str, signed: bool, data: str, value: float) -> None:
    assert decode_value(h(data), point(fmt, signed)) == pytest.approx(value)


def test_multiplier_offset_and_invalid() -> None:
    p = point("XXX.X", multiplier=10.0, offset=-1.0, invalid=(9999,))
    assert decode_value(h("34 12"), p) == pytest.approx(123.4 * 10 - 1)
    assert decode_value(h("99 99"), p) is None


def test_non_bcd_and_wrong_length_rejected() -> None:
    with pytest.raises(FrameError, match="not BCD"):
        decode_value(h("3A 12"), point("XXX.X"))
    with pytest.raises(FrameError, match="takes 2 bytes"):
        decode_value(h("34 12 00"), point("XXX.X"))


# -- abnormal replies --------------------------------------------------------------------------


def test_abnormal_reply_error_bits() -> None:
    raw = encode_frame("123456789012", 0xD1, bytes([0x02]))
    frame = decode_frame(raw)
    assert frame.is_abnormal and frame.is_reply and frame.function == 0x11
    assert error_meanings(frame.data[0]) == ["no data requested"]
    assert error_meanings(0x05) == ["other error", "wrong password or not authorised"]
    assert error_meanings(0x78) == ["baud rate cannot be changed", "too many year time zones",
                                    "too many day periods", "too many tariffs"]
    exc = Dlt645Refused("m1", 0x1C, 0x04, "a hint")
    assert isinstance(exc, DeviceException) and exc.unauthorised and not exc.no_data
    assert "wrong password or not authorised" in str(exc) and "a hint" in str(exc)
    assert exc.meanings == ["wrong password or not authorised"]


# -- multi-frame replies -----------------------------------------------------------------------


def test_multi_frame_assembly() -> None:
    di = h("00 FF 01 02")  # 0201FF00, DI0 first
    first = decode_frame(encode_frame("123456789012", 0xB1, di + h("01 23")))
    second = decode_frame(encode_frame("123456789012", 0xB2, di + h("02 23 01")))
    last = decode_frame(encode_frame("123456789012", 0x92, di + h("03 23 02")))
    assert first.more_follows and second.more_follows and not last.more_follows
    assert first.function == 0x11 and second.function == 0x12 == last.function
    assert assemble([first, second, last], "0201FF00") == h("01 23 02 23 03 23")
    with pytest.raises(FrameError, match="numbered"):
        assemble([first, last], "0201FF00")  # follow-up 1 is missing
    with pytest.raises(FrameError, match="more frames"):
        assemble([first, second], "0201FF00")
    with pytest.raises(FrameError, match="asked 02010100"):
        reply_payload(first, "02010100")


def test_follow_up_request_carries_the_di_and_number() -> None:
    raw = read_follow_request("123456789012", "0201FF00", 2, preamble=0)
    frame = decode_frame(raw)
    assert frame.control == 0x12 and frame.data == h("00 FF 01 02 02")


# -- time sync and 1C --------------------------------------------------------------------------


def test_broadcast_time_sync() -> None:
    frame = decode_frame(time_sync_request(datetime(2025, 6, 15, 15, 6, 40)))
    assert frame.address == "999999999999" and frame.control == 0x08
    assert frame.data == h("40 06 15 15 06 25")  # ss mm hh DD MM YY


def test_control_payload_layout() -> None:
    until = datetime(2025, 6, 15, 16, 7, 8)
    data = control_payload(ControlCommand.TRIP, until, password="123456", level=2,
                           operator="87654321")
    assert data == h("02 56 34 12"  # PA P0 P1 P2
                     "21 43 65 87"  # C0..C3
                     "1A 00"  # N1 N2
                     "08 07 16 15 06 25")  # valid until ss mm hh DD MM YY
    raw = control_request("123456789012", ControlCommand.ALLOW_CLOSE, until, preamble=0)
    frame = decode_frame(raw)
    assert frame.control == 0x1C and len(frame.data) == 16 and frame.data[8] == 0x1B
    assert raw[10:14] == bytes((b + 0x33) & 0xFF for b in h("02 00 00 00"))
    assert [c.value for c in ControlCommand] == [0x1A, 0x1B, 0x2A, 0x2B, 0x3A, 0x3B]


def test_status_word_3_bits() -> None:
    s = StatusWord3.from_bytes(h("D0 10"))  # low byte D0: bits 4, 6, 7; high 10: bit 12
    assert (s.relay_open, s.relay_command_open, s.pre_trip_alarm, s.guarantee) == (
        True, True, True, True)
    s = StatusWord3.from_bytes(h("00 01"))
    assert not s.relay_open and s.meter_type == 1 and not s.guarantee
    assert "relay closed (bit 4)" in s.describe()
