"""Signed commands: Ed25519 keys, signing (platform side) and verification (terminal side).

The platform holds the private key; a terminal holds only the public key. A command is refused
unless its signature verifies, it names this terminal, it is within its validity window, and
its id has not been seen before.

Before any JSON is parsed, a message is bounded: at most :data:`MAX_PAYLOAD_BYTES` bytes, UTF-8,
and ``[``/``{`` nested at most :data:`MAX_NESTING` levels deep, in the envelope and in the body
text alike (a parser recurses per level: a few kilobytes of brackets would otherwise exhaust the
stack before the signature is even looked at). Whatever the bytes, :func:`verify_command`
raises nothing but :class:`Refusal`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import TypeAdapter, ValidationError

from .messages import Command, RejectReason, SignedCommand

_command_adapter: TypeAdapter[Command] = TypeAdapter(Command)

#: The longest command body (characters): ``SignedCommand.body``'s ``max_length``.
MAX_BODY_CHARS = 16384
#: The largest command message read (bytes): a body of :data:`MAX_BODY_CHARS` ASCII characters,
#: every one of them escaped in the envelope (``\"`` or ``\\``) at worst, the signature and the
#: envelope's keys fit with room to spare; commands are a few hundred bytes.
MAX_PAYLOAD_BYTES = 36 * 1024
#: How deep ``[`` and ``{`` may nest, in the envelope and in the body (a command needs 4).
MAX_NESTING = 32

# A JSON string (to the end of the text if unterminated; an escape is skipped as a pair, so \"
# does not end it) or a bracket; only a bracket is captured.
_JSON_BRACKETS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|([\[\]{}])', re.DOTALL)


def too_deep(text: str, limit: int = MAX_NESTING) -> bool:
    """Whether ``[`` and ``{`` nest more than ``limit`` levels deep in the JSON text ``text``;
    brackets inside strings do not count, a closing one with nothing open counts as nothing.

    A scan, not a parse: fast (milliseconds for the largest message) and safe for any text, JSON
    or not.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for bracket in "".join(_JSON_BRACKETS.findall(text)):
        if bracket in "[{":
            depth += 1
            if depth > limit:
                return True
        elif depth:
            depth -= 1
    return False


def generate_keypair(directory: Path, name: str = "platform", overwrite: bool = False
                     ) -> tuple[Path, Path]:
    """Write ``<name>.key`` (private, PEM, mode 0600) and ``<name>.pub`` (public, PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if not overwrite and (key_path.exists() or pub_path.exists()):
        raise FileExistsError(f"{key_path} or {pub_path} exists already; refusing to overwrite")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(pem)
    pub_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def sign_body(key: Ed25519PrivateKey, body: dict) -> str:
    """Sign a command body; return the JSON text of the :class:`SignedCommand` to publish."""
    text = json.dumps(body, separators=(",", ":"), sort_keys=True)
    sig = base64.b64encode(key.sign(text.encode())).decode()
    return SignedCommand(body=text, sig=sig).model_dump_json()


@dataclass
class Refusal(Exception):
    """A command was refused; ``reason`` is the machine code, ``detail`` says why."""

    reason: RejectReason
    detail: str
    command_id: str | None = None

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def _peek_id(body_text: str) -> str | None:
    """The ``id`` a body claims, before anything is verified (for diagnosis only); None when it
    cannot be read. Never raises."""
    try:
        if len(body_text) > MAX_BODY_CHARS or too_deep(body_text):
            return None
        obj = json.loads(body_text)
    except (ValueError, TypeError, RecursionError, MemoryError):
        return None
    cid = obj.get("id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) and 0 < len(cid) <= 64 else None


def verify_command(payload: bytes, public_key: Ed25519PublicKey, terminal: str, now: float,
                   clock_skew_s: float, max_lifetime_s: float) -> Command:
    """Authenticate and validate one command message, or raise :class:`Refusal` (and nothing
    else, whatever the bytes).

    Replay protection (has this id been seen?) needs the buffer and is done by the caller.
    """
    try:
        return _verify(payload, public_key, terminal, now, clock_skew_s, max_lifetime_s)
    except Refusal:
        raise
    except Exception as exc:  # a last resort: no message may crash the terminal
        what = f"{type(exc).__name__}: {exc}"
        raise Refusal("malformed", f"unreadable command ({what[:200]})") from None


def _bounded_text(payload: bytes) -> str:
    """The message as text, once it is known to be small, UTF-8 and shallow; else Refusal."""
    size = len(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise Refusal("malformed", f"message of {size} bytes: larger than the "
                                   f"{MAX_PAYLOAD_BYTES} bytes a command may have")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refusal("malformed", f"not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if too_deep(text):
        raise Refusal("malformed", f"message nested deeper than {MAX_NESTING} levels")
    return text


def _verify(payload: bytes, public_key: Ed25519PublicKey, terminal: str, now: float,
            clock_skew_s: float, max_lifetime_s: float) -> Command:
    text = _bounded_text(payload)
    try:
        env = SignedCommand.model_validate_json(text)
    except ValidationError as exc:
        raise Refusal("malformed", f"not a signed command envelope: {_first_error(exc)}") from None
    if too_deep(env.body):
        raise Refusal("malformed", f"command body nested deeper than {MAX_NESTING} levels")
    cid = _peek_id(env.body)
    try:
        sig = base64.b64decode(env.sig, validate=True)
    except (binascii.Error, ValueError):
        raise Refusal("bad_signature", "signature is not base64", cid) from None
    try:
        public_key.verify(sig, env.body.encode())
    except InvalidSignature:
        raise Refusal("bad_signature", "signature does not verify with the platform key",
                      cid) from None
    try:
        cmd = _command_adapter.validate_json(env.body)
    except ValidationError as exc:
        raise Refusal("invalid", _first_error(exc), cid) from None
    if cmd.terminal != terminal:
        raise Refusal("wrong_terminal", f"addressed to {cmd.terminal!r}, this is {terminal!r}",
                      cmd.id)
    if now > cmd.expires_at:
        raise Refusal("expired", f"expired {now - cmd.expires_at:.1f} s ago", cmd.id)
    if cmd.issued_at > now + clock_skew_s:
        raise Refusal("not_yet_valid", f"issued {cmd.issued_at - now:.1f} s in the future "
                      f"(allowed clock skew {clock_skew_s:g} s)", cmd.id)
    if cmd.expires_at - cmd.issued_at > max_lifetime_s:
        raise Refusal("invalid", f"validity window longer than {max_lifetime_s:g} s", cmd.id)
    return cmd


def _first_error(exc: ValidationError) -> str:
    errs = exc.errors()
    if not errs:
        return str(exc)
    e = errs[0]
    loc = ".".join(str(p) for p in e["loc"])
    more = f" (+{len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {e['msg']}{more}" if loc else f"{e['msg']}{more}"
