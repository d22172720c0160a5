"""The errors a caller sees, worded from the caller's point of view."""

from __future__ import annotations

RETRYABLE_KINDS = frozenset({"DeadlineExceeded", "Unavailable"})
KNOWN_KINDS = frozenset(
    {"DeadlineExceeded", "Unavailable", "Rejected", "Upstream", "BadRequest", "Cancelled", "Internal"}
)


class TandemError(Exception):
    """The base of every error of this package."""

    def is_retryable(self) -> bool:
        """Whether retrying later may succeed."""
        return False

    def is_timeout(self) -> bool:
        """Whether the error is a deadline expiry (here or at the leader)."""
        return False


class RemoteError(TandemError):
    """The leader or its upstream answered with an error (PROTOCOL.md §4.1, §10).

    An unknown ``kind`` is read as ``Internal``, as the protocol requires.
    """

    def __init__(self, kind: str, code: str, message: str) -> None:
        self.kind = kind if kind in KNOWN_KINDS else "Internal"
        self.code = code
        self.message = message
        super().__init__(f"{self.kind}" + (f" ({code})" if code else "") + f": {message}")

    def is_retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    def is_timeout(self) -> bool:
        return self.kind == "DeadlineExceeded"


class Rejected(TandemError):
    """The leader refused this follower's Hello (token, protocol version or
    channels). The same Hello is not sent again; every later call raises this."""

    def __init__(self, error: RemoteError, version: int) -> None:
        self.kind = error.kind
        self.code = error.code
        self.message = error.message
        #: The newest protocol version the leader speaks.
        self.version = version
        super().__init__(f"the leader rejected this follower: {error}")


class DeadlineExceeded(TandemError, TimeoutError):
    """No answer within the call's deadline; the call was cancelled at the leader."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"no answer within the {timeout:g} s deadline")

    def is_retryable(self) -> bool:
        return True

    def is_timeout(self) -> bool:
        return True


class LeaderLost(TandemError):
    """There is no leader right now (it died, went silent or is being
    replaced); the client reconnects by itself. Retry later."""

    def is_retryable(self) -> bool:
        return True


class NotReady(TandemError):
    """No leader could be reached within the wait given to ``connect``."""

    def is_retryable(self) -> bool:
        return True


class Closed(TandemError):
    """The client was closed."""


class ProtocolError(TandemError):
    """The leader sent bytes that are not a valid frame, or a frame it may not
    send; the link is dropped and the client reconnects."""
