"""Builders for tests and benchmarks: observations at controlled times and rules from plain dicts."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pydantic import TypeAdapter

from rules.engine import Engine, FlapPolicy, Rule, RuleSet
from rules.kinds import AnyParams, RuleParams
from rules.model import Kind, Observation

#: 2026-11-21T05:37:34Z = 13:37:34 in UTC+8
T0 = 1_795_239_454_000
S = 1000
MIN = 60 * S
HOUR = 60 * MIN

_PARAMS: TypeAdapter[AnyParams] = TypeAdapter(RuleParams)


def at_local(hh: int, mm: int = 0, day: int = 0) -> int:
    """Epoch ms of hh:mm local time (UTC+8) on 2026-11-21 + `day` days."""
    midnight_local = 1_795_190_400_000  # 2026-11-21T00:00+08:00 = 2026-11-20T16:00Z
    return midnight_local + day * 24 * HOUR + hh * HOUR + mm * MIN


def obs(
    device_id: str = "dev-1",
    values: Mapping[str, Any] | None = None,
    *,
    t: int = T0,
    rx: int | None = None,
    device_type: str = "manhole_cover",
    kind: Kind | None = None,
    event: str | None = None,
    seq: int | None = None,
    community: str | None = "110101001001",
    grid_code: str | None = "110101001001001",
    building: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    lifecycle: str = "in_service",
) -> Observation:
    """An observation: device time `t`, received at `rx` (default: the same instant)."""
    if kind is None:
        kind = "event" if event is not None else "telemetry"
    return Observation(
        device_id=device_id,
        device_type=device_type,
        kind=kind,
        ts_ms=t,
        received_ms=t if rx is None else rx,
        values=MappingProxyType(dict(values or {})),
        event=event,
        seq=seq,
        community=community,
        grid_code=grid_code,
        building=building,
        attributes=MappingProxyType(dict(attributes or {})),
        lifecycle=lifecycle,
    )


def params(**kw: Any) -> AnyParams:
    """Kind parameters from keywords (validated as in a rule file)."""
    return _PARAMS.validate_python(kw)


def rule(rule_id: str, urgency: str = "P3", **kw: Any) -> Rule:
    """A rule: meta keys (title_zh, where, silent, ...) and the kind's parameters as keywords."""
    meta_keys = {
        "title_zh",
        "title_en",
        "description",
        "where",
        "lifecycles",
        "silent",
        "enabled",
        "flapping",
    }
    meta = {k: v for k, v in kw.items() if k in meta_keys}
    p = {k: v for k, v in kw.items() if k not in meta_keys}
    dtype = rule_id.split(".", 1)[0]
    if p.get("kind") == "absence" and "interval_s" not in p:
        from devices import THING_MODELS

        p["interval_s"] = THING_MODELS[dtype].report_interval_s
    if p.get("kind") == "correlation":
        p["rules"] = [r if "." in r else f"{dtype}.{r}" for r in p["rules"]]
    where = {k: tuple(v) if isinstance(v, list | tuple) else (v,) for k, v in meta.pop("where", {}).items()}
    return Rule(
        id=rule_id,
        device_type=dtype,
        urgency=urgency,
        title_zh=meta.pop("title_zh", rule_id),
        title_en=meta.pop("title_en", rule_id),
        params=_PARAMS.validate_python(p),
        where=where,
        **meta,
    )


def engine(*rules: Rule, flapping: FlapPolicy | None = None) -> Engine:
    return Engine(RuleSet(tuple(rules)), flapping=flapping)
