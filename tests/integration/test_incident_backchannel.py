"""Acknowledgement, escalation, reminders and the incident system's back-channel, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest
from sqlalchemy import Engine

from gateway.incident_store import IncidentNotFoundError, IncidentStore, Target
from tests.integration.test_incident_store import NOW, at, device, engine, verdict  # noqa: F401

CASES, CENTRE = "city", "command-centre"


@pytest.fixture
def store(engine: Engine) -> IncidentStore:  # noqa: F811
    return IncidentStore(
        engine, [Target(CASES), Target(CENTRE, "escalation"), Target("mqtt", "local")], instance="test"
    )


def _targets(store: IncidentStore, incident_id: str) -> list[tuple[str, str]]:
    return [(r.endpoint, r.event_type) for r in store.outbox_rows(incident_id)]


def _open_p1(store: IncidentStore) -> str:
    inc, _ = store.apply(verdict(urgency="P1"), device(), at(0)) or pytest.fail("not opened")
    return inc.incident_id


def test_escalation_endpoints_get_nothing_until_an_incident_is_escalated(store: IncidentStore) -> None:
    iid = _open_p1(store)
    assert _targets(store, iid) == [(CASES, "sc.incident.opened"), ("mqtt", "sc.incident.opened")]
    inc = store.get(iid)
    assert inc is not None and inc.respond_by is not None
    # before respond-by: nothing happens
    assert store.escalate_due(inc.respond_by - dt.timedelta(seconds=1)) == []

    [escalated] = store.escalate_due(inc.respond_by)
    assert escalated.escalation_level == 1 and escalated.escalated_at == inc.respond_by
    rows = _targets(store, iid)[2:]
    assert sorted(rows) == sorted(
        [(CASES, "sc.incident.updated"), (CENTRE, "sc.incident.updated"), ("mqtt", "sc.incident.updated")]
    )
    hist = store.history(iid)
    assert hist[-1].event_type == "escalated" and hist[-1].actor.startswith("gateway:escalation:")
    assert hist[-1].change["escalation_level"] == [0, 1]
    # once is enough
    assert store.escalate_due(inc.respond_by + dt.timedelta(hours=1)) == []


def test_an_acknowledged_p1_is_not_escalated(store: IncidentStore) -> None:
    iid = _open_p1(store)
    acked = store.acknowledge(iid, "user:wang", at(1))
    assert acked.acknowledged_at == at(1) and acked.acknowledged_by == "user:wang"
    assert store.acknowledge(iid, "user:li", at(2)).acknowledged_by == "user:wang"  # the first one stays
    assert store.escalate_due(at(600)) == []
    assert [h.event_type for h in store.history(iid)] == ["opened", "acknowledged"]


def test_a_route_escalation_hint_escalates_after_its_delay(store: IncidentStore) -> None:
    v = replace(verdict(urgency="P1"), rule_id="smoke_detector.smoke_alarm", key="sd-1", device_id="sd-1")
    inc, _ = store.apply(v, device("sd-1"), at(0)) or pytest.fail("not opened")
    assert inc.escalation is not None and inc.escalation.after_s == 300  # routing.yaml: 119 after 5 min
    after = at(0) + dt.timedelta(seconds=inc.escalation.after_s)
    assert store.escalate_due(after - dt.timedelta(seconds=1)) == []
    [esc] = store.escalate_due(after)
    assert esc.incident_id == inc.incident_id
    assert store.history(inc.incident_id)[-1].actor == f"gateway:escalation:{inc.escalation.to}"


def test_reminders_repeat_every_period_while_open(store: IncidentStore) -> None:
    inc, _ = store.apply(verdict(urgency="P2"), device(), at(0)) or pytest.fail("not opened")
    hours = {"P2": 2.0}
    assert store.remind_due(hours, at(119)) == []
    [r1] = store.remind_due(hours, at(120))
    assert r1.reminders == 1
    assert store.remind_due(hours, at(200)) == []
    [r2] = store.remind_due(hours, at(240))
    assert r2.reminders == 2
    assert store.remind_due({"P1": 1.0}, at(600)) == []  # not its urgency
    store.apply(verdict("cleared"), device(), at(241))
    assert store.remind_due(hours, at(10_000)) == []
    assert [h.event_type for h in store.history(inc.incident_id)].count("reminder") == 2


def test_dispatched_then_closed_resolves_and_asks_the_rules_to_resolve_the_alarm(
    store: IncidentStore,
) -> None:
    inc, _ = store.apply(verdict(), device(), at(0)) or pytest.fail("not opened")
    iid = inc.incident_id
    got, new = store.report(iid, "dispatched", case_id="CASE-77", report_id="r1", now=at(3))
    assert new and got.status == "dispatched" and got.case_id == "CASE-77"
    assert got.acknowledged_at == at(3) and got.acknowledged_by == "incident_system" and got.is_open
    # the same report again: nothing changes
    again, new = store.report(iid, "dispatched", report_id="r1", now=at(4))
    assert not new and again == got

    closed, _ = store.report(iid, "closed", note="井盖已复位", now=at(30))
    assert closed.resolved_at == at(30) and closed.resolution == "closed" and closed.status == "closed"
    assert store.open_incidents() == []
    assert store.take_alarm_resolutions(at(31)) == [("manhole_cover.tilt", "mc-001")]
    assert store.take_alarm_resolutions(at(32)) == []  # taken once

    # not echoed to the case system that reported them; local subscribers see them
    assert _targets(store, iid) == [
        (CASES, "sc.incident.opened"),
        ("mqtt", "sc.incident.opened"),
        ("mqtt", "sc.incident.updated"),
        ("mqtt", "sc.incident.resolved"),
    ]
    hist = store.history(iid)
    assert [h.event_type for h in hist] == ["opened", "reported:dispatched", "reported:closed"]
    assert {h.actor for h in hist[1:]} == {"incident_system"}
    assert [r["status"] for r in store.reports(iid)] == ["dispatched", "closed"]
    # the device clearing later does not reopen or re-resolve anything
    assert store.apply(verdict("cleared"), device(), at(40)) is None


def test_false_alarms_are_counted_per_rule_and_device(store: IncidentStore) -> None:
    for i, dev_id in enumerate(["mc-001", "mc-001", "mc-002"]):
        inc, _ = store.apply(verdict(device_id=dev_id), device(dev_id), at(10 * i)) or pytest.fail()
        done, _ = store.report(inc.incident_id, "false_alarm", now=at(10 * i + 1))
        assert done.resolution == "false_alarm" and not done.is_open
    counts = {(c.rule_id, c.device_id): c.count for c in store.false_alarm_counts()}
    assert counts == {("manhole_cover.tilt", "mc-001"): 2, ("manhole_cover.tilt", "mc-002"): 1}
    top = store.false_alarm_counts(rule_id="manhole_cover.tilt", limit=1)
    assert [(c.device_id, c.count) for c in top] == [("mc-001", 2)]


def test_reports_on_unknown_incidents_or_with_unknown_status_are_refused(store: IncidentStore) -> None:
    with pytest.raises(IncidentNotFoundError):
        store.report("INC-20261121-999999", "closed")
    iid = _open_p1(store)
    with pytest.raises(ValueError, match="expected one of"):
        store.report(iid, "finished")
    assert store.reports(iid) == []
