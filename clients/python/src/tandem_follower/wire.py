"""Frames on the wire (PROTOCOL.md §2–§4): a u32 big-endian length, then one
MessagePack value, a map of one entry ``{kind: value}``.

Frames are plain tuples ``(kind, value)`` where ``value`` is the decoded
MessagePack value, checked against the frame table: a frame that does not fit
raises :class:`ProtocolError`, never another exception.
"""

from __future__ import annotations

import struct
from typing import Any, List, Optional, Tuple

import msgpack

from .errors import ProtocolError, RemoteError

#: The protocol version this package speaks.
PROTOCOL_VERSION = 1
#: The largest frame body read or written by default (16 MiB).
DEFAULT_MAX_FRAME_LENGTH = 16 * 1024 * 1024
LENGTH_PREFIX = 4
U16 = (1 << 16) - 1
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1

Frame = Tuple[str, Any]
_PREFIX = struct.Struct(">I")

# Frames a leader may send, and the shape of their value.
_LEADER_KINDS = frozenset(
    {"Welcome", "Reject", "Response", "Event", "Ack", "Status", "Ping", "Pong", "Goodbye", "Ended"}
)


# One packer for every frame (msgpack.packb builds a new one per call); it
# resets itself after each value, and after an error.
_packer = msgpack.Packer(use_bin_type=True)


def encode(kind: str, value: Any, max_length: int = DEFAULT_MAX_FRAME_LENGTH) -> bytes:
    """The whole frame (length prefix included) of ``{kind: value}``."""
    body = _packer.pack({kind: value})
    if len(body) > max_length:
        raise ProtocolError(f"a {kind} frame of {len(body)} bytes exceeds the {max_length}-byte limit")
    return _PREFIX.pack(len(body)) + body


def _uint(value: Any, limit: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ProtocolError(f"{what}: expected an unsigned integer up to {limit}, got {value!r}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what}: expected a string, got {type(value).__name__}")
    return value


def _bin(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError(f"{what}: expected bin, got {type(value).__name__}")
    return value


def _array(value: Any, sizes: Tuple[int, ...], what: str) -> list:
    if not isinstance(value, (list, tuple)) or len(value) not in sizes:
        raise ProtocolError(f"{what}: expected an array of {' or '.join(map(str, sizes))}, got {value!r}")
    return list(value)


def remote_error(value: Any, what: str = "error") -> RemoteError:
    kind, code, message = _array(value, (3,), what)
    return RemoteError(_str(kind, f"{what}.kind"), _str(code, f"{what}.code"), _str(message, f"{what}.message"))


def _result(value: Any, ok: Any, what: str) -> Tuple[bool, Any]:
    if not isinstance(value, dict) or len(value) != 1:
        raise ProtocolError(f"{what}: expected {{Ok: ...}} or {{Err: ...}}, got {value!r}")
    ((tag, inner),) = value.items()
    if tag == "Ok":
        return True, ok(inner)
    if tag == "Err":
        return False, remote_error(inner, f"{what}.Err")
    raise ProtocolError(f"{what}: unknown result tag {tag!r}")


def _nil(value: Any) -> None:
    if value is not None:
        raise ProtocolError(f"expected nil, got {value!r}")
    return None


def decode_body(body: bytes) -> Frame:
    """One frame body from the leader, checked; raises :class:`ProtocolError`."""
    try:
        value = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=False)
    except Exception as error:  # msgpack raises several types for bad bytes
        raise ProtocolError(f"malformed frame body: {error}") from error
    if not isinstance(value, dict) or len(value) != 1:
        raise ProtocolError(f"a frame body must be a map of one entry, got {type(value).__name__}")
    ((kind, inner),) = value.items()
    if not isinstance(kind, str) or kind not in _LEADER_KINDS:
        raise ProtocolError(f"a leader may not send a frame of kind {kind!r}")
    return kind, _check(kind, inner)


def _check(kind: str, v: Any) -> Any:
    if kind == "Response":  # first: the frame of every call
        if type(v) is list and len(v) == 2:
            id_, result = v
            if type(id_) is int and 0 <= id_ <= U64 and type(result) is dict and len(result) == 1:
                ok = result.get("Ok")
                if type(ok) is bytes:
                    return id_, (True, ok)
        id_, result = _array(v, (2,), kind)
        return _uint(id_, U64, "Response.id"), _result(result, lambda p: _bin(p, "Response.Ok"), "Response.result")
    if kind == "Welcome":
        version, leader_id, epoch, pid, heartbeat_ms = _array(v, (5,), kind)
        leader_id = _bin(leader_id, "Welcome.leader_id")
        if len(leader_id) != 16:
            raise ProtocolError("Welcome.leader_id: expected 16 bytes")
        return (_uint(version, U16, "Welcome.version"), leader_id, _uint(epoch, U64, "Welcome.epoch"),
                _uint(pid, U32, "Welcome.pid"), _uint(heartbeat_ms, U32, "Welcome.heartbeat_ms"))
    if kind == "Reject":
        version, error = _array(v, (2,), kind)
        return _uint(version, U16, "Reject.version"), remote_error(error, "Reject.error")
    if kind == "Event":
        fields = _array(v, (5, 6), kind)
        cached = False
        if len(fields) == 6:
            if not isinstance(fields[5], bool):
                raise ProtocolError("Event.cached: expected a bool")
            cached = fields[5]
        return (_str(fields[0], "Event.channel"), _bin(fields[1], "Event.key"), _uint(fields[2], U64, "Event.epoch"),
                _uint(fields[3], U64, "Event.seq"), _bin(fields[4], "Event.payload"), cached)
    if kind == "Ack":
        id_, result = _array(v, (2,), kind)
        return _uint(id_, U64, "Ack.id"), _result(result, _nil, "Ack.result")
    if kind == "Status":
        channel, state = _array(v, (2,), kind)
        return _str(channel, "Status.channel"), _state(state)
    if kind in ("Ping", "Pong"):
        return _uint(v, U64, kind)
    if kind == "Goodbye":
        return _str(v, kind)
    if kind == "Ended":
        channel, key, error = _array(v, (3,), kind)
        return _str(channel, "Ended.channel"), _bin(key, "Ended.key"), remote_error(error, "Ended.error")
    raise ProtocolError(f"unexpected frame kind {kind!r}")  # unreachable: kinds are checked first


def _state(value: Any) -> Tuple[str, Optional[RemoteError]]:
    if value in ("Starting", "Ready"):
        return value, None
    if isinstance(value, dict) and len(value) == 1 and "Down" in value:
        return "Down", remote_error(value["Down"], "Status.Down")
    raise ProtocolError(f"unknown upstream state {value!r}")


class FrameReader:
    """Reassembles frames from a stream of bytes (split or coalesced arbitrarily)."""

    def __init__(self, max_length: int = DEFAULT_MAX_FRAME_LENGTH) -> None:
        self.max_length = max_length
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[Frame]:
        """The frames that ``data`` completes, in order (bytes of a frame not yet
        complete are kept for the next call). Raises :class:`ProtocolError` on a
        length over the limit (from the prefix alone) or a bad body; the reader
        is then unusable."""
        buffer = self._buffer
        if buffer:
            buffer += data
            view: Any = buffer
        else:
            view = data
        frames: List[Frame] = []
        pos = 0
        end = len(view)
        while end - pos >= LENGTH_PREFIX:
            (length,) = _PREFIX.unpack_from(view, pos)
            if length > self.max_length:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_length} bytes")
            start = pos + LENGTH_PREFIX
            if end - start < length:
                break
            frames.append(decode_body(bytes(view[start : start + length])))
            pos = start + length
        if pos < end:
            if buffer:
                del buffer[:pos]
            else:
                buffer += data[pos:]
        elif buffer:
            buffer.clear()
        return frames

    @property
    def pending(self) -> int:
        """Bytes of a frame begun but not complete (a close now cuts a frame)."""
        return len(self._buffer)

    async def read(self, stream: Any) -> Optional[Frame]:
        """The next frame from an ``asyncio.StreamReader``; ``None`` on a clean
        close at a frame boundary. Raises :class:`ProtocolError`."""
        try:
            prefix = await stream.readexactly(LENGTH_PREFIX)
        except Exception as error:  # IncompleteReadError, ConnectionError
            partial = getattr(error, "partial", b"")
            if partial:
                raise ProtocolError(f"connection closed in the middle of a frame ({len(partial)} bytes)") from error
            if isinstance(error, ConnectionError):
                raise ProtocolError(f"connection failed: {error}") from error
            return None
        (length,) = struct.unpack(">I", prefix)
        if length > self.max_length:
            raise ProtocolError(f"frame of {length} bytes exceeds the limit of {self.max_length} bytes")
        try:
            body = await stream.readexactly(length)
        except Exception as error:
            raise ProtocolError("connection closed in the middle of a frame") from error
        return decode_body(body)
