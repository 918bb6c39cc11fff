"""Classification, routing and deadlines of incidents: incidents/routing.yaml, validated against the rules.

`load_routing()` fails at load time (`RoutingLoadError`, naming the file and line) on an unknown rule id,
a rule without a route, an unknown class code or party token. `Router.route(rule_id, device)` then says
the case type, class, who acts and the escalation hint; `Deadlines.due(urgency, now)` the respond-by and
resolve-by times.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from incidents.model import LOCAL_TZ, CaseType, DeviceLike, Escalation, Urgency

DEFAULT_ROUTING: Final = Path(__file__).parent / "routing.yaml"
OWNER: Final = "owner"
OWNER_FALLBACK: Final = "01"
TOKENS: Final = frozenset({"@responsible_unit", "@street", "@maintainer"})


class RoutingLoadError(ValueError):
    """A routing file that cannot be used: names the file and, where known, the line."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        self.file, self.line, self.detail = file, line, message
        super().__init__(f"{file}{f':{line}' if line else ''}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RouteSpec(_Strict):
    match: tuple[str, ...] = Field(min_length=1)
    case_type: CaseType
    #: a class code, or "owner": the manhole cover's owner class
    class_: str = Field(alias="class")
    act: tuple[str, ...] = Field(min_length=1)
    act_by_class: dict[str, tuple[str, ...]] = {}
    escalation: Escalation | None = None

    def matches(self, rule_id: str) -> bool:
        return any(fnmatch.fnmatchcase(rule_id, m) for m in self.match)


class Span(_Strict):
    """A deadline: clock minutes / hours, or working days (exactly one)."""

    minutes: float | None = None
    hours: float | None = None
    working_days: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one(self) -> Span:
        if sum(x is not None for x in (self.minutes, self.hours, self.working_days)) != 1:
            raise ValueError("give exactly one of minutes, hours, working_days")
        return self


class Tier(_Strict):
    respond: Span | None
    resolve: Span | None


class RoutingFile(_Strict):
    component_code_split: str = "6+2+2+6"
    component_classes: dict[str, str]
    event_classes: dict[str, str]
    routes: tuple[RouteSpec, ...]
    deadlines: dict[Urgency, Tier]
    holidays: tuple[dt.date, ...] = ()
    workdays: tuple[dt.date, ...] = ()


@dataclass(frozen=True, slots=True)
class Route:
    """Where one incident goes."""

    case_type: CaseType
    class_code: str
    class_name: str
    #: the unit that must act (the first of `dispatch_to`), None when the device has none registered
    responsible_unit: str | None
    dispatch_to: tuple[str, ...]
    escalation: Escalation | None


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Respond-by / resolve-by from the urgency tiers; working days are Mon-Fri in UTC+8."""

    tiers: Mapping[Urgency, Tier]
    holidays: frozenset[dt.date] = frozenset()
    workdays: frozenset[dt.date] = frozenset()

    def due(self, urgency: Urgency, start: dt.datetime) -> tuple[dt.datetime | None, dt.datetime | None]:
        tier = self.tiers.get(urgency)
        if tier is None:
            return None, None
        return self._add(start, tier.respond), self._add(start, tier.resolve)

    def _add(self, start: dt.datetime, span: Span | None) -> dt.datetime | None:
        if span is None:
            return None
        if span.minutes is not None:
            return start + dt.timedelta(minutes=span.minutes)
        if span.hours is not None:
            return start + dt.timedelta(hours=span.hours)
        assert span.working_days is not None
        return self.add_working_days(start, span.working_days)

    def is_working_day(self, day: dt.date) -> bool:
        if day in self.holidays:
            return False
        return day.weekday() < 5 or day in self.workdays

    def add_working_days(self, start: dt.datetime, days: int) -> dt.datetime:
        """`start` + `days` × 24 h of working-day time: the clock stops outside working days (Friday
        17:00 + 1 working day = Monday 17:00; Saturday 10:00 + 1 = the end of Monday)."""
        if start.tzinfo is None:
            raise ValueError("naive datetime: give a timezone")
        cursor = start.astimezone(LOCAL_TZ)
        left = dt.timedelta(days=days)
        for _ in range(10_000):  # a year of holidays cannot loop forever
            midnight = dt.datetime.combine(cursor.date() + dt.timedelta(days=1), dt.time(), LOCAL_TZ)
            if self.is_working_day(cursor.date()):
                if left <= midnight - cursor:
                    return (cursor + left).astimezone(start.tzinfo)
                left -= midnight - cursor
            cursor = midnight
        raise ValueError("no working days in the calendar")


class Router:
    """Routes an incident of a rule for a device (validated: every routed rule has exactly one route)."""

    def __init__(self, spec: RoutingFile, rule_ids: Iterable[str], titles: Mapping[str, tuple[str, str]]):
        self.spec = spec
        self.titles = dict(titles)
        self.deadlines = Deadlines(spec.deadlines, frozenset(spec.holidays), frozenset(spec.workdays))
        parts = spec.component_code_split.replace(" ", "").split("+")
        self._minor_at = (int(parts[0]) + int(parts[1]), int(parts[0]) + int(parts[1]) + int(parts[2]))
        self._routes: dict[str, RouteSpec] = {}
        for rule_id in rule_ids:
            for r in spec.routes:
                if r.matches(rule_id):
                    self._routes[rule_id] = r
                    break

    @property
    def rule_ids(self) -> frozenset[str]:
        return frozenset(self._routes)

    def title(self, rule_id: str) -> tuple[str, str]:
        """(Chinese, English) title of a rule."""
        return self.titles.get(rule_id, (rule_id, rule_id))

    def route(self, rule_id: str, device: DeviceLike | None) -> Route:
        spec = self._routes.get(rule_id)
        if spec is None:
            raise KeyError(f"no route for rule {rule_id}")
        if spec.class_ == OWNER:
            code = self.owner_class(device)
            names = self.spec.component_classes
        else:
            code = spec.class_
            names = self.spec.component_classes if spec.case_type == "component" else self.spec.event_classes
        parties = spec.act_by_class.get(code, spec.act)
        dispatch = tuple(dict.fromkeys(p for p in (_party(t, device) for t in parties) if p))
        # the unit in charge: the first party taken from the registry (the owner, the street, the
        # maintainer), else the device's registered unit
        units = [_party(t, device) for t in parties if t.startswith("@")]
        unit = next((u for u in units if u), None) or (device.responsible_unit if device else None)
        return Route(spec.case_type, code, names[code], unit, dispatch, spec.escalation)

    def owner_class(self, device: DeviceLike | None) -> str:
        """A manhole cover's class: attribute `owner_class`, else its component code's class, else "01"."""
        if device is None:
            return OWNER_FALLBACK
        owner = device.attributes.get("owner_class")
        if isinstance(owner, str) and owner in self.spec.component_classes:
            return owner
        code = device.component_code
        if code and len(code) == 16 and code.isdigit():
            a, b = self._minor_at
            cls = f"{code[a - 2 : a]}{int(code[a:b]):02d}"
            if cls in self.spec.component_classes:
                return cls
        return OWNER_FALLBACK


def _party(token: str, device: DeviceLike | None) -> str | None:
    if not token.startswith("@"):
        return token
    if device is None:
        return None
    if token == "@street":
        return device.street or device.responsible_unit
    if token == "@maintainer":
        m = device.attributes.get("maintainer")
        return str(m) if m not in (None, "") else device.responsible_unit
    return device.responsible_unit


def _lines(path: Path, text: str) -> list[int | None]:
    """The line of each route entry (for error messages)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RoutingLoadError(str(path), mark.line + 1 if mark else None, f"not valid YAML: {exc}") from None
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == "routes" and isinstance(v, yaml.SequenceNode):
                return [item.start_mark.line + 1 for item in v.value]
    return []


def load_routing(
    path: str | Path = DEFAULT_ROUTING,
    rules: Any = None,
    *,
    require_all: bool = True,
) -> Router:
    """Load and check a routing file against a RuleSet (default: rules.loader.load_default_rules()).

    Every `match` entry must name at least one known rule; with `require_all` every rule that hands on
    verdicts (not silent; disabled ones too: operators switch them on) must have a route."""
    if rules is None:
        from rules.loader import load_default_rules

        rules = load_default_rules()
    path = Path(path)
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutingLoadError(file, None, f"cannot read: {exc}") from None
    lines = _lines(path, text)
    try:
        spec = RoutingFile.model_validate(yaml.safe_load(text))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err["loc"]
        line = lines[loc[1]] if len(loc) > 1 and loc[0] == "routes" and isinstance(loc[1], int) else None
        where = ".".join(str(x) for x in loc)
        raise RoutingLoadError(file, line, f"{where}: {err['msg']}") from None

    known = {r.id: r for r in rules.rules}
    parts = spec.component_code_split.replace(" ", "").split("+")
    if len(parts) != 4 or not all(p.isdigit() for p in parts) or sum(map(int, parts)) != 16:
        msg = f"component_code_split {spec.component_code_split!r}: want 6+2+minor+serial = 16 digits"
        raise RoutingLoadError(file, None, msg)
    for i, r in enumerate(spec.routes):
        line = lines[i] if i < len(lines) else None

        def fail(msg: str, line: int | None = line) -> RoutingLoadError:
            return RoutingLoadError(file, line, msg)

        for m in r.match:
            if not any(fnmatch.fnmatchcase(rid, m) for rid in known):
                raise fail(f"route matches no rule: {m!r} (known: {', '.join(sorted(known))})")
        classes = spec.component_classes if r.case_type == "component" else spec.event_classes
        if r.class_ == OWNER:
            if r.case_type != "component":
                raise fail("class 'owner' is for component cases")
        elif r.class_ not in classes:
            raise fail(f"unknown {r.case_type} class {r.class_!r} (known: {', '.join(classes)})")
        for cls in r.act_by_class:
            if cls not in spec.component_classes and cls not in spec.event_classes:
                raise fail(f"act_by_class: unknown class {cls!r}")
        for token in (*r.act, *(t for ts in r.act_by_class.values() for t in ts)):
            if token.startswith("@") and token not in TOKENS:
                raise fail(f"unknown party {token!r} (known: {', '.join(sorted(TOKENS))})")
    routed = [rid for rid, rule in known.items() if not rule.silent]
    router = Router(spec, routed, {rid: (rule.title_zh, rule.title_en) for rid, rule in known.items()})
    missing = sorted(set(routed) - router.rule_ids)
    if require_all and missing:
        raise RoutingLoadError(file, None, f"rules without a route: {', '.join(missing)}")
    return router


@functools.lru_cache(maxsize=1)
def default_router() -> Router:
    """The routing of incidents/routing.yaml for the default rules (loaded once)."""
    return load_routing()
