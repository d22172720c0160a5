"""The wire format against the conformance kit's vectors (conformance/vectors.json):
every frame a leader sends decodes to its fields, every frame a follower sends
encodes to its bytes, and bad bytes are a ProtocolError, never another exception."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any, Dict

import pytest

from tandem_follower import wire
from tandem_follower.errors import ProtocolError

VECTORS = json.loads((Path(__file__).resolve().parents[3] / "conformance" / "vectors.json").read_text())


def u64(value: Any) -> int:
    return int(value)


def error_tuple(error: Any) -> tuple:
    return (error.kind, error.code, error.message)


def expected_value(kind: str, f: Dict[str, Any]) -> Any:
    """What wire.decode_body returns for a leader frame's fields."""
    err = lambda e: (e["kind"], e["code"], e["message"])  # noqa: E731
    if kind == "Welcome":
        return (f["version"], uuid.UUID(f["leader_id"]).bytes, u64(f["epoch"]), f["pid"], f["heartbeat_ms"])
    if kind == "Reject":
        return (f["version"], err(f["error"]))
    if kind in ("Response", "Ack"):
        result = f["result"]
        if "ok" in result:
            return (u64(f["id"]), (True, bytes.fromhex(result["ok"]) if result["ok"] is not None else None))
        return (u64(f["id"]), (False, err(result["err"])))
    if kind == "Event":
        return (f["channel"], bytes.fromhex(f["key"]), u64(f["epoch"]), u64(f["seq"]), bytes.fromhex(f["payload"]),
                f["cached"])
    if kind == "Status":
        state = f["state"]
        return (f["channel"], (state["state"], err(state["error"]) if state["error"] else None))
    if kind in ("Ping", "Pong"):
        return u64(f["nonce"])
    if kind == "Goodbye":
        return f["reason"]
    if kind == "Ended":
        return (f["channel"], bytes.fromhex(f["key"]), err(f["error"]))
    raise AssertionError(kind)


def normalize(kind: str, value: Any) -> Any:
    """Replaces RemoteError objects by (kind, code, message) tuples."""
    if kind == "Reject":
        return (value[0], error_tuple(value[1]))
    if kind in ("Response", "Ack"):
        ok, inner = value[1]
        return (value[0], (ok, inner if ok else error_tuple(inner)))
    if kind == "Status":
        state, error = value[1]
        return (value[0], (state, error_tuple(error) if error else None))
    if kind == "Ended":
        return (value[0], value[1], error_tuple(value[2]))
    return value


def follower_value(kind: str, f: Dict[str, Any]) -> Any:
    """The value this package encodes for a follower frame's fields."""
    if kind == "Hello":
        return [f["version"], uuid.UUID(f["peer_id"]).bytes, f["pid"], f["channels"], f["token"]]
    if kind == "Invoke":
        return [u64(f["id"]), f["channel"], f["deadline_ms"], f["oneway"], bytes.fromhex(f["payload"])]
    if kind == "Cancel":
        return u64(f["id"])
    if kind == "Subscribe":
        last = f["last_seen"]
        return [u64(f["id"]), f["channel"], bytes.fromhex(f["key"]),
                [u64(last["epoch"]), u64(last["seq"])] if last else None]
    if kind == "Unsubscribe":
        return [u64(f["id"]), f["channel"], bytes.fromhex(f["key"])]
    if kind == "Publish":
        return [u64(f["id"]), f["channel"], bytes.fromhex(f["payload"])]
    if kind in ("Ping", "Pong"):
        return u64(f["nonce"])
    if kind == "Goodbye":
        return f["reason"]
    if kind == "Open":
        return f["channels"]
    raise AssertionError(kind)


# This client speaks protocol version 1: the deliver-to-one frames of version 2
# (PROTOCOL.md §7.1) and the mirror frames of version 3 (§7.2) are never sent
# to it, nor by it.
VERSION_2 = {"SubscribeOne", "Delivery", "Settle", "Mirror", "Mirrored"}
V1 = [v for v in VECTORS["frames"] if v["kind"] not in VERSION_2]
LEADER = [v for v in V1 if v["direction"] in ("L>F", "both")]
FOLLOWER = [v for v in V1 if v["direction"] in ("F>L", "both") and not v["decode_only"]]


def test_the_vectors_cover_every_frame_kind() -> None:
    assert VECTORS["schema"] == "tandem-conformance-vectors/1"
    kinds = {v["kind"] for v in V1}
    assert len(kinds) == 17
    assert {v["kind"] for v in VECTORS["frames"]} - kinds == VERSION_2
    assert len(LEADER) >= 15 and len(FOLLOWER) >= 12


@pytest.mark.parametrize("vector", LEADER, ids=[v["name"] for v in LEADER])
def test_leader_frames_decode_to_their_fields(vector: Dict[str, Any]) -> None:
    frame = bytes.fromhex(vector["hex"])
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    kind, value = wire.decode_body(frame[4:])
    assert kind == vector["kind"]
    assert normalize(kind, value) == expected_value(kind, vector["fields"])


@pytest.mark.parametrize("vector", FOLLOWER, ids=[v["name"] for v in FOLLOWER])
def test_follower_frames_encode_to_their_bytes(vector: Dict[str, Any]) -> None:
    encoded = wire.encode(vector["kind"], follower_value(vector["kind"], vector["fields"]))
    assert encoded.hex() == vector["hex"]


@pytest.mark.parametrize(
    "body",
    [
        b"",  # empty
        b"\xc1",  # never used in MessagePack
        b"\x81\xa5Bogus\x01",  # unknown kind
        b"\x81\xa4Ping\x07\x07",  # bytes after the value
        b"\x07",  # not a map
        b"\x81\xa6Invoke\x95\x01\xa6config\xcd\x0b\xb8\xc2\xc4\x04\xa3get",  # a follower's frame
        b"\x81\xa4Ping\xff",  # a negative nonce
        b"\x81\xa6Status\x92\xa6config\xa4Gone",  # unknown state
        b"\x81\xa5Event\x94\xa1c\xc4\x00\x01\x02",  # wrong field count
        b"\x81\xa7Goodbye\xa2\xff\xfe",  # invalid UTF-8
    ],
)
def test_bad_bodies_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_body(body)


def test_split_frames_reassemble_and_limits_are_checked_on_the_prefix() -> None:
    async def run() -> None:
        reader = asyncio.StreamReader()
        frames = bytes.fromhex("0000000781a450696e6707") * 2
        for byte in frames:
            reader.feed_data(bytes([byte]))
        reader.feed_eof()
        frame_reader = wire.FrameReader()
        assert await frame_reader.read(reader) == ("Ping", 7)
        assert await frame_reader.read(reader) == ("Ping", 7)
        assert await frame_reader.read(reader) is None  # clean close on a boundary

        big = asyncio.StreamReader()
        big.feed_data(b"\x01\x00\x00\x01")
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            await frame_reader.read(big)

        truncated = asyncio.StreamReader()
        truncated.feed_data(b"\x00\x00\x00\x0a\x81")
        truncated.feed_eof()
        with pytest.raises(ProtocolError, match="middle of a frame"):
            await frame_reader.read(truncated)

    asyncio.run(asyncio.wait_for(run(), 10))


def test_feed_reassembles_frames_split_or_coalesced_anyhow() -> None:
    """``FrameReader.feed`` (the read loop's path): every vector a leader sends,
    concatenated, comes out in order whether the bytes arrive one at a time, in
    chunks of every size, or all at once; a length over the limit is refused
    from its prefix alone, before the body arrives."""
    leader = [v for v in VECTORS["frames"] if v["kind"] in wire._LEADER_KINDS]
    stream = b"".join(bytes.fromhex(v["hex"]) for v in leader)
    expected = [wire.decode_body(bytes.fromhex(v["hex"])[4:]) for v in leader]
    for size in [1, 2, 3, 4, 5, 7, 13, 64, len(stream)]:
        frame_reader = wire.FrameReader()
        got = []
        for at in range(0, len(stream), size):
            got.extend(frame_reader.feed(stream[at : at + size]))
        assert repr(got) == repr(expected), f"chunks of {size}"  # RemoteError compares by repr
        assert frame_reader.pending == 0
    half = wire.FrameReader()
    assert half.feed(stream[:6]) == []
    assert half.pending == 6

    limited = wire.FrameReader(max_length=10)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        limited.feed(b"\x00\x00\x00\x0b")
    with pytest.raises(ProtocolError):
        wire.FrameReader().feed(b"\x00\x00\x00\x02\xc1\xc1")
