"""``ready()``: tells the supervisor this program is ready to serve, as
systemd's ``sd_notify(0, "READY=1")`` does.

Under ``tandem run`` (docs/run.md, "Readiness") the worker gives the program
``NOTIFY_SOCKET`` (a Unix datagram socket, systemd's) and
``TANDEM_NOTIFY_STREAM`` (the same lines over a Unix stream socket). Python
sends the datagram; it writes the line to the stream socket when only that
one is set. Same API as the Node follower's ``ready()``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Literal, Mapping, Optional

ReadyVia = Literal["datagram", "stream", "none", "unsupported"]

#: How long the stream socket may take to take the line, in seconds.
READY_TIMEOUT = 5.0


async def ready(env: Optional[Mapping[str, str]] = None) -> ReadyVia:
    """Sends ``READY=1`` to the supervisor; returns how:

    - ``"datagram"``: sent to ``NOTIFY_SOCKET`` (``tandem run``, systemd;
      a path starting with ``@`` is an abstract socket, as in systemd);
    - ``"stream"``: written to ``TANDEM_NOTIFY_STREAM`` (only that one set);
    - ``"none"``: neither is set: not supervised, nothing sent.

    (``"unsupported"`` is the Node follower's answer when only
    ``NOTIFY_SOCKET`` is set; Python can always send the datagram.)
    ``env`` defaults to ``os.environ``. Raises ``OSError`` when the socket
    cannot be written (``TimeoutError`` after 5 s on the stream socket).
    """
    env = os.environ if env is None else env
    datagram = env.get("NOTIFY_SOCKET")
    if datagram:
        address = "\0" + datagram[1:] if datagram.startswith("@") else datagram
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", address)
        return "datagram"
    stream = env.get("TANDEM_NOTIFY_STREAM")
    if stream:
        await asyncio.wait_for(_write_line(stream), READY_TIMEOUT)
        return "stream"
    return "none"


async def _write_line(path: str) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(b"READY=1\n")
        await writer.drain()
        writer.write_eof()
        # The worker closes once it has read the line.
        await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
