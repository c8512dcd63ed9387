"""UDP hole punching on the node's socket (trio): probes out, probes/acks in.

``UdpPuncher.dial`` sends a short burst of punch packets to every target,
spread over ~200 ms so at least one leaves after the remote NAT has opened its
mapping. ``UdpPuncher.listen`` reads the socket, answers each valid probe with
an ack (so the prober learns the path works too) and reports the source of
every probe or ack carrying the session token. Packets that are not probes
are left to the caller's demultiplexer (here: ignored, bounded count).
"""

from __future__ import annotations

import trio

from nat.endpoint import Endpoint
from nat.probe import ProbeKind, encode_probe, parse_probe_untrusted
from nat.punch import Dial

# Offsets of the burst, in seconds from the Dial action.
BURST_OFFSETS = (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 0.2)
MAX_DATAGRAM = 2048


class UdpPuncher:
    def __init__(self, sock: trio.socket.SocketType, token: bytes) -> None:
        self.sock = sock
        self.token = token
        self.probes_sent = 0
        self.acks_sent = 0
        self.foreign_packets = 0

    async def dial(self, action: Dial, found: trio.MemorySendChannel[Endpoint]) -> None:
        """Send the burst; replies arrive through ``listen``."""
        async with found:
            packet = encode_probe(ProbeKind.PROBE, action.token)
            start = trio.current_time()
            for offset in BURST_OFFSETS:
                await trio.sleep_until(start + offset)
                for target in action.targets:
                    try:
                        await self.sock.sendto(packet, target.as_tuple())
                        self.probes_sent += 1
                    except OSError:
                        pass  # an unreachable candidate (e.g. a foreign LAN) is expected

    async def listen(self, found: trio.MemorySendChannel[Endpoint]) -> None:
        """Run until cancelled, reporting every endpoint that proved the path."""
        async with found:
            while True:
                data, addr = await self.sock.recvfrom(MAX_DATAGRAM)
                probe = parse_probe_untrusted(data)
                if probe is None or probe.token != self.token:
                    self.foreign_packets += 1
                    continue
                source = Endpoint(addr[0], addr[1])
                if probe.kind is ProbeKind.PROBE:
                    try:
                        await self.sock.sendto(encode_probe(ProbeKind.ACK, self.token), addr)
                        self.acks_sent += 1
                    except OSError:
                        pass
                await found.send(source)
