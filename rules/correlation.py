"""Rule kind `correlation`: `min_count` distinct devices (or distinct source rules) of one group firing
the source `rules` within `window_s` → one group alarm listing its members.

Its input is not an observation but a member change: a source rule's alarm on one device opened or
cleared (after the engine's flapping damping). A member enters when its alarm opens (at that time) and
leaves when it clears. The group fires when `min_count` distinct members opened within a span of
`window_s` of each other (without a window: when that many are firing at once); while firing, each new
member is a repeated occurrence with the member list updated; it clears when no member is firing any
more. With `suppress_members` the members' own alarms are taken into the group alarm (the engine
reports them cleared with `grouped_into`, and withholds later members'), so 200 dark lamps on one
circuit are one case, not 200.

`group_by: device` with `count: rules` combines conditions on one device: e.g. a smoke alarm and a
temperature >= 60 °C on the same detector.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from rules.model import GroupBy, Signal, fmt_num

NO_SIGNALS: tuple[Signal, ...] = ()


class CorrelationParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["correlation"]
    #: source rule ids (a short name means a rule of the same file)
    rules: tuple[str, ...] = Field(min_length=1)
    group_by: GroupBy = "building"
    min_count: int = Field(default=2, ge=1)
    count: Literal["devices", "rules"] = "devices"
    window_s: float | None = Field(default=None, gt=0)
    suppress_members: bool = False

    def reads_fields(self) -> dict[str, str]:
        return {}

    def reads_events(self) -> tuple[str, ...]:
        return ()

    def reads_attrs(self) -> set[str]:
        return set()


class MemberChange(NamedTuple):
    """A source rule's alarm on one device opened (firing) or cleared, with the member's group key."""

    group: str
    device_id: str
    rule_id: str
    firing: bool
    ts_ms: int


class CorrelationState(NamedTuple):
    #: (device id, source rule id, opened at) of the members currently firing
    members: tuple[tuple[str, str, int], ...] = ()
    firing: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"members": [list(m) for m in self.members], "firing": self.firing}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CorrelationState:
        return cls(tuple((str(d), str(r), int(t)) for d, r, t in data["members"]), bool(data["firing"]))


State = CorrelationState


def _unit(p: CorrelationParams, m: tuple[str, str, int]) -> str:
    return m[0] if p.count == "devices" else m[1]


def satisfied(p: CorrelationParams, members: tuple[tuple[str, str, int], ...]) -> bool:
    if p.window_s is None:
        return len({_unit(p, m) for m in members}) >= p.min_count
    window_ms = int(p.window_s * 1000)
    ms = sorted(members, key=lambda m: m[2])
    i = 0
    for j in range(len(ms)):
        while ms[j][2] - ms[i][2] > window_ms:
            i += 1
        if len({_unit(p, m) for m in ms[i : j + 1]}) >= p.min_count:
            return True
    return False


def member_names(p: CorrelationParams, members: tuple[tuple[str, str, int], ...]) -> tuple[str, ...]:
    return tuple(sorted({_unit(p, m) for m in members}))


def evaluate(
    p: CorrelationParams, change: MemberChange, state: State | None, now_ms: int
) -> tuple[tuple[Signal, ...], State | None]:
    s = state or CorrelationState()
    ident = (change.device_id, change.rule_id)
    others = tuple(m for m in s.members if (m[0], m[1]) != ident)
    members = (*others, (change.device_id, change.rule_id, change.ts_ms)) if change.firing else others
    if members == s.members:
        return NO_SIGNALS, state
    values = {"members": len(member_names(p, members))}
    text = _text(p)
    if not s.firing:
        if satisfied(p, members):
            sig = Signal(change.group, True, change.ts_ms, 0, values, text, members=member_names(p, members))
            return (sig,), CorrelationState(members, True)
        return NO_SIGNALS, (CorrelationState(members) if members else None)
    if not members:
        return (Signal(change.group, False, change.ts_ms, 0, values, text),), None
    if change.firing and member_names(p, members) != member_names(p, s.members):
        sig = Signal(
            change.group,
            True,
            change.ts_ms,
            0,
            values,
            text,
            occurrence=True,
            members=member_names(p, members),
        )
        return (sig,), CorrelationState(members, True)
    return NO_SIGNALS, CorrelationState(members, True)


def _text(p: CorrelationParams) -> str:
    unit = "devices" if p.count == "devices" else "rules"
    s = f">= {p.min_count} {unit} firing {'|'.join(p.rules)}"
    if p.window_s:
        s += f" within {fmt_num(p.window_s)} s"
    return s


def tick(
    p: CorrelationParams, state: State | None, now_ms: int, key: str
) -> tuple[tuple[Signal, ...], State | None]:
    return NO_SIGNALS, state


def due(p: CorrelationParams, state: State | None) -> int | None:
    return None


def describe(p: CorrelationParams) -> str:
    by = p.group_by if isinstance(p.group_by, str) else p.group_by.attr
    s = _text(p) + f", per {by}"
    if p.suppress_members:
        s += " (members' own alarms taken into it)"
    return s
