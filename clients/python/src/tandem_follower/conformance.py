"""The Python follower under test for the tandem conformance harness.

Speaks the driver protocol of ``conformance/README.md``: commands as JSON
lines on stdin, replies and events as JSON lines on stdout. Run by the harness:

    tandem-conformance -- python -m tandem_follower.conformance
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, Dict, Optional

from . import Client, Closed, DeadlineExceeded, LeaderLost, Rejected, RemoteError, Subscription, connect


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _error(error: BaseException) -> Dict[str, Any]:
    if isinstance(error, Rejected):
        return {"type": "Rejected", "kind": error.kind, "code": error.code, "message": error.message}
    if isinstance(error, RemoteError):
        return {"type": "Remote", "kind": error.kind, "code": error.code, "message": error.message}
    for cls, name in ((DeadlineExceeded, "DeadlineExceeded"), (LeaderLost, "LeaderLost"), (Closed, "Closed")):
        if isinstance(error, cls):
            return {"type": name, "kind": None, "code": None, "message": str(error)}
    if isinstance(error, asyncio.CancelledError):
        return {"type": "Cancelled", "kind": None, "code": None, "message": "cancelled"}
    return {"type": "Other", "kind": None, "code": None, "message": f"{type(error).__name__}: {error}"}


def _print(line: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _reply(command_id: int, result: Optional[Dict[str, Any]] = None, error: Optional[BaseException] = None) -> None:
    if error is not None:
        _print({"id": command_id, "ok": False, "error": _error(error)})
    else:
        _print({"id": command_id, "ok": True, **(result or {})})


class Driver:
    def __init__(self) -> None:
        self.client: Optional[Client] = None
        self.tasks: Dict[int, "asyncio.Task[None]"] = {}
        self.subs: Dict[int, Subscription] = {}

    def command(self, command: Dict[str, Any]) -> None:
        cid = int(command.get("id", 0))
        op = command.get("op")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            _print({"id": cid, "ok": False, "error": {"type": "Other", "kind": None, "code": None,
                                                       "message": f"unknown op {op!r}"}})
            return
        self.tasks[cid] = asyncio.create_task(self._run(cid, handler, command))

    async def _run(self, cid: int, handler: Any, command: Dict[str, Any]) -> None:
        try:
            result = await handler(cid, command)
            _reply(cid, result)
        except asyncio.CancelledError as error:
            _reply(cid, error=error)
        except Exception as error:
            _reply(cid, error=error)
        finally:
            self.tasks.pop(cid, None)

    def _client(self) -> Client:
        if self.client is None:
            raise RuntimeError("not connected: send connect first")
        return self.client

    async def op_connect(self, cid: int, c: Dict[str, Any]) -> None:
        options: Dict[str, Any] = {}
        if c.get("peer_timeout_ms") is not None:
            options["peer_timeout"] = c["peer_timeout_ms"] / 1000
        self.client = await connect(channels=c.get("channels", []), **options)

    async def op_invoke(self, cid: int, c: Dict[str, Any]) -> Dict[str, Any]:
        client = self._client()
        if c.get("oneway"):
            await client.invoke_oneway(c["channel"], c.get("request"))
            return {"response": None}
        timeout = c.get("deadline_ms", 5000) / 1000
        response = await client.invoke(c["channel"], c.get("request"), timeout=timeout)
        return {"response": _jsonable(response)}

    async def op_cancel(self, cid: int, c: Dict[str, Any]) -> None:
        task = self.tasks.get(int(c.get("target", 0)))
        if task is not None:
            task.cancel()

    async def op_publish(self, cid: int, c: Dict[str, Any]) -> None:
        await self._client().publish(c["channel"], c.get("request"))

    async def op_subscribe(self, cid: int, c: Dict[str, Any]) -> None:
        sub = await self._client().subscribe(c["channel"], c["key"])
        self.subs[cid] = sub
        asyncio.create_task(self._forward(cid, sub))

    async def _forward(self, cid: int, sub: Subscription) -> None:
        async for update in sub:
            _print({"event": "value", "sub": cid, "value": _jsonable(update.value), "epoch": update.epoch,
                    "seq": update.seq, "cached": update.cached})
        error = _error(sub.ended) if sub.ended is not None else None
        _print({"event": "end", "sub": cid, "error": error})

    async def op_unsubscribe(self, cid: int, c: Dict[str, Any]) -> None:
        sub = self.subs.pop(int(c.get("target", 0)), None)
        if sub is not None:
            await sub.aclose()

    async def op_status(self, cid: int, c: Dict[str, Any]) -> Dict[str, Any]:
        client = self._client()
        state = client.state(c.get("channel", ""))
        return {"link": client.link, "epoch": client.epoch, "state": state.state,
                "error": _error(state.error) if state.error is not None else None}

    async def op_close(self, cid: int, c: Dict[str, Any]) -> None:
        await self._client().close()


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    driver = Driver()
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            command = json.loads(line)
        except ValueError:
            print(f"not a JSON command: {line!r}", file=sys.stderr)
            continue
        driver.command(command)
    if driver.client is not None:
        await driver.client.close()


if __name__ == "__main__":
    asyncio.run(main())
