"""Per-device state machines that produce telemetry, event and status payloads over simulated time.

Payloads are built from the thing models: a simulator can only emit fields and events its type declares
(anything else raises), and numeric values are clamped to the declared plausible range.

Each simulator is a small discrete-event machine: named timers (the periodic report, the next car,
the next door access, the next rare anomaly ...) fire in time order; each handler changes the state and
returns the messages the device would send at that moment. Continuous quantities (water level, battery,
energy) evolve only at timer times, so the output depends on the seed and the start time alone, not on
how often ``advance`` is called.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping
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


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT publication of one device. Treat ``payload`` as read-only."""

    device_id: str
    device_type: str
    kind: Kind
    payload: dict[str, Any]

    @property
    def topic(self) -> str:
        return f"sc/v1/{self.device_type}/{self.device_id}/{self.kind}"

    @property
    def retain(self) -> bool:
        return self.kind == "status"

    @property
    def ts_ms(self) -> int:
        ts = self.payload.get("ts")
        return ts if isinstance(ts, int) else 0

    def encode(self) -> bytes:
        return json.dumps(self.payload, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class AnomalyRates:
    """How often rare things happen: expected occurrences per device per simulated day (0 = never)."""

    cover_tilt: float = 0.01  # a manhole cover knocked askew, lifted or flipped
    lamp_fault: float = 0.005
    emergency_call: float = 0.005  # the pole's help button
    hatch_open: float = 0.01  # maintenance opens the pole hatch (closed again later)
    door_forced_open: float = 0.02
    door_held_open: float = 0.2  # someone props a door open past its limit
    tamper: float = 0.002
    duress: float = 0.0005
    illegal_parking: float = 0.3  # a car in a fire lane / no-parking bay, per such bay
    smoke_alarm: float = 0.002
    detector_fault: float = 0.001
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


# -- time helpers -----------------------------------------------------------------------------------


def local_minute(t_ms: int) -> int:
    """Minute of the local (UTC+8) day, 0..1439."""
    return int((t_ms + LOCAL_OFFSET_MS) % DAY_MS // 60_000)


def local_hour(t_ms: int) -> float:
    """Hour of the local (UTC+8) day as a fraction, 0 <= h < 24."""
    return (t_ms + LOCAL_OFFSET_MS) % DAY_MS / HOUR_MS


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


def _ou(rng: random.Random, x: float, mean: float, dt_s: float, tau_s: float, sd: float) -> float:
    """One exact step of an Ornstein-Uhlenbeck process: drifts back to ``mean``, stationary spread ``sd``."""
    a = math.exp(-dt_s / tau_s)
    return mean + (x - mean) * a + sd * math.sqrt(1 - a * a) * rng.gauss(0, 1)


def _outdoor_temp(t_ms: int) -> float:
    return 12 + 6 * math.sin(2 * math.pi * (local_hour(t_ms) - 9) / 24)  # warmest at 15:00


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
    """Base of the per-type simulators: timers, seq, battery and radio, payload shaping.

    A subclass sets ``device_type``, sets up its state in ``_setup``, evolves continuous state in
    ``_evolve_state``, says what it measures in ``read`` and adds ``_on_<timer>`` handlers.
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

    # -- driving ------------------------------------------------------------------------------------

    @property
    def next_due_ms(self) -> int:
        """When the next thing happens to this device (its next report at the latest)."""
        return min(self._timers.values())

    def advance(self, until_ms: int) -> list[Message]:
        """Run every timer due at or before ``until_ms``; the messages sent meanwhile, in time order."""
        out: list[Message] = []
        while True:
            name, due = min(self._timers.items(), key=lambda kv: (kv[1], kv[0]))
            if due > until_ms:
                return out
            del self._timers[name]
            self._evolve(due)
            out.extend(getattr(self, f"_on_{name}")(due))

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


class ManholeCoverSim(DeviceSim):
    """Sits still: tilt near its installed baseline, water level drifting slowly, clean air in the well.

    Anomaly ``cover_tilt``: the cover is knocked askew (sometimes lifted, rarely flipped) and reports at
    once; it is put right some hours later.
    """

    device_type = "manhole_cover"
    battery_drain_pct_per_day = 0.03
    firmware = ("3.2.1", "3.2.4")

    def _setup(self, t_ms: int) -> None:
        self.baseline = float(self.attributes.get("tilt_baseline_deg", 0.0))
        self.depth_cm = float(self.attributes.get("depth_cm", 200.0))
        self.water_mean = self.depth_cm * self.rng.uniform(0.55, 0.85)
        self.water_cm = self.water_mean + self.rng.gauss(0, 5)
        self.tilt = self.baseline
        self.cover_open = False
        self._poisson("cover_tilt", self.rates.cover_tilt, t_ms)

    def _evolve_state(self, t_ms: int, dt_s: float) -> None:
        self.water_cm = _ou(self.rng, self.water_cm, self.water_mean, dt_s, tau_s=12 * 3600, sd=8)

    def read(self, t_ms: int) -> dict[str, Any]:
        r = self.rng
        return {
            "tilt_deg": abs(self.tilt + r.gauss(0, 0.15)),
            "cover_open": self.cover_open,
            "water_level_cm": min(self.water_cm, self.depth_cm),
            "ch4_lel_pct": abs(r.gauss(0.3, 0.3)),
            "h2s_ppm": abs(r.gauss(0.1, 0.1)),
            "co_ppm": abs(r.gauss(0.8, 0.5)),
            "o2_pct": r.gauss(20.9, 0.1),
            "temperature_c": 14 + 0.4 * (_outdoor_temp(t_ms) - 12) + r.gauss(0, 0.2),
            "battery_pct": self._battery(),
            "rssi_dbm": self._rssi(),
        }

    def _on_cover_tilt(self, t_ms: int) -> list[Message]:
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


class StreetlightSim(DeviceSim):
    """On by its schedule (18:00-06:00 local), dimmed to 50 % from 23:00 to 05:00, power ~ rated × dimming.

    Reports on every switch. Anomalies: ``lamp_fault`` (the relay says on, the lamp draws nothing until
    repaired), ``emergency_call``, ``hatch_open`` (maintenance, closed again within the hour).
    """

    device_type = "streetlight"
    firmware = ("2.1.7", "2.2.0")
    DIM_FROM, DIM_TO, DIM_PCT = 23 * 60, 5 * 60, 50.0

    def _setup(self, t_ms: int) -> None:
        self.rated_w = float(self.attributes.get("rated_power_w", 100.0))
        self.on_min, self.off_min = parse_schedule(str(self.attributes.get("schedule", "18:00-06:00")))
        self.energy_kwh = self.rng.uniform(50, 3000)
        self.voltage_base = self.rng.uniform(216, 228)
        self.leak_base = self.rng.uniform(1, 6)
        self.tilt_base = self.rng.uniform(0.1, 1.2)
        self.cloud = self.rng.uniform(0.4, 1.0)
        self.faulty = False
        self.lamp_on, self.dimming = self._scheduled(t_ms)
        self._timers["switch"] = self._next_boundary(t_ms)
        self._poisson("lamp_fault", self.rates.lamp_fault, t_ms)
        self._poisson("emergency_call", self.rates.emergency_call, t_ms)
        self._poisson("hatch_open", self.rates.hatch_open, t_ms)

    def _scheduled(self, t_ms: int) -> tuple[bool, float]:
        m = local_minute(t_ms)
        if not in_window(m, self.on_min, self.off_min):
            return False, 0.0
        return True, self.DIM_PCT if in_window(m, self.DIM_FROM, self.DIM_TO) else 100.0

    def _next_boundary(self, t_ms: int) -> int:
        minutes = (self.on_min, self.off_min, self.DIM_FROM, self.DIM_TO)
        return min(next_local_minute(t_ms, m) for m in minutes)

    def _mean_power_w(self) -> float:
        return self.rated_w * self.dimming / 100 if self.lamp_on and not self.faulty else 0.2

    def _evolve_state(self, t_ms: int, dt_s: float) -> None:
        self.energy_kwh += self._mean_power_w() * dt_s / 3600 / 1000
        self.cloud = min(max(_ou(self.rng, self.cloud, 0.7, dt_s, tau_s=3 * 3600, sd=0.2), 0.15), 1.0)

    def _lux(self, t_ms: int) -> float:
        h = local_hour(t_ms)
        sky = 60_000 * math.sin(math.pi * (h - 6) / 12) * self.cloud if 6 <= h < 18 else 0.0
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
        return {
            "lamp_on": self.lamp_on,
            "dimming_pct": self.dimming,
            "voltage_v": voltage,
            "current_a": power / (voltage * pf),
            "power_w": power,
            "power_factor": pf,
            "energy_kwh": self.energy_kwh,
            "leakage_ma": abs(self.leak_base + r.gauss(0, 0.4)),
            "pole_tilt_deg": abs(self.tilt_base + r.gauss(0, 0.03)),
            "lux": self._lux(t_ms),
        }

    def _on_switch(self, t_ms: int) -> list[Message]:
        self._timers["switch"] = self._next_boundary(t_ms)
        state = self._scheduled(t_ms)
        if state == (self.lamp_on, self.dimming):
            return []
        self.lamp_on, self.dimming = state
        return [self._telemetry(t_ms)]

    def _on_lamp_fault(self, t_ms: int) -> list[Message]:
        self.faulty = True
        self._after("lamp_repaired", t_ms, 6 * 3600, 48 * 3600)
        return [self._event(t_ms, "lamp_fault"), self._telemetry(t_ms)]

    def _on_lamp_repaired(self, t_ms: int) -> list[Message]:
        self.faulty = False
        self._poisson("lamp_fault", self.rates.lamp_fault, t_ms)
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

    Busiest in the morning and evening, community gates twice as busy as unit doors. A door open past
    its ``held_open_limit_s`` reports ``door_held_open`` once. Anomalies: ``door_forced_open``,
    ``door_held_open`` (propped open), ``tamper``, ``duress``.
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
    GRANT_P = 0.94

    def _setup(self, t_ms: int) -> None:
        self.busy = 2.0 if self.row.get("building") is None else 1.0
        self.limit_ms = int(float(self.attributes.get("held_open_limit_s", 60.0)) * 1000)
        self.credentials = [f"{self.rng.getrandbits(32):08X}" for _ in range(self.rng.randint(60, 200))]
        self.door_open = False
        self.opened_at = 0
        self._next_access(t_ms)
        for name in ("door_forced_open", "door_held_open", "tamper", "duress"):
            self._poisson(name, getattr(self.rates, name), t_ms)

    def _next_access(self, t_ms: int) -> None:
        per_hour = self.HOURLY[int(local_hour(t_ms))] * self.busy
        self._timers["access"] = t_ms + max(1, int(self.rng.expovariate(per_hour / HOUR_MS)))

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

    def _on_access(self, t_ms: int) -> list[Message]:
        self._next_access(t_ms)
        r = self.rng
        if r.random() < self.GRANT_P:
            method = r.choices(self.METHODS, self.METHOD_WEIGHTS)[0]
            self._after("door_swing", t_ms, 1, 3)
            return [self._event(t_ms, "access_granted", method=method, credential=self._credential(method))]
        method = r.choices(self.METHODS[:4], self.METHOD_WEIGHTS[:4])[0]
        reason = r.choices(self.DENY_REASONS, self.DENY_WEIGHTS)[0]
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

    def _on_tamper(self, t_ms: int) -> list[Message]:
        self._poisson("tamper", self.rates.tamper, t_ms)
        return [self._event(t_ms, "tamper")]

    def _on_duress(self, t_ms: int) -> list[Message]:
        self._poisson("duress", self.rates.duress, t_ms)
        return [self._event(t_ms, "duress"), *self._open(t_ms, 3, 10)]


class ParkingSensorSim(DeviceSim):
    """A bay that cars arrive at and leave; the vertical field (``mag_z``) jumps while a car stands on it.

    Normal and time-limited bays: arrivals through the day, long stays overnight. Fire-lane and
    no-parking bays stay empty except for the ``illegal_parking`` anomaly. Reports every change at once.
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
        r = self.rng
        self.base = (r.uniform(-30, 30), r.uniform(-50, 50), r.uniform(20, 60))
        self.car = (0.0, 0.0, 0.0)
        self.occupied = False
        if self.legal:
            h = local_hour(t_ms)
            if r.random() < (0.8 if h >= 20 or h < 7 else 0.4):
                self._arrive(t_ms)
            else:
                self._next_arrival(t_ms)
        else:
            self._poisson("illegal_parking", self.rates.illegal_parking, t_ms)

    def _arrive(self, t_ms: int) -> None:
        r = self.rng
        self.occupied = True
        self.car = (r.uniform(-60, 60), r.uniform(-60, 60), r.uniform(80, 300))
        h = local_hour(t_ms)
        if self.kind == "time_limited":
            stay_min = r.expovariate(1 / 90)
        elif h >= 17 or h < 7:
            stay_min = r.lognormvariate(math.log(9 * 60), 0.4)  # home for the night
        else:
            stay_min = r.expovariate(1 / 120)
        self._timers["departure"] = t_ms + int(max(stay_min, 3) * 60_000)

    def _next_arrival(self, t_ms: int) -> None:
        gap_min = self.rng.expovariate(1 / self.ARRIVAL_GAP_MIN[int(local_hour(t_ms))])
        self._timers["arrival"] = t_ms + int(max(gap_min, 1) * 60_000)

    def read(self, t_ms: int) -> dict[str, Any]:
        r = self.rng
        return {
            "occupied": self.occupied,
            "mag_x": self.base[0] + self.car[0] + r.gauss(0, 0.6),
            "mag_y": self.base[1] + self.car[1] + r.gauss(0, 0.6),
            "mag_z": self.base[2] + self.car[2] + r.gauss(0, 0.6),
            "temperature_c": _outdoor_temp(t_ms) + (4 if self.occupied else 0) + r.gauss(0, 0.3),
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

    def _on_illegal_parking(self, t_ms: int) -> list[Message]:
        self._arrive(t_ms)
        self._timers.pop("departure", None)
        self._after("illegal_departure", t_ms, 5 * 60, 60 * 60)
        return [self._telemetry(t_ms)]

    def _on_illegal_departure(self, t_ms: int) -> list[Message]:
        self._leave()
        self._poisson("illegal_parking", self.rates.illegal_parking, t_ms)
        return [self._telemetry(t_ms)]


class SmokeDetectorSim(DeviceSim):
    """Heartbeats with a clean-air reading; ``low_battery`` once a day while the battery is under 20 %.

    Anomalies: ``smoke_alarm`` (alarm and smoke rise, maybe silenced, cleared after minutes; now and
    then hot enough to confirm a fire), ``detector_fault``, ``detector_removed`` (and put back),
    ``self_test``.
    """

    device_type = "smoke_detector"
    battery_drain_pct_per_day = 0.01
    firmware = ("5.0.1", "5.0.2")
    LOW_BATTERY_PCT = 20.0

    def _setup(self, t_ms: int) -> None:
        self.alarm = False
        self.smoke = 0.0
        self.heat = 0.0
        self.smoke_base = self.rng.uniform(0.0, 0.1)
        self.room_temp = self.rng.uniform(18, 24)
        self.low_battery_at: int | None = None
        for name in ("smoke_alarm", "detector_fault", "detector_removed", "self_test"):
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
        return out

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
        self._timers.pop("silenced", None)
        self._poisson("smoke_alarm", self.rates.smoke_alarm, t_ms)
        return [self._event(t_ms, "alarm_cleared"), self._telemetry(t_ms)]

    def _on_detector_fault(self, t_ms: int) -> list[Message]:
        self._poisson("detector_fault", self.rates.detector_fault, t_ms)
        return [self._event(t_ms, "fault")]

    def _on_detector_removed(self, t_ms: int) -> list[Message]:
        self._after("detector_installed", t_ms, 10 * 60, 24 * 3600)
        return [self._event(t_ms, "removed")]

    def _on_detector_installed(self, t_ms: int) -> list[Message]:
        self._poisson("detector_removed", self.rates.detector_removed, t_ms)
        return [self._event(t_ms, "installed")]

    def _on_self_test(self, t_ms: int) -> list[Message]:
        self._poisson("self_test", self.rates.self_test, t_ms)
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
) -> DeviceSim:
    """The simulator for one registration row. ``report_interval_s`` None: the thing model's interval."""
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
    )


def iter_messages(sims: Iterable[DeviceSim], until_ms: int) -> Iterator[Message]:
    """Every message the devices send up to ``until_ms``, across devices in time order (no waiting)."""
    heap = [(s.next_due_ms, i, s) for i, s in enumerate(sims)]
    heapq.heapify(heap)
    while heap and heap[0][0] <= until_ms:
        due, i, sim = heapq.heappop(heap)
        yield from sim.advance(due)
        heapq.heappush(heap, (sim.next_due_ms, i, sim))
