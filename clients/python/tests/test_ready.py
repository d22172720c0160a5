"""``ready()``: READY=1 on real Unix sockets, as ``tandem run``'s worker binds
them (src/bin/tandem/run/notify.rs), and a clear no-op answer when not
supervised."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path

from tandem_follower import ready


def test_ready_sends_the_datagram_to_notify_socket() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(path)
            server.settimeout(5)
            env = {"NOTIFY_SOCKET": path, "TANDEM_NOTIFY_STREAM": str(Path(d) / "unused.stream")}
            assert asyncio.run(asyncio.wait_for(ready(env), 10)) == "datagram"
            assert server.recv(4096) == b"READY=1"


def test_ready_writes_the_line_to_the_stream_socket_when_only_it_is_set() -> None:
    async def run(path: str) -> tuple:
        lines: asyncio.Queue = asyncio.Queue()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await lines.put(await reader.read())
            writer.close()

        server = await asyncio.start_unix_server(serve, path)
        async with server:
            via = await ready({"TANDEM_NOTIFY_STREAM": path})
            return via, await asyncio.wait_for(lines.get(), 5)

    with tempfile.TemporaryDirectory() as d:
        via, line = asyncio.run(asyncio.wait_for(run(str(Path(d) / "notify.stream")), 10))
        assert (via, line) == ("stream", b"READY=1\n")


def test_ready_is_a_no_op_that_says_so_when_not_supervised() -> None:
    assert asyncio.run(asyncio.wait_for(ready({}), 10)) == "none"


def test_ready_raises_when_the_socket_is_not_there() -> None:
    with tempfile.TemporaryDirectory() as d:
        missing = str(Path(d) / "missing.sock")
        for env in ({"NOTIFY_SOCKET": missing}, {"TANDEM_NOTIFY_STREAM": missing}):
            try:
                asyncio.run(asyncio.wait_for(ready(env), 10))
            except OSError:
                continue
            raise AssertionError(f"no OSError for {env}")


def test_under_the_real_tandem_run_ready_makes_the_worker_ready(processes, private_dir) -> None:  # type: ignore[no-untyped-def]
    import os
    import queue
    import subprocess
    import sys
    import threading

    from conftest import TARGET

    tandem = TARGET / "tandem"
    if not tandem.exists():
        raise AssertionError(f"{tandem} is missing: build it first with `cargo build -p tandem --bin tandem`")
    # Without READY=1 the run would wait its 30 s ready timeout.
    program = (
        "import asyncio, time, tandem_follower\n"
        "print('via=' + asyncio.run(tandem_follower.ready()), flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "XDG_RUNTIME_DIR": str(private_dir)}
    args = [str(tandem), "run", "--name", "py-ready", "--workers", "1", "--", sys.executable, "-c", program]
    run = processes.spawn(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in run.stdout], daemon=True).start()

    def expect(prefix: str) -> str:
        while True:
            line = lines.get(timeout=20)
            if line.startswith(prefix):
                return line

    assert expect("via=") == "via=datagram"
    expect("ready: 1 workers running")
    run.terminate()
    assert run.wait(timeout=20) == 0
