"""The installers' CLI: API keys, places and units, device changes with the broker (faked here), imports
that issue credentials to a 0600 file, export, commissioning."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from api.auth import ApiKeyStore
from gateway import cli
from gateway.db import make_engine
from gateway.deadletter import DeviceStateStore, StatusUpdate
from gateway.installers import BrokerIssuer, InstallerSettings
from tests.unit.test_api_devices import T0, FakeBroker

GRID = "110101001001001"
CSV_HEADER = "device_id,device_type,community,grid_code,building,batch\n"


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv(cli.ENV_DATABASE_URL, raising=False)
    for name in ("SC_MQTT_ADMIN_PASSWORD", "SC_COMPONENT_CODE_SPLIT", "SC_IMPORT_BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SC_MQTT_ADMIN_FILE", str(tmp_path / "no-admin.json"))
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    assert cli.main(["--db", url, "db", "migrate"]) == 0
    return url


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    fake = FakeBroker()
    monkeypatch.setattr(cli, "make_issuer", lambda settings: fake)
    return fake


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def add(capsys: pytest.CaptureFixture[str], db: str, device_id: str, *more: str) -> Any:
    return run_json(
        capsys,
        "devices", "add", "--db", db, "--id", device_id, "--type", "parking_sensor",
        "--community", "东华门社区", "--grid-code", GRID, *more,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# API keys


def test_apikeys_create_list_revoke(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "apikeys", "create", "--db", db, "--name", "Li", "--role", "installer")
    assert code == 0 and "Shown once" in out
    key = next(line.strip() for line in out.splitlines() if line.strip().startswith("sck_"))
    engine = make_engine(db)
    try:
        assert ApiKeyStore(engine).authenticate(key).name == "Li"
    finally:
        engine.dispose()

    scoped = run_json(
        capsys,
        "apikeys",
        "create",
        "--db",
        db,
        "--name",
        "team",
        "--role",
        "manager",
        "--community",
        "东华门社区",
    )
    assert scoped["scope"] == {"communities": ["东华门社区"]} and scoped["key"].startswith("sck_")

    listed = run_json(capsys, "apikeys", "list", "--db", db)
    assert [k["name"] for k in listed] == ["Li", "team"] and all("key" not in k for k in listed)
    code, out, _ = run(capsys, "apikeys", "list", "--db", db)
    assert "all communities" in out and "communities 东华门社区" in out

    revoked = run_json(capsys, "apikeys", "revoke", "--db", db, scoped["key_id"])
    assert revoked["changed"] is True and revoked["revoked_at"] is not None
    assert [k["name"] for k in run_json(capsys, "apikeys", "list", "--db", db, "--active")] == ["Li"]
    code, _, err = run(capsys, "apikeys", "revoke", "--db", db, "nope")
    assert code == 1 and "no API key has the id 'nope'" in err


def test_apikeys_create_refuses_an_unknown_role(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["apikeys", "create", "--db", db, "--name", "x", "--role", "root"])
    assert "invalid choice: 'root'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Places and units


def test_places_and_units(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "places", "add", "--db", db, "--code", "110101", "--name", "东城区")[0] == 0
    code, out, _ = run(capsys, "places", "add", "--db", db, "--code", "110101001", "--name", "东华门街道")
    assert code == 0 and "registered street 110101001 东华门街道 in 110101" in out
    assert [p["code"] for p in run_json(capsys, "places", "list", "--db", db, "--level", "street")] == [
        "110101001"
    ]

    code, _, err = run(capsys, "places", "add", "--db", db, "--code", "110102001", "--name", "x")
    assert code == 1 and "the parent district 110102 of street 110102001 is not registered" in err
    code, _, err = run(capsys, "places", "add", "--db", db, "--code", "1101", "--name", "x")
    assert code == 1 and "invalid place: code: must be 6 (district)" in err
    code, _, err = run(capsys, "places", "add", "--db", db, "--code", "110101", "--name", "x")
    assert code == 1 and "place 110101 is already registered" in err

    unit = run_json(
        capsys, "units", "add", "--db", db, "--id", "water", "--name", "市自来水集团", "--kind", "water"
    )
    assert unit["unit_id"] == "water"
    assert [u["name"] for u in run_json(capsys, "units", "list", "--db", db)] == ["市自来水集团"]
    code, _, err = run(capsys, "units", "add", "--db", db, "--id", "w2", "--name", "市自来水集团")
    assert code == 1 and "a responsible unit with name '市自来水集团' is already registered" in err
    code, _, err = run(capsys, "units", "add", "--db", db, "--id", "水", "--name", "y")
    assert code == 1 and "invalid unit: unit_id: must be 1 to 64 characters" in err


# ---------------------------------------------------------------------------------------------
# Devices


def test_add_with_credentials_prints_the_password_once(
    db: str, broker: FakeBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys,
        "devices", "add", "--db", db, "--id", "mh-1", "--type", "manhole_cover", "--community", "c",
        "--grid-code", GRID, "--component-code", "1101010102000001", "--install-date", "2026-11-20",
        "--firmware", "1.0", "--batch", "b1", "--issue-credentials",
    )  # fmt: skip
    assert code == 0 and broker.accounts["mh-1"]["password"] in out and "Shown once" in out
    shown = run_json(capsys, "devices", "show", "--db", db, "mh-1")
    assert shown["install_date"] == "2026-11-20" and shown["batch"] == "b1"


def test_add_refuses_a_component_code_that_does_not_fit(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys,
        "devices", "add", "--db", db, "--id", "mh-1", "--type", "manhole_cover", "--community", "c",
        "--grid-code", GRID, "--component-code", "1101010118000001",
    )  # fmt: skip
    assert code == 1 and "invalid device: component_code: class 0118 路灯 does not fit a manhole_cover" in err


def test_add_with_credentials_and_no_broker_configured_registers_nothing(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys,
        "devices", "add", "--db", db, "--id", "pk-1", "--type", "parking_sensor", "--community", "c",
        "--grid-code", GRID, "--issue-credentials",
    )  # fmt: skip
    assert (
        code == 1 and "no broker admin credentials: set SC_MQTT_ADMIN_PASSWORD, or SC_MQTT_ADMIN_FILE" in err
    )
    assert run_json(capsys, "devices", "list", "--db", db) == []


def test_update_move_and_history(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    add(
        capsys,
        db,
        "pk-1",
        "--building",
        "B1",
        "--attr",
        "bay_kind=time_limited",
        "--attr",
        "time_limit_min=60",
    )
    out = run_json(
        capsys, "devices", "update", "--db", db, "pk-1", "--firmware", "2.0", "--attr", "time_limit_min="
    )
    assert out["changed"] and out["firmware"] == "2.0" and out["attributes"] == {"bay_kind": "time_limited"}
    out = run_json(capsys, "devices", "update", "--db", db, "pk-1", "--clear", "building")
    assert out["building"] is None
    code, out_text, _ = run(capsys, "devices", "update", "--db", db, "pk-1", "--firmware", "2.0")
    assert code == 0 and "nothing to change" in out_text

    code, _, err = run(capsys, "devices", "update", "--db", db, "pk-1", "--grid-code", "12")
    assert code == 1 and "invalid device: grid_code: must be 14 or 15 digits (got '12')" in err
    code, _, err = run(capsys, "devices", "update", "--db", db, "pk-1")
    assert code == 1 and "nothing to change: give the fields to change" in err
    code, _, err = run(
        capsys, "devices", "update", "--db", db, "pk-1", "--building", "1", "--clear", "building"
    )
    assert code == 1 and "--clear building and a new value for it at once" in err
    code, _, err = run(capsys, "devices", "update", "--db", db, "nope", "--building", "1")
    assert code == 1 and "device 'nope' is not registered" in err

    out = run_json(
        capsys,
        "devices",
        "move",
        "--db",
        db,
        "pk-1",
        "--community",
        "西华门社区",
        "--grid-code",
        "110101001002003",
    )
    assert (out["community"], out["grid_code"]) == ("西华门社区", "110101001002003")
    history = run_json(capsys, "devices", "history", "--db", db, "pk-1")
    assert [e["action"] for e in history] == ["moved", "updated", "updated", "created"]
    assert history[0]["actor"].startswith("cli:")
    code, out_text, _ = run(capsys, "devices", "history", "--db", db, "pk-1")
    assert code == 0 and "moved" in out_text


def test_disable_enable_retire_go_through_the_broker(
    db: str, broker: FakeBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    add(capsys, db, "pk-1", "--issue-credentials")
    code, out, _ = run(capsys, "devices", "disable", "--db", db, "pk-1")
    assert code == 0 and "disabled, cut off at the broker" in out and broker.accounts["pk-1"]["disabled"]
    assert run_json(capsys, "devices", "enable", "--db", db, "pk-1")["lifecycle"] == "registered"
    assert not broker.accounts["pk-1"]["disabled"]
    assert run_json(capsys, "devices", "confirm", "--db", db, "pk-1")[0]["lifecycle"] == "in_service"
    code, out, _ = run(capsys, "devices", "rotate-credentials", "--db", db, "pk-1")
    assert code == 0 and broker.accounts["pk-1"]["password"] in out
    assert run_json(capsys, "devices", "retire", "--db", db, "pk-1")["lifecycle"] == "retired"
    assert "pk-1" not in broker.accounts
    code, _, err = run(capsys, "devices", "enable", "--db", db, "pk-1")
    assert code == 1 and "device 'pk-1' is retired" in err


def test_broker_down_leaves_the_device_as_it_was(
    db: str, broker: FakeBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    add(capsys, db, "pk-1", "--issue-credentials")
    broker.down = True
    code, _, err = run(capsys, "devices", "disable", "--db", db, "pk-1")
    assert code == 1 and "the broker did not answer" in err
    broker.down = False
    assert run_json(capsys, "devices", "show", "--db", db, "pk-1")["lifecycle"] == "registered"


def test_without_a_broker_disable_says_so_unless_registry_only(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    add(capsys, db, "pk-1")
    code, _, err = run(capsys, "devices", "disable", "--db", db, "pk-1")
    assert code == 1 and "no broker admin credentials" in err
    assert (
        run_json(capsys, "devices", "disable", "--db", db, "pk-1", "--registry-only")["lifecycle"]
        == "disabled"
    )


def test_confirm_several_and_refuse_a_disabled_one(
    db: str, broker: FakeBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    add(capsys, db, "pk-1")
    add(capsys, db, "pk-2")
    code, out, _ = run(capsys, "devices", "confirm", "--db", db, "pk-1", "pk-2")
    assert code == 0 and "pk-1: in service" in out and "pk-2: in service" in out
    add(capsys, db, "pk-3")
    run(capsys, "devices", "disable", "--db", db, "pk-3")
    code, _, err = run(capsys, "devices", "confirm", "--db", db, "pk-3")
    assert code == 1 and "device 'pk-3' is disabled: enable it before confirming it" in err


def test_import_issues_credentials_to_a_new_0600_file(
    db: str, broker: FakeBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add(capsys, db, "pk-0", "--issue-credentials")
    src = tmp_path / "devices.csv"
    src.write_text(
        CSV_HEADER
        + f"pk-0,parking_sensor,东华门社区,{GRID},B1,b1\n"
        + f"pk-1,parking_sensor,东华门社区,{GRID},B1,b1\n"
        + f"pk-2,parking_sensr,东华门社区,{GRID},,b1\n"
        + f"pk-3,streetlight,东华门社区,{GRID},,b1\n",
        encoding="utf-8",
    )
    out_file = tmp_path / "secrets" / "creds.csv"
    out_file.parent.mkdir()
    code, out, _ = run(
        capsys, "devices", "import", "--db", db, str(src), "--issue-credentials", str(out_file)
    )
    assert code == 1  # one row with an error
    assert "1 created" not in out and "2 created, 1 updated" in out
    assert f"credentials of 2 new device(s) written to {out_file} (mode 0600)" in out
    assert stat.S_IMODE(os.stat(out_file).st_mode) == 0o600
    rows = list(csv.DictReader(io.StringIO(out_file.read_text())))
    assert [r["device_id"] for r in rows] == ["pk-1", "pk-3"]
    assert all(r["password"] == broker.accounts[r["device_id"]]["password"] for r in rows)
    assert rows[0]["username"] == rows[0]["client_id"] == "pk-1"

    code, _, err = run(
        capsys, "devices", "import", "--db", db, str(src), "--issue-credentials", str(out_file)
    )
    assert code == 1 and f"{out_file} exists: credentials go to a new file" in err


def test_import_dry_run_with_credentials_writes_no_file(
    db: str, broker: FakeBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "devices.csv"
    src.write_text(CSV_HEADER + f"pk-1,parking_sensor,c,{GRID},,\n", encoding="utf-8")
    out_file = tmp_path / "creds.csv"
    code, out, _ = run(
        capsys, "devices", "import", "--db", db, str(src), "--dry-run", "--issue-credentials", str(out_file)
    )
    assert code == 0 and "dry run" in out and not out_file.exists() and broker.accounts == {}


def test_import_with_credentials_shows_progress_for_bulk_work(
    db: str,
    broker: FakeBroker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SC_IMPORT_BATCH_SIZE", "100")
    src = tmp_path / "devices.csv"
    src.write_text(
        CSV_HEADER + "".join(f"pk-{i},parking_sensor,c,{GRID},,\n" for i in range(600)), encoding="utf-8"
    )
    out_file = tmp_path / "creds.csv"
    code, _, err = run(
        capsys, "devices", "import", "--db", db, str(src), "--issue-credentials", str(out_file)
    )
    assert code == 0 and "600/600 rows (100%)" in err and "100/600 rows" in err
    assert broker.batches == [100] * 6
    assert len(out_file.read_text().splitlines()) == 601


def test_export_csv_and_json(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    add(capsys, db, "pk-1", "--building", "B1", "--attr", "bay_kind=fire_lane")
    add(capsys, db, "pk-2")
    code, out, _ = run(capsys, "devices", "export", "--db", db)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["device_id"] for r in rows] == ["pk-1", "pk-2"] and rows[0]["attr.bay_kind"] == "fire_lane"
    target = tmp_path / "devices.json"
    code, _, err = run(capsys, "devices", "export", "--db", db, "--format", "json", "-o", str(target))
    assert code == 0 and "2 device(s) written to" in err
    assert [d["device_id"] for d in json.loads(target.read_text())] == ["pk-1", "pk-2"]

    csv_file = tmp_path / "devices.csv"
    csv_file.write_text(out, encoding="utf-8")
    code, out, _ = run(capsys, "devices", "import", "--db", db, str(csv_file))
    assert code == 0 and "2 unchanged" in out
    code, _, err = run(capsys, "devices", "export", "--db", db, "-o", str(tmp_path / "no" / "dir.csv"))
    assert code == 1 and "No such file or directory" in err


def test_commissioning(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    add(capsys, db, "pk-1", "--batch", "b1")
    add(capsys, db, "pk-2", "--batch", "b1")
    engine = make_engine(db)
    try:
        DeviceStateStore(engine).record_many(
            [StatusUpdate("pk-1", None, T0, None, False, last_topic="t", last_payload=b'{"occupied": true}')]
        )
    finally:
        engine.dispose()
    code, out, _ = run(capsys, "commissioning", "--db", db, "--batch", "b1")
    assert code == 0 and "2 devices: 2 registered" in out and "1 never heard from" in out
    assert '{"occupied": true}' in out and "never" in out
    doc = run_json(capsys, "commissioning", "--db", db, "--batch", "b1")
    assert [d["device_id"] for d in doc["devices"]] == ["pk-2", "pk-1"]
    assert doc["devices"][1]["last_payload"] == '{"occupied": true}'


def test_admin_credentials_from_the_settings_or_the_stack_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SC_MQTT_ADMIN_PASSWORD", raising=False)
    monkeypatch.setenv("SC_MQTT_ADMIN_FILE", str(tmp_path / "admin.json"))
    assert InstallerSettings().admin_credentials() is None
    (tmp_path / "admin.json").write_text(json.dumps({"username": "svc.admin", "password": "pw"}))
    assert InstallerSettings().admin_credentials() == ("svc.admin", "pw")
    monkeypatch.setenv("SC_MQTT_ADMIN_PASSWORD", "other")
    assert InstallerSettings().admin_credentials() == ("svc.admin", "other")


def test_an_unreachable_broker_is_unavailable_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.installers import CredentialsUnavailableError
    from stack.services import free_port

    monkeypatch.setenv("SC_MQTT_ADMIN_PASSWORD", "pw")
    monkeypatch.setenv("SC_MQTT_PORT", str(free_port()))
    issuer = BrokerIssuer(InstallerSettings())
    with pytest.raises(
        CredentialsUnavailableError, match="the broker cannot issue credentials now: connect: "
    ):
        issuer.create_device("pk-1", "parking_sensor")
