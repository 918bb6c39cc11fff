"""The rule kinds, listed explicitly: their parameter models form the `RuleParams` discriminated union,
and each has a `KindSpec` with its pure functions (evaluate, tick, due) and its state type."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypeAlias

from pydantic import Field

from rules import absence, correlation, event_count, rate_of_change, schedule, state_duration, threshold
from rules.absence import AbsenceParams
from rules.correlation import CorrelationParams
from rules.event_count import EventCountParams
from rules.rate_of_change import RateOfChangeParams
from rules.schedule import ScheduleParams
from rules.state_duration import StateDurationParams
from rules.threshold import ThresholdParams

RuleParams: TypeAlias = Annotated[
    ThresholdParams
    | StateDurationParams
    | EventCountParams
    | RateOfChangeParams
    | AbsenceParams
    | CorrelationParams
    | ScheduleParams,
    Field(discriminator="kind"),
]


class StateLike(Protocol):
    def to_json(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class KindSpec:
    """What the engine needs of a rule kind. Functions are the kind module's own (pure)."""

    name: str
    params: type
    #: `from_json` of the kind's state type
    state_from_json: Callable[[Mapping[str, Any]], Any]
    evaluate: Callable[[Any, Any, Any, int], tuple[tuple[Any, ...], Any]]
    tick: Callable[[Any, Any, int, str], tuple[tuple[Any, ...], Any]]
    due: Callable[[Any, Any], int | None]
    describe: Callable[[Any], str]
    #: its input follows the device's time order: a stale or duplicate observation is not evaluated
    ordered: bool
    #: every message of the device is input (absence)
    any_message: bool = False
    #: input is other rules' alarms, not observations (correlation)
    derived: bool = False


KINDS: dict[str, KindSpec] = {
    s.name: s
    for s in (
        KindSpec(
            "threshold",
            ThresholdParams,
            threshold.State.from_json,
            threshold.evaluate,
            threshold.tick,
            threshold.due,
            threshold.describe,
            ordered=True,
        ),
        KindSpec(
            "state_duration",
            StateDurationParams,
            state_duration.State.from_json,
            state_duration.evaluate,
            state_duration.tick,
            state_duration.due,
            state_duration.describe,
            ordered=True,
        ),
        KindSpec(
            "event_count",
            EventCountParams,
            event_count.State.from_json,
            event_count.evaluate,
            event_count.tick,
            event_count.due,
            event_count.describe,
            ordered=False,
        ),
        KindSpec(
            "rate_of_change",
            RateOfChangeParams,
            rate_of_change.State.from_json,
            rate_of_change.evaluate,
            rate_of_change.tick,
            rate_of_change.due,
            rate_of_change.describe,
            ordered=True,
        ),
        KindSpec(
            "absence",
            AbsenceParams,
            absence.State.from_json,
            absence.evaluate,
            absence.tick,
            absence.due,
            absence.describe,
            ordered=False,
            any_message=True,
        ),
        KindSpec(
            "correlation",
            CorrelationParams,
            correlation.State.from_json,
            correlation.evaluate,
            correlation.tick,
            correlation.due,
            correlation.describe,
            ordered=False,
            derived=True,
        ),
        KindSpec(
            "schedule",
            ScheduleParams,
            schedule.State.from_json,
            schedule.evaluate,
            schedule.tick,
            schedule.due,
            schedule.describe,
            ordered=True,
        ),
    )
}

AnyParams: TypeAlias = (
    ThresholdParams
    | StateDurationParams
    | EventCountParams
    | RateOfChangeParams
    | AbsenceParams
    | CorrelationParams
    | ScheduleParams
)
