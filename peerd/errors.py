"""The small error taxonomy every layer of peerd uses.

Callers catch these, never library-specific exceptions: a peer's garbage is a
``ProtocolError``, a vanished peer is ``PeerLost`` (naming who), a user's bad
input is ``ConfigError`` with a message that says what to change.
"""

from __future__ import annotations

from collections.abc import Iterable


class PeerdError(Exception):
    """Base class of all errors peerd raises on purpose."""


class ProtocolError(PeerdError):
    """A peer sent malformed, oversized or unexpected input."""


class AuthError(PeerdError):
    """A peer failed to prove its identity or its membership (swarm key)."""


class Timeout(PeerdError):
    """A named deadline passed."""


class ConfigError(PeerdError):
    """The user's configuration is wrong; the message says what to change."""


class RemoteError(PeerdError):
    """A remote handler raised; carries the remote error's type name."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class PeerLost(PeerdError):
    """One or more peers vanished (connection loss, heartbeat timeout, deadline).

    ``peers`` holds the text form of every peer known to be gone.
    """

    def __init__(self, peers: Iterable[str], detail: str = "") -> None:
        self.peers: tuple[str, ...] = tuple(sorted(set(peers)))
        self.detail = detail
        text = "peer(s) lost: " + ", ".join(self.peers)
        if detail:
            text += f" ({detail})"
        super().__init__(text)

    @classmethod
    def restored(cls, peers: Iterable[str], message: str) -> PeerLost:
        """The error another process reported as ``peers`` and ``str(error)``
        (a daemon to its client), with that message as it was."""
        exc = cls.__new__(cls)
        PeerdError.__init__(exc, message)
        exc.peers = tuple(sorted(set(peers)))
        exc.detail = ""
        return exc


class Evicted(PeerLost):
    """This peer is not in the run's current view (declared gone, left, or
    stranded by a partition): the others went on without it. ``join()`` again,
    or call ``update_view()``/``sync_state()`` at the next round boundary,
    which readmits it (``optim.OuterLoop`` does so and resyncs its state)."""

    def __init__(self, me: str, detail: str = "") -> None:
        super().__init__([me], detail or "this peer is not a member of the view")
