"""Load mode (simulators.load): the fleet, the payload stream, its framing, pacing and the PUBACK scan.

No network here: the stream is checked as data (same seed, same bytes; every payload valid for its thing
model), the pacing against a fake clock, the PUBACK scan on byte strings a broker would send.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices import DEVICE_TYPES, THING_MODELS
from gateway.registry import DeviceRecord
from simulators import load
from simulators.load import (
    BLOCK,
    EVENT,
    QUIET,
    TELEMETRY,
    Fleet,
    LoadConfig,
    Pacer,
    PayloadGenerator,
    Profile,
    parse_mix,
    piece_size,
    scan_acks_v5,
)

START_MS = 1_795_239_454_000  # 2026-11-21T05:37:34Z


@pytest.fixture(scope="module")
def fleet() -> Fleet:
    return Fleet.generate(997, communities=7)  # a prime: blocks and rounds never line up


def gen(fleet: Fleet, **profile: Any) -> PayloadGenerator:
    return PayloadGenerator(fleet, Profile(**profile), start_ms=START_MS, interval_ms=1000)


def parse_packets(buf: bytes, v5: bool) -> list[tuple[str, int, bytes, int]]:
    """(topic, packet id, payload, offset of the packet) of each QoS 1 PUBLISH in `buf`."""
    out, i = [], 0
    while i < len(buf):
        assert buf[i] == 0x32, f"not a QoS 1 PUBLISH at {i}"
        length, mult, j = 0, 1, i + 1
        while True:
            length += (buf[j] & 0x7F) * mult
            mult *= 128
            j += 1
            if not buf[j - 1] & 0x80:
                break
        end = j + length
        tl = struct.unpack_from("!H", buf, j)[0]
        topic = buf[j + 2 : j + 2 + tl].decode()
        mid = struct.unpack_from("!H", buf, j + 2 + tl)[0]
        k = j + 4 + tl
        if v5:
            assert buf[k] == 0, "no properties expected"
            k += 1
        out.append((topic, mid, bytes(buf[k:end]), i))
        i = end
    return out


def validate(topic: str, payload: bytes) -> dict[str, Any]:
    """As the gateway does: the thing model's strict adapter on the JSON bytes."""
    _, _, device_type, _, kind = topic.split("/")
    model = THING_MODELS[device_type]
    adapter = model.telemetry_adapter if kind == "telemetry" else model.event_adapter
    assert adapter is not None, f"{device_type} declares no events"
    return adapter.validate_json(payload)


# ---- the fleet ------------------------------------------------------------------------------------------


def test_generated_fleet_is_registrable_mixed_and_deterministic(fleet: Fleet) -> None:
    assert len(fleet) == 997
    assert Fleet.generate(997, communities=7) == fleet
    ids = fleet.device_ids
    assert len(set(ids)) == len(ids)
    for row in fleet.rows:
        DeviceRecord(**row)  # what the registry import accepts
    counts = Counter(fleet.device_types)
    assert set(counts) == set(DEVICE_TYPES)
    assert max(counts.values()) - min(counts.values()) <= 1
    by_community: dict[str, set[str]] = defaultdict(set)
    for row in fleet.rows:
        by_community[row["community"]].add(row["device_type"])
    assert len(by_community) == 7
    assert all(types == set(DEVICE_TYPES) for types in by_community.values())
    # any stretch of the fleet is mixed
    assert len(set(fleet.device_types[:5])) == 5


def test_mix_sets_the_proportions() -> None:
    mix = parse_mix("streetlight=3,manhole_cover=1, smoke_detector=0")
    assert mix == {"streetlight": 3.0, "manhole_cover": 1.0, "smoke_detector": 0.0}
    f = Fleet.generate(1000, mix=mix)
    assert Counter(f.device_types) == {"streetlight": 750, "manhole_cover": 250}
    assert Counter(f.device_types[:8]) == {"streetlight": 6, "manhole_cover": 2}
    with pytest.raises(ValueError, match="unknown device type"):
        parse_mix("lamp=1")
    with pytest.raises(ValueError, match="not a number"):
        parse_mix("streetlight=lots")
    with pytest.raises(ValueError, match="at least one type"):
        Fleet.generate(10, mix={"streetlight": 0})


def test_fleet_from_registration_csv(tmp_path: Path, fleet: Fleet) -> None:
    path = tmp_path / "devices.csv"
    fleet.write_csv(path)
    again = Fleet.from_csv(path)
    assert again.device_ids == fleet.device_ids
    assert again.device_types == fleet.device_types


def test_fleet_refuses_bad_rows() -> None:
    with pytest.raises(ValueError, match="twice"):
        Fleet.from_rows([{"device_id": "a", "device_type": "streetlight"}] * 2)
    with pytest.raises(ValueError, match="unknown device type"):
        Fleet.from_rows([{"device_id": "a", "device_type": "toaster"}])
    with pytest.raises(ValueError, match="valid device id"):
        Fleet.from_rows([{"device_id": "a/b", "device_type": "streetlight"}])


# ---- the stream -----------------------------------------------------------------------------------------


def test_same_seed_gives_the_same_bytes(fleet: Fleet) -> None:
    n = 2 * BLOCK + 123
    a = gen(fleet, seed=5, event_share=0.2).messages(n)
    b = gen(fleet, seed=5, event_share=0.2).messages(n)
    assert len(a) == n
    assert a == b
    other = gen(fleet, seed=6, event_share=0.2).messages(n)
    assert sum(p1 != p2 for (_, p1), (_, p2) in zip(a, other, strict=True)) > n * 0.9
    # and framed: the same packets
    g1, g2 = gen(fleet, seed=5), gen(fleet, seed=5)
    assert g1.encoded(n, protocol=5).buf == g2.encoded(n, protocol=5).buf


def test_stream_does_not_depend_on_connections_or_limit(fleet: Fleet) -> None:
    g = gen(fleet, seed=9, event_share=0.3)
    limit = BLOCK + 1000
    whole = {int(i): p for b in g.batches(limit=limit) for i, p in zip(b.index, b.payloads, strict=True)}
    assert sorted(whole) == list(range(limit))
    split: dict[int, bytes] = {}
    for c in range(3):
        for b in g.batches(c, 3, limit):
            assert all(int(d) % 3 == c for d in b.device)
            assert list(b.index) == sorted(b.index)
            split.update((int(i), p) for i, p in zip(b.index, b.payloads, strict=True))
    assert split == whole
    longer = dict(enumerate(p for _, p in g.messages(limit + 500)))
    assert all(longer[i] == p for i, p in whole.items())


@pytest.mark.parametrize("storm", [False, True], ids=["quiet", "storm"])
def test_every_payload_validates_against_its_thing_model(fleet: Fleet, storm: bool) -> None:
    kinds: Counter[str] = Counter()
    for topic, payload in gen(fleet, seed=3, storm=storm, event_share=0.3).messages(6000):
        values = validate(topic, payload)
        _, _, device_type, _, kind = topic.split("/")
        kinds[kind] += 1
        model = THING_MODELS[device_type]
        assert isinstance(values["ts"], int) and isinstance(values["seq"], int)
        if kind == "telemetry":
            assert set(values) == {"ts", "seq"} | {f.name for f in model.telemetry}  # every field
            for f in model.telemetry:
                assert type(values[f.name]) is f.kind, (f.name, values[f.name])
                quiet = QUIET.get(f.name)
                if not storm and isinstance(quiet, tuple):
                    assert quiet[0] <= values[f.name] <= quiet[1], (f.name, values[f.name])
                if not storm and isinstance(quiet, bool):
                    assert values[f.name] is quiet
        else:
            event = model.events_by_name[values["event"]]
            assert set(values) == {"ts", "seq", "event"} | {f.name for f in event.fields}
    assert kinds["telemetry"] and kinds["event"]


def test_storm_spreads_over_the_whole_range(fleet: Fleet) -> None:
    seen: dict[str, list[Any]] = defaultdict(list)
    for topic, payload in gen(fleet, seed=4, storm=True).messages(5000):
        if topic.startswith("sc/v1/manhole_cover/"):
            for k, v in json.loads(payload).items():
                seen[k].append(v)
    assert max(seen["tilt_deg"]) > 150  # quiet keeps it below 3
    assert set(seen["cover_open"]) == {True, False}


def test_seq_counts_per_device_and_ts_is_device_time(fleet: Fleet) -> None:
    g = PayloadGenerator(fleet, Profile(seed=1, event_share=0.5), start_ms=START_MS, interval_ms=250)
    per_device: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for topic, payload in g.messages(4 * len(fleet)):
        doc = json.loads(payload)
        per_device[topic.split("/")[3]].append((doc["seq"], doc["ts"]))
    assert set(per_device) == set(fleet.device_ids)
    for device, reports in per_device.items():
        assert [s for s, _ in reports] == [0, 1, 2, 3], device
        ts = [t for _, t in reports]
        assert all(b - a == 250 for a, b in itertools.pairwise(ts)), device
        assert START_MS <= ts[0] < START_MS + 250


def test_event_share_and_weights(fleet: Fleet) -> None:
    weights = {"access_granted": 3.0, "access_denied": 1.0, "emergency_call": 1.0}
    g = PayloadGenerator(fleet, Profile(seed=2, event_share=0.25, event_weights=weights), start_ms=START_MS)
    kinds: Counter[tuple[str, str]] = Counter()
    events: Counter[str] = Counter()
    for topic, payload in g.messages(40_000):
        _, _, device_type, _, kind = topic.split("/")
        kinds[device_type, kind] += 1
        if kind == "event":
            events[json.loads(payload)["event"]] += 1
    # types without events never send one; a type whose events all weigh 0 neither
    for t in ("manhole_cover", "parking_sensor", "smoke_detector"):
        assert kinds[t, "event"] == 0, t
    for t in ("access_control", "streetlight"):
        share = kinds[t, "event"] / (kinds[t, "event"] + kinds[t, "telemetry"])
        assert 0.22 < share < 0.28, (t, share)
    assert set(events) == {"access_granted", "access_denied", "emergency_call"}
    assert 2.6 < events["access_granted"] / events["access_denied"] < 3.4
    none = gen(fleet, seed=2, event_share=0.0).messages(5000)
    assert all(t.endswith("/telemetry") for t, _ in none)
    every = gen(fleet, seed=2, event_share=1.0).messages(5000)
    assert all(t.endswith("/event") for t, _ in every if "/access_control/" in t)


def test_profile_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="event share"):
        Profile(event_share=1.5)
    with pytest.raises(ValueError, match="seed"):
        Profile(seed=-1)
    with pytest.raises(ValueError, match="13 digits"):
        PayloadGenerator(Fleet.generate(5), Profile(), start_ms=123)


# ---- framing --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [4, 5])
def test_frames_are_the_stream_as_qos1_publishes(fleet: Fleet, protocol: int) -> None:
    g = gen(fleet, seed=8, event_share=0.2)
    batch = g.batch(0, connection=1, connections=2)
    framed = g.frame(batch, first_mid=65530, protocol=protocol)
    packets = parse_packets(bytes(framed.buf), v5=protocol == 5)
    assert len(packets) == len(batch)
    assert [p for _, _, p, _ in packets] == batch.payloads
    assert [t for t, _, _, _ in packets] == [
        g.topic(int(d), int(k)) for d, k in zip(batch.device, batch.kind, strict=True)
    ]
    assert [m for _, m, _, _ in packets][:8] == [65530, 65531, 65532, 65533, 65534, 65535, 1, 2]
    assert list(framed.starts[:-1]) == [off for _, _, _, off in packets]
    assert framed.starts[-1] == len(framed.buf)
    for (_, _, payload, _), ts_at in zip(packets, framed.ts_offsets, strict=True):
        digits = bytes(framed.buf[ts_at : ts_at + 13])
        assert digits == str(json.loads(payload)["ts"]).encode()
    assert set(batch.kind.tolist()) == {TELEMETRY, EVENT}


def test_stamping_rewrites_every_ts(fleet: Fleet) -> None:
    enc = gen(fleet, seed=1).encoded(1500)
    arr = np.frombuffer(enc.buf, dtype=np.uint8)
    load.stamp(arr, enc.ts_offsets[:700], 1_900_000_000_123)
    docs = [json.loads(p) for _, _, p, _ in parse_packets(bytes(enc.buf), v5=False)]
    assert {d["ts"] for d in docs[:700]} == {1_900_000_000_123}
    assert all(d["ts"] < 1_900_000_000_000 for d in docs[700:])
    assert len(enc) == 1500


# ---- pacing ---------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s > 0
        self.slept.append(s)
        self.now += s


def test_pacer_spreads_messages_evenly_on_the_clock() -> None:
    clock = FakeClock()
    pacer = Pacer(2000.0, t0=clock.now, clock=clock, sleep=clock.sleep)
    sent = 0
    for piece in (10, 10, 10, 70, 100, 300):
        sent += piece
        pacer.wait(sent)
        assert clock.now == pytest.approx(100.0 + sent / 2000.0)
    assert sent == 500 and clock.now == pytest.approx(100.25)


def test_pacer_catches_up_without_sleeping_and_no_rate_never_waits() -> None:
    clock = FakeClock()
    pacer = Pacer(1000.0, t0=clock.now, clock=clock, sleep=clock.sleep)
    clock.now += 2.0  # a stall: 2,000 messages behind
    assert pacer.wait(1500) == 0.0 and pacer.wait(2000) == 0.0
    assert clock.slept == []
    assert pacer.wait(2100) == pytest.approx(0.1)
    free = Pacer(None, t0=clock.now, clock=clock, sleep=clock.sleep)
    assert free.wait(10**9) == 0.0 and clock.slept == [pytest.approx(0.1)]
    with pytest.raises(ValueError):
        Pacer(0.0, t0=0.0)


def test_connections_pacing_together_add_up_to_the_rate() -> None:
    """Three connections on one schedule, each pacing its own share by global index: every message is
    sent at (or after) its due time, and the last one at the end of the schedule."""
    clock = FakeClock()
    rate, n, conns = 3000.0, 3000, 3
    k = piece_size(rate, conns, 997)
    assert k == 5  # 5 ms of a 1,000 msg/s share
    pacers = [Pacer(rate, t0=clock.now, clock=clock, sleep=clock.sleep) for _ in range(conns)]
    # interleave the connections' pieces in due order, as the scheduler would run them
    pieces = sorted(
        (idx[min(s + k, len(idx)) - 1] + 1, c)
        for c in range(conns)
        for idx in [list(range(c, n, conns))]
        for s in range(0, len(idx), k)
    )
    for end, c in pieces:
        pacers[c].wait(end)
        assert clock.now >= 100.0 + (end - 1) / rate
    assert clock.now == pytest.approx(101.0)


def test_piece_size_bounds() -> None:
    assert piece_size(None, 2, 10_000) == 1024
    assert piece_size(None, 2, 10_000, window=100) == 50
    assert piece_size(100.0, 2, 10_000) == 1
    assert piece_size(None, 4, 1000, unique=True) == 250  # the fewest devices a connection has
    assert piece_size(None, 4, 100, unique=True) == 25


# ---- PUBACKs --------------------------------------------------------------------------------------------


def puback(mid: int, code: int | None = None) -> bytes:
    if code is None:
        return b"\x40\x02" + struct.pack("!H", mid)
    return b"\x40\x03" + struct.pack("!H", mid) + bytes([code])


def test_scan_counts_success_acks_in_one_go() -> None:
    data = b"".join(puback(m) for m in range(1, 1001)) + b"\x40\x02\x03"
    scan = scan_acks_v5(data)
    assert (scan.consumed, scan.acked, scan.unrouted, scan.refused) == (4000, 1000, 0, Counter())
    unrouted = b"".join(puback(m, 0x10) for m in range(1, 501))
    scan = scan_acks_v5(unrouted)
    assert (scan.consumed, scan.acked, scan.unrouted) == (2500, 500, 500)


def test_scan_counts_refusals_by_reason_and_stops_at_a_disconnect() -> None:
    data = (
        puback(1)
        + puback(2, 0x87)
        + puback(3, 0x10)
        + puback(4, 0x97)
        + puback(5, 0x87)
        + b"\x40\x04\x00\x06\x00\x00"  # success with an empty property list
        + b"\xe0\x01\x93"  # DISCONNECT: receive maximum exceeded
        + puback(7)
    )
    scan = scan_acks_v5(data)
    assert scan.acked == 6
    assert scan.unrouted == 1
    assert scan.refused == Counter({0x87: 2, 0x97: 1})
    assert scan.disconnect == 0x93
    assert scan.consumed == len(data) - 4
    partial = scan_acks_v5(puback(1) + puback(2, 0x87)[:3])
    assert (partial.consumed, partial.acked) == (4, 1)


def test_reason_names() -> None:
    assert load.reason_name(0x87) == "0x87 not authorized"
    assert load.reason_name(0xFE) == "0xfe unknown reason"


# ---- configuration and CLI ------------------------------------------------------------------------------


def test_config_bounds_and_device_clock(fleet: Fleet) -> None:
    with pytest.raises(ValueError, match="messages or a duration"):
        LoadConfig(fleet=fleet, profile=Profile())
    with pytest.raises(ValueError, match="more connections than devices"):
        LoadConfig(fleet=Fleet.generate(3), profile=Profile(), connections=4, messages=1)
    cfg = LoadConfig(fleet=fleet, profile=Profile(), rate=997.0, duration_s=10, messages=50_000)
    assert cfg.limit == 9970
    assert cfg.device_interval_ms() == 1000  # each device once per round of the fleet
    assert cfg.device_start_ms(START_MS) == START_MS  # paced: device time keeps up with the clock
    fast = LoadConfig(fleet=fleet, profile=Profile(), messages=997 * 30)
    assert fast.limit == 997 * 30
    assert fast.device_start_ms(START_MS) == START_MS - 30 * 1000  # ends about now, never ahead
    assert LoadConfig(fleet=fleet, profile=Profile(), messages=1, start_ms=5).device_start_ms(0) == 5
    assert LoadConfig(fleet=fleet, profile=Profile(), messages=1, username="svc.a").client_id(2) == "svc.a.2"


def test_cli_writes_the_devices_to_register(tmp_path: Path) -> None:
    out = tmp_path / "fleet.csv"
    args = ["--devices", "50", "--mix", "streetlight=1,smoke_detector=1", "--communities", "2"]
    assert load.main([*args, "--write-devices", str(out)]) == 0
    again = Fleet.from_csv(out)
    assert len(again) == 50 and set(again.device_types) == {"streetlight", "smoke_detector"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--devices", "3", "--connections", "4", "--messages", "10"],
        ["--devices", "10"],  # neither --messages nor --duration
        ["--devices", "10", "--messages", "5", "--events", "2"],
        ["--devices", "10", "--messages", "5", "--mix", "toaster=1"],
        ["--devices", "10", "--messages", "5", "--start-ms", "17"],
    ],
)
def test_cli_refuses_bad_arguments_before_connecting(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        load.main([*argv, "--port", "1"])
    assert exc.value.code == 2
