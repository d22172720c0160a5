"""Call deadlines share one timer: calls with different timeouts, answered or
not, each end at their own deadline with DeadlineExceeded, and the leader is
sent a Cancel for each expired call (and none for an answered one). The
leader here is a scripted one on a temp-dir Unix socket: it welcomes, reports
the channel Ready, answers only the calls whose request is "answer"."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any, List

import msgpack

from tandem_follower import DeadlineExceeded, connect, wire


def test_each_call_expires_at_its_own_deadline_and_is_cancelled() -> None:
    async def run() -> None:
        received: List[Any] = []

        async def leader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            pending = bytearray()
            hello = await reader.readexactly(4)
            await reader.readexactly(int.from_bytes(hello, "big"))
            writer.write(wire.encode("Welcome", [1, b"\x01" * 16, 1, os.getpid(), 1000]))
            writer.write(wire.encode("Status", ["c", "Ready"]))
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for body in _bodies(pending, data):
                    received.append(body)
                    if "Invoke" in body and msgpack.unpackb(body["Invoke"][4]) == "answer":
                        ok = {"Ok": msgpack.packb("done")}
                        writer.write(_frame({"Response": [body["Invoke"][0], ok]}))

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "leader.sock")
            server = await asyncio.start_unix_server(leader, path)
            async with server:
                client = await connect(socket=path, channels=["c"], wait=5)
                start = time.monotonic()

                async def call(request: str, timeout: float) -> Any:
                    try:
                        return await client.invoke("c", request, timeout=timeout)
                    except DeadlineExceeded as error:
                        return ("expired", error.timeout, round(time.monotonic() - start, 2))

                results = await asyncio.gather(
                    call("wait", 0.3), call("wait", 0.1), call("answer", 0.05), call("wait", 0.2)
                )
                await client.close()
        assert results[2] == "done"
        for index, timeout in ((0, 0.3), (1, 0.1), (3, 0.2)):
            kind, got_timeout, elapsed = results[index]
            assert (kind, got_timeout) == ("expired", timeout)
            assert timeout <= elapsed < timeout + 0.5, (index, elapsed)
        invoked = {b["Invoke"][0]: msgpack.unpackb(b["Invoke"][4]) for b in received if "Invoke" in b}
        cancelled = sorted(b["Cancel"] for b in received if "Cancel" in b)
        assert cancelled == sorted(i for i, request in invoked.items() if request == "wait")

    asyncio.run(asyncio.wait_for(run(), 20))


def _frame(value: Any) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def _bodies(buffer: bytearray, data: bytes) -> List[Any]:
    """The follower's frames as raw maps (the wire module decodes leader frames only)."""
    buffer += data
    out = []
    while len(buffer) >= 4:
        length = int.from_bytes(buffer[:4], "big")
        if len(buffer) < 4 + length:
            break
        out.append(msgpack.unpackb(bytes(buffer[4 : 4 + length]), raw=False))
        del buffer[: 4 + length]
    return out
