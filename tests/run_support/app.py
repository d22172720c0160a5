#!/usr/bin/env python3
"""The program tests/run.rs runs under `tandem run` (Python's standard library only).

It checks systemd's socket-passing convention (LISTEN_FDS, LISTEN_PID = its own
pid, LISTEN_FDNAMES), prints one line saying what it got, serves HTTP/1.1 with
keep-alive on fd 3, and sends READY=1 on NOTIFY_SOCKET. APP_MODE changes that:
`silent` never sends READY=1, `exit` exits with code 7 at once, `slow` sends
READY=1 after APP_READY_DELAY_MS; while the file APP_FAIL_IF_EXISTS names
exists it exits with code 9 at once; APP_ALLOC_MIB keeps that many MiB resident;
APP_IGNORE_SIGTERM ignores SIGTERM. On SIGTERM it stops accepting, answers every
further request with `Connection: close`, and exits 0 once its connections are
closed (at most 3 s).
"""
import asyncio
import os
import signal
import socket
import sys

MODE = os.environ.get("APP_MODE", "notify")
GREETING = os.environ.get("APP_GREETING", "hello")


def log(line: str) -> None:
    # One write per line: print's text and newline may be two (PYTHONUNBUFFERED),
    # and every worker shares one stdout.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def notify(message: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.send(message.encode())


def listen_socket() -> socket.socket:
    fds = int(os.environ.get("LISTEN_FDS", "0"))
    pid = int(os.environ.get("LISTEN_PID", "0"))
    if fds < 1 or pid != os.getpid():
        log(f"app: bad socket passing: LISTEN_FDS={fds} LISTEN_PID={pid} pid={os.getpid()}")
        sys.exit(3)
    return socket.socket(fileno=3)


class App:
    def __init__(self) -> None:
        self.draining = False
        self.connections = 0
        self.idle = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.idle.clear()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                close = self.draining or any(l.lower() == "connection: close" for l in lines[1:])
                body = GREETING.encode()
                response = (
                    "HTTP/1.1 200 OK\r\n"
                    f"content-length: {len(body)}\r\n"
                    f"x-worker-pid: {os.getpid()}\r\n"
                    f"x-worker-id: {os.environ.get('TANDEM_WORKER_ID', '?')}\r\n"
                    + ("connection: close\r\n" if close else "")
                    + "\r\n"
                ).encode() + body
                writer.write(response)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.connections -= 1
            if self.connections == 0:
                self.idle.set()


async def main() -> None:
    if MODE == "exit":
        log("app: exiting at once")
        sys.exit(7)
    broken = os.environ.get("APP_FAIL_IF_EXISTS")
    if broken and os.path.exists(broken):
        log("app: broken version, exiting")
        sys.exit(9)
    ballast = bytearray(int(os.environ.get("APP_ALLOC_MIB", "0")) * 1024 * 1024)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1  # touched: resident
    sock = listen_socket()
    sock.setblocking(False)
    app = App()
    server = await asyncio.start_server(app.handle, sock=sock)
    log(
        f"app: worker={os.environ.get('TANDEM_WORKER_ID')} pid={os.getpid()} "
        f"listen_fds={os.environ.get('LISTEN_FDS')} names={os.environ.get('LISTEN_FDNAMES')} "
        f"leader={'yes' if os.environ.get('TANDEM_LEADER_SOCKET') else 'no'} "
        f"token={'yes' if os.environ.get('TANDEM_TOKEN') else 'no'} "
        f"role={os.environ.get('TANDEM_ROLE', '-')} mode={MODE} env={os.environ.get('APP_ENV', '-')}"
    )
    if MODE == "slow":
        await asyncio.sleep(int(os.environ.get("APP_READY_DELAY_MS", "1000")) / 1000)
    if MODE != "silent":
        notify("STATUS=serving\nREADY=1")
    stop = asyncio.Event()
    if os.environ.get("APP_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log(f"app: pid={os.getpid()} ignores SIGTERM")
    else:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    app.draining = True
    server.close()
    if app.connections:
        try:
            await asyncio.wait_for(app.idle.wait(), 3)
        except asyncio.TimeoutError:
            pass
    log(f"app: pid={os.getpid()} stopped")


asyncio.run(main())
