"""Per-device state machines that produce telemetry, event and status payloads over simulated time.

Payloads are built from the thing models: a simulator can only emit fields and events its type declares
(anything else raises), and numeric values are clamped to the declared plausible range.

Each simulator is a small discrete-event machine: named timers (the periodic report, the next car,
the next door access, the next rare anomaly ...) fire in time order; each handler changes the state and
returns the messages the device would send at that moment. Continuous quantities (water level, battery,
energy) evolve only at timer times, so the output depends on the seed and the start time alone, not on
how often ``advance`` is called.

Two layers of trouble, each with its rates per device per simulated day:

- ``AnomalyRates``: things happening in the world that the device measures truthfully (a cover knocked
  askew, leakage on a pole, a burst of denied cards, a storm that floods the wells). The rules exist to
  find these.
- ``FaultRates``: the device or its network misbehaving (it drops offline, resends a message, delivers
  one late, or a faulty unit sends malformed payloads). The gateway's dedup, ordering and dead-letter
  handling exist for these. Fault timers run beside the behaviour timers on their own random stream, so
  enabling faults never changes what a device measures, and all-zero fault rates give exactly the output
  of a run without them.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal

from devices import THING_MODELS
from devices.model import Field

Kind = Literal["telemetry", "event", "status"]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
#: the communities are in China: schedules and daily rhythms run on UTC+8
LOCAL_OFFSET_MS = 8 * HOUR_MS

#: decimals kept in payloads (default 2)
_DECIMALS = {"energy_kwh": 3, "current_a": 3, "power_factor": 3, "lux": 1}

#: the payload of a device's last will (device protocol: retained on its status topic)
OFFLINE_PAYLOAD: dict[str, Any] = {"online": False}

#: the ways a faulty unit garbles a payload; each is one reason the gateway dead-letters it
MALFORMED_KINDS: tuple[str, ...] = ("not_json", "wrong_type", "out_of_range", "unknown_field")
#: what a ``Message.fault`` may say
FAULT_TAGS: tuple[str, ...] = (
    "offline",  # the device dropped off: its last will (payload {"online": false}) is due now
    "online",  # the device is back: a normal online status, after reconnecting
    "duplicate",  # the same payload (same seq and ts) again
    "late",  # held back, sent after later messages (its seq and ts are the old ones)
    *(f"malformed_{k}" for k in MALFORMED_KINDS),
)


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT publication of one device. Treat ``payload`` as read-only.

    ``fault`` says which injected fault this is (one of ``FAULT_TAGS``), None for a normal message.
    ``raw``, when set, is sent instead of the JSON of ``payload`` (a faulty unit's garbled bytes).
    """

    device_id: str
    device_type: str
    kind: Kind
    payload: dict[str, Any]
    fault: str | None = None
    raw: bytes | None = None

    @property
    def topic(self) -> str:
        return f"sc/v1/{self.device_type}/{self.device_id}/{self.kind}"

    @property
    def retain(self) -> bool:
        return self.kind == "status"

    @property
    def ts_ms(self) -> int:
        ts = self.payload.get("ts")
        return ts if isinstance(ts, int) and not isinstance(ts, bool) else 0

    @property
    def malformed(self) -> bool:
        return self.fault is not None and self.fault.startswith("malformed_")

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.payload, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class AnomalyRates:
    """How often rare things happen: expected occurrences per device per simulated day (0 = never).

    ``rain`` is the exception: storms per community per simulated day (every device of a community sees
    the same weather, so its covers flood together).
    """

    cover_tilt: float = 0.01  # a manhole cover knocked askew, or flipped
    cover_lifted: float = 0.003  # lifted off its frame or slid aside (workers, thieves), put back later
    well_gas: float = 0.002  # gas builds up in the well (CH4 in gas wells, H2S and low O2 in sewers)
    rain: float = 0.2  # storms per community per day; water rises in the wells while it rains
    lamp_fault: float = 0.005  # the lamp driver fails (reported by a lamp_fault event, or only seen in power)
    lamp_stuck_on: float = 0.002  # the relay sticks closed: the lamp burns by day until repaired
    leakage: float = 0.002  # insulation breakdown on a pole: leakage current of tens to hundreds of mA
    pole_tilt: float = 0.0005  # a pole hit by a vehicle or its footing sinking: tilt of several degrees
    emergency_call: float = 0.005  # the pole's help button
    hatch_open: float = 0.01  # maintenance opens the pole hatch (closed again later)
    door_forced_open: float = 0.02
    door_held_open: float = 0.2  # someone props a door open past its limit
    denied_burst: float = 0.05  # someone tries a refused card or code again and again (3-9 times)
    tamper: float = 0.002
    duress: float = 0.0005
    illegal_parking: float = 0.3  # a car in a fire lane / no-parking bay, per such bay
    overstay: float = 0.2  # the next car in a time-limited bay stays past the limit, per such bay
    abandoned_vehicle: float = 0.0003  # the next car in a normal bay stays 8-30 days
    smoke_alarm: float = 0.002
    detector_fault: float = 0.001  # reported with every heartbeat until serviced (then a self test)
    detector_removed: float = 0.001  # taken off its base, put back later
    self_test: float = 1 / 30  # a resident presses the test button about monthly

    @classmethod
    def none(cls) -> AnomalyRates:
        return cls.every(0.0)

    @classmethod
    def every(cls, per_day: float) -> AnomalyRates:
        """The same rate for every kind of anomaly (tests, demos)."""
        return cls(**{f.name: per_day for f in fields(cls)})

    def scaled(self, factor: float) -> AnomalyRates:
        return replace(self, **{f.name: getattr(self, f.name) * factor for f in fields(self)})


@dataclass(frozen=True)
class FaultRates:
    """Device and network faults: expected occurrences per device per simulated day (0 = never).

    - ``offline``: the device goes silent (power, radio) for ``offline_s`` (log-uniform in the range); the
      broker publishes its last will. What it measures meanwhile is lost (its seq shows the gap). Back
      online, it sends an online status and carries on.
    - ``duplicate``: the next message is sent twice (a resend after a lost PUBACK): same payload, same
      seq and ts.
    - ``late``: the next message is held back and sent after 1-3 later ones, with its own seq and ts.
    - ``faulty_unit``: the unit turns faulty for ``faulty_s``; meanwhile each message it sends is, with
      probability ``malformed_share``, malformed in one of ``MALFORMED_KINDS`` (not JSON, a field of the
      wrong type, a value out of the declared range, an undeclared field). Malformed messages are never
      also duplicated or delayed, so each injected fault is one observable thing.
    """

    offline: float = 0.02
    duplicate: float = 0.5
    late: float = 0.2
    faulty_unit: float = 0.002
    offline_s: tuple[float, float] = (300.0, 4 * 3600.0)
    faulty_s: tuple[float, float] = (1800.0, 12 * 3600.0)
    malformed_share: float = 0.5

    RATES: ClassVar[tuple[str, ...]] = ("offline", "duplicate", "late", "faulty_unit")

    def __post_init__(self) -> None:
        for name in self.RATES:
            if getattr(self, name) < 0:
                raise ValueError(f"fault rate {name} must be >= 0")
        for name in ("offline_s", "faulty_s"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi, got {(lo, hi)}")
        if not 0 <= self.malformed_share <= 1:
            raise ValueError("malformed_share must be within 0..1")

    @classmethod
    def none(cls) -> FaultRates:
        return cls.every(0.0)

    @classmethod
    def every(cls, per_day: float) -> FaultRates:
        """The same rate for every kind of fault (tests, demos); durations keep their defaults."""
        rates: dict[str, Any] = {name: per_day for name in cls.RATES}
        return cls(**rates)

    def scaled(self, factor: float) -> FaultRates:
        rates: dict[str, Any] = {name: getattr(self, name) * factor for name in self.RATES}
        return replace(self, **rates)

    @property
    def active(self) -> bool:
        return any(getattr(self, name) > 0 for name in self.RATES)


# -- time helpers -----------------------------------------------------------------------------------


def local_minute(t_ms: int) -> int:
    """Minute of the local (UTC+8) day, 0..1439."""
    return int((t_ms + LOCAL_OFFSET_MS) % DAY_MS // 60_000)


def local_hour(t_ms: int) -> float:
    """Hour of the local (UTC+8) day as a fraction, 0 <= h < 24."""
    return (t_ms + LOCAL_OFFSET_MS) % DAY_MS / HOUR_MS


def local_day(t_ms: int) -> int:
    """Number of the local (UTC+8) day since the epoch."""
    return (t_ms + LOCAL_OFFSET_MS) // DAY_MS


def next_local_minute(t_ms: int, minute: int) -> int:
    """The first instant strictly after ``t_ms`` at which the local clock shows ``minute`` (of the day)."""
    day_start = t_ms - (t_ms + LOCAL_OFFSET_MS) % DAY_MS
    at = day_start + minute * 60_000
    return at if at > t_ms else at + DAY_MS


def parse_schedule(text: str) -> tuple[int, int]:
    """ "18:00-06:00" -> (1080, 360): minutes of the local day when the lamp goes on and off."""
    try:
        on, off = text.split("-")
        (h1, m1), (h2, m2) = (map(int, on.split(":")), map(int, off.split(":")))
    except ValueError:
        raise ValueError(f"schedule {text!r} is not HH:MM-HH:MM") from None
    if not (0 <= h1 < 24 and 0 <= h2 < 24 and 0 <= m1 < 60 and 0 <= m2 < 60):
        raise ValueError(f"schedule {text!r} is not HH:MM-HH:MM")
    return h1 * 60 + m1, h2 * 60 + m2


def in_window(minute: int, on: int, off: int) -> bool:
    """Is ``minute`` inside [on, off) of a daily window that may wrap past midnight?"""
    return on <= minute < off if on <= off else minute >= on or minute < off


def next_hourly_poisson(
    rng: random.Random, t_ms: int, per_hour: Sequence[float], *, max_days: int = 60
) -> int:
    """The next event after ``t_ms`` of a Poisson process whose rate (per hour) is ``per_hour[local hour]``.

    Exact for a rate that changes by the hour: a quiet night does not push the next event past the
    morning rush. Far in the future (``max_days``) if the rates are all zero.
    """
    need = rng.expovariate(1.0)  # the process's own clock: unit-rate exponential
    t = t_ms
    for _ in range(24 * max_days):
        rate = per_hour[int(local_hour(t))] / HOUR_MS
        hour_end = t - (t + LOCAL_OFFSET_MS) % HOUR_MS + HOUR_MS
        if rate > 0 and need <= rate * (hour_end - t):
            return t + max(1, int(need / rate))
        need -= rate * (hour_end - t)
        t = hour_end
    return t


def _ou(rng: random.Random, x: float, mean: float, dt_s: float, tau_s: float, sd: float) -> float:
    """One exact step of an Ornstein-Uhlenbeck process: drifts back to ``mean``, stationary spread ``sd``."""
    a = math.exp(-dt_s / tau_s)
    return mean + (x - mean) * a + sd * math.sqrt(1 - a * a) * rng.gauss(0, 1)


def _outdoor_temp(t_ms: int) -> float:
    return 12 + 6 * math.sin(2 * math.pi * (local_hour(t_ms) - 9) / 24)  # warmest at 15:00


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


# -- the weather ------------------------------------------------------------------------------------

Spell = tuple[int, int, float]  # (start ms, end ms, rain mm/h)


class Weather:
    """Rain over one community: storms arrive ``storms_per_day`` on average, each a run of 10-30 minute
    spells of steady rain (most light to moderate, about one in four a downpour of 15-60 mm/h).

    A pure function of (seed, community, time), drawn day by day from its own random stream: every
    device of a community sees the same rain whichever order it asks in, so the covers flood together.
    Use ``Weather.shared`` to get the one instance per community.
    """

    SPELL_MIN = (10, 30)
    MAX_STORM_H = 10  # a storm is over within this many hours (so looking one day back is enough)

    def __init__(self, seed: int, community: str, storms_per_day: float) -> None:
        self.seed = seed
        self.community = community
        self.storms_per_day = storms_per_day
        self._days: dict[int, list[Spell]] = {}

    @staticmethod
    @functools.lru_cache(maxsize=512)
    def shared(seed: int, community: str, storms_per_day: float) -> Weather:
        return Weather(seed, community, storms_per_day)

    def _day(self, day: int) -> list[Spell]:
        spells = self._days.get(day)
        if spells is not None:
            return spells
        spells = []
        if self.storms_per_day > 0:
            rng = random.Random(f"weather|{self.seed}|{self.community}|{day}")
            day_start = day * DAY_MS - LOCAL_OFFSET_MS
            t = day_start + int(rng.expovariate(self.storms_per_day / DAY_MS))
            while t < day_start + DAY_MS:
                hours = min(rng.lognormvariate(math.log(1.5), 0.7), self.MAX_STORM_H)
                heavy = rng.random() < 0.25
                mean_mm_h = rng.uniform(15, 60) if heavy else rng.expovariate(1 / 4) + 0.3
                end = t + int(hours * HOUR_MS)
                at = t
                while at < end:
                    length = int(rng.uniform(*self.SPELL_MIN) * 60_000)
                    spells.append((at, min(at + length, end), mean_mm_h * rng.lognormvariate(0, 0.5)))
                    at += length
                t += int(rng.expovariate(self.storms_per_day / DAY_MS)) + 1
        self._days[day] = spells
        return spells

    def spells(self, t0_ms: int, t1_ms: int) -> list[Spell]:
        """The spells of rain that overlap [t0, t1] (overlapping storms simply add up)."""
        out: list[Spell] = []
        for day in range(local_day(t0_ms) - 1, local_day(t1_ms) + 1):
            out.extend(s for s in self._day(day) if s[0] <= t1_ms and s[1] > t0_ms)
        return out

    def rain_mm_h(self, t_ms: int) -> float:
        return sum(mm for a, b, mm in self.spells(t_ms, t_ms) if a <= t_ms < b)


def _shape(f: Field, value: Any, where: str) -> Any:
    """Make a value fit its declared field: the right Python type, inside the plausible range."""
    if f.kind is bool:
        return bool(value)
    if f.kind is str:
        if f.choices and value not in f.choices:
            raise ValueError(f"{where}: {value!r} is not one of {f.choices}")
        return str(value)
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{where}: {value!r} is not finite")
    if f.minimum is not None:
        v = max(v, f.minimum)
    if f.maximum is not None:
        v = min(v, f.maximum)
    if f.kind is int:
        return round(v)
    return round(v, _DECIMALS.get(f.name, 2))


# -- the state machines -----------------------------------------------------------------------------


class DeviceSim:
    """Base of the per-type simulators: timers, seq, battery and radio, payload shaping, faults.

    A subclass sets ``device_type``, sets up its state in ``_setup``, evolves continuous state in
    ``_evolve_state``, says what it measures in ``read`` and adds ``_on_<timer>`` handlers. Fault timers
    (``_fault_<timer>``) are kept apart: they never evolve the state nor draw from the behaviour's random
    stream, and what the handlers send passes through ``_wire`` (offline, duplicate, late, malformed).
    """

    device_type: ClassVar[str]
    battery_drain_pct_per_day: ClassVar[float] = 0.0
    firmware: ClassVar[tuple[str, ...]] = ("1.0.0",)

    def __init__(
        self,
        row: Mapping[str, Any],
        *,
        start_ms: int,
        seed: int = 0,
        report_interval_s: float | None = None,
        jitter: float = 0.1,
        anomalies: AnomalyRates | None = None,
        faults: FaultRates | None = None,
        weather: Weather | None = None,
    ) -> None:
        if row.get("device_type") != self.device_type:
            got = row.get("device_type")
            raise ValueError(f"{row.get('device_id')}: a {self.device_type} simulator got a {got}")
        self.device_id: str = str(row["device_id"])
        self.row = row
        self.model = THING_MODELS[self.device_type]
        self.attributes: dict[str, Any] = dict(row.get("attributes") or {})
        self.rng = random.Random(f"device|{seed}|{self.device_id}")
        self.rates = anomalies if anomalies is not None else AnomalyRates()
        community = f"{row.get('street') or ''}|{row.get('community') or ''}"
        self.weather = weather if weather is not None else Weather.shared(seed, community, self.rates.rain)
        interval_s = report_interval_s if report_interval_s is not None else self.model.report_interval_s
        if interval_s <= 0:
            raise ValueError(f"report interval must be > 0, got {interval_s}")
        self.interval_ms = int(interval_s * 1000)
        self.jitter = min(max(jitter, 0.0), 0.9)
        self.seq = 0
        self.now_ms = start_ms
        self.fw = self.rng.choice(self.firmware)
        self.battery_pct = self.rng.uniform(17, 24) if self.rng.random() < 0.05 else self.rng.uniform(40, 100)
        self._rssi_base = self.rng.uniform(-108, -75)
        self._timers: dict[str, int] = {}
        self._setup(start_ms)
        # devices report once soon after power-on, then on their interval
        self._timers["report"] = start_ms + int(self.rng.uniform(0, min(self.interval_ms, 10_000)))
        self._setup_faults(seed, faults if faults is not None else FaultRates.none(), start_ms)

    # -- driving ------------------------------------------------------------------------------------

    @property
    def next_due_ms(self) -> int:
        """When the next thing happens to this device (its next report at the latest)."""
        due = min(self._timers.values())
        return min(due, *self._fault_timers.values()) if self._fault_timers else due

    def advance(self, until_ms: int) -> list[Message]:
        """Run every timer due at or before ``until_ms``; the messages sent meanwhile, in time order."""
        out: list[Message] = []
        faults = self._fault_timers
        while True:
            name, due = min(self._timers.items(), key=lambda kv: (kv[1], kv[0]))
            if faults:
                fname, fdue = min(faults.items(), key=lambda kv: (kv[1], kv[0]))
                if fdue <= due and fdue <= until_ms:  # on a tie the fault comes first
                    del faults[fname]
                    out.extend(getattr(self, f"_fault_{fname}")(fdue))
                    continue
            if due > until_ms:
                return out
            del self._timers[name]
            self._evolve(due)
            sent = getattr(self, f"_on_{name}")(due)
            out.extend(self._wire(sent) if self._wiring else sent)

    def status(self, t_ms: int, *, online: bool = True) -> Message:
        payload = {"online": online, "fw": self.fw, "ts": t_ms, "seq": self._next_seq()}
        return Message(self.device_id, self.device_type, "status", payload)

    # -- hooks --------------------------------------------------------------------------------------

    def _setup(self, t_ms: int) -> None:
        """Initial state and timers (other than the report timer)."""

    def _evolve_state(self, t_ms: int, dt_s: float) -> None:
        """Advance continuous state by ``dt_s`` seconds to ``t_ms``."""

    def read(self, t_ms: int) -> dict[str, Any]:
        """What the device measures now: telemetry field -> value."""
        raise NotImplementedError

    def _on_report(self, t_ms: int) -> list[Message]:
        self._schedule_report(t_ms)
        return [self._telemetry(t_ms)]

    # -- helpers ------------------------------------------------------------------------------------

    def _evolve(self, t_ms: int) -> None:
        dt_s = (t_ms - self.now_ms) / 1000
        if dt_s <= 0:
            return
        self.battery_pct = max(self.battery_pct - self.battery_drain_pct_per_day * dt_s / 86_400, 0.0)
        self._evolve_state(t_ms, dt_s)
        self.now_ms = t_ms

    def _schedule_report(self, t_ms: int) -> None:
        factor = self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        self._timers["report"] = t_ms + max(1, int(self.interval_ms * factor))

    def _poisson(self, name: str, per_day: float, t_ms: int) -> None:
        """Arm timer ``name`` for the next occurrence of something that happens ``per_day`` times a day."""
        if per_day > 0:
            self._timers[name] = t_ms + max(1, int(self.rng.expovariate(per_day / DAY_MS)))
        else:
            self._timers.pop(name, None)

    def _poisson_hourly(self, name: str, per_day: float, t_ms: int, weights: Sequence[float]) -> None:
        """Like ``_poisson``, but more likely in the hours with more weight (same ``per_day`` overall)."""
        if per_day > 0:
            mean = sum(weights) / len(weights)
            per_hour = [per_day / 24 * w / mean for w in weights]
            self._timers[name] = next_hourly_poisson(self.rng, t_ms, per_hour)
        else:
            self._timers.pop(name, None)

    def _after(self, name: str, t_ms: int, lo_s: float, hi_s: float) -> None:
        self._timers[name] = t_ms + max(1, int(self.rng.uniform(lo_s, hi_s) * 1000))

    def _next_seq(self) -> int:
        seq = self.seq
        self.seq += 1
        return seq

    def _battery(self) -> float:
        return self.battery_pct + self.rng.gauss(0, 0.1)

    def _rssi(self, offset: float = 0.0) -> float:
        return self._rssi_base + offset + self.rng.gauss(0, 2)

    def _telemetry(self, t_ms: int, values: Mapping[str, Any] | None = None) -> Message:
        values = self.read(t_ms) if values is None else values
        payload: dict[str, Any] = {"ts": t_ms, "seq": self._next_seq()}
        for name, value in values.items():
            f = self.model.fields_by_name.get(name)
            if f is None:
                raise KeyError(f"{self.device_type} declares no telemetry field {name!r}")
            payload[name] = _shape(f, value, f"{self.device_id}.{name}")
        return Message(self.device_id, self.device_type, "telemetry", payload)

    def _event(self, t_ms: int, name: str, **extra: Any) -> Message:
        ev = self.model.events_by_name.get(name)
        if ev is None:
            raise KeyError(f"{self.device_type} declares no event {name!r}")
        declared = {f.name: f for f in ev.fields}
        payload: dict[str, Any] = {"ts": t_ms, "seq": self._next_seq(), "event": name}
        for key, value in extra.items():
            if key not in declared:
                raise KeyError(f"{self.device_type} event {name} declares no field {key!r}")
            if value is not None:
                payload[key] = _shape(declared[key], value, f"{self.device_id}.{name}.{key}")
        return Message(self.device_id, self.device_type, "event", payload)

    # -- faults -------------------------------------------------------------------------------------

    def _setup_faults(self, seed: int, faults: FaultRates, t_ms: int) -> None:
        self.faults = faults
        self.frng = random.Random(f"faults|{seed}|{self.device_id}")  # never the behaviour's stream
        self._fault_timers: dict[str, int] = {}
        self._wiring = faults.active
        self.offline = False
        self.unit_faulty = False
        self._dup_pending = False
        self._late_pending = False
        self._held: list[Message] | None = None
        self._held_for = 0
        #: what the fault layer did: offline, online, lost (sent while offline), duplicate, late, malformed_*
        self.fault_counts: Counter[str] = Counter()
        for name in FaultRates.RATES:
            self._fault_poisson(name, getattr(faults, name), t_ms)

    def _fault_poisson(self, name: str, per_day: float, t_ms: int) -> None:
        if per_day > 0:
            self._fault_timers[name] = t_ms + max(1, int(self.frng.expovariate(per_day / DAY_MS)))

    def _fault_offline(self, t_ms: int) -> list[Message]:
        self.offline = True
        self.fault_counts["offline"] += 1
        away_s = _log_uniform(self.frng, *self.faults.offline_s)
        self._fault_timers["back_online"] = t_ms + max(1, int(away_s * 1000))
        return [Message(self.device_id, self.device_type, "status", dict(OFFLINE_PAYLOAD), fault="offline")]

    def _fault_back_online(self, t_ms: int) -> list[Message]:
        self.offline = False
        self.fault_counts["online"] += 1
        self._fault_poisson("offline", self.faults.offline, t_ms)
        return [replace(self.status(t_ms), fault="online")]

    def _fault_duplicate(self, t_ms: int) -> list[Message]:
        self._dup_pending = True
        self._fault_poisson("duplicate", self.faults.duplicate, t_ms)
        return []

    def _fault_late(self, t_ms: int) -> list[Message]:
        self._late_pending = True
        self._fault_poisson("late", self.faults.late, t_ms)
        return []

    def _fault_faulty_unit(self, t_ms: int) -> list[Message]:
        self.unit_faulty = True
        faulty_s = self.frng.uniform(*self.faults.faulty_s)
        self._fault_timers["unit_repaired"] = t_ms + max(1, int(faulty_s * 1000))
        return []

    def _fault_unit_repaired(self, t_ms: int) -> list[Message]:
        self.unit_faulty = False
        self._fault_poisson("faulty_unit", self.faults.faulty_unit, t_ms)
        return []

    def _wire(self, messages: list[Message]) -> list[Message]:
        """What actually goes out of what the device meant to send, given its current faults."""
        out: list[Message] = []
        for m in messages:
            if self.offline:
                self.fault_counts["lost"] += 1
                continue
            if self.unit_faulty and self.frng.random() < self.faults.malformed_share:
                bad = self._malform(m)
                self.fault_counts[str(bad.fault)] += 1
                out.append(bad)
                continue
            batch = [m]
            if self._dup_pending:
                self._dup_pending = False
                batch.append(replace(m, fault="duplicate"))
            if self._late_pending and self._held is None:
                self._late_pending = False
                self._held = [replace(m, fault="late"), *batch[1:]]
                self._held_for = self.frng.randint(1, 3)
                continue
            out.extend(batch)
            if self._held is not None:
                self._held_for -= 1
                if self._held_for <= 0:
                    out.extend(self._held)
                    self._held = None
        for m in out:  # counted as they go out (a message still held back has not happened yet)
            if m.fault == "duplicate" or m.fault == "late":
                self.fault_counts[m.fault] += 1
        return out

    @property
    def held_back(self) -> list[Message]:
        """What the device holds back to send late (and never will, if the run ends first)."""
        return list(self._held or ())

    def _malform(self, m: Message) -> Message:
        """The message as a faulty unit sends it: broken in exactly one way."""
        r = self.frng
        kind = r.choice(MALFORMED_KINDS)
        tag = f"malformed_{kind}"
        if kind == "not_json":
            data = m.encode()
            if r.random() < 0.7:  # a frame cut short
                raw = data[: r.randint(1, len(data) - 1)]
            else:  # radio noise (0xff is never valid UTF-8)
                raw = b"\xff" + r.randbytes(r.randint(4, 40))
            return replace(m, raw=raw, fault=tag)
        payload = dict(m.payload)
        if m.kind == "event":
            declared = {f.name: f for f in self.model.events_by_name[payload["event"]].fields}
        else:
            declared = dict(self.model.fields_by_name)
        if kind == "wrong_type":
            numbers = (bool, int, float)
            keys = [k for k, v in payload.items() if k not in ("ts", "event") and isinstance(v, numbers)]
            key = r.choice(keys)  # seq at least
            v = payload[key]
            payload[key] = ("true" if v else "false") if isinstance(v, bool) else str(v)
        elif kind == "out_of_range":
            keys = [
                k
                for k, v in payload.items()
                if k in declared
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and (declared[k].minimum is not None or declared[k].maximum is not None)
            ]
            if keys:
                f = declared[r.choice(keys)]
                if f.maximum is not None:
                    value = f.maximum + max(abs(f.maximum), 1.0) * r.uniform(0.1, 2.0)
                else:
                    assert f.minimum is not None
                    value = f.minimum - max(abs(f.minimum), 1.0) * r.uniform(0.1, 2.0)
                payload[f.name] = round(value, 2)
            else:
                payload["seq"] = -1 - r.randint(0, 99)
        else:  # unknown_field: a vendor's typo or debug output
            names = [n for n in ("err_code", "bat", "rssi", "temp", "raw_adc") if n not in declared]
            payload[r.choice(names)] = r.randint(0, 4095)
        return replace(m, payload=payload, fault=tag)


class ManholeCoverSim(DeviceSim):
    """Sits still: tilt near its installed baseline with sensor noise, clean air in the well, and the water
    level (the distance from the cover down to the water) drifting slowly, until it rains.

    Rain (the community's ``Weather``) fills the well: storm drains most (0103), sewers (0102) less, water
    and gas wells hardly; low-lying wells more than others. The water drains away over a few hours. The
    device samples the water every 10 minutes and reports at once when it moved by 20 cm or crossed its
    50 cm alarm level, so a flood shows within minutes, not at the next hourly report.

    Anomalies: ``cover_tilt`` (knocked askew, sometimes flipped), ``cover_lifted`` (off its frame, barely
    tilted), ``well_gas`` (gas in the well for hours); each reported at once and put right later.
    """

    device_type = "manhole_cover"
    battery_drain_pct_per_day = 0.03
    firmware = ("3.2.1", "3.2.4")
    #: cm of water rise per mm of rain, by the cover's owner class
    RAIN_GAIN: ClassVar[dict[str, float]] = {"0103": 5.0, "0102": 3.0, "0101": 0.6, "0111": 0.4}
    WATER_CHECK_S = 600
    WATER_ALARM_CM = 50.0
    WATER_REPORT_STEP_CM = 20.0

    def _setup(self, t_ms: int) -> None:
        self.baseline = float(self.attributes.get("tilt_baseline_deg", 0.0))
        self.depth_cm = float(self.attributes.get("depth_cm", 200.0))
        self.owner = str(self.attributes.get("owner_class", "0102"))
        self.water_mean = self.depth_cm * self.rng.uniform(0.55, 0.85)
        self.water_cm = self.water_mean + self.rng.gauss(0, 5)
        self.tilt = self.baseline
        self.cover_open = False
        self._poisson("cover_tilt", self.rates.cover_tilt, t_ms)
        # rain and gas: set up after the original draws, so a cover without them behaves as it always did
        self.flood_cm = 0.0
        self.gain = self.RAIN_GAIN.get(self.owner, 2.0) * self.rng.uniform(0.5, 1.6)
        self.drain_tau_ms = self.rng.uniform(1.5, 4.0) * HOUR_MS
        self.gas: dict[str, float] = {}
        self._reported_water: float | None = None
        self._poisson("cover_lifted", self.rates.cover_lifted, t_ms)
        self._poisson("well_gas", self.rates.well_gas, t_ms)
        if self.rates.rain > 0:
            self._after("water_check", t_ms, 1, self.WATER_CHECK_S)

    def _evolve_state(self, t_ms: int, dt_s: float) -> None:
        self.water_cm = _ou(self.rng, self.water_cm, self.water_mean, dt_s, tau_s=12 * 3600, sd=8)
        if self.rates.rain > 0:
            self._flood(self.now_ms, t_ms)

    def _flood(self, t0: int, t1: int) -> None:
        """Exact: inflow ∝ rain (piecewise constant), outflow ∝ the water above normal (time constant τ)."""
        tau = self.drain_tau_ms
        flood = self.flood_cm * math.exp(-(t1 - t0) / tau)
        for a, b, mm_h in self.weather.spells(t0, t1):
            a, b = max(a, t0), min(b, t1)
            if b > a:
                mm_per_ms = mm_h / HOUR_MS
                flood += self.gain * mm_per_ms * tau * (math.exp(-(t1 - b) / tau) - math.exp(-(t1 - a) / tau))
        self.flood_cm = flood

    def water_level_cm(self) -> float:
        """Distance from the cover down to the water now (0: the water is at the cover)."""
        return max(min(self.water_cm, self.depth_cm) - self.flood_cm, 0.0)

    def read(self, t_ms: int) -> dict[str, Any]:
        r = self.rng
        water = self.water_level_cm()
        self._reported_water = water
        gas = self.gas
        return {
            "tilt_deg": abs(self.tilt + r.gauss(0, 0.15)),
            "cover_open": self.cover_open,
            "water_level_cm": water,
            "ch4_lel_pct": abs(r.gauss(0.3, 0.3)) + gas.get("ch4_lel_pct", 0.0),
            "h2s_ppm": abs(r.gauss(0.1, 0.1)) + gas.get("h2s_ppm", 0.0),
            "co_ppm": abs(r.gauss(0.8, 0.5)) + gas.get("co_ppm", 0.0),
            "o2_pct": r.gauss(20.9, 0.1) - gas.get("o2_drop_pct", 0.0),
            "temperature_c": 14 + 0.4 * (_outdoor_temp(t_ms) - 12) + r.gauss(0, 0.2),
            "battery_pct": self._battery(),
            "rssi_dbm": self._rssi(),
        }

    def _on_water_check(self, t_ms: int) -> list[Message]:
        self._timers["water_check"] = t_ms + self.WATER_CHECK_S * 1000
        now, last = self.water_level_cm(), self._reported_water
        if last is None:
            return []
        crossed = (now < self.WATER_ALARM_CM) != (last < self.WATER_ALARM_CM)
        if crossed or abs(now - last) >= self.WATER_REPORT_STEP_CM:
            return [self._telemetry(t_ms)]
        return []

    def _disturbed(self) -> bool:
        return self.cover_open or self.tilt != self.baseline

    def _on_cover_tilt(self, t_ms: int) -> list[Message]:
        if self._disturbed():  # already off its frame: this one does not count
            self._poisson("cover_tilt", self.rates.cover_tilt, t_ms)
            return []
        if self.rng.random() < 0.15:
            self.tilt, self.cover_open = self.rng.uniform(95, 175), True  # flipped
        else:
            self.tilt, self.cover_open = self.baseline + self.rng.uniform(12, 40), self.rng.random() < 0.4
        self._after("cover_restored", t_ms, 3600, 8 * 3600)
        return [self._telemetry(t_ms)]  # covers report a change at once, not on the hour

    def _on_cover_restored(self, t_ms: int) -> list[Message]:
        self.tilt, self.cover_open = self.baseline, False
        self._poisson("cover_tilt", self.rates.cover_tilt, t_ms)
        return [self._telemetry(t_ms)]

    def _on_cover_lifted(self, t_ms: int) -> list[Message]:
        if self._disturbed():
            self._poisson("cover_lifted", self.rates.cover_lifted, t_ms)
            return []
        self.tilt, self.cover_open = self.baseline + self.rng.uniform(0.3, 6.0), True
        self._after("cover_put_back", t_ms, 10 * 60, 6 * 3600)
        return [self._telemetry(t_ms)]

    def _on_cover_put_back(self, t_ms: int) -> list[Message]:
        self.tilt, self.cover_open = self.baseline, False
        self._poisson("cover_lifted", self.rates.cover_lifted, t_ms)
        return [self._telemetry(t_ms)]

    def _on_well_gas(self, t_ms: int) -> list[Message]:
        r = self.rng
        if self.owner == "0111":  # a leak from the gas main
            self.gas = {"ch4_lel_pct": r.uniform(12, 70)}
        elif self.owner in ("0102", "0103"):  # rotting sewage: H2S, some methane, oxygen used up
            self.gas = {
                "h2s_ppm": r.uniform(4, 40),
                "ch4_lel_pct": r.uniform(2, 30),
                "o2_drop_pct": r.uniform(0.8, 3.5),
            }
        else:  # a closed-up well: oxygen used up, now and then CO from a nearby fire or engine
            co_ppm = r.uniform(15, 200) if r.random() < 0.3 else 0.0
            self.gas = {"o2_drop_pct": r.uniform(1.0, 4.0), "co_ppm": co_ppm}
        self._after("well_vented", t_ms, 3600, 12 * 3600)
        return [self._telemetry(t_ms)]

    def _on_well_vented(self, t_ms: int) -> list[Message]:
        self.gas = {}
        self._poisson("well_gas", self.rates.well_gas, t_ms)
        return [self._telemetry(t_ms)]


class StreetlightSim(DeviceSim):
    """On by its schedule (18:00-06:00 local), dimmed to 50 % from 23:00 to 05:00, power ~ rated × dimming.

    Ambient light follows the sun, the clouds and the rain (a rainy day is darker; nights stay dark, so
    the lux and the schedule agree). Leakage sits at a few mA, a little higher while it rains (wet
    insulation). Reports on every switch.

    Anomalies: ``lamp_fault`` (the driver fails: the relay says on but the lamp draws next to nothing
    until repaired; reported by a ``lamp_fault`` event about 60 % of the time, otherwise only seen in the
    power), ``lamp_stuck_on`` (the relay sticks: lit by day until repaired), ``leakage`` (tens of mA,
    sometimes over 100), ``pole_tilt`` (3-20°, until the pole is righted days later),
    ``emergency_call``, ``hatch_open`` (maintenance, closed again within the hour).
    """

    device_type = "streetlight"
    firmware = ("2.1.7", "2.2.0")
    DIM_FROM, DIM_TO, DIM_PCT = 23 * 60, 5 * 60, 50.0
    LAMP_FAULT_EVENT_SHARE = 0.6

    def _setup(self, t_ms: int) -> None:
        self.rated_w = float(self.attributes.get("rated_power_w", 100.0))
        self.on_min, self.off_min = parse_schedule(str(self.attributes.get("schedule", "18:00-06:00")))
        self.energy_kwh = self.rng.uniform(50, 3000)
        self.voltage_base = self.rng.uniform(216, 228)
        self.leak_base = self.rng.uniform(1, 6)
        self.tilt_base = self.rng.uniform(0.1, 1.2)
        self.cloud = self.rng.uniform(0.4, 1.0)
        self.faulty = False
        self.stuck_on = False
        self.leak_fault_ma = 0.0
        self.tilt_fault_deg = 0.0
        self.lamp_on, self.dimming = self._scheduled(t_ms)
        self._timers["switch"] = self._next_boundary(t_ms)
        self._poisson("lamp_fault", self.rates.lamp_fault, t_ms)
        self._poisson("emergency_call", self.rates.emergency_call, t_ms)
        self._poisson("hatch_open", self.rates.hatch_open, t_ms)
        self._poisson("lamp_stuck_on", self.rates.lamp_stuck_on, t_ms)
        self._poisson("leakage", self.rates.leakage, t_ms)
        self._poisson("pole_tilt", self.rates.pole_tilt, t_ms)

    def _scheduled(self, t_ms: int) -> tuple[bool, float]:
        m = local_minute(t_ms)
        if not in_window(m, self.on_min, self.off_min):
            return (True, 100.0) if self.stuck_on else (False, 0.0)
        return True, self.DIM_PCT if in_window(m, self.DIM_FROM, self.DIM_TO) else 100.0

    def _next_boundary(self, t_ms: int) -> int:
        minutes = (self.on_min, self.off_min, self.DIM_FROM, self.DIM_TO)
        return min(next_local_minute(t_ms, m) for m in minutes)

    def _mean_power_w(self) -> float:
        return self.rated_w * self.dimming / 100 if self.lamp_on and not self.faulty else 0.2

    def _evolve_state(self, t_ms: int, dt_s: float) -> None:
        self.energy_kwh += self._mean_power_w() * dt_s / 3600 / 1000
        self.cloud = min(max(_ou(self.rng, self.cloud, 0.7, dt_s, tau_s=3 * 3600, sd=0.2), 0.15), 1.0)

    def _rain(self, t_ms: int) -> float:
        return self.weather.rain_mm_h(t_ms) if self.rates.rain > 0 else 0.0

    def _lux(self, t_ms: int) -> float:
        h = local_hour(t_ms)
        sky = 60_000 * math.sin(math.pi * (h - 6) / 12) * self.cloud if 6 <= h < 18 else 0.0
        sky *= max(1 / (1 + self._rain(t_ms) / 15), 0.4)
        return max(sky, 0.0) + self.rng.uniform(0.5, 5)

    def read(self, t_ms: int) -> dict[str, Any]:
        r = self.rng
        if self.lamp_on and not self.faulty:
            power = self._mean_power_w() * r.uniform(0.97, 1.02)
        elif self.lamp_on:
            power = r.uniform(0, 2)  # the driver has failed: almost nothing flows
        else:
            power = r.uniform(0, 0.4)  # the controller's own standby draw
        voltage = self.voltage_base + r.gauss(0, 1.5)
        pf = r.uniform(0.93, 0.98) if power > 5 else r.uniform(0.3, 0.6)
        wet_ma = 4 * min(self._rain(t_ms) / 10, 1.0)
        return {
            "lamp_on": self.lamp_on,
            "dimming_pct": self.dimming,
            "voltage_v": voltage,
            "current_a": power / (voltage * pf),
            "power_w": power,
            "power_factor": pf,
            "energy_kwh": self.energy_kwh,
            "leakage_ma": abs(self.leak_base + wet_ma + self.leak_fault_ma + r.gauss(0, 0.4)),
            "pole_tilt_deg": abs(self.tilt_base + self.tilt_fault_deg + r.gauss(0, 0.03)),
            "lux": self._lux(t_ms),
        }

    def _switch_to_schedule(self, t_ms: int) -> list[Message]:
        state = self._scheduled(t_ms)
        if state == (self.lamp_on, self.dimming):
            return []
        self.lamp_on, self.dimming = state
        return [self._telemetry(t_ms)]

    def _on_switch(self, t_ms: int) -> list[Message]:
        self._timers["switch"] = self._next_boundary(t_ms)
        return self._switch_to_schedule(t_ms)

    def _on_lamp_fault(self, t_ms: int) -> list[Message]:
        self.faulty = True
        self._after("lamp_repaired", t_ms, 6 * 3600, 48 * 3600)
        if self.rng.random() < self.LAMP_FAULT_EVENT_SHARE:
            return [self._event(t_ms, "lamp_fault"), self._telemetry(t_ms)]
        return []  # the driver does not notice: only the power at the next report tells

    def _on_lamp_repaired(self, t_ms: int) -> list[Message]:
        self.faulty = False
        self._poisson("lamp_fault", self.rates.lamp_fault, t_ms)
        return [self._telemetry(t_ms)]

    def _on_lamp_stuck_on(self, t_ms: int) -> list[Message]:
        self.stuck_on = True
        self._after("relay_repaired", t_ms, 4 * 3600, 48 * 3600)
        return self._switch_to_schedule(t_ms)

    def _on_relay_repaired(self, t_ms: int) -> list[Message]:
        self.stuck_on = False
        self._poisson("lamp_stuck_on", self.rates.lamp_stuck_on, t_ms)
        return self._switch_to_schedule(t_ms)

    def _on_leakage(self, t_ms: int) -> list[Message]:
        r = self.rng
        self.leak_fault_ma = r.uniform(100, 400) if r.random() < 0.3 else r.uniform(30, 95)
        self._after("leakage_repaired", t_ms, 2 * 3600, 24 * 3600)
        return [self._telemetry(t_ms)]  # the controller's residual-current monitor reports at once

    def _on_leakage_repaired(self, t_ms: int) -> list[Message]:
        self.leak_fault_ma = 0.0
        self._poisson("leakage", self.rates.leakage, t_ms)
        return [self._telemetry(t_ms)]

    def _on_pole_tilt(self, t_ms: int) -> list[Message]:
        r = self.rng
        self.tilt_fault_deg = r.uniform(6, 20) if r.random() < 0.3 else r.uniform(3, 6)
        self._after("pole_righted", t_ms, 24 * 3600, 5 * 24 * 3600)
        return [self._telemetry(t_ms)]

    def _on_pole_righted(self, t_ms: int) -> list[Message]:
        self.tilt_fault_deg = 0.0
        self._poisson("pole_tilt", self.rates.pole_tilt, t_ms)
        return [self._telemetry(t_ms)]

    def _on_emergency_call(self, t_ms: int) -> list[Message]:
        self._poisson("emergency_call", self.rates.emergency_call, t_ms)
        return [self._event(t_ms, "emergency_call")]

    def _on_hatch_open(self, t_ms: int) -> list[Message]:
        self._after("hatch_closed", t_ms, 10 * 60, 50 * 60)
        return [self._event(t_ms, "hatch_open")]

    def _on_hatch_closed(self, t_ms: int) -> list[Message]:
        self._poisson("hatch_open", self.rates.hatch_open, t_ms)
        return [self._event(t_ms, "hatch_closed")]


class AccessControlSim(DeviceSim):
    """Residents come and go: access granted (mostly) or denied, the door opens and closes again.

    Busiest in the morning and evening, community gates twice as busy as unit doors; denials at night
    are more often "out of schedule". A door open past its ``held_open_limit_s`` reports
    ``door_held_open`` once. Anomalies: ``door_forced_open``, ``door_held_open`` (propped open),
    ``denied_burst`` (the same refused card or code tried 3-9 times, 5-45 s apart), ``tamper``,
    ``duress``.
    """

    device_type = "access_control"
    battery_drain_pct_per_day = 0.01
    firmware = ("4.0.3", "4.1.0")
    #: attempts per hour by local hour, for a unit door
    HOURLY = (1, 1, 0.5, 0.5, 0.5, 1, 4, 20, 25, 10, 8, 10, 12, 10, 8, 8, 10, 20, 25, 18, 12, 8, 4, 2)
    METHODS = ("card", "face", "qr", "password", "fingerprint", "remote", "button")
    METHOD_WEIGHTS = (35, 35, 10, 5, 5, 3, 7)
    DENY_REASONS = ("unknown_credential", "expired", "out_of_schedule", "no_permission", "mismatch")
    DENY_WEIGHTS = (40, 25, 10, 15, 10)
    NIGHT_DENY_WEIGHTS = (35, 20, 30, 10, 5)  # 23:00-06:00: schedules keep visitors and workers out
    GRANT_P = 0.94

    def _setup(self, t_ms: int) -> None:
        self.busy = 2.0 if self.row.get("building") is None else 1.0
        self.limit_ms = int(float(self.attributes.get("held_open_limit_s", 60.0)) * 1000)
        self.credentials = [f"{self.rng.getrandbits(32):08X}" for _ in range(self.rng.randint(60, 200))]
        self.door_open = False
        self.opened_at = 0
        self._burst: tuple[str, str, str, int] | None = None  # method, reason, credential, attempts left
        self._per_hour = [n * self.busy for n in self.HOURLY]
        self._next_access(t_ms)
        for name in ("door_forced_open", "door_held_open", "tamper", "duress", "denied_burst"):
            self._poisson(name, getattr(self.rates, name), t_ms)

    def _next_access(self, t_ms: int) -> None:
        self._timers["access"] = next_hourly_poisson(self.rng, t_ms, self._per_hour)

    def read(self, t_ms: int) -> dict[str, Any]:
        return {"door_open": self.door_open, "battery_pct": self._battery()}

    def _credential(self, method: str) -> str | None:
        return None if method in ("button", "remote") else self.rng.choice(self.credentials)

    def _open(self, t_ms: int, hold_lo_s: float, hold_hi_s: float) -> list[Message]:
        """The door opens now (if shut) and stays open at least as long as asked."""
        close_at = t_ms + max(1, int(self.rng.uniform(hold_lo_s, hold_hi_s) * 1000))
        self._timers["door_close"] = max(close_at, self._timers.get("door_close", 0))
        if self.door_open:
            return []
        self.door_open, self.opened_at = True, t_ms
        self._timers["held_check"] = t_ms + self.limit_ms
        return [self._telemetry(t_ms)]

    def _deny_weights(self, t_ms: int) -> tuple[int, ...]:
        h = local_hour(t_ms)
        return self.NIGHT_DENY_WEIGHTS if h >= 23 or h < 6 else self.DENY_WEIGHTS

    def _on_access(self, t_ms: int) -> list[Message]:
        self._next_access(t_ms)
        r = self.rng
        if r.random() < self.GRANT_P:
            method = r.choices(self.METHODS, self.METHOD_WEIGHTS)[0]
            self._after("door_swing", t_ms, 1, 3)
            return [self._event(t_ms, "access_granted", method=method, credential=self._credential(method))]
        method = r.choices(self.METHODS[:4], self.METHOD_WEIGHTS[:4])[0]
        reason = r.choices(self.DENY_REASONS, self._deny_weights(t_ms))[0]
        unknown = reason == "unknown_credential"
        credential = f"{r.getrandbits(32):08X}" if unknown else r.choice(self.credentials)
        return [self._event(t_ms, "access_denied", method=method, reason=reason, credential=credential)]

    def _on_door_swing(self, t_ms: int) -> list[Message]:
        return self._open(t_ms, 3, 15)

    def _on_door_close(self, t_ms: int) -> list[Message]:
        self.door_open = False
        self._timers.pop("held_check", None)
        return [self._telemetry(t_ms)]

    def _on_held_check(self, t_ms: int) -> list[Message]:
        return [self._event(t_ms, "door_held_open", open_s=(t_ms - self.opened_at) / 1000)]

    def _on_door_forced_open(self, t_ms: int) -> list[Message]:
        self._poisson("door_forced_open", self.rates.door_forced_open, t_ms)
        return [self._event(t_ms, "door_forced_open"), *self._open(t_ms, 5, 90)]

    def _on_door_held_open(self, t_ms: int) -> list[Message]:
        self._poisson("door_held_open", self.rates.door_held_open, t_ms)
        limit_s = self.limit_ms / 1000
        granted = self._event(t_ms, "access_granted", method="card", credential=self._credential("card"))
        return [granted, *self._open(t_ms, limit_s + 30, limit_s + 900)]

    def _on_denied_burst(self, t_ms: int) -> list[Message]:
        self._poisson("denied_burst", self.rates.denied_burst, t_ms)
        if self._burst is not None:
            return []
        r = self.rng
        method = r.choices(("card", "password", "face", "qr"), (50, 30, 10, 10))[0]
        reasons = ("unknown_credential", "expired", "no_permission", "mismatch")
        reason = r.choices(reasons, (45, 30, 15, 10))[0]
        unknown = reason == "unknown_credential"
        credential = f"{r.getrandbits(32):08X}" if unknown else r.choice(self.credentials)
        self._burst = (method, reason, credential, r.randint(3, 9))
        return self._on_burst_attempt(t_ms)

    def _on_burst_attempt(self, t_ms: int) -> list[Message]:
        assert self._burst is not None
        method, reason, credential, left = self._burst
        if left > 1:
            self._burst = (method, reason, credential, left - 1)
            self._after("burst_attempt", t_ms, 5, 45)
        else:
            self._burst = None
        return [self._event(t_ms, "access_denied", method=method, reason=reason, credential=credential)]

    def _on_tamper(self, t_ms: int) -> list[Message]:
        self._poisson("tamper", self.rates.tamper, t_ms)
        return [self._event(t_ms, "tamper")]

    def _on_duress(self, t_ms: int) -> list[Message]:
        self._poisson("duress", self.rates.duress, t_ms)
        return [self._event(t_ms, "duress"), *self._open(t_ms, 3, 10)]


class ParkingSensorSim(DeviceSim):
    """A bay that cars arrive at and leave; the magnetic field jumps while a car stands over the sensor.

    Arrivals at an empty bay follow the hour of the day (few at night, most in the evening). How long a
    car stays depends on when it came: arrivals in the evening stay the night and leave in the morning
    rush (around 08:00), some are short visits; daytime arrivals are errands (~25 min), visits (~2 h) or
    a working day (until 17:00-19:30). In a time-limited bay most drivers keep to the limit. Each car has
    its own magnetic signature; the empty-bay field drifts a little with the temperature. Fire-lane and
    no-parking bays stay empty except for the ``illegal_parking`` anomaly. Reports every change at once.

    Anomalies: ``overstay`` (time-limited bays: the next car stays 1.15-3 × the limit),
    ``abandoned_vehicle`` (normal bays: the next car stays 8-30 days), ``illegal_parking``.
    """

    device_type = "parking_sensor"
    battery_drain_pct_per_day = 0.02
    firmware = ("1.4.2", "1.5.0")
    #: mean minutes between arrivals at an empty bay, by local hour
    ARRIVAL_GAP_MIN = (240, 300, 300, 300, 300, 240, 150, 90, 90, 120, 120, 120,
                       120, 120, 120, 100, 80, 50, 40, 40, 50, 80, 120, 180)  # fmt: skip

    def _setup(self, t_ms: int) -> None:
        self.kind = str(self.attributes.get("bay_kind", "normal"))
        self.legal = self.kind in ("normal", "time_limited")
        self.limit_min = float(self.attributes.get("time_limit_min", 120.0))
        r = self.rng
        self.base = (r.uniform(-30, 30), r.uniform(-50, 50), r.uniform(20, 60))
        self.car = (0.0, 0.0, 0.0)
        self.occupied = False
        self.arrived_at = 0
        self._overstay_next = False
        self._abandon_next = False
        self._arrival_per_hour = [60 / gap for gap in self.ARRIVAL_GAP_MIN]
        if self.legal:
            h = local_hour(t_ms)
            if r.random() < (0.8 if h >= 20 or h < 7 else 0.4):
                self._arrive(t_ms)
            else:
                self._next_arrival(t_ms)
            if self.kind == "time_limited":
                self._poisson("overstay", self.rates.overstay, t_ms)
            else:
                self._poisson("abandoned_vehicle", self.rates.abandoned_vehicle, t_ms)
        else:
            self._poisson("illegal_parking", self.rates.illegal_parking, t_ms)

    def _stay_min(self, t_ms: int) -> float:
        r = self.rng
        h = local_hour(t_ms)
        if self._abandon_next:
            self._abandon_next = False
            return r.uniform(8, 30) * 24 * 60
        if self.kind == "time_limited":
            if self._overstay_next:
                self._overstay_next = False
                return self.limit_min * r.uniform(1.15, 3.0)
            return min(r.lognormvariate(math.log(0.4 * self.limit_min), 0.6), 0.95 * self.limit_min)
        if h >= 17 or h < 5:
            if r.random() < 0.15:
                return min(r.lognormvariate(math.log(90), 0.6), 240)  # a visit, gone by bedtime
            # home for the night: off again in the morning rush
            leave = min(max(r.gauss(8.0, 0.75), 5.5), 11.0)
            return (next_local_minute(t_ms, int(leave * 60)) - t_ms) / 60_000
        u = r.random()
        if u < 0.5:
            return r.lognormvariate(math.log(25), 0.8)  # an errand
        if u < 0.85 or h >= 15:
            return r.lognormvariate(math.log(120), 0.5)  # a visit
        leave = r.uniform(17.0, 19.5)  # a working day
        return (next_local_minute(t_ms, int(leave * 60)) - t_ms) / 60_000

    def _arrive(self, t_ms: int) -> None:
        r = self.rng
        self.occupied = True
        self.arrived_at = t_ms
        self.car = (r.uniform(-60, 60), r.uniform(-60, 60), r.uniform(80, 300))
        self._timers["departure"] = t_ms + int(max(self._stay_min(t_ms), 2) * 60_000)

    def _next_arrival(self, t_ms: int) -> None:
        self._timers["arrival"] = next_hourly_poisson(self.rng, t_ms, self._arrival_per_hour)

    def read(self, t_ms: int) -> dict[str, Any]:
        r = self.rng
        temp = _outdoor_temp(t_ms) + (4 if self.occupied else 0) + r.gauss(0, 0.3)
        drift = 0.05 * (temp - 12)  # the magnetometer's temperature coefficient
        return {
            "occupied": self.occupied,
            "mag_x": self.base[0] + self.car[0] + drift + r.gauss(0, 0.6),
            "mag_y": self.base[1] + self.car[1] + drift + r.gauss(0, 0.6),
            "mag_z": self.base[2] + self.car[2] + drift + r.gauss(0, 0.6),
            "temperature_c": temp,
            "battery_pct": self._battery(),
            "rssi_dbm": self._rssi(-6 if self.occupied else 0),  # a car over the sensor damps the radio
        }

    def _leave(self) -> None:
        self.occupied = False
        self.car = (0.0, 0.0, 0.0)

    def _on_arrival(self, t_ms: int) -> list[Message]:
        self._arrive(t_ms)
        return [self._telemetry(t_ms)]

    def _on_departure(self, t_ms: int) -> list[Message]:
        self._leave()
        self._next_arrival(t_ms)
        return [self._telemetry(t_ms)]

    def _on_overstay(self, t_ms: int) -> list[Message]:
        self._overstay_next = True  # the next driver ignores the limit
        self._poisson("overstay", self.rates.overstay, t_ms)
        return []

    def _on_abandoned_vehicle(self, t_ms: int) -> list[Message]:
        self._abandon_next = True
        self._poisson("abandoned_vehicle", self.rates.abandoned_vehicle, t_ms)
        return []

    def _on_illegal_parking(self, t_ms: int) -> list[Message]:
        r = self.rng
        self.occupied = True
        self.arrived_at = t_ms
        self.car = (r.uniform(-60, 60), r.uniform(-60, 60), r.uniform(80, 300))
        self._after("illegal_departure", t_ms, 5 * 60, 60 * 60)
        return [self._telemetry(t_ms)]

    def _on_illegal_departure(self, t_ms: int) -> list[Message]:
        self._leave()
        self._poisson("illegal_parking", self.rates.illegal_parking, t_ms)
        return [self._telemetry(t_ms)]


class SmokeDetectorSim(DeviceSim):
    """Heartbeats with a clean-air reading; the battery drains slowly (a 10-year cell: 0.01 %/day), and
    each alarm (the sounder) and self test costs a little more. ``low_battery`` once a day while the
    battery is under 20 %.

    Anomalies: ``smoke_alarm`` (most likely at cooking times; alarm and smoke rise, maybe silenced,
    cleared after minutes; now and then hot enough to confirm a fire), ``detector_fault`` (a dirty
    chamber: a ``fault`` event, repeated with every heartbeat until serviced 1-14 days later, which ends
    with a ``self_test``), ``detector_removed`` (and put back), ``self_test``.
    """

    device_type = "smoke_detector"
    battery_drain_pct_per_day = 0.01
    firmware = ("5.0.1", "5.0.2")
    LOW_BATTERY_PCT = 20.0
    #: relative likelihood of a smoke alarm by local hour: breakfast, lunch and dinner
    ALARM_WEIGHTS = (0.3, 0.2, 0.2, 0.2, 0.2, 0.3, 0.8, 1.5, 1.0, 0.6, 0.8, 2.2,
                     2.0, 0.8, 0.6, 0.6, 0.8, 2.2, 2.6, 1.8, 1.0, 0.8, 0.6, 0.4)  # fmt: skip

    def _setup(self, t_ms: int) -> None:
        self.alarm = False
        self.smoke = 0.0
        self.heat = 0.0
        self.smoke_base = self.rng.uniform(0.0, 0.1)
        self.room_temp = self.rng.uniform(18, 24)
        self.low_battery_at: int | None = None
        self.fault = False
        self._poisson_hourly("smoke_alarm", self.rates.smoke_alarm, t_ms, self.ALARM_WEIGHTS)
        for name in ("detector_fault", "detector_removed", "self_test"):
            self._poisson(name, getattr(self.rates, name), t_ms)

    def read(self, t_ms: int) -> dict[str, Any]:
        r = self.rng
        smoke = self.smoke if self.alarm else self.smoke_base
        daily = 1.5 * math.sin(2 * math.pi * (local_hour(t_ms) - 9) / 24)
        return {
            "alarm": self.alarm,
            "smoke_obscuration_pct_m": abs(smoke + r.gauss(0, 0.02)),
            "temperature_c": self.room_temp + daily + self.heat + r.gauss(0, 0.2),
            "battery_pct": self._battery(),
            "rssi_dbm": self._rssi(),
        }

    def _on_report(self, t_ms: int) -> list[Message]:
        out = super()._on_report(t_ms)
        low = self.battery_pct < self.LOW_BATTERY_PCT
        if low and (self.low_battery_at is None or t_ms - self.low_battery_at >= DAY_MS):
            self.low_battery_at = t_ms
            out.append(self._event(t_ms, "low_battery"))
        if self.fault:
            out.append(self._event(t_ms, "fault"))
        return out

    def _spend(self, pct: float) -> None:
        self.battery_pct = max(self.battery_pct - pct, 0.0)

    def _on_smoke_alarm(self, t_ms: int) -> list[Message]:
        r = self.rng
        self.alarm = True
        self.smoke = r.uniform(3, 15)
        self.heat = r.uniform(40, 70) if r.random() < 0.1 else r.uniform(0, 3)
        self._after("alarm_cleared", t_ms, 120, 900)
        if r.random() < 0.5:
            self._after("silenced", t_ms, 20, 100)
        return [self._event(t_ms, "smoke_alarm"), self._telemetry(t_ms)]

    def _on_silenced(self, t_ms: int) -> list[Message]:
        return [self._event(t_ms, "silenced")]

    def _on_alarm_cleared(self, t_ms: int) -> list[Message]:
        self.alarm, self.smoke, self.heat = False, 0.0, 0.0
        self._spend(self.rng.uniform(0.3, 1.0))  # minutes of sounder
        self._timers.pop("silenced", None)
        self._poisson_hourly("smoke_alarm", self.rates.smoke_alarm, t_ms, self.ALARM_WEIGHTS)
        return [self._event(t_ms, "alarm_cleared"), self._telemetry(t_ms)]

    def _on_detector_fault(self, t_ms: int) -> list[Message]:
        self.fault = True
        self._after("detector_serviced", t_ms, 24 * 3600, 14 * 24 * 3600)
        return [self._event(t_ms, "fault")]

    def _on_detector_serviced(self, t_ms: int) -> list[Message]:
        self.fault = False
        self._poisson("detector_fault", self.rates.detector_fault, t_ms)
        self._spend(0.05)
        return [self._event(t_ms, "self_test")]  # the technician tests it after cleaning

    def _on_detector_removed(self, t_ms: int) -> list[Message]:
        self._after("detector_installed", t_ms, 10 * 60, 24 * 3600)
        return [self._event(t_ms, "removed")]

    def _on_detector_installed(self, t_ms: int) -> list[Message]:
        self._poisson("detector_removed", self.rates.detector_removed, t_ms)
        return [self._event(t_ms, "installed")]

    def _on_self_test(self, t_ms: int) -> list[Message]:
        self._poisson("self_test", self.rates.self_test, t_ms)
        self._spend(0.05)
        return [self._event(t_ms, "self_test")]


#: the simulator of each device type, listed explicitly
SIMULATORS: dict[str, type[DeviceSim]] = {
    cls.device_type: cls
    for cls in (ManholeCoverSim, StreetlightSim, AccessControlSim, ParkingSensorSim, SmokeDetectorSim)
}


def make_simulator(
    row: Mapping[str, Any],
    *,
    start_ms: int,
    seed: int = 0,
    report_interval_s: float | None = None,
    jitter: float = 0.1,
    anomalies: AnomalyRates | None = None,
    faults: FaultRates | None = None,
    weather: Weather | None = None,
) -> DeviceSim:
    """The simulator for one registration row. ``report_interval_s`` None: the thing model's interval.

    ``faults`` None: none. ``weather`` None: the community's (shared by every device of the same seed,
    street and community).
    """
    cls = SIMULATORS.get(str(row.get("device_type")))
    if cls is None:
        raise ValueError(f"{row.get('device_id')}: no simulator for device type {row.get('device_type')!r}")
    return cls(
        row,
        start_ms=start_ms,
        seed=seed,
        report_interval_s=report_interval_s,
        jitter=jitter,
        anomalies=anomalies,
        faults=faults,
        weather=weather,
    )


def iter_messages(sims: Iterable[DeviceSim], until_ms: int) -> Iterator[Message]:
    """Every message the devices send up to ``until_ms``, across devices in time order (no waiting)."""
    heap = [(s.next_due_ms, i, s) for i, s in enumerate(sims)]
    heapq.heapify(heap)
    while heap and heap[0][0] <= until_ms:
        due, i, sim = heapq.heappop(heap)
        yield from sim.advance(due)
        heapq.heappush(heap, (sim.next_due_ms, i, sim))
