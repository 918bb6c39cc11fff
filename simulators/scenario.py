"""Scenarios as data that check themselves: a community, what its devices do, and the incidents that must
(and must not) follow, judged against the gateway's SQL incidents and their deliveries.

    python -m simulators.scenario list
    python -m simulators.scenario validate simulators/scenarios/*.yaml
    python -m simulators.scenario run fire_in_building [more ...] --mqtt-host 127.0.0.1 --mqtt-port 1883 \\
        --database-url sqlite:///.var/registry.db [--rules-dir DIR] [--require-endpoint mqtt] [--json]

A run (a) generates the community (simulators.community.generate_community) and registers it through the
registry's CSV import (the installers' path), puts the devices in service, and sends each device one
ordinary report until the gateway has seen them all; (b) plays the timeline as real MQTT publications
(payloads built from the thing models and checked against them before they leave; `ts` in ms and `seq`
rising per device), with optional background reports of every device not silenced; (c) polls the
gateway's incidents (`IncidentStore.find(include_commissioning=True, status=None)`) and their outbox rows
(and, when given, what real receivers got) until every expectation is decided; (d) prints a pass/fail
line per expectation and returns a `ScenarioResult`.

Scenario file format (YAML; every key is checked, a bad file is refused naming the file, line and field)
------------------------------------------------------------------------------------------------------

    name: fire_in_building               # snake_case id (`list` shows it; `run NAME` finds shipped ones)
    title: 1号楼起火 / Fire in building 1
    description: ...
    community:                           # arguments of generate_community
      name: 消防演练社区                  # a run adds "-<run id>" (and the slug the run id), so every run
                                         # has fresh devices
      seed: 11
      admin_code: "110101"               # 6 digits; street / community: 3 digits each
      street: "002"
      community: "101"
      slug: s101                         # device id prefix (default c<community>); the run id is added
      grids: 1
      buildings: 3                       # named 1号楼, 2号楼 ...
      covers: 0                          # manhole covers; poles (4 per circuit: 1号回路, 2号回路 ...),
      poles: 0                           # doors (the first 1-2 are community gates, then unit doors),
      doors: 0                           # bays, detectors (detector k is in building k mod buildings)
      bays: 0
      bay_kinds: [fire_lane, normal]     # optional: the kind of each bay, in order (else the generator's)
      detectors: 9
    roles:                               # names for devices, used everywhere below
      D1: {type: smoke_detector, building: 1, index: 1}   # the 1st detector of 1号楼
      QUIET: {type: smoke_detector, except: [D1]}         # a group of devices
      # selectors: type, building (N → "N号楼"), circuit (N → "N号回路"), bay_kind, gate (true: a
      # community gate, false: a unit door), number (N → device id ...-000N of its type), roles
      # (start from the union of these roles), except (roles to leave out), index (the Nth, 1-based),
      # first (the first N). A role must select at least one device.
    rules:                               # optional rule overrides for this community only (rules/README.md
      smoke_detector.offline: {interval_s: 3, k: 2, grace_s: 2}   # "overrides"); needs --rules-dir
    background: {every_s: 2}             # optional: every device not silenced reports normally this often
    settle_s: 8                          # default watch window of `forbid` entries after their action
    grace_s: 5                           # how long past a deadline to look on (tells late from missing)
    timeline:                            # in order of `at`
      - name: first_alarm                # optional; expectations refer to it with `after`
        at: 0s                           # device time from the scenario's start ("90s", "2m", "1h30m", 5)
        devices: [D1]                    # roles
        event: smoke_alarm               # or {name: access_denied, method: card, reason: expired}
        telemetry: {alarm: true, temperature_c: 31}   # fields over the device's normal reading; they
                                                      # stick (later reports keep them)
        ramp: {temperature_c: [40, 72]}  # linear over the repeats (needs repeat >= 2)
        status: {online: false}          # a status message (the last will)
        silence: true                    # the devices send nothing more
        repeat: 4                        # send this many times ...
        every: 20s                       # ... this far apart in device time (default 1 s)
        wait: 0s                         # real seconds to wait after it (rules on the gateway's clock)
    expect:                              # incidents that must be raised
      - rule: smoke_detector.fire_confirmed_building
        group: {by: building, of: D1}    # a group incident (by: building, grid, community or an
                                         # attribute such as circuit); or `devices: [roles]`: one incident
                                         # per device; or neither: any incident of the rule in the community
        members: [D1, D2]                # devices the group incident must list
        urgency: P1                      # its urgency when judged (levels may raise it)
        after: second_alarm              # the action the latency is measured from (default: the first)
        within_s: 10                     # opened at most this long after that action started
        delivered: true                  # its `opened` event delivered to every endpoint (default true)
        escalated: true                  # optional: escalated (or, false: not)
    forbid:                              # incidents that must not be raised
      - rule: smoke_detector.fire_confirmed_*   # id or pattern (default "*": any rule)
        devices: [D3]                    # incidents of these devices, or listing them as members
        group: {by: building, of: D3}    # or of this group; or neither: in the whole community
        after: stray_alarm               # watched from this action (default: from the start) ...
        window_s: 10                     # ... until this long after it (or after the last action)

Device time and the gateway clock: the whole timeline is stamped in the past (ending about now): an action
is stamped at its `at` (its repeats `every` apart), so that rules measuring durations in device time
(state_duration, schedule, threshold `for_s`, event_count windows) see the minutes a scenario describes
at once. A device's time never runs backwards: an action whose device has already reported later (a
background report during a real wait) moves as a whole to just after that report. Rules that only the
gateway's clock can end (absence) need real waiting: shorten them for the scenario's community with
`rules:` (the runner writes the overrides to a file in --rules-dir, a directory in the gateway's
SC_RULES_DIRS) and `wait`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import io
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeAlias

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from devices import THING_MODELS
from devices.model import STATUS_ADAPTER
from devices.model import Field as ThingField
from simulators.behaviour import AnomalyRates, DeviceSim, Message, make_simulator
from simulators.community import generate_community, write_devices_csv

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
#: device time stays at least this far behind the wall clock
MARGIN_MS = 5_000
#: the gateway trusts device times up to 7 days old; a timeline must fit well inside
MAX_SPAN_S = 6 * 86_400
#: background and primed devices are healthy: batteries above every low-battery rule
HEALTHY_BATTERY_PCT = 60.0

Urgency: TypeAlias = Literal["P1", "P2", "P3", "P4"]
DeviceType: TypeAlias = Literal[
    "manhole_cover", "streetlight", "access_control", "parking_sensor", "smoke_detector"
]
BayKind: TypeAlias = Literal["normal", "fire_lane", "no_parking", "time_limited"]
Status: TypeAlias = Literal["pass", "pending", "late", "missing", "fail", "raised"]
_NAME = r"^[A-Za-z][A-Za-z0-9_]{0,63}$"
_DECIMALS = {"energy_kwh": 3, "current_a": 3, "power_factor": 3, "lux": 1}


# ---- errors --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a scenario file: where (a dotted field path), on which line, and what."""

    where: str
    detail: str
    line: int | None = None


class ScenarioError(ValueError):
    """A scenario file that cannot be used; str() names the file, and each problem's line and field."""

    def __init__(self, file: str, problems: Sequence[Problem]) -> None:
        self.file = file
        self.problems = tuple(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = []
        for p in self.problems:
            at = f"{self.file}:{p.line}" if p.line else self.file
            lines.append(f"{at}: {p.where}: {p.detail}" if p.where else f"{at}: {p.detail}")
        return "\n".join(lines)


class RunnerError(RuntimeError):
    """A run that could not get going (the gateway does not see the devices, overrides have no place...)."""


# ---- the file's schema --------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from 90, 1.5, "90s", "2m", "1h30m", "500ms"."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or text like 90s, 2m, 1h30m")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError("a duration is finite and not negative")
        return float(value)
    if isinstance(value, str):
        text = value.replace(" ", "")
        try:
            return parse_duration(float(text))
        except ValueError:
            pass
        parts = _DURATION_RE.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _UNIT_S[u] for n, u in parts)
    raise ValueError(f"{value!r} is not a duration (seconds, or text like 90s, 2m, 1h30m)")


Duration = Annotated[float, BeforeValidator(parse_duration)]
Scalar: TypeAlias = StrictBool | StrictInt | StrictFloat | StrictStr


def _listify(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


RoleList = Annotated[list[Annotated[str, Field(pattern=_NAME)]], BeforeValidator(_listify)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CommunitySpec(_Model):
    name: str = Field(min_length=1, max_length=80)
    seed: int = 1
    admin_code: str = Field("110101", pattern=r"^\d{6}$")
    street: str = Field("001", pattern=r"^\d{3}$")
    community: str = Field("001", pattern=r"^\d{3}$")
    slug: str | None = Field(None, pattern=r"^[a-z0-9]{1,16}$")
    district_name: str | None = None
    street_name: str | None = None
    grids: int = Field(1, ge=1, le=999)
    buildings: int = Field(1, ge=1, le=100)
    covers: int = Field(0, ge=0, le=500)
    poles: int = Field(0, ge=0, le=500)
    doors: int = Field(0, ge=0, le=500)
    bays: int = Field(0, ge=0, le=500)
    detectors: int = Field(0, ge=0, le=500)
    bay_kinds: list[BayKind] | None = None
    time_limit_min: float = Field(120.0, gt=0, le=100000)

    @model_validator(mode="after")
    def _kinds(self) -> CommunitySpec:
        if self.bay_kinds is not None and len(self.bay_kinds) != self.bays:
            raise ValueError(f"bay_kinds names {len(self.bay_kinds)} kinds for {self.bays} bays")
        return self


class RoleSpec(_Model):
    type: DeviceType | None = None
    building: int | str | None = None
    circuit: int | str | None = None
    bay_kind: BayKind | None = None
    gate: bool | None = None
    number: int | None = Field(None, ge=1)
    roles: RoleList = []
    except_: RoleList = Field([], alias="except")
    index: int | None = Field(None, ge=1)
    first: int | None = Field(None, ge=1)

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _one_pick(self) -> RoleSpec:
        if self.index is not None and self.first is not None:
            raise ValueError("give index or first, not both")
        return self


def _event_spec(value: Any) -> Any:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and "fields" not in value:
        rest = {k: v for k, v in value.items() if k != "name"}
        return {"name": value.get("name"), "fields": rest}
    return value


class EventSpec(_Model):
    name: str
    fields: dict[str, Scalar] = {}


class StatusSpec(_Model):
    online: StrictBool
    fw: str | None = Field(None, min_length=1, max_length=64)


class ActionSpec(_Model):
    name: str | None = Field(None, pattern=_NAME)
    at: Duration = 0.0
    devices: RoleList = Field(min_length=1)
    telemetry: dict[str, Scalar] = {}
    ramp: dict[str, tuple[float, float]] = {}
    event: Annotated[EventSpec | None, BeforeValidator(_event_spec)] = None
    status: StatusSpec | None = None
    silence: bool = False
    repeat: int = Field(1, ge=1, le=1000)
    every: Duration = 1.0
    wait: Duration = 0.0
    note: str = ""

    @model_validator(mode="after")
    def _something(self) -> ActionSpec:
        if not (self.telemetry or self.ramp or self.event or self.status or self.silence):
            raise ValueError("an action sends telemetry, ramp, an event or a status, or is a silence")
        if self.ramp and self.repeat < 2:
            raise ValueError("ramp needs repeat >= 2 (it goes from its first value to its last)")
        if self.every <= 0:
            raise ValueError("every must be more than 0 s")
        clash = set(self.ramp) & set(self.telemetry)
        if clash:
            raise ValueError(f"{sorted(clash)[0]} is in both telemetry and ramp")
        return self

    @property
    def span_s(self) -> float:
        return (self.repeat - 1) * self.every


class GroupSpec(_Model):
    by: str = Field(min_length=1)
    of: str = Field(pattern=_NAME)


class ExpectSpec(_Model):
    rule: str
    devices: RoleList | None = None
    group: GroupSpec | None = None
    members: RoleList = []
    urgency: Urgency | None = None
    after: str | None = None
    within_s: Duration = 30.0
    delivered: bool = True
    escalated: bool | None = None
    note: str = ""

    @model_validator(mode="after")
    def _target(self) -> ExpectSpec:
        if self.devices is not None and self.group is not None:
            raise ValueError("give devices or group, not both")
        if self.members and self.group is None:
            raise ValueError("members needs a group")
        if self.within_s <= 0:
            raise ValueError("within_s must be more than 0")
        return self


class ForbidSpec(_Model):
    rule: str = "*"
    devices: RoleList | None = None
    group: GroupSpec | None = None
    after: str | None = None
    window_s: Duration | None = None
    note: str = ""

    @model_validator(mode="after")
    def _target(self) -> ForbidSpec:
        if self.devices is not None and self.group is not None:
            raise ValueError("give devices or group, not both")
        return self


class BackgroundSpec(_Model):
    every_s: Duration = 3.0

    @field_validator("every_s")
    @classmethod
    def _not_too_often(cls, v: float) -> float:
        if v < 0.5:
            raise ValueError("background reports at most every 0.5 s")
        return v


class Scenario(_Model):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    title: str = Field(min_length=1)
    description: str = ""
    community: CommunitySpec
    roles: dict[Annotated[str, Field(pattern=_NAME)], RoleSpec] = {}
    rules: dict[str, dict[str, Any]] = {}
    background: BackgroundSpec | None = None
    settle_s: Duration = 8.0
    grace_s: Duration = 5.0
    timeline: list[ActionSpec] = Field(min_length=1)
    expect: list[ExpectSpec] = Field(min_length=1)
    forbid: list[ForbidSpec] = []

    @property
    def span_s(self) -> float:
        return max(a.at + a.span_s for a in self.timeline)

    @property
    def wall_estimate_s(self) -> float:
        """Real time the timeline's waits and the longest watch take (registration not counted)."""
        waits = sum(a.wait for a in self.timeline)
        watch = [e.within_s for e in self.expect] + [f.window_s or self.settle_s for f in self.forbid]
        return waits + max(watch)


# ---- loading and checking -----------------------------------------------------------------------------


class _Lines:
    """Line numbers of the nodes of a YAML document, by field path."""

    def __init__(self, text: str) -> None:
        try:
            self.root: yaml.Node | None = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            self.root = None

    def line(self, path: Sequence[str | int]) -> int | None:
        node = self.root
        if node is None:
            return None
        for key in path:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if str(k.value) == str(key):
                        node = v
                        break
                else:
                    break
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
                node = node.value[key]
            else:
                break
        return int(node.start_mark.line) + 1


def _where(path: Sequence[str | int]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def load_scenario(path: str | Path) -> Plan:
    """Read, validate and resolve a scenario file; raises ScenarioError naming the file, line and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(str(path), [Problem("", f"cannot read: {exc.strerror or exc}")]) from None
    return parse_scenario(text, str(path))


def parse_scenario(text: str, file: str = "<scenario>") -> Plan:
    lines = _Lines(text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ScenarioError(file, [Problem("", f"not valid YAML: {exc}", line)]) from None
    if not isinstance(data, dict):
        raise ScenarioError(
            file, [Problem("", "a scenario is a mapping (name, community, timeline, ...)", 1)]
        )
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required"
            problems.append(Problem(_where(loc), msg, lines.line(loc)))
        raise ScenarioError(file, problems) from None
    problems = []
    plan = _resolve(scenario, file, lines, problems)
    if problems or plan is None:
        raise ScenarioError(file, problems)
    return plan


def shipped_scenarios() -> list[Path]:
    return sorted(SCENARIO_DIR.glob("*.yaml"))


def find_scenario(name_or_path: str) -> Path:
    """A file path, or the name of a shipped scenario (its file stem or its `name`)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    for f in shipped_scenarios():
        if f.stem == name_or_path:
            return f
    for f in shipped_scenarios():
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(doc, dict) and doc.get("name") == name_or_path:
            return f
    raise FileNotFoundError(f"no scenario file or shipped scenario called {name_or_path!r}")


# ---- the resolved plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """An expectation with its roles resolved to device ids and group keys (community name placeholder
    `{community}` in group keys is filled in per run)."""

    kind: Literal["expect", "forbid"]
    index: int
    rule: str
    text: str
    device_ids: tuple[str, ...] | None = None
    device_labels: Mapping[str, str] = field(default_factory=dict)
    group_key: str | None = None
    members: tuple[str, ...] = ()
    urgency: str | None = None
    after: str | None = None
    within_s: float = 30.0
    delivered: bool = True
    escalated: bool | None = None
    window_s: float = 8.0

    @property
    def is_pattern(self) -> bool:
        return any(c in self.rule for c in "*?[")

    def matches_rule(self, rule_id: str) -> bool:
        return fnmatch.fnmatchcase(rule_id, self.rule) if self.is_pattern else rule_id == self.rule


@dataclass(frozen=True)
class Action:
    spec: ActionSpec
    index: int
    device_ids: tuple[str, ...]

    @property
    def label(self) -> str:
        return self.spec.name or f"timeline[{self.index}]"


@dataclass(frozen=True)
class Plan:
    """A validated scenario, resolved against its generated community (role → device ids)."""

    scenario: Scenario
    file: str
    rows: tuple[Mapping[str, Any], ...]
    roles: Mapping[str, tuple[str, ...]]
    actions: tuple[Action, ...]
    targets: tuple[Target, ...]

    @property
    def name(self) -> str:
        return self.scenario.name

    def for_run(self, run_id: str) -> RunPlan:
        """The devices of one run: the community name and device ids carry the run id, so a run never
        meets devices (or rule state, incidents, seq windows) of an earlier run."""
        if not re.fullmatch(r"[a-z0-9]{1,12}", run_id):
            raise ValueError(f"run id {run_id!r}: 1-12 lowercase letters and digits")
        c = self.scenario.community
        community = f"{c.name}-{run_id}"
        old_prefix = f"{_slug(c)}-"
        new_prefix = f"{_slug(c)}{run_id}-"
        ids = {str(r["device_id"]): new_prefix + str(r["device_id"])[len(old_prefix) :] for r in self.rows}
        rows = []
        for r in self.rows:
            attrs = dict(r.get("attributes") or {})
            rows.append(
                {**r, "device_id": ids[str(r["device_id"])], "community": community, "attributes": attrs}
            )
        return RunPlan(self, run_id, community, tuple(rows), ids)


def _slug(c: CommunitySpec) -> str:
    return c.slug or f"c{c.community}"


@dataclass(frozen=True)
class RunPlan:
    """A plan for one run: its community name and device rows (ids renamed for the run)."""

    plan: Plan
    run_id: str
    community: str
    rows: tuple[Mapping[str, Any], ...]
    ids: Mapping[str, str]  # plan device id -> run device id

    @property
    def scenario(self) -> Scenario:
        return self.plan.scenario

    def device_ids(self, plan_ids: Iterable[str]) -> tuple[str, ...]:
        return tuple(self.ids[d] for d in plan_ids)

    def group_key(self, key: str | None) -> str | None:
        if key is None:
            return None
        return key.replace("{community}", self.community)

    def target(self, t: Target) -> Target:
        """The target with this run's device ids and group key."""
        from dataclasses import replace

        return replace(
            t,
            device_ids=None if t.device_ids is None else self.device_ids(t.device_ids),
            device_labels={self.ids[d]: label for d, label in t.device_labels.items()},
            group_key=self.group_key(t.group_key),
            members=self.device_ids(t.members),
        )

    @property
    def rules_file_name(self) -> str:
        return f"scenario-{self.scenario.name}-{self.run_id}.yaml"

    def rules_yaml(self) -> str | None:
        """The scenario's rule overrides as a rules file scoped to this run's community (None: none)."""
        if not self.scenario.rules:
            return None
        return _overrides_yaml(self.scenario.rules, self.community)

    def write_rules(self, directory: Path) -> tuple[Path, bool] | None:
        """Write the overrides into `directory`; (path, whether it changed), or None without overrides."""
        text = self.rules_yaml()
        if text is None:
            return None
        path = directory / self.rules_file_name
        if path.exists() and path.read_text(encoding="utf-8") == text:
            return path, False
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        return path, True


def _overrides_yaml(rules: Mapping[str, Mapping[str, Any]], community: str) -> str:
    doc = {"overrides": {"community": {community: {rid: dict(p) for rid, p in rules.items()}}}}
    header = "# written by simulators.scenario for one run; removed after it\n"
    return header + str(yaml.safe_dump(doc, allow_unicode=True, sort_keys=True))


def _bay_row(row: dict[str, Any], kind: str, limit_min: float) -> dict[str, Any]:
    attrs = {k: v for k, v in (row.get("attributes") or {}).items() if k != "time_limit_min"}
    attrs["bay_kind"] = kind
    if kind == "time_limited":
        attrs["time_limit_min"] = limit_min
    return {**row, "attributes": attrs}


def _generate(c: CommunitySpec) -> list[dict[str, Any]]:
    rows = generate_community(
        c.name,
        seed=c.seed,
        admin_code=c.admin_code,
        street=c.street,
        community=c.community,
        grids=c.grids,
        buildings=c.buildings,
        covers=c.covers,
        poles=c.poles,
        doors=c.doors,
        bays=c.bays,
        detectors=c.detectors,
        slug=_slug(c),
        district_name=c.district_name,
        street_name=c.street_name,
    )
    if c.bay_kinds is not None:
        bays = iter(c.bay_kinds)
        rows = [
            _bay_row(r, next(bays), c.time_limit_min) if r["device_type"] == "parking_sensor" else r
            for r in rows
        ]
    return rows


def _building(value: int | str) -> str:
    return f"{value}号楼" if isinstance(value, int) else value


def _circuit(value: int | str) -> str:
    return f"{value}号回路" if isinstance(value, int) else value


class _Resolver:
    """Resolves a scenario's roles and checks its actions and expectations, collecting problems."""

    def __init__(
        self, scenario: Scenario, rows: list[dict[str, Any]], lines: _Lines, problems: list[Problem]
    ) -> None:
        self.s = scenario
        self.rows = rows
        self.by_id = {str(r["device_id"]): r for r in rows}
        self.lines = lines
        self.problems = problems
        self.roles: dict[str, tuple[str, ...]] = {}
        self._failed: set[str] = set()  # reported once
        self._resolving: list[str] = []

    def problem(self, path: Sequence[str | int], detail: str) -> None:
        self.problems.append(Problem(_where(path), detail, self.lines.line(path)))

    # -- roles

    def role(self, name: str, path: Sequence[str | int]) -> tuple[str, ...] | None:
        if name in self.roles:
            return self.roles[name]
        if name in self._failed:
            return None
        spec = self.s.roles.get(name)
        if spec is None:
            known = ", ".join(sorted(self.s.roles)) or "none"
            self.problem(path, f"unknown role {name!r} (roles: {known})")
            return None
        if name in self._resolving:
            self.problem(("roles", name), f"role {name!r} refers to itself through {self._resolving}")
            return None
        self._resolving.append(name)
        try:
            ids = self._select(name, spec)
        finally:
            self._resolving.pop()
        if ids is None:
            self._failed.add(name)
        else:
            self.roles[name] = ids
        return ids

    def _select(self, name: str, spec: RoleSpec) -> tuple[str, ...] | None:
        base = ("roles", name)
        if spec.roles:
            pool: list[str] = []
            for k, ref in enumerate(spec.roles):
                got = self.role(ref, (*base, "roles", k))
                if got is None:
                    return None
                pool += [d for d in got if d not in pool]
        else:
            pool = list(self.by_id)
        out = []
        for did in pool:
            r = self.by_id[did]
            attrs = r.get("attributes") or {}
            if spec.type is not None and r["device_type"] != spec.type:
                continue
            if spec.building is not None and r.get("building") != _building(spec.building):
                continue
            if spec.circuit is not None and attrs.get("circuit") != _circuit(spec.circuit):
                continue
            if spec.bay_kind is not None and attrs.get("bay_kind") != spec.bay_kind:
                continue
            if spec.gate is not None and (
                r["device_type"] != "access_control" or (r.get("building") is None) != spec.gate
            ):
                continue
            if spec.number is not None and not did.endswith(f"-{spec.number:04d}"):
                continue
            out.append(did)
        for k, ref in enumerate(spec.except_):
            got = self.role(ref, (*base, "except", k))
            if got is None:
                return None
            out = [d for d in out if d not in got]
        if not out:
            self.problem(base, "selects no device of the community (" + self._describe() + ")")
            return None
        if spec.index is not None:
            if spec.index > len(out):
                self.problem(base, f"index {spec.index}, but the selection has {len(out)} device(s)")
                return None
            out = [out[spec.index - 1]]
        elif spec.first is not None:
            out = out[: spec.first]
        return tuple(out)

    def _describe(self) -> str:
        have: dict[str, int] = {}
        for r in self.rows:
            have[r["device_type"]] = have.get(r["device_type"], 0) + 1
        buildings = sorted({str(r["building"]) for r in self.rows if r.get("building")})
        text = ", ".join(f"{n} {t}" for t, n in sorted(have.items())) or "no devices"
        return f"it has {text}; buildings {', '.join(buildings) or 'none'}"

    def roles_of(self, names: Sequence[str], path: Sequence[str | int]) -> tuple[str, ...] | None:
        out: list[str] = []
        ok = True
        for k, name in enumerate(names):
            got = self.role(name, (*path, k))
            if got is None:
                ok = False
                continue
            out += [d for d in got if d not in out]
        return tuple(out) if ok else None


def _check_value(f: ThingField, value: Any) -> str | None:
    """Why `value` is not a valid reading of `f` (None: it is)."""
    if f.kind is bool:
        return None if isinstance(value, bool) else f"{f.name} is true or false, not {value!r}"
    if f.kind is str:
        if not isinstance(value, str):
            return f"{f.name} is text, not {value!r}"
        if f.choices and value not in f.choices:
            return f"{f.name} is one of {', '.join(f.choices)}, not {value!r}"
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{f.name} is a number, not {value!r}"
    if f.kind is int and not float(value).is_integer():
        return f"{f.name} is a whole number, not {value!r}"
    if (f.minimum is not None and value < f.minimum) or (f.maximum is not None and value > f.maximum):
        unit = f" {f.unit}" if f.unit else ""
        return f"{f.name} = {value!r} is outside its plausible range {f.range_text}{unit} (rejected)"
    return None


def _resolve(scenario: Scenario, file: str, lines: _Lines, problems: list[Problem]) -> Plan | None:
    from rules.loader import DEFAULT_RULES_DIR, RuleLoadError, load_rules

    def problem(path: Sequence[str | int], detail: str) -> None:
        problems.append(Problem(_where(path), detail, lines.line(path)))

    try:
        rows = _generate(scenario.community)
    except ValueError as exc:
        problem(("community",), str(exc))
        return None
    if not rows:
        problem(("community",), "the community has no devices")
        return None
    r = _Resolver(scenario, rows, lines, problems)
    for name in scenario.roles:
        r.role(name, ("roles", name))

    # rules: the defaults plus the scenario's overrides, checked by the rules loader itself
    rule_paths: list[str | Path] = [DEFAULT_RULES_DIR]
    tmp_dir: tempfile.TemporaryDirectory[str] | None = None
    if scenario.rules:
        tmp_dir = tempfile.TemporaryDirectory(prefix="scenario-rules-")
        tmp = Path(tmp_dir.name) / "overrides.yaml"
        tmp.write_text(_overrides_yaml(scenario.rules, scenario.community.name), encoding="utf-8")
        rule_paths.append(tmp)
    try:
        ruleset = load_rules(rule_paths)
    except RuleLoadError as exc:
        rid = exc.rule or ""
        problem(("rules", rid) if rid in scenario.rules else ("rules",), f"{exc.detail}")
        return None
    finally:
        if tmp_dir is not None:
            tmp_dir.cleanup()
    rules = ruleset.by_id

    def enabled_here(rule: Any) -> bool:
        if rule.enabled:
            return True
        variant = rule.community_overrides.get(scenario.community.name)
        return variant is not None and variant.enabled

    # timeline
    names: dict[str, int] = {}
    actions = []
    last_at = 0.0
    for i, a in enumerate(scenario.timeline):
        base = ("timeline", i)
        if a.name is not None:
            if a.name in names:
                problem(
                    (*base, "name"), f"action name {a.name!r} is used twice (also timeline[{names[a.name]}])"
                )
            names[a.name] = i
        if a.at < last_at:
            problem((*base, "at"), f"actions are in order of `at`: {a.at:g} s comes after {last_at:g} s")
        last_at = max(last_at, a.at)
        ids = r.roles_of(a.devices, (*base, "devices"))
        if ids is None:
            continue
        _check_action(a, ids, r.by_id, base, problem)
        actions.append(Action(a, i, ids))
    if scenario.span_s > MAX_SPAN_S:
        problem(("timeline",), f"spans {scenario.span_s:g} s of device time; at most {MAX_SPAN_S} s")

    targets: list[Target] = []
    for i, e in enumerate(scenario.expect):
        t = _expect_target(e, i, r, rules, enabled_here, names, scenario)
        if t is not None:
            targets.append(t)
    for i, f in enumerate(scenario.forbid):
        t = _forbid_target(f, i, r, rules, names, scenario)
        if t is not None:
            targets.append(t)
    if problems:
        return None
    return Plan(scenario, file, tuple(rows), dict(r.roles), tuple(actions), tuple(targets))


def _check_action(
    a: ActionSpec,
    ids: Sequence[str],
    by_id: Mapping[str, Mapping[str, Any]],
    base: tuple[str | int, ...],
    problem: Callable[[Sequence[str | int], str], None],
) -> None:
    for dtype in sorted({str(by_id[d]["device_type"]) for d in ids}):
        model = THING_MODELS[dtype]
        for name, value in a.telemetry.items():
            f = model.fields_by_name.get(name)
            if f is None:
                problem((*base, "telemetry", name), f"{dtype} declares no telemetry field {name!r}")
                continue
            why = _check_value(f, value)
            if why:
                problem((*base, "telemetry", name), f"{dtype}: {why}")
        for name, (lo, hi) in a.ramp.items():
            f = model.fields_by_name.get(name)
            if f is None:
                problem((*base, "ramp", name), f"{dtype} declares no telemetry field {name!r}")
                continue
            if f.kind not in (float, int):
                problem((*base, "ramp", name), f"{dtype}.{name} is not a number: it cannot ramp")
                continue
            for v in (lo, hi):
                why = _check_value(f, v)
                if why:
                    problem((*base, "ramp", name), f"{dtype}: {why}")
        if a.event is not None:
            ev = model.events_by_name.get(a.event.name)
            if ev is None:
                known = ", ".join(model.events_by_name) or "none"
                problem((*base, "event"), f"{dtype} declares no event {a.event.name!r} (events: {known})")
            else:
                declared = {f.name: f for f in ev.fields}
                for name, value in a.event.fields.items():
                    ef = declared.get(name)
                    if ef is None:
                        problem((*base, "event", name), f"{dtype} event {ev.name} declares no field {name!r}")
                        continue
                    why = _check_value(ef, value)
                    if why:
                        problem((*base, "event", name), f"{dtype} event {ev.name}: {why}")
                for f in ev.fields:
                    if f.required and f.name not in a.event.fields:
                        problem((*base, "event"), f"{dtype} event {ev.name} needs {f.name!r}")


def _rule_problem(rule_id: str, rules: Mapping[str, Any], pattern_ok: bool) -> str | None:
    if pattern_ok and any(c in rule_id for c in "*?["):
        if not any(fnmatch.fnmatchcase(rid, rule_id) for rid in rules):
            return f"the pattern {rule_id!r} matches no rule"
        return None
    if rule_id not in rules:
        close = [rid for rid in rules if rid.split(".")[0] == rule_id.split(".")[0]]
        hint = f" (rules of that type: {', '.join(sorted(close))})" if close else ""
        return f"unknown rule {rule_id!r}{hint}"
    return None


def _group_by_of(rule: Any) -> str | None:
    gb = getattr(rule.params, "group_by", None)
    if gb is None or gb == "device":
        return None
    return gb if isinstance(gb, str) else str(gb.attr)


def _group_key(by: str, row: Mapping[str, Any]) -> str | None:
    """The gateway's group key of a device (rules.model.group_key), with `{community}` for the run's name."""
    if by == "building":
        return f"building:{{community}}/{row['building']}" if row.get("building") else None
    if by == "grid":
        return f"grid:{row['grid_code']}" if row.get("grid_code") else None
    if by == "community":
        return "community:{community}"
    value = (row.get("attributes") or {}).get(by)
    if value is None or value == "":
        return None
    if by == "circuit":
        return f"circuit:{{community}}/{value}"  # see Plan.for_run
    return f"{by}:{value}"


def _labels(r: _Resolver, names: Sequence[str]) -> dict[str, str]:
    """Device id -> the role name it is known by in reports ("D1", or "QUIET#2" inside a group role)."""
    out: dict[str, str] = {}
    for name in names:
        ids = r.roles.get(name, ())
        for k, d in enumerate(ids, start=1):
            out.setdefault(d, name if len(ids) == 1 else f"{name}#{k}")
    return out


def _expect_target(
    e: ExpectSpec,
    i: int,
    r: _Resolver,
    rules: Mapping[str, Any],
    enabled_here: Callable[[Any], bool],
    names: Mapping[str, int],
    s: Scenario,
) -> Target | None:
    base: tuple[str | int, ...] = ("expect", i)
    why = _rule_problem(e.rule, rules, pattern_ok=False)
    if why:
        r.problem((*base, "rule"), why)
        return None
    rule = rules[e.rule]
    if rule.silent:
        r.problem((*base, "rule"), f"{e.rule} is silent: it feeds other rules and raises no incident")
    elif not enabled_here(rule):
        r.problem((*base, "rule"), f"{e.rule} is disabled (enable it under `rules:` for this scenario)")
    if e.after is not None and e.after not in names:
        r.problem((*base, "after"), f"no action is named {e.after!r}")
    ids = None
    group_key = None
    if e.devices is not None:
        ids = r.roles_of(e.devices, (*base, "devices"))
        if ids is None:
            return None
        for did in ids:
            row = r.by_id[did]
            if row["device_type"] != rule.device_type:
                r.problem(
                    (*base, "devices"),
                    f"{e.rule} is a {rule.device_type} rule; {did} is a {row['device_type']}",
                )
                return None
            attrs = row.get("attributes") or {}
            for attr, allowed in rule.where.items():
                if attrs.get(attr) not in allowed:
                    r.problem(
                        (*base, "devices"),
                        f"{e.rule} applies only where {attr} is {'/'.join(map(str, allowed))}; "
                        f"{did} has {attrs.get(attr)!r}",
                    )
                    return None
    elif e.group is not None:
        group_key = _group_target(e.group, (*base, "group"), r, rule)
        if group_key is None:
            return None
    members: tuple[str, ...] = ()
    if e.members:
        got = r.roles_of(e.members, (*base, "members"))
        if got is None:
            return None
        members = got
    labels = _labels(r, list(e.devices or []) + list(e.members) + ([e.group.of] if e.group else []))
    what = _target_text(e.rule, e.devices, e.group, e.urgency)
    if e.members:
        what += f" listing {', '.join(e.members)}"
    what += f" within {e.within_s:g} s of {e.after or 'the first action'}"
    if e.escalated is not None:
        what += ", escalated" if e.escalated else ", not escalated"
    if e.delivered:
        what += ", delivered"
    return Target(
        "expect",
        i,
        e.rule,
        what,
        device_ids=ids,
        device_labels=labels,
        group_key=group_key,
        members=members,
        urgency=e.urgency,
        after=e.after,
        within_s=e.within_s,
        delivered=e.delivered,
        escalated=e.escalated,
    )


def _group_target(g: GroupSpec, path: tuple[str | int, ...], r: _Resolver, rule: Any | None) -> str | None:
    if rule is not None:
        by = _group_by_of(rule)
        if by is None:
            r.problem((*path, "by"), f"{rule.id} is not a group rule: expect it with `devices`")
            return None
        if by != g.by:
            r.problem((*path, "by"), f"{rule.id} groups by {by}, not {g.by}")
            return None
    ids = r.role(g.of, (*path, "of"))
    if ids is None:
        return None
    if len(ids) != 1:
        r.problem((*path, "of"), f"role {g.of!r} is {len(ids)} devices: `of` names one device")
        return None
    key = _group_key(g.by, r.by_id[ids[0]])
    if key is None:
        r.problem((*path, "of"), f"{ids[0]} has no {g.by}")
    return key


def _target_text(
    rule: str, devices: Sequence[str] | None, group: GroupSpec | None, urgency: str | None
) -> str:
    text = rule + (f" {urgency}" if urgency else "")
    if devices is not None:
        text += f" for {', '.join(devices)}"
    elif group is not None:
        text += f" for the {group.by} of {group.of}"
    else:
        text += " in the community"
    return text


def _forbid_target(
    f: ForbidSpec,
    i: int,
    r: _Resolver,
    rules: Mapping[str, Any],
    names: Mapping[str, int],
    s: Scenario,
) -> Target | None:
    base: tuple[str | int, ...] = ("forbid", i)
    why = _rule_problem(f.rule, rules, pattern_ok=True)
    if why:
        r.problem((*base, "rule"), why)
        return None
    if f.after is not None and f.after not in names:
        r.problem((*base, "after"), f"no action is named {f.after!r}")
    ids = None
    group_key = None
    if f.devices is not None:
        ids = r.roles_of(f.devices, (*base, "devices"))
        if ids is None:
            return None
    elif f.group is not None:
        exact = rules.get(f.rule) if f.rule in rules else None
        group_key = _group_target(f.group, (*base, "group"), r, exact)
        if group_key is None:
            return None
    window = f.window_s if f.window_s is not None else s.settle_s
    what = "no " + _target_text(f.rule, f.devices, f.group, None)
    what += f" until {window:g} s after {f.after or 'the last action'}"
    return Target(
        "forbid",
        i,
        f.rule,
        what,
        device_ids=ids,
        device_labels=_labels(r, list(f.devices or []) + ([f.group.of] if f.group else [])),
        group_key=group_key,
        after=f.after,
        window_s=window,
    )


# ---- judging ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What the runner found of one incident: the fields the judge reads, its `opened` event's delivery
    state per endpoint, and the receivers that got that event."""

    incident_id: str
    rule_id: str
    dedup_key: str
    device_id: str | None
    urgency: str
    opened_at: float  # epoch seconds (the gateway's clock)
    members: tuple[str, ...] = ()
    escalation_level: int = 0
    commissioning: bool = False
    deliveries: Mapping[str, str] = field(default_factory=dict)
    received_by: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Check:
    """The judgement of one expectation: `pending` until it is decided."""

    kind: Literal["expect", "forbid"]
    index: int
    expected: str
    status: Status
    found: str
    latency_s: float | None = None
    incidents: tuple[str, ...] = ()

    @property
    def final(self) -> bool:
        return self.status != "pending"

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "index": self.index,
            "expected": self.expected,
            "status": self.status,
            "found": self.found,
            "latency_s": self.latency_s,
            "incidents": list(self.incidents),
        }


@dataclass(frozen=True)
class JudgeContext:
    """When things happened (wall epoch seconds) and what delivery means for this run."""

    run_start: float
    action_starts: Mapping[str, float]  # action label -> start
    first_action: float
    last_action: float
    now: float
    grace_s: float = 5.0
    required_endpoints: tuple[str, ...] = ()
    receivers: tuple[str, ...] = ()


_RANK: dict[str, int] = {"pass": 0, "pending": 1, "late": 2, "fail": 3, "missing": 4, "raised": 5}


def judge(t: Target, seen: Sequence[Seen], ctx: JudgeContext) -> Check:
    """Judge one expectation against the incidents found so far (pure)."""
    if t.kind == "forbid":
        return _judge_forbid(t, seen, ctx)
    start = ctx.action_starts[t.after] if t.after is not None else ctx.first_action
    if t.device_ids is not None:
        subjects = [
            (
                t.device_labels.get(d, d) + f" ({d})",
                [s for s in seen if t.matches_rule(s.rule_id) and s.device_id == d],
            )
            for d in t.device_ids
        ]
    elif t.group_key is not None:
        key = f"{t.group_key}:{t.rule}"
        subjects = [(t.group_key, [s for s in seen if s.dedup_key == key])]
    else:
        subjects = [("the community", [s for s in seen if t.matches_rule(s.rule_id)])]
    parts = [_judge_one(t, label, cands, start, ctx) for label, cands in subjects]
    status = max((p[0] for p in parts), key=lambda st: _RANK[st])
    lats = [p[2] for p in parts if p[2] is not None]
    found = "; ".join(
        f"{label}: {p[1]}" if len(parts) > 1 else p[1] for (label, _), p in zip(subjects, parts, strict=True)
    )
    ids = tuple(i for p in parts for i in p[3])
    return Check("expect", t.index, t.text, status, found, max(lats) if lats else None, ids)


def _judge_one(
    t: Target, label: str, cands: Sequence[Seen], start: float, ctx: JudgeContext
) -> tuple[Status, str, float | None, tuple[str, ...]]:
    give_up = start + t.within_s + ctx.grace_s
    if not cands:
        if ctx.now < give_up:
            return "pending", "nothing yet", None, ()
        return "missing", f"nothing raised ({ctx.now - start:.1f} s after the action)", None, ()
    s = min(cands, key=lambda c: c.opened_at)
    lat = s.opened_at - start
    head = f"{s.incident_id} {s.urgency} opened {lat:+.2f} s"
    if lat > t.within_s:
        return "late", f"{head}: {lat - t.within_s:.1f} s late", lat, (s.incident_id,)
    problems = []
    if t.urgency is not None and s.urgency != t.urgency:
        problems.append(f"urgency {s.urgency}, expected {t.urgency}")
    missing = [t.device_labels.get(m, m) for m in t.members if m not in s.members]
    if missing:
        problems.append(f"members lack {', '.join(missing)}")
    if t.escalated is True and s.escalation_level < 1:
        problems.append("not escalated")
    if t.escalated is False and s.escalation_level >= 1:
        problems.append("escalated")
    delivered = ""
    if t.delivered:
        why = _delivery_problem(s, ctx)
        if why:
            problems.append(why)
        else:
            delivered = ", delivered to " + ", ".join(sorted({*s.deliveries, *s.received_by}))
    if s.escalation_level >= 1:
        delivered += ", escalated"
    if problems:
        status: Status = "pending" if ctx.now < give_up else "fail"
        return status, f"{head}: {'; '.join(problems)}", lat, (s.incident_id,)
    return "pass", head + delivered, lat, (s.incident_id,)


def _delivery_problem(s: Seen, ctx: JudgeContext) -> str | None:
    if s.commissioning:
        return "a commissioning incident (device not in service): kept, not delivered"
    if not s.deliveries:
        return "not queued for any endpoint"
    missing = [ep for ep in ctx.required_endpoints if ep not in s.deliveries]
    if missing:
        return f"no delivery to {', '.join(missing)} (queued for {', '.join(sorted(s.deliveries))})"
    undelivered = [f"{ep} {state}" for ep, state in sorted(s.deliveries.items()) if state != "delivered"]
    if undelivered:
        return "not delivered: " + ", ".join(undelivered)
    unheard = [r for r in ctx.receivers if r not in s.received_by]
    if unheard:
        return f"receiver {', '.join(unheard)} did not get it"
    return None


def _subject(t: Target, s: Seen) -> str:
    """Who an incident is about, by role where the expectation names it."""
    if s.device_id is None:
        return s.dedup_key.rsplit(":", 1)[0]
    label = t.device_labels.get(s.device_id)
    return f"{label} ({s.device_id})" if label else s.device_id


def _judge_forbid(t: Target, seen: Sequence[Seen], ctx: JudgeContext) -> Check:
    if t.after is not None:
        start = ctx.action_starts[t.after]
        end = start + t.window_s
    else:
        start, end = ctx.run_start, ctx.last_action + t.window_s
    ids = set(t.device_ids or ())

    def concerns(s: Seen) -> bool:
        if t.device_ids is not None:
            return s.device_id in ids or bool(ids & set(s.members))
        if t.group_key is not None:
            return s.dedup_key.startswith(t.group_key + ":")
        return True

    offenders = [s for s in seen if t.matches_rule(s.rule_id) and concerns(s) and start <= s.opened_at <= end]
    if offenders:
        found = "; ".join(
            f"{s.incident_id} {s.rule_id} {s.urgency} for {_subject(t, s)}"
            for s in sorted(offenders, key=lambda s: s.opened_at)
        )
        return Check(
            "forbid", t.index, t.text, "raised", found, None, tuple(s.incident_id for s in offenders)
        )
    if ctx.now < end:
        return Check("forbid", t.index, t.text, "pending", "nothing so far")
    return Check("forbid", t.index, t.text, "pass", f"nothing raised (watched {end - start:.1f} s)")


# ---- the result ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenarioResult:
    scenario: str
    title: str
    file: str
    run_id: str
    community: str
    devices: int
    messages: int
    started_at: dt.datetime
    wall_s: float
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def report(self) -> str:
        lines = [
            f"scenario {self.scenario}: {self.title}",
            f"  run {self.run_id}, community {self.community}, {self.devices} devices, "
            f"{self.messages} messages, {self.wall_s:.1f} s",
        ]
        for c in self.checks:
            mark = "PASS" if c.ok else c.status.upper()
            lines.append(f"  {mark:<7} {c.kind} {c.expected}")
            lines.append(f"          found: {c.found}")
        good = sum(c.ok for c in self.checks)
        lines.append(f"  result: {'PASS' if self.passed else 'FAIL'} ({good}/{len(self.checks)} checks)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "title": self.title,
            "file": self.file,
            "run_id": self.run_id,
            "community": self.community,
            "devices": self.devices,
            "messages": self.messages,
            "started_at": self.started_at.isoformat(),
            "wall_s": round(self.wall_s, 3),
            "passed": self.passed,
            "checks": [c.to_json() for c in self.checks],
        }


# ---- publishing -----------------------------------------------------------------------------------------


class Publisher(Protocol):
    def send(self, messages: Sequence[Message]) -> None:
        """Publish in order at QoS 1; return when the broker acknowledged every one (raise if it cannot)."""


class PublishError(RuntimeError):
    pass


class MqttPublisher:
    """A paho (MQTT 5) client that publishes for any device: log in as an adaptor account (sc-adaptor)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._mqtt = mqtt
        self.timeout_s = timeout_s
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id or f"sc-scenario-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(200)
        self._cond = threading.Condition()
        self._acked: set[int] = set()
        self._failed: dict[int, str] = {}
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        try:
            self.client.connect(host, port, keepalive=30)
        except OSError as exc:
            raise PublishError(f"cannot reach the broker at {host}:{port}: {exc}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            raise PublishError(f"no answer from the broker at {host}:{port}")
        if self._connect_error is not None:
            self.close()
            raise PublishError(f"the broker at {host}:{port} refused us: {self._connect_error}")

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            self._connect_error = str(reason_code)
        self._connected.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason_code: Any, _props: Any) -> None:
        with self._cond:
            if reason_code.is_failure:
                self._failed[mid] = str(reason_code)
            self._acked.add(mid)
            self._cond.notify_all()

    def send(self, messages: Sequence[Message]) -> None:
        mids = {}
        for m in messages:
            info = self.client.publish(m.topic, m.encode(), qos=1)
            if info.rc not in (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN):
                raise PublishError(f"{m.topic}: {self._mqtt.error_string(info.rc)}")
            mids[info.mid] = m.topic
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while not set(mids) <= self._acked:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PublishError(
                        f"{len(set(mids) - self._acked)} message(s) not acknowledged by the broker"
                    )
                self._cond.wait(left)
            failed = {mids[m]: self._failed[m] for m in mids if m in self._failed}
            self._acked -= set(mids)
        if failed:
            topic, why = next(iter(failed.items()))
            raise PublishError(f"the broker refused {len(failed)} message(s), e.g. {topic}: {why}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---- playing --------------------------------------------------------------------------------------------


def _shape(f: ThingField, value: Any) -> Any:
    if f.kind is bool or f.kind is str:
        return value
    v = float(value)
    if f.minimum is not None:
        v = max(v, f.minimum)
    if f.maximum is not None:
        v = min(v, f.maximum)
    if f.kind is int:
        return round(v)
    return round(v, _DECIMALS.get(f.name, 2))


class _Device:
    def __init__(self, row: Mapping[str, Any], sim: DeviceSim) -> None:
        self.row = row
        self.id = str(row["device_id"])
        self.type = str(row["device_type"])
        self.model = THING_MODELS[self.type]
        self.sim = sim
        self.seq = 0
        self.last_ts = 0
        self.sticky: dict[str, Any] = {}
        self.silent = False

    def stamp(self, ts: int) -> tuple[int, int]:
        ts = max(ts, self.last_ts + 1)
        self.last_ts = ts
        self.seq += 1
        return ts, self.seq

    def reading(self, ts: int) -> dict[str, Any]:
        values = self.sim.read(ts)
        values.update(self.sticky)
        return {k: _shape(self.model.fields_by_name[k], v) for k, v in values.items()}


class Player:
    """Turns actions into MQTT messages: device time (see the module docstring), seq per device, payloads
    checked against the thing models before they are handed to the publisher."""

    def __init__(
        self,
        run: RunPlan,
        publisher: Publisher,
        *,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.run = run
        self.publisher = publisher
        self.clock = clock
        self.wall_start = clock()
        span_ms = int(run.scenario.span_s * 1000)
        self.base_ms = int(self.wall_start * 1000) - span_ms - MARGIN_MS
        self.devices: dict[str, _Device] = {}
        for row in run.rows:
            sim = make_simulator(
                row,
                start_ms=self.base_ms,
                seed=run.scenario.community.seed if seed is None else seed,
                anomalies=AnomalyRates.none(),
            )
            sim.battery_pct = max(sim.battery_pct, HEALTHY_BATTERY_PCT)
            self.devices[str(row["device_id"])] = _Device(row, sim)
        self._offset_ms = 0
        self._offset_wall = self.wall_start
        self.sent = 0
        self.last_background = self.wall_start

    # -- device time

    def offset_ms(self) -> int:
        """The scenario's device time now (ms after its origin), for background reports: the end of the
        latest action played, plus the wall time since."""
        return self._offset_ms + int((self.clock() - self._offset_wall) * 1000)

    # -- messages

    def _send(self, messages: list[Message]) -> None:
        for m in messages:
            _validate(m)
        if messages:
            self.publisher.send(messages)
            self.sent += len(messages)

    def _telemetry(self, d: _Device, ts: int) -> Message:
        ts, seq = d.stamp(ts)
        return Message(d.id, d.type, "telemetry", {"ts": ts, "seq": seq, **d.reading(ts)})

    def heartbeat(self, device_ids: Iterable[str] | None = None) -> int:
        """One ordinary report (with what actions made stick) of each given device (default: every device
        not silenced), at the device time now. Returns how many were sent."""
        ids = list(self.devices) if device_ids is None else list(device_ids)
        ts = self.run_ms(self.offset_ms())
        msgs = [self._telemetry(self.devices[d], ts) for d in ids if not self.devices[d].silent]
        self._send(msgs)
        self.last_background = self.clock()
        return len(msgs)

    def run_ms(self, offset_ms: int) -> int:
        return self.base_ms + offset_ms

    def play(self, action: Action) -> float:
        """Publish one action's messages; returns the wall time it started."""
        started = self.clock()
        a = action.spec
        ids = self.run.device_ids(action.device_ids)
        every_ms = int(a.every * 1000)
        # At `at`, unless one of its devices has reported later than that already (background reports
        # while waiting): then the whole action moves, so that the spacing of its repeats holds and no
        # device's time runs backwards.
        latest = max(self.devices[d].last_ts for d in ids)
        start_ms = int(a.at * 1000) + max(0, latest + 1 - self.run_ms(int(a.at * 1000)))
        msgs: list[Message] = []
        for k in range(a.repeat):
            ts0 = self.run_ms(start_ms + k * every_ms)
            for did in ids:
                d = self.devices[did]
                if a.status is not None:
                    ts, seq = d.stamp(ts0)
                    payload: dict[str, Any] = {"online": a.status.online, "ts": ts, "seq": seq}
                    if a.status.fw is not None:
                        payload["fw"] = a.status.fw
                    msgs.append(Message(did, d.type, "status", payload))
                if a.event is not None:
                    ts, seq = d.stamp(ts0)
                    ev_payload: dict[str, Any] = {"ts": ts, "seq": seq, "event": a.event.name}
                    ev_payload.update(a.event.fields)
                    msgs.append(Message(did, d.type, "event", ev_payload))
                if a.telemetry or a.ramp:
                    values: dict[str, Any] = dict(a.telemetry)
                    for name, (lo, hi) in a.ramp.items():
                        values[name] = lo + (hi - lo) * k / (a.repeat - 1)
                    d.sticky.update(values)
                    msgs.append(self._telemetry(d, ts0))
        for did in ids:
            if a.silence:
                self.devices[did].silent = True
        end_ms = start_ms + (a.repeat - 1) * every_ms
        if end_ms > self.offset_ms():
            self._offset_ms, self._offset_wall = end_ms, self.clock()
        self._send(msgs)
        return started


def _validate(m: Message) -> None:
    """A payload the thing model accepts, or an error naming the topic (a bug in the player)."""
    model = THING_MODELS[m.device_type]
    if m.kind == "telemetry":
        model.telemetry_adapter.validate_python(m.payload, strict=True)
    elif m.kind == "event":
        adapter = model.event_adapter
        if adapter is None:
            raise ValueError(f"{m.topic}: {m.device_type} declares no events")
        adapter.validate_python(m.payload, strict=True)
    else:
        STATUS_ADAPTER.validate_python(m.payload, strict=True)


# ---- running --------------------------------------------------------------------------------------------


Receiver: TypeAlias = Callable[[], Iterable[tuple[str, str]]]
"""What a receiver got so far: (CloudEvent type, subject) pairs."""


@dataclass
class RunOptions:
    #: how often the gateway refreshes its registry cache (SC_REGISTRY_REFRESH_S)
    registry_refresh_s: float = 2.0
    #: endpoints (outbox names) every expected incident must be delivered to, e.g. "mqtt"
    require_endpoints: tuple[str, ...] = ()
    #: receivers by name that must each have got every expected incident's `opened` event
    receivers: Mapping[str, Receiver] = field(default_factory=dict)
    #: a directory in the gateway's SC_RULES_DIRS, for scenarios with rule overrides
    rules_dir: Path | None = None
    #: how long the gateway takes to notice a changed rules file (it checks every 2 s)
    rules_reload_s: float = 3.0
    keep_rules: bool = False
    prime_timeout_s: float = 30.0
    poll_s: float = 0.25
    #: a hard limit for the judging phase, past every deadline
    judge_timeout_s: float = 300.0
    log: Callable[[str], None] | None = None


class Runner:
    """Runs scenarios against a gateway: SQL (registry, incidents) through `engine`, MQTT through
    `publisher`."""

    def __init__(
        self,
        engine: Any,
        publisher: Publisher,
        options: RunOptions | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from gateway.deadletter import DeviceStateStore
        from gateway.incident_store import IncidentStore
        from gateway.registry import Registry

        self.engine = engine
        self.publisher = publisher
        self.o = options or RunOptions()
        self.clock = clock
        self.sleep = sleep
        self.registry = Registry(engine)
        self.states = DeviceStateStore(engine)
        self.incidents = IncidentStore(engine, [])

    def _log(self, text: str) -> None:
        if self.o.log is not None:
            self.o.log(text)

    def run(self, plan: Plan, run_id: str | None = None) -> ScenarioResult:
        run = plan.for_run(run_id or uuid.uuid4().hex[:6])
        rules_file: Path | None = None
        if run.rules_yaml() is not None:
            if self.o.rules_dir is None:
                raise RunnerError(
                    f"scenario {plan.name} overrides rules ({', '.join(plan.scenario.rules)}): give a rules "
                    "directory the gateway loads (--rules-dir, a directory in its SC_RULES_DIRS)"
                )
            written = run.write_rules(self.o.rules_dir)
            assert written is not None
            rules_file, changed = written
            if changed:
                self._log(f"rule overrides written to {rules_file}; waiting for the gateway to load them")
                self.sleep(self.o.rules_reload_s)
        try:
            return self._run(run)
        finally:
            if rules_file is not None and not self.o.keep_rules:
                rules_file.unlink(missing_ok=True)

    def _run(self, run: RunPlan) -> ScenarioResult:
        s = run.scenario
        started = self.clock()
        started_dt = dt.datetime.fromtimestamp(started, dt.UTC)
        self._register(run)
        player = Player(run, self.publisher, clock=self.clock)
        # A registry refresh of the gateway before the devices speak: a refresh that fell between the
        # import and the move to in_service would otherwise have the gateway take their first reports as
        # of devices not in service, and rules for in-service devices only (absence: "offline") would
        # never start watching a device that then falls silent.
        self._idle(player, self.clock() + self.o.registry_refresh_s + 0.3, background=False)
        self._prime(run, player)
        # one more registry refresh of the gateway, so that it sees them in service
        self._idle(player, self.clock() + self.o.registry_refresh_s + 0.3)
        run_start = self.clock()
        starts: dict[str, float] = {}
        for action in run.plan.actions:
            t = player.play(action)
            starts[action.label] = t
            self._log(f"{action.label}: {len(action.device_ids)} device(s) at +{action.spec.at:g} s")
            if action.spec.wait:
                self._idle(player, self.clock() + action.spec.wait)
        first, last = min(starts.values()), max(starts.values())
        targets = [run.target(t) for t in run.plan.targets]
        limit = self.clock() + self.o.judge_timeout_s
        while True:
            ctx = JudgeContext(
                run_start=run_start,
                action_starts=starts,
                first_action=first,
                last_action=last,
                now=self.clock(),
                grace_s=s.grace_s,
                required_endpoints=self.o.require_endpoints,
                receivers=tuple(self.o.receivers),
            )
            seen = self._seen(run, started_dt)
            checks = [judge(t, seen, ctx) for t in targets]
            if all(c.final for c in checks) or ctx.now > limit:
                break
            self._idle(player, self.clock() + self.o.poll_s)
        return ScenarioResult(
            scenario=s.name,
            title=s.title,
            file=run.plan.file,
            run_id=run.run_id,
            community=run.community,
            devices=len(run.rows),
            messages=player.sent,
            started_at=started_dt,
            wall_s=self.clock() - started,
            checks=tuple(checks),
        )

    def _idle(self, player: Player, until: float, *, background: bool = True) -> None:
        """Wait until `until`, the background reporting meanwhile (unless `background` is False)."""
        bg = player.run.scenario.background if background else None
        while True:
            now = self.clock()
            if bg is not None and now - player.last_background >= bg.every_s:
                player.heartbeat()
                continue
            if now >= until:
                return
            nxt = until if bg is None else min(until, player.last_background + bg.every_s)
            self.sleep(max(0.01, min(nxt - now, 0.25)))

    def _register(self, run: RunPlan) -> None:
        buf = io.StringIO()
        write_devices_csv(run.rows, buf)
        buf.seek(0)
        report = self.registry.import_csv(buf, actor=f"scenario:{run.scenario.name}")
        if not report.ok:
            errors = "; ".join(f"row {r.row} {r.device_id}: {r.error}" for r in report.errors)
            raise RunnerError(f"registering the community failed: {errors}")
        ids = [str(r["device_id"]) for r in run.rows]
        # One by one rather than Registry.mark_in_service, whose Result.tuples() SQLAlchemy 2.1 deprecates
        # (a warning the test suite turns into an error).
        for did in ids:
            self.registry.set_lifecycle(did, "in_service", actor=f"scenario:{run.scenario.name}")
        self._log(f"registered {len(ids)} devices of {run.community}, in service")

    def _prime(self, run: RunPlan, player: Player) -> None:
        """Every device reports once, again until the gateway has seen it (its registry cache may not know
        the devices yet: it dead-letters their first reports)."""
        since = dt.datetime.fromtimestamp(self.clock() - 1, dt.UTC)
        waiting = [str(r["device_id"]) for r in run.rows]
        deadline = self.clock() + self.o.prime_timeout_s
        while waiting:
            player.heartbeat(waiting)
            until = self.clock() + 1.0
            while waiting and self.clock() < until:
                self.sleep(0.2)
                waiting = [d for d in waiting if not self._seen_since(d, since)]
            if waiting and self.clock() > deadline:
                raise RunnerError(
                    f"the gateway took no report of {len(waiting)} device(s) (e.g. {waiting[0]}) within "
                    f"{self.o.prime_timeout_s:g} s: is it running, on this broker and this database?"
                )
        self._log(f"the gateway has seen all {len(run.rows)} devices")

    def _seen_since(self, device_id: str, since: dt.datetime) -> bool:
        st = self.states.get(device_id)
        return st is not None and st.last_seen is not None and st.last_seen >= since

    def _seen(self, run: RunPlan, since: dt.datetime) -> list[Seen]:
        found, _total = self.incidents.find(
            status=None, include_commissioning=True, communities=[run.community], since=since, limit=10000
        )
        got: dict[str, set[tuple[str, str]]] = {name: set(fn()) for name, fn in self.o.receivers.items()}
        out = []
        for inc in found:
            opened = inc.opened_at.timestamp()
            if opened < since.timestamp():
                continue
            deliveries = {
                row.endpoint: row.state
                for row in self.incidents.outbox_rows(inc.incident_id)
                if row.event_type == "sc.incident.opened"
            }
            received = frozenset(
                name for name, pairs in got.items() if ("sc.incident.opened", inc.incident_id) in pairs
            )
            out.append(
                Seen(
                    incident_id=inc.incident_id,
                    rule_id=inc.rule_id,
                    dedup_key=inc.dedup_key,
                    device_id=inc.device.id,
                    urgency=inc.urgency,
                    opened_at=opened,
                    members=tuple(inc.members),
                    escalation_level=inc.escalation_level,
                    commissioning=inc.commissioning,
                    deliveries=deliveries,
                    received_by=received,
                )
            )
        return out


# ---- the command line -----------------------------------------------------------------------------------


def _account(args: argparse.Namespace) -> tuple[str | None, str | None]:
    user = args.mqtt_username or os.environ.get("SC_SIM_USERNAME")
    password = args.mqtt_password or os.environ.get("SC_SIM_PASSWORD")
    if user is None:
        f = Path(".var/mosquitto/accounts/svc.simulator.json")
        try:
            doc = json.loads(f.read_text())
            user, password = doc.get("username"), doc.get("password")
        except (OSError, ValueError):
            pass
    return user, password


def _cmd_list(_args: argparse.Namespace) -> int:
    rows = []
    for f in shipped_scenarios():
        try:
            plan = load_scenario(f)
        except ScenarioError as exc:
            rows.append((f.stem, f"INVALID: {exc.problems[0].detail}", "", "", ""))
            continue
        s = plan.scenario
        rows.append(
            (
                s.name,
                s.title,
                f"{len(plan.rows)} devices",
                f"{len(s.expect)} expect / {len(s.forbid)} forbid",
                f"~{s.wall_estimate_s:.0f} s" + (" (needs --rules-dir)" if s.rules else ""),
            )
        )
    width = max((len(r[0]) for r in rows), default=0)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]}  [{', '.join(x for x in r[2:] if x)}]")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    for name in args.files or [str(p) for p in shipped_scenarios()]:
        try:
            plan = load_scenario(find_scenario(name))
        except (ScenarioError, FileNotFoundError) as exc:
            print(exc, file=sys.stderr)
            bad += 1
            continue
        print(f"{plan.file}: ok ({plan.name}: {len(plan.rows)} devices, {len(plan.targets)} checks)")
    return 1 if bad else 0


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.db import make_engine

    try:
        plans = [load_scenario(find_scenario(n)) for n in args.scenarios]
    except (ScenarioError, FileNotFoundError) as exc:
        print(exc, file=sys.stderr)
        return 2
    user, password = _account(args)
    engine = make_engine(args.database_url)
    try:
        publisher = MqttPublisher(args.mqtt_host, args.mqtt_port, username=user, password=password)
    except PublishError as exc:
        print(f"!! {exc}", file=sys.stderr)
        return 2
    quiet = args.json
    options = RunOptions(
        registry_refresh_s=args.registry_refresh_s,
        require_endpoints=tuple(args.require_endpoint or ()),
        rules_dir=Path(args.rules_dir) if args.rules_dir else None,
        keep_rules=args.keep_rules,
        log=None if quiet else (lambda t: print(f"  .. {t}", flush=True)),
    )
    runner = Runner(engine, publisher, options)
    results = []
    try:
        for plan in plans:
            if not quiet:
                print(f"== {plan.name}: {plan.scenario.title}", flush=True)
            try:
                result = runner.run(plan, args.run_id)
            except (RunnerError, PublishError) as exc:
                print(f"!! {plan.name}: {exc}", file=sys.stderr)
                return 2
            results.append(result)
            if not quiet:
                print(result.report(), flush=True)
    finally:
        publisher.close()
        engine.dispose()
    if quiet:
        print(json.dumps([r.to_json() for r in results], ensure_ascii=False, indent=1))
    else:
        good = sum(r.passed for r in results)
        print(f"{good}/{len(results)} scenario(s) passed")
    return 0 if all(r.passed for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.scenario", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the shipped scenarios")
    v = sub.add_parser("validate", help="check scenario files (default: the shipped ones)")
    v.add_argument("files", nargs="*")
    r = sub.add_parser("run", help="run scenarios against a running gateway")
    r.add_argument("scenarios", nargs="+", metavar="FILE_OR_NAME")
    r.add_argument("--mqtt-host", default=os.environ.get("SC_MQTT_HOST", "127.0.0.1"))
    r.add_argument("--mqtt-port", type=int, default=int(os.environ.get("SC_MQTT_PORT", "1883")))
    r.add_argument(
        "--mqtt-username", help="an adaptor account (default SC_SIM_USERNAME, else .var's svc.simulator)"
    )
    r.add_argument("--mqtt-password", help="or SC_SIM_PASSWORD")
    r.add_argument(
        "--database-url",
        default=os.environ.get("SC_DATABASE_URL", "sqlite:///.var/registry.db"),
        help="the gateway's SQL database (default SC_DATABASE_URL, else sqlite:///.var/registry.db)",
    )
    r.add_argument(
        "--rules-dir", help="a directory in the gateway's SC_RULES_DIRS (for scenarios with `rules:`)"
    )
    r.add_argument("--keep-rules", action="store_true", help="leave the overrides file there after the run")
    r.add_argument(
        "--require-endpoint",
        action="append",
        metavar="NAME",
        help="an endpoint (outbox name, e.g. mqtt) every expected incident must reach; repeatable",
    )
    r.add_argument(
        "--registry-refresh-s", type=float, default=2.0, help="the gateway's SC_REGISTRY_REFRESH_S"
    )
    r.add_argument("--run-id", help="1-12 lowercase letters/digits (default: random)")
    r.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = p.parse_args(argv)
    if args.cmd == "list":
        return _cmd_list(args)
    if args.cmd == "validate":
        return _cmd_validate(args)
    return _cmd_run(args)


if __name__ == "__main__":
    raise SystemExit(main())
