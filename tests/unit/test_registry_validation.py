"""DeviceRecord validation and CSV parsing: every bad row is reported with its row number and reason."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine

from gateway.db import make_engine, migrate_engine
from gateway.registry import (
    DEVICE_TYPES,
    CsvFormatError,
    DeviceInfo,
    DeviceRecord,
    ImportReport,
    Registry,
    RowResult,
    describe_validation_error,
    parse_csv,
)

GOOD: dict[str, Any] = {
    "device_id": "mh-0001",
    "device_type": "manhole_cover",
    "community": "东华门社区",
    "grid_code": "110101001001001",
}


def error_of(**changes: Any) -> str:
    with pytest.raises(ValidationError) as info:
        DeviceRecord.model_validate({**GOOD, **changes})
    return describe_validation_error(info.value)


def test_minimal_record_is_valid_and_optional_fields_default_to_none() -> None:
    record = DeviceRecord.model_validate(GOOD)
    assert record.device_id == "mh-0001"
    assert record.district is None and record.lat is None and record.component_code is None
    assert record.attributes == {}


def test_full_record_is_valid() -> None:
    record = DeviceRecord(
        **GOOD,
        district="东城区",
        street="东华门街道",
        building="3",
        address="东华门大街 1 号",
        lat=39.91,
        lon=116.40,
        responsible_unit="自来水公司",
        component_code="3205080101000001",
        attributes={"owner_class": "0101", "depth_cm": 180, "tilt_baseline_deg": "1.5"},
    )
    assert record.component_code == "3205080101000001"
    assert record.attributes["depth_cm"] == 180
    assert record.attributes["tilt_baseline_deg"] == 1.5  # spreadsheet text becomes the declared kind


def test_fourteen_digit_grid_code_is_accepted() -> None:
    assert DeviceRecord.model_validate({**GOOD, "grid_code": "11010100100101"}).grid_code == "11010100100101"


def test_grid_code_given_as_a_number_is_stored_as_text() -> None:
    assert DeviceRecord.model_validate({**GOOD, "grid_code": 110101001001001}).grid_code == "110101001001001"


def test_every_device_type_is_accepted() -> None:
    for device_type in DEVICE_TYPES:
        assert DeviceRecord.model_validate({**GOOD, "device_type": device_type}).device_type == device_type


def test_text_is_stripped_and_blank_optional_fields_are_none() -> None:
    record = DeviceRecord.model_validate({**GOOD, "device_id": " mh-0001 ", "street": "  ", "lat": ""})
    assert record.device_id == "mh-0001"
    assert record.street is None and record.lat is None


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"device_id": "mh 0001"},
            "device_id: must be 1 to 64 characters of A-Z a-z 0-9 _ - (got 'mh 0001')",
        ),
        ({"device_id": "x" * 65}, "device_id: must be 1 to 64 characters"),
        ({"device_id": "井盖1"}, "device_id: must be 1 to 64 characters"),
        ({"device_id": ""}, "device_id: is required"),
        ({"device_type": "manhole"}, "device_type: unknown device type (known: manhole_cover, streetlight"),
        ({"device_type": ""}, "device_type: is required"),
        ({"grid_code": "1101010010010"}, "grid_code: must be 14 or 15 digits (got '1101010010010')"),
        ({"grid_code": "1101010010010011"}, "grid_code: must be 14 or 15 digits"),
        ({"grid_code": "11010100100100A"}, "grid_code: must be 14 or 15 digits"),
        (
            {"grid_code": "１１０１０１００１００１００１"},
            "grid_code: must be 14 or 15 digits",
        ),  # full-width digits
        ({"community": " "}, "community: is required"),
        ({"community": "和平里\n社区"}, "community: must not contain control characters"),
        ({"building": "3号\t楼"}, "building: must not contain control characters"),
        ({"component_code": "320508010100001"}, "component_code: must be 16 digits (got '320508010100001')"),
        ({"lat": 91}, "lat: Input should be less than or equal to 90"),
        ({"lon": -180.5}, "lon: Input should be greater than or equal to -180"),
        ({"lat": "north"}, "lat: Input should be a valid number"),
        ({"attributes": {"bay kind": "x"}}, "attributes: invalid attribute name(s) 'bay kind'"),
        ({"attributes": {"bay_kind": "x"}}, "attributes: unknown attribute 'bay_kind' for manhole_cover"),
        ({"attributes": {"depth_cm": "deep"}}, "attributes: depth_cm must be a number (got 'deep')"),
        ({"attributes": {"tilt_baseline_deg": 200}}, "tilt_baseline_deg must be within 0 – 180 °"),
        ({"colour": "red"}, "colour: unknown field"),
    ],
)
def test_invalid_records_say_which_field_and_why(changes: dict[str, Any], expected: str) -> None:
    assert expected in error_of(**changes)


def test_missing_required_field_is_reported() -> None:
    data = dict(GOOD)
    del data["grid_code"]
    with pytest.raises(ValidationError) as info:
        DeviceRecord.model_validate(data)
    assert describe_validation_error(info.value) == "grid_code: is required"


def test_several_problems_are_reported_together() -> None:
    message = error_of(grid_code="1", lat=100)
    assert "grid_code:" in message and "lat:" in message and "; " in message


def test_record_is_frozen() -> None:
    record = DeviceRecord.model_validate(GOOD)
    with pytest.raises(ValidationError):
        record.community = "elsewhere"


def test_device_info_active_follows_lifecycle() -> None:
    info = DeviceInfo("d1", "streetlight", "c", "110101001001001", None, None, None, None, "online")
    assert info.active
    for lifecycle in ("disabled", "retired"):
        assert not DeviceInfo("d1", "streetlight", None, None, None, None, None, None, lifecycle).active


def test_import_report_counts() -> None:
    report = ImportReport(
        rows=(
            RowResult(2, "a", "created"),
            RowResult(3, "b", "error", "bad"),
            RowResult(4, "c", "unchanged"),
        )
    )
    assert report.counts == {"created": 1, "updated": 0, "unchanged": 1, "error": 1}
    assert not report.ok
    assert [r.row for r in report.errors] == [3]


# ---------------------------------------------------------------------------------------------
# CSV

HEADER = (
    "device_id,device_type,community,grid_code,building,lat,lon,component_code,"
    "attr.bay_kind,attr.time_limit_min\n"
)


def parse(text: str) -> Any:
    return parse_csv(io.StringIO(text))


def test_csv_rows_become_records_with_spreadsheet_row_numbers() -> None:
    parsed = parse(
        HEADER
        + "pk-1,parking_sensor,东华门社区,110101001001001,B1,39.9,116.4,,time_limited,120\n"
        + "pk-2,parking_sensor,东华门社区,110101001001001,,,,,,\n"
    )
    assert parsed.errors == ()
    (row1, first), (row2, second) = parsed.records
    assert (row1, row2) == (2, 3)
    assert first.attributes == {"bay_kind": "time_limited", "time_limit_min": 120.0}
    assert first.lat == pytest.approx(39.9)
    assert second.attributes == {} and second.building is None


def test_csv_bad_rows_are_reported_and_good_rows_kept() -> None:
    parsed = parse(
        HEADER
        + "pk-1,parking_sensor,c,110101001001001,,,,,,\n"
        + "pk-2,parking_sensr,c,110101001001001,,,,,,\n"
        + "pk-3,parking_sensor,c,1101,,,,,,\n"
        + "pk-4,parking_sensor,c,110101001001001,,95,,,,\n"
        + "pk-1,parking_sensor,c,110101001001001,,,,,,\n"
        + ",parking_sensor,c,110101001001001,,,,,,\n"
        + "pk-5,parking_sensor,c,110101001001001,,,,12345,,\n"
        + "pk-6,parking_sensor,c,110101001001001,,,,,,,surplus\n"
        + "pk-7,streetlight,c,110101001001001,,,,,,\n"
    )
    assert [(row, r.device_id) for row, r in parsed.records] == [(2, "pk-1"), (10, "pk-7")]
    errors = {e.row: (e.device_id, e.error) for e in parsed.errors}
    assert set(errors) == {3, 4, 5, 6, 7, 8, 9}
    assert all(e.outcome == "error" for e in parsed.errors)
    assert errors[3][0] == "pk-2" and "device_type: unknown device type" in str(errors[3][1])
    assert "grid_code: must be 14 or 15 digits (got '1101')" in str(errors[4][1])
    assert "lat: Input should be less than or equal to 90" in str(errors[5][1])
    assert errors[6] == ("pk-1", "duplicate device_id 'pk-1': already on row 2")
    assert errors[7] == (None, "device_id: is required")
    assert "component_code: must be 16 digits" in str(errors[8][1])
    assert errors[9] == ("pk-6", "the row has 11 cells but the header names 10 columns")


def test_csv_blank_lines_are_skipped_and_trailing_empty_cells_ignored() -> None:
    parsed = parse(HEADER + "\n" + "pk-1,parking_sensor,c,110101001001001,,,,,,,,\n" + ",,,,,,,,,\n")
    assert [row for row, _ in parsed.records] == [3]
    assert parsed.errors == ()


def test_csv_short_rows_are_padded() -> None:
    parsed = parse(
        "device_id,device_type,community,grid_code,street\npk-1,parking_sensor,c,110101001001001\n"
    )
    assert parsed.records[0][1].street is None


def test_csv_header_names_are_stripped_and_quoted_cells_may_hold_commas() -> None:
    parsed = parse(
        ' device_id , device_type,community,grid_code,address\npk-1,streetlight,c,110101001001001,"1, Road"\n'
    )
    assert parsed.records[0][1].address == "1, Road"


def test_csv_with_bom_from_excel(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_bytes(("\ufeff" + HEADER + "pk-1,parking_sensor,东华门社区,110101001001001,,,,,,\n").encode())
    parsed = parse_csv(path)
    assert parsed.records[0][1].community == "东华门社区"
    assert parse_csv(str(path)).records == parsed.records


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("device_id,device_type,community,gridcode\n", "unknown column(s) 'gridcode'"),
        ("device_id,device_type,community\n", "missing required column(s) grid_code"),
        ("device_id,device_type,community,grid_code,street,street\n", "duplicate column(s) 'street'"),
        ("device_id,device_type,community,grid_code,attr.bad name\n", "unknown column(s) 'attr.bad name'"),
        ("device_id,device_type,community,grid_code,attributes\n", "unknown column(s) 'attributes'"),
    ],
)
def test_csv_header_problems_reject_the_whole_file(header: str, expected: str) -> None:
    with pytest.raises(CsvFormatError, match=re.escape(expected)):
        parse(header + "pk-1,parking_sensor,c,110101001001001,x,y\n")


def test_empty_csv_is_a_file_error() -> None:
    with pytest.raises(CsvFormatError, match="the file is empty"):
        parse("")


def test_csv_that_is_not_utf8_is_a_file_error(tmp_path: Path) -> None:
    path = tmp_path / "gbk.csv"
    path.write_bytes((HEADER + "pk-1,parking_sensor,东华门社区,110101001001001,,,,,,\n").encode("gbk"))
    with pytest.raises(CsvFormatError, match="not utf-8-sig text"):
        parse_csv(path)
    assert parse_csv(path, encoding="gbk").records[0][1].community == "东华门社区"


# ---------------------------------------------------------------------------------------------
# In-memory SQLite: the registry works without a file (one shared connection)


@pytest.fixture
def memory_engine() -> Iterator[Engine]:
    engine = make_engine("sqlite://")
    migrate_engine(engine)
    yield engine
    engine.dispose()


def test_registry_on_in_memory_sqlite(memory_engine: Engine) -> None:
    registry = Registry(memory_engine)
    report = registry.import_csv(
        io.StringIO(
            HEADER + "pk-1,parking_sensor,c,110101001001001,,,,,,\npk-2,bad,c,110101001001001,,,,,,\n"
        )
    )
    assert report.counts == {"created": 1, "updated": 0, "unchanged": 0, "error": 1}
    info = registry.get("pk-1")
    assert info is not None and info.lifecycle == "registered"
    assert registry.current_version() == 1


def test_upsert_many_flags_repeated_ids_by_position(memory_engine: Engine) -> None:
    record = DeviceRecord.model_validate(GOOD)
    report = Registry(memory_engine).upsert_many([record, record])
    assert [(r.row, r.outcome) for r in report.rows] == [(1, "created"), (2, "error")]
    assert report.rows[1].error == "duplicate device_id: already at position 1"
