"""Rule files: the YAML format, overrides, and load-time errors that name the file, rule and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from rules.loader import LIFECYCLES, RuleLoadError, load_rules

HEAD = """\
device_type: manhole_cover
rules:
  tilt:
    title_zh: 井盖倾斜
    title_en: Tilted
    urgency: P2
"""


def write(tmp_path: Path, body: str, name: str = "manhole_cover.yaml") -> Path:
    f = tmp_path / name
    f.write_text(textwrap.dedent(body), encoding="utf-8")
    return f


def load_error(tmp_path: Path, body: str) -> RuleLoadError:
    f = write(tmp_path, body)
    with pytest.raises(RuleLoadError) as info:
        load_rules([f])
    err = info.value
    assert err.file == str(f)
    assert str(err).startswith(f"{f}:")
    return err


def test_a_valid_file(tmp_path: Path) -> None:
    f = write(tmp_path, HEAD + "    kind: threshold\n    field: tilt_deg\n    above: 10\n")
    rs = load_rules([f])
    (r,) = rs.rules
    assert r.id == "manhole_cover.tilt" and r.urgency == "P2" and r.source == f"{f}:3"


@pytest.mark.parametrize(
    ("tail", "line", "words"),
    [
        (
            "    kind: threshold\n    field: tilt_degrees\n    above: 10\n",
            8,
            "no telemetry field 'tilt_degrees'",
        ),
        (
            "    kind: threshold\n    field: cover_open\n    above: 0\n",
            8,
            "numeric test on bool field 'cover_open'",
        ),
        ("    kind: state_duration\n    field: tilt_deg\n", 8, "a state needs a boolean or enumerated field"),
        (
            "    kind: state_duration\n    field: cover_open\n    equals: open\n",
            9,
            "equals must be true or false",
        ),
        (
            "    kind: threshold\n    field: tilt_deg\n    above: {attr: tilt_zero, plus: 10}\n",
            9,
            "no attribute 'tilt_zero'",
        ),
        (
            "    kind: threshold\n    field: tilt_deg\n    above: {attr: owner_class}\n",
            9,
            "attribute 'owner_class' is a string, a number is needed",
        ),
        (
            "    kind: threshold\n    field: tilt_deg\n    above: 10\n    fire_on_events: [boom]\n",
            10,
            "no event 'boom'",
        ),
        ("    kind: threshold\n    field: tilt_deg\n    abve: 10\n", 9, "unknown parameter 'abve'"),
        ("    kind: thresold\n    field: tilt_deg\n", 7, "unknown or missing kind"),
        ("    kind: threshold\n    field: tilt_deg\n", 3, "a threshold needs one of above"),
        ("    kind: threshold\n    field: tilt_deg\n    above: 10\n    consecutive: 0\n", 10, "consecutive"),
        (
            "    kind: threshold\n    field: tilt_deg\n    above: 10\n    where: {colour: red}\n",
            10,
            "no attribute 'colour'",
        ),
        (
            "    kind: threshold\n    field: tilt_deg\n    above: 10\n    lifecycles: [sleeping]\n",
            10,
            "unknown lifecycle 'sleeping'",
        ),
        (
            "    kind: event_count\n    events: [tamper]\n",
            8,
            "manhole_cover has no event 'tamper' (events: none)",
        ),
    ],
)
def test_invalid_rules_name_file_rule_and_line(tmp_path: Path, tail: str, line: int, words: str) -> None:
    err = load_error(tmp_path, HEAD + tail)
    assert err.rule == "manhole_cover.tilt"
    assert words in err.detail, err.detail
    assert err.line == line, str(err)


def test_where_value_must_be_a_choice(tmp_path: Path) -> None:
    body = """\
    device_type: parking_sensor
    rules:
      lane:
        title_zh: 消防通道
        title_en: Fire lane
        urgency: P2
        where: {bay_kind: firelane}
        kind: state_duration
        field: occupied
    """
    err = load_error(tmp_path, body)
    assert err.rule == "parking_sensor.lane" and err.line == 7
    assert "bay_kind must be one of normal, fire_lane, no_parking, time_limited" in err.detail


def test_missing_meta_and_bad_names(tmp_path: Path) -> None:
    err = load_error(tmp_path, "device_type: manhole_cover\nrules:\n  tilt:\n    kind: absence\n")
    assert err.rule == "manhole_cover.tilt" and "missing title_zh" in err.detail and err.line == 3
    err = load_error(tmp_path, HEAD.replace("tilt:", "Tilt-1:") + "    kind: absence\n")
    assert "snake_case" in err.detail
    err = load_error(tmp_path, "device_type: manhole_kover\n")
    assert "unknown device type 'manhole_kover'" in err.detail and err.line == 1
    err = load_error(tmp_path, "device_typ: manhole_cover\n")
    assert "unknown key 'device_typ'" in err.detail


def test_yaml_syntax_error_has_its_line(tmp_path: Path) -> None:
    err = load_error(tmp_path, HEAD + "    kind: [threshold\n    field: x\n")
    assert err.rule is None and err.line is not None and err.line >= 7
    assert "not valid YAML" in err.detail


def test_overrides_are_validated(tmp_path: Path) -> None:
    base = HEAD + "    kind: threshold\n    field: tilt_deg\n    above: 10\n"
    err = load_error(tmp_path, base + "overrides:\n  device:\n    mh-1:\n      tilt: {above: cow}\n")
    assert err.rule == "manhole_cover.tilt" and err.line == 13 and "above" in err.detail
    err = load_error(tmp_path, base + "overrides:\n  device:\n    mh-1:\n      tilt: {field: cover_open}\n")
    assert "numeric test on bool field" in err.detail
    err = load_error(tmp_path, base + "overrides:\n  community:\n    c1:\n      tlit: {above: 12}\n")
    assert err.rule == "manhole_cover.tlit" and "override of an unknown rule" in err.detail and err.line == 13
    err = load_error(tmp_path, base + "overrides:\n  device:\n    mh-1:\n      tilt: {kind: absence}\n")
    assert "'kind' cannot be overridden" in err.detail
    err = load_error(tmp_path, base + "overrides:\n  street:\n    s1: {}\n")
    assert "overrides has `community:` and/or `device:`" in err.detail


def test_a_site_file_overrides_the_defaults(tmp_path: Path) -> None:
    base = write(tmp_path, HEAD + "    kind: threshold\n    field: tilt_deg\n    above: 10\n")
    site = write(
        tmp_path,
        """\
        # site overrides only
        overrides:
          device:
            mh-7:
              manhole_cover.tilt: {above: 15, urgency: P1}
        """,
        name="zz-site.yaml",
    )
    rs = load_rules([base, site])
    (r,) = rs.rules
    v = r.device_overrides["mh-7"]
    assert v.urgency == "P1" and v.params.above == 15  # type: ignore[union-attr]
    assert rs.files == (str(base), str(site))


def test_duplicate_rule_across_files(tmp_path: Path) -> None:
    a = write(tmp_path, HEAD + "    kind: absence\n", name="a.yaml")
    b = write(tmp_path, HEAD + "    kind: absence\n", name="b.yaml")
    with pytest.raises(RuleLoadError, match=r"b\.yaml:3: rule manhole_cover\.tilt: defined twice"):
        load_rules([a, b])


def test_correlation_sources_must_exist(tmp_path: Path) -> None:
    body = """\
    device_type: smoke_detector
    rules:
      fire:
        title_zh: 火警
        title_en: Fire
        urgency: P1
        kind: correlation
        rules: [smoke]
        group_by: building
    """
    err = load_error(tmp_path, body)
    assert err.rule == "smoke_detector.fire" and "unknown source rule 'smoke_detector.smoke'" in err.detail
    assert err.line == 8


def test_group_by_attribute_must_exist(tmp_path: Path) -> None:
    body = """\
    device_type: streetlight
    rules:
      dark:
        title_zh: 暗
        title_en: Dark
        urgency: P2
        kind: correlation
        rules: [out]
        group_by: {attr: feeder}
      out:
        title_zh: 灭
        title_en: Out
        urgency: P3
        kind: schedule
        expect: "on"
    """
    err = load_error(tmp_path, body)
    assert "no attribute 'feeder' to group by" in err.detail and err.line == 9


def test_absence_interval_comes_from_the_thing_model(tmp_path: Path) -> None:
    f = write(tmp_path, HEAD + "    kind: absence\n")
    (r,) = load_rules([f]).rules
    assert r.params.interval_s == 3600  # type: ignore[union-attr]


def test_lifecycles_match_the_registry() -> None:
    from typing import get_args

    from gateway.registry import Lifecycle

    assert get_args(Lifecycle) == LIFECYCLES


def test_a_directory_loads_its_yaml_files_in_order(tmp_path: Path) -> None:
    write(tmp_path, HEAD + "    kind: absence\n", name="b.yaml")
    write(tmp_path, "# nothing yet\n", name="a.yml")
    (tmp_path / "notes.txt").write_text("not a rule file")
    rs = load_rules([tmp_path])
    assert [Path(f).name for f in rs.files] == ["a.yml", "b.yaml"]
