"""One Python follower process of clients/node/bench/bench.js (``--lang python``).

bench.js drives it with JSON lines on stdin and reads JSON lines from stdout
(control only, never on the measured path), the same commands and answers as
clients/node/bench/follower.js: ``connect``, ``invoke`` (C tasks each calling
in a loop for D ms), ``rss``, ``exit``. The measured call is ``config`` Get of
``app.bench``; its value (a JSON string) is parsed back into an object, as
cluster-client's benchmark gets an object.
"""

from __future__ import annotations

import asyncio
import json
import platform
import resource
import sys
import time
from typing import Any, Dict, List

from tandem_follower import connect

now = time.perf_counter_ns


def sample(values: List[int], most: int = 100000) -> List[int]:
    if len(values) <= most:
        return values
    step = len(values) / most
    return [values[int(i * step)] for i in range(most)]


async def invoke_loop(client: Any, c: int, duration_ms: float) -> Dict[str, Any]:
    lats: List[int] = []
    counts = {"count": 0, "errs": 0}
    t0 = now()
    end = t0 + int(duration_ms * 1e6)

    async def worker() -> None:
        invoke = client.invoke
        while now() < end:
            s = now()
            try:
                r = await invoke("config", {"Get": "app.bench"})
                value = json.loads(r["Value"][0])
                if value["key"] != "app.bench":
                    raise ValueError("bad result")
                lats.append(now() - s)
                counts["count"] += 1
            except Exception as error:  # reported once, counted always
                counts["errs"] += 1
                if counts["errs"] == 1:
                    emit({"type": "log", "message": repr(error)})

    await asyncio.gather(*(worker() for _ in range(c)))
    return {"count": counts["count"], "errs": counts["errs"], "elapsedNs": now() - t0, "lats": sample(lats)}


def emit(message: Dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return round(pages * resource.getpagesize() / 1048576, 1)


async def main() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    client = None
    while True:
        line = await stdin.readline()
        if not line:
            return
        m = json.loads(line)
        try:
            if m["cmd"] == "connect":
                client = await connect(socket=m["socket"], token=m["token"], channels=["config"])
                emit({"type": "connected", "epoch": client.epoch, "python": platform.python_version()})
            elif m["cmd"] == "invoke":
                emit({"type": "invoke", **(await invoke_loop(client, m["c"], m["durationMs"]))})
            elif m["cmd"] == "rss":
                emit({"type": "rss", "rss": rss_mib()})
            elif m["cmd"] == "exit":
                if client is not None:
                    await client.close()
                return
        except Exception as error:
            emit({"type": "error", "message": repr(error)})


if __name__ == "__main__":
    asyncio.run(main())
