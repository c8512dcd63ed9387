"""DCUtR-style coordinated hole punching (sans-I/O state machine).

Both ends already reach a common peer R. The initiator B sends ``PunchConnect``
(its candidates) through R and starts a timer; the responder A answers with
its own candidates; B takes the round trip as RTT, sends ``PunchSync``, waits
RTT/2 and dials, while A dials the moment the sync arrives. Both first packets
then leave at about the same time, each opening its own NAT's mapping before
the other's packet arrives.

An attempt that sees no direct packet within ``punch_timeout`` is retried with
fresh timing (a new RTT measurement) up to ``max_attempts`` times; then the
initiator backs off exponentially and starts a new round. Attempt numbers grow
across rounds, so a late message from an old attempt is always recognised. The
responder never drives retries; it follows the initiator's attempts.

The machine takes ``now`` and events and returns actions; it reads no clock,
owns no socket and draws no randomness (the token is passed in).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nat.endpoint import Endpoint, NatType
from nat.probe import MAX_TARGETS, TOKEN_BYTES, dial_targets
from peerd.wire import message

PUNCH_VERSION = 1
MAX_ATTEMPT = 1_000_000


def _check(version: int, attempt: int, token: bytes) -> None:
    if version != PUNCH_VERSION:
        raise ValueError(f"punch version {version} unsupported")
    if not 1 <= attempt <= MAX_ATTEMPT:
        raise ValueError("attempt out of range")
    if len(token) != TOKEN_BYTES:
        raise ValueError("bad token length")


@message(701)
@dataclass(frozen=True)
class PunchConnect:
    """Candidate exchange; the responder echoes ``attempt`` and ``token``."""

    version: int
    attempt: int
    token: bytes
    candidates: tuple[Endpoint, ...]
    nat_type: NatType
    port_step: int  # 0 when the sender's allocator is not sequential

    def __post_init__(self) -> None:
        _check(self.version, self.attempt, self.token)
        if len(self.candidates) > MAX_TARGETS:
            raise ValueError("too many candidates")
        if abs(self.port_step) > 1024:
            raise ValueError("port step out of range")


@message(702)
@dataclass(frozen=True)
class PunchSync:
    version: int
    attempt: int
    token: bytes

    def __post_init__(self) -> None:
        _check(self.version, self.attempt, self.token)


PunchMessage = PunchConnect | PunchSync


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class PunchState(enum.Enum):
    IDLE = "idle"
    AWAIT_REPLY = "await_reply"  # initiator: Connect sent, timing the round trip
    AWAIT_DIAL = "await_dial"  # initiator: Sync sent, waiting RTT/2
    AWAIT_SYNC = "await_sync"  # responder: Connect answered
    DIALING = "dialing"
    SUCCEEDED = "succeeded"
    BACKOFF = "backoff"  # initiator: attempts used up, waiting for the next round


@dataclass(frozen=True)
class PunchConfig:
    max_attempts: int = 3
    reply_timeout: float = 5.0
    sync_timeout: float = 5.0
    punch_timeout: float = 3.0
    backoff_initial: float = 30.0
    backoff_max: float = 600.0
    predicted_ports: int = 4


@dataclass(frozen=True)
class LocalInfo:
    candidates: tuple[Endpoint, ...]
    nat_type: NatType
    port_step: int = 0


@dataclass(frozen=True)
class SendViaRelay:
    message: PunchMessage


@dataclass(frozen=True)
class Dial:
    """Send punch packets (UDP) or connect from the listening port (TCP) to
    every target now."""

    attempt: int
    targets: tuple[Endpoint, ...]
    token: bytes


@dataclass(frozen=True)
class Succeeded:
    remote: Endpoint
    attempt: int


@dataclass(frozen=True)
class AttemptFailed:
    attempt: int
    reason: str


@dataclass(frozen=True)
class BackOff:
    retry_at: float


Action = SendViaRelay | Dial | Succeeded | AttemptFailed | BackOff


@dataclass(frozen=True)
class PunchStats:
    role: Role
    state: PunchState
    attempt: int
    rounds: int
    rtt: float | None
    remote: Endpoint | None
    ignored_messages: int


class HolePunch:
    """One punch session with one remote peer."""

    def __init__(
        self, role: Role, local: LocalInfo, token: bytes, config: PunchConfig | None = None
    ) -> None:
        if len(token) != TOKEN_BYTES:
            raise ValueError("bad token length")
        self.role = role
        self.local = local
        self.token = token
        self.config = config or PunchConfig()
        self.state = PunchState.IDLE
        self.attempt = 0  # grows across rounds; names the current attempt
        self.rounds = 0
        self._round_attempts = 0
        self.rtt: float | None = None
        self.remote: Endpoint | None = None
        self._deadline: float | None = None
        self._sent_at = 0.0
        self._targets: tuple[Endpoint, ...] = ()
        self._ignored = 0

    @property
    def deadline(self) -> float | None:
        """When the driver must call ``timer``; None when nothing is pending."""
        return self._deadline

    def start(self, now: float) -> list[Action]:
        """Initiator only: begin attempt 1 of a round."""
        if self.role is not Role.INITIATOR:
            raise RuntimeError("only the initiator starts a punch")
        if self.state not in (PunchState.IDLE, PunchState.BACKOFF):
            raise RuntimeError(f"cannot start from {self.state.value}")
        self._round_attempts = 0
        return self._next_attempt(now)

    def receive(self, msg: PunchMessage, now: float) -> list[Action]:
        """A message from the remote peer, relayed by the common peer."""
        if msg.token != self.token or self.state is PunchState.SUCCEEDED:
            self._ignored += 1
            return []
        if isinstance(msg, PunchConnect):
            return self._on_connect(msg, now)
        return self._on_sync(msg, now)

    def direct_packet(self, source: Endpoint, now: float) -> list[Action]:
        """The remote's punch packet (already token-checked) arrived from ``source``.

        Accepted in any live state: a packet that beats our own dial still
        proves the path works (e.g. our side is reachable anyway)."""
        if self.state is PunchState.SUCCEEDED:
            return []  # the remaining probes of a burst
        if self.attempt == 0:
            self._ignored += 1  # no session yet: nothing was dialed
            return []
        self.state = PunchState.SUCCEEDED
        self.remote = source
        self._deadline = None
        return [Succeeded(source, self.attempt)]

    def timer(self, now: float) -> list[Action]:
        if self._deadline is None or now < self._deadline:
            return []
        self._deadline = None
        if self.state is PunchState.AWAIT_DIAL:
            return self._dial(now)
        if self.state is PunchState.BACKOFF:
            self._round_attempts = 0
            return self._next_attempt(now)
        reason = {
            PunchState.AWAIT_REPLY: "no reply through the relay",
            PunchState.AWAIT_SYNC: "no sync through the relay",
            PunchState.DIALING: "no direct packet",
        }.get(self.state, "timeout")
        failed: list[Action] = [AttemptFailed(self.attempt, reason)]
        if self.role is Role.RESPONDER:
            self.state = PunchState.IDLE
            return failed
        return failed + self._next_attempt(now)

    def statistics(self) -> PunchStats:
        return PunchStats(
            self.role, self.state, self.attempt, self.rounds, self.rtt, self.remote, self._ignored
        )

    # ---------------------------------------------------------------- internals

    def _connect_msg(self) -> PunchConnect:
        return PunchConnect(
            PUNCH_VERSION,
            self.attempt,
            self.token,
            self.local.candidates[:MAX_TARGETS],
            self.local.nat_type,
            self.local.port_step,
        )

    def _next_attempt(self, now: float) -> list[Action]:
        if self._round_attempts >= self.config.max_attempts:
            delay = min(self.config.backoff_initial * 2**self.rounds, self.config.backoff_max)
            self.rounds += 1
            self.state = PunchState.BACKOFF
            self._deadline = now + delay
            return [BackOff(now + delay)]
        self.attempt += 1
        self._round_attempts += 1
        self.state = PunchState.AWAIT_REPLY
        self._sent_at = now
        self._deadline = now + self.config.reply_timeout
        return [SendViaRelay(self._connect_msg())]

    def _remember_targets(self, msg: PunchConnect) -> None:
        self._targets = dial_targets(
            msg.candidates, msg.nat_type, msg.port_step, self.config.predicted_ports
        )

    def _on_connect(self, msg: PunchConnect, now: float) -> list[Action]:
        if self.role is Role.RESPONDER:
            # Each new attempt of the initiator restarts our side with fresh timing.
            if msg.attempt <= self.attempt:
                self._ignored += 1
                return []
            self.attempt = msg.attempt
            self._remember_targets(msg)
            self.state = PunchState.AWAIT_SYNC
            self._deadline = now + self.config.sync_timeout
            return [SendViaRelay(self._connect_msg())]
        if self.state is not PunchState.AWAIT_REPLY or msg.attempt != self.attempt:
            self._ignored += 1  # a late reply to an abandoned attempt
            return []
        self._remember_targets(msg)
        self.rtt = max(0.0, now - self._sent_at)
        self.state = PunchState.AWAIT_DIAL
        self._deadline = now + self.rtt / 2
        return [SendViaRelay(PunchSync(PUNCH_VERSION, self.attempt, self.token))]

    def _on_sync(self, msg: PunchSync, now: float) -> list[Action]:
        if (
            self.role is not Role.RESPONDER
            or self.state is not PunchState.AWAIT_SYNC
            or msg.attempt != self.attempt
        ):
            self._ignored += 1
            return []
        return self._dial(now)

    def _dial(self, now: float) -> list[Action]:
        self.state = PunchState.DIALING
        self._deadline = now + self.config.punch_timeout
        return [Dial(self.attempt, self._targets, self.token)]
