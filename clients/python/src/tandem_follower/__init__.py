"""A tandem Follower for Python (asyncio): share the one upstream connection
a tandem Leader holds on this host, over its Unix socket.

```python
import asyncio
from tandem_follower import connect

async def main() -> None:
    client = await connect(channels=["config"])   # TANDEM_LEADER_SOCKET, TANDEM_TOKEN
    print(await client.invoke("config", {"Get": "app.greeting"}, timeout=2.0))
    async with client.subscribe("config", "app.greeting") as values:
        async for update in values:
            print(update.value, update.epoch, update.seq)
    await client.close()

asyncio.run(main())
```
"""

from .client import ChannelState, Client, Subscription, Update, connect
from .errors import (
    Closed,
    DeadlineExceeded,
    LeaderLost,
    NotReady,
    ProtocolError,
    Rejected,
    RemoteError,
    TandemError,
)
from .notify import ReadyVia, ready
from .wire import PROTOCOL_VERSION

__all__ = [
    "connect",
    "ready",
    "ReadyVia",
    "Client",
    "Subscription",
    "Update",
    "ChannelState",
    "TandemError",
    "RemoteError",
    "Rejected",
    "DeadlineExceeded",
    "LeaderLost",
    "NotReady",
    "Closed",
    "ProtocolError",
    "PROTOCOL_VERSION",
]
