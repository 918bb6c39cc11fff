"""Every shipped scenario (simulators/scenarios/*.yaml) against a real gateway: real Mosquitto and InfluxDB, a
SQLite registry, one gateway process with rules and incidents on, delivering to a real verifying webhook
receiver (SC_INCIDENT_ENDPOINTS) and on MQTT, where a subscriber listens as well.

One gateway serves the whole module: each run has a community (and device ids) of its own, and the
scenarios' rule overrides, scoped to their communities, are in its SC_RULES_DIRS from the start.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulators.scenario import (
    MqttPublisher,
    Plan,
    Runner,
    RunOptions,
    RunPlan,
    load_scenario,
    parse_scenario,
    shipped_scenarios,
)
from stack.services import InfluxService, MosquittoService
from tests.integration.conftest import REPO, GatewayProcess, Harness
from tests.integration.test_delivery import Subscriber
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
FILES = shipped_scenarios()
PLANS: dict[str, Plan] = {f.stem: load_scenario(f) for f in FILES}
#: one run id per scenario, fixed before the gateway starts (its rules files name the run's community)
RUNS: dict[str, RunPlan] = {name: plan.for_run(f"e2e{secrets.token_hex(3)}") for name, plan in PLANS.items()}


@dataclass
class Stack:
    broker: MosquittoService
    harness: Harness
    gateway: GatewayProcess
    receiver: WebhookReceiver
    subscriber: Subscriber
    runner: Runner


def _mqtt_events(sub: Subscriber) -> set[tuple[str, str]]:
    out = set()
    for _topic, body in sub.received():
        try:
            event = json.loads(body)
            out.add((str(event["type"]), str(event["subject"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: MosquittoService, influxdb: InfluxService
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("scenarios")
    rules_dir = workdir / "rules"
    rules_dir.mkdir()
    for run in RUNS.values():
        run.write_rules(rules_dir)
    harness = Harness(workdir, mosquitto, influxdb)
    receiver = WebhookReceiver(SECRET).start()
    subscriber = Subscriber(mosquitto)
    publisher: MqttPublisher | None = None
    try:
        gateway = harness.start_gateway(
            SC_INCIDENT_ENDPOINTS=json.dumps(
                [{"name": "cases", "url": receiver.url, "secret": SECRET, "role": "cases"}]
            ),
            SC_ESCALATION_CHECK_S="0.5",
            SC_DELIVERY_POLL_S="0.2",
            SC_RULES_DIRS=str(rules_dir),
            SC_RULES_STATE_PATH=str(workdir / "rules-state.json"),
        )
        account = mosquitto.publisher_account
        publisher = MqttPublisher(
            mosquitto.host, mosquitto.port, username=account.username, password=account.password
        )
        runner = Runner(
            harness.engine,
            publisher,
            RunOptions(
                registry_refresh_s=0.5,
                require_endpoints=("cases", "mqtt"),
                receivers={
                    "webhook": lambda: {(a.type, a.subject) for a in receiver.accepted()},
                    "mqtt-subscriber": lambda: _mqtt_events(subscriber),
                },
                rules_dir=rules_dir,
                keep_rules=True,
            ),
        )
        yield Stack(mosquitto, harness, gateway, receiver, subscriber, runner)
    finally:
        if publisher is not None:
            publisher.close()
        subscriber.close()
        receiver.stop()
        harness.close()


@pytest.mark.parametrize("name", sorted(RUNS))
def test_scenario_passes_against_a_real_gateway(stack: Stack, name: str) -> None:
    run = RUNS[name]
    result = stack.runner.run(run.plan, run.run_id)
    report = result.report()
    print(report)
    assert result.passed, f"{report}\n--- gateway log ---\n{stack.gateway.tail()}"
    # the webhook receiver verified every delivery it got (signature, timestamp)
    assert stack.receiver.rejections == []


def test_every_shipped_scenario_is_run() -> None:
    assert {Path(f).stem for f in FILES} == set(RUNS) and len(RUNS) >= 8


#: a scenario whose checks must fail, each in its own way (the judge's negative path, for real)
FAILING = """\
name: checks_that_fail
title: 必须失败的检查 / Checks that must fail
community: {name: 失败演练社区, street: "002", community: "199", slug: s199, buildings: 2, detectors: 2}
roles:
  D1: {type: smoke_detector, building: 1}
grace_s: 2
timeline:
  - name: alarm
    devices: D1
    event: smoke_alarm
    telemetry: {alarm: true}
expect:
  - rule: smoke_detector.fire_confirmed_building    # one detector confirms nothing
    group: {by: building, of: D1}
    within_s: 3
  - rule: smoke_detector.smoke_alarm                # it is P1
    devices: [D1]
    urgency: P2
    within_s: 10
  - rule: smoke_detector.smoke_alarm
    devices: [D1]
    urgency: P1
    within_s: 10
forbid:
  - rule: smoke_detector.smoke_alarm
    devices: [D1]
"""


def test_a_scenario_whose_expectations_are_wrong_fails_naming_each_way(stack: Stack) -> None:
    result = stack.runner.run(parse_scenario(FAILING, "<failing>"))
    print(result.report())
    assert not result.passed
    assert [c.status for c in result.checks] == ["missing", "fail", "pass", "raised"]
    assert "urgency P1, expected P2" in result.checks[1].found
    assert result.checks[3].incidents == result.checks[2].incidents


def test_the_command_line_runs_a_scenario_against_the_gateway(stack: Stack) -> None:
    account = stack.broker.publisher_account
    env = {k: v for k, v in os.environ.items() if not k.startswith("SC_")}
    env.update(PYTHONPATH=str(REPO), SC_SIM_USERNAME=account.username, SC_SIM_PASSWORD=account.password)
    # run as an operator would, without the test's receivers: the outbox rows say what was delivered
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulators.scenario",
            "run",
            "detector_removed",
            "--mqtt-host",
            stack.broker.host,
            "--mqtt-port",
            str(stack.broker.port),
            "--database-url",
            stack.harness.db_url,
            "--registry-refresh-s",
            "0.5",
            "--require-endpoint",
            "cases",
            "--require-endpoint",
            "mqtt",
            "--json",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (result,) = json.loads(proc.stdout)
    assert result["passed"] and result["scenario"] == "detector_removed"
    assert {c["status"] for c in result["checks"]} == {"pass"}
