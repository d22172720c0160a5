"""The follower: one connection to the Leader, shared by every call and subscription.

```text
connect() ──> Client ──Hello──> Leader        (Unix socket, TANDEM_LEADER_SOCKET)
                │    <─Welcome, Status──
   invoke ──────┤ ──Invoke──>  <─Response──  (matched by id; Cancel on timeout/cancel)
   subscribe ───┤ ──Subscribe─> <─Ack, Event… (positions never go backwards)
                └── heartbeats, reconnect with backoff, resubscribe with last_seen
```
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Dict, Iterable, List, Optional, Set, Tuple

import msgpack

from . import wire
from .errors import Closed, DeadlineExceeded, LeaderLost, NotReady, ProtocolError, Rejected, RemoteError

__all__ = ["connect", "Client", "Subscription", "Update", "ChannelState"]

#: The most bytes taken from the socket per read.
READ_SIZE = 256 * 1024
#: How many values a subscription buffers for a slow reader; past it the oldest are skipped.
SUBSCRIPTION_BUFFER = 256


@dataclass(frozen=True)
class Update:
    """One value of a subscription and where it sits in the key's history."""

    value: Any
    epoch: int
    seq: int
    #: True when the leader served it from its last-known-good cache.
    cached: bool = False

    @property
    def position(self) -> Tuple[int, int]:
        return (self.epoch, self.seq)


@dataclass(frozen=True)
class ChannelState:
    """A channel's upstream state as the leader last reported it."""

    #: "Starting", "Ready" or "Down"; None when no leader is connected.
    state: Optional[str]
    #: Why the upstream is down.
    error: Optional[RemoteError] = None


# One packer for every request and key (msgpack.packb builds a new one per
# call); it resets itself after each value, and after an error.
_packer = msgpack.Packer(use_bin_type=True)


def _pack(value: Any) -> bytes:
    return _packer.pack(value)


def _unpack(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as error:
        raise RemoteError("BadRequest", "decode", f"cannot decode the payload: {error}") from error


class _LinkReader(asyncio.StreamReader):
    """A StreamReader for the handshake that then hands every read straight to
    the session (``hand_over``), from the protocol's callback, instead of
    buffering it for a task to await. What was buffered before is handed over
    first; an end of stream (or a failed connection) calls ``on_end``."""

    _on_data: Optional[Callable[[bytes], None]] = None
    _on_end: Optional[Callable[[Optional[BaseException]], None]] = None

    def hand_over(
        self, on_data: Callable[[bytes], None], on_end: Callable[[Optional[BaseException]], None]
    ) -> None:
        self._on_data = on_data
        self._on_end = on_end
        buffered = getattr(self, "_buffer", None)
        if buffered:
            data = bytes(buffered)
            buffered.clear()
            on_data(data)
        error = self.exception()
        if error is not None:
            on_end(error)
        elif self.at_eof() or getattr(self, "_eof", False):
            on_end(None)

    def feed_data(self, data: bytes) -> None:
        if self._on_data is not None:
            self._on_data(data)
        else:
            super().feed_data(data)

    def feed_eof(self) -> None:
        super().feed_eof()
        if self._on_end is not None:
            self._on_end(None)

    def set_exception(self, exc: BaseException) -> None:
        super().set_exception(exc)
        if self._on_end is not None:
            self._on_end(exc)


class _Topic:
    """One subscribed key: its local subscriptions and its state at the leader."""

    def __init__(self, channel: str, key: bytes) -> None:
        self.channel = channel
        self.key = key
        self.subs: Set["Subscription"] = set()
        self.last: Optional[Tuple[int, int]] = None
        self.last_payload: Optional[bytes] = None
        self.last_cached = False
        self.latest: Optional[Update] = None
        #: "unsent", "pending" or "active".
        self.remote = "unsent"
        self.request_id: Optional[int] = None
        self.acked: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
        self.resynced = False


class Client:
    """A connection to the tandem Leader. Made by :func:`connect`."""

    def __init__(
        self,
        socket: str,
        token: Optional[str],
        channels: Iterable[str],
        *,
        timeout: float,
        peer_timeout: float,
        handshake_timeout: float,
        reconnect_initial: float,
        reconnect_max: float,
        max_frame_length: int,
    ) -> None:
        self.socket = socket
        self.token = token
        self.timeout = timeout
        self.peer_timeout = peer_timeout
        self.handshake_timeout = handshake_timeout
        self.reconnect_initial = reconnect_initial
        self.reconnect_max = reconnect_max
        self.peer_id = uuid.uuid4()
        self._declared: List[str] = list(dict.fromkeys(channels))
        self._channels: List[str] = list(self._declared)
        self._reader = wire.FrameReader(max_frame_length)
        self._max_frame_length = max_frame_length
        self._writer: Optional[asyncio.StreamWriter] = None
        self._next_id = 1
        self._pending: Dict[int, Tuple[str, "asyncio.Future[Any]"]] = {}
        #: request id -> (deadline by the loop's clock, timeout) of each invoke awaiting its answer.
        self._deadlines: Dict[int, Tuple[float, float]] = {}
        self._timer: Optional[asyncio.TimerHandle] = None
        self._timer_at = float("inf")
        self._topics: Dict[Tuple[str, bytes], _Topic] = {}
        self._states: Dict[str, ChannelState] = {}
        self._max_epoch = 0
        self._leader_id: Optional[bytes] = None
        self._epoch: Optional[int] = None
        self._link = "connecting"
        self._rejection: Optional[Rejected] = None
        self._closed = False
        self._changed = asyncio.Event()
        self._task: Optional["asyncio.Task[None]"] = None

    # ------------------------------------------------------------------ state

    @property
    def link(self) -> str:
        """"connecting", "connected", "lost", "rejected" or "closed"."""
        return self._link

    @property
    def epoch(self) -> Optional[int]:
        """The connected leader's epoch (None while no leader is connected)."""
        return self._epoch if self._link == "connected" else None

    def state(self, channel: str) -> ChannelState:
        """The channel's upstream state as the current leader last said."""
        return self._states.get(channel, ChannelState(None))

    async def wait_for(self, predicate: Any, timeout: Optional[float] = None) -> None:
        """Waits until ``predicate(client)`` is true (re-checked on every change)."""

        async def wait() -> None:
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def _notify(self) -> None:
        self._changed.set()

    # ------------------------------------------------------------------ calls

    def _check_usable(self) -> None:
        if self._closed:
            raise Closed("the client is closed")
        if self._rejection is not None:
            raise self._rejection
        if self._writer is None:
            raise LeaderLost("no leader is connected")

    def _send(self, kind: str, value: Any) -> None:
        if self._writer is None:
            raise LeaderLost("no leader is connected")
        self._writer.write(wire.encode(kind, value, self._max_frame_length))

    def _id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        return request_id

    def _open(self, channel: str) -> None:
        if channel not in self._channels:
            self._channels.append(channel)
            if self._writer is not None:
                self._send("Open", [channel])

    async def invoke(self, channel: str, request: Any, *, timeout: Optional[float] = None) -> Any:
        """Calls the channel's upstream; returns the decoded response.

        Raises :class:`RemoteError`, :class:`DeadlineExceeded` (the leader is
        told with ``Cancel``), :class:`LeaderLost`, :class:`Rejected` or
        :class:`Closed`. Cancelling the awaiting task cancels the call at the leader.
        """
        timeout = self.timeout if timeout is None else timeout
        self._check_usable()
        self._open(channel)
        request_id = self._id()
        loop = asyncio.get_running_loop()
        future: "asyncio.Future[Any]" = loop.create_future()
        deadline_ms = max(1, min(wire.U32, int(timeout * 1000)))
        self._send("Invoke", [request_id, channel, deadline_ms, False, _pack(request)])
        self._pending[request_id] = ("invoke", future)
        # The call's own future, awaited directly: the answer wakes this task
        # in the next turn of the loop (wait_for and shield would add futures,
        # callbacks and turns to every call). Deadlines share one timer.
        deadline = loop.time() + timeout
        self._deadlines[request_id] = (deadline, timeout)
        if deadline < self._timer_at:
            self._arm(loop, deadline)
        try:
            payload = await future
        except asyncio.CancelledError:
            self._abandon(request_id)
            raise
        finally:
            del self._deadlines[request_id]
        return _unpack(payload)

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        """Sets the one deadline timer to fire at ``at`` (the earliest deadline)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = loop.call_at(at, self._expire_due)

    def _expire_due(self) -> None:
        """Fails every call whose timeout passed (the leader is told, ``Cancel``)
        and sets the timer for the next deadline. A call answered early leaves
        nothing behind: the timer fires for the calls still waiting."""
        self._timer = None
        self._timer_at = float("inf")
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = [(request_id, timeout) for request_id, (at, timeout) in self._deadlines.items() if at <= now]
        for request_id, timeout in due:
            entry = self._pending.pop(request_id, None)
            if entry is not None and not entry[1].done():
                if self._writer is not None:
                    self._send("Cancel", request_id)
                entry[1].set_exception(DeadlineExceeded(timeout))
        later = [at for at, _ in self._deadlines.values() if at > now]
        if later:
            self._arm(loop, min(later))

    def _abandon(self, request_id: int) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is not None:
            entry[1].cancel()
            if self._writer is not None:
                self._send("Cancel", request_id)

    async def invoke_oneway(self, channel: str, request: Any) -> None:
        """Calls the upstream without an answer; returns once the call is sent."""
        self._check_usable()
        self._open(channel)
        deadline_ms = max(1, min(wire.U32, int(self.timeout * 1000)))
        self._send("Invoke", [self._id(), channel, deadline_ms, True, _pack(request)])
        await self._drain()

    async def publish(self, channel: str, request: Any, *, timeout: Optional[float] = None) -> None:
        """Publishes through the upstream and waits for its acknowledgement."""
        timeout = self.timeout if timeout is None else timeout
        self._check_usable()
        self._open(channel)
        request_id = self._id()
        future: "asyncio.Future[Any]" = asyncio.get_running_loop().create_future()
        self._send("Publish", [request_id, channel, _pack(request)])
        self._pending[request_id] = ("publish", future)
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            self._pending.pop(request_id, None)
            raise DeadlineExceeded(timeout) from None
        finally:
            self._pending.pop(request_id, None)

    def subscribe(self, channel: str, key: Any) -> "Subscription":
        """The values of ``key``: ``async for update in client.subscribe(ch, key)``,
        or ``sub = await client.subscribe(ch, key)`` to wait for the leader's
        acknowledgement first. Leave it with ``await sub.aclose()`` or
        ``async with``; positions never go backwards, across leaders too."""
        return Subscription(self, channel, _pack(key))

    async def _drain(self) -> None:
        writer = self._writer
        if writer is not None:
            try:
                await writer.drain()
            except ConnectionError as error:
                raise LeaderLost(f"the link to the leader failed: {error}") from error

    # ------------------------------------------------------------------ subscriptions

    async def _subscribe(self, sub: "Subscription") -> None:
        self._check_usable()
        self._open(sub.channel)
        topic_key = (sub.channel, sub.key)
        topic = self._topics.get(topic_key)
        if topic is None:
            topic = self._topics[topic_key] = _Topic(sub.channel, sub.key)
        topic.subs.add(sub)
        if topic.remote == "active":
            if topic.latest is not None:
                sub._push(topic.latest)
            return
        if topic.remote == "unsent":
            self._send_subscribe(topic)
        try:
            await asyncio.wait_for(asyncio.shield(topic.acked), self.timeout)
        except asyncio.TimeoutError:
            topic.subs.discard(sub)
            raise DeadlineExceeded(self.timeout) from None
        except BaseException:
            topic.subs.discard(sub)
            if not topic.subs and self._topics.get(topic_key) is topic and topic.remote != "active":
                del self._topics[topic_key]
            raise

    def _send_subscribe(self, topic: _Topic) -> None:
        request_id = self._id()
        topic.remote = "pending"
        topic.request_id = request_id
        topic.resynced = topic.last is not None
        if topic.acked.done():
            topic.acked = asyncio.get_running_loop().create_future()
        last_seen = list(topic.last) if topic.last is not None else None
        self._send("Subscribe", [request_id, topic.channel, topic.key, last_seen])

    def _release(self, sub: "Subscription") -> None:
        topic_key = (sub.channel, sub.key)
        topic = self._topics.get(topic_key)
        if topic is None or sub not in topic.subs:
            return
        topic.subs.discard(sub)
        if topic.subs:
            return
        del self._topics[topic_key]
        if topic.remote != "unsent" and self._writer is not None:
            request_id = self._id()
            self._pending[request_id] = ("unsubscribe", asyncio.get_running_loop().create_future())
            self._send("Unsubscribe", [request_id, topic.channel, topic.key])

    # ------------------------------------------------------------------ the link

    async def _handshake(self) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple]:
        # asyncio.open_unix_connection, with a reader that can hand reads over.
        loop = asyncio.get_running_loop()
        reader = _LinkReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.create_unix_connection(lambda: protocol, self.socket)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            hello = [wire.PROTOCOL_VERSION, self.peer_id.bytes, os.getpid(), self._declared, self.token]
            writer.write(wire.encode("Hello", hello))
            await writer.drain()
            frame = await asyncio.wait_for(self._reader.read(reader), self.handshake_timeout)
        except BaseException:
            writer.close()
            raise
        if frame is None:
            writer.close()
            raise ProtocolError("the leader closed the connection during the handshake")
        kind, value = frame
        if kind == "Reject":
            writer.close()
            version, error = value
            raise Rejected(error, version)
        if kind != "Welcome":
            writer.close()
            raise ProtocolError(f"expected Welcome, got {kind}")
        return reader, writer, value

    async def _run(self, first: "asyncio.Future[None]") -> None:
        delay = self.reconnect_initial
        while not self._closed:
            try:
                reader, writer, welcome = await self._handshake()
            except Rejected as rejection:
                # PROTOCOL.md §5: a rejected follower does not retry the same Hello.
                self._rejection = rejection
                self._link = "rejected"
                self._fail_all(rejection)
                self._notify()
                if not first.done():
                    first.set_exception(rejection)
                return
            except (OSError, ProtocolError, asyncio.TimeoutError):
                await self._sleep_backoff(delay)
                delay = min(self.reconnect_max, delay * 2)
                continue
            version, leader_id, epoch, _pid, heartbeat_ms = welcome
            if epoch < self._max_epoch:
                # A leader older than one already seen: never go back.
                writer.close()
                await self._sleep_backoff(delay)
                delay = min(self.reconnect_max, delay * 2)
                continue
            delay = self.reconnect_initial
            await self._serve(reader, writer, leader_id, epoch, heartbeat_ms, first)
        self._link = "closed"
        self._notify()

    async def _sleep_backoff(self, delay: float) -> None:
        # Backoff with jitter between attempts: waiting out time, not a state.
        await asyncio.sleep(delay * (0.5 + random.random() / 2))

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        leader_id: bytes,
        epoch: int,
        heartbeat_ms: int,
        first: "asyncio.Future[None]",
    ) -> None:
        if epoch == self._max_epoch and self._leader_id not in (None, leader_id):
            # A different leader reusing the epoch: its positions restart.
            for topic in self._topics.values():
                topic.last = None
        self._max_epoch = epoch
        self._leader_id = leader_id
        self._epoch = epoch
        self._writer = writer
        self._states = {}
        self._link = "connected"
        late = [c for c in self._channels if c not in self._declared]
        if late:
            self._send("Open", late)
        for topic in list(self._topics.values()):
            self._send_subscribe(topic)
        self._notify()
        if not first.done():
            first.set_result(None)
        heartbeat = max(0.01, heartbeat_ms / 1000)
        last_heard = time.monotonic()
        pinger = asyncio.create_task(self._heartbeats(heartbeat, lambda: last_heard, writer))
        # From here every read is handled in the socket's own callback: the
        # frames it completes are decoded and dispatched there, and each
        # answered call's task wakes in the next turn of the loop (no reading
        # task to wake in between). This task only waits for the end.
        ended: "asyncio.Future[str]" = asyncio.get_running_loop().create_future()
        frames = wire.FrameReader(self._max_frame_length)

        def end(why: str) -> None:
            if not ended.done():
                ended.set_result(why)

        def on_data(data: bytes) -> None:
            nonlocal last_heard
            if ended.done():
                return
            last_heard = time.monotonic()
            try:
                for frame in frames.feed(data):
                    if not self._on_frame(*frame):
                        end(f"the leader said goodbye: {frame[1]}")
                        return
            except ProtocolError as error:
                end(f"bad frame from the leader: {error}")
            except (OSError, LeaderLost) as error:
                end(f"the link to the leader failed: {error}")

        def on_end(error: Optional[BaseException]) -> None:
            if error is not None:
                end(f"the link to the leader failed: {error}")
            elif frames.pending:
                end(f"bad frame from the leader: connection closed in the middle of a frame ({frames.pending} bytes)")
            else:
                end("the leader closed the connection")

        why = "closed"
        try:
            if isinstance(reader, _LinkReader):
                reader.hand_over(on_data, on_end)
                why = await ended
            else:  # a plain StreamReader: read in this task
                while not ended.done():
                    data = await reader.read(READ_SIZE)
                    if data:
                        on_data(data)
                    else:
                        on_end(None)
                why = ended.result()
        except (OSError, LeaderLost) as error:
            why = f"the link to the leader failed: {error}"
        except asyncio.CancelledError:
            why = "closed"
        finally:
            pinger.cancel()
            try:
                await pinger
            except (asyncio.CancelledError, Exception):
                pass
            writer.close()
            self._lost(why)

    async def _heartbeats(self, every: float, last_heard: Any, writer: asyncio.StreamWriter) -> None:
        """Pings every heartbeat; gives up a leader silent for the peer timeout."""
        nonce = 0
        tick = min(every, max(0.01, self.peer_timeout / 4))
        last_ping = time.monotonic()
        while True:
            await asyncio.sleep(tick)  # the timer itself, not a wait for a state
            now = time.monotonic()
            if now - last_heard() > self.peer_timeout:
                # The read loop sees the end of the stream and the link is lost.
                writer.transport.abort()
                return
            if now - last_ping >= every:
                last_ping = now
                nonce += 1
                writer.write(wire.encode("Ping", nonce))

    def _on_frame(self, kind: str, value: Any) -> bool:
        """Handles one frame; False ends the link."""
        if kind == "Response":
            request_id, (ok, result) = value
            entry = self._pending.pop(request_id, None)
            if entry is not None and entry[0] == "invoke" and not entry[1].done():
                if ok:
                    entry[1].set_result(result)
                else:
                    entry[1].set_exception(result)
        elif kind == "Ack":
            request_id, (ok, result) = value
            entry = self._pending.pop(request_id, None)
            if entry is not None and not entry[1].done():
                if ok:
                    entry[1].set_result(None)
                else:
                    entry[1].set_exception(result)
            elif entry is None:
                self._on_subscribed(request_id, ok, result)
        elif kind == "Event":
            self._on_event(*value)
        elif kind == "Ended":
            channel, key, error = value
            topic = self._topics.get((channel, key))
            if topic is not None and topic.remote == "active":
                del self._topics[(channel, key)]
                for sub in topic.subs:
                    sub._end(error)
        elif kind == "Status":
            channel, (state, error) = value
            self._states[channel] = ChannelState(state, error)
            self._notify()
        elif kind == "Ping":
            self._send("Pong", value)
        elif kind == "Pong":
            pass
        elif kind == "Goodbye":
            return False
        else:
            raise ProtocolError(f"a leader may not send {kind} now")
        return True

    def _on_subscribed(self, request_id: int, ok: bool, error: Any) -> None:
        for topic_key, topic in list(self._topics.items()):
            if topic.request_id != request_id or topic.remote != "pending":
                continue
            if ok:
                topic.remote = "active"
                if not topic.acked.done():
                    topic.acked.set_result(None)
            else:
                topic.remote = "unsent"
                if not topic.acked.done():
                    topic.acked.set_exception(error)
                    topic.acked.exception()  # retrieved: waiters re-raise it
                else:
                    # A resubscribe refused by a new leader: its streams end with why.
                    for sub in topic.subs:
                        sub._end(error)
                del self._topics[topic_key]
            return

    def _on_event(self, channel: str, key: bytes, epoch: int, seq: int, payload: bytes, cached: bool) -> None:
        topic = self._topics.get((channel, key))
        if topic is None:
            return  # a key no longer subscribed
        position = (epoch, seq)
        if topic.last is not None and position <= topic.last:
            return  # at or below what was delivered: a replay
        resynced, topic.resynced = topic.resynced, False
        same = resynced and topic.last_payload == payload and (cached or not topic.last_cached)
        topic.last, topic.last_payload, topic.last_cached = position, payload, cached
        if same:
            return  # the same value, re-announced by a new leader
        try:
            update = Update(_unpack(payload), epoch, seq, cached)
        except RemoteError:
            return  # an undecodable value is skipped
        topic.latest = update
        for sub in topic.subs:
            sub._push(update)

    def _lost(self, why: str) -> None:
        self._writer = None
        self._states = {}
        error = LeaderLost(f"the leader was lost: {why}")
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()
        self._pending.clear()
        for topic in self._topics.values():
            if topic.remote == "pending" and not topic.acked.done():
                topic.acked.set_exception(error)
                topic.acked.exception()
            topic.remote = "unsent"
        self._link = "closed" if self._closed else "lost"
        self._notify()

    def _fail_all(self, error: Exception) -> None:
        for _, future in self._pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()
        self._pending.clear()
        for topic in self._topics.values():
            for sub in topic.subs:
                sub._end(None)
        self._topics.clear()

    async def close(self) -> None:
        """Says Goodbye and closes the connection; every later call raises :class:`Closed`."""
        if self._closed:
            return
        self._closed = True
        writer = self._writer
        if writer is not None:
            try:
                writer.write(wire.encode("Goodbye", "follower closing"))
                await asyncio.wait_for(writer.drain(), self.handshake_timeout)
            except Exception:
                pass
            writer.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_all(Closed("the client is closed"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._link = "closed"
        self._notify()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class Subscription:
    """The values of one key, as an async iterator of :class:`Update`.

    The first value is the key's current one, when it has one. Values arrive
    in order and never twice, across leader changes too. Leaving it
    (``aclose()``, or ``async with``) unsubscribes.
    """

    def __init__(self, client: Client, channel: str, key: bytes) -> None:
        self.client = client
        self.channel = channel
        self.key = key
        self._queue: "asyncio.Queue[Optional[Update]]" = asyncio.Queue()
        self._started = False
        self._closed = False
        #: Why the leader ended the subscription (None while it runs).
        self.ended: Optional[RemoteError] = None
        #: Values skipped because the reader fell behind.
        self.skipped = 0

    async def _start(self) -> "Subscription":
        if not self._started:
            self._started = True
            await self.client._subscribe(self)
        return self

    def __await__(self) -> Any:
        return self._start().__await__()

    def __aiter__(self) -> AsyncIterator[Update]:
        return self

    async def __anext__(self) -> Update:
        await self._start()
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        update = await self._queue.get()
        if update is None:
            raise StopAsyncIteration
        return update

    def _push(self, update: Update) -> None:
        if self._queue.qsize() >= SUBSCRIPTION_BUFFER:
            self._queue.get_nowait()
            self.skipped += 1
        self._queue.put_nowait(update)

    def _end(self, error: Optional[RemoteError]) -> None:
        self.ended = error
        self._closed = True
        self._queue.put_nowait(None)

    async def aclose(self) -> None:
        """Unsubscribes (the last local subscriber of the key tells the leader)."""
        if not self._closed:
            self._closed = True
            self.client._release(self)
            self._queue.put_nowait(None)

    async def __aenter__(self) -> "Subscription":
        return await self._start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


async def connect(
    socket: Optional[str] = None,
    token: Optional[str] = None,
    channels: Iterable[str] = (),
    *,
    timeout: float = 5.0,
    peer_timeout: float = 5.0,
    handshake_timeout: float = 5.0,
    wait: float = 30.0,
    reconnect_initial: float = 0.01,
    reconnect_max: float = 1.0,
    max_frame_length: int = wire.DEFAULT_MAX_FRAME_LENGTH,
) -> Client:
    """Connects to the Leader and returns a :class:`Client` once it is welcomed
    and every channel in ``channels`` has an upstream state.

    ``socket`` defaults to ``$TANDEM_LEADER_SOCKET``, ``token`` to
    ``$TANDEM_TOKEN``. Retries an unreachable leader with backoff for up to
    ``wait`` seconds (then :class:`NotReady`); a refused Hello raises
    :class:`Rejected` at once.
    """
    socket = socket if socket is not None else os.environ.get("TANDEM_LEADER_SOCKET")
    if not socket:
        raise ValueError("no leader socket: pass socket= or set TANDEM_LEADER_SOCKET")
    if token is None:
        token = os.environ.get("TANDEM_TOKEN") or None
    client = Client(
        socket,
        token,
        channels,
        timeout=timeout,
        peer_timeout=peer_timeout,
        handshake_timeout=handshake_timeout,
        reconnect_initial=reconnect_initial,
        reconnect_max=reconnect_max,
        max_frame_length=max_frame_length,
    )
    first: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
    client._task = asyncio.create_task(client._run(first))
    try:
        await asyncio.wait_for(asyncio.shield(first), wait)
        declared = list(client._declared)
        await client.wait_for(lambda c: all(ch in c._states for ch in declared), handshake_timeout)
    except asyncio.TimeoutError:
        await client.close()
        raise NotReady(f"no leader welcomed this follower within {wait:g} s") from None
    except BaseException:
        await client.close()
        raise
    return client
