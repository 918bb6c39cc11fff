"""Incidents through the whole gateway: a device publishes to Mosquitto, the gateway stores the reading,
its rules process opens an incident, its delivery process POSTs the signed CloudEvent to a real receiver
(and publishes it on MQTT); the incident system's report resolves the engine's alarm; a gateway killed with
deliveries pending sends them after its restart; commissioning incidents are kept, not delivered; an
incident whose route says "escalate at once" reaches the escalation endpoint."""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.alarms import AlarmStore
from gateway.incident_store import IncidentStore
from tests.integration.conftest import Harness, community_rows, now_ms, topic, wait_for
from tests.integration.test_delivery import Subscriber
from tests.support.webhook_receiver import Arrival, WebhookReceiver

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
CENTRE_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(SECRET) as r:
        yield r


def _env(*endpoints: tuple[str, WebhookReceiver, str, str]) -> dict[str, str]:
    return {
        "SC_INCIDENT_ENDPOINTS": json.dumps(
            [{"name": n, "url": r.url, "secret": s, "role": role} for n, r, s, role in endpoints]
        ),
        "SC_ESCALATION_CHECK_S": "0.5",
        "SC_DELIVERY_POLL_S": "0.2",
    }


def _detector(harness: Harness, lifecycle: str = "in_service") -> dict[str, Any]:
    (row,) = community_rows(f"i{uuid.uuid4().hex[:6]}", detectors=1)
    harness.register([row])
    harness.registry.set_lifecycle(row["device_id"], lifecycle)  # type: ignore[arg-type]
    return row


def _smoke(harness: Harness, row: dict[str, Any], seq: int = 1, event: str = "smoke_alarm") -> None:
    harness.publisher().send(topic(row, "event"), {"ts": now_ms(), "seq": seq, "event": event})


def _opened(receiver: WebhookReceiver, device_id: str) -> list[Arrival]:
    return [a for a in receiver.accepted() if a.data["device"]["id"] == device_id]


def test_a_smoke_alarm_becomes_a_signed_case_and_the_case_systems_close_resolves_the_alarm(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    row = _detector(harness)
    did = row["device_id"]
    sub = Subscriber(harness.broker)
    try:
        harness.start_gateway(**_env(("city", receiver, SECRET, "cases")))
        _smoke(harness, row)
        [got] = wait_for(lambda: _opened(receiver, did), lambda a: len(a) >= 1, what="the webhook")
        on_mqtt = wait_for(sub.received, lambda m: len(m) >= 1, what="the MQTT publication")
    finally:
        sub.close()
    assert got.type == "sc.incident.opened"
    data = got.data
    assert data["rule_id"] == "smoke_detector.smoke_alarm" and data["urgency"] == "P1"
    assert (
        data["title"].startswith("烟感报警") and data["case_type"] == "event" and data["class_code"] == "0401"
    )
    assert (
        data["location"]["community"] == row["community"]
        and data["location"]["grid_code"] == row["grid_code"]
    )
    assert data["location"]["building"] == row["building"]
    assert data["evidence"]["values"] and data["respond_by"] and data["resolve_by"]
    assert data["commissioning"] is False
    topic_, body = on_mqtt[0]
    assert topic_ == f"sc/v1/incidents/{row['community']}/{got.subject}"
    assert json.loads(body)["data"]["incident_id"] == got.subject

    # the incident system closes the case: the incident resolves, and the rules engine's alarm with it
    store = IncidentStore(harness.engine, [])
    incident, new = store.report(got.subject, "closed", case_id="C-1", note="误报已排除")
    assert new and not incident.is_open
    alarm = wait_for(
        lambda: [a for a in AlarmStore(harness.engine).list(rule_id=data["rule_id"]) if a.alarm_key == did],
        lambda rows: bool(rows) and rows[0].state == "cleared",
        what="the alarm to be resolved by the rules process",
    )
    assert alarm[0].cleared_at is not None
    # not echoed back to the case system
    assert [a.type for a in _opened(receiver, did)] == ["sc.incident.opened"]
    # the device alarming again opens a new case
    _smoke(harness, row, seq=2, event="alarm_cleared")
    _smoke(harness, row, seq=3)
    again = wait_for(lambda: _opened(receiver, did), lambda a: len(a) >= 2, what="a second case")
    assert again[1].type == "sc.incident.opened" and again[1].subject != got.subject


def test_a_gateway_killed_with_deliveries_pending_sends_them_after_its_restart(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    row = _detector(harness)
    did = row["device_id"]
    env = _env(("city", receiver, SECRET, "cases"))
    receiver.stop()  # the incident system is down
    gw = harness.start_gateway(**env)
    _smoke(harness, row)
    store = IncidentStore(harness.engine, [])
    rows = wait_for(
        lambda: [r for r in store.deliveries(endpoint="city") if r.state == "pending" and r.attempts >= 1],
        what="a delivery attempted and waiting for a retry",
    )
    event_id = rows[0].event_id
    gw.kill()
    receiver.start()
    harness.start_gateway("gateway-2", **env)
    [got] = wait_for(lambda: _opened(receiver, did), lambda a: len(a) >= 1, what="the delivery after restart")
    assert got.webhook_id == event_id and got.type == "sc.incident.opened"
    assert all(a.webhook_id == event_id for a in receiver.all() if a.data["device"]["id"] == did)


def test_commissioning_incidents_are_kept_but_not_delivered(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    commissioning = _detector(harness, lifecycle="online")
    live = _detector(harness)
    harness.start_gateway(**_env(("city", receiver, SECRET, "cases")))
    _smoke(harness, commissioning)
    _smoke(harness, live)
    wait_for(lambda: _opened(receiver, live["device_id"]), what="the live detector's case")
    store = IncidentStore(harness.engine, [])
    kept = wait_for(
        lambda: store.find(include_commissioning=True, rule_id="smoke_detector.smoke_alarm")[0],
        lambda found: any(i.device.id == commissioning["device_id"] for i in found),
        what="the commissioning incident to be kept",
    )
    noisy = next(i for i in kept if i.device.id == commissioning["device_id"])
    assert noisy.commissioning and store.outbox_rows(noisy.incident_id) == []
    assert _opened(receiver, commissioning["device_id"]) == []


def test_a_confirmed_fire_is_escalated_at_once_to_the_escalation_endpoint(
    harness: Harness, receiver: WebhookReceiver
) -> None:
    row = _detector(harness)
    did = row["device_id"]
    with WebhookReceiver(CENTRE_SECRET) as centre:
        harness.start_gateway(
            **_env(("city", receiver, SECRET, "cases"), ("centre", centre, CENTRE_SECRET, "escalation"))
        )
        _smoke(harness, row)
        harness.publisher().send(topic(row), {"ts": now_ms(), "seq": 2, "temperature_c": 75.0})
        got = wait_for(
            lambda: [
                a for a in centre.accepted() if a.data["rule_id"] == "smoke_detector.fire_confirmed_heat"
            ],
            what="the escalation endpoint to hear of the confirmed fire",
        )
    assert got[0].type == "sc.incident.updated" and got[0].data["escalation_level"] == 1
    assert got[0].data["escalation"]["to"].startswith("消防 119")
    # the case system got the case opened, then the escalation (each endpoint is delivered to on its own:
    # the case system's copy of the escalation may come after the centre's)
    city = wait_for(
        lambda: [a.type for a in receiver.accepted() if a.subject == got[0].subject],
        lambda types: len(types) >= 2,
        what="the case system to hear of the case and its escalation",
    )
    assert city[:2] == ["sc.incident.opened", "sc.incident.updated"]
    # nothing of the un-escalated smoke alarm went to the centre
    assert {a.data["rule_id"] for a in centre.accepted()} == {"smoke_detector.fire_confirmed_heat"}
    assert did in got[0].data["members"] or got[0].data["device"]["id"] == did
