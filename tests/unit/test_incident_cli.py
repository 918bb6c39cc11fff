"""`sc-gateway incidents ...` on a real SQLite database: what an operator sees and does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import cli
from gateway.db import make_engine
from gateway.incident_store import IncidentStore
from tests.integration.test_incident_store import at, device, verdict


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    assert cli.main(["--db", url, "db", "migrate"]) == 0
    monkeypatch.delenv("SC_INCIDENT_ENDPOINTS", raising=False)
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_report_show_and_false_alarms(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = IncidentStore(make_engine(db), ["city"])
    inc, _ = store.apply(verdict(urgency="P1"), device(), at(0)) or pytest.fail()
    iid = inc.incident_id

    code, out, _ = run(capsys, "--db", db, "incidents", "list")
    assert code == 0 and iid in out and "井盖倾斜" in out and "P1" in out

    code, out, _ = run(capsys, "--db", db, "incidents", "ack", iid, "--by", "wang")
    assert code == 0 and "acknowledged by user:wang" in out

    code, out, _ = run(
        capsys, "--db", db, "incidents", "report", iid, "--status", "false_alarm", "--by", "ops"
    )
    assert code == 0 and "(resolved)" in out
    code, out, _ = run(capsys, "--db", db, "incidents", "list")
    assert out.strip() == "no incidents"

    code, out, _ = run(capsys, "--db", db, "--json", "incidents", "show", iid)
    shown = json.loads(out)
    assert shown["incident"]["resolution"] == "false_alarm"
    assert [h["event_type"] for h in shown["history"]] == ["opened", "acknowledged", "reported:false_alarm"]
    # changes made here go where the gateway's settings say (SC_INCIDENT_MQTT by default)
    assert [(d["endpoint"], d["event_type"]) for d in shown["deliveries"]] == [
        ("city", "sc.incident.opened"),
        ("mqtt", "sc.incident.updated"),
        ("mqtt", "sc.incident.resolved"),
    ]

    code, out, _ = run(capsys, "--db", db, "incidents", "false-alarms")
    assert code == 0 and "manhole_cover.tilt" in out and "mc-001" in out


def test_unknown_incidents_and_bad_status_are_errors(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--db", db, "incidents", "show", "INC-20261121-000042")
    assert code == 1 and "no incident INC-20261121-000042" in err
    code, _, err = run(capsys, "--db", db, "incidents", "ack", "INC-20261121-000042", "--by", "x")
    assert code == 1 and "no incident" in err
    with pytest.raises(SystemExit):
        cli.main(["--db", db, "incidents", "report", "INC-20261121-000042", "--status", "done", "--by", "x"])
    assert "invalid choice" in capsys.readouterr().err
