"""A load publisher that is never the bottleneck: pre-encoded MQTT QoS 1 PUBLISH packets on a raw socket.

The publisher now lives in simulators/load.py (the simulators' load mode sends with it); this module keeps
the names the benchmarks import. Packets are built once (numpy for the values); sending is `sendall` of
large slices, with a window of unacknowledged packet ids so the broker is never overrun; PUBACKs are read
by a thread. Each message's `ts` is a fixed-width 13-digit field that can be patched just before its chunk
is sent, so publish->stored latency can be measured from the stored point.
"""

from __future__ import annotations

from simulators.load import TS_PLACEHOLDER, Encoded, LoadResult, RawPublisher, connect_packet, encode

__all__ = ["TS_PLACEHOLDER", "Encoded", "LoadResult", "RawPublisher", "connect_packet", "encode"]
