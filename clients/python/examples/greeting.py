"""The `tandem run` demo for Python: every worker follows `app.greeting`
through the agent's Leader (ONE registry connection for all of them), prints
each value it receives, and serves the latest over HTTP on the shared port.

    python3 -m venv .venv && .venv/bin/pip install -e clients/python   # once
    tandem run --workers 2 --listen 127.0.0.1:8080 --subscribe app.greeting \\
      --put app.greeting=hello -- .venv/bin/python clients/python/examples/greeting.py
    curl localhost:8080/                       # hello (x-worker-id: 1 or 2)
    curl -X PUT --data hi localhost:8080/      # both workers print value=hi

What tandem hands this process (docs/run.md): the port as fd 3 (LISTEN_FDS,
LISTEN_PID), the Leader's socket and token (TANDEM_LEADER_SOCKET,
TANDEM_TOKEN, read by ``connect``), TANDEM_WORKER_ID, TANDEM_SUBSCRIBE, and
NOTIFY_SOCKET, where it sends ``READY=1`` (systemd's datagram).
"""

import asyncio
import os
import signal
import socket
import sys
from typing import Optional

from tandem_follower import connect

WORKER = os.environ.get("TANDEM_WORKER_ID", "?")
KEY = os.environ.get("TANDEM_SUBSCRIBE", "app.greeting").split(",")[0]


def ready() -> None:
    """Tells tandem this worker serves: its successor in a reload waits for this."""
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", path)


async def main() -> None:
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        raise SystemExit("run me under `tandem run --listen ...`: no listening socket was passed (LISTEN_FDS)")
    client = await connect(channels=["config"])
    greeting: Optional[str] = None

    async def follow() -> None:
        nonlocal greeting
        async with client.subscribe("config", KEY) as subscription:
            async for update in subscription:
                # Each value the Leader delivers: [value or None, revision].
                greeting = update.value[0]
                # One write per line (print's text and newline may be two
                # under PYTHONUNBUFFERED, and the workers share one stdout).
                sys.stdout.write(
                    f"worker={WORKER} pid={os.getpid()} key={KEY} value={greeting} "
                    f"epoch={update.epoch} seq={update.seq}\n"
                )
                sys.stdout.flush()

    following = asyncio.create_task(follow())

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                method = head.split(" ", 1)[0]
                length, close = 0, False
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    name, value = name.strip().lower(), value.strip()
                    if name == "content-length":
                        length = int(value or 0)
                    elif name == "connection":
                        close = value.lower() == "close"
                body = (await reader.readexactly(length)).decode() if length else ""
                status = "200 OK"
                if method == "PUT":
                    try:
                        await client.invoke("config", {"Put": [KEY, body]})
                        text = f"{KEY}={body}\n"
                    except Exception as error:  # the Leader's typed errors, shown to the caller
                        status, text = "502 Bad Gateway", f"{error}\n"
                else:
                    text = f"{greeting if greeting is not None else '(no value)'}\n"
                payload = text.encode()
                headers = [
                    f"HTTP/1.1 {status}",
                    f"content-length: {len(payload)}",
                    f"x-worker-id: {WORKER}",
                    f"x-worker-pid: {os.getpid()}",
                ] + (["connection: close"] if close else [])
                writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + payload)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    listener = socket.socket(fileno=3)
    listener.setblocking(False)
    server = await asyncio.start_server(serve, sock=listener)
    ready()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    following.cancel()
    await client.close()


if __name__ == "__main__":
    asyncio.run(main())
