"""Against the real Rust Leader: the `standalone` example as the only process
of its election (so the leader), over the bundled registry. A Python follower
subscribes to a key, sees the values put into the registry by
`tandem-registry put`, and reads and writes keys through the leader's one
registry connection (ConfigApi, channel "config", src/apis.rs)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from tandem_follower import Rejected, connect

TOKEN = "py-test-token"
TEST_TIMEOUT = 60


def start_registry(rust_bins: Dict[str, Path], processes) -> str:
    registry = processes.spawn(
        [str(rust_bins["registry"]), "serve", "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True
    )
    line = registry.stdout.readline()  # `listening on ADDR`, printed once bound
    assert line.startswith("listening on "), line
    return line.split()[-1]


def start_leader(rust_bins: Dict[str, Path], processes, directory: Path, registry: str) -> Path:
    leader = processes.spawn(
        [str(rust_bins["standalone"]), "--name", "py", "--dir", str(directory), "--registry", registry,
         "--write-every", "0", "--token", TOKEN, "--subscribe", "app.greeting"],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = leader.stdout.readline()  # `pid=<pid> role=leader epoch=<n>` once it leads
    assert "role=leader" in line, line
    return directory / "py.sock"


def put(rust_bins: Dict[str, Path], registry: str, key: str, value: str) -> None:
    subprocess.run([str(rust_bins["registry"]), "put", "--server", registry, key, value], check=True, timeout=30,
                   capture_output=True)


def test_subscribe_invoke_and_publish_through_the_real_leader(
    rust_bins: Dict[str, Path], processes, private_dir: Path
) -> None:
    registry = start_registry(rust_bins, processes)
    socket = start_leader(rust_bins, processes, private_dir, registry)
    put(rust_bins, registry, "app.greeting", "hello-1")

    async def run() -> None:
        client = await connect(socket=str(socket), token=TOKEN, channels=["config"])
        assert client.state("config").state == "Ready"
        assert client.epoch is not None and client.epoch >= 1

        # Invoke: ConfigRequest::Get("app.greeting") is {"Get": key}; the answer
        # is ConfigResponse::Value(Some(ConfigValue [value, revision])).
        answer = await client.invoke("config", {"Get": "app.greeting"}, timeout=5)
        assert answer["Value"][0] == "hello-1"
        revision = answer["Value"][1]
        assert await client.invoke("config", {"Get": "no.such.key"}, timeout=5) == {"Value": None}

        async with client.subscribe("config", "app.greeting") as values:
            first = await asyncio.wait_for(values.__anext__(), 10)  # the leader's cached value
            assert first.value == ["hello-1", revision]
            await asyncio.get_running_loop().run_in_executor(
                None, put, rust_bins, registry, "app.greeting", "hello-2"
            )
            second = await asyncio.wait_for(values.__anext__(), 10)
            assert second.value[0] == "hello-2"
            assert second.position > first.position

            # A write through the leader: ConfigRequest::Put(key, value).
            written = await client.invoke("config", {"Put": ["app.greeting", "hello-3"]}, timeout=5)
            assert written["Revision"] > revision
            third = await asyncio.wait_for(values.__anext__(), 10)
            assert third.value == ["hello-3", written["Revision"]]
            assert third.position > second.position
        await client.close()
        assert client.link == "closed"

    asyncio.run(asyncio.wait_for(run(), TEST_TIMEOUT))


def test_a_wrong_token_is_a_typed_rejection_and_the_leader_stays_healthy(
    rust_bins: Dict[str, Path], processes, private_dir: Path
) -> None:
    registry = start_registry(rust_bins, processes)
    socket = start_leader(rust_bins, processes, private_dir, registry)

    async def run() -> None:
        with pytest.raises(Rejected) as refused:
            await connect(socket=str(socket), token="wrong", channels=["config"])
        assert refused.value.code == "token"
        # Garbage on a fresh connection: the leader refuses it and keeps serving.
        reader, writer = await asyncio.open_unix_connection(str(socket))
        writer.write(b"\x00\x00\x00\x03\xc1\xc1\xc1")
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
        client = await connect(socket=str(socket), token=TOKEN, channels=["config"])
        assert await client.invoke("config", {"Get": "absent"}, timeout=5) == {"Value": None}
        await client.close()

    asyncio.run(asyncio.wait_for(run(), TEST_TIMEOUT))


def test_the_socket_and_token_come_from_the_environment(
    rust_bins: Dict[str, Path], processes, private_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = start_registry(rust_bins, processes)
    socket = start_leader(rust_bins, processes, private_dir, registry)
    monkeypatch.setenv("TANDEM_LEADER_SOCKET", str(socket))
    monkeypatch.setenv("TANDEM_TOKEN", TOKEN)

    async def run() -> None:
        client = await connect(channels=["config"])
        assert os.environ["TANDEM_LEADER_SOCKET"] == client.socket
        assert await client.invoke("config", {"Get": "absent"}, timeout=5) == {"Value": None}
        await client.close()

    asyncio.run(asyncio.wait_for(run(), TEST_TIMEOUT))
