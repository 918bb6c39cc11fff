"""Codes and places as the installers enter them: component code schemes, component class vs device type,
grid codes, the place hierarchy, and the fields a device record gained for installers."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.installers import InstallerSettings
from gateway.registry import (
    MANHOLE_COVER_CLASSES,
    CodeScheme,
    CsvFormatError,
    DeviceRecord,
    PlaceRecord,
    ResponsibleUnitRecord,
    describe_validation_error,
    parent_place_code,
    parse_json_records,
    place_level,
    validation_context,
)

BASE: dict[str, Any] = {"community": "东华门社区", "grid_code": "110101001001001"}


def device(device_type: str, component_code: str | None = None, **more: Any) -> DeviceRecord:
    data = {"device_id": "d-1", "device_type": device_type, **BASE, "component_code": component_code, **more}
    return DeviceRecord.model_validate(data)


def error_of(device_type: str, component_code: str | None = None, **more: Any) -> str:
    with pytest.raises(ValidationError) as info:
        device(device_type, component_code, **more)
    return describe_validation_error(info.value)


# ---------------------------------------------------------------------------------------------
# Code schemes


def test_default_scheme_is_6_2_2_6() -> None:
    scheme = CodeScheme()
    assert str(scheme) == "6+2+2+6" and scheme.length == 16
    parts = scheme.split("3205080101000001")
    assert (parts.admin, parts.major, parts.minor, parts.serial) == ("320508", "01", "01", "000001")
    assert parts.component_class == "0101"


def test_6_2_3_5_scheme_reads_the_same_class_from_a_three_digit_minor() -> None:
    scheme = CodeScheme.parse("6+2+3+5")
    parts = scheme.split("3205080100100001")
    assert (parts.admin, parts.major, parts.minor, parts.serial) == ("320508", "01", "001", "00001")
    assert parts.component_class == "0101"
    assert scheme.check("3205080101800001", "streetlight").component_class == "0118"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("6+2+2", "expected four numbers like 6+2+2+6"),
        ("6+2+x+6", "expected four numbers like 6+2+2+6"),
        ("6+2+2+7", "must be 6+2+minor+serial = 16 digits"),
        ("6+2+5+3", "with a 2 to 4 digit minor class"),
        ("4+2+4+6", "starts with the 6-digit administrative code and a 2-digit major class"),
        ("6+3+2+5", "starts with the 6-digit administrative code and a 2-digit major class"),
    ],
)
def test_bad_scheme_is_refused_saying_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        CodeScheme.parse(text)


def test_the_scheme_is_a_setting_checked_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SC_COMPONENT_CODE_SPLIT", "6+2+3+5")
    assert InstallerSettings().code_scheme == CodeScheme(6, 2, 3, 5)
    monkeypatch.setenv("SC_COMPONENT_CODE_SPLIT", "6+2+2")
    with pytest.raises(ValidationError, match="expected four numbers"):
        InstallerSettings()


# ---------------------------------------------------------------------------------------------
# Component class vs device type


@pytest.mark.parametrize("cls", MANHOLE_COVER_CLASSES)
def test_every_cover_class_fits_a_manhole_cover(cls: str) -> None:
    assert device("manhole_cover", f"110101{cls}000001").component_code == f"110101{cls}000001"


def test_a_manhole_cover_with_another_class_is_refused_naming_the_covers() -> None:
    message = error_of("manhole_cover", "1101010118000001")
    assert (
        "component_code: class 0118 路灯 does not fit a manhole_cover: expected one of 0101 上水井盖"
        in message
    )
    assert "0114 无主井盖" in message
    assert "class 0104 does not fit a manhole_cover" in error_of("manhole_cover", "1101010104000001")


@pytest.mark.parametrize("cls", ["0118", "0117"])
def test_a_streetlight_is_a_lamp_or_a_pole(cls: str) -> None:
    assert device("streetlight", f"110101{cls}000001").component_code is not None


def test_a_streetlight_with_a_cover_class_is_refused() -> None:
    assert "class 0101 上水井盖 does not fit a streetlight: expected one of 0118 路灯, 0117 立杆" in error_of(
        "streetlight", "1101010101000001"
    )


@pytest.mark.parametrize(
    ("device_type", "code"),
    [
        ("parking_sensor", "1101010201000001"),  # 0201 停车场
        ("access_control", "1101010701000001"),  # 07 扩展部件
        ("smoke_detector", "1101010601000001"),  # 06 其他设施
    ],
)
def test_other_types_take_any_known_major_class(device_type: str, code: str) -> None:
    assert device(device_type, code).component_code == code


def test_an_unknown_major_class_is_refused_for_every_type() -> None:
    assert "major class 09 is not a component class (known: 01 公用设施" in error_of(
        "parking_sensor", "1101010901000001"
    )


def test_the_component_code_is_optional_for_every_type() -> None:
    assert device("manhole_cover").component_code is None
    assert device("streetlight").component_code is None


def test_component_code_length_and_digits() -> None:
    assert "component_code: must be 16 digits (got '110101010100001')" in error_of(
        "manhole_cover", "110101010100001"
    )
    assert "component_code: must be 16 digits" in error_of("manhole_cover", "11010101010000０1")


def test_a_component_code_given_as_a_json_number_is_text() -> None:
    record = DeviceRecord.model_validate(
        {"device_id": "d", "device_type": "manhole_cover", **BASE, "component_code": 1101010101000001}
    )
    assert record.component_code == "1101010101000001"


def test_the_validation_context_picks_the_scheme() -> None:
    data = {"device_id": "d", "device_type": "manhole_cover", **BASE, "component_code": "1101010100100001"}
    wide = DeviceRecord.model_validate(data, context=validation_context(CodeScheme.parse("6+2+3+5")))
    assert wide.component_code == "1101010100100001"
    with pytest.raises(ValidationError, match="class 0100 does not fit a manhole_cover"):
        DeviceRecord.model_validate(data)  # the default split reads minor 00


def test_owner_class_is_a_cover_class_and_agrees_with_the_component_code() -> None:
    assert device("manhole_cover", "1101010111000001", attributes={"owner_class": "0111"}).attributes == {
        "owner_class": "0111"
    }
    assert "owner_class must be one of 0101, 0102" in error_of(
        "manhole_cover", None, attributes={"owner_class": "0118"}
    )
    assert "owner_class 0102 does not match the component code's class 0101" in error_of(
        "manhole_cover", "1101010101000001", attributes={"owner_class": "0102"}
    )


# ---------------------------------------------------------------------------------------------
# Grid codes and the installers' fields


def test_grid_code_fourteen_or_fifteen_digits() -> None:
    assert device("smoke_detector", grid_code="11010100100101").grid_code == "11010100100101"
    message = error_of("smoke_detector", grid_code="1101010010010")
    assert "grid_code: must be 14 or 15 digits (got '1101010010010')" in message


def test_install_date_firmware_and_batch() -> None:
    record = device("smoke_detector", install_date="2026-11-20", firmware="2.1.0", batch="2026-11 楼 3")
    assert str(record.install_date) == "2026-11-20" and record.firmware == "2.1.0"
    assert "install_date: Input should be a valid date" in error_of(
        "smoke_detector", install_date="2026-13-01"
    )
    assert "batch: must be 1 to 64 characters without control characters" in error_of(
        "smoke_detector", batch="a\tb"
    )
    assert "firmware: String should have at most 64 characters" in error_of(
        "smoke_detector", firmware="x" * 65
    )


def test_json_records_report_each_bad_row_and_ignore_an_exports_read_only_fields() -> None:
    good = {"device_id": "a", "device_type": "smoke_detector", **BASE}
    parsed = parse_json_records(
        [
            {**good, "lifecycle": "online", "version": 7, "created_at": "x", "state": None},
            "not an object",
            {**good, "grid_code": "12"},
            good,
            {**good, "device_id": "b", "colour": "red"},
        ]
    )
    assert [(row, r.device_id) for row, r in parsed.records] == [(1, "a")]
    errors = {e.row: (e.device_id, e.error) for e in parsed.errors}
    assert errors[2] == (None, "not a JSON object")
    assert errors[3] == ("a", "duplicate device_id 'a': already at position 1")
    assert errors[4] == ("a", "duplicate device_id 'a': already at position 1")
    assert errors[5] == ("b", "colour: unknown field")


def test_json_import_that_is_not_a_list_is_refused_whole() -> None:
    with pytest.raises(CsvFormatError, match="expected a JSON array of device objects"):
        parse_json_records({"device_id": "a"})


# ---------------------------------------------------------------------------------------------
# Places


@pytest.mark.parametrize(
    ("code", "level", "parent"),
    [
        ("110101", "district", None),
        ("110101001", "street", "110101"),
        ("110101001002", "community", "110101001"),
        ("110101001002003", "grid", "110101001002"),
        ("11010100100203", "grid", "110101001002"),
    ],
)
def test_place_level_and_parent_follow_from_the_code(code: str, level: str, parent: str | None) -> None:
    assert place_level(code) == level and parent_place_code(code) == parent
    place = PlaceRecord.model_validate({"code": code, "name": "x"})
    assert (place.level, place.parent_code) == (level, parent)


@pytest.mark.parametrize("code", ["11010", "1101010", "1101010010010011", "11010100100A", "１１０１０１"])
def test_place_codes_of_other_lengths_or_not_digits_are_refused(code: str) -> None:
    with pytest.raises(ValidationError) as info:
        PlaceRecord.model_validate({"code": code, "name": "x"})
    assert "code: must be 6 (district), 9 (street), 12 (community), 15 or 14 (grid) digits" in (
        describe_validation_error(info.value)
    )


def test_a_given_level_or_parent_must_agree_with_the_code() -> None:
    with pytest.raises(
        ValidationError, match="code 110101001 is a street code \\(9 digits\\), not a community"
    ):
        PlaceRecord.model_validate({"code": "110101001", "name": "x", "level": "community"})
    with pytest.raises(
        ValidationError, match="parent_code 110102 does not fit code 110101001: expected 110101"
    ):
        PlaceRecord.model_validate({"code": "110101001", "name": "x", "parent_code": "110102"})
    with pytest.raises(ValidationError, match="expected none \\(a district has no parent\\)"):
        PlaceRecord.model_validate({"code": "110101", "name": "x", "parent_code": "110100"})
    assert (
        PlaceRecord.model_validate({"code": "110101001", "name": "x", "parent_code": "110101"}).level
        == "street"
    )


def test_place_name_is_required() -> None:
    with pytest.raises(ValidationError) as info:
        PlaceRecord.model_validate({"code": "110101", "name": " "})
    assert "name: String should have at least 1 character" in describe_validation_error(info.value)


def test_responsible_unit_id_is_checked() -> None:
    assert ResponsibleUnitRecord(unit_id="water.co-1", name="市自来水集团", kind=" ").kind is None
    with pytest.raises(ValidationError, match=re.escape("must be 1 to 64 characters of A-Z a-z 0-9 _ . -")):
        ResponsibleUnitRecord(unit_id="水务", name="x")
