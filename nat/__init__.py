"""NAT traversal: address discovery, NAT classification, hole punching, relay.

Sans-I/O cores (no trio, socket or clock): ``endpoint`` (Endpoint, NatType),
``observed`` (addresses confirmed by independent observers), ``classify``
(RFC 4787 mapping/filtering), ``probe`` (punch packets, port prediction,
birthday plan), ``punch`` (DCUtR-style state machine), ``bucket`` and
``relay`` (relay limits, circuit accounting, relayed-to-direct upgrade),
``strategy`` (which paths to try). Thin trio drivers: ``punch_driver``,
``punch_udp``, ``punch_tcp``, ``relay_tcp``, ``framed``.
"""
