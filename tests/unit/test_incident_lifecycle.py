"""The incident lifecycle: opened → updated (occurrence, escalation) → resolved, one open per dedup key."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest

from gateway.registry import DeviceInfo, RegisteredDevice
from incidents.lifecycle import apply
from incidents.model import EventType, Incident
from rules.model import Evidence, Urgency, Verdict

#: Saturday 2026-11-21 15:30 in UTC+8
NOW = dt.datetime(2026, 11, 21, 7, 30, tzinfo=dt.UTC)
MS = int(NOW.timestamp() * 1000)


def device(lifecycle: str = "in_service", **attributes: Any) -> RegisteredDevice:
    return RegisteredDevice(
        device_id="mc-001",
        device_type="manhole_cover",
        community="110101001001",
        grid_code="110101001001001",
        district="110101",
        street="110101001",
        building="3",
        address="东城区某街 1 号",
        lat=39.9,
        lon=116.4,
        responsible_unit="北京燃气集团",
        component_code="1101010111000001",
        attributes=MappingProxyType(attributes),
        lifecycle=lifecycle,
        created_at=NOW,
        updated_at=NOW,
        version=1,
    )


def firing(
    urgency: Urgency = "P2", occurrences: int = 1, tilt: float = 14.2, change: Any = "opened", **kw: Any
) -> Verdict:
    return Verdict(
        rule_id=kw.pop("rule_id", "manhole_cover.tilt"),
        key=kw.pop("key", "mc-001"),
        device_id=kw.pop("device_id", "mc-001"),
        device_type="manhole_cover",
        state="firing",
        change=change,
        urgency=urgency,
        evidence=Evidence(MS, {"tilt_deg": tilt}, "> 10"),
        message_zh=f"井盖倾斜：tilt_deg={tilt}（条件 > 10）",
        message_en=f"Manhole cover tilted: tilt_deg={tilt} (condition > 10)",
        since_ms=MS,
        occurrences=occurrences,
        community="110101001001",
        grid_code="110101001001001",
        **kw,
    )


def cleared(**kw: Any) -> Verdict:
    v = firing(tilt=3.0, change="cleared", **kw)
    return Verdict(**{**{f: getattr(v, f) for f in v.__slots__}, "state": "cleared"})


def counter() -> Callable[[dt.date], int]:
    seqs: dict[dt.date, itertools.count[int]] = {}
    return lambda day: next(seqs.setdefault(day, itertools.count(1)))


def open_incident(
    v: Verdict, dev: Any, now: dt.datetime = NOW, next_id: Callable[[dt.date], int] | None = None
) -> tuple[Incident, EventType]:
    out = apply(v, None, dev, now, next_id or counter())
    assert out is not None
    return out


def test_open_update_escalate_resolve() -> None:
    ids = counter()
    inc, ev = open_incident(firing(), device(), next_id=ids)
    assert ev == "sc.incident.opened"
    assert inc.incident_id == "INC-20261121-000001"
    assert inc.dedup_key == "mc-001:manhole_cover.tilt"
    assert inc.status == "open" and inc.occurrences == 1 and inc.urgency == "P2"
    assert inc.title.startswith("井盖倾斜") and inc.title == "井盖倾斜 / Manhole cover tilted"
    assert "14.2" in inc.description and "> 10" in inc.description
    assert (inc.case_type, inc.class_code, inc.class_name) == ("component", "0111", "燃气井盖")
    assert inc.responsible_unit == "北京燃气集团"
    assert inc.device.model_dump() == {
        "id": "mc-001",
        "type": "manhole_cover",
        "component_code": "1101010111000001",
    }
    assert inc.location.address == "东城区某街 1 号" and inc.location.grid_code == "110101001001001"
    assert inc.evidence.values == {"tilt_deg": 14.2} and inc.evidence.threshold == "> 10"
    assert inc.respond_by == NOW + dt.timedelta(minutes=30)
    assert inc.resolve_by == NOW + dt.timedelta(hours=6)
    assert not inc.commissioning

    # another occurrence: updated, same id
    t1 = NOW + dt.timedelta(minutes=2)
    out = apply(firing(occurrences=2, change="repeated", tilt=15.0), inc, device(), t1, ids)
    assert out is not None
    inc2, ev = out
    assert ev == "sc.incident.updated" and inc2.incident_id == inc.incident_id
    assert inc2.occurrences == 2 and inc2.evidence.values == {"tilt_deg": 15.0} and inc2.updated_at == t1
    assert inc2.opened_at == inc.opened_at and inc2.respond_by == inc.respond_by

    # escalation P2 → P1 (flipped): the P1 deadlines from now, as they are earlier
    t2 = NOW + dt.timedelta(minutes=10)
    out = apply(firing("P1", occurrences=2, change="escalated", tilt=120.0), inc2, device(), t2, ids)
    assert out is not None
    inc3, ev = out
    assert ev == "sc.incident.updated" and inc3.urgency == "P1"
    assert inc3.respond_by == t2 + dt.timedelta(minutes=5)
    assert inc3.resolve_by == t2 + dt.timedelta(hours=2)

    # a calmer reading does not un-escalate an open incident
    out = apply(firing("P2", occurrences=3, change="repeated"), inc3, device(), t2, ids)
    assert out is not None and out[0].urgency == "P1" and out[0].respond_by == inc3.respond_by

    # cleared → resolved
    t3 = NOW + dt.timedelta(hours=1)
    out = apply(cleared(), inc3, device(), t3, ids)
    assert out is not None
    done, ev = out
    assert ev == "sc.incident.resolved"
    assert done.status == "resolved" and done.resolved_at == t3 and done.resolution == "cleared"
    assert not done.is_open and inc3.is_open
    assert done.to_json()["resolved_at"] == "2026-11-21T08:30:00.000Z"

    # a clear with nothing open changes nothing; firing again opens a new incident with a larger id
    assert apply(cleared(), done, device(), t3, ids) is None
    assert apply(cleared(), None, device(), t3, ids) is None
    out = apply(firing(), done, device(), t3, ids)
    assert out is not None
    again, ev = out
    assert ev == "sc.incident.opened" and again.incident_id == "INC-20261121-000002"
    assert again.incident_id > inc.incident_id and again.dedup_key == inc.dedup_key


def test_one_open_incident_per_dedup_key() -> None:
    inc, _ = open_incident(firing(), device())
    # firing again on the open incident updates it, never opens a second one
    out = apply(firing(change="opened"), inc, device(), NOW, counter())
    assert out is not None and out[1] == "sc.incident.updated" and out[0].incident_id == inc.incident_id
    # an incident of another key is refused
    with pytest.raises(ValueError, match="not mc-002"):
        apply(firing(key="mc-002", device_id="mc-002"), inc, device(), NOW, counter())


def test_ids_increase_and_carry_the_local_date() -> None:
    ids = counter()
    late = dt.datetime(2026, 11, 21, 16, 30, tzinfo=dt.UTC)  # 00:30 on the 22nd in UTC+8
    a, _ = open_incident(firing(), device(), NOW, ids)
    b, _ = open_incident(firing(key="mc-002", device_id="mc-002"), device(), NOW, ids)
    c, _ = open_incident(firing(), device(), late, ids)
    assert [a.incident_id, b.incident_id, c.incident_id] == [
        "INC-20261121-000001",
        "INC-20261121-000002",
        "INC-20261122-000001",
    ]
    assert a.incident_id < b.incident_id < c.incident_id


def test_commissioning_noise_is_marked() -> None:
    inc, _ = open_incident(firing(), device("online"))
    assert inc.commissioning
    # it stays marked while open, even after the device went into service
    out = apply(firing(change="repeated", occurrences=2), inc, device(), NOW, counter())
    assert out is not None and out[0].commissioning


def test_group_incident_and_grouped_member() -> None:
    v = firing(
        rule_id="streetlight.circuit_dark",
        key="circuit:C7",
        device_id=None,
        members=("sl-1", "sl-2", "sl-3"),
    )
    inc, _ = open_incident(v, None)
    assert inc.dedup_key == "circuit:C7:streetlight.circuit_dark"
    assert inc.device.id is None and inc.members == ("sl-1", "sl-2", "sl-3")
    assert inc.location.grid_code == "110101001001001" and not inc.commissioning
    assert (inc.case_type, inc.class_code) == ("component", "0118")

    lamp, _ = open_incident(firing(rule_id="streetlight.lamp_out"), device())
    gone = cleared(rule_id="streetlight.lamp_out", grouped_into="circuit:C7")
    out = apply(gone, lamp, device(), NOW, counter())
    assert out is not None and out[0].resolution == "grouped"


def test_device_info_without_address_is_enough() -> None:
    info: DeviceInfo = device().info()
    inc, _ = open_incident(firing(), info)
    assert inc.location.address is None and inc.location.building == "3"
    assert inc.location.street == "110101001"


def test_p4_has_no_deadlines() -> None:
    inc, _ = open_incident(firing("P4", rule_id="parking_sensor.overstay"), device())
    assert inc.respond_by is None and inc.resolve_by is None
    assert inc.to_json()["respond_by"] is None


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        apply(firing(), None, device(), dt.datetime(2026, 11, 21), counter())
