"""`sc-gateway` db / devices / deadletters commands, driven through main() against a SQLite file."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import pytest

from gateway import cli
from gateway.db import make_engine
from gateway.deadletter import DeadLetter, DeadLetterStore

CSV = (
    "device_id,device_type,community,grid_code,building,attr.bay_kind\n"
    "pk-1,parking_sensor,东华门社区,110101001001001,B1,fire_lane\n"
    "pk-2,parking_sensor,东华门社区,1101,B1,\n"
    "pk-3,streetlight,西华门社区,110101001002001,,\n"
)


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv(cli.ENV_DATABASE_URL, raising=False)
    url = f"sqlite:///{tmp_path / 'var' / 'registry.db'}"
    assert cli.main(["--db", url, "db", "migrate"]) == 0
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_add_then_show_and_list_json(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "devices", "add", "--db", db, "--id", "mh-0001", "--type", "manhole_cover",
        "--community", "东华门社区", "--grid-code", "110101001001001",
        "--component-code", "3205080101000001", "--lat", "39.91", "--attr", "owner_class=0101",
    )  # fmt: skip
    assert code == 0 and "registered manhole_cover mh-0001" in out

    code, out, _ = run(capsys, "devices", "show", "mh-0001", "--db", db)
    assert code == 0 and "3205080101000001" in out and "attr.owner_class" in out and "never seen" in out

    code, out, _ = run(capsys, "--json", "--db", db, "devices", "list")
    assert code == 0
    devices = json.loads(out)
    assert [d["device_id"] for d in devices] == ["mh-0001"]
    assert devices[0]["attributes"] == {"owner_class": "0101"} and devices[0]["lifecycle"] == "registered"


def test_add_rejects_duplicates_and_bad_values(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["devices", "add", "--db", db, "--type", "streetlight", "--community", "c"]
    assert run(capsys, *base, "--id", "sl-1", "--grid-code", "110101001001001")[0] == 0
    code, _, err = run(capsys, *base, "--id", "sl-1", "--grid-code", "110101001001001")
    assert code == 1 and "already registered" in err
    code, _, err = run(capsys, *base, "--id", "sl 2", "--grid-code", "12")
    assert code == 1 and "device_id: must be 1 to 64" in err and "grid_code: must be 14 or 15 digits" in err


def test_import_reports_the_bad_row_and_exits_1(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "devices.csv"
    path.write_text(CSV, encoding="utf-8")
    code, out, _ = run(capsys, "devices", "import", str(path), "--db", db)
    assert code == 1
    assert "2 created" in out and "1 with errors" in out
    error_line = next(line for line in out.splitlines() if line.startswith("3 "))
    assert "pk-2" in error_line and "grid_code: must be 14 or 15 digits" in error_line

    code, out, _ = run(capsys, "devices", "list", "--db", db, "--json", "--community", "东华门社区")
    assert [d["device_id"] for d in json.loads(out)] == ["pk-1"]

    # Importing again: the good rows are unchanged, the bad row still fails.
    code, out, _ = run(capsys, "--json", "devices", "import", str(path), "--db", db)
    report = json.loads(out)
    assert code == 1 and report["counts"] == {"created": 0, "updated": 0, "unchanged": 2, "error": 1}
    assert report["rows"][1] == {
        "row": 3,
        "device_id": "pk-2",
        "outcome": "error",
        "error": "grid_code: must be 14 or 15 digits (got '1101')",
    }


def test_import_dry_run_and_clean_file(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "good.csv"
    path.write_text(
        "\n".join(line for line in CSV.splitlines() if "pk-2" not in line) + "\n", encoding="utf-8"
    )
    code, out, _ = run(capsys, "devices", "import", str(path), "--dry-run", "--db", db)
    assert code == 0 and "2 created" in out and "dry run" in out
    assert json.loads(run(capsys, "devices", "list", "--json", "--db", db)[1]) == []
    assert run(capsys, "devices", "import", str(path), "--db", db)[0] == 0


def test_import_progress_goes_to_stderr_for_big_files(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.csv"
    rows = [f"d-{i},smoke_detector,c,110101001001001" for i in range(cli.PROGRESS_MIN_ROWS)]
    path.write_text("device_id,device_type,community,grid_code\n" + "\n".join(rows) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "devices", "import", str(path), "--db", db)
    assert code == 0 and f"{cli.PROGRESS_MIN_ROWS} created" in out
    assert f"{cli.PROGRESS_MIN_ROWS}/{cli.PROGRESS_MIN_ROWS} rows (100%)" in err


def test_import_with_a_bad_header_fails_whole(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "typo.csv"
    path.write_text("device_id,device_type,community,gridcode\n", encoding="utf-8")
    code, _, err = run(capsys, "devices", "import", str(path), "--db", db)
    assert code == 1 and "unknown column(s) 'gridcode'" in err
    code, _, err = run(capsys, "devices", "import", str(tmp_path / "missing.csv"), "--db", db)
    assert code == 1 and "missing.csv" in err


def test_set_lifecycle_and_show_unknown(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "devices", "add", "--db", db, "--id", "a", "--type", "streetlight", "--community", "c",
        "--grid-code", "110101001001001")  # fmt: skip
    code, out, _ = run(capsys, "devices", "set-lifecycle", "a", "disabled", "--db", db)
    assert code == 0 and "disabled" in out
    code, _, err = run(capsys, "devices", "show", "nope", "--db", db)
    assert code == 1 and "not registered" in err


def test_deadletter_commands(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    engine = make_engine(db)
    now = dt.datetime.now(dt.UTC)
    DeadLetterStore(engine).add_many(
        [
            DeadLetter(now, "sc/v1/parking_sensor/ghost/telemetry", "ghost", "parking_sensor",
                       "unregistered_device", "device 'ghost' is not registered", b'{"occupied": true}'),
            DeadLetter(now, "sc/v1/parking_sensor/ghost/telemetry", "ghost", "parking_sensor",
                       "unregistered_device", "device 'ghost' is not registered", b'{"occupied": false}'),
            DeadLetter(now, "sc/v1/streetlight/sl-1/telemetry", "sl-1", "streetlight",
                       "unknown_field", "unknown field 'lamp'", b'{"lamp": 1}'),
        ]
    )  # fmt: skip
    engine.dispose()

    code, out, _ = run(capsys, "deadletters", "counts", "--db", db, "--json")
    assert code == 0 and json.loads(out) == {"unregistered_device": 2, "unknown_field": 1}

    code, out, _ = run(capsys, "deadletters", "list", "--reason", "unknown_field", "--db", db)
    assert code == 0 and "sl-1" in out and "ghost" not in out

    code, out, _ = run(
        capsys, "deadletters", "list", "--device", "ghost", "--limit", "1", "--db", db, "--json"
    )
    assert [d["payload"] for d in json.loads(out)] == [
        '{"occupied": false}'
    ]  # same time: the later insert is newer

    code, out, _ = run(capsys, "deadletters", "unknown", "--since", "1h", "--db", db)
    assert code == 0 and "ghost" in out and "parking_sensor" in out and "2" in out

    code, out, _ = run(capsys, "deadletters", "prune", "--older-than", "1d", "--db", db)
    assert code == 0 and "deleted 0" in out


def test_unmigrated_database_is_refused_with_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "devices", "list", "--db", f"sqlite:///{tmp_path / 'new.db'}")
    assert code == 1 and "sc-gateway db migrate" in err


def test_database_url_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(cli.ENV_DATABASE_URL, f"sqlite:///{tmp_path / 'env' / 'r.db'}")
    assert run(capsys, "db", "migrate")[0] == 0
    assert (tmp_path / "env" / "r.db").is_file()
    code, out, _ = run(capsys, "db", "current", "--json")
    assert code == 0 and json.loads(out)["current"] is True


def test_default_database_is_created_under_dot_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(cli.ENV_DATABASE_URL, raising=False)
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "db", "migrate")[0] == 0
    assert (tmp_path / ".var" / "registry.db").is_file()


def test_other_modules_can_add_commands(capsys: pytest.CaptureFixture[str]) -> None:
    def add_probe_commands(sub: cli.SubParsers) -> None:
        p = cli.add_command(sub, "probe", "a command from another module", lambda args: 7 if args.json else 3)
        p.add_argument("--workers", type=int, default=1)

    commands = [*cli.COMMANDS, add_probe_commands]
    assert cli.main(["probe", "--workers", "2"], commands=commands) == 3
    assert cli.main(["--json", "probe"], commands=commands) == 7
    parser = cli.build_parser(commands)
    assert isinstance(parser, argparse.ArgumentParser)
    with pytest.raises(SystemExit):
        parser.parse_args(["devices"])  # a group needs a command


@pytest.mark.parametrize(("text", "minutes"), [("30m", 30), ("24h", 1440), ("7d", 10080), ("2w", 20160)])
def test_parse_since_durations(text: str, minutes: int) -> None:
    expected = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes)
    assert abs((cli.parse_since(text) - expected).total_seconds()) < 5


def test_parse_since_iso_times_default_to_utc() -> None:
    assert cli.parse_since("2026-11-21T08:00:00") == dt.datetime(2026, 11, 21, 8, tzinfo=dt.UTC)
    assert cli.parse_since("2026-11-21T08:00:00+08:00").utcoffset() == dt.timedelta(hours=8)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_since("yesterday")


def test_format_table_aligns_wide_characters() -> None:
    table = cli.format_table(["community", "n"], [("东华门社区", 1), ("abc", None)])
    lines = table.splitlines()
    assert lines[2] == "东华门社区  1"
    assert lines[3] == "abc         -"
